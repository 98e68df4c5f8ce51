//! scu — the sending side of DICOM: C-STORE SCU ([`send_files`], scanner-paced replay) and C-ECHO SCU
//! ([`echo_peer`]).
//!
//! Owns: walking files and folders, reading each Part-10 file's meta group, proposing one presentation
//! context per (SOP class, transfer syntax) pair, sending each dataset exactly as stored when its transfer
//! syntax was accepted (re-encoding only between native syntaxes, which needs no pixel codec), pacing, and
//! the per-file outcome ([`SendReport`]).
//! Hands on: the [`SendReport`] to its caller: the daemon's DICOM outbox (`outputs::outbox`, which is why this
//! sits among the pipeline's modules and not in `tools/`), the `hil` harness, and `lungsentry send` / `echo`
//! (their options and printing are `tools::scu_cli`).
//! Never: decompresses or recompresses pixel data, or retries a file the peer refused.

use std::collections::HashSet;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dicom_dictionary_std::uids;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::meta::FileMetaTable;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::association::client::AsyncClientAssociation;
use dicom_ul::pdu::{PDataValueType, PresentationContextNegotiated};
use dicom_ul::{ClientAssociationOptions, Pdu};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::dicom::status;
use crate::receive::dimse::{command, command_pdv, CommandSet, MessageAssembler};
use crate::receive::syntax::{is_native, trim_uid};

/// Where and as whom to associate.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Host name or IP of the SCP.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// AE title we call.
    pub called_ae: String,
    /// AE title we present.
    pub calling_ae: String,
    /// Bound on connecting, negotiating and on each response.
    pub timeout: Duration,
}

/// What `send_files` does.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// The SCP.
    pub peer: Peer,
    /// Images per second; `None` sends as fast as the peer answers.
    pub rate: Option<f64>,
}

/// One file the peer stored.
#[derive(Debug, Clone)]
pub struct SentInstance {
    /// The file.
    pub path: PathBuf,
    /// Its SOP Instance UID.
    pub sop_instance_uid: String,
    /// The C-STORE status (success, or a B-range warning).
    pub status: u16,
}

/// One file that was not stored.
#[derive(Debug, Clone)]
pub struct FileFailure {
    /// The file.
    pub path: PathBuf,
    /// The peer's status when it answered, `None` when the file never got an answer.
    pub status: Option<u16>,
    /// Why, in words.
    pub reason: String,
}

/// Outcome of `send_files`.
#[derive(Debug, Default)]
pub struct SendReport {
    /// Files stored by the peer, in sending order.
    pub sent: Vec<SentInstance>,
    /// Files not stored.
    pub failed: Vec<FileFailure>,
    /// Non-DICOM files found while walking folders (not counted as failures), with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// Wall time from first association to last release.
    pub elapsed: Duration,
}

/// A file ready to send: what its meta group says.
#[derive(Debug, Clone)]
struct Candidate {
    /// The file.
    path: PathBuf,
    /// Media Storage SOP Class UID.
    sop_class: String,
    /// Media Storage SOP Instance UID.
    sop_instance: String,
    /// Transfer syntax of the stored dataset.
    transfer_syntax: String,
}

/// A proposed presentation context: SOP class and transfer syntaxes in preference order.
type Proposal = (String, Vec<String>);

/// DICOM allows 128 presentation contexts per association (odd ids 1..=255).
const MAX_CONTEXTS: usize = 128;

/// Sends `paths` (files, or folders walked recursively in name order) to the peer with C-STORE.
///
/// Files named directly that are not DICOM Part-10 files fail; such files found inside folders are skipped
/// (listed in [`SendReport::skipped`]). A file fails when the peer has no accepted presentation context
/// for it, answers a failure status, or the association breaks while it is in flight (the remaining files
/// then go on a new association). Errors only when nothing could be attempted (e.g. a path is missing).
/// File reads and re-encoding run on the blocking pool (never on a runtime worker, which the daemon shares with
/// the SCP answering C-ECHO and C-STORE).
pub async fn send_files(opts: &SendOptions, paths: &[PathBuf]) -> Result<SendReport> {
    let paths = paths.to_vec();
    let (mut report, candidates) = tokio::task::spawn_blocking(move || candidates_of(&paths))
        .await
        .map_err(|e| anyhow!("scanning the files to send: {e}"))??;

    let started = Instant::now();
    let mut pacer = Pacer::new(opts.rate);
    for batch in batches(&candidates) {
        send_batch(opts, &batch, &mut pacer, &mut report).await;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The sendable files among `paths` (folders walked), and a report holding those skipped or failed already.
/// Blocking.
fn candidates_of(paths: &[PathBuf]) -> Result<(SendReport, Vec<Candidate>)> {
    let mut report = SendReport::default();
    let mut candidates = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        if meta.is_dir() {
            for file in walk(path)? {
                match scan(&file) {
                    Ok(c) => candidates.push(c),
                    Err(e) => report.skipped.push((file, format!("{e:#}"))),
                }
            }
        } else {
            match scan(path) {
                Ok(c) => candidates.push(c),
                Err(e) => {
                    report.failed.push(FileFailure { path: path.clone(), status: None, reason: format!("{e:#}") })
                }
            }
        }
    }
    Ok((report, candidates))
}

/// Holds each send until its slot: file `i` goes at `start + i / rate`, so pacing does not drift.
struct Pacer {
    /// Seconds between images; `None` = unpaced.
    interval: Option<Duration>,
    /// Slot of the first image.
    start: Option<tokio::time::Instant>,
    /// Images released so far.
    count: u32,
}

impl Pacer {
    fn new(rate: Option<f64>) -> Self {
        let interval = rate.filter(|r| *r > 0.0 && r.is_finite()).map(|r| Duration::from_secs_f64(1.0 / r));
        Pacer { interval, start: None, count: 0 }
    }

    async fn wait(&mut self) {
        let Some(interval) = self.interval else { return };
        let start = *self.start.get_or_insert_with(tokio::time::Instant::now);
        tokio::time::sleep_until(start + interval * self.count).await;
        self.count += 1;
    }
}

/// Splits candidates into runs whose distinct proposals fit one association.
fn batches(candidates: &[Candidate]) -> Vec<Vec<Candidate>> {
    let mut out: Vec<Vec<Candidate>> = Vec::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut current = Vec::new();
    for c in candidates {
        let key = (c.sop_class.clone(), c.transfer_syntax.clone());
        if !seen.contains(&key) && seen.len() == MAX_CONTEXTS {
            out.push(std::mem::take(&mut current));
            seen.clear();
        }
        seen.insert(key);
        current.push(c.clone());
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Presentation contexts for a batch: per (SOP class, transfer syntax), the file's own syntax first, plus
/// Explicit and Implicit VR LE when the file's syntax is native (so a peer without it still gets the file,
/// re-encoded); a compressed file proposes only its own syntax, since we never transcode pixel data.
fn proposals(batch: &[Candidate]) -> Vec<Proposal> {
    let mut out: Vec<Proposal> = Vec::new();
    for c in batch {
        if out.iter().any(|(a, t)| *a == c.sop_class && t[0] == c.transfer_syntax) {
            continue;
        }
        let mut ts = vec![c.transfer_syntax.clone()];
        if is_native(&c.transfer_syntax) {
            for extra in [uids::EXPLICIT_VR_LITTLE_ENDIAN, uids::IMPLICIT_VR_LITTLE_ENDIAN] {
                if !ts.iter().any(|t| t == extra) {
                    ts.push(extra.to_string());
                }
            }
        }
        out.push((c.sop_class.clone(), ts));
    }
    out
}

async fn establish(peer: &Peer, proposals: &[Proposal]) -> Result<AsyncClientAssociation<TcpStream>> {
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(peer.calling_ae.clone())
        .called_ae_title(peer.called_ae.clone())
        .max_pdu_length(131_072 - 6)
        .read_timeout(peer.timeout)
        .write_timeout(peer.timeout)
        .connection_timeout(peer.timeout);
    for (abstract_syntax, ts) in proposals {
        options = options.with_presentation_context(abstract_syntax.clone(), ts.clone());
    }
    let addr = format!("{}:{}", peer.host, peer.port);
    let mut assoc = options
        .establish_async(addr.as_str())
        .await
        .with_context(|| format!("associating with {} at {addr}", peer.called_ae))?;
    assoc.inner_stream().set_nodelay(true).context("setting TCP_NODELAY")?;
    Ok(assoc)
}

async fn send_batch(opts: &SendOptions, batch: &[Candidate], pacer: &mut Pacer, report: &mut SendReport) {
    let proposals = proposals(batch);
    let mut assoc: Option<AsyncClientAssociation<TcpStream>> = None;
    let mut message_id: u16 = 0;
    for (i, c) in batch.iter().enumerate() {
        if assoc.is_none() {
            match establish(&opts.peer, &proposals).await {
                Ok(a) => {
                    info!(contexts = a.presentation_contexts().len(), "association established");
                    assoc = Some(a);
                }
                Err(e) => {
                    let reason = format!("{e:#}");
                    for rest in &batch[i..] {
                        report.failed.push(FileFailure {
                            path: rest.path.clone(),
                            status: None,
                            reason: reason.clone(),
                        });
                    }
                    return;
                }
            }
        }
        let a = assoc.as_mut().expect("established above");
        message_id = message_id.wrapping_add(1).max(1);
        pacer.wait().await;
        match store_one(a, c, message_id, opts.peer.timeout).await {
            Ok(Outcome::Stored(code)) => report.sent.push(SentInstance {
                path: c.path.clone(),
                sop_instance_uid: c.sop_instance.clone(),
                status: code,
            }),
            Ok(Outcome::Refused(code, comment)) => {
                let reason = match comment {
                    Some(text) => format!("peer answered status {code:#06X} ({text})"),
                    None => format!("peer answered status {code:#06X}"),
                };
                report.failed.push(FileFailure { path: c.path.clone(), status: Some(code), reason });
            }
            Ok(Outcome::NotSent(reason)) => {
                report.failed.push(FileFailure { path: c.path.clone(), status: None, reason });
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "association broke; continuing on a new one");
                report.failed.push(FileFailure { path: c.path.clone(), status: None, reason: format!("{e:#}") });
                if let Some(a) = assoc.take() {
                    let _ = a.abort().await;
                }
            }
        }
    }
    if let Some(a) = assoc {
        if let Err(e) = a.release().await {
            debug!(error = %e, "release did not complete cleanly");
        }
    }
}

/// What happened to one file on a working association.
enum Outcome {
    /// Stored, with this (success or warning) status.
    Stored(u16),
    /// The peer answered a failure status, with its error comment.
    Refused(u16, Option<String>),
    /// Not sent (no usable presentation context, unreadable file, ...); the association is still fine.
    NotSent(String),
}

/// Sends one file; `Err` means the association is no longer usable.
async fn store_one(
    assoc: &mut AsyncClientAssociation<TcpStream>,
    c: &Candidate,
    message_id: u16,
    timeout: Duration,
) -> Result<Outcome> {
    let Some((pc, target_ts)) = choose_context(assoc.presentation_contexts(), c) else {
        return Ok(Outcome::NotSent(format!(
            "peer accepted no presentation context for SOP class {} in transfer syntax {} (or one we can re-encode to)",
            c.sop_class, c.transfer_syntax
        )));
    };
    let (path, file_ts, to_ts) = (c.path.clone(), c.transfer_syntax.clone(), target_ts.clone());
    let loaded = tokio::task::spawn_blocking(move || load_dataset(&path, &file_ts, &to_ts))
        .await
        .map_err(|e| anyhow!("reading {}: {e}", c.path.display()))?;
    let dataset = match loaded {
        Ok(d) => d,
        Err(e) => return Ok(Outcome::NotSent(format!("{e:#}"))),
    };
    let cmd = CommandSet::store_rq(message_id, &c.sop_class, &c.sop_instance).encode()?;
    tokio::time::timeout(timeout, async {
        assoc.send(&Pdu::PData { data: vec![command_pdv(pc, cmd)] }).await?;
        let mut writer = assoc.send_pdata(pc);
        writer.write_all(&dataset).await?;
        writer.finish().await?;
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow!("timed out sending {}", c.path.display()))??;
    let rsp = receive_response(assoc, message_id, command::C_STORE_RSP, timeout).await?;
    let code = rsp.status.ok_or_else(|| anyhow!("C-STORE-RSP without status"))?;
    if status::is_stored(code) {
        if code != status::SUCCESS {
            warn!(path = %c.path.display(), status = format_args!("{code:#06X}"), "stored with warning");
        }
        Ok(Outcome::Stored(code))
    } else {
        Ok(Outcome::Refused(code, rsp.error_comment.filter(|s| !s.trim().is_empty())))
    }
}

/// The accepted context to use for a file: one in the file's own transfer syntax, else (for a native file)
/// one in another native syntax. Returns its id and transfer syntax.
fn choose_context(contexts: &[PresentationContextNegotiated], c: &Candidate) -> Option<(u8, String)> {
    let for_class = || contexts.iter().filter(|pc| trim_uid(&pc.abstract_syntax) == c.sop_class);
    for_class()
        .find(|pc| trim_uid(&pc.transfer_syntax) == c.transfer_syntax)
        .or_else(|| {
            if is_native(&c.transfer_syntax) {
                for_class().find(|pc| is_native(&pc.transfer_syntax))
            } else {
                None
            }
        })
        .map(|pc| (pc.id, trim_uid(&pc.transfer_syntax).to_string()))
}

/// Waits for the response to `message_id`, answering an A-RELEASE-RQ or abort from the peer with an error.
async fn receive_response(
    assoc: &mut AsyncClientAssociation<TcpStream>,
    message_id: u16,
    expected_field: u16,
    timeout: Duration,
) -> Result<CommandSet> {
    let mut assembler = MessageAssembler::new(1 << 20);
    loop {
        let pdu = tokio::time::timeout(timeout, assoc.receive())
            .await
            .map_err(|_| anyhow!("no response within {:?}", timeout))??;
        match pdu {
            Pdu::PData { data } => {
                for pdv in data {
                    if pdv.value_type == PDataValueType::Data && assembler.is_idle() {
                        bail!("peer sent a dataset where a response was expected");
                    }
                    if let Some(message) = assembler.push(pdv)? {
                        let rsp = message.command;
                        if rsp.command_field == expected_field && rsp.message_id_being_responded_to == Some(message_id)
                        {
                            return Ok(rsp);
                        }
                        warn!(command_field = rsp.command_field, "ignoring an unexpected message from the peer");
                    }
                }
            }
            Pdu::AbortRQ { source } => bail!("peer aborted the association ({source:?})"),
            Pdu::ReleaseRQ => {
                let _ = assoc.send(&Pdu::ReleaseRP).await;
                bail!("peer released the association before answering");
            }
            other => bail!("unexpected PDU from peer: {other:?}"),
        }
    }
}

/// Reads a Part-10 file's meta group from its start (with or without the 128-byte preamble). Returns the
/// meta table and the offset of the dataset.
fn read_meta(bytes: &[u8]) -> Result<(FileMetaTable, usize)> {
    let start = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        128
    } else if bytes.len() >= 4 && &bytes[0..4] == b"DICM" {
        0
    } else {
        bail!("not a DICOM Part-10 file (no DICM marker)");
    };
    let mut cursor = Cursor::new(&bytes[start..]);
    let meta = FileMetaTable::from_reader(&mut cursor).context("reading the file meta group")?;
    Ok((meta, start + cursor.position() as usize))
}

/// Reads just enough of a file to know what to propose for it.
fn scan(path: &Path) -> Result<Candidate> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    // The meta group is small; 64 KiB covers any real one (private information included).
    let mut head = Vec::with_capacity(64 * 1024);
    file.take(64 * 1024).read_to_end(&mut head).with_context(|| format!("reading {}", path.display()))?;
    crate::dicom::check_meta_group(&head, file_len).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let (meta, _) = read_meta(&head).with_context(|| format!("{}", path.display()))?;
    let candidate = Candidate {
        path: path.to_path_buf(),
        sop_class: meta.media_storage_sop_class_uid().to_string(),
        sop_instance: meta.media_storage_sop_instance_uid().to_string(),
        transfer_syntax: meta.transfer_syntax().to_string(),
    };
    if candidate.sop_class.is_empty() || candidate.sop_instance.is_empty() {
        bail!("{}: meta group lacks the SOP class or instance UID", path.display());
    }
    Ok(candidate)
}

/// The dataset bytes to send: as stored when `target_ts` is the file's own, else re-encoded (native only).
fn load_dataset(path: &Path, file_ts: &str, target_ts: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    crate::dicom::check_meta_group(&bytes, bytes.len() as u64).map_err(|e| anyhow::anyhow!(e))?;
    let (_, offset) = read_meta(&bytes)?;
    if file_ts == target_ts {
        let mut bytes = bytes;
        bytes.drain(..offset);
        return Ok(bytes);
    }
    let from = TransferSyntaxRegistry.get(file_ts).ok_or_else(|| anyhow!("unknown transfer syntax {file_ts}"))?;
    let to = TransferSyntaxRegistry.get(target_ts).ok_or_else(|| anyhow!("unknown transfer syntax {target_ts}"))?;
    if !(is_native(file_ts) && is_native(target_ts)) {
        bail!("cannot re-encode {file_ts} to {target_ts} without a pixel codec");
    }
    let obj = InMemDicomObject::read_dataset_with_ts(&bytes[offset..], from)
        .with_context(|| format!("parsing {} for re-encoding", path.display()))?;
    let mut out = Vec::with_capacity(bytes.len());
    obj.write_dataset_with_ts(&mut out, to)
        .with_context(|| format!("re-encoding {} as {target_ts}", path.display()))?;
    debug!(path = %path.display(), from = file_ts, to = target_ts, "re-encoded");
    Ok(out)
}

/// Files under `dir`, recursively, in path order.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&d)
            .with_context(|| format!("listing {}", d.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Asks the peer for a C-ECHO; `Ok` when it answers success.
pub async fn echo_peer(peer: &Peer) -> Result<()> {
    let proposals = vec![(
        uids::VERIFICATION.to_string(),
        vec![uids::IMPLICIT_VR_LITTLE_ENDIAN.to_string(), uids::EXPLICIT_VR_LITTLE_ENDIAN.to_string()],
    )];
    let mut assoc = establish(peer, &proposals).await?;
    let pc = assoc.presentation_contexts()[0].id;
    let cmd = CommandSet::echo_rq(1).encode()?;
    assoc.send(&Pdu::PData { data: vec![command_pdv(pc, cmd)] }).await?;
    let rsp = receive_response(&mut assoc, 1, command::C_ECHO_RSP, peer.timeout).await?;
    let _ = assoc.release().await;
    match rsp.status {
        Some(status::SUCCESS) => Ok(()),
        Some(code) => bail!("C-ECHO answered status {code:#06X}"),
        None => bail!("C-ECHO-RSP without status"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(class: &str, ts: &str) -> Candidate {
        Candidate { path: "x".into(), sop_class: class.into(), sop_instance: "1.2".into(), transfer_syntax: ts.into() }
    }

    #[test]
    fn proposals_group_by_class_and_syntax() {
        let b = vec![
            cand("1.1", uids::EXPLICIT_VR_LITTLE_ENDIAN),
            cand("1.1", uids::EXPLICIT_VR_LITTLE_ENDIAN),
            cand("1.1", uids::JPEG2000_LOSSLESS),
            cand("1.2", uids::IMPLICIT_VR_LITTLE_ENDIAN),
        ];
        let p = proposals(&b);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].1, vec![uids::EXPLICIT_VR_LITTLE_ENDIAN, uids::IMPLICIT_VR_LITTLE_ENDIAN]);
        assert_eq!(p[1].1, vec![uids::JPEG2000_LOSSLESS]);
        assert_eq!(p[2].1, vec![uids::IMPLICIT_VR_LITTLE_ENDIAN, uids::EXPLICIT_VR_LITTLE_ENDIAN]);
    }

    #[test]
    fn batches_respect_the_context_limit() {
        let many: Vec<Candidate> = (0..300).map(|i| cand(&format!("1.{}", i % 200), "1.2.840.10008.1.2")).collect();
        let b = batches(&many);
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 300);
        for batch in &b {
            assert!(proposals(batch).len() <= MAX_CONTEXTS);
        }
    }

    #[test]
    fn non_dicom_is_rejected() {
        assert!(read_meta(b"hello world, not dicom at all").is_err());
    }
}
