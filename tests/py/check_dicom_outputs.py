#!/usr/bin/env python3
"""Reads lungsentry's DICOM outputs back with pydicom + highdicom and checks them against the result JSON.

usage: check_dicom_outputs.py RESULT_JSON SOURCE_DIR OUTPUT_DIR VERSION

Checks structure, references and codes (not lesion accuracy): the SEG's segments, codes, algorithm identification,
frame of reference and per-frame source references; that the SEG's voxel counts give the result's volumes; the SR's
TID 1500 tree as highdicom parses it, with every number equal to the result JSON; the key images' study, series,
banner and burned-in contours. Prints one line per object and exits non-zero on the first failed check.
"""
import glob
import json
import os
import sys

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def code_tuple(c):
    return (c.value, c.scheme_designator, c.meaning)


def main():
    result_path, source_dir, out_dir, version = sys.argv[1:5]
    result = json.load(open(result_path))
    sources = {}
    for f in glob.glob(os.path.join(source_dir, "*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = ds
    any_src = next(iter(sources.values()))
    model = result["model"]
    files = sorted(os.listdir(out_dir))
    series_uids = set()

    # ---- SEG
    seg = hd.seg.segread(os.path.join(out_dir, "seg.dcm"))
    check(seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4", "SEG SOP class")
    check(seg.SegmentationType == "BINARY", "SEG type")
    check(seg.StudyInstanceUID == any_src.StudyInstanceUID, "SEG study")
    check(seg.FrameOfReferenceUID == any_src.FrameOfReferenceUID, "SEG frame of reference")
    check(seg.PatientID == any_src.PatientID, "SEG patient")
    series_uids.add(seg.SeriesInstanceUID)
    descs = {d.segment_number: d for d in (seg.get_segment_description(n) for n in seg.segment_numbers)}
    check(sorted(descs) == [1, 2], f"segment numbers {sorted(descs)}")
    lung, lesion = descs[1], descs[2]
    check(lung.segment_label == "Lung", "segment 1 label")
    check(lesion.segment_label == "COVID-19 lesion", "segment 2 label")
    check(code_tuple(lung.segmented_property_category) == ("91723000", "SCT", "Anatomical Structure"), "lung category")
    check(code_tuple(lung.segmented_property_type) == ("39607008", "SCT", "Lung"), "lung type")
    check(lesion.segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure, "lesion category")
    check(lesion.segmented_property_type == codes.SCT.Lesion, "lesion type")
    for d in (lung, lesion):
        check(d.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, "algorithm type")
        algo = d.algorithm_identification
        check(algo is not None, "algorithm identification missing")
        check(algo[0].AlgorithmName == model["name"], "algorithm name")
        check(algo[0].AlgorithmVersion == model["version"], "algorithm version")
        check(algo[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110", "algorithm family")
    # Every frame references a source instance of the series; source UIDs are exactly the analysed slices.
    analysed = result["slice_sop_instance_uids"]
    check(set(analysed) <= set(sources), "result slices are source instances")
    refs = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for f in seg.PerFrameFunctionalGroupsSequence]
    check(all(r in sources for r in refs), "SEG frames reference source instances")
    ref_series = seg.ReferencedSeriesSequence[0]
    check(ref_series.SeriesInstanceUID == any_src.SeriesInstanceUID, "SEG referenced series")
    check({i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence} == set(analysed),
          "SEG references every analysed slice")
    # Frame positions equal their source slices' positions.
    for f, r in zip(seg.PerFrameFunctionalGroupsSequence, refs):
        p = [float(x) for x in f.PlanePositionSequence[0].ImagePositionPatient]
        q = [float(x) for x in sources[r].ImagePositionPatient]
        check(np.allclose(p, q, atol=1e-3), "frame position equals its source's")
    # Volumes from the SEG's voxels equal the result's (same voxel size the analysis used).
    px = seg.pixel_array  # frames × rows × cols
    seg_of_frame = [f.SegmentIdentificationSequence[0].ReferencedSegmentNumber for f in seg.PerFrameFunctionalGroupsSequence]
    spacing = [float(v) for v in any_src.PixelSpacing]
    voxel_ml = spacing[0] * spacing[1] * result["slice_spacing_mm"] / 1000.0
    counts = {1: 0, 2: 0}
    for k, s in enumerate(seg_of_frame):
        counts[s] += int(px[k].sum())
    check(abs(counts[1] * voxel_ml - result["lung_volume_ml"]) <= 1e-6 * max(1.0, result["lung_volume_ml"]),
          f"SEG lung voxels {counts[1]} × {voxel_ml} != {result['lung_volume_ml']}")
    check(abs(counts[2] * voxel_ml - result["lesion_volume_ml"]) <= 1e-6 * max(1.0, result["lesion_volume_ml"]),
          f"SEG lesion voxels {counts[2]} × {voxel_ml} != {result['lesion_volume_ml']}")
    # highdicom's own per-source-instance access works.
    seg.get_pixels_by_source_instance(source_sop_instance_uids=[refs[0]], segment_numbers=[seg_of_frame[0]])
    print(f"SEG ok: {len(refs)} frames, lung {counts[1]} voxels, lesion {counts[2]} voxels")

    # ---- SR
    sr = hd.sr.srread(os.path.join(out_dir, "sr.dcm"))
    check(sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34", "SR SOP class")
    check(sr.StudyInstanceUID == any_src.StudyInstanceUID, "SR study")
    series_uids.add(sr.SeriesInstanceUID)
    report = hd.sr.MeasurementReport.from_sequence([sr])
    obs = report.get_observer_contexts(observer_type=codes.DCM.Device)
    check(len(obs) == 1, "one device observer")
    groups = report.get_volumetric_roi_measurement_groups()
    by_id = {g.tracking_identifier: g for g in groups}
    check(set(by_id) == {"Lungs", "COVID-19 lesions"} | {f"Lesion {l['id']}" for l in result["lesions"]},
          f"measurement groups {sorted(by_id)}")

    def one(group, name, unit=None):
        ms = group.get_measurements(name=name)
        check(len(ms) == 1, f"{group.tracking_identifier}: one {name.meaning}")
        if unit is not None:
            check(ms[0].unit.value == unit, f"{name.meaning} unit {ms[0].unit.value}")
        return ms[0].value

    def segment_ref(group):
        rs = group.referenced_segment
        check(rs is not None, f"{group.tracking_identifier}: no referenced segment")
        item = rs[0].ReferencedSOPSequence[0]
        return item.ReferencedSOPInstanceUID, item.ReferencedSegmentNumber

    def algorithm_of(group):
        items = {i.name.value: i.value for i in group[0].ContentSequence if i.ValueType == "TEXT"}
        return items.get("111001"), items.get("111003")

    inv = hd.sr.CodedConcept("LS-INVOLVEMENT", "99LSENTRY", "Lung involvement by COVID-19 lesions")
    cnt = hd.sr.CodedConcept("LS-LESION-COUNT", "99LSENTRY", "Number of COVID-19 lesions")
    flag = hd.sr.CodedConcept("LS-FLAG", "99LSENTRY", "COVID-19 pneumonia flag")
    att = hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient")
    g = by_id["Lungs"]
    check(one(g, codes.SCT.Volume, "ml") == result["lung_volume_ml"], "SR lung volume")
    check(algorithm_of(g) == (model["name"], model["version"]), "SR algorithm identification")
    check(segment_ref(g) == (seg.SOPInstanceUID, 1), "Lungs group references SEG segment 1")
    g = by_id["COVID-19 lesions"]
    check(segment_ref(g) == (seg.SOPInstanceUID, 2), "lesions group references SEG segment 2")
    check(one(g, codes.SCT.Volume, "ml") == result["lesion_volume_ml"], "SR lesion volume")
    check(one(g, inv, "%") == result["involvement_percent"], "SR involvement")
    check(one(g, cnt) == len(result["lesions"]), "SR lesion count")
    ev = g.get_qualitative_evaluations(name=flag)
    check(len(ev) == 1, "one flag")
    check(ev[0].value.value == ("10828004" if result["positive"] else "260385009"), "SR flag equals result")
    for l in result["lesions"]:
        g = by_id[f"Lesion {l['id']}"]
        check(one(g, codes.SCT.Volume, "ml") == l["volume_ml"], f"lesion {l['id']} volume")
        check(one(g, att, "[hnsf'U]") == l["mean_hu"], f"lesion {l['id']} mean HU")
        check(g.finding_type == codes.SCT.Lesion, "lesion finding type")
        site = g.finding_sites[0]
        check(site.value == codes.SCT.Lung, "finding site lung")
        lat = site.laterality
        check(lat == (codes.SCT.Left if l["side"] == "left" else codes.SCT.Right), "laterality")
        check(segment_ref(g) == (seg.SOPInstanceUID, 2), f"lesion {l['id']} references SEG segment 2")
    ev_uids = {i.ReferencedSOPInstanceUID
               for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
               for i in s.ReferencedSOPSequence}
    check(set(analysed) | {seg.SOPInstanceUID} == ev_uids, "SR evidence lists the sources and the SEG")
    print(f"SR ok: {len(groups)} measurement groups, numbers equal the result JSON")

    # ---- key images
    keys = [f for f in files if f.startswith("key-")]
    if result["lesions"]:
        check(1 <= len(keys) <= 3, f"{len(keys)} key images")
    else:
        check(not keys, "no key images without lesions")
    key_series = set()
    for k in keys:
        ds = pydicom.dcmread(os.path.join(out_dir, k))
        check(ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7", "SC SOP class")
        check(ds.StudyInstanceUID == any_src.StudyInstanceUID, "key image in the original study")
        check(ds.SeriesInstanceUID != any_src.SeriesInstanceUID, "key image in a new series")
        check(ds.BurnedInAnnotation == "YES", "burned-in annotation")
        check(f"NOT FOR DIAGNOSTIC USE - lungsentry {version}" in ds.ImageComments, "banner in comments")
        check(ds.SourceImageSequence[0].ReferencedSOPInstanceUID in analysed, "key image source slice")
        a = ds.pixel_array
        check(a.shape == (ds.Rows, ds.Columns, 3), "RGB pixels")
        red = (a[:, :, 0] == 255) & (a[:, :, 1] == 32) & (a[:, :, 2] == 32)
        check(red.sum() > 0, "lesion contours burned in")
        yellow = (a[:40, :, 0] == 255) & (a[:40, :, 1] == 220) & (a[:40, :, 2] == 0)
        check(yellow.sum() > 50, "banner text burned in")
        key_series.add(ds.SeriesInstanceUID)
    check(len(key_series) <= 1, "key images share one series")
    series_uids |= key_series
    check(len(series_uids) == 2 + len(key_series), "SEG, SR and key images in distinct new series")
    check(any_src.SeriesInstanceUID not in series_uids, "new series")
    print(f"key images ok: {len(keys)}")


if __name__ == "__main__":
    main()
