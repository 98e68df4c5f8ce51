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

/// DIMSE status codes (they live in [`crate::dicom::status`]; re-exported for the handlers and callers here).
pub use crate::dicom::status;

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

/// The next stage's answer to one C-STORE: its DIMSE status and, for a failure, the reason the sender is told
/// (the C-STORE-RSP's Error Comment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreAnswer {
    /// DIMSE status ([`status`]).
    pub status: u16,
    /// Error Comment (0000,0902), already fit for it: see [`StoreAnswer::refused`].
    pub comment: Option<String>,
}

impl StoreAnswer {
    /// Stored: success, no comment.
    pub fn success() -> StoreAnswer {
        StoreAnswer { status: status::SUCCESS, comment: None }
    }

    /// A failure `status` with `reason` as its Error Comment: an LO value, so at most 64 characters of the
    /// default repertoire, without backslash (the value delimiter); longer reasons are cut with "...". The reason
    /// must not carry local paths or other site details: the sender is a peer.
    pub fn refused(status: u16, reason: &str) -> StoreAnswer {
        const LO_MAX: usize = 64;
        let clean: String =
            reason.chars().map(|c| if c.is_ascii_graphic() && c != '\\' || c == ' ' { c } else { '?' }).collect();
        let clean = clean.trim();
        let comment = if clean.len() > LO_MAX { format!("{}...", &clean[..LO_MAX - 3]) } else { clean.to_string() };
        StoreAnswer { status, comment: (!comment.is_empty()).then_some(comment) }
    }
}

impl From<u16> for StoreAnswer {
    /// A status without a comment.
    fn from(status: u16) -> StoreAnswer {
        StoreAnswer { status, comment: None }
    }
}

/// What the receive stage hands on.
#[derive(Debug)]
pub enum ReceiveEvent {
    /// A dataset to make durable; send the DIMSE status (and a failure's reason) for the C-STORE-RSP on `reply`.
    Instance(IncomingInstance, oneshot::Sender<StoreAnswer>),
    /// An association was established; `sender` is its calling AE title and the peer's IP address (a sender that
    /// splits a series over associations opens the next one from the same place: the completion rules wait for it).
    Opened { association: AssociationId, sender: String },
    /// The association ended (released or aborted); series it fed may now start their quiet period.
    Released { association: AssociationId, aborted: bool },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_reason_is_a_valid_error_comment() {
        let a = StoreAnswer::refused(status::CANNOT_UNDERSTAND, "StudyInstanceUID is empty (Type 1 attribute)");
        assert_eq!(a.comment.as_deref(), Some("StudyInstanceUID is empty (Type 1 attribute)"));
        // LO: at most 64 characters, no backslash or control characters.
        let a = StoreAnswer::refused(0xC000, &format!("a\\b\tc\u{e9}{}", "x".repeat(100)));
        let c = a.comment.unwrap();
        assert_eq!(c.len(), 64);
        assert!(c.starts_with("a?b?c?x") && c.ends_with("..."), "{c}");
        assert_eq!(StoreAnswer::refused(0xA700, "   ").comment, None);
        assert_eq!(StoreAnswer::from(0u16), StoreAnswer::success());
    }
}
