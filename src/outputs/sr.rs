//! The TID 1500 measurement report (Comprehensive 3D SR). Every number comes from the series' result (both the DS
//! string and the exact FD value), so the report says what the store says:
//!
//! ```text
//! Imaging Measurement Report (TID 1500)
//!  ├ language, observer context (device: lungsentry), procedure reported (CT chest)
//!  └ Imaging Measurements
//!     ├ Measurement Group "Lungs" (TID 1411): Referenced Segment 1, lung volume
//!     ├ Measurement Group "COVID-19 lesions": Referenced Segment 2, lesion volume, involvement %,
//!     │    lesion count, qualitative evaluation positive/negative
//!     ├ Measurement Group "Lesion N" per lesion: Referenced Segment 2, finding site lung + laterality,
//!     │    volume, mean attenuation (HU); with a prior study: change class (increased size / decreased size /
//!     │    no change / new), volume change %, mean HU change
//!     ├ Measurement Group (TID 1501) per lung and per zone ("Right lung", "Right lung upper zone", ...):
//!     │    finding site lung or upper/middle/lower zone of lung + laterality; lesion volume, involvement %,
//!     │    the region's lung volume
//!     ├ Measurement Group (TID 1501) "Severity score": total 0–25, per lobe proxy (finding site = lobe +
//!     │    laterality) score and involvement, and the score basis (zones as lobe proxies) as text
//!     └ with a prior study — Measurement Group (TID 1501) "Follow-up": prior study UID and date, prior
//!          involvement, change (points and relative), lesion counts per change class, progression present /
//!          absent; and one group per resolved prior lesion ("Resolved lesion N": prior volume)
//! ```
//! Each group names the algorithm (TID 4019: model name and version). Standard codes where they exist (SNOMED CT
//! lung zones, lobes, laterality, size change; DCM Study Instance UID); involvement, counts, the score, its basis
//! and the change figures have none and use our local coding scheme `99LSENTRY` (declared in Coding Scheme
//! Identification).

use dicom_core::VR;
use dicom_dictionary_std::tags;

use super::common::{code, code_item, code_seq, derived_uid, ds, el, obj, part10, seq, Code, Elem, Obj};
use super::seg::{LESION, LESION_SEGMENT, LUNG, LUNG_SEGMENT};
use super::{
    BuildContext, ObjectKind, OutputError, OutputObject, SourceSlice, COMPREHENSIVE_3D_SR_STORAGE,
    SEGMENTATION_STORAGE, SR_SERIES_NUMBER,
};
use crate::analysis::followup::FollowUp;
use crate::analysis::regions::Regional;
use crate::result::{Figures, SeriesResult};

/// Report title.
pub const IMAGING_MEASUREMENT_REPORT: Code = code("126000", "DCM", "Imaging Measurement Report");
const LANGUAGE: Code = code("121049", "DCM", "Language of Content Item and Descendants");
const EN_US: Code = code("en-US", "RFC5646", "English (United States)");
const OBSERVER_TYPE: Code = code("121005", "DCM", "Observer Type");
const DEVICE: Code = code("121007", "DCM", "Device");
const DEVICE_OBSERVER_UID: Code = code("121012", "DCM", "Device Observer UID");
const DEVICE_OBSERVER_NAME: Code = code("121013", "DCM", "Device Observer Name");
const DEVICE_OBSERVER_MANUFACTURER: Code = code("121014", "DCM", "Device Observer Manufacturer");
const DEVICE_OBSERVER_MODEL_NAME: Code = code("121015", "DCM", "Device Observer Model Name");
const PROCEDURE_REPORTED: Code = code("121058", "DCM", "Procedure reported");
const CT_CHEST: Code = code("24627-2", "LN", "CT Chest");
/// Container of the measurement groups.
pub const IMAGING_MEASUREMENTS: Code = code("126010", "DCM", "Imaging Measurements");
/// One measurement group.
pub const MEASUREMENT_GROUP: Code = code("125007", "DCM", "Measurement Group");
const TRACKING_IDENTIFIER: Code = code("112039", "DCM", "Tracking Identifier");
const TRACKING_UID: Code = code("112040", "DCM", "Tracking Unique Identifier");
const FINDING: Code = code("121071", "DCM", "Finding");
const FINDING_SITE: Code = code("363698007", "SCT", "Finding Site");
const LATERALITY: Code = code("272741003", "SCT", "Laterality");
const LEFT: Code = code("7771000", "SCT", "Left");
const RIGHT: Code = code("24028007", "SCT", "Right");
const ALGORITHM_NAME: Code = code("111001", "DCM", "Algorithm Name");
const ALGORITHM_VERSION: Code = code("111003", "DCM", "Algorithm Version");
const REFERENCED_SEGMENT: Code = code("121191", "DCM", "Referenced Segment");
const SOURCE_SERIES_FOR_SEGMENTATION: Code = code("121232", "DCM", "Source Series for Segmentation");
/// Volume.
pub const VOLUME: Code = code("118565006", "SCT", "Volume");
/// Mean attenuation: Attenuation Coefficient with derivation Mean.
pub const ATTENUATION: Code = code("112031", "DCM", "Attenuation Coefficient");
const DERIVATION: Code = code("121401", "DCM", "Derivation");
const MEAN: Code = code("373098007", "SCT", "Mean");
const ML: Code = code("ml", "UCUM", "milliliter");
const HU: Code = code("[hnsf'U]", "UCUM", "Hounsfield unit");
const PERCENT: Code = code("%", "UCUM", "percent");
const LESIONS_UNIT: Code = code("{lesions}", "UCUM", "lesions");
const POSITIVE: Code = code("10828004", "SCT", "Positive");
const NEGATIVE: Code = code("260385009", "SCT", "Negative");
/// Our local coding scheme.
pub const LOCAL_SCHEME: &str = "99LSENTRY";
/// Involvement: lesion volume / lung volume × 100.
pub const INVOLVEMENT: Code = code("LS-INVOLVEMENT", LOCAL_SCHEME, "Lung involvement by COVID-19 lesions");
/// Number of 3D lesions.
pub const LESION_COUNT: Code = code("LS-LESION-COUNT", LOCAL_SCHEME, "Number of COVID-19 lesions");
/// The series flag (qualitative evaluation).
pub const FLAG: Code = code("LS-FLAG", LOCAL_SCHEME, "COVID-19 pneumonia flag");
/// Lung volume of a region (lung or zone), lesion included.
pub const REGION_LUNG_VOLUME: Code = code("LS-REGION-LUNG", LOCAL_SCHEME, "Lung volume of the region");
/// Total CT severity score, 0–25.
pub const SEVERITY_SCORE: Code = code("LS-SEVERITY", LOCAL_SCHEME, "CT severity score (Chung 2020, 0-25)");
/// One lobe's score, 0–5.
pub const LOBE_SCORE: Code = code("LS-LOBE-SCORE", LOCAL_SCHEME, "Lobe severity score (0-5)");
/// What the lobes of the score are.
pub const SCORE_BASIS: Code = code("LS-SCORE-BASIS", LOCAL_SCHEME, "Severity score basis");
/// Involvement of the prior study.
pub const PRIOR_INVOLVEMENT: Code = code("LS-PRIOR-INV", LOCAL_SCHEME, "Lung involvement in the prior study");
/// Involvement change, percentage points.
pub const INVOLVEMENT_CHANGE: Code = code("LS-INV-CHANGE", LOCAL_SCHEME, "Involvement change since prior study");
/// Involvement change relative to the prior, %.
pub const INVOLVEMENT_CHANGE_RELATIVE: Code =
    code("LS-INV-CHANGE-R", LOCAL_SCHEME, "Relative involvement change since prior study");
/// Progression since the prior study (present / absent).
pub const PROGRESSION: Code = code("LS-PROGRESSION", LOCAL_SCHEME, "Progression since prior study");
/// A lesion's change class.
pub const LESION_CHANGE: Code = code("LS-CHANGE", LOCAL_SCHEME, "Lesion change since prior study");
/// A lesion's volume change, % of the prior volume.
pub const VOLUME_CHANGE: Code = code("LS-VOL-CHANGE", LOCAL_SCHEME, "Lesion volume change since prior study");
/// A lesion's mean attenuation change, HU.
pub const HU_CHANGE: Code = code("LS-HU-CHANGE", LOCAL_SCHEME, "Lesion mean attenuation change since prior study");
/// A resolved lesion's volume in the prior study.
pub const PRIOR_VOLUME: Code = code("LS-PRIOR-VOL", LOCAL_SCHEME, "Lesion volume in the prior study");
/// Study Date of the prior study.
pub const PRIOR_STUDY_DATE: Code = code("LS-PRIOR-DATE", LOCAL_SCHEME, "Prior study date");
/// Study Instance UID (of the prior study).
pub const STUDY_INSTANCE_UID: Code = code("110180", "DCM", "Study Instance UID");
/// Change class "new": no standard code.
pub const NEW_LESION: Code = code("LS-NEW", LOCAL_SCHEME, "New lesion");
/// Change class "resolved": no standard code.
pub const RESOLVED_LESION: Code = code("LS-RESOLVED", LOCAL_SCHEME, "Resolved lesion");
/// Change class "grown".
pub const INCREASED_SIZE: Code = code("15454001", "SCT", "Increased size");
/// Change class "shrunk".
pub const DECREASED_SIZE: Code = code("19776001", "SCT", "Decreased size");
/// Change class "stable".
pub const NO_CHANGE: Code = code("260388006", "SCT", "No change");
const PRESENT: Code = code("52101004", "SCT", "Present");
const ABSENT: Code = code("272519000", "SCT", "Absent");
const SCORE_UNIT: Code = code("{score}", "UCUM", "score");
/// Zones of a lung (SNOMED CT, CID 6171).
pub const UPPER_ZONE: Code = code("281392002", "SCT", "Upper zone of lung");
/// Middle zone.
pub const MIDDLE_ZONE: Code = code("281393007", "SCT", "Middle zone of lung");
/// Lower zone.
pub const LOWER_ZONE: Code = code("281394001", "SCT", "Lower zone of lung");
const UPPER_LOBE: Code = code("45653009", "SCT", "Upper lobe of lung");
const MIDDLE_LOBE_RIGHT: Code = code("72481006", "SCT", "Middle lobe of right lung");
const LOWER_LOBE: Code = code("90572001", "SCT", "Lower lobe of lung");

/// Relationship of a content item to its parent.
#[derive(Clone, Copy)]
enum Rel {
    Contains,
    HasObsContext,
    HasConceptMod,
}

impl Rel {
    fn as_str(self) -> &'static str {
        match self {
            Rel::Contains => "CONTAINS",
            Rel::HasObsContext => "HAS OBS CONTEXT",
            Rel::HasConceptMod => "HAS CONCEPT MOD",
        }
    }
}

fn item(rel: Rel, value_type: &str, name: &Code, mut rest: Vec<Elem>, children: Vec<Obj>) -> Obj {
    let mut v = vec![
        el(tags::RELATIONSHIP_TYPE, VR::CS, rel.as_str()),
        el(tags::VALUE_TYPE, VR::CS, value_type),
        code_seq(tags::CONCEPT_NAME_CODE_SEQUENCE, name),
    ];
    v.append(&mut rest);
    if !children.is_empty() {
        v.push(seq(tags::CONTENT_SEQUENCE, children));
    }
    obj(v)
}

fn container(rel: Rel, name: &Code, template: Option<&str>, children: Vec<Obj>) -> Obj {
    let mut rest = vec![el(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE")];
    if let Some(t) = template {
        rest.push(seq(
            tags::CONTENT_TEMPLATE_SEQUENCE,
            vec![obj(vec![el(tags::MAPPING_RESOURCE, VR::CS, "DCMR"), el(tags::TEMPLATE_IDENTIFIER, VR::CS, t)])],
        ));
    }
    item(rel, "CONTAINER", name, rest, children)
}

fn text(rel: Rel, name: &Code, value: &str) -> Obj {
    item(rel, "TEXT", name, vec![el(tags::TEXT_VALUE, VR::UT, value)], vec![])
}

fn coded(rel: Rel, name: &Code, value: &Code, children: Vec<Obj>) -> Obj {
    item(rel, "CODE", name, vec![code_seq(tags::CONCEPT_CODE_SEQUENCE, value)], children)
}

fn uidref(rel: Rel, name: &Code, uid: &str) -> Obj {
    item(rel, "UIDREF", name, vec![el(tags::UID, VR::UI, uid)], vec![])
}

fn date(rel: Rel, name: &Code, da: &str) -> Obj {
    item(rel, "DATE", name, vec![el(tags::DATE, VR::DA, da)], vec![])
}

/// A NUM item with the value both as DS text and as exact FD.
fn num(name: &Code, value: f64, unit: &Code, children: Vec<Obj>) -> Obj {
    let measured = obj(vec![
        code_seq(tags::MEASUREMENT_UNITS_CODE_SEQUENCE, unit),
        el(tags::FLOATING_POINT_VALUE, VR::FD, value),
        el(tags::NUMERIC_VALUE, VR::DS, ds(value)),
    ]);
    item(Rel::Contains, "NUM", name, vec![seq(tags::MEASURED_VALUE_SEQUENCE, vec![measured])], children)
}

fn segment_ref(seg_uid: &str, segment: u16) -> Obj {
    item(
        Rel::Contains,
        "IMAGE",
        &REFERENCED_SEGMENT,
        vec![seq(
            tags::REFERENCED_SOP_SEQUENCE,
            vec![obj(vec![
                el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, SEGMENTATION_STORAGE),
                el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, seg_uid),
                el(tags::REFERENCED_SEGMENT_NUMBER, VR::US, segment),
            ])],
        )],
        vec![],
    )
}

fn algorithm(ctx: &BuildContext) -> Vec<Obj> {
    vec![
        text(Rel::HasConceptMod, &ALGORITHM_NAME, &ctx.producer.algorithm_name),
        text(Rel::HasConceptMod, &ALGORITHM_VERSION, &ctx.producer.algorithm_version),
    ]
}

/// A figure of the result, refused when not finite (its JSON would hold null, not a number).
fn finite(x: f64, key: &str) -> Result<f64, OutputError> {
    if x.is_finite() {
        Ok(x)
    } else {
        Err(OutputError::Result(format!("{key} missing or not a number")))
    }
}

/// Finding site `site` with a laterality modifier.
fn site_with_side(site: &Code, side: &str) -> Obj {
    let lat = if side == "left" { &LEFT } else { &RIGHT };
    coded(Rel::HasConceptMod, &FINDING_SITE, site, vec![coded(Rel::HasConceptMod, &LATERALITY, lat, vec![])])
}

/// One TID 1501 group (measurements and qualitative evaluations without an image region): tracking, finding,
/// site, algorithm, then `content` (measurements, evaluations, text).
fn group_1501(ctx: &BuildContext, tracking: &str, site: Obj, content: Vec<Obj>) -> Obj {
    let mut c = vec![
        text(Rel::HasObsContext, &TRACKING_IDENTIFIER, tracking),
        uidref(Rel::HasObsContext, &TRACKING_UID, &derived_uid(&ctx.seed, &format!("tracking|{tracking}"))),
        coded(Rel::Contains, &FINDING, &LESION, vec![]),
        site,
    ];
    c.extend(algorithm(ctx));
    c.extend(content);
    container(Rel::Contains, &MEASUREMENT_GROUP, Some("1501"), c)
}

/// Per-lung, per-zone and severity-score groups from the result's `regional` (none when it has no such field).
fn regional_groups(ctx: &BuildContext, g: &Regional) -> Result<Vec<Obj>, OutputError> {
    let mut out = Vec::new();
    for r in g.lungs.iter().chain(&g.zones) {
        let side = r.lung.as_str();
        let zone = r.zone.as_str();
        let (site, name) = match zone {
            "upper" => (&UPPER_ZONE, format!("{} lung upper zone", title(side))),
            "middle" => (&MIDDLE_ZONE, format!("{} lung middle zone", title(side))),
            "lower" => (&LOWER_ZONE, format!("{} lung lower zone", title(side))),
            _ => (&LUNG, format!("{} lung", title(side))),
        };
        out.push(group_1501(
            ctx,
            &name,
            site_with_side(site, side),
            vec![
                num(&VOLUME, finite(r.lesion_volume_ml, "lesion_volume_ml")?, &ML, vec![]),
                num(&INVOLVEMENT, finite(r.involvement_percent, "involvement_percent")?, &PERCENT, vec![]),
                num(&REGION_LUNG_VOLUME, finite(r.lung_volume_ml, "lung_volume_ml")?, &ML, vec![]),
            ],
        ));
    }
    let mut content = vec![num(&SEVERITY_SCORE, g.severity_score as f64, &SCORE_UNIT, vec![])];
    for l in &g.lobes {
        let site = match l.lobe.as_str() {
            "RUL" => site_with_side(&UPPER_LOBE, "right"),
            "RML" => coded(Rel::HasConceptMod, &FINDING_SITE, &MIDDLE_LOBE_RIGHT, vec![]),
            "RLL" => site_with_side(&LOWER_LOBE, "right"),
            "LUL" => site_with_side(&UPPER_LOBE, "left"),
            "LLL" => site_with_side(&LOWER_LOBE, "left"),
            other => return Err(OutputError::Result(format!("unknown lobe {other:?}"))),
        };
        content.push(num(&LOBE_SCORE, l.score as f64, &SCORE_UNIT, vec![site.clone()]));
        content.push(num(&INVOLVEMENT, finite(l.involvement_percent, "involvement_percent")?, &PERCENT, vec![site]));
    }
    content.push(text(Rel::Contains, &SCORE_BASIS, &g.score_basis));
    out.push(group_1501(ctx, "Severity score", coded(Rel::HasConceptMod, &FINDING_SITE, &LUNG, vec![]), content));
    Ok(out)
}

fn title(side: &str) -> &'static str {
    if side == "left" {
        "Left"
    } else {
        "Right"
    }
}

/// The comparison with the prior study (`follow_up`): one summary group and one per resolved prior lesion.
fn follow_up_groups(ctx: &BuildContext, f: Option<&FollowUp>) -> Result<Vec<Obj>, OutputError> {
    let Some(f) = f else { return Ok(Vec::new()) };
    let mut content = Vec::new();
    if let Some(uid) = Some(f.prior_study_instance_uid.as_str()).filter(|u| !u.is_empty()) {
        content.push(uidref(Rel::Contains, &STUDY_INSTANCE_UID, uid));
    }
    let d = f.prior_study_date.as_str();
    if d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit()) {
        content.push(date(Rel::Contains, &PRIOR_STUDY_DATE, d));
    }
    let prior = finite(f.prior_involvement_percent, "prior_involvement_percent")?;
    content.push(num(&PRIOR_INVOLVEMENT, prior, &PERCENT, vec![]));
    let change = finite(f.involvement_change_points, "involvement_change_points")?;
    content.push(num(&INVOLVEMENT_CHANGE, change, &PERCENT, vec![]));
    if let Some(r) = f.involvement_change_relative_percent.filter(|r| r.is_finite()) {
        content.push(num(&INVOLVEMENT_CHANGE_RELATIVE, r, &PERCENT, vec![]));
    }
    for (n, name) in [
        (f.new, code("LS-N-NEW", LOCAL_SCHEME, "Number of new lesions")),
        (f.grown, code("LS-N-GROWN", LOCAL_SCHEME, "Number of grown lesions")),
        (f.shrunk, code("LS-N-SHRUNK", LOCAL_SCHEME, "Number of shrunk lesions")),
        (f.stable, code("LS-N-STABLE", LOCAL_SCHEME, "Number of stable lesions")),
        (f.resolved, code("LS-N-RESOLVED", LOCAL_SCHEME, "Number of resolved lesions")),
    ] {
        content.push(num(&name, n as f64, &LESIONS_UNIT, vec![]));
    }
    // Unmatched components below the change table's minimum volume: counted apart, not listed (followup.rs).
    for (n, name) in [
        (f.small_new, code("LS-N-SMALL-NEW", LOCAL_SCHEME, "Number of new components below minimum volume")),
        (f.small_resolved, code("LS-N-SMALL-RES", LOCAL_SCHEME, "Number of resolved components below minimum volume")),
        (f.small_matched, code("LS-N-SMALL-MAT", LOCAL_SCHEME, "Number of matched components below minimum volume")),
    ] {
        if n > 0 {
            content.push(num(&name, n as f64, &LESIONS_UNIT, vec![]));
        }
    }
    let progression = f.progression;
    content.push(coded(Rel::Contains, &PROGRESSION, if progression { &PRESENT } else { &ABSENT }, vec![]));
    let lung = || coded(Rel::HasConceptMod, &FINDING_SITE, &LUNG, vec![]);
    let mut out = vec![group_1501(ctx, "Follow-up", lung(), content)];
    for l in f.lesions.iter().filter(|l| l.change == "resolved") {
        let id = l.prior_id.unwrap_or(0);
        out.push(group_1501(
            ctx,
            &format!("Resolved lesion {id}"),
            lung(),
            vec![
                num(&PRIOR_VOLUME, finite(l.volume_before_ml, "volume_before_ml")?, &ML, vec![]),
                coded(Rel::Contains, &LESION_CHANGE, &RESOLVED_LESION, vec![]),
            ],
        ));
    }
    Ok(out)
}

/// The change items of one current lesion (empty without a prior study or a match for it).
fn lesion_change(follow_up: Option<&FollowUp>, id: u32) -> Vec<Obj> {
    let Some(c) = follow_up.and_then(|f| f.lesions.iter().find(|c| c.id == Some(id))) else {
        return Vec::new();
    };
    let class = match c.change.as_str() {
        "grown" => &INCREASED_SIZE,
        "shrunk" => &DECREASED_SIZE,
        "stable" => &NO_CHANGE,
        _ => &NEW_LESION,
    };
    let mut v = Vec::new();
    if let Some(x) = c.volume_change_percent.filter(|x| x.is_finite()) {
        v.push(num(&VOLUME_CHANGE, x, &PERCENT, vec![]));
    }
    if let Some(x) = c.mean_hu_change.filter(|x| x.is_finite()) {
        v.push(num(&HU_CHANGE, x, &HU, vec![]));
    }
    v.push(coded(Rel::Contains, &LESION_CHANGE, class, vec![]));
    v
}

/// One TID 1411 group: tracking, finding, (site), algorithm, measurements, (segment reference, source series).
#[allow(clippy::too_many_arguments)]
fn group(
    ctx: &BuildContext,
    tracking: &str,
    finding: &Code,
    site: Option<Obj>,
    seg: Option<(&str, u16)>,
    measurements: Vec<Obj>,
    evaluations: Vec<Obj>,
) -> Obj {
    let mut c = vec![
        text(Rel::HasObsContext, &TRACKING_IDENTIFIER, tracking),
        uidref(Rel::HasObsContext, &TRACKING_UID, &derived_uid(&ctx.seed, &format!("tracking|{tracking}"))),
        coded(Rel::Contains, &FINDING, finding, vec![]),
    ];
    c.extend(site);
    c.extend(algorithm(ctx));
    c.extend(measurements);
    c.extend(evaluations);
    if let Some((uid, n)) = seg {
        c.push(segment_ref(uid, n));
    }
    c.push(uidref(Rel::Contains, &SOURCE_SERIES_FOR_SEGMENTATION, &ctx.header.series_instance_uid));
    container(Rel::Contains, &MEASUREMENT_GROUP, Some("1411"), c)
}

/// Builds the SR of `result` (its `figures`). `seg_uid` is the SEG built beside it (segment references are left
/// out without one).
pub fn build(
    ctx: &BuildContext,
    result: &SeriesResult,
    figures: &Figures,
    slices: &[SourceSlice],
    seg_uid: Option<&str>,
) -> Result<OutputObject, OutputError> {
    let h = &ctx.header;
    let p = &ctx.producer;
    let sop_instance_uid = match &ctx.amendment {
        Some(a) => derived_uid(&ctx.seed, &format!("sr|{}", a.tag)),
        None => derived_uid(&ctx.seed, "sr"),
    };
    let instance_number = ctx.amendment.as_ref().map_or(1, |a| a.instance_number);
    let series_uid = derived_uid(&ctx.seed, "sr-series");
    let (date, time) = ctx.content_time.clone();
    let lung_ml = finite(figures.lung_volume_ml, "lung_volume_ml")?;
    let lesion_ml = finite(figures.lesion_volume_ml, "lesion_volume_ml")?;
    let involvement = finite(figures.involvement_percent, "involvement_percent")?;
    let positive = result.positive;
    let lesions = &figures.lesions;
    let algo_children = || algorithm(ctx);

    let mut groups = vec![
        group(
            ctx,
            "Lungs",
            &LUNG,
            None,
            seg_uid.map(|u| (u, LUNG_SEGMENT)),
            vec![num(&VOLUME, lung_ml, &ML, algo_children())],
            vec![],
        ),
        group(
            ctx,
            "COVID-19 lesions",
            &LESION,
            Some(coded(Rel::HasConceptMod, &FINDING_SITE, &LUNG, vec![])),
            seg_uid.map(|u| (u, LESION_SEGMENT)),
            vec![
                num(&VOLUME, lesion_ml, &ML, algo_children()),
                num(&INVOLVEMENT, involvement, &PERCENT, algo_children()),
                num(&LESION_COUNT, lesions.len() as f64, &LESIONS_UNIT, algo_children()),
            ],
            vec![coded(Rel::Contains, &FLAG, if positive { &POSITIVE } else { &NEGATIVE }, vec![])],
        ),
    ];
    for l in lesions {
        let id = l.id;
        let side = if l.side == "left" { &LEFT } else { &RIGHT };
        groups.push(group(
            ctx,
            &format!("Lesion {id}"),
            &LESION,
            Some(coded(
                Rel::HasConceptMod,
                &FINDING_SITE,
                &LUNG,
                vec![coded(Rel::HasConceptMod, &LATERALITY, side, vec![])],
            )),
            seg_uid.map(|u| (u, LESION_SEGMENT)),
            vec![
                num(&VOLUME, finite(l.volume_ml, "volume_ml")?, &ML, algo_children()),
                num(
                    &ATTENUATION,
                    finite(l.mean_hu, "mean_hu")?,
                    &HU,
                    vec![coded(Rel::HasConceptMod, &DERIVATION, &MEAN, vec![])],
                ),
            ],
            lesion_change(result.follow_up.as_ref(), id),
        ));
    }
    groups.extend(regional_groups(ctx, &figures.regional)?);
    groups.extend(follow_up_groups(ctx, result.follow_up.as_ref())?);

    let root_children = vec![
        coded(Rel::HasConceptMod, &LANGUAGE, &EN_US, vec![]),
        coded(Rel::HasObsContext, &OBSERVER_TYPE, &DEVICE, vec![]),
        uidref(Rel::HasObsContext, &DEVICE_OBSERVER_UID, &derived_uid(&p.device_serial, "device-observer")),
        text(Rel::HasObsContext, &DEVICE_OBSERVER_NAME, &format!("lungsentry {}", p.software_version)),
        text(Rel::HasObsContext, &DEVICE_OBSERVER_MANUFACTURER, &p.manufacturer),
        text(Rel::HasObsContext, &DEVICE_OBSERVER_MODEL_NAME, &p.model_name),
        coded(Rel::HasConceptMod, &PROCEDURE_REPORTED, &CT_CHEST, vec![]),
        container(Rel::Contains, &IMAGING_MEASUREMENTS, None, groups),
    ];

    // Evidence: the source instances and the SEG, each under its series.
    let refs = |pairs: Vec<(String, String)>| -> Vec<Obj> {
        pairs
            .into_iter()
            .map(|(c, i)| {
                obj(vec![
                    el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, c.as_str()),
                    el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, i.as_str()),
                ])
            })
            .collect()
    };
    let mut series_items = vec![obj(vec![
        seq(
            tags::REFERENCED_SOP_SEQUENCE,
            refs({
                // One reference per source instance (the frames of a multi-frame instance share it).
                let mut seen = std::collections::HashSet::new();
                slices
                    .iter()
                    .filter(|s| seen.insert(s.meta.sop_instance_uid.as_str()))
                    .map(|s| (s.meta.sop_class_uid.clone(), s.meta.sop_instance_uid.clone()))
                    .collect()
            }),
        ),
        el(tags::SERIES_INSTANCE_UID, VR::UI, h.series_instance_uid.as_str()),
    ])];
    if let Some(u) = seg_uid {
        series_items.push(obj(vec![
            seq(tags::REFERENCED_SOP_SEQUENCE, refs(vec![(SEGMENTATION_STORAGE.to_string(), u.to_string())])),
            el(tags::SERIES_INSTANCE_UID, VR::UI, derived_uid(&ctx.seed, "seg-series").as_str()),
        ]));
    }
    let evidence = obj(vec![
        seq(tags::REFERENCED_SERIES_SEQUENCE, series_items),
        el(tags::STUDY_INSTANCE_UID, VR::UI, h.study_instance_uid.as_str()),
    ]);
    let scheme = obj(vec![
        el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, LOCAL_SCHEME),
        el(tags::CODING_SCHEME_NAME, VR::ST, "lungsentry local codes"),
        el(tags::CODING_SCHEME_RESPONSIBLE_ORGANIZATION, VR::ST, "lungsentry"),
    ]);

    let mut elems = h.patient_study();
    elems.extend(p.equipment());
    elems.extend([
        el(tags::INSTANCE_CREATION_DATE, VR::DA, date.as_str()),
        el(tags::INSTANCE_CREATION_TIME, VR::TM, time.as_str()),
        el(tags::SOP_CLASS_UID, VR::UI, COMPREHENSIVE_3D_SR_STORAGE),
        el(tags::SOP_INSTANCE_UID, VR::UI, sop_instance_uid.as_str()),
        el(tags::SERIES_DATE, VR::DA, date.as_str()),
        el(tags::CONTENT_DATE, VR::DA, date.as_str()),
        el(tags::SERIES_TIME, VR::TM, time.as_str()),
        el(tags::CONTENT_TIME, VR::TM, time.as_str()),
        el(tags::MODALITY, VR::CS, "SR"),
        seq(tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE, vec![scheme]),
        el(tags::SERIES_DESCRIPTION, VR::LO, "lungsentry measurement report"),
        seq(tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE, vec![]),
        el(tags::SERIES_INSTANCE_UID, VR::UI, series_uid.as_str()),
        el(tags::SERIES_NUMBER, VR::IS, SR_SERIES_NUMBER.to_string()),
        el(tags::INSTANCE_NUMBER, VR::IS, instance_number.to_string()),
        el(tags::VALUE_TYPE, VR::CS, "CONTAINER"),
        code_seq(tags::CONCEPT_NAME_CODE_SEQUENCE, &IMAGING_MEASUREMENT_REPORT),
        el(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"),
        seq(tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, vec![code_item(&CT_CHEST)]),
        seq(tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE, vec![evidence]),
        el(tags::COMPLETION_FLAG, VR::CS, "COMPLETE"),
        el(tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED"),
        seq(
            tags::CONTENT_TEMPLATE_SEQUENCE,
            vec![obj(vec![el(tags::MAPPING_RESOURCE, VR::CS, "DCMR"), el(tags::TEMPLATE_IDENTIFIER, VR::CS, "1500")])],
        ),
        seq(tags::CONTENT_SEQUENCE, root_children),
    ]);
    // An amendment names the document it replaces (SR Document General module, type 1C).
    if let Some(prior_sr) = ctx.amendment.as_ref().and_then(|a| a.predecessor.as_deref()) {
        elems.push(seq(
            tags::PREDECESSOR_DOCUMENTS_SEQUENCE,
            vec![obj(vec![
                seq(
                    tags::REFERENCED_SERIES_SEQUENCE,
                    vec![obj(vec![
                        seq(
                            tags::REFERENCED_SOP_SEQUENCE,
                            refs(vec![(COMPREHENSIVE_3D_SR_STORAGE.to_string(), prior_sr.to_string())]),
                        ),
                        el(tags::SERIES_INSTANCE_UID, VR::UI, series_uid.as_str()),
                    ])],
                ),
                el(tags::STUDY_INSTANCE_UID, VR::UI, h.study_instance_uid.as_str()),
            ])],
        ));
    }
    Ok(OutputObject {
        kind: ObjectKind::Sr,
        sop_class_uid: COMPREHENSIVE_3D_SR_STORAGE.to_string(),
        sop_instance_uid,
        file: part10(obj(elems))?,
    })
}
