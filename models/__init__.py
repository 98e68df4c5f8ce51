"""lungsentry's segmentation model: the shipped ONNX file with its manifest and card (data, not code), and
`models.train`, the package that trains, exports and checks it.

A regular package, so `python -m models.train.<script>` from the repository root finds this folder before any
other `models` on the import path.
"""
