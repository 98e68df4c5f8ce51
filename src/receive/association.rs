//! association — one peer's association, from its first byte to release or abort.
//!
//! Owns: the TLS handshake when `[dicom.tls]` is set (bounded, with the association request, by its
//! `handshake_timeout_s`; failures are logged as such and end only this connection), negotiation (through
//! dicom-ul, with [`PeerPolicy`] and the lists in `syntax`), reading PDUs with the
//! idle timeout (and TCP_QUICKACK after each read, see [`Tuning`]), feeding P-DATA into the
//! [`MessageAssembler`], dispatching each complete message to its command handler and sending the response,
//! A-RELEASE / A-ABORT handling, and the closing [`ReceiveEvent::Released`].
//! Hands on: datasets (through `store`) and the end of the association.
//! Never: decides a C-STORE's status itself beyond request validation (see `store`); never keeps the
//! association open past a protocol violation — those abort only this association, others go on.

use std::collections::HashMap;
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use dicom_ul::association::server::{AsyncServerAssociation, AsyncTlsStream};
use dicom_ul::association::{Association, AsyncAssociation};
use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, PresentationContextResultReason};
use dicom_ul::{Pdu, ServerAssociationOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, field, info, instrument, warn, Span};

use super::dimse::{command, command_pdv, CommandSet, DimseError, Message, MessageAssembler};
use super::listener::Tuning;
use super::policy::PeerPolicy;
use super::store::StoreContext;
use super::{echo, status, store, syntax, AssociationId, ReceiveEvent};
use crate::config::AllowedPeer;

/// Listener-wide settings every association reads.
#[derive(Debug)]
pub(super) struct Settings {
    /// Our AE title.
    pub ae_title: String,
    /// Cap on one DIMSE message (command + dataset), bytes.
    pub max_message_bytes: u64,
    /// Memory shared by every association's buffered datasets (`dicom.max_buffered_mb`).
    pub budget: Arc<super::budget::BufferBudget>,
    /// No PDU for this long → A-ABORT (also bounds the wait for the A-ASSOCIATE-RQ).
    pub idle_timeout: Duration,
    /// Allow-list; empty = anyone.
    pub allowed: Arc<Vec<AllowedPeer>>,
    /// Transport tuning.
    pub tuning: Tuning,
    /// `[dicom.tls]`: when set, every connection must complete a TLS handshake first.
    pub tls: Option<TlsSettings>,
}

/// The TLS side of [`Settings`].
#[derive(Debug)]
pub(super) struct TlsSettings {
    /// rustls configuration (certificate, key, client verification), built at start-up.
    pub config: Arc<rustls::ServerConfig>,
    /// From accept to an established association (TLS handshake + A-ASSOCIATE-RQ), at most this long.
    pub handshake_timeout: Duration,
}

/// The byte stream under an association: plain TCP or TLS over TCP.
pub(super) trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// The TCP socket underneath (for TCP_QUICKACK).
    fn tcp(&self) -> &TcpStream;
}

impl Transport for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Transport for AsyncTlsStream {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// Why serving an association stopped.
#[derive(Debug)]
enum End {
    /// A-RELEASE completed.
    Released,
    /// Peer sent A-ABORT or closed the connection.
    PeerAborted,
    /// We sent A-ABORT (timeout, protocol error, shutdown).
    WeAborted,
}

/// Serves one accepted connection.
pub(super) struct AssociationHandler {
    /// Process-unique id, in every log line of this association and in its events.
    pub id: AssociationId,
    /// Peer address (for the allow-list and the events).
    pub peer: SocketAddr,
    /// Shared settings.
    pub settings: Arc<Settings>,
    /// Where instances and the end of the association go.
    pub events: mpsc::Sender<ReceiveEvent>,
    /// Turns true when the daemon stops; checked between messages only, so an instance in flight finishes.
    pub shutdown: watch::Receiver<bool>,
}

/// An accepted presentation context.
struct Context {
    /// Its abstract syntax (SOP class).
    abstract_syntax: String,
    /// Its transfer syntax.
    transfer_syntax: String,
}

impl AssociationHandler {
    /// Runs the association to its end; never returns an error (each ending is logged here).
    #[instrument(name = "association", skip_all, fields(association = self.id, peer = %self.peer, calling_ae = field::Empty))]
    pub(super) async fn run(mut self, mut socket: TcpStream) {
        if self.settings.tuning.tcp_quickack {
            set_quickack(&socket);
        }
        // Plain DICOM: the A-ASSOCIATE-RQ must start within the idle timeout. TLS: the handshake and the
        // A-ASSOCIATE-RQ must be done within the handshake timeout, counted from here.
        let wait = match &self.settings.tls {
            Some(t) => t.handshake_timeout,
            None => self.settings.idle_timeout,
        };
        let deadline = Instant::now() + wait;
        // Wait for the first byte, bounded by that deadline and the shutdown signal.
        let mut probe = [0u8; 1];
        let first = tokio::select! {
            r = tokio::time::timeout_at(deadline, socket.peek(&mut probe)) => r,
            _ = self.shutdown.wait_for(|v| *v) => { debug!("shutdown before association request"); return; }
        };
        match first {
            Err(_) if self.settings.tls.is_some() => {
                warn!(
                    timeout_s = wait.as_secs(),
                    "TLS handshake not started within the handshake timeout; connection dropped"
                );
                let _ = socket.shutdown().await;
                return;
            }
            Err(_) => {
                info!(timeout_s = wait.as_secs(), "no association request within the idle timeout; aborting");
                let mut buf = Vec::new();
                if dicom_ul::write_pdu(&mut buf, &abort_pdu()).is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), socket.write_all(&buf)).await;
                }
                let _ = socket.shutdown().await;
                return;
            }
            Ok(Ok(0)) => {
                debug!("peer closed before requesting an association");
                return;
            }
            Ok(Err(e)) => {
                debug!(error = %e, "connection failed before association request");
                return;
            }
            Ok(Ok(_)) => {}
        }

        let mut options = ServerAssociationOptions::new()
            .ae_access_control(PeerPolicy::new(self.peer, self.settings.allowed.clone()))
            .ae_title(self.settings.ae_title.clone())
            .max_pdu_length(self.settings.tuning.max_pdu_length)
            .strict(true)
            .read_timeout(self.settings.idle_timeout)
            .write_timeout(self.settings.idle_timeout);
        for a in syntax::ABSTRACT_SYNTAXES {
            options = options.with_abstract_syntax(*a);
        }
        for t in syntax::TRANSFER_SYNTAXES {
            options = options.with_transfer_syntax(*t);
        }
        let Some(tls) = &self.settings.tls else {
            match options.establish_async(socket).await {
                Ok(assoc) => self.established(assoc).await,
                Err(e) => info!(error = %e, "association not established"),
            }
            return;
        };
        let options = options.tls_config(tls.config.clone());
        let established = tokio::select! {
            r = tokio::time::timeout_at(deadline, options.establish_tls_async(socket)) => r,
            _ = self.shutdown.wait_for(|v| *v) => { debug!("shutdown during the TLS handshake"); return; }
        };
        match established {
            Ok(Ok(assoc)) => self.established(assoc).await,
            Err(_) => warn!(
                timeout_s = wait.as_secs(),
                "TLS handshake and association request not completed within the handshake timeout; connection dropped"
            ),
            Ok(Err(e @ dicom_ul::association::Error::TlsHandshake { .. })) => {
                warn!(error = %error_chain(&e), "TLS handshake failed; connection dropped")
            }
            Ok(Err(e)) => info!(error = %error_chain(&e), tls = true, "association not established"),
        }
    }

    /// Serves an established association (plain or TLS) to its end and reports the end.
    async fn established<S: Transport>(&mut self, mut assoc: AsyncServerAssociation<S>) {
        Span::current().record("calling_ae", assoc.peer_ae_title().trim());
        let contexts: HashMap<u8, Context> = assoc
            .presentation_contexts()
            .iter()
            .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
            .map(|pc| {
                (
                    pc.id,
                    Context {
                        abstract_syntax: syntax::trim_uid(&pc.abstract_syntax).to_string(),
                        transfer_syntax: syntax::trim_uid(&pc.transfer_syntax).to_string(),
                    },
                )
            })
            .collect();
        info!(
            accepted_contexts = contexts.len(),
            proposed_contexts = assoc.presentation_contexts().len(),
            peer_max_pdu = assoc.peer_max_pdu_length(),
            tls = self.settings.tls.is_some(),
            "association established"
        );

        let sender = format!("{}@{}", assoc.peer_ae_title().trim(), self.peer.ip());
        let _ = self.events.send(ReceiveEvent::Opened { association: self.id, sender }).await;
        let mut stats = Stats::default();
        let end = self.serve(&mut assoc, &contexts, &mut stats).await;
        let aborted = !matches!(end, End::Released);
        info!(?end, instances = stats.instances, failed = stats.failed, bytes = stats.bytes, "association ended");
        let _ = self.events.send(ReceiveEvent::Released { association: self.id, aborted }).await;
    }

    async fn serve<S: Transport>(
        &mut self,
        assoc: &mut AsyncServerAssociation<S>,
        contexts: &HashMap<u8, Context>,
        stats: &mut Stats,
    ) -> End {
        let mut assembler =
            MessageAssembler::with_budget(self.settings.max_message_bytes, self.settings.budget.clone());
        let max_pdu = self.settings.tuning.max_pdu_length;
        let quickack = self.settings.tuning.tcp_quickack;
        let mut stopping = false;
        loop {
            if !stopping && *self.shutdown.borrow() {
                stopping = true;
            }
            if stopping && assembler.is_idle() {
                info!("daemon stopping: aborting association between messages");
                abort(assoc).await;
                return End::WeAborted;
            }
            let next = tokio::select! {
                biased;
                // also resolves when the sender is gone: a daemon nobody can stop any more should stop
                _ = self.shutdown.wait_for(|v| *v), if !stopping => { stopping = true; continue; }
                r = tokio::time::timeout(self.settings.idle_timeout, read_pdu(assoc, max_pdu, quickack)) => r,
            };
            let pdu = match next {
                Err(_) => {
                    warn!(timeout_s = self.settings.idle_timeout.as_secs(), "no PDU within the idle timeout; aborting");
                    abort(assoc).await;
                    return End::WeAborted;
                }
                Ok(Err(ReadError::Closed)) => {
                    info!("peer closed the connection without release");
                    return End::PeerAborted;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "unreadable PDU; aborting");
                    abort(assoc).await;
                    return End::WeAborted;
                }
                Ok(Ok(pdu)) => pdu,
            };
            match pdu {
                Pdu::PData { data } => {
                    for pdv in data {
                        if !contexts.contains_key(&pdv.presentation_context_id) {
                            warn!(
                                context = pdv.presentation_context_id,
                                "P-DATA on a context that was not accepted; aborting"
                            );
                            abort(assoc).await;
                            return End::WeAborted;
                        }
                        let message = match assembler.push(pdv) {
                            Ok(None) => continue,
                            Ok(Some(m)) => m,
                            Err(e) => {
                                warn!(error = %e, "malformed DIMSE message; aborting");
                                abort(assoc).await;
                                return End::WeAborted;
                            }
                        };
                        if let Err(e) = self.dispatch(assoc, contexts, message, stats).await {
                            warn!(error = %e, "cannot answer; aborting");
                            abort(assoc).await;
                            return End::WeAborted;
                        }
                    }
                }
                Pdu::ReleaseRQ => {
                    if !assembler.is_idle() {
                        warn!("release requested in the middle of a message; the partial message is dropped");
                    }
                    if let Err(e) = assoc.send(&Pdu::ReleaseRP).await {
                        debug!(error = %e, "could not send A-RELEASE-RP");
                    }
                    let _ = assoc.inner_stream().shutdown().await;
                    return End::Released;
                }
                Pdu::AbortRQ { source } => {
                    info!(?source, "peer aborted the association");
                    return End::PeerAborted;
                }
                other => {
                    warn!(pdu = pdu_name(&other), "unexpected PDU; aborting");
                    abort(assoc).await;
                    return End::WeAborted;
                }
            }
        }
    }

    /// Runs one message's command handler and sends its response.
    async fn dispatch<S: Transport>(
        &self,
        assoc: &mut AsyncServerAssociation<S>,
        contexts: &HashMap<u8, Context>,
        message: Message,
        stats: &mut Stats,
    ) -> Result<(), AnswerError> {
        let Message { presentation_context_id: pc_id, command: request, payload, charge } = message;
        if request.is_response() {
            warn!(command_field = request.command_field, "peer sent a response; ignored");
            return Ok(());
        }
        if request.command_field == command::C_CANCEL_RQ {
            debug!("C-CANCEL ignored (no operation to cancel)");
            return Ok(());
        }
        if request.message_id.is_none() {
            return Err(AnswerError::Dimse(DimseError::CommandMissing("MessageID (0000,0110)")));
        }
        let ctx = &contexts[&pc_id];
        let response = match request.command_field {
            command::C_ECHO_RQ => {
                debug!("C-ECHO");
                echo::handle(&request)
            }
            command::C_STORE_RQ => {
                let bytes = match &payload {
                    super::dimse::Payload::Complete(d) => d.len() as u64,
                    _ => 0,
                };
                let store_ctx = StoreContext {
                    association: self.id,
                    calling_ae: assoc.peer_ae_title().trim(),
                    peer: self.peer,
                    abstract_syntax: &ctx.abstract_syntax,
                    transfer_syntax: &ctx.transfer_syntax,
                    events: &self.events,
                    max_message_bytes: self.settings.max_message_bytes,
                };
                let rsp = store::handle(store_ctx, &request, payload, charge).await;
                if status::is_stored(rsp.status.unwrap_or(status::PROCESSING_FAILURE)) {
                    stats.instances += 1;
                    stats.bytes += bytes;
                } else {
                    stats.failed += 1;
                }
                rsp
            }
            other => {
                warn!(command_field = format_args!("{other:#06X}"), "unrecognized DIMSE command");
                let mut rsp = CommandSet::response_to(&request, status::UNRECOGNIZED_OPERATION);
                rsp.error_comment = Some("operation not supported by this SCP".into());
                rsp
            }
        };
        let encoded = response.encode().map_err(AnswerError::Dimse)?;
        assoc
            .send(&Pdu::PData { data: vec![command_pdv(pc_id, encoded)] })
            .await
            .map_err(|e| AnswerError::Send(e.to_string()))?;
        // TLS buffers records that did not fit the socket at once; push the response out now (no-op on TCP).
        match tokio::time::timeout(self.settings.idle_timeout, assoc.inner_stream().flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AnswerError::Send(e.to_string())),
            Err(_) => Err(AnswerError::Send("flush timed out".into())),
        }
    }
}

/// Per-association counters for the closing log line.
#[derive(Debug, Default)]
struct Stats {
    /// Instances answered with success or warning.
    instances: u64,
    /// Instances answered with a failure.
    failed: u64,
    /// Dataset bytes of the stored instances.
    bytes: u64,
}

#[derive(Debug, thiserror::Error)]
enum AnswerError {
    #[error(transparent)]
    Dimse(DimseError),
    #[error("sending the response failed: {0}")]
    Send(String),
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Pdu(#[from] dicom_ul::pdu::ReadError),
}

/// Reads one PDU from the association's socket into its read buffer. Like dicom-ul's own receive, but it
/// re-arms TCP_QUICKACK after every read so a Nagle-enabled sender never waits for our delayed ACK, and it
/// keeps the buffer's spare capacity large enough for whole PDUs. Cancel-safe: bytes read stay buffered.
async fn read_pdu<S: Transport>(
    assoc: &mut AsyncServerAssociation<S>,
    max_pdu: u32,
    quickack: bool,
) -> Result<Pdu, ReadError> {
    let (socket, buf) = assoc.get_mut();
    loop {
        let mut cursor = Cursor::new(&buf[..]);
        if let Some(pdu) = dicom_ul::read_pdu(&mut cursor, max_pdu, true)? {
            let used = cursor.position() as usize;
            buf.advance(used);
            return Ok(pdu);
        }
        reserve(buf);
        let n = socket.read_buf(buf).await?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        if quickack {
            set_quickack(socket.tcp());
        }
    }
}

fn reserve(buf: &mut BytesMut) {
    const CHUNK: usize = 64 * 1024;
    if buf.capacity() - buf.len() < CHUNK {
        buf.reserve(CHUNK);
    }
}

/// Asks the kernel to acknowledge right away (Linux: also flushes an ACK it was delaying). The flag is not
/// sticky, hence re-armed after each read.
fn set_quickack(socket: &TcpStream) {
    #[cfg(target_os = "linux")]
    {
        let _ = socket2::SockRef::from(socket).set_tcp_quickack(true);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

fn abort_pdu() -> Pdu {
    Pdu::AbortRQ { source: AbortRQSource::ServiceProvider(AbortRQServiceProviderReason::ReasonNotSpecified) }
}

async fn abort<S: Transport>(assoc: &mut AsyncServerAssociation<S>) {
    let _ = assoc.send(&abort_pdu()).await;
    let _ = assoc.inner_stream().shutdown().await;
}

/// An error and its causes, `: `-separated (dicom-ul's TLS errors keep the rustls reason in a source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

fn pdu_name(pdu: &Pdu) -> &'static str {
    match pdu {
        Pdu::AssociationRQ(_) => "A-ASSOCIATE-RQ",
        Pdu::AssociationAC(_) => "A-ASSOCIATE-AC",
        Pdu::AssociationRJ(_) => "A-ASSOCIATE-RJ",
        Pdu::PData { .. } => "P-DATA-TF",
        Pdu::ReleaseRQ => "A-RELEASE-RQ",
        Pdu::ReleaseRP => "A-RELEASE-RP",
        Pdu::AbortRQ { .. } => "A-ABORT",
        Pdu::Unknown { .. } => "unknown",
    }
}
