"""The model manifest (`models/manifest.toml`) that the product reads: the file, its sha256 and the input contract.

Shared by `export.py` (one trained U-Net) and `ensemble.py` (several composed into one graph); no PyTorch needed.
"""

MANIFEST = """[model]
name = "lungsentry-unet"
version = "{version}"
file = "{file}"
sha256 = "{sha256}"

[input]
name = "ct"
channels = 1
height = 256
width = 256
dtype = "float32"
normalisation = "minmax_clahe"
hu_clip = [-1024.0, 3071.0]
clahe_clip_limit = 7.0
clahe_tiles = 8

[output]
name = "scores"
kind = "logits"
classes = ["background", "lung", "lesion"]
"""
