//! receive — the DICOM SCP: association listener, DIMSE message assembly, C-ECHO and C-STORE handlers.
//!
//! Owns: TCP accept loop (bounded by `max_associations`, TCP_NODELAY on every socket, backoff on accept errors),
//! DICOM over TLS when `[dicom.tls]` is set (`tls`; no plaintext on that port), association negotiation (our AE
//! title, calling-AE + peer-IP allow-list, presentation contexts), turning P-DATA fragments into complete DIMSE
//! messages (size-capped), and answering each command with a status.
//! Hands to the next stage: every C-STORE dataset as a [`ReceiveEvent::Instance`] whose reply (the DIMSE
//! status) comes back on a oneshot *after* the spool has made it durable; association ends as
//! [`ReceiveEvent::Released`].
//! Never: writes files, parses pixel data or knows about series. Stages after it never see PDUs.

use std::net::SocketAddr;

use tokio::sync::oneshot;

mod association;
pub mod budget;
pub mod dimse;
mod echo;
mod listener;
mod policy;
mod store;
pub mod syntax;
pub mod tls;

pub use listener::{run, run_with, Tuning};

/// Process-unique id of one association, for logs and for telling the series stage which sender finished.
pub type AssociationId = u64;

/// DIMSE status codes we send.
pub mod status {
    /// Success.
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: out of resources (disk full, spool cannot write).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: data set does not match SOP class.
    pub const DATASET_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    /// Error: cannot understand (unparseable or unusable dataset). C000–CFFF range.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Failure: SOP class not supported.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Failure: processing failure.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// Failure: unrecognized operation (a DIMSE command we do not serve).
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    /// Failure: no such SOP class (AffectedSOPClassUID is not the presentation context's abstract syntax).
    pub const NO_SUCH_SOP_CLASS: u16 = 0x0118;
    /// Warning: coercion of data elements (B000); the first of the warning range B000–BFFF.
    pub const WARNING_COERCION: u16 = 0xB000;

    /// Whether a C-STORE status means the instance was stored (success or any warning).
    pub fn is_stored(status: u16) -> bool {
        status == SUCCESS || status == 0x0107 || status == 0x0116 || (0xB000..=0xBFFF).contains(&status)
    }
}

/// One C-STORE's payload, as received.
#[derive(Debug)]
pub struct IncomingInstance {
    /// Which association carried it.
    pub association: AssociationId,
    /// Calling AE title of the sender.
    pub calling_ae: String,
    /// Peer socket address.
    pub peer: SocketAddr,
    /// Affected SOP Class UID from the command.
    pub sop_class_uid: String,
    /// Affected SOP Instance UID from the command.
    pub sop_instance_uid: String,
    /// Transfer syntax the dataset is encoded in (the presentation context's).
    pub transfer_syntax_uid: String,
    /// The dataset bytes exactly as received (no file meta group), in `transfer_syntax_uid`.
    pub dataset: Vec<u8>,
}

/// What the receive stage hands on.
#[derive(Debug)]
pub enum ReceiveEvent {
    /// A dataset to make durable; send the DIMSE status for the C-STORE-RSP on `reply`.
    Instance(IncomingInstance, oneshot::Sender<u16>),
    /// An association was established; `sender` is its calling AE title and the peer's IP address (a sender that
    /// splits a series over associations opens the next one from the same place: the completion rules wait for it).
    Opened { association: AssociationId, sender: String },
    /// The association ended (released or aborted); series it fed may now start their quiet period.
    Released { association: AssociationId, aborted: bool },
}
