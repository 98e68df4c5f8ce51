//! Spool and store against real DICOM files, DCMTK's `dcmdump` as the independent reader, and real SQLite.

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
use lungsentry::store::{load_or_create_salt, patient_key, NewResult, Store, MIGRATIONS};

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

// ---------------------------------------------------------------- store

fn fake_instance(series: &str, sop: &str, patient: (&str, &str), n: i64) -> SpooledInstance {
    SpooledInstance {
        meta: InstanceMeta {
            patient_id: patient.0.into(),
            patient_name: patient.1.into(),
            ..common::ct_meta(sop.into(), format!("{series}.0"), series, n)
        },
        path: PathBuf::from(format!("/spool/{sop}.dcm")),
        transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
        bytes: 1234,
        unchanged_since_ms: None,
    }
}

#[test]
fn store_pragmas_and_idempotent_migrations() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("lungsentry.sqlite");
    let key = patient_key(b"salt", "PID1", "DOE^JANE");
    {
        let store = Store::open(&db).unwrap();
        let p = store.pragmas().unwrap();
        assert_eq!(p.journal_mode, "wal");
        assert_eq!(p.synchronous, 2, "synchronous must be FULL");
        assert!(p.foreign_keys);
        assert!(p.busy_timeout_ms >= 1000);
        assert_eq!(p.user_version, MIGRATIONS.len() as i64);
        store.record_instance(&fake_instance("1.2.3", "1.2.3.1", ("PID1", "DOE^JANE"), 1), 1, &key).unwrap();
    }
    assert_eq!(mode(&db), 0o600);
    let store = Store::open(&db).unwrap(); // reopen: migrations must not run twice
    assert_eq!(store.pragmas().unwrap().user_version, MIGRATIONS.len() as i64);
    assert_eq!(store.series_instances("1.2.3").unwrap().len(), 1);
    drop(store);
    // A database from a newer build is refused, not modified.
    let c = rusqlite::Connection::open(&db).unwrap();
    c.pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1).unwrap();
    drop(c);
    let e = Store::open(&db).unwrap_err();
    assert!(format!("{e:#}").contains("newer"), "{e:#}");
}

#[test]
fn instances_results_pending_and_outbox() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db.sqlite")).unwrap();
    let salt = load_or_create_salt(tmp.path()).unwrap();
    assert_eq!(salt.len(), 32);
    assert_eq!(mode(&tmp.path().join("patient-key.salt")), 0o600);
    assert_eq!(load_or_create_salt(tmp.path()).unwrap(), salt, "salt must be read back, not regenerated");
    let pk = patient_key(&salt, "PID1", "DOE^JANE");
    assert_eq!(pk.len(), 32);
    assert_ne!(pk, patient_key(&salt, "PID1", "DOE^JOHN"));
    assert_ne!(pk, patient_key(b"other salt", "PID1", "DOE^JANE"));

    let s = "1.2.826.0.1.1";
    let r1 = store.record_instance(&fake_instance(s, "1.2.826.0.1.1.2", ("PID1", "DOE^JANE"), 2), 1, &pk).unwrap();
    assert!(r1.new_instance && r1.new_series && !r1.series_had_result);
    let r2 = store.record_instance(&fake_instance(s, "1.2.826.0.1.1.1", ("PID1", "DOE^JANE"), 1), 1, &pk).unwrap();
    assert!(r2.new_instance && !r2.new_series);
    assert_eq!(r2.n_instances, 2);
    let rep = store.record_instance(&fake_instance(s, "1.2.826.0.1.1.1", ("PID1", "DOE^JANE"), 1), 2, &pk).unwrap();
    assert!(!rep.new_instance, "a repeated SOP Instance UID is not new");
    assert_eq!(rep.n_instances, 2);

    let list = store.series_instances(s).unwrap();
    assert_eq!(list.iter().map(|i| i.meta.instance_number.unwrap()).collect::<Vec<_>>(), vec![1, 2]);
    assert!(
        list.iter().all(|i| i.meta.patient_id.is_empty() && i.meta.patient_name.is_empty()),
        "raw IDs outside patients"
    );
    assert_eq!(store.series_pending_analysis().unwrap(), vec![s.to_string()]);

    // Raw identifiers are refused in results.
    assert!(store.record_result(s, true, 1.0, &serde_json::json!({"patient_name": "DOE^JANE"}), false).is_err());

    let result =
        serde_json::json!({"series_instance_uid": s, "patient_key": pk, "positive": true, "involvement_percent": 12.5});
    let v1 = store.record_result(s, true, 12.5, &result, true).unwrap();
    assert_eq!(v1, 1);
    assert!(store.series_pending_analysis().unwrap().is_empty());
    assert_eq!(store.series(s).unwrap().unwrap().state, "analysed");

    let due = store.due_outbox(lungsentry::store::now_ms(), 10).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].dedup_key, format!("{s}/v1"));
    let payload: serde_json::Value = serde_json::from_str(&due[0].payload_json).unwrap();
    assert_eq!(payload["version"], 1);
    assert_eq!(payload["dedup_key"], format!("{s}/v1"));
    assert_eq!(payload["involvement_percent"], 12.5);
    // The dedup key is unique: the same alert cannot be queued twice.
    assert_eq!(store.enqueue_webhook(&format!("{s}/v1"), "{}").unwrap(), None);
    assert!(store.enqueue_webhook("other/v1", "{}").unwrap().is_some());

    // A late instance after completion: reported, and the series is pending again.
    let late = store.record_instance(&fake_instance(s, "1.2.826.0.1.1.3", ("PID1", "DOE^JANE"), 3), 3, &pk).unwrap();
    assert!(late.new_instance && late.series_had_result);
    assert_eq!(store.series_pending_analysis().unwrap(), vec![s.to_string()]);

    // Analysis started at this revision; an instance arriving mid-analysis keeps the series pending.
    let rev = store.series_revision(s).unwrap().unwrap();
    store.record_instance(&fake_instance(s, "1.2.826.0.1.1.4", ("PID1", "DOE^JANE"), 4), 3, &pk).unwrap();
    let v2 = store.record_result_for_revision(s, Some(rev), false, 0.1, &result, false).unwrap();
    assert_eq!(v2, 2, "a re-analysis is a new version, never a replacement");
    assert_eq!(store.series_pending_analysis().unwrap(), vec![s.to_string()]);
    let v3 = store.record_result(s, false, 0.2, &result, false).unwrap();
    assert_eq!(v3, 3);
    assert!(store.series_pending_analysis().unwrap().is_empty());
    let hist = store.result_history(s).unwrap();
    assert_eq!(hist.iter().map(|r| r.version).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(hist[0].positive && !hist[1].positive);
    let latest = store.latest_result(s).unwrap().unwrap();
    assert_eq!((latest.version, latest.involvement_percent), (3, 0.2));

    // Skipped series are not pending.
    let s2 = "1.2.826.0.1.2";
    store.record_instance(&fake_instance(s2, "1.2.826.0.1.2.1", ("PID1", "DOE^JANE"), 1), 4, &pk).unwrap();
    assert!(store.series_pending_analysis().unwrap().contains(&s2.to_string()));
    assert!(store.set_series_state(s2, "skipped", Some("too few slices")).unwrap());
    assert!(!store.series_pending_analysis().unwrap().contains(&s2.to_string()));

    // Follow-up view: latest result per series of the patient.
    let per_patient = store.results_for_patient(&pk).unwrap();
    assert_eq!(per_patient.len(), 1);
    assert_eq!(per_patient[0].version, 3);
    assert!(store.results_for_patient("0000").unwrap().is_empty());

    // Outbox bookkeeping.
    let c = store.outbox_counts().unwrap();
    assert_eq!((c.pending, c.failing, c.delivered), (2, 0, 0));
    store.mark_attempt_failed(due[0].id, "HTTP 500", lungsentry::store::now_ms() + 60_000).unwrap();
    assert_eq!(store.outbox_counts().unwrap().failing, 1);
    assert!(store.due_outbox(lungsentry::store::now_ms(), 10).unwrap().iter().all(|r| r.id != due[0].id));
    assert!(store.mark_delivered(due[0].id).unwrap());
    assert!(!store.mark_delivered(due[0].id).unwrap(), "delivered once");
    let c = store.outbox_counts().unwrap();
    assert_eq!((c.pending, c.failing, c.delivered), (1, 0, 1));

    // Raw identifiers live only in `patients`.
    drop(store);
    let c = rusqlite::Connection::open(tmp.path().join("db.sqlite")).unwrap();
    for (table, expr) in [
        ("series", "series_instance_uid || patient_key || study_date || state"),
        ("instances", "meta_json || path"),
        ("results", "result_json"),
        ("outbox", "payload_json"),
    ] {
        let sql = format!("SELECT COUNT(*) FROM {table} WHERE ({expr}) LIKE '%DOE^JANE%' OR ({expr}) LIKE '%PID1%'");
        let n: i64 = c.query_row(&sql, [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0, "raw patient identifier found in {table}");
    }
    let n: i64 =
        c.query_row("SELECT COUNT(*) FROM patients WHERE patient_name = 'DOE^JANE'", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 1);
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

#[test]
fn results_with_outputs_due_are_listed_until_their_rows_are_queued() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db.sqlite")).unwrap();
    let pk = patient_key(b"salt", "PID9", "DOE^JOHN");
    let (a, b) = ("1.2.826.0.9.1", "1.2.826.0.9.2");
    for (s, sop) in [(a, "1.2.826.0.9.1.1"), (b, "1.2.826.0.9.2.1")] {
        store.record_instance(&fake_instance(s, sop, ("PID9", "DOE^JOHN"), 1), 1, &pk).unwrap();
    }
    let result = |s: &str| serde_json::json!({"series_instance_uid": s, "patient_key": pk, "status": "analysed"});
    // a: outputs due; b: none wanted (e.g. a negative series and only_positive destinations).
    let va = store
        .record_result_with_outputs(NewResult {
            series_uid: a,
            revision: None,
            positive: true,
            involvement_percent: 5.0,
            result_json: &result(a),
            alert: false,
            outputs_due: true,
            links: &[],
        })
        .unwrap();
    store
        .record_result_with_outputs(NewResult {
            series_uid: b,
            revision: None,
            positive: false,
            involvement_percent: 0.0,
            result_json: &result(b),
            alert: false,
            outputs_due: false,
            links: &[],
        })
        .unwrap();
    let awaiting = |store: &Store| -> Vec<(String, u32)> {
        store.results_awaiting_outputs().unwrap().into_iter().map(|r| (r.series_instance_uid, r.version)).collect()
    };
    assert_eq!(awaiting(&store), vec![(a.to_string(), va)]);
    // A series changed since its result is re-analysed (its new version makes the outputs): not listed.
    store.record_instance(&fake_instance(a, "1.2.826.0.9.1.2", ("PID9", "DOE^JOHN"), 2), 2, &pk).unwrap();
    assert!(awaiting(&store).is_empty());
    let va2 = store
        .record_result_with_outputs(NewResult {
            series_uid: a,
            revision: None,
            positive: true,
            involvement_percent: 6.0,
            result_json: &result(a),
            alert: false,
            outputs_due: true,
            links: &[],
        })
        .unwrap();
    assert_eq!(awaiting(&store), vec![(a.to_string(), va2)]);
    // Queueing the rows clears the mark in the same transaction (an empty set of rows only clears it).
    let row = lungsentry::store::NewDicomOutput {
        destination: "PACS@h:104".into(),
        kind: "sr".into(),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.34".into(),
        sop_instance_uid: "2.25.1".into(),
        path: tmp.path().join("sr.dcm"),
    };
    assert_eq!(store.enqueue_dicom_outputs(a, va2 as i64, std::slice::from_ref(&row)).unwrap(), 1);
    assert!(awaiting(&store).is_empty());
    // Again (a restart that rebuilt the same objects): no duplicate row.
    assert_eq!(store.enqueue_dicom_outputs(a, va2 as i64, &[row]).unwrap(), 0);
    assert_eq!(store.dicom_outbox_of_series(a).unwrap().len(), 1);
}

/// Issue 8, backward linking: a later study analysed first, its prior study recorded afterwards. The later
/// series keeps one result (its version is not re-recorded); the new comparison is stored beside it, in the
/// transaction of the prior's result, shown by every read of that version, queued once as a progression alert,
/// and not stored again when nothing changed.
#[test]
fn a_prior_study_recorded_late_relinks_the_later_result_without_a_new_version() {
    use lungsentry::analysis::followup::ProgressionRule;
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db.sqlite")).unwrap();
    let pk = patient_key(b"salt", "PID7", "ROE^ANN");
    let (early, late) = ("1.2.826.0.7.1", "1.2.826.0.7.2");
    for (s, date) in [(late, "20200420"), (early, "20200401")] {
        let mut inst = fake_instance(s, &format!("{s}.1"), ("PID7", "ROE^ANN"), 1);
        inst.meta.study_date = date.into();
        store.record_instance(&inst, 1, &pk).unwrap();
    }
    use lungsentry::analysis::regions::{RegionInvolvement, Regional};
    use lungsentry::result::{Figures, SeriesResult, SeriesStatus};
    let lung = |side: &str, x: f64| RegionInvolvement {
        lung: side.into(),
        zone: "whole".into(),
        centroid_mm: Some([x, 0.0, 0.0]),
        ..Default::default()
    };
    let result = |s: &str, date: &str, inv: f64, vol: f64| SeriesResult {
        series_instance_uid: s.into(),
        study_instance_uid: format!("{s}.0"),
        study_date: date.into(),
        patient_key: pk.clone(),
        status: SeriesStatus::Analysed,
        figures: Some(Figures {
            involvement_percent: inv,
            regional: Regional { lungs: vec![lung("right", -80.0), lung("left", 80.0)], ..Default::default() },
            lesions: vec![lungsentry::analysis::Lesion {
                id: 1,
                volume_ml: vol,
                mean_hu: -500.0,
                first_slice: 0,
                last_slice: 0,
                centroid_mm: [-80.0, 10.0, 0.0],
                side: "right".into(),
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let rule = ProgressionRule { relative_percent: 50.0, absolute_points: 1.0 };
    // The 20 April study first: nothing to compare with.
    let mut r_late = result(late, "20200420", 9.0, 30.0);
    assert!(lungsentry::pipeline::link_follow_ups(&store, &pk, late, &mut r_late, rule, true, None)
        .unwrap()
        .is_empty());
    let v_late = store.record_result(late, true, 9.0, &r_late.to_json(), false).unwrap();
    // The 1 April study arrives: 20 April now compares with it (9 vs 3 %: progression, alert queued).
    let mut r_early = result(early, "20200401", 3.0, 10.0);
    let links = lungsentry::pipeline::link_follow_ups(&store, &pk, early, &mut r_early, rule, true, None).unwrap();
    assert_eq!(links.len(), 1);
    assert_eq!((links[0].series_instance_uid.as_str(), links[0].result_version), (late, v_late));
    assert!(links[0].alert_payload.is_some());
    store
        .record_result_with_outputs(NewResult {
            series_uid: early,
            revision: None,
            positive: false,
            involvement_percent: 3.0,
            result_json: &r_early.to_json(),
            alert: false,
            outputs_due: false,
            links: &links,
        })
        .unwrap();
    let shown = store.latest_result(late).unwrap().unwrap();
    assert_eq!(shown.version, v_late, "no new version of the later series");
    assert_eq!(store.result_history(late).unwrap().len(), 1);
    let f = &shown.result["follow_up"];
    assert_eq!(f["prior_series_instance_uid"], early);
    assert_eq!(f["relinked"], true);
    assert_eq!(f["progression"], true);
    assert_eq!(f["lesions"][0]["change"], "grown");
    assert_eq!(store.results_for_patient(&pk).unwrap()[1].result["follow_up"], *f);
    let due = store.due_outbox(i64::MAX, 10).unwrap();
    let key = format!("{late}/v{v_late}/prior/{early}");
    assert_eq!(due.iter().map(|o| o.dedup_key.as_str()).collect::<Vec<_>>(), [key.as_str()]);
    let body: serde_json::Value = serde_json::from_str(&due[0].payload_json).unwrap();
    assert_eq!(body["alert_reasons"], serde_json::json!(["progression"]));
    assert_eq!(body["follow_up"]["prior_series_instance_uid"], early);
    assert_eq!(body["series_instance_uid"], late);
    assert!(!due[0].payload_json.contains("ROE") && !due[0].payload_json.contains("PID7"));
    // The same prior seen again (re-sent unchanged): nothing new to store, no second alert.
    let again = lungsentry::pipeline::link_follow_ups(&store, &pk, early, &mut r_early, rule, true, None).unwrap();
    assert!(again.is_empty(), "{again:?}");
    // A stale link (the later series was re-analysed meanwhile) is not stored.
    let mut stale = links[0].clone();
    stale.follow_up["involvement_change_points"] = serde_json::json!(1.0);
    store.record_result(late, true, 9.0, &r_late.to_json(), false).unwrap();
    store
        .record_result_with_outputs(NewResult {
            series_uid: early,
            revision: None,
            positive: false,
            involvement_percent: 3.0,
            result_json: &r_early.to_json(),
            alert: false,
            outputs_due: false,
            links: &[stale],
        })
        .unwrap();
    assert_eq!(store.follow_up_links(late).unwrap().len(), 1);
    assert!(store.latest_result(late).unwrap().unwrap().result.get("follow_up").is_none(), "v2 shows its own");
    assert_eq!(store.due_outbox(i64::MAX, 10).unwrap().len(), 1);
}

/// A backward link whose amended SR a destination wants keeps the later series' pixels from retention until the
/// SR is queued (it is built from the spooled instances' headers); queueing clears the mark in the same
/// transaction, and the queued SR is the one a further amendment replaces.
/// Records the prior series `early`'s result with a backward link to version `v` of `late` whose amended SR is due.
fn record_prior_linking(store: &Store, early: &str, late: &str, v: u32, follow_up: serde_json::Value) {
    let link = lungsentry::store::FollowUpLink {
        series_instance_uid: late.into(),
        result_version: v,
        prior_series_instance_uid: early.into(),
        follow_up,
        alert_payload: None,
        outputs_due: true,
    };
    let result = serde_json::json!({"status": "analysed"});
    store
        .record_result_with_outputs(NewResult {
            series_uid: early,
            revision: None,
            positive: false,
            involvement_percent: 3.0,
            result_json: &result,
            alert: false,
            outputs_due: false,
            links: &[link],
        })
        .unwrap();
}

#[test]
fn a_link_awaiting_its_amended_sr_holds_retention_until_queued() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db.sqlite")).unwrap();
    let pk = patient_key(b"salt", "PID8", "POE^ANN");
    let (early, late) = ("1.2.826.0.8.1", "1.2.826.0.8.2");
    for s in [late, early] {
        store.record_instance(&fake_instance(s, &format!("{s}.1"), ("PID8", "POE^ANN"), 1), 1, &pk).unwrap();
    }
    let v = store.record_result(late, true, 9.0, &serde_json::json!({"status": "analysed"}), false).unwrap();
    let candidates = |s: &Store| -> Vec<String> {
        s.purge_candidates(None, 10).unwrap().into_iter().map(|c| c.series_instance_uid).collect()
    };
    assert_eq!(candidates(&store), vec![late.to_string()]);
    record_prior_linking(
        &store,
        early,
        late,
        v,
        serde_json::json!({"prior_series_instance_uid": early, "relinked": true}),
    );
    assert_eq!(candidates(&store), vec![early.to_string()], "the later series' pixels are held for its SR");
    let awaiting = store.links_awaiting_outputs().unwrap();
    assert_eq!(awaiting.len(), 1);
    let lungsentry::store::LinkAwaitingOutputs { id, link: l, .. } = &awaiting[0];
    assert!(l.outputs_due && l.series_instance_uid == late);
    assert_eq!(store.latest_queued_sr(late, v as i64).unwrap(), None);
    let row = lungsentry::store::NewDicomOutput {
        destination: "PACS@127.0.0.1:104".into(),
        kind: "sr".into(),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.34".into(),
        sop_instance_uid: "2.25.42".into(),
        path: tmp.path().join("sr.dcm"),
    };
    assert_eq!(store.enqueue_link_outputs(*id, &[row.clone()]).unwrap(), 1);
    assert!(store.links_awaiting_outputs().unwrap().is_empty(), "cleared with its outbox row");
    assert_eq!(store.enqueue_link_outputs(*id, &[row]).unwrap(), 0, "never queued twice");
    assert_eq!(store.latest_queued_sr(late, v as i64).unwrap().as_deref(), Some("2.25.42"));
    // Still held while the SR is undelivered; free once it is delivered.
    assert_eq!(candidates(&store), vec![early.to_string()]);
    let out = store.dicom_outbox_of_series(late).unwrap();
    store.mark_dicom_delivered(out[0].row.id, 0).unwrap();
    let mut c = candidates(&store);
    c.sort();
    assert_eq!(c, vec![early.to_string(), late.to_string()]);
}

#[test]
fn an_amended_sr_whose_series_pixels_were_purged_first_is_given_up_with_the_mark_cleared() {
    // The prior study arrives after retention purged the later series' pixels: its amended SR can never be made
    // (the SR needs one spooled header), so the mark is cleared instead of failing at every start.
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db.sqlite")).unwrap();
    let pk = patient_key(b"salt", "PID9", "ROE^BEA");
    let (early, late) = ("1.2.826.0.9.1", "1.2.826.0.9.2");
    for s in [late, early] {
        store.record_instance(&fake_instance(s, &format!("{s}.1"), ("PID9", "ROE^BEA"), 1), 1, &pk).unwrap();
    }
    let result = serde_json::json!({"status": "analysed", "positive": true, "series_instance_uid": late,
                                    "slice_sop_instance_uids": [format!("{late}.1")]});
    let v = store.record_result(late, true, 9.0, &result, false).unwrap();
    assert!(!store.mark_series_purged(late).unwrap().is_empty(), "the later series' pixels are purged");
    record_prior_linking(&store, early, late, v, serde_json::Value::Null);
    let awaiting = store.links_awaiting_outputs().unwrap();
    assert_eq!(awaiting.len(), 1);
    let lungsentry::store::LinkAwaitingOutputs { id, created_at, link } = &awaiting[0];
    let cfg = lungsentry::outputs::OutputsConfig {
        dicom: vec![lungsentry::outputs::DicomDestination {
            ae_title: "PACS".into(),
            host: "127.0.0.1".into(),
            port: 104,
            objects: vec![lungsentry::outputs::ObjectKind::Sr],
            only_positive: false,
        }],
        ..Default::default()
    };
    let typed = lungsentry::result::SeriesResult::from_json(result.clone()).unwrap();
    assert!(lungsentry::outputs::outbox::wants_sr(&cfg, &typed));
    let n = lungsentry::outputs::outbox::enqueue_link_outputs(&store, &cfg, tmp.path(), *id, *created_at, link)
        .expect("a purged series is not an error");
    assert_eq!(n, 0, "nothing queued");
    assert!(store.links_awaiting_outputs().unwrap().is_empty(), "the mark is cleared: not retried at every start");
    assert!(store.dicom_outbox_of_series(late).unwrap().is_empty());
}
