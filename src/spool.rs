//! spool — makes every received instance durable before the sender is told "success".
//!
//! Owns: checking that a C-STORE dataset can be used at all (parses in its transfer syntax with every length
//! bounded by the bytes actually received, carries the UIDs, matches the command, has enough pixel bytes), and
//! writing it as a DICOM Part-10 file — our file meta group followed by the received dataset bytes *verbatim* —
//! through a temporary file, `fsync`, atomic rename and a directory `fsync`. Only after [`Spool::store`] returns
//! `Ok` may the SCP answer 0000: nothing acknowledged is ever lost. A Deflated Explicit VR LE dataset is
//! inflated (size-capped) and stored as the Explicit VR LE dataset it wraps.
//! Hands on: a [`SpooledInstance`] (routing attributes + file path) that `store` records and `series` groups.
//! The length walk and the meta group check are [`crate::dicom`]'s (shared with `receive` and `scu`).
//! Never: re-encodes or decodes pixel data, touches the database, or knows when a series is complete.
//!
//! On-disk layout (all directories mode 0700, files 0600):
//!
//! ```text
//! <data_dir>/spool/tmp/                          partially written files (removed at open)
//! <data_dir>/spool/<h[0..2]>/<h[0..16]>/<sop>.dcm  h = hex sha256(SeriesInstanceUID)
//! ```
//!
//! (The layout is [`crate::datadir::DataDir`]'s: `<sop>` is the SOP Instance UID — validated at receive — or
//! the hash of a value that is not one; a peer never steers the path.)
//!
//! A repeated SOP Instance UID replaces the earlier file atomically (same series ⇒ same path); a repeat whose
//! file would be byte-for-byte the stored one is not written again ([`SpooledInstance::unchanged_since_ms`]), so
//! `store` can tell a sender's retry from new content.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::{Codec, Endianness, TransferSyntaxIndex};
use dicom_object::{FileDicomObject, FileMetaTableBuilder, InMemDicomObject};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::dicom::{check_lengths, check_meta_group, status, DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_LE, IMPLICIT_VR_LE};
use crate::instance::InstanceMeta;
use crate::receive::IncomingInstance;

/// Our Implementation Class UID: `2.25.` + the decimal form of a fixed random 128-bit value (ISO/IEC 9834-8
/// UUID-derived root, so no registration is needed). Never change it: files written by earlier versions carry it.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.218337455914981707327163553066519470731";
/// Implementation Version Name written into every file meta group (max 16 characters).
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("LSENTRY_", env!("CARGO_PKG_VERSION"));

/// Why an instance was not spooled; each maps to the DIMSE status the SCP answers with.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The dataset cannot be used: unparseable, not DICOM, missing UIDs or pixel data (→ 0xC000).
    #[error("cannot understand dataset: {0}")]
    CannotUnderstand(String),
    /// The dataset contradicts the C-STORE command (SOP Instance/Class UID differ) (→ 0xA900).
    #[error("dataset does not match the command: {0}")]
    DatasetMismatch(String),
    /// The spool could not make the instance durable: disk full, quota, I/O error, permissions (→ 0xA700).
    #[error("spool out of resources while {0}: {1}")]
    OutOfResources(String, #[source] io::Error),
}

impl SpoolError {
    /// What the sender is told (the C-STORE-RSP's Error Comment): the reason for a dataset it sent wrong, never a
    /// local path or I/O detail for a failure of ours.
    pub fn reason_for_peer(&self) -> String {
        match self {
            SpoolError::CannotUnderstand(why) | SpoolError::DatasetMismatch(why) => why.clone(),
            SpoolError::OutOfResources(..) => "receiver could not store it now; retry later".into(),
        }
    }

    /// The DIMSE status for the C-STORE-RSP (constants of [`crate::dicom::status`]).
    pub fn status(&self) -> u16 {
        match self {
            SpoolError::CannotUnderstand(_) => status::CANNOT_UNDERSTAND,
            SpoolError::DatasetMismatch(_) => status::DATASET_DOES_NOT_MATCH_SOP_CLASS,
            SpoolError::OutOfResources(..) => status::OUT_OF_RESOURCES,
        }
    }
}

/// One instance made durable: what `store` records and `series` groups by (defined in the store, which needs
/// nothing from the spool).
pub use crate::store::SpooledInstance;

/// The spool directory. Cheap to share (`Arc<Spool>`); [`Spool::store`] is safe to call concurrently.
#[derive(Debug)]
pub struct Spool {
    /// `<data_dir>/spool`: root of the series directories.
    root: PathBuf,
    /// `<data_dir>/spool/tmp`: files being written; same filesystem as `root` so rename is atomic.
    tmp: PathBuf,
    /// Distinguishes concurrent temporary files of this process.
    counter: AtomicU64,
    /// Largest dataset accepted after inflating a Deflated Explicit VR LE one (a deflate bomb stops here).
    max_dataset_bytes: usize,
    /// The data dir's layout: where each instance's file goes.
    layout: crate::datadir::DataDir,
}

/// Default for [`Spool::with_max_dataset_bytes`]: the default `dicom.max_message_mb`.
pub const DEFAULT_MAX_DATASET_BYTES: usize = 256 << 20;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SpoolError {
    let what = what.into();
    move |e| SpoolError::OutOfResources(what, e)
}

/// Creates `dir` (and parents) with mode 0700; an existing directory keeps its mode.
fn make_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// `fsync` of a directory, so a rename/create inside it survives power loss.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Spool {
    /// Opens (creating if needed) `<data_dir>/spool` and `<data_dir>/spool/tmp`, mode 0700, and removes
    /// temporary files left by a crash (they were never acknowledged, so nothing is lost).
    pub fn open(data_dir: &Path) -> anyhow::Result<Spool> {
        use anyhow::Context;
        let layout = crate::datadir::DataDir::new(data_dir);
        let (root, tmp) = (layout.spool_root(), layout.spool_tmp());
        make_dir(&tmp).with_context(|| format!("creating spool directory {}", tmp.display()))?;
        for d in [&root, &tmp] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("setting mode 0700 on {}", d.display()))?;
        }
        let mut removed = 0usize;
        for entry in fs::read_dir(&tmp).with_context(|| format!("listing {}", tmp.display()))? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::remove_file(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "spool: removed unacknowledged temporary files left by an earlier run");
        }
        Ok(Spool { root, tmp, counter: AtomicU64::new(0), max_dataset_bytes: DEFAULT_MAX_DATASET_BYTES, layout })
    }

    /// Caps the size of an inflated Deflated Explicit VR LE dataset (use `dicom.max_message_mb`).
    pub fn with_max_dataset_bytes(mut self, bytes: usize) -> Spool {
        self.max_dataset_bytes = bytes;
        self
    }

    /// The spool root (`<data_dir>/spool`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where an instance of `series_uid` with `sop_uid` lives in the spool.
    pub fn path_for(&self, series_uid: &str, sop_uid: &str) -> PathBuf {
        self.layout.spool_instance(series_uid, sop_uid)
    }

    /// Validates `inc` and writes it durably; blocking (call from `spawn_blocking`).
    ///
    /// `Ok` means the file and its directory entry are on stable storage: the SCP may answer 0000.
    /// `Err(e)`: answer `e.status()`; nothing was left behind in the spool.
    ///
    /// A Deflated Explicit VR LE dataset is inflated (at most `max_dataset_bytes`) and stored as the Explicit VR
    /// LE dataset it wraps — lossless, and readers never inflate a peer's stream again.
    pub fn store(&self, inc: &IncomingInstance) -> Result<SpooledInstance, SpoolError> {
        let mut ts_uid = inc.transfer_syntax_uid.trim_end_matches(['\0', ' ']).to_string();
        let inflated;
        let dataset: &[u8] = if ts_uid == DEFLATED_EXPLICIT_VR_LE {
            inflated = inflate(&inc.dataset, self.max_dataset_bytes)?;
            ts_uid = EXPLICIT_VR_LE.to_string();
            &inflated
        } else {
            &inc.dataset
        };
        let meta = validate(inc, dataset, &ts_uid)?;
        let final_path = self.path_for(&meta.series_instance_uid, &meta.sop_instance_uid);
        let header = part10_header(&meta, &ts_uid)?;
        let bytes = (header.len() + dataset.len()) as u64;
        if let Some(written_ms) = identical_file(&final_path, &header, dataset) {
            // Already stored; sync it again in case the store that wrote it failed before its directory sync.
            let sync = || -> io::Result<()> {
                File::open(&final_path)?.sync_all()?;
                sync_dir(final_path.parent().expect("spool paths have a parent"))
            };
            sync().map_err(io_err(format!("fsync of {}", final_path.display())))?;
            return Ok(SpooledInstance {
                meta,
                path: final_path,
                transfer_syntax_uid: ts_uid,
                bytes,
                unchanged_since_ms: Some(written_ms),
            });
        }
        self.write_durably(&final_path, &header, dataset)?;
        Ok(SpooledInstance { meta, path: final_path, transfer_syntax_uid: ts_uid, bytes, unchanged_since_ms: None })
    }

    fn write_durably(&self, final_path: &Path, header: &[u8], dataset: &[u8]) -> Result<u64, SpoolError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp_path = self.tmp.join(format!("{}-{n}.part", std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp_path)
                .map_err(io_err(format!("creating {}", tmp_path.display())))?;
            f.write_all(header).map_err(io_err("writing file meta"))?;
            f.write_all(dataset).map_err(io_err("writing dataset"))?;
            f.sync_all().map_err(io_err("fsync of the instance file"))?;
            drop(f);
            let dir = final_path.parent().expect("spool paths have a parent");
            let created_dir = !dir.exists();
            make_dir(dir).map_err(io_err(format!("creating {}", dir.display())))?;
            fs::rename(&tmp_path, final_path).map_err(io_err(format!("renaming into {}", final_path.display())))?;
            sync_dir(dir).map_err(io_err("fsync of the series directory"))?;
            if created_dir {
                // New series directories must themselves survive a crash: sync their parents too.
                for d in [dir.parent().unwrap_or(&self.root), &self.root] {
                    sync_dir(d).map_err(io_err("fsync of the spool directory"))?;
                }
            }
            Ok((header.len() + dataset.len()) as u64)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp_path);
        }
        result
    }
}

/// When `path` holds exactly `header` followed by `dataset`: the file's modification time (ms since the Unix
/// epoch). Any error reading it means "not identical" (the caller then writes the file as usual).
fn identical_file(path: &Path, header: &[u8], dataset: &[u8]) -> Option<i64> {
    let md = fs::metadata(path).ok()?;
    if !md.is_file() || md.len() != (header.len() + dataset.len()) as u64 {
        return None;
    }
    // Compared a block at a time: a retry of a large instance must not hold a second copy of it in memory.
    let mut f = File::open(path).ok()?;
    let mut block = vec![0u8; 1 << 20];
    for part in [header, dataset] {
        for want in part.chunks(block.len()) {
            let got = &mut block[..want.len()];
            f.read_exact(got).ok()?;
            if got != want {
                return None;
            }
        }
    }
    if f.read(&mut block[..1]).ok()? != 0 {
        return None;
    }
    let mtime = md.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(mtime.as_millis()).ok()
}

/// Preamble + "DICM" + our file meta group, ready to be followed by the dataset bytes: the head of every spooled
/// file (a peer sends only the dataset; the meta group is always ours).
pub fn part10_header(meta: &InstanceMeta, ts_uid: &str) -> Result<Vec<u8>, SpoolError> {
    let table = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(meta.sop_class_uid.as_str())
        .media_storage_sop_instance_uid(meta.sop_instance_uid.as_str())
        .transfer_syntax(ts_uid)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
        .build()
        .map_err(|e| SpoolError::CannotUnderstand(format!("cannot build file meta group: {e}")))?;
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    table.write(&mut out).map_err(|e| SpoolError::CannotUnderstand(format!("cannot encode file meta group: {e}")))?;
    Ok(out)
}

/// Inflates a raw DEFLATE stream (PS3.5 §A.5: no zlib header), refusing more than `limit` bytes of output.
fn inflate(data: &[u8], limit: usize) -> Result<Vec<u8>, SpoolError> {
    use std::io::Read;
    let cu = SpoolError::CannotUnderstand;
    let mut out = Vec::new();
    let mut reader = flate2::read::DeflateDecoder::new(data).take(limit as u64 + 1);
    reader.read_to_end(&mut out).map_err(|e| cu(format!("deflated dataset does not inflate: {e}")))?;
    if out.len() > limit {
        return Err(cu(format!("deflated dataset inflates past the {limit}-byte limit")));
    }
    Ok(out)
}

/// Every check before anything is written; returns the routing attributes. `dataset` is `inc.dataset`, or
/// its inflated form (then `ts_uid` is Explicit VR LE).
fn validate(inc: &IncomingInstance, dataset: &[u8], ts_uid: &str) -> Result<InstanceMeta, SpoolError> {
    let meta = check_dataset(dataset, ts_uid, Some(&inc.sop_class_uid))?;
    let cmd_sop = inc.sop_instance_uid.trim_end_matches(['\0', ' ']);
    if meta.sop_instance_uid != cmd_sop {
        return Err(SpoolError::DatasetMismatch(format!(
            "command SOP Instance UID {cmd_sop:?} but dataset carries {:?}",
            meta.sop_instance_uid
        )));
    }
    let cmd_class = inc.sop_class_uid.trim_end_matches(['\0', ' ']);
    if !cmd_class.is_empty() && meta.sop_class_uid != cmd_class {
        return Err(SpoolError::DatasetMismatch(format!(
            "command SOP Class UID {cmd_class:?} but dataset carries {:?}",
            meta.sop_class_uid
        )));
    }
    Ok(meta)
}

/// The checks on a dataset alone, in transfer syntax `ts_uid` (not deflated): known, not dataset-compressed,
/// every element length against the bytes that follow, parseable, routing attributes present
/// ([`InstanceMeta::from_received`]: Study, Series and SOP Instance UIDs absent or blank in the dataset are
/// refused, never taken from the command or derived; only a blank SOP Class UID takes the command's), and for CT
/// images the Pixel Data checks. Only a dataset that passes is ever spooled, so the instance files the series
/// workers decode have all passed it (the `dataset_to_hu` fuzz target runs it before decoding for the same reason).
pub fn check_dataset(dataset: &[u8], ts_uid: &str, sop_class_hint: Option<&str>) -> Result<InstanceMeta, SpoolError> {
    let cu = SpoolError::CannotUnderstand;
    let ts = TransferSyntaxRegistry.get(ts_uid).ok_or_else(|| cu(format!("unknown transfer syntax {ts_uid:?}")))?;
    if matches!(ts.codec(), Codec::Dataset(_)) {
        return Err(cu(format!("dataset-compressed transfer syntax {} is not supported", ts.name())));
    }
    if dataset.is_empty() {
        return Err(cu("empty dataset".into()));
    }
    let big_endian = matches!(ts.endianness(), Endianness::Big);
    check_lengths(dataset, ts_uid != IMPLICIT_VR_LE, big_endian).map_err(cu)?;
    let obj = InMemDicomObject::read_dataset_with_ts(dataset, ts)
        .map_err(|e| cu(format!("unparseable dataset in {}: {e}", ts.name())))?;
    let meta = InstanceMeta::from_received(&obj, sop_class_hint).map_err(|e| cu(e.to_string()))?;
    if meta.is_ct_image_class() {
        check_pixel_data(&obj, &meta, ts.is_encapsulated_pixel_data())?;
    }
    Ok(meta)
}

fn uint(obj: &InMemDicomObject, tag: Tag) -> Option<u64> {
    obj.element(tag).ok().and_then(|e| e.to_int::<u64>().ok())
}

/// For CT image classes: Pixel Data present; encapsulated only in an encapsulated transfer syntax, with at least
/// one fragment per frame; Rows and Columns within what `decode` accepts (so no decoder is ever handed an
/// image claiming gigabytes); native Pixel Data long enough for the image it claims. All arithmetic in u64
/// with overflow checks; nothing is allocated.
fn check_pixel_data(obj: &InMemDicomObject, meta: &InstanceMeta, encapsulated_ts: bool) -> Result<(), SpoolError> {
    let cu = SpoolError::CannotUnderstand;
    let pixel = obj.element(tags::PIXEL_DATA).map_err(|_| cu("no PixelData".into()))?;
    let rows = uint(obj, tags::ROWS).ok_or_else(|| cu("image without Rows".into()))?;
    let cols = uint(obj, tags::COLUMNS).ok_or_else(|| cu("image without Columns".into()))?;
    for (tag, name) in [(tags::ROWS, "Rows"), (tags::COLUMNS, "Columns"), (tags::BITS_ALLOCATED, "BitsAllocated")] {
        if let Ok(e) = obj.element(tag) {
            if e.vr() != dicom_core::VR::US {
                return Err(cu(format!("{name} has VR {} (must be US)", e.vr())));
            }
        }
    }
    let max = u64::from(crate::decode::MAX_DIMENSION);
    if rows > max || cols > max {
        return Err(cu(format!("CT image of {rows}x{cols} pixels exceeds {max} in a dimension")));
    }
    let frames = u64::from(meta.number_of_frames.max(1));
    if let Some(fragments) = pixel.value().fragments() {
        if !encapsulated_ts {
            return Err(cu("encapsulated PixelData in a native transfer syntax".into()));
        }
        if fragments.is_empty() || fragments.iter().all(|f| f.is_empty()) {
            return Err(cu("encapsulated PixelData has no fragments".into()));
        }
        if frames > fragments.len() as u64 {
            return Err(cu(format!("{frames} frames claimed but only {} fragments", fragments.len())));
        }
        if rows == 0 || cols == 0 {
            return Err(cu(format!("degenerate image {rows}x{cols}")));
        }
        return Ok(());
    }
    if encapsulated_ts {
        return Err(cu("native PixelData in an encapsulated transfer syntax".into()));
    }
    let bits = uint(obj, tags::BITS_ALLOCATED).ok_or_else(|| cu("image without BitsAllocated".into()))?;
    let spp = uint(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    if rows == 0 || cols == 0 || bits == 0 || spp == 0 {
        return Err(cu(format!("degenerate image {rows}x{cols}, {bits} bits, {spp} samples")));
    }
    let need_bits = [cols, bits, spp, frames]
        .iter()
        .try_fold(rows, |acc, &x| acc.checked_mul(x))
        .ok_or_else(|| cu("image dimensions overflow".into()))?;
    let need = need_bits.div_ceil(8);
    let have = match pixel.value().primitive() {
        Some(p) => p.calculate_byte_len() as u64,
        None => return Err(cu("PixelData is neither native nor encapsulated".into())),
    };
    if have < need {
        return Err(cu(format!(
            "PixelData has {have} bytes, {rows}x{cols}x{spp} samples of {bits} bits x {frames} frames need {need}"
        )));
    }
    Ok(())
}

/// Reads a spooled Part-10 file back (for `decode`, `analyze` and tests).
pub fn read_instance(path: &Path) -> anyhow::Result<FileDicomObject<InMemDicomObject>> {
    use anyhow::Context;
    use std::io::Read;
    // `analyze`, `eval` and `hil` read operator-supplied files through here too: check the meta group's lengths
    // against the file before dicom-rs allocates them (it reserves a meta element's declared length up front).
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut head = Vec::with_capacity(64 * 1024);
    (&mut file).take(64 * 1024).read_to_end(&mut head).with_context(|| format!("reading {}", path.display()))?;
    check_meta_group(&head, len).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    // One open, one read: the parser gets the head already read, then the rest of the same handle.
    dicom_object::OpenFileOptions::new()
        .from_reader(std::io::Cursor::new(head).chain(file))
        .with_context(|| format!("reading DICOM file {}", path.display()))
}
