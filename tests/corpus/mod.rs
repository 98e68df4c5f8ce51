//! The malformed-input corpus: every case is generated here from a small phantom slice (and its DCMTK
//! `dcmcrle` / `dcmcjpeg` re-encodings), never hand-edited bytes, and carries the outcome the daemon must
//! produce. `tests/malformed_corpus.rs` sends each one to a real `lungsentry serve` over raw TCP and checks it.
//!
//! Three layers (see `tests/corpus/README.md` for the table):
//! - `dataset/…`: a C-STORE whose dataset bytes are broken (truncated, lying lengths, wrong VRs, images claiming
//!   gigabytes, PixelData length mismatches, encapsulated fragments cut short, non-DICOM bytes), sent on an
//!   accepted presentation context → the C-STORE-RSP status;
//! - `dimse/…`: well-framed P-DATA carrying broken DIMSE messages → a status or an A-ABORT;
//! - `pdu/…`: broken upper-layer PDUs and misbehaving peers (bad lengths, oversize P-DATA, unknown PDU types,
//!   A-ABORT or close mid-dataset, idle peers) → A-ASSOCIATE-RJ, A-ABORT, rejected contexts or a closed socket.
#![allow(dead_code)]

use std::path::Path;

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::{AssociationRQ, PDataValue, PDataValueType, PresentationContextProposed, UserVariableItem};
use dicom_ul::Pdu;
use lungsentry::receive::dimse::CommandSet;

pub const EXPLICIT: &str = "1.2.840.10008.1.2.1";
pub const IMPLICIT: &str = "1.2.840.10008.1.2";
pub const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
pub const RLE: &str = "1.2.840.10008.1.2.5";
pub const JPEG_SV1: &str = "1.2.840.10008.1.2.4.70";
pub const CT: &str = uids::CT_IMAGE_STORAGE;
pub const VERIFICATION: &str = uids::VERIFICATION;

/// Status codes (PS3.4 Annex B / PS3.7 Annex C).
pub const SUCCESS: u16 = 0x0000;
pub const CANNOT_UNDERSTAND: u16 = 0xC000;
pub const MISMATCH: u16 = 0xA900;
pub const OUT_OF_RESOURCES: u16 = 0xA700;
pub const NO_SUCH_SOP_CLASS: u16 = 0x0118;
pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;

/// What the daemon must answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// A DIMSE response with this status (to the last request sent).
    Status(u16),
    /// An A-ABORT PDU.
    Abort,
    /// An A-ASSOCIATE-RJ PDU.
    Rejected,
    /// An A-ASSOCIATE-AC in which no presentation context was accepted.
    ContextsRejected,
    /// An A-RELEASE-RP (release in the middle of a message: the partial message is dropped).
    ReleaseRp,
    /// The daemon drops the connection (an A-ABORT first is allowed), answering nothing else.
    Closed,
    /// Nothing to answer: the peer itself aborted or closed; only "still serving" and "nothing stored" count.
    PeerGone,
}

/// One thing the client does on the wire.
#[derive(Debug, Clone)]
pub enum Step {
    /// Write these bytes.
    Send(Vec<u8>),
    /// Sleep this many milliseconds.
    Sleep(u64),
    /// Close the socket.
    Close,
}

/// How the connection starts.
#[derive(Debug, Clone)]
pub enum Setup {
    /// Raw bytes from the first one: the steps include any A-ASSOCIATE-RQ.
    Raw,
    /// A valid A-ASSOCIATE-RQ proposing these (abstract syntax, transfer syntaxes) on ids 1, 3, 5…; the
    /// A-ASSOCIATE-AC is read before the steps run.
    Associate(Vec<(String, Vec<String>)>),
}

/// One corpus case.
#[derive(Debug, Clone)]
pub struct Case {
    /// `layer/name`, unique.
    pub name: String,
    /// How the connection starts.
    pub setup: Setup,
    /// What the client sends.
    pub steps: Vec<Step>,
    /// What the daemon must do.
    pub expect: Expect,
    /// For C-STORE cases: the SOP Instance UID that must be in the store afterwards (success) or must not.
    pub sop_instance: Option<String>,
    /// Minimum time the answer may take (idle-timeout cases), ms.
    pub min_ms: u64,
}

// ---------------------------------------------------------------------------------------------------------
// PDU builders

pub fn pdu_bytes(pdu: &Pdu) -> Vec<u8> {
    let mut out = Vec::new();
    dicom_ul::write_pdu(&mut out, pdu).expect("encode PDU");
    out
}

pub fn assoc_rq(called: &str, contexts: &[(String, Vec<String>)]) -> AssociationRQ {
    AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "CORPUS".into(),
        called_ae_title: called.into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: contexts
            .iter()
            .enumerate()
            .map(|(i, (a, ts))| PresentationContextProposed {
                id: (2 * i + 1) as u8,
                abstract_syntax: a.clone(),
                transfer_syntaxes: ts.clone(),
            })
            .collect(),
        user_variables: vec![
            UserVariableItem::MaxLength(16_384),
            UserVariableItem::ImplementationClassUID("1.2.3.4.5.6.7".into()),
        ],
    }
}

pub fn assoc_rq_bytes(called: &str, contexts: &[(String, Vec<String>)]) -> Vec<u8> {
    pdu_bytes(&Pdu::AssociationRQ(assoc_rq(called, contexts)))
}

fn pdv(pc: u8, ty: PDataValueType, last: bool, data: Vec<u8>) -> PDataValue {
    PDataValue { presentation_context_id: pc, value_type: ty, is_last: last, data }
}

pub fn pdata(values: Vec<PDataValue>) -> Vec<u8> {
    pdu_bytes(&Pdu::PData { data: values })
}

pub fn command_bytes(cs: &CommandSet) -> Vec<u8> {
    cs.encode().expect("encode command")
}

/// A complete C-STORE message on context `pc`: command PDU, then the dataset in fragments of ≤ 16 KiB.
pub fn c_store(pc: u8, message_id: u16, sop_class: &str, sop_instance: &str, dataset: &[u8]) -> Vec<Step> {
    let mut steps = vec![Step::Send(pdata(vec![pdv(
        pc,
        PDataValueType::Command,
        true,
        command_bytes(&CommandSet::store_rq(message_id, sop_class, sop_instance)),
    )]))];
    steps.extend(data_fragments(pc, dataset, true));
    steps
}

/// The dataset as P-DATA PDUs of ≤ 16 KiB each; `last` marks the final fragment as the last.
pub fn data_fragments(pc: u8, dataset: &[u8], last: bool) -> Vec<Step> {
    let mut steps = Vec::new();
    if dataset.is_empty() {
        steps.push(Step::Send(pdata(vec![pdv(pc, PDataValueType::Data, last, Vec::new())])));
        return steps;
    }
    let chunks: Vec<&[u8]> = dataset.chunks(16_000).collect();
    for (i, c) in chunks.iter().enumerate() {
        let is_last = last && i + 1 == chunks.len();
        steps.push(Step::Send(pdata(vec![pdv(pc, PDataValueType::Data, is_last, c.to_vec())])));
    }
    steps
}

fn echo_step(pc: u8, id: u16) -> Step {
    Step::Send(pdata(vec![pdv(pc, PDataValueType::Command, true, command_bytes(&CommandSet::echo_rq(id)))]))
}

/// A raw PDU header (type, reserved, big-endian length) followed by `body`.
fn raw_pdu(ty: u8, declared_len: u32, body: &[u8]) -> Vec<u8> {
    let mut v = vec![ty, 0];
    v.extend_from_slice(&declared_len.to_be_bytes());
    v.extend_from_slice(body);
    v
}

// ---------------------------------------------------------------------------------------------------------
// Dataset builders

/// The phantom slice every dataset case starts from, plus its DCMTK re-encodings.
pub struct Bases {
    /// The phantom slice as an object (Explicit VR LE file).
    pub object: InMemDicomObject,
    /// SOP Instance UID root: each case's instance is `<root>.<n>`.
    pub uid_root: String,
    /// RLE Lossless dataset bytes (dcmcrle) of the same slice, with its SOP Instance UID.
    pub rle: (String, Vec<u8>),
    /// JPEG Lossless SV1 dataset bytes (dcmcjpeg) of the same slice, with its SOP Instance UID.
    pub jpeg: (String, Vec<u8>),
    /// Deflated Explicit VR LE dataset bytes (dcmconv +td), with its SOP Instance UID.
    pub deflated: (String, Vec<u8>),
}

/// Dataset bytes of a Part-10 file (after the file meta group) and its transfer syntax.
pub fn dataset_of_file(path: &Path) -> (String, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[128..132], b"DICM", "{} is not Part-10", path.display());
    let gl = u32::from_le_bytes(bytes[140..144].try_into().unwrap()) as usize;
    let start = 144 + gl;
    let obj = dicom_object::open_file(path).unwrap();
    (obj.meta().transfer_syntax().trim_end_matches('\0').to_string(), bytes[start..].to_vec())
}

fn with_uid(obj: &InMemDicomObject, sop: &str) -> InMemDicomObject {
    let mut o = obj.clone();
    o.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(sop)));
    o
}

pub fn encode(obj: &InMemDicomObject, ts_uid: &str) -> Vec<u8> {
    let ts = TransferSyntaxRegistry.get(ts_uid).unwrap();
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts).unwrap();
    out
}

/// Writes a copy of `src` with SOP Instance UID `sop` re-encoded by a DCMTK tool, returns its dataset bytes.
fn dcmtk_reencode(src: &Path, sop: &str, tool: &str, args: &[&str], work: &Path) -> (String, Vec<u8>) {
    let mut obj = dicom_object::open_file(src).unwrap();
    obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(sop)));
    obj.update_meta(|m| m.media_storage_sop_instance_uid = sop.to_string());
    let input = work.join(format!("{tool}-in.dcm"));
    let output = work.join(format!("{tool}-out.dcm"));
    obj.write_to_file(&input).unwrap();
    let st = std::process::Command::new(tool).args(args).arg(&input).arg(&output).status().expect(tool);
    assert!(st.success(), "{tool} failed");
    let (ts, data) = dataset_of_file(&output);
    (ts, data)
}

impl Bases {
    /// From phantom slice `slice` (a Part-10 Explicit VR LE file); DCMTK files are written under `work`.
    pub fn new(slice: &Path, work: &Path) -> Bases {
        let file = dicom_object::open_file(slice).unwrap();
        let uid_root = file.meta().media_storage_sop_instance_uid().trim_end_matches('\0').to_string();
        let object = file.into_inner();
        let rle_uid = format!("{uid_root}.9100");
        let jpeg_uid = format!("{uid_root}.9200");
        let defl_uid = format!("{uid_root}.9300");
        let rle = dcmtk_reencode(slice, &rle_uid, "dcmcrle", &[], work);
        assert_eq!(rle.0, RLE);
        let jpeg = dcmtk_reencode(slice, &jpeg_uid, "dcmcjpeg", &["+e1"], work);
        assert_eq!(jpeg.0, JPEG_SV1);
        let deflated = dcmtk_reencode(slice, &defl_uid, "dcmconv", &["+td"], work);
        assert_eq!(deflated.0, DEFLATED);
        Bases { object, uid_root, rle: (rle_uid, rle.1), jpeg: (jpeg_uid, jpeg.1), deflated: (defl_uid, deflated.1) }
    }

    fn sop(&self, n: u32) -> String {
        format!("{}.{n}", self.uid_root)
    }
}

/// Where one top-level element sits in an Explicit VR LE dataset.
#[derive(Debug, Clone, Copy)]
pub struct Located {
    /// Offset of the tag.
    pub header: usize,
    /// Offset of the value.
    pub value: usize,
    /// Declared value length.
    pub len: u32,
    /// Whether the length field is 4 bytes (OB/OW/SQ/UT/UN…) at header+8, else 2 bytes at header+6.
    pub long: bool,
}

/// Finds top-level `tag` in a flat Explicit VR LE dataset with defined lengths.
pub fn locate(data: &[u8], tag: Tag) -> Located {
    let mut p = 0;
    while p + 8 <= data.len() {
        let g = u16::from_le_bytes([data[p], data[p + 1]]);
        let e = u16::from_le_bytes([data[p + 2], data[p + 3]]);
        let vr = &data[p + 4..p + 6];
        let long = matches!(vr, b"OB" | b"OW" | b"OF" | b"OD" | b"OL" | b"SQ" | b"UT" | b"UN" | b"UC" | b"UR");
        let (len, value) = if long {
            (u32::from_le_bytes(data[p + 8..p + 12].try_into().unwrap()), p + 12)
        } else {
            (u16::from_le_bytes([data[p + 6], data[p + 7]]) as u32, p + 8)
        };
        if Tag(g, e) == tag {
            return Located { header: p, value, len, long };
        }
        p = value + len as usize;
    }
    panic!("tag {tag} not found");
}

/// Sets the declared length of the element at `at` without changing the bytes that follow.
fn set_len(data: &mut [u8], at: Located, len: u32) {
    if at.long {
        data[at.header + 8..at.header + 12].copy_from_slice(&len.to_le_bytes());
    } else {
        data[at.header + 6..at.header + 8].copy_from_slice(&(len as u16).to_le_bytes());
    }
}

/// Offset of `tag` in an Implicit VR LE flat dataset.
fn locate_implicit(data: &[u8], tag: Tag) -> usize {
    let mut p = 0;
    while p + 8 <= data.len() {
        let g = u16::from_le_bytes([data[p], data[p + 1]]);
        let e = u16::from_le_bytes([data[p + 2], data[p + 3]]);
        if Tag(g, e) == tag {
            return p;
        }
        p += 8 + u32::from_le_bytes(data[p + 4..p + 8].try_into().unwrap()) as usize;
    }
    panic!("tag {tag} not found");
}

/// Re-encodes the element `tag` with a different VR (raw bytes of `value`) in an Explicit VR LE dataset.
fn replace_with_vr(data: &[u8], tag: Tag, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let at = locate(data, tag);
    let mut out = data[..at.header].to_vec();
    out.extend_from_slice(&tag.0.to_le_bytes());
    out.extend_from_slice(&tag.1.to_le_bytes());
    out.extend_from_slice(vr);
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
    out.extend_from_slice(&data[at.value + at.len as usize..]);
    out
}

/// Inserts raw element bytes before the first element whose tag is greater than `tag` (ascending order kept).
fn insert_raw(data: &[u8], tag: Tag, raw: &[u8]) -> Vec<u8> {
    let mut p = 0;
    while p + 8 <= data.len() {
        let g = u16::from_le_bytes([data[p], data[p + 1]]);
        let e = u16::from_le_bytes([data[p + 2], data[p + 3]]);
        if Tag(g, e) > tag {
            break;
        }
        let vr = &data[p + 4..p + 6];
        let long = matches!(vr, b"OB" | b"OW" | b"OF" | b"OD" | b"OL" | b"SQ" | b"UT" | b"UN" | b"UC" | b"UR");
        p = if long {
            p + 12 + u32::from_le_bytes(data[p + 8..p + 12].try_into().unwrap()) as usize
        } else {
            p + 8 + u16::from_le_bytes([data[p + 6], data[p + 7]]) as usize
        };
    }
    let mut out = data[..p].to_vec();
    out.extend_from_slice(raw);
    out.extend_from_slice(&data[p..]);
    out
}

/// Explicit VR LE element header for a long-form VR.
fn long_header(tag: Tag, vr: &[u8; 2], len: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&tag.0.to_le_bytes());
    v.extend_from_slice(&tag.1.to_le_bytes());
    v.extend_from_slice(vr);
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&len.to_le_bytes());
    v
}

fn item(len: u32) -> Vec<u8> {
    let mut v = vec![0xFE, 0xFF, 0x00, 0xE0];
    v.extend_from_slice(&len.to_le_bytes());
    v
}

const ITEM_DELIM: [u8; 8] = [0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0];
const SEQ_DELIM: [u8; 8] = [0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0];

/// A small deterministic generator for "random bytes" cases.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Encapsulated Pixel Data: offset of the first fragment item after the Basic Offset Table, in an Explicit
/// VR LE dataset whose Pixel Data has undefined length.
fn first_fragment(data: &[u8]) -> usize {
    let pd = locate_pixel_undefined(data);
    let bot_len = u32::from_le_bytes(data[pd + 16..pd + 20].try_into().unwrap()) as usize;
    pd + 12 + 8 + bot_len
}

/// Offset of the (7FE0,0010) header of undefined length.
fn locate_pixel_undefined(data: &[u8]) -> usize {
    let needle = [0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF];
    data.windows(12).rposition(|w| w == needle).expect("encapsulated PixelData")
}

// ---------------------------------------------------------------------------------------------------------
// The cases

/// A C-STORE case on a context of `ts` (CT Image Storage).
fn store_case(name: &str, ts: &str, sop: &str, dataset: Vec<u8>, expect: u16) -> Case {
    Case {
        name: format!("dataset/{name}"),
        setup: Setup::Associate(vec![(CT.into(), vec![ts.into()])]),
        steps: c_store(1, 1, CT, sop, &dataset),
        expect: Expect::Status(expect),
        sop_instance: Some(sop.to_string()),
        min_ms: 0,
    }
}

/// Study/Series/SOP Instance UIDs that break the UI VR, each on its own: the values a hostile peer would use to
/// steer a path (`..`, `.`, `../x`, `a/b`), an empty component, 65 characters, non-digits. Each is refused with
/// C000 and nothing is stored. Blank Study, Series or SOP Instance UIDs in the dataset (Type 1 attributes) are
/// refused with C000 too, nothing stored and no UID derived for them (`instance::InstanceMeta::from_received`):
/// `uid-study-empty`, `uid-series-empty`, and `uid-sop-empty-dataset-only` (the command carries a good SOP
/// Instance UID); an empty SOP Instance UID in both the command and the dataset is `uid-sop-empty`.
pub fn uid_bad_values() -> Vec<(&'static str, String)> {
    crate::common::bad_uids()
}

fn uid_cases(b: &Bases) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut n = 5000u32;
    for (attr, tag) in
        [("study", tags::STUDY_INSTANCE_UID), ("series", tags::SERIES_INSTANCE_UID), ("sop", tags::SOP_INSTANCE_UID)]
    {
        for (label, value) in uid_bad_values() {
            n += 1;
            let sop = if attr == "sop" { value.clone() } else { b.sop(n) };
            let mut o = with_uid(&b.object, &sop);
            o.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(value.as_str())));
            let d = encode(&o, EXPLICIT);
            cases.push(store_case(&format!("uid-{attr}-{label}"), EXPLICIT, &sop, d, CANNOT_UNDERSTAND));
        }
    }
    for (attr, tag) in [("study", tags::STUDY_INSTANCE_UID), ("series", tags::SERIES_INSTANCE_UID)] {
        n += 1;
        let sop = b.sop(n);
        let mut o = with_uid(&b.object, &sop);
        o.put(DataElement::new(tag, VR::UI, PrimitiveValue::from("")));
        let d = encode(&o, EXPLICIT);
        cases.push(store_case(&format!("uid-{attr}-empty"), EXPLICIT, &sop, d, CANNOT_UNDERSTAND));
    }
    n += 1;
    let d = encode(&with_uid(&b.object, ""), EXPLICIT);
    cases.push(store_case("uid-sop-empty-dataset-only", EXPLICIT, &b.sop(n), d.clone(), CANNOT_UNDERSTAND));
    cases.push(store_case("uid-sop-empty", EXPLICIT, "", d, CANNOT_UNDERSTAND));
    cases
}

/// Every case; `bases` from [`Bases::new`], `idle_ms` = the daemon's association_idle_timeout_s in ms,
/// `max_pdu` = the daemon's maximum PDU length, `max_message` = dicom.max_message_mb in bytes.
pub fn all(b: &Bases, idle_ms: u64, max_pdu: u32, max_message: usize) -> Vec<Case> {
    let mut cases = dataset_cases(b);
    cases.extend(uid_cases(b));
    cases.extend(encapsulated_cases(b));
    cases.extend(dimse_cases(b, max_message));
    cases.extend(pdu_cases(b, idle_ms, max_pdu));
    cases
}

fn dataset_cases(b: &Bases) -> Vec<Case> {
    let mut n = 0u32;
    let mut next = || {
        n += 1;
        b.sop(n)
    };
    let mut cases = Vec::new();
    let explicit = |sop: &str| encode(&with_uid(&b.object, sop), EXPLICIT);
    let modified = |sop: &str, f: &dyn Fn(&mut InMemDicomObject)| {
        let mut o = with_uid(&b.object, sop);
        f(&mut o);
        encode(&o, EXPLICIT)
    };

    // Controls: the unmodified slice in both uncompressed syntaxes is stored.
    let s = next();
    cases.push(store_case("valid-explicit", EXPLICIT, &s, explicit(&s), SUCCESS));
    let s = next();
    cases.push(store_case("valid-implicit", IMPLICIT, &s, encode(&with_uid(&b.object, &s), IMPLICIT), SUCCESS));

    // Truncations.
    let s = next();
    cases.push(store_case("empty", EXPLICIT, &s, Vec::new(), CANNOT_UNDERSTAND));
    for (label, cut) in [("4-bytes", 4usize), ("mid-first-header", 6), ("mid-first-value", 12)] {
        let s = next();
        let d = explicit(&s);
        cases.push(store_case(&format!("truncated-{label}"), EXPLICIT, &s, d[..cut].to_vec(), CANNOT_UNDERSTAND));
    }
    let s = next();
    let d = explicit(&s);
    let px = locate(&d, tags::PIXEL_DATA);
    cases.push(store_case(
        "truncated-in-pixeldata-header",
        EXPLICIT,
        &s,
        d[..px.header + 7].to_vec(),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    let d = explicit(&s);
    cases.push(store_case("truncated-half-pixeldata", EXPLICIT, &s, d[..px.value + 4000].to_vec(), CANNOT_UNDERSTAND));
    let s = next();
    let d = explicit(&s);
    cases.push(store_case("truncated-last-byte", EXPLICIT, &s, d[..d.len() - 1].to_vec(), CANNOT_UNDERSTAND));
    let s = next();
    let d = encode(&with_uid(&b.object, &s), IMPLICIT);
    cases.push(store_case(
        "truncated-implicit-pixeldata",
        IMPLICIT,
        &s,
        d[..d.len() - 100].to_vec(),
        CANNOT_UNDERSTAND,
    ));

    // Lying lengths.
    let s = next();
    let mut d = explicit(&s);
    let at = locate(&d, tags::STUDY_DESCRIPTION);
    set_len(&mut d, at, 0xFFFE);
    cases.push(store_case("length-string-overrun", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let mut d = explicit(&s);
    let at = locate(&d, tags::PIXEL_DATA);
    set_len(&mut d, at, 0xFFFF_FFF0);
    cases.push(store_case("length-pixeldata-4gib", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let mut d = encode(&with_uid(&b.object, &s), IMPLICIT);
    let at = locate_implicit(&d, tags::PIXEL_DATA);
    d[at + 4..at + 8].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    cases.push(store_case("length-implicit-pixeldata-4gib", IMPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let mut d = encode(&with_uid(&b.object, &s), IMPLICIT);
    let at = locate_implicit(&d, tags::STUDY_DESCRIPTION);
    d[at + 4..at + 8].copy_from_slice(&0x7FFF_0000u32.to_le_bytes());
    cases.push(store_case("length-implicit-string-2gib", IMPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let d = insert_raw(&explicit(&s), tags::STUDY_DESCRIPTION, &{
        let mut v = long_header(Tag(0x0008, 0x1030), b"UT", 0xFFFF_FFFF);
        v.extend_from_slice(b"text");
        v
    });
    // (0008,1030) now appears twice; the inserted one has an undefined length, which UT may not have.
    cases.push(store_case("length-undefined-on-text", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let mut d = explicit(&s);
    let at = locate(&d, tags::ROWS);
    set_len(&mut d, at, 3);
    cases.push(store_case("length-odd-rows", EXPLICIT, &s, d, CANNOT_UNDERSTAND));

    // Wrong VRs.
    let s = next();
    let mut d = explicit(&s);
    let at = locate(&d, tags::STUDY_DESCRIPTION);
    d[at.header + 4..at.header + 6].copy_from_slice(b"zz");
    cases.push(store_case("vr-lowercase-bytes", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let mut d = explicit(&s);
    let at = locate(&d, tags::STUDY_DESCRIPTION);
    d[at.header + 4..at.header + 6].copy_from_slice(&[0x01, 0x02]);
    cases.push(store_case("vr-binary-bytes", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let mut d = explicit(&s);
    let at = locate(&d, tags::PIXEL_DATA);
    d[at.header + 4..at.header + 6].copy_from_slice(b"SQ");
    cases.push(store_case("vr-pixeldata-as-sequence", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let d = replace_with_vr(&explicit(&s), tags::ROWS, b"LO", b"abc ");
    cases.push(store_case("vr-rows-as-text", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let d = replace_with_vr(&explicit(&s), tags::ROWS, b"IS", b"64");
    // A readable value under the wrong VR: the pixel codecs insist on US, so it is refused up front rather
    // than acknowledged and never analysable.
    cases.push(store_case("vr-rows-as-integer-string", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let d = explicit(&s);
    // Explicit bytes on an Implicit VR context: the first length read is "CS"+len → far past the end.
    cases.push(store_case("explicit-bytes-on-implicit-context", IMPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let d = encode(&with_uid(&b.object, &s), IMPLICIT);
    cases.push(store_case("implicit-bytes-on-explicit-context", EXPLICIT, &s, d, CANNOT_UNDERSTAND));

    // Images claiming gigabytes (never allocated: refused from the header arithmetic).
    let big = |o: &mut InMemDicomObject| {
        o.put(DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(65_535u16)));
        o.put(DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(65_535u16)));
    };
    let s = next();
    cases.push(store_case("rows-columns-65535", EXPLICIT, &s, modified(&s, &big), CANNOT_UNDERSTAND));
    let s = next();
    cases.push(store_case(
        "frames-2147483647",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            o.put(DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, "2147483647"));
        }),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case(
        "rows-columns-frames-overflow",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            big(o);
            o.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(64u16)));
            o.put(DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, "999999999999"));
        }),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case(
        "rows-zero",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            o.put(DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(0u16)));
        }),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case(
        "bits-allocated-zero",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            o.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(0u16)));
        }),
        CANNOT_UNDERSTAND,
    ));

    // PixelData length mismatches.
    let pixels = |o: &InMemDicomObject| o.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap().to_vec();
    let s = next();
    cases.push(store_case(
        "pixeldata-short-by-two",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            let p = pixels(o);
            o.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(p[..p.len() - 2].to_vec())));
        }),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case(
        "pixeldata-1000-bytes",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            o.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(vec![0u8; 1000])));
        }),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case(
        "pixeldata-empty",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            o.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::Empty));
        }),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case(
        "pixeldata-missing",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            o.remove_element(tags::PIXEL_DATA);
        }),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case(
        "pixeldata-longer-than-image",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            let mut p = pixels(o);
            p.extend_from_slice(&[0u8; 1000]);
            o.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(p)));
        }),
        SUCCESS,
    ));
    let s = next();
    let mut d = explicit(&s);
    let at = locate(&d, tags::PIXEL_DATA);
    d.truncate(at.header);
    d.extend_from_slice(&long_header(tags::PIXEL_DATA, b"OB", 0xFFFF_FFFF));
    d.extend_from_slice(&item(0));
    d.extend_from_slice(&item(4));
    d.extend_from_slice(&[1, 2, 3, 4]);
    d.extend_from_slice(&SEQ_DELIM);
    cases.push(store_case("pixeldata-encapsulated-in-native-syntax", EXPLICIT, &s, d, CANNOT_UNDERSTAND));

    // Identity problems.
    let s = next();
    cases.push(store_case("sop-instance-differs-from-command", EXPLICIT, &s, explicit(&format!("{s}.99")), MISMATCH));
    let s = next();
    cases.push(store_case(
        "sop-class-differs-from-command",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            o.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, uids::MR_IMAGE_STORAGE));
        }),
        MISMATCH,
    ));

    // Sequences.
    let s = next();
    let mut nested = Vec::new();
    for _ in 0..100 {
        nested.extend_from_slice(&long_header(Tag(0x0008, 0x1140), b"SQ", 0xFFFF_FFFF));
        nested.extend_from_slice(&item(0xFFFF_FFFF));
    }
    for _ in 0..100 {
        nested.extend_from_slice(&ITEM_DELIM);
        nested.extend_from_slice(&SEQ_DELIM);
    }
    cases.push(store_case(
        "sequence-nested-100-deep",
        EXPLICIT,
        &s,
        insert_raw(&explicit(&s), Tag(0x0008, 0x1140), &nested),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    let mut sq = long_header(Tag(0x0008, 0x1140), b"SQ", 16);
    sq.extend_from_slice(&item(1000));
    sq.extend_from_slice(&[0u8; 8]);
    cases.push(store_case(
        "sequence-item-overrun",
        EXPLICIT,
        &s,
        insert_raw(&explicit(&s), Tag(0x0008, 0x1140), &sq),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    let mut d = explicit(&s);
    d.extend_from_slice(&long_header(Tag(0x7FE1, 0x1010), b"SQ", 0xFFFF_FFFF));
    d.extend_from_slice(&item(0xFFFF_FFFF));
    cases.push(store_case("sequence-without-delimitation", EXPLICIT, &s, d, CANNOT_UNDERSTAND));

    // Not DICOM at all.
    let s = next();
    cases.push(store_case("non-dicom-noise", EXPLICIT, &s, noise(7, 4096), CANNOT_UNDERSTAND));
    let s = next();
    cases.push(store_case("non-dicom-noise-implicit", IMPLICIT, &s, noise(8, 4096), CANNOT_UNDERSTAND));
    let s = next();
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend_from_slice(&noise(9, 500));
    cases.push(store_case("non-dicom-png", EXPLICIT, &s, png, CANNOT_UNDERSTAND));
    let s = next();
    cases.push(store_case(
        "non-dicom-text",
        IMPLICIT,
        &s,
        b"GET / HTTP/1.1\r\nHost: lungsentry\r\n\r\n".to_vec(),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case("non-dicom-zeros", IMPLICIT, &s, vec![0u8; 4096], CANNOT_UNDERSTAND));
    let s = next();
    let mut part10 = vec![0u8; 128];
    part10.extend_from_slice(b"DICM");
    part10.extend_from_slice(&explicit(&s));
    cases.push(store_case("part10-file-sent-as-dataset", EXPLICIT, &s, part10, CANNOT_UNDERSTAND));
    cases
}

fn encapsulated_cases(b: &Bases) -> Vec<Case> {
    let mut cases = Vec::new();
    let (rle_uid, rle) = (&b.rle.0, &b.rle.1);
    let (jpeg_uid, jpeg) = (&b.jpeg.0, &b.jpeg.1);
    let (defl_uid, defl) = (&b.deflated.0, &b.deflated.1);
    // Each encapsulated variant needs its own SOP Instance UID, and the UID is inside the bytes: re-encoding
    // by DCMTK gave each base one; variants replace it in place with a same-length UID (last digit changed).
    let variant = |data: &[u8], uid: &str, k: u32| -> (String, Vec<u8>) {
        assert!(k < 10);
        let new = format!("{}{}", &uid[..uid.len() - 1], k);
        let pos = data.windows(uid.len()).position(|w| w == uid.as_bytes()).expect("uid in dataset");
        let mut d = data.to_vec();
        d[pos..pos + uid.len()].copy_from_slice(new.as_bytes());
        (new, d)
    };

    cases.push(store_case("rle-valid", RLE, rle_uid, rle.clone(), SUCCESS));
    cases.push(store_case("jpeg-lossless-valid", JPEG_SV1, jpeg_uid, jpeg.clone(), SUCCESS));
    // DCMTK's storescu proposes Deflated Explicit VR LE when asked to (-xd); we offer it, so we must store it.
    cases.push(store_case("deflated-valid", DEFLATED, defl_uid, defl.clone(), SUCCESS));

    let (u, mut d) = variant(rle, rle_uid, 1);
    let f = first_fragment(&d);
    let flen = u32::from_le_bytes(d[f + 4..f + 8].try_into().unwrap());
    d[f + 4..f + 8].copy_from_slice(&(flen + 100_000).to_le_bytes());
    cases.push(store_case("rle-fragment-length-overrun", RLE, &u, d, CANNOT_UNDERSTAND));

    let (u, d) = variant(rle, rle_uid, 2);
    cases.push(store_case("rle-cut-inside-fragment", RLE, &u, d[..d.len() - 8 - 500].to_vec(), CANNOT_UNDERSTAND));

    let (u, d) = variant(rle, rle_uid, 3);
    cases.push(store_case("rle-no-sequence-delimitation", RLE, &u, d[..d.len() - 8].to_vec(), CANNOT_UNDERSTAND));

    let (u, d) = variant(rle, rle_uid, 4);
    let f = first_fragment(&d);
    let mut cut = d[..f].to_vec();
    cut.extend_from_slice(&SEQ_DELIM);
    cases.push(store_case("rle-offset-table-only", RLE, &u, cut, CANNOT_UNDERSTAND));

    // Rows×Columns claiming 8 GiB over a small valid fragment: refused before any decoder sees it.
    let (u, mut d) = variant(rle, rle_uid, 5);
    for t in [tags::ROWS, tags::COLUMNS] {
        let at = locate(&d, t);
        d[at.value..at.value + 2].copy_from_slice(&65_535u16.to_le_bytes());
    }
    cases.push(store_case("rle-rows-columns-65535", RLE, &u, d, CANNOT_UNDERSTAND));

    // More frames than fragments: a decoder would be asked for frames that are not there.
    let (u, mut d) = variant(rle, rle_uid, 8);
    let nf = b"2147483647";
    let mut elem = vec![0x28, 0x00, 0x08, 0x00, b'I', b'S'];
    elem.extend_from_slice(&(nf.len() as u16).to_le_bytes());
    elem.extend_from_slice(nf);
    d = insert_raw(&d, Tag(0x0028, 0x0008), &elem);
    cases.push(store_case("rle-frames-more-than-fragments", RLE, &u, d, CANNOT_UNDERSTAND));

    // Structurally sound fragments whose codec payload lies: stored (the spool never decodes pixels; nothing
    // acknowledged is lost), then the slice is reported as not analysable without the daemon allocating or
    // crashing — the test checks the result's slice_errors.
    let (u, mut d) = variant(rle, rle_uid, 6);
    let f = first_fragment(&d) + 8;
    d[f..f + 4].copy_from_slice(&15u32.to_le_bytes());
    for i in 0..15 {
        d[f + 4 + 4 * i..f + 8 + 4 * i].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    }
    cases.push(store_case("rle-header-offsets-out-of-range", RLE, &u, d, SUCCESS));

    let (u, mut d) = variant(rle, rle_uid, 7);
    let f = first_fragment(&d) + 8;
    let flen = u32::from_le_bytes(d[f - 4..f].try_into().unwrap()) as usize;
    for byte in &mut d[f + 64..f + flen] {
        *byte = 0x80; // RLE "no-op" run headers only: decodes to nothing
    }
    cases.push(store_case("rle-segments-decode-short", RLE, &u, d, SUCCESS));

    let (u, mut d) = variant(jpeg, jpeg_uid, 1);
    let f = first_fragment(&d) + 8;
    let sof = d[f..].windows(2).position(|w| w == [0xFF, 0xC3]).expect("SOF3") + f;
    d[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    cases.push(store_case("jpeg-sof-claims-65535x65535", JPEG_SV1, &u, d, SUCCESS));

    let (u, mut d) = variant(jpeg, jpeg_uid, 2);
    let f = first_fragment(&d);
    let flen = u32::from_le_bytes(d[f + 4..f + 8].try_into().unwrap()) as usize;
    let keep = flen / 3 & !1;
    let tail = d[f + 8 + flen..].to_vec();
    d.truncate(f + 8 + keep);
    d[f + 4..f + 8].copy_from_slice(&(keep as u32).to_le_bytes());
    d.extend_from_slice(&tail);
    cases.push(store_case("jpeg-codestream-cut-short", JPEG_SV1, &u, d, SUCCESS));

    let (u, mut d) = variant(jpeg, jpeg_uid, 3);
    let f = first_fragment(&d) + 8;
    let flen = u32::from_le_bytes(d[f - 4..f].try_into().unwrap()) as usize;
    let junk = noise(11, flen);
    d[f..f + flen].copy_from_slice(&junk);
    cases.push(store_case("jpeg-fragment-noise", JPEG_SV1, &u, d, SUCCESS));

    // (The UID sits inside the compressed stream, so the command names a fresh one: refused either way.)
    let u = b.sop(802);
    cases.push(store_case("deflated-truncated", DEFLATED, &u, defl[..defl.len() / 2].to_vec(), CANNOT_UNDERSTAND));
    let s = b.sop(800);
    cases.push(store_case("deflated-not-deflate", DEFLATED, &s, noise(12, 3000), CANNOT_UNDERSTAND));
    // A deflate bomb: 64 MiB of zeros compresses to ~64 KiB; inflating it must stop at the message cap.
    let s = b.sop(801);
    let bomb = {
        use std::io::Write;
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            e.write_all(&zeros).unwrap();
        }
        e.finish().unwrap()
    };
    cases.push(store_case("deflated-bomb-64mib", DEFLATED, &s, bomb, CANNOT_UNDERSTAND));
    cases
}

fn dimse_cases(b: &Bases, max_message: usize) -> Vec<Case> {
    let ct_ctx =
        || Setup::Associate(vec![(CT.into(), vec![EXPLICIT.into()]), (VERIFICATION.into(), vec![IMPLICIT.into()])]);
    let case = |name: &str, steps: Vec<Step>, expect: Expect, sop: Option<String>| Case {
        name: format!("dimse/{name}"),
        setup: ct_ctx(),
        steps,
        expect,
        sop_instance: sop,
        min_ms: 0,
    };
    let cmd =
        |pc: u8, cs: &CommandSet| Step::Send(pdata(vec![pdv(pc, PDataValueType::Command, true, command_bytes(cs))]));
    let raw_cmd = |pc: u8, bytes: Vec<u8>| Step::Send(pdata(vec![pdv(pc, PDataValueType::Command, true, bytes)]));
    let valid = |sop: &str| encode(&with_uid(&b.object, sop), EXPLICIT);
    let mut cases = Vec::new();

    cases.push(case("command-noise", vec![raw_cmd(3, noise(21, 40))], Expect::Abort, None));
    // Fuzz finding (dimse target): an odd length on (00F9,0000), which the dictionary types UL, left the parser
    // out of step with the bytes until it read a header claiming 4 127 195 136 bytes and allocated them.
    const FUZZ_OOM: [u8; 124] = [
        0xf9, 0x00, 0x00, 0x00, 0x31, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x48, 0x01, 0x18, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x48, 0x00,
        0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xe7, 0x00, 0x27, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x80, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x08, 0x00, 0x00, 0x12, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x32, 0x4a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf6, 0x01, 0x00, 0x00, 0x00, 0x00,
    ];
    cases.push(case("command-fuzz-oom-misaligned", vec![raw_cmd(3, FUZZ_OOM.to_vec())], Expect::Abort, None));
    // The same fault on a command element: CommandGroupLength (UL) with 5 bytes.
    let bytes = {
        let mut v = command_bytes(&CommandSet::echo_rq(1));
        v[4] = 5;
        v.insert(12, 0);
        v
    };
    cases.push(case("command-ul-odd-length", vec![raw_cmd(3, bytes)], Expect::Abort, None));
    let mut no_field = CommandSet::echo_rq(1);
    no_field.command_field = 0;
    let bytes = {
        // Encode, then drop the (0000,0100) element: group length + remaining elements.
        let full = command_bytes(&no_field);
        strip_implicit_element(&full, Tag(0x0000, 0x0100))
    };
    cases.push(case("command-without-command-field", vec![raw_cmd(3, bytes)], Expect::Abort, None));
    let mut no_id = CommandSet::echo_rq(1);
    no_id.message_id = None;
    cases.push(case("command-without-message-id", vec![cmd(3, &no_id)], Expect::Abort, None));
    cases.push(case(
        "command-over-64kib",
        vec![raw_cmd(3, {
            let mut v = command_bytes(&CommandSet::echo_rq(1));
            v.extend(std::iter::repeat_n(0u8, 70_000));
            v
        })],
        Expect::Abort,
        None,
    ));

    let s = b.sop(501);
    let mut no_ds = CommandSet::store_rq(1, CT, &s);
    no_ds.has_dataset = false;
    cases.push(case("c-store-without-dataset", vec![cmd(1, &no_ds)], Expect::Status(CANNOT_UNDERSTAND), Some(s)));
    let mut no_uid = CommandSet::store_rq(1, CT, "1.2.3");
    no_uid.affected_sop_instance_uid = None;
    let mut steps = vec![cmd(1, &no_uid)];
    steps.extend(data_fragments(1, &valid(&b.sop(502)), true));
    cases.push(case(
        "c-store-without-affected-sop-instance",
        steps,
        Expect::Status(CANNOT_UNDERSTAND),
        Some(b.sop(502)),
    ));
    let s = b.sop(503);
    let mut steps = vec![cmd(1, &CommandSet::store_rq(1, uids::MR_IMAGE_STORAGE, &s))];
    steps.extend(data_fragments(1, &valid(&s), true));
    cases.push(case("c-store-class-not-the-contexts", steps, Expect::Status(NO_SUCH_SOP_CLASS), Some(s)));
    let find = CommandSet {
        command_field: 0x0020,
        message_id: Some(5),
        affected_sop_class_uid: Some(VERIFICATION.into()),
        ..Default::default()
    };
    cases.push(case("unknown-command-c-find", vec![cmd(3, &find)], Expect::Status(UNRECOGNIZED_OPERATION), None));
    let mut rsp = CommandSet::response_to(&CommandSet::echo_rq(1), 0);
    rsp.message_id_being_responded_to = Some(1);
    cases.push(case(
        "peer-sends-a-response-then-echo",
        vec![cmd(3, &rsp), echo_step(3, 2)],
        Expect::Status(SUCCESS),
        None,
    ));
    let cancel = CommandSet { command_field: 0x0FFF, message_id_being_responded_to: Some(1), ..Default::default() };
    cases.push(case("c-cancel-then-echo", vec![cmd(3, &cancel), echo_step(3, 2)], Expect::Status(SUCCESS), None));
    cases.push(case(
        "data-fragment-before-command",
        vec![Step::Send(pdata(vec![pdv(1, PDataValueType::Data, true, valid(&b.sop(504)))]))],
        Expect::Abort,
        Some(b.sop(504)),
    ));
    let s = b.sop(505);
    let d = valid(&s);
    let mut steps = vec![cmd(1, &CommandSet::store_rq(1, CT, &s))];
    steps.extend(data_fragments(1, &d[..4000], false));
    steps.push(echo_step(3, 2));
    cases.push(case("command-while-dataset-incomplete", steps, Expect::Abort, Some(s)));
    let s = b.sop(506);
    let d = valid(&s);
    let mut steps = vec![cmd(1, &CommandSet::store_rq(1, CT, &s))];
    steps.extend(data_fragments(1, &d[..4000], false));
    steps.push(Step::Send(pdata(vec![pdv(3, PDataValueType::Data, true, d[4000..].to_vec())])));
    cases.push(case("context-switch-mid-dataset", steps, Expect::Abort, Some(s)));
    cases.push(case(
        "pdv-on-context-never-proposed",
        vec![Step::Send(pdata(vec![pdv(77, PDataValueType::Command, true, command_bytes(&CommandSet::echo_rq(1)))]))],
        Expect::Abort,
        None,
    ));
    let s = b.sop(507);
    let mut steps = vec![cmd(1, &CommandSet::store_rq(1, CT, &s))];
    let filler = vec![0u8; 16_000];
    let n = max_message / filler.len() + 4;
    for i in 0..n {
        steps.push(Step::Send(pdata(vec![pdv(1, PDataValueType::Data, i + 1 == n, filler.clone())])));
    }
    cases.push(case("message-over-max-message-mb", steps, Expect::Status(OUT_OF_RESOURCES), Some(s)));
    cases
}

/// Removes one element from an Implicit VR LE command set and fixes the group length.
fn strip_implicit_element(data: &[u8], tag: Tag) -> Vec<u8> {
    let mut out = Vec::new();
    let mut p = 0;
    while p + 8 <= data.len() {
        let t = Tag(u16::from_le_bytes([data[p], data[p + 1]]), u16::from_le_bytes([data[p + 2], data[p + 3]]));
        let len = u32::from_le_bytes(data[p + 4..p + 8].try_into().unwrap()) as usize;
        if t != tag {
            out.extend_from_slice(&data[p..p + 8 + len]);
        }
        p += 8 + len;
    }
    let gl = (out.len() - 12) as u32;
    out[8..12].copy_from_slice(&gl.to_le_bytes());
    out
}

fn pdu_cases(b: &Bases, idle_ms: u64, max_pdu: u32) -> Vec<Case> {
    let ct = || vec![(CT.to_string(), vec![EXPLICIT.to_string()])];
    let raw = |name: &str, steps: Vec<Step>, expect: Expect| Case {
        name: format!("pdu/{name}"),
        setup: Setup::Raw,
        steps,
        expect,
        sop_instance: None,
        min_ms: 0,
    };
    let assoc = |name: &str, steps: Vec<Step>, expect: Expect, sop: Option<String>| Case {
        name: format!("pdu/{name}"),
        setup: Setup::Associate(ct()),
        steps,
        expect,
        sop_instance: sop,
        min_ms: 0,
    };
    let rq = assoc_rq_bytes("LUNGSENTRY", &ct());
    let valid = |sop: &str| encode(&with_uid(&b.object, sop), EXPLICIT);
    let mut cases = Vec::new();

    // Before any association.
    cases.push(raw("unknown-pdu-type-first", vec![Step::Send(raw_pdu(0x09, 4, &[0; 4]))], Expect::Closed));
    cases.push(raw("pdu-type-zero-first", vec![Step::Send(raw_pdu(0x00, 0, &[]))], Expect::Closed));
    cases.push(raw("http-request-first", vec![Step::Send(b"GET /healthz HTTP/1.1\r\n\r\n".to_vec())], Expect::Closed));
    cases.push(raw("associate-rq-length-4gib", vec![Step::Send(raw_pdu(0x01, 0xFFFF_FFF0, &rq[6..]))], Expect::Closed));
    cases.push(raw(
        "associate-rq-truncated-then-close",
        vec![Step::Send(rq[..40].to_vec()), Step::Close],
        Expect::PeerGone,
    ));
    let mut c = raw("associate-rq-truncated-then-silence", vec![Step::Send(rq[..40].to_vec())], Expect::Closed);
    c.min_ms = idle_ms.saturating_sub(200);
    cases.push(c);
    let mut bad_version = rq.clone();
    bad_version[6..8].copy_from_slice(&[0, 0]);
    cases.push(raw("associate-rq-protocol-version-0", vec![Step::Send(bad_version)], Expect::Rejected));
    cases.push(raw(
        "associate-rq-wrong-called-ae",
        vec![Step::Send(assoc_rq_bytes("SOMEONEELSE", &ct()))],
        Expect::Rejected,
    ));
    let mut overrun = rq.clone();
    // The first variable item (application context) claims more bytes than the PDU has.
    overrun[74 + 2..74 + 4].copy_from_slice(&0x7FFFu16.to_be_bytes());
    cases.push(raw("associate-rq-item-length-overrun", vec![Step::Send(overrun)], Expect::Closed));
    cases.push(raw(
        "associate-rq-no-presentation-contexts",
        vec![Step::Send(assoc_rq_bytes("LUNGSENTRY", &[]))],
        Expect::ContextsRejected,
    ));
    for (name, a, ts) in [
        ("abstract-syntax-not-offered", uids::MR_IMAGE_STORAGE, EXPLICIT),
        ("transfer-syntax-mpeg2-only", CT, "1.2.840.10008.1.2.4.100"),
        ("transfer-syntax-bogus-uid", CT, "1.2.3.4.5.6.7.8"),
        ("transfer-syntax-big-endian-retired", CT, "1.2.840.10008.1.2.2"),
        ("transfer-syntax-not-a-uid", CT, "explicit please"),
    ] {
        cases.push(raw(
            &format!("associate-rq-{name}"),
            vec![Step::Send(assoc_rq_bytes("LUNGSENTRY", &[(a.into(), vec![ts.into()])]))],
            Expect::ContextsRejected,
        ));
    }
    cases.push(raw(
        "associate-rq-empty-transfer-syntax-list",
        vec![Step::Send(assoc_rq_bytes("LUNGSENTRY", &[(CT.into(), vec![])]))],
        Expect::ContextsRejected,
    ));
    cases.push(raw(
        "p-data-before-association",
        vec![Step::Send(pdata(vec![pdv(1, PDataValueType::Command, true, command_bytes(&CommandSet::echo_rq(1)))]))],
        Expect::Closed,
    ));
    cases.push(raw("associate-ac-from-the-caller", vec![Step::Send(raw_pdu(0x02, 4, &[0, 1, 0, 0]))], Expect::Closed));
    let mut c = raw("silent-before-associate-rq", vec![], Expect::Abort);
    c.min_ms = idle_ms.saturating_sub(200);
    cases.push(c);

    // Inside an association.
    let over = max_pdu as usize + 64;
    let mut body = vec![0u8; over];
    body[0..4].copy_from_slice(&((over - 4) as u32).to_be_bytes());
    body[4] = 1;
    body[5] = 0x03;
    cases.push(assoc("p-data-over-max-pdu", vec![Step::Send(raw_pdu(0x04, over as u32, &body))], Expect::Abort, None));
    cases.push(assoc(
        "p-data-length-4gib",
        vec![Step::Send(raw_pdu(0x04, 0xFFFF_FFF0, &[0, 0, 0, 10, 1, 3]))],
        Expect::Abort,
        None,
    ));
    let mut pd = pdata(vec![pdv(1, PDataValueType::Command, true, command_bytes(&CommandSet::echo_rq(1)))]);
    pd[6..10].copy_from_slice(&60_000u32.to_be_bytes());
    cases.push(assoc("pdv-length-overrun", vec![Step::Send(pd)], Expect::Abort, None));
    cases.push(assoc("pdv-length-zero", vec![Step::Send(raw_pdu(0x04, 4, &[0, 0, 0, 0]))], Expect::Abort, None));
    cases.push(assoc("second-associate-rq", vec![Step::Send(rq.clone())], Expect::Abort, None));
    cases.push(assoc("unknown-pdu-type-0x0a", vec![Step::Send(raw_pdu(0x0A, 4, &[1, 2, 3, 4]))], Expect::Abort, None));
    cases.push(assoc("unsolicited-release-rp", vec![Step::Send(pdu_bytes(&Pdu::ReleaseRP))], Expect::Abort, None));
    let s = b.sop(601);
    let d = valid(&s);
    let mut steps = c_store(1, 1, CT, &s, &d[..d.len() / 2]);
    steps.truncate(steps.len()); // keep: half the dataset, not marked last
    let mut steps_abort = vec![steps[0].clone()];
    steps_abort.extend(data_fragments(1, &d[..d.len() / 2], false));
    steps_abort.push(Step::Send(pdu_bytes(&Pdu::AbortRQ { source: dicom_ul::pdu::AbortRQSource::ServiceUser })));
    cases.push(assoc("a-abort-mid-dataset", steps_abort, Expect::PeerGone, Some(s)));
    let s = b.sop(602);
    let d = valid(&s);
    let mut st = c_store(1, 1, CT, &s, &[]);
    st.truncate(1);
    st.extend(data_fragments(1, &d[..d.len() / 2], false));
    st.push(Step::Close);
    cases.push(assoc("tcp-close-mid-dataset", st, Expect::PeerGone, Some(s)));
    let s = b.sop(603);
    let d = valid(&s);
    let mut st = c_store(1, 1, CT, &s, &[]);
    st.truncate(1);
    st.extend(data_fragments(1, &d[..d.len() / 2], false));
    st.push(Step::Send(pdu_bytes(&Pdu::ReleaseRQ)));
    cases.push(assoc("release-rq-mid-dataset", st, Expect::ReleaseRp, Some(s)));
    let mut c = assoc("idle-after-association", vec![], Expect::Abort, None);
    c.min_ms = idle_ms.saturating_sub(200);
    cases.push(c);
    let s = b.sop(604);
    let d = valid(&s);
    let mut st = c_store(1, 1, CT, &s, &[]);
    st.truncate(1);
    st.extend(data_fragments(1, &d[..d.len() / 2], false));
    let mut c = assoc("idle-mid-dataset", st, Expect::Abort, Some(s));
    c.min_ms = idle_ms.saturating_sub(200);
    cases.push(c);
    let mut c = assoc("half-pdu-header-then-silence", vec![Step::Send(vec![0x04, 0x00, 0x00])], Expect::Abort, None);
    c.min_ms = idle_ms.saturating_sub(200);
    cases.push(c);
    cases
}
