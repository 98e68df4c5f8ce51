//! The spool against real DICOM files, DCMTK's `dcmdump` as the independent reader, and a spooled real instance
//! recorded in a real SQLite store. (The store's own rows, outboxes and links are `tests/store_sqlite.rs`.)

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use lungsentry::instance::InstanceMeta;
use lungsentry::receive::{status, IncomingInstance};
use lungsentry::spool::{read_instance, Spool, SpoolError, SpooledInstance, IMPLEMENTATION_CLASS_UID};
use lungsentry::store::{load_or_create_salt, patient_key, Store};

fn data_dir() -> PathBuf {
    let p = std::env::var("LUNGSENTRY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    assert!(p.join("real-dicom").is_dir(), "test data missing at {} (set LUNGSENTRY_DATA)", p.display());
    p
}

fn real(rel: &str) -> PathBuf {
    data_dir().join("real-dicom").join(rel)
}

/// Offset of the dataset in a Part-10 file: 128 + "DICM" + (0002,0000) UL element + group length.
fn dataset_offset(bytes: &[u8]) -> usize {
    assert_eq!(&bytes[128..132], b"DICM");
    assert_eq!(&bytes[132..136], &[0x02, 0x00, 0x00, 0x00], "file meta must start with (0002,0000)");
    assert_eq!(&bytes[136..138], b"UL");
    let len = u32::from_le_bytes(bytes[140..144].try_into().unwrap()) as usize;
    144 + len
}

/// A C-STORE as the SCP would hand it on: the file's dataset bytes without the meta group.
fn incoming_from_file(path: &Path) -> IncomingInstance {
    let bytes = std::fs::read(path).unwrap();
    let obj = dicom_object::open_file(path).unwrap();
    let meta = obj.meta();
    IncomingInstance {
        association: 7,
        calling_ae: "TESTSCU".into(),
        peer: "127.0.0.1:4242".parse().unwrap(),
        sop_class_uid: meta.media_storage_sop_class_uid().trim_end_matches('\0').to_string(),
        sop_instance_uid: meta.media_storage_sop_instance_uid().trim_end_matches('\0').to_string(),
        transfer_syntax_uid: meta.transfer_syntax().trim_end_matches('\0').to_string(),
        dataset: bytes[dataset_offset(&bytes)..].to_vec(),
    }
}

fn incoming_from_object(template: &IncomingInstance, obj: &InMemDicomObject) -> IncomingInstance {
    let ts = TransferSyntaxRegistry.get(&template.transfer_syntax_uid).unwrap();
    let mut dataset = Vec::new();
    obj.write_dataset_with_ts(&mut dataset, ts).unwrap();
    IncomingInstance {
        association: template.association,
        calling_ae: template.calling_ae.clone(),
        peer: template.peer,
        sop_class_uid: template.sop_class_uid.clone(),
        sop_instance_uid: template.sop_instance_uid.clone(),
        transfer_syntax_uid: template.transfer_syntax_uid.clone(),
        dataset,
    }
}

fn parse(inc: &IncomingInstance) -> InMemDicomObject {
    let ts = TransferSyntaxRegistry.get(&inc.transfer_syntax_uid).unwrap();
    InMemDicomObject::read_dataset_with_ts(&inc.dataset[..], ts).unwrap()
}

fn tmp_leftovers(data: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data.join("spool/tmp")).unwrap().map(|e| e.unwrap().path()).collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn check_spooled(inc: &IncomingInstance, s: &SpooledInstance, spool_root: &Path) {
    assert!(s.path.starts_with(spool_root), "{} not under {}", s.path.display(), spool_root.display());
    let bytes = std::fs::read(&s.path).unwrap();
    assert_eq!(bytes.len() as u64, s.bytes);
    assert_eq!(mode(&s.path), 0o600);
    assert_eq!(mode(s.path.parent().unwrap()), 0o700);
    let off = dataset_offset(&bytes);
    assert!(bytes[off..] == inc.dataset[..], "dataset bytes must be stored verbatim");
    assert_eq!(s.meta.sop_instance_uid, inc.sop_instance_uid);
    assert_eq!(s.transfer_syntax_uid, inc.transfer_syntax_uid);

    // DCMTK, an independent implementation, must read the file and see our meta group and the dataset.
    let out = Command::new("dcmdump").arg(&s.path).output().expect("running dcmdump");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "dcmdump failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(IMPLEMENTATION_CLASS_UID), "dcmdump output lacks our ImplementationClassUID:\n{text}");
    assert!(text.contains(&inc.sop_instance_uid), "dcmdump output lacks the SOP Instance UID");
    assert!(text.contains("(7fe0,0010)"), "dcmdump output lacks PixelData");
    assert!(!text.contains("E: "), "dcmdump reported errors:\n{text}");
    assert!(out.stderr.is_empty(), "dcmdump warned: {}", String::from_utf8_lossy(&out.stderr));
    if std::env::var_os("SPOOL_TEST_SHOW").is_some() {
        eprintln!("{}", text.lines().take(14).collect::<Vec<_>>().join("\n"));
    }

    let back = read_instance(&s.path).unwrap();
    assert_eq!(back.meta().transfer_syntax().trim_end_matches('\0'), inc.transfer_syntax_uid);
    assert_eq!(back.meta().implementation_class_uid().trim_end_matches('\0'), IMPLEMENTATION_CLASS_UID);
    assert_eq!(InstanceMeta::from_object(&back, None).unwrap(), s.meta);
}

#[test]
fn real_files_are_spooled_verbatim_and_dcmtk_reads_them() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(tmp.path()).unwrap();
    assert_eq!(mode(&tmp.path().join("spool")), 0o700);
    assert_eq!(mode(&tmp.path().join("spool/tmp")), 0o700);
    let mut files = vec![real("lidc-idri-2-slices/0.dcm"), real("lidc-idri-2-slices/1.dcm")];
    let mut sbu: Vec<PathBuf> =
        std::fs::read_dir(real("covid19-ny-sbu-axial")).unwrap().map(|e| e.unwrap().path()).collect();
    sbu.sort();
    files.extend(sbu.into_iter().take(3));
    for f in &files {
        let inc = incoming_from_file(f);
        let s = spool.store(&inc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        check_spooled(&inc, &s, spool.root());
    }
    assert!(tmp_leftovers(tmp.path()).is_empty(), "temporary files left: {:?}", tmp_leftovers(tmp.path()));
}

fn j2k_files() -> Vec<PathBuf> {
    let mut j2k: Vec<PathBuf> =
        std::fs::read_dir(real("siemens-abdomen-j2k-series")).unwrap().map(|e| e.unwrap().path()).collect();
    j2k.sort();
    assert_eq!(j2k.len(), 20);
    j2k
}

/// Every file under the spool (temporary files included).
fn spool_files(root: &Path) -> Vec<PathBuf> {
    common::files_under(root)
}

/// The Siemens series was anonymised down to *empty* SOP/Study/Series UIDs in the dataset (only the file meta
/// keeps the SOP Instance UID). These are Type 1 attributes: at receive each slice is refused with C000 naming
/// the first blank one (StudyInstanceUID), nothing is spooled, and no UID is invented for it (issue 21).
#[test]
fn real_dataset_with_empty_uids_is_refused_naming_the_attribute() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(tmp.path()).unwrap();
    for f in j2k_files() {
        let inc = incoming_from_file(&f);
        assert!(!inc.sop_instance_uid.is_empty(), "the command carries the file meta's SOP Instance UID");
        expect_err(&spool, &inc, status::CANNOT_UNDERSTAND, "StudyInstanceUID is empty (Type 1 attribute)");
    }
    assert!(spool_files(spool.root()).is_empty(), "spooled: {:?}", spool_files(spool.root()));
}

/// Study, Series or SOP Instance UID blank (empty, spaces, NUL padding) or absent in the dataset, each on its
/// own, is refused with C000 naming the attribute — the SOP Instance UID too when the command carries a good one
/// — and nothing is spooled.
#[test]
fn blank_or_absent_type1_uids_are_refused_naming_the_attribute() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(tmp.path()).unwrap();
    let good = incoming_from_file(&real("lidc-idri-2-slices/0.dcm"));
    assert!(!good.sop_instance_uid.is_empty());
    for (attr, tag) in [
        ("StudyInstanceUID", tags::STUDY_INSTANCE_UID),
        ("SeriesInstanceUID", tags::SERIES_INSTANCE_UID),
        ("SOPInstanceUID", tags::SOP_INSTANCE_UID),
    ] {
        for blank in ["", "  ", "\0"] {
            let mut obj = parse(&good);
            obj.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(blank)));
            let want = format!("{attr} is empty (Type 1 attribute)");
            expect_err(&spool, &incoming_from_object(&good, &obj), status::CANNOT_UNDERSTAND, &want);
        }
        let mut obj = parse(&good);
        obj.remove_element(tag);
        let want = format!("{attr} is missing (Type 1 attribute)");
        expect_err(&spool, &incoming_from_object(&good, &obj), status::CANNOT_UNDERSTAND, &want);
    }
    assert!(spool_files(spool.root()).is_empty(), "spooled: {:?}", spool_files(spool.root()));
    // The unmodified dataset is stored.
    spool.store(&good).unwrap();
}

/// JPEG 2000 (encapsulated Pixel Data) once the UIDs are filled in: stored verbatim, DCMTK reads it.
#[test]
fn encapsulated_jpeg2000_is_spooled_verbatim() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(tmp.path()).unwrap();
    for (i, f) in j2k_files().iter().take(3).enumerate() {
        let template = incoming_from_file(f);
        let mut obj = parse(&template);
        let put_uid = |obj: &mut InMemDicomObject, tag, v: &str| {
            obj.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(v)));
        };
        put_uid(&mut obj, tags::SOP_CLASS_UID, &template.sop_class_uid);
        put_uid(&mut obj, tags::SOP_INSTANCE_UID, &template.sop_instance_uid);
        put_uid(&mut obj, tags::STUDY_INSTANCE_UID, "2.25.1111");
        put_uid(&mut obj, tags::SERIES_INSTANCE_UID, "2.25.1111.2");
        let inc = incoming_from_object(&template, &obj);
        assert!(
            parse(&inc).element(tags::PIXEL_DATA).unwrap().value().fragments().is_some(),
            "file {i} not encapsulated"
        );
        let s = spool.store(&inc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert_eq!(s.transfer_syntax_uid, "1.2.840.10008.1.2.4.90");
        check_spooled(&inc, &s, spool.root());
    }
    // Encapsulated Pixel Data without any fragment bytes is refused.
    let template = incoming_from_file(&j2k_files()[0]);
    let mut obj = parse(&template);
    for (tag, v) in [
        (tags::SOP_CLASS_UID, template.sop_class_uid.as_str()),
        (tags::SOP_INSTANCE_UID, template.sop_instance_uid.as_str()),
        (tags::STUDY_INSTANCE_UID, "2.25.1111"),
        (tags::SERIES_INSTANCE_UID, "2.25.1111.2"),
    ] {
        obj.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(v)));
    }
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        dicom_core::value::Value::<InMemDicomObject, Vec<u8>>::PixelSequence(
            dicom_core::value::PixelFragmentSequence::new(vec![], vec![]),
        ),
    ));
    expect_err(&spool, &incoming_from_object(&template, &obj), status::CANNOT_UNDERSTAND, "no fragments");
}

#[test]
fn repeated_instance_replaces_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(tmp.path()).unwrap();
    let inc = incoming_from_file(&real("lidc-idri-2-slices/0.dcm"));
    let a = spool.store(&inc).unwrap();
    let b = spool.store(&inc).unwrap();
    assert_eq!(a.path, b.path);
    let n = std::fs::read_dir(a.path.parent().unwrap()).unwrap().count();
    assert_eq!(n, 1);
}

/// A sender's retry (the same bytes again) is recognised by the spool and changes nothing in the store; a repeat
/// with other bytes, and a retry of a file whose recording is older than the file, are recorded as changes.
#[test]
fn a_retry_of_the_same_bytes_changes_nothing_a_repeat_with_other_bytes_does() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(tmp.path()).unwrap();
    let store = Store::open(&tmp.path().join("db.sqlite")).unwrap();
    let inc = incoming_from_file(&real("lidc-idri-2-slices/0.dcm"));

    let first = spool.store(&inc).unwrap();
    assert_eq!(first.unchanged_since_ms, None, "a new instance is written");
    let r1 = store.record_instance(&first, 1, "pk").unwrap();
    assert!(r1.new_instance && !r1.unchanged);
    store.record_result(&first.meta.series_instance_uid, false, 0.0, &serde_json::json!({}), false).unwrap();
    let series = |s: &Store| s.series(&first.meta.series_instance_uid).unwrap().unwrap();
    assert_eq!((series(&store).state.as_str(), series(&store).revision), ("analysed", r1.revision));

    // The retry: nothing written, nothing changed, the series stays analysed and is not pending analysis.
    let written = std::fs::metadata(&first.path).unwrap().modified().unwrap();
    let retry = spool.store(&inc).unwrap();
    assert!(retry.unchanged_since_ms.is_some(), "the same bytes are recognised");
    assert_eq!(std::fs::metadata(&first.path).unwrap().modified().unwrap(), written, "not written again");
    let r2 = store.record_instance(&retry, 2, "pk").unwrap();
    assert!(r2.unchanged && !r2.new_instance && r2.series_had_result);
    assert_eq!(r2.revision, r1.revision);
    assert_eq!((series(&store).state.as_str(), series(&store).revision), ("analysed", r1.revision));
    assert!(store.series_pending_analysis().unwrap().is_empty());

    // A file replaced after its instance was recorded (a store whose recording failed): its bytes are not what
    // the store recorded, so a retry of them is a change.
    let late = SpooledInstance { unchanged_since_ms: Some(lungsentry::store::now_ms() + 60_000), ..retry.clone() };
    let r3 = store.record_instance(&late, 3, "pk").unwrap();
    assert!(!r3.unchanged);
    assert_eq!(r3.revision, r1.revision + 1);
    store.record_result(&first.meta.series_instance_uid, false, 0.0, &serde_json::json!({}), false).unwrap();

    // Other bytes under the same SOP Instance UID: written, a new revision, the series is receiving again.
    let mut obj = parse(&inc);
    obj.put(DataElement::new(tags::IMAGE_COMMENTS, VR::LT, PrimitiveValue::from("corrected")));
    let changed = spool.store(&incoming_from_object(&inc, &obj)).unwrap();
    assert_eq!(changed.unchanged_since_ms, None);
    assert_eq!(changed.path, first.path);
    let r4 = store.record_instance(&changed, 4, "pk").unwrap();
    assert!(!r4.unchanged && !r4.new_instance);
    assert_eq!(r4.revision, r3.revision + 1);
    assert_eq!(series(&store).state, "receiving");
    assert_eq!(store.series_pending_analysis().unwrap(), vec![first.meta.series_instance_uid.clone()]);

    // A series whose analysis failed: a retry of the same bytes is recorded, so the re-send tries it again.
    store.set_series_state(&first.meta.series_instance_uid, "failed", Some("engine error")).unwrap();
    let again = spool.store(&incoming_from_object(&inc, &obj)).unwrap();
    assert!(again.unchanged_since_ms.is_some());
    let r5 = store.record_instance(&again, 5, "pk").unwrap();
    assert!(!r5.unchanged);
    assert_eq!((series(&store).state.as_str(), r5.revision), ("receiving", r4.revision + 1));
}

#[test]
fn open_removes_leftover_temporary_files() {
    let tmp = tempfile::tempdir().unwrap();
    drop(Spool::open(tmp.path()).unwrap());
    std::fs::write(tmp.path().join("spool/tmp/123-0.part"), b"half a file").unwrap();
    let _spool = Spool::open(tmp.path()).unwrap();
    assert!(tmp_leftovers(tmp.path()).is_empty());
}

fn expect_err(spool: &Spool, inc: &IncomingInstance, want_status: u16, needle: &str) {
    match spool.store(inc) {
        Ok(s) => panic!("expected failure {want_status:04X}, got spooled {}", s.path.display()),
        Err(e) => {
            assert_eq!(e.status(), want_status, "{e}");
            assert!(e.to_string().contains(needle), "error {e:?} should mention {needle:?}");
        }
    }
}

#[test]
fn unusable_datasets_get_cannot_understand() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(tmp.path()).unwrap();
    let good = incoming_from_file(&real("lidc-idri-2-slices/0.dcm"));

    // No Pixel Data.
    let mut obj = parse(&good);
    assert!(obj.remove_element(tags::PIXEL_DATA));
    expect_err(&spool, &incoming_from_object(&good, &obj), status::CANNOT_UNDERSTAND, "no PixelData");

    // Pixel Data shorter than Rows x Columns x BitsAllocated/8 (consistent encoding, too few bytes).
    let mut obj = parse(&good);
    let rows = obj.element(tags::ROWS).unwrap().to_int::<usize>().unwrap();
    let cols = obj.element(tags::COLUMNS).unwrap().to_int::<usize>().unwrap();
    let short = vec![0u8; rows * cols * 2 - 512];
    obj.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(short)));
    expect_err(&spool, &incoming_from_object(&good, &obj), status::CANNOT_UNDERSTAND, "PixelData has");

    // Bytes cut off in the middle of Pixel Data (the header claims more than arrived).
    let mut cut = incoming_from_file(&real("lidc-idri-2-slices/0.dcm"));
    cut.dataset.truncate(cut.dataset.len() - 1000);
    expect_err(&spool, &cut, status::CANNOT_UNDERSTAND, "claims");

    // Random bytes.
    let mut noise = incoming_from_file(&real("lidc-idri-2-slices/0.dcm"));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    noise.dataset = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    expect_err(&spool, &noise, status::CANNOT_UNDERSTAND, "");

    // A header claiming ~4 GiB must be refused by the length check, not allocated by the parser.
    let mut huge = incoming_from_file(&real("lidc-idri-2-slices/0.dcm"));
    let mut d = Vec::new();
    d.extend_from_slice(&[0x08, 0x00, 0x18, 0x00, b'U', b'I', 4, 0, b'1', b'.', b'2', 0]);
    d.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 0xF0, 0xFF, 0xFF, 0xFF]);
    d.extend_from_slice(&[0u8; 64]);
    huge.dataset = d;
    let t = std::time::Instant::now();
    expect_err(&spool, &huge, status::CANNOT_UNDERSTAND, "claims 4294967280 bytes");
    assert!(t.elapsed().as_millis() < 500, "length check too slow: {:?}", t.elapsed());

    // The same inside a sequence item, in implicit VR (sequence known only from the dictionary).
    let mut nested = incoming_from_file(&real("lidc-idri-2-slices/0.dcm"));
    nested.transfer_syntax_uid = "1.2.840.10008.1.2".into();
    let mut d = Vec::new();
    // (0008,1115) ReferencedSeriesSequence, undefined length; item, undefined length.
    d.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
    d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
    d.extend_from_slice(&[0x08, 0x00, 0x50, 0x11, 0x00, 0x00, 0x00, 0xF0]); // (0008,1150) claims 4 GiB
    d.extend_from_slice(&[0u8; 32]);
    nested.dataset = d;
    expect_err(&spool, &nested, status::CANNOT_UNDERSTAND, "claims");

    // Unknown transfer syntax.
    let mut ts = incoming_from_file(&real("lidc-idri-2-slices/0.dcm"));
    ts.transfer_syntax_uid = "1.2.3.4.5".into();
    expect_err(&spool, &ts, status::CANNOT_UNDERSTAND, "transfer syntax");

    assert!(tmp_leftovers(tmp.path()).is_empty());
    // Nothing was spooled at all: only tmp/ exists under spool/.
    let entries: Vec<_> = std::fs::read_dir(spool.root()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("tmp")]);
}

#[test]
fn command_uid_mismatch_is_a900() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(tmp.path()).unwrap();
    let mut inc = incoming_from_file(&real("lidc-idri-2-slices/0.dcm"));
    inc.sop_instance_uid.push_str(".9");
    expect_err(&spool, &inc, status::DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Instance UID");
}

#[test]
fn unwritable_spool_is_out_of_resources_even_as_root() {
    // Permissions do not stop root; a regular file where a directory must be does.
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(tmp.path()).unwrap();
    let inc = incoming_from_file(&real("lidc-idri-2-slices/0.dcm"));

    // 1. The series directory cannot be created (a file sits where spool/<h2> must be).
    let series_uid = InstanceMeta::from_object(&parse(&inc), None).unwrap().series_instance_uid;
    let target = spool.path_for(&series_uid, &inc.sop_instance_uid);
    let top = target.parent().unwrap().parent().unwrap().to_path_buf();
    std::fs::write(&top, b"in the way").unwrap();
    let e = spool.store(&inc).unwrap_err();
    assert!(matches!(e, SpoolError::OutOfResources(..)), "{e:?}");
    assert_eq!(e.status(), status::OUT_OF_RESOURCES);
    assert!(tmp_leftovers(tmp.path()).is_empty(), "the temporary file must be removed on failure");
    std::fs::remove_file(&top).unwrap();
    assert!(spool.store(&inc).is_ok(), "works again once the obstacle is gone");

    // 2. The temporary file cannot be created (spool/tmp replaced by a regular file): a new instance is refused;
    //    a retry of the stored one needs no temporary file and is still acknowledged.
    std::fs::remove_dir_all(tmp.path().join("spool/tmp")).unwrap();
    std::fs::write(tmp.path().join("spool/tmp"), b"not a directory").unwrap();
    let e = spool.store(&incoming_from_file(&real("lidc-idri-2-slices/1.dcm"))).unwrap_err();
    assert_eq!(e.status(), status::OUT_OF_RESOURCES, "{e}");
    assert!(spool.store(&inc).unwrap().unchanged_since_ms.is_some());
}

#[test]
fn spooled_real_instance_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(tmp.path()).unwrap();
    let store = Store::open(&tmp.path().join("db.sqlite")).unwrap();
    let salt = load_or_create_salt(tmp.path()).unwrap();
    for f in ["lidc-idri-2-slices/0.dcm", "lidc-idri-2-slices/1.dcm"] {
        let s = spool.store(&incoming_from_file(&real(f))).unwrap();
        let pk = patient_key(&salt, &s.meta.patient_id, &s.meta.patient_name);
        store.record_instance(&s, 1, &pk).unwrap();
    }
    let series = store.series_pending_analysis().unwrap();
    assert_eq!(series.len(), 1);
    let list = store.series_instances(&series[0]).unwrap();
    assert_eq!(list.len(), 2);
    for lungsentry::store::StoredInstance { meta: m, path: p } in list {
        assert!(p.exists());
        let back = read_instance(&p).unwrap();
        assert_eq!(InstanceMeta::from_object(&back, None).unwrap().sop_instance_uid, m.sop_instance_uid);
    }
}
