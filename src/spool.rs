//! spool — makes every received instance durable before the sender is told "success".
//!
//! Owns: checking that a C-STORE dataset can be used at all (parses in its transfer syntax with every length
//! bounded by the bytes actually received, carries the UIDs, matches the command, has enough pixel bytes), and
//! writing it as a DICOM Part-10 file — our file meta group followed by the received dataset bytes *verbatim* —
//! through a temporary file, `fsync`, atomic rename and a directory `fsync`. Only after [`Spool::store`] returns
//! `Ok` may the SCP answer 0000: nothing acknowledged is ever lost. A Deflated Explicit VR LE dataset is
//! inflated (size-capped) and stored as the Explicit VR LE dataset it wraps.
//! Hands on: a [`SpooledInstance`] (routing attributes + file path) that `store` records and `series` groups.
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

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::{Codec, Endianness, TransferSyntaxIndex};
use dicom_object::{FileDicomObject, FileMetaTableBuilder, InMemDicomObject};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::instance::InstanceMeta;
use crate::receive::{status, IncomingInstance};

/// Our Implementation Class UID: `2.25.` + the decimal form of a fixed random 128-bit value (ISO/IEC 9834-8
/// UUID-derived root, so no registration is needed). Never change it: files written by earlier versions carry it.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.218337455914981707327163553066519470731";
/// Implementation Version Name written into every file meta group (max 16 characters).
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("LSENTRY_", env!("CARGO_PKG_VERSION"));

/// Implicit VR Little Endian, the only standard transfer syntax without explicit VRs.
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Deepest sequence nesting the bounds check walks before refusing the dataset.
const MAX_NESTING: usize = 32;

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

    /// The DIMSE status for the C-STORE-RSP (constants of [`crate::receive::status`]).
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
/// Deflated Explicit VR Little Endian.
const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";
/// Explicit VR Little Endian: what an inflated dataset is stored as.
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

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
/// one fragment per frame; Rows and Columns within what `preprocess` decodes (so no decoder is ever handed an
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
    let max = u64::from(crate::preprocess::MAX_DIMENSION);
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

/// Walks every element header of an encoded dataset and checks each defined length against the bytes that
/// actually follow, before the parser sees it. The parser allocates (and zero-fills) a value's declared
/// length up front, so a header claiming 4 GiB in a 1 KiB message must be refused here, not allocated there.
fn check_lengths(data: &[u8], explicit: bool, big_endian: bool) -> Result<(), String> {
    let mut w = Walker { data, explicit, big_endian };
    let mut pos = 0usize;
    w.elements(&mut pos, data.len(), 0, false)
}

/// Cursor state of [`check_lengths`].
struct Walker<'a> {
    /// The whole dataset.
    data: &'a [u8],
    /// Explicit VR encoding (every standard TS except Implicit VR LE).
    explicit: bool,
    /// Explicit VR Big Endian (retired, still registered).
    big_endian: bool,
}

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQ_END: (u16, u16) = (0xFFFE, 0xE0DD);

impl Walker<'_> {
    fn u16_at(&self, p: usize) -> u16 {
        let b = [self.data[p], self.data[p + 1]];
        if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    fn u32_at(&self, p: usize) -> u32 {
        let b = [self.data[p], self.data[p + 1], self.data[p + 2], self.data[p + 3]];
        if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    /// Tag at `p` (needs 4 bytes before `end`).
    fn tag(&self, p: usize, end: usize) -> Result<(u16, u16), String> {
        if end.saturating_sub(p) < 4 {
            return Err(format!("truncated element header at offset {p}"));
        }
        Ok((self.u16_at(p), self.u16_at(p + 2)))
    }

    /// A defined length that must fit in `[p, end)`.
    fn fits(&self, p: usize, len: u32, end: usize, tag: (u16, u16)) -> Result<usize, String> {
        let len = len as usize;
        if len > end - p {
            return Err(format!(
                "element ({:04X},{:04X}) at offset {p} claims {len} bytes but only {} remain",
                tag.0,
                tag.1,
                end - p
            ));
        }
        Ok(p + len)
    }

    /// Elements from `*pos` up to `end`; with `until_item_end`, stops after an Item Delimitation.
    fn elements(&mut self, pos: &mut usize, end: usize, depth: usize, until_item_end: bool) -> Result<(), String> {
        if depth > MAX_NESTING {
            return Err(format!("sequences nested deeper than {MAX_NESTING}"));
        }
        while *pos < end {
            let tag = self.tag(*pos, end)?;
            if tag == ITEM_END {
                if !until_item_end {
                    return Err(format!("unexpected item delimitation at offset {pos}"));
                }
                *pos += 8;
                return if *pos <= end { Ok(()) } else { Err("truncated item delimitation".into()) };
            }
            if tag.0 == 0xFFFE {
                return Err(format!("unexpected item tag ({:04X},{:04X}) at offset {pos}", tag.0, tag.1));
            }
            let (vr, len, header) = if self.explicit {
                if end - *pos < 8 {
                    return Err(format!("truncated element header at offset {pos}"));
                }
                let vr = [self.data[*pos + 4], self.data[*pos + 5]];
                if !vr.iter().all(u8::is_ascii_uppercase) {
                    return Err(format!("invalid VR bytes {vr:?} at offset {}", *pos + 4));
                }
                let long = matches!(
                    &vr,
                    b"OB"
                        | b"OW"
                        | b"OF"
                        | b"OD"
                        | b"OL"
                        | b"OV"
                        | b"SQ"
                        | b"UT"
                        | b"UN"
                        | b"UC"
                        | b"UR"
                        | b"SV"
                        | b"UV"
                );
                if long {
                    if end - *pos < 12 {
                        return Err(format!("truncated element header at offset {pos}"));
                    }
                    (Some(vr), self.u32_at(*pos + 8), 12)
                } else {
                    (Some(vr), u32::from(self.u16_at(*pos + 6)), 8)
                }
            } else {
                if end - *pos < 8 {
                    return Err(format!("truncated element header at offset {pos}"));
                }
                (None, self.u32_at(*pos + 4), 8)
            };
            *pos += header;
            let unit = value_unit(match vr {
                Some(v) => VR::from_binary(v).unwrap_or(VR::UN),
                None => implicit_vr(tag),
            });
            if len != UNDEFINED && len as usize % unit != 0 {
                return Err(format!(
                    "element ({:04X},{:04X}) at offset {} has length {len}, not a multiple of its value size {unit}",
                    tag.0,
                    tag.1,
                    *pos - header
                ));
            }
            let is_sq = match vr {
                Some(v) => &v == b"SQ" || (len == UNDEFINED && &v == b"UN"),
                None => len == UNDEFINED || dictionary_says_sequence(tag),
            };
            if tag == (0x7FE0, 0x0010) && len == UNDEFINED {
                self.fragments(pos, end, tag)?;
            } else if is_sq {
                self.sequence(pos, end, len, depth, tag)?;
            } else if len == UNDEFINED {
                return Err(format!("undefined length on non-sequence element ({:04X},{:04X})", tag.0, tag.1));
            } else {
                *pos = self.fits(*pos, len, end, tag)?;
            }
        }
        if until_item_end {
            return Err("item without delimitation".into());
        }
        Ok(())
    }

    /// Items of a sequence whose value starts at `*pos`.
    fn sequence(&mut self, pos: &mut usize, end: usize, len: u32, depth: usize, tag: (u16, u16)) -> Result<(), String> {
        let seq_end = if len == UNDEFINED { end } else { self.fits(*pos, len, end, tag)? };
        while *pos < seq_end {
            let t = self.tag(*pos, seq_end)?;
            if seq_end - *pos < 8 {
                return Err(format!("truncated item header at offset {pos}"));
            }
            let item_len = self.u32_at(*pos + 4);
            *pos += 8;
            if t == SEQ_END {
                if len != UNDEFINED {
                    return Err("sequence delimitation in a defined-length sequence".into());
                }
                return Ok(());
            }
            if t != ITEM {
                return Err(format!(
                    "expected an item in sequence ({:04X},{:04X}), found ({:04X},{:04X})",
                    tag.0, tag.1, t.0, t.1
                ));
            }
            if item_len == UNDEFINED {
                self.elements(pos, seq_end, depth + 1, true)?;
            } else {
                let item_end = self.fits(*pos, item_len, seq_end, t)?;
                self.elements(pos, item_end, depth + 1, false)?;
            }
        }
        if len == UNDEFINED {
            return Err(format!("sequence ({:04X},{:04X}) without delimitation", tag.0, tag.1));
        }
        Ok(())
    }

    /// Encapsulated Pixel Data: items of raw bytes, ended by a Sequence Delimitation.
    fn fragments(&mut self, pos: &mut usize, end: usize, tag: (u16, u16)) -> Result<(), String> {
        loop {
            let t = self.tag(*pos, end)?;
            if end - *pos < 8 {
                return Err(format!("truncated fragment header at offset {pos}"));
            }
            let len = self.u32_at(*pos + 4);
            *pos += 8;
            if t == SEQ_END {
                return Ok(());
            }
            if t != ITEM || len == UNDEFINED {
                return Err(format!("malformed pixel data fragment in ({:04X},{:04X}) at offset {pos}", tag.0, tag.1));
            }
            *pos = self.fits(*pos, len, end, t)?;
        }
    }
}

/// Implicit VR: whether the standard dictionary types `tag` as a sequence (the parser decides the same way).
fn dictionary_says_sequence(tag: (u16, u16)) -> bool {
    implicit_vr(tag) == VR::SQ
}

/// Implicit VR: the VR the parser reads `tag` as — the standard dictionary's, with context-dependent VRs
/// relaxed the way dicom-rs relaxes them (US/SS → US, OB/OW → OW), and UN for tags it does not know.
pub(crate) fn implicit_vr(tag: (u16, u16)) -> VR {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    dicom_dictionary_std::StandardDataDictionary.by_tag(Tag(tag.0, tag.1)).map(|e| e.vr().relaxed()).unwrap_or(VR::UN)
}

/// Size of one value of a binary VR (1 for strings and bytes). The parser reads `length / unit` values but
/// advances its offset by `length`, so a length that is not a multiple of the unit leaves it reading headers
/// out of step with the bytes — where it later found a "4 GiB" length inside a 124-byte command set (fuzz
/// finding, corpus case `dimse/command-ul-odd-length`). Every such length is refused before parsing.
pub(crate) fn value_unit(vr: VR) -> usize {
    match vr {
        VR::US | VR::SS | VR::OW => 2,
        VR::UL | VR::SL | VR::FL | VR::OF | VR::OL | VR::AT => 4,
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => 8,
        _ => 1,
    }
}

/// Reads a spooled Part-10 file back (for `preprocess`, `analyze` and tests).
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

/// Checks the file meta group at the start of a Part 10 file (`head`: its first bytes, with or without the
/// 128-byte preamble; `file_len`: the whole file's length): every element header and value of group 0002
/// (explicit VR little endian) lies inside the file. dicom-rs allocates a meta element's declared length before
/// reading it, so a few-KB file claiming a 2 GB meta element (found by fuzzing) must be refused here.
pub fn check_meta_group(head: &[u8], file_len: u64) -> Result<(), String> {
    let start = if head.len() >= 132 && &head[128..132] == b"DICM" {
        132
    } else if head.len() >= 4 && &head[0..4] == b"DICM" {
        4
    } else {
        return Err("not a DICOM Part 10 file (no DICM marker)".into());
    };
    let mut pos = start as u64;
    loop {
        let p = pos as usize;
        if p + 8 > head.len() {
            // The group ends at the end of what we read (or of the file): nothing left to misread.
            return Ok(());
        }
        let group = u16::from_le_bytes([head[p], head[p + 1]]);
        if group != 0x0002 {
            return Ok(());
        }
        let vr = [head[p + 4], head[p + 5]];
        let long = matches!(
            &vr,
            b"OB" | b"OW" | b"OF" | b"OD" | b"OL" | b"OV" | b"SQ" | b"SV" | b"UC" | b"UN" | b"UR" | b"UT" | b"UV"
        );
        let (header, len) = if long {
            if p + 12 > head.len() {
                return Err("file meta group cut short".into());
            }
            (12u64, u32::from_le_bytes([head[p + 8], head[p + 9], head[p + 10], head[p + 11]]) as u64)
        } else {
            (8u64, u16::from_le_bytes([head[p + 6], head[p + 7]]) as u64)
        };
        let tag = (group, u16::from_le_bytes([head[p + 2], head[p + 3]]));
        if len == 0xFFFF_FFFF {
            return Err(format!("file meta element ({:04X},{:04X}) has an undefined length", tag.0, tag.1));
        }
        let end = pos + header + len;
        if end > file_len {
            return Err(format!(
                "file meta element ({:04X},{:04X}) claims {len} bytes past the end of the {file_len}-byte file",
                tag.0, tag.1
            ));
        }
        pos = end;
    }
}

#[cfg(test)]
mod tests {
    use super::{check_lengths, check_meta_group};

    #[test]
    fn meta_elements_must_lie_inside_the_file() {
        // DICM, (0002,0000) UL 4 = 26, (0002,0010) UI 18 "1.2.840.10008.1.2\0".
        let mut f = b"DICM".to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, b'U', b'L', 4, 0, 26, 0, 0, 0]);
        f.extend_from_slice(&[2, 0, 0x10, 0, b'U', b'I', 18, 0]);
        f.extend_from_slice(b"1.2.840.10008.1.2\0");
        f.extend_from_slice(&[8, 0, 0x16, 0, b'U', b'I', 2, 0, b'1', 0]);
        assert_eq!(check_meta_group(&f, f.len() as u64), Ok(()));
        let mut pre = vec![0u8; 128];
        pre.extend_from_slice(&f);
        assert_eq!(check_meta_group(&pre, pre.len() as u64), Ok(()));
        // The fuzzer's case: a string element claiming ~2 GB in a small file.
        let mut bad = f.clone();
        bad[22..24].copy_from_slice(&0xFFF0u16.to_le_bytes());
        assert!(check_meta_group(&bad, bad.len() as u64).unwrap_err().contains("past the end"));
        let mut ob = b"DICM".to_vec();
        ob.extend_from_slice(&[2, 0, 1, 0, b'O', b'B', 0, 0, 0, 0, 0, 0x80]);
        assert!(check_meta_group(&ob, ob.len() as u64).is_err());
        assert!(check_meta_group(b"not dicom", 9).is_err());
    }

    #[test]
    fn binary_lengths_must_be_whole_values() {
        // Implicit VR LE: (0008,0000) is UL in the dictionary; 5 bytes is not a whole number of values.
        let implicit_ul5 = [0x08, 0, 0, 0, 5, 0, 0, 0, 1, 2, 3, 4, 5];
        let err = check_lengths(&implicit_ul5, false, false).unwrap_err();
        assert!(err.contains("not a multiple of its value size 4"), "{err}");
        // Explicit VR LE: FD with 12 bytes, US with 3.
        let explicit_fd12 = [&[0x18, 0, 0x50, 0, b'F', b'D', 12, 0][..], &[0u8; 12]].concat();
        assert!(check_lengths(&explicit_fd12, true, false).unwrap_err().contains("size 8"));
        let explicit_us3 = [0x28, 0, 0x10, 0, b'U', b'S', 3, 0, 0, 2, 0];
        assert!(check_lengths(&explicit_us3, true, false).is_err());
        // Whole values pass; strings may have any length (odd lengths exist in the wild).
        let explicit_us2 = [0x28, 0, 0x10, 0, b'U', b'S', 2, 0, 0, 2];
        check_lengths(&explicit_us2, true, false).unwrap();
        let explicit_lo3 = [0x08, 0, 0x30, 0x10, b'L', b'O', 3, 0, b'a', b'b', b'c'];
        check_lengths(&explicit_lo3, true, false).unwrap();
        let implicit_ul4 = [0x08, 0, 0, 0, 4, 0, 0, 0, 1, 2, 3, 4];
        check_lengths(&implicit_ul4, false, false).unwrap();
    }
}
