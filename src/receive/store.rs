//! store — the C-STORE handler: checks the request, hands the dataset on, and answers with the status the
//! next stage gives back.
//!
//! Owns: the C-STORE-RSP status. Statuses it chooses itself:
//! - `0xA700` (Refused: out of resources) when the message was larger than `dicom.max_message_mb` — the bytes
//!   were read and dropped, it is this receiver's resource limit that refused it — and when the next stage is
//!   gone or dropped the reply (the instance is then not durable; never answered with success);
//! - `0xA700` too when the shared memory budget (`dicom.max_buffered_mb`) had no room for the message and its
//!   working copy as it arrived, or, deflated, none for its inflated form once complete (see `budget`); the
//!   message's charge is held until its status is known, so a dataset in the spool stays counted;
//! - `0x0118` (no such SOP class) when AffectedSOPClassUID differs from the presentation context's abstract
//!   syntax; `0xC000` (cannot understand) when the request lacks its SOP instance UID or its dataset.
//!
//! Hands on: [`ReceiveEvent::Instance`] with a oneshot for the status.
//! Never: parses the dataset — the spool does, and its status comes back through the oneshot.

use std::net::SocketAddr;

use dicom_dictionary_std::uids;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::budget::Charge;
use super::dimse::{CommandSet, Payload};
use super::{status, AssociationId, IncomingInstance, ReceiveEvent};

/// What the handler needs to know about the association and the presentation context the request used.
pub(super) struct StoreContext<'a> {
    /// Association id for the event.
    pub association: AssociationId,
    /// Calling AE title for the event.
    pub calling_ae: &'a str,
    /// Peer address for the event.
    pub peer: SocketAddr,
    /// Abstract syntax of the presentation context the message came on.
    pub abstract_syntax: &'a str,
    /// Transfer syntax of that context: the dataset's encoding.
    pub transfer_syntax: &'a str,
    /// Where datasets go.
    pub events: &'a mpsc::Sender<ReceiveEvent>,
    /// `dicom.max_message_mb` in bytes: what a deflated dataset may inflate to in the spool.
    pub max_message_bytes: u64,
}

/// Handles one C-STORE-RQ and returns its C-STORE-RSP.
pub(super) async fn handle(
    ctx: StoreContext<'_>,
    request: &CommandSet,
    payload: Payload,
    charge: Option<Charge>,
) -> CommandSet {
    let (code, comment) = decide(&ctx, request, payload, charge).await;
    let mut rsp = CommandSet::response_to(request, code);
    // Only the SOP class the request named is echoed; fall back to the context's when the request had none.
    if rsp.affected_sop_class_uid.is_none() {
        rsp.affected_sop_class_uid = Some(ctx.abstract_syntax.to_string());
    }
    rsp.error_comment = comment;
    rsp
}

async fn decide(
    ctx: &StoreContext<'_>,
    request: &CommandSet,
    payload: Payload,
    mut charge: Option<Charge>,
) -> (u16, Option<String>) {
    let sop_class = request.affected_sop_class_uid.as_deref().unwrap_or("");
    if sop_class != ctx.abstract_syntax {
        warn!(sop_class, context = ctx.abstract_syntax, "C-STORE SOP class differs from its presentation context");
        return (status::NO_SUCH_SOP_CLASS, Some("SOP class is not the presentation context's".into()));
    }
    let Some(sop_instance) = request.affected_sop_instance_uid.clone() else {
        return (status::CANNOT_UNDERSTAND, Some("missing Affected SOP Instance UID".into()));
    };
    let dataset = match payload {
        Payload::Complete(d) => d,
        Payload::None => return (status::CANNOT_UNDERSTAND, Some("C-STORE without dataset".into())),
        Payload::Oversize { received } => {
            warn!(sop_instance, received, "C-STORE larger than dicom.max_message_mb, refused");
            return (status::OUT_OF_RESOURCES, Some("message larger than the receiver's limit".into()));
        }
        Payload::OverBudget { received } => {
            warn!(sop_instance, received, "C-STORE refused: dicom.max_buffered_mb has no room for it now");
            return (status::OUT_OF_RESOURCES, Some("receiver's memory budget is full; retry later".into()));
        }
    };
    // The spool parses the dataset (a copy of its size): the assembler reserved room for that copy with every
    // fragment. A deflated one is inflated too (at most the message cap, then parsed): room for that is taken now,
    // while the received bytes are still held, at most what is left of the whole budget, so one alone always fits.
    let deflated = super::syntax::trim_uid(ctx.transfer_syntax) == uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN;
    if let (true, Some(c)) = (deflated, charge.as_mut()) {
        let working = (2 * ctx.max_message_bytes).min(c.limit().saturating_sub(c.bytes()));
        if !c.grow(working) {
            warn!(
                sop_instance,
                size = dataset.len(),
                "C-STORE refused: no room in dicom.max_buffered_mb to inflate it now"
            );
            return (status::OUT_OF_RESOURCES, Some("receiver's memory budget is full; retry later".into()));
        }
    }
    let size = dataset.len();
    let instance = IncomingInstance {
        association: ctx.association,
        calling_ae: ctx.calling_ae.to_string(),
        peer: ctx.peer,
        sop_class_uid: sop_class.to_string(),
        sop_instance_uid: sop_instance.clone(),
        transfer_syntax_uid: ctx.transfer_syntax.to_string(),
        dataset,
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    if ctx.events.send(ReceiveEvent::Instance(instance, reply_tx)).await.is_err() {
        warn!(sop_instance, "next stage is gone; refusing instance");
        return (status::OUT_OF_RESOURCES, Some("receiver is shutting down".into()));
    }
    match reply_rx.await {
        Ok(answer) => {
            debug!(sop_instance, size, status = format_args!("{:#06X}", answer.status), "C-STORE answered");
            (answer.status, answer.comment)
        }
        Err(_) => {
            warn!(sop_instance, "next stage dropped the reply; refusing instance");
            (status::OUT_OF_RESOURCES, Some("instance could not be stored".into()))
        }
    }
}
