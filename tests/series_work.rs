//! The series worker's view of the spool: a repeat of a SOP Instance UID stored over an instance the worker already
//! segmented (new content, same UID) is seen as changed, and segmenting it again makes the analysis use the new
//! content. This is what the completion's top-up relies on when the repeat's own message is still queued behind the
//! completion: without it the result recorded at the repeat's revision would carry the older pixels, and nothing
//! later would analyse the new ones.

mod common;

use std::path::Path;

use common::dcm_files;

use lungsentry::config::{Config, EngineKind};
use lungsentry::instance::InstanceMeta;
use lungsentry::model::Model;
use lungsentry::pipeline::{InferenceContext, SeriesWork};

fn meta_of(path: &Path) -> InstanceMeta {
    InstanceMeta::from_file(&lungsentry::spool::read_instance(path).unwrap()).unwrap()
}

/// Stores `src`'s bytes at `dst` the way the spool stores a repeat: a new file renamed over the old one.
fn replace_like_the_spool(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("tmp");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

#[test]
fn a_repeat_stored_over_a_segmented_instance_is_seen_as_changed_and_its_new_content_analysed() {
    assert!(common::model_shipped(), "the shipped model is needed");
    let tmp = tempfile::tempdir().unwrap();
    // the held content: a severe phantom slice; the repeat's content: a slice of another, lesion-free patient
    let (sick, well) = (tmp.path().join("sick"), tmp.path().join("well"));
    common::phantom(&sick, 41, 12, "severe");
    common::phantom(&well, 42, 12, "none");
    let spool = tmp.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let held = spool.join("instance.dcm");
    std::fs::copy(&dcm_files(&sick)[6], &held).unwrap();
    let meta = meta_of(&held);
    let uid = meta.sop_instance_uid.clone();

    let config = Config::default();
    let model = Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/manifest.toml")).unwrap();
    let engine = lungsentry::engine::load_engine(EngineKind::Tract, &model).unwrap();
    let ctx = InferenceContext { model, engine, config };
    // what the analysis says of a work: lung and lesion volume
    let figures = |work: &SeriesWork| {
        let (r, _) = work.finish_with_slices(&ctx, "patient", "t0", "t1", false);
        let f = r.figures.unwrap_or_else(|| panic!("no figures in {:?}", r.status));
        (f.lung_volume_ml, f.lesion_volume_ml)
    };
    // each content analysed on its own, in a work that never saw the other
    let only = |file: &Path| {
        let path = tmp.path().join("only.dcm");
        std::fs::copy(file, &path).unwrap();
        let mut w = SeriesWork::default();
        w.add(&ctx, meta.clone(), &path);
        figures(&w)
    };
    let (old_content, new_content) = (only(&dcm_files(&sick)[6]), only(&dcm_files(&well)[6]));
    assert_ne!(old_content, new_content, "the two contents must analyse differently for this test to mean anything");

    let mut work = SeriesWork::default();
    assert!(work.changed_since_added(&uid, &held), "an instance not held counts as changed");
    work.add(&ctx, meta.clone(), &held);
    assert!(!work.changed_since_added(&uid, &held), "just added from this very file");
    assert_eq!(figures(&work), old_content);

    // The repeat: other content under the same SOP Instance UID, stored over the held file.
    replace_like_the_spool(&dcm_files(&well)[6], &held);
    assert!(work.changed_since_added(&uid, &held), "a file renamed over the held one is a change");
    assert_eq!(figures(&work), old_content, "nothing re-read yet: the held segmentation still speaks");

    work.add(&ctx, meta.clone(), &held);
    assert!(!work.changed_since_added(&uid, &held));
    assert_eq!(figures(&work), new_content, "the new content is what is analysed now");

    // A file gone (purged by retention) gives nothing newer to read: not a change.
    std::fs::remove_file(&held).unwrap();
    assert!(!work.changed_since_added(&uid, &held));
}
