#!/usr/bin/env python3
"""Reads lungsentry's DICOM outputs back with pydicom + highdicom and checks them against the result JSON.

usage: check_dicom_outputs.py RESULT_JSON SOURCE_DIR OUTPUT_DIR VERSION

Checks structure, references and codes (not lesion accuracy): the SEG's segments, codes, algorithm identification,
frame of reference and per-frame source references; that the SEG's voxel counts give the result's volumes; the SR's
TID 1500 tree as highdicom parses it, with every number equal to the result JSON — totals, lesions, regional
involvement per lung and zone, the severity score with its lobes and basis, and (when the result has a prior study)
the follow-up figures and each lesion's change class; the key images' study, series, banner and burned-in contours.
Prints one line per object and exits non-zero on the first failed check.
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


L = "99LSENTRY"


def local(value, meaning):
    return hd.sr.CodedConcept(value, L, meaning)


def text_items(group, code_value):
    return [i.value for i in group[0].ContentSequence if i.ValueType == "TEXT" and i.name.value == code_value]


def site_of(sites):
    check(len(sites) == 1, f"one finding site, got {len(sites)}")
    s = sites[0]
    lat = s.laterality
    return (s.value.value, s.value.scheme_designator, lat.value if lat is not None else None)


def check_regional_and_follow_up(report, result, one):
    """TID 1501 groups: per lung and zone, severity score, follow-up; change items in the TID 1411 lesion groups."""
    groups = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}
    inv = local("LS-INVOLVEMENT", "Lung involvement by COVID-19 lesions")
    region_lung = local("LS-REGION-LUNG", "Lung volume of the region")
    side_code = {"right": "24028007", "left": "7771000"}
    zone_code = {"whole": "39607008", "upper": "281392002", "middle": "281393007", "lower": "281394001"}
    reg = result["regional"]
    regions = reg["lungs"] + reg["zones"]
    check(len(regions) == 8, f"{len(regions)} regions in the result")
    for r in regions:
        name = r["lung"].capitalize() + " lung" + ("" if r["zone"] == "whole" else f" {r['zone']} zone")
        check(name in groups, f"SR group {name!r} missing: {sorted(groups)}")
        g = groups[name]
        check(g.finding_type == codes.SCT.Lesion, f"{name}: finding lesion")
        check(site_of(g.finding_sites) == (zone_code[r["zone"]], "SCT", side_code[r["lung"]]), f"{name}: finding site")
        check(one(g, codes.SCT.Volume, "ml") == r["lesion_volume_ml"], f"{name}: lesion volume")
        check(one(g, inv, "%") == r["involvement_percent"], f"{name}: involvement")
        check(one(g, region_lung, "ml") == r["lung_volume_ml"], f"{name}: lung volume")
    g = groups["Severity score"]
    check(one(g, local("LS-SEVERITY", "CT severity score (Chung 2020, 0-25)"), "{score}") == reg["severity_score"],
          "severity score")
    lobe_sites = {"RUL": ("45653009", "SCT", "24028007"), "RML": ("72481006", "SCT", None),
                  "RLL": ("90572001", "SCT", "24028007"), "LUL": ("45653009", "SCT", "7771000"),
                  "LLL": ("90572001", "SCT", "7771000")}
    scores = g.get_measurements(name=local("LS-LOBE-SCORE", "Lobe severity score (0-5)"))
    invs = g.get_measurements(name=inv)
    check(len(scores) == 5 and len(invs) == 5, "five lobe scores and involvements")
    for lobe, s, i in zip(reg["lobes"], scores, invs):
        check(site_of(s.finding_sites) == lobe_sites[lobe["lobe"]], f"{lobe['lobe']} score site")
        check(site_of(i.finding_sites) == lobe_sites[lobe["lobe"]], f"{lobe['lobe']} involvement site")
        check(s.value == lobe["score"], f"{lobe['lobe']} score")
        check(i.value == lobe["involvement_percent"], f"{lobe['lobe']} involvement")
    check(text_items(g, "LS-SCORE-BASIS") == [reg["score_basis"]], "score basis text")
    print(f"SR regional ok: 8 regions, severity score {reg['severity_score']}/25")

    f = result.get("follow_up")
    if f is None:
        check("Follow-up" not in groups, "no follow-up group without a prior study")
        return
    g = groups["Follow-up"]
    uids = [i.value for i in g[0].ContentSequence if i.ValueType == "UIDREF" and i.name.value == "110180"]
    check(uids == [f["prior_study_instance_uid"]], "prior study UID")
    check(one(g, local("LS-PRIOR-INV", "Lung involvement in the prior study"), "%") == f["prior_involvement_percent"],
          "prior involvement")
    check(one(g, local("LS-INV-CHANGE", "Involvement change since prior study"), "%") == f["involvement_change_points"],
          "involvement change")
    rel = g.get_measurements(name=local("LS-INV-CHANGE-R", "Relative involvement change since prior study"))
    if f["involvement_change_relative_percent"] is None:
        check(not rel, "no relative change without prior involvement")
    else:
        check(len(rel) == 1 and rel[0].value == f["involvement_change_relative_percent"], "relative change")
    for k in ["new", "grown", "shrunk", "stable", "resolved"]:
        check(one(g, local(f"LS-N-{k.upper()}", f"Number of {k} lesions")) == f[k], f"number of {k} lesions")
    ev = g.get_qualitative_evaluations(name=local("LS-PROGRESSION", "Progression since prior study"))
    check(len(ev) == 1 and ev[0].value.value == ("52101004" if f["progression"] else "272519000"), "progression flag")
    change = local("LS-CHANGE", "Lesion change since prior study")
    klass = {"grown": "15454001", "shrunk": "19776001", "stable": "260388006", "new": "LS-NEW"}
    vol_change = local("LS-VOL-CHANGE", "Lesion volume change since prior study")
    volumetric = {x.tracking_identifier: x for x in report.get_volumetric_roi_measurement_groups()}
    for c in f["lesions"]:
        if c["change"] == "resolved":
            r = groups[f"Resolved lesion {c['prior_id']}"]
            ev = r.get_qualitative_evaluations(name=change)
            check(len(ev) == 1 and ev[0].value.value == "LS-RESOLVED", f"resolved lesion {c['prior_id']}")
            check(one(r, local("LS-PRIOR-VOL", "Lesion volume in the prior study"), "ml") == c["volume_before_ml"],
                  "resolved lesion prior volume")
            continue
        lg = volumetric[f"Lesion {c['id']}"]
        ev = lg.get_qualitative_evaluations(name=change)
        check(len(ev) == 1 and ev[0].value.value == klass[c["change"]], f"lesion {c['id']} change {c['change']}")
        vc = lg.get_measurements(name=vol_change)
        if c["volume_change_percent"] is None:
            check(not vc, f"lesion {c['id']}: no volume change for a new lesion")
        else:
            check(len(vc) == 1 and vc[0].value == c["volume_change_percent"], f"lesion {c['id']} volume change")
    print(f"SR follow-up ok: {len(f['lesions'])} lesion changes, progression {f['progression']}")


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
    check_regional_and_follow_up(report, result, one)
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
