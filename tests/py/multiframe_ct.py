"""Converts a folder of classic CT slices (one series) into one multi-frame CT instance, for tests/multiframe.rs.

usage: multiframe_ct.py SRC_DIR OUT_FILE legacy|enhanced

legacy:   highdicom's LegacyConvertedEnhancedCTImage (SOP class 1.2.840.10008.5.1.4.1.1.2.2): shared and per-frame
          functional groups (plane position/orientation, pixel measures, pixel value transformation), new series.
enhanced: the same object relabelled Enhanced CT Image Storage (1.2.840.10008.5.1.4.1.1.2.1), another new series:
          the functional-group layout the daemon reads is the same for both classes.
Frames are in the order highdicom chooses (by position); prints the series UID and the number of frames.
"""
import sys
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.uid import generate_uid

src, out, kind = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
datasets = [pydicom.dcmread(f) for f in sorted(src.glob("*.dcm"))]
series_uid = generate_uid()
image = hd.legacy.LegacyConvertedEnhancedCTImage(
    legacy_datasets=datasets,
    series_instance_uid=series_uid,
    series_number=int(getattr(datasets[0], "SeriesNumber", 1) or 1) + 100,
    sop_instance_uid=generate_uid(),
    instance_number=1,
)
if kind == "enhanced":
    image.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    image.file_meta.MediaStorageSOPClassUID = image.SOPClassUID
elif kind != "legacy":
    sys.exit(f"unknown kind {kind!r}")
image.save_as(out, enforce_file_format=True)
print(series_uid, int(image.NumberOfFrames))
