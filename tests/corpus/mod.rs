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
//!
//! Parts: this file holds the case types and the PDU builders; `builders` the phantom bases and the byte-level
//! dataset surgery; `dataset` (with the UID and encapsulated cases), `dimse` and `pdu` the cases of each layer.
#![allow(dead_code)]

mod builders;
mod dataset;
mod dimse;
mod pdu;

use dicom_dictionary_std::uids;
use dicom_ul::pdu::{AssociationRQ, PDataValue, PDataValueType, PresentationContextProposed, UserVariableItem};
use dicom_ul::Pdu;
use lungsentry::receive::dimse::CommandSet;

pub use builders::*;
use dataset::{dataset_cases, encapsulated_cases, uid_cases};
use dimse::dimse_cases;
use pdu::pdu_cases;

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
