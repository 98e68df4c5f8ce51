//! The per-series work shared by the daemon and `analyze`: segment each instance as it arrives (decode → HU →
//! model input → engine → native-resolution masks), then, when the series is complete, order the slices and
//! run the 3D analysis into the result JSON.
//!
//! Owns: the accumulated per-slice segmentations of one series (masks as runs, not pixels) and the
//! stage timings. A multi-frame CT instance (Enhanced or Legacy Converted Enhanced CT) is one slice per frame,
//! each with its frame's geometry from the functional groups (plane position and orientation, pixel measures,
//! pixel value transformation), so N frames give the result of N classic slices.
//! Never: decides completion (that is `series`) or stores anything (that is `store`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::analysis::{self, AnalysisParams, PlacedSlice, RunMask, SliceSegmentation};
use crate::config::Config;
use crate::engine::Engine;
use crate::instance::InstanceMeta;
use crate::model::Model;
use crate::preprocess;
use crate::result::{SeriesResult, SeriesStatus, SliceError, Timings};
use crate::series;

/// What every series analysis needs: the verified model, the engine running it, and the thresholds.
pub struct InferenceContext {
    /// Model manifest (input contract, identity).
    pub model: Model,
    /// The engine chosen at start.
    pub engine: Box<dyn Engine>,
    /// Series and analysis settings.
    pub config: Config,
}

/// A slice's segmentation as a series worker keeps it until the 3D analysis: the masks as runs, not bits (eight
/// scanners sending 300 × 512² series at once held 8 × 300 × 64 KB = 157 MB of bit masks).
struct PackedSegmentation {
    lung: RunMask,
    lesion: RunMask,
    lesion_hu: Vec<f32>,
    max_lesion_probability: f32,
    /// Air inside the body less its gas pieces (the lung guard's input at completion), as runs like the masks.
    air: Option<RunMask>,
    /// The lung guard's seeding of the slice, made as it arrived (its masks are runs too).
    pre_seed: Option<analysis::lung_guard::PreSeed>,
}

impl PackedSegmentation {
    fn pack(mut s: SliceSegmentation) -> PackedSegmentation {
        s.lesion_hu.shrink_to_fit();
        PackedSegmentation {
            lung: RunMask::from_bitmask(&s.lung),
            lesion: RunMask::from_bitmask(&s.lesion),
            lesion_hu: s.lesion_hu,
            max_lesion_probability: s.max_lesion_probability,
            air: s.air.as_ref().map(RunMask::from_bitmask),
            pre_seed: s.pre_seed,
        }
    }

    fn unpack(&self) -> SliceSegmentation {
        let lung = self.lung.to_bitmask();
        SliceSegmentation {
            rows: lung.rows,
            cols: lung.cols,
            lung,
            lesion: self.lesion.to_bitmask(),
            lesion_hu: self.lesion_hu.clone(),
            max_lesion_probability: self.max_lesion_probability,
            air: self.air.as_ref().map(RunMask::to_bitmask),
            pre_seed: self.pre_seed.clone(),
        }
    }
}

/// One slice (an instance, or one frame of a multi-frame instance) with its segmentation.
struct SegmentedInstance {
    /// Routing and geometry attributes (a frame's: its own position, orientation, spacing and thickness).
    meta: InstanceMeta,
    /// 1-based frame number within a multi-frame instance; None for a single-frame instance.
    frame: Option<u32>,
    /// Native-resolution masks (as runs) and lesion HU.
    segmentation: PackedSegmentation,
    /// The instance's file (DICOM outputs re-read it for attributes and key-image pixels).
    path: std::path::PathBuf,
}

/// Everything accumulated for one series so far.
#[derive(Default)]
pub struct SeriesWork {
    /// Segmented analysable slices by SOP Instance UID and frame number (0 for a single-frame instance; a repeat
    /// of the SOP Instance UID replaces all its slices).
    segmented: BTreeMap<(String, u32), SegmentedInstance>,
    /// Every instance seen, analysable or not, by SOP Instance UID (for eligibility and counts).
    metas: BTreeMap<String, InstanceMeta>,
    /// The per-frame attributes of each decoded multi-frame instance (its slices for eligibility and counts).
    frame_metas: BTreeMap<String, Vec<InstanceMeta>>,
    /// The identity of each instance's spool file as it was before it was read (see [`FileIdentity`]).
    files: BTreeMap<String, Option<FileIdentity>>,
    /// Instances whose pixels could not be used, with the reason.
    errors: BTreeMap<String, String>,
    /// Milliseconds spent decoding + normalising.
    decode_ms: f64,
    /// Milliseconds spent in the engine.
    infer_ms: f64,
    /// Milliseconds spent turning scores into masks.
    segment_ms: f64,
}

impl SeriesWork {
    /// Number of instances seen.
    pub fn instance_count(&self) -> usize {
        self.metas.len()
    }

    /// Whether the instance's spool file has been replaced since it was added (a repeat of the SOP Instance UID
    /// stored over it, perhaps with other content) or the instance is not held at all.
    pub fn changed_since_added(&self, sop_instance_uid: &str, path: &Path) -> bool {
        match self.files.get(sop_instance_uid) {
            None => true,
            // unreadable now (purged, or a transient error): nothing newer to read
            Some(held) => FileIdentity::of(path).is_some_and(|now| held.as_ref() != Some(&now)),
        }
    }

    /// Segments one instance (blocking: decode + inference) with the lung guard's per-slice seeding done ahead
    /// (see [`SeriesWork::add_seeding_ahead`]). Instances that can never be analysed (other SOP classes,
    /// localizers, ...) are only counted.
    pub fn add(&mut self, ctx: &InferenceContext, meta: InstanceMeta, path: &Path) {
        self.add_seeding_ahead(ctx, meta, path, true)
    }

    /// [`SeriesWork::add`], choosing whether the lung guard's seeding of its slices is done now
    /// (`analysis::lung_guard::PreSeed`) or left to completion. Ahead, it takes work off the completion step the
    /// alert waits for, but it is spent on every slice and used only on those whose air the 3D rule keeps whole
    /// (most of a phantom's, 36 of 248 on the RICORD series): a series worker seeds ahead only while nothing is
    /// queued behind it, so a worker already behind the sender is not slowed further.
    pub fn add_seeding_ahead(&mut self, ctx: &InferenceContext, meta: InstanceMeta, path: &Path, seed_ahead: bool) {
        let uid = meta.sop_instance_uid.clone();
        // Taken before the file is read: a replacement landing in between makes the next top-up read it again
        // (at worst once too often), never leaves the older content looking current.
        self.files.insert(uid.clone(), FileIdentity::of(path));
        self.metas.insert(uid.clone(), meta.clone());
        self.segmented.retain(|(u, _), _| u != &uid);
        self.frame_metas.remove(&uid);
        self.errors.remove(&uid);
        if !series::instance_skip_reasons(&meta).is_empty() {
            return;
        }
        match self.segment(ctx, &meta, path, seed_ahead) {
            Ok(slices) => {
                let multi = meta.is_multi_frame_ct_class();
                if multi {
                    self.frame_metas.insert(uid.clone(), slices.iter().map(|(m, _)| m.clone()).collect());
                }
                for (i, (m, seg)) in slices.into_iter().enumerate() {
                    let frame = multi.then_some(i as u32 + 1);
                    self.segmented.insert(
                        (uid.clone(), frame.unwrap_or(0)),
                        SegmentedInstance {
                            meta: m,
                            frame,
                            segmentation: PackedSegmentation::pack(seg),
                            path: path.to_path_buf(),
                        },
                    );
                }
            }
            Err(e) => {
                tracing::warn!(series = %crate::store::series_log_key(&meta.series_instance_uid),
                    instance = %crate::store::series_log_key(&uid), stage = "segmentation", error = %format!("{e:#}"),
                    "slice not analysed");
                self.errors.insert(uid, format!("{e:#}"));
            }
        }
    }

    /// Segments the slices of one instance: its one frame, or every frame of a multi-frame CT (each with the
    /// attributes of `meta` and its own geometry, instance number = frame number).
    fn segment(
        &mut self,
        ctx: &InferenceContext,
        meta: &InstanceMeta,
        path: &Path,
        seed_ahead: bool,
    ) -> Result<Vec<(InstanceMeta, SliceSegmentation)>> {
        let t0 = Instant::now();
        let obj = crate::spool::read_instance(path).with_context(|| format!("reading {}", path.display()))?;
        let mut frames = crate::decode::decode_stored_frames(&obj).context("decoding pixel data")?;
        drop(obj);
        if frames.is_empty() {
            anyhow::bail!("no frame");
        }
        if !meta.is_multi_frame_ct_class() {
            frames.truncate(1);
        }
        self.decode_ms += ms(t0.elapsed());
        let input = &ctx.model.manifest.input;
        let classes = ctx.model.manifest.output.classes.len();
        let mut out = Vec::with_capacity(frames.len());
        for stored in frames {
            let t0 = Instant::now();
            let hu = stored.into_hu();
            let mut frame_meta = meta.clone();
            if meta.is_multi_frame_ct_class() {
                frame_meta.image_position = hu.image_position.or(meta.image_position);
                frame_meta.image_orientation = hu.image_orientation.or(meta.image_orientation);
                if hu.pixel_spacing_known {
                    frame_meta.pixel_spacing = Some(hu.pixel_spacing);
                }
                frame_meta.slice_thickness = hu.slice_thickness.or(meta.slice_thickness);
                frame_meta.instance_number = Some(hu.frame as i64 + 1);
                frame_meta.number_of_frames = 1;
            }
            let mut x = vec![0f32; input.channels * input.height * input.width];
            preprocess::prepare(&hu, input, &mut x).context("normalising")?;
            let t1 = Instant::now();
            let scores = ctx.engine.infer(&x, 1).context("inference")?;
            #[cfg(feature = "test-hooks")]
            slow_engine_for_tests();
            let t2 = Instant::now();
            let seg = analysis::segment_slice(&scores, classes, input.height, input.width, &hu);
            // The lung guard's per-slice seeding now, while the scanner is still sending, not at completion.
            let seg = if seed_ahead {
                let mut placed = placed_slice(&frame_meta, seg, 0.0);
                placed.segmentation.pre_seed = analysis::lung_guard::pre_seed(&placed);
                placed.segmentation
            } else {
                seg
            };
            let t3 = Instant::now();
            self.decode_ms += ms(t1 - t0);
            self.infer_ms += ms(t2 - t1);
            self.segment_ms += ms(t3 - t2);
            out.push((frame_meta, seg));
        }
        Ok(out)
    }

    /// Every slice's attributes: each instance's, or the frames' of a decoded multi-frame instance.
    fn slice_metas(&self) -> Vec<&InstanceMeta> {
        self.metas
            .iter()
            .flat_map(|(uid, m)| match self.frame_metas.get(uid) {
                Some(frames) => frames.iter().collect::<Vec<_>>(),
                None => vec![m],
            })
            .collect()
    }

    /// The 3D analysis and the series' result (without store-assigned fields such as `version`), plus the analysed
    /// slices in position order with their final masks (the input of the DICOM outputs; empty when the series was
    /// not analysed). `patient_key` and the two timestamps (RFC 3339) come from the caller. With
    /// `enforce_eligibility` (the daemon) a series that breaks an eligibility rule gets a `skipped` result with the
    /// reasons and no figures; without it (`analyze`) every CT series is analysed and the reasons are only listed.
    pub fn finish_with_slices(
        &self,
        ctx: &InferenceContext,
        patient_key: &str,
        received_at: &str,
        completed_at: &str,
        enforce_eligibility: bool,
    ) -> (SeriesResult, Vec<crate::outputs::SourceSlice>) {
        let t0 = Instant::now();
        let all: Vec<&InstanceMeta> = self.slice_metas();
        let would_skip = series::series_skip_reasons(&all, &ctx.config.series);
        let first = all.first();
        let study = first.map(|m| m.study_instance_uid.clone()).unwrap_or_default();
        let series_uid = first.map(|m| m.series_instance_uid.clone()).unwrap_or_default();

        let seg_metas: Vec<&InstanceMeta> = self.segmented.values().map(|s| &s.meta).collect();
        let order = series::order_slices(&seg_metas);
        let segs: Vec<&SegmentedInstance> = self.segmented.values().collect();
        let placed: Vec<PlacedSlice> = order
            .order
            .iter()
            .zip(order.positions_mm.iter())
            .map(|(&i, &z)| placed_slice(&segs[i].meta, segs[i].segmentation.unpack(), z))
            .collect();
        let place_ms = ms(t0.elapsed());
        let params = AnalysisParams::from(&ctx.config.analysis);
        let analysed = !placed.is_empty() && (!enforce_eligibility || would_skip.is_empty());
        let t3d = Instant::now();
        let result = if analysed { Some(analysis::analyse_series(&placed, &params)) } else { None };
        let a3d_ms = ms(t3d.elapsed());
        let analysis_ms = ms(t0.elapsed()) + self.segment_ms;
        let sop_order: Vec<&str> = order.order.iter().map(|&i| segs[i].meta.sop_instance_uid.as_str()).collect();
        // Frame numbers of the slices in that order, only when some slice is a frame of a multi-frame instance.
        let frame_order: Option<Vec<u32>> = segs
            .iter()
            .any(|s| s.frame.is_some())
            .then(|| order.order.iter().map(|&i| segs[i].frame.unwrap_or(1)).collect());

        let figures = result.as_ref().map(crate::result::Figures::of);
        let v = SeriesResult {
            study_instance_uid: study,
            series_instance_uid: series_uid,
            patient_key: patient_key.to_string(),
            study_date: first.map(|m| m.study_date.clone()).unwrap_or_default(),
            status: if analysed { SeriesStatus::Analysed } else { SeriesStatus::Skipped },
            skip_reasons: would_skip,
            n_slices: all.len(),
            analysed_slices: if analysed { placed.len() } else { 0 },
            slice_errors: self
                .errors
                .iter()
                .map(|(k, v)| SliceError { sop_instance_uid: k.clone(), error: v.clone() })
                .collect(),
            slice_spacing_mm: match &result {
                Some(r) => Some(r.slice_spacing_mm),
                None => order.spacing_mm,
            },
            gaps: order.gaps.clone(),
            duplicates: order.duplicates.clone(),
            slice_sop_instance_uids: sop_order.into_iter().map(str::to_string).collect(),
            slice_frame_numbers: frame_order,
            model: ctx.model.identity(),
            engine: ctx.engine.name().to_string(),
            timings_ms: Timings {
                decode: round1(self.decode_ms),
                infer: round1(self.infer_ms),
                analysis: round1(analysis_ms),
                total: round1(self.decode_ms + self.infer_ms + analysis_ms),
            },
            received_at: received_at.to_string(),
            completed_at: completed_at.to_string(),
            positive: analysed && result.as_ref().is_some_and(|r| r.positive),
            figures,
            follow_up: None,
            study_alert: None,
            alert: None,
            alert_reasons: None,
            version: None,
            dicom_outputs: None,
        };
        let source_slices = match &result {
            // lesion_masks[k] and lung_masks[k] belong to placed[slice_order[k]], which is segs[order.order[slice_order[k]]].
            Some(r) => r
                .slice_order
                .iter()
                .zip(r.lesion_masks.iter().zip(&r.lung_masks))
                .map(|(&j, masks)| (order.order[j], masks))
                .map(|(i, (lesion, lung))| crate::outputs::SourceSlice {
                    meta: segs[i].meta.clone(),
                    frame: segs[i].frame,
                    path: segs[i].path.clone(),
                    lung: lung.clone(),
                    lesion: lesion.clone(),
                })
                .collect(),
            None => Vec::new(),
        };
        tracing::debug!(place_ms, a3d_ms, total_ms = ms(t0.elapsed()), "finish: placed slices, 3D analysis, all");
        (v, source_slices)
    }
}

/// A slice's masks placed with its attributes' geometry (the defaults stand in for missing attributes), at
/// `position_mm` along the series' normal: one function, so the lung guard's pre-seed while streaming and its
/// check at completion see the same geometry.
fn placed_slice(m: &InstanceMeta, segmentation: SliceSegmentation, position_mm: f64) -> PlacedSlice {
    PlacedSlice {
        segmentation,
        position_mm,
        image_position: m.image_position.unwrap_or([0.0; 3]),
        image_orientation: m.image_orientation.unwrap_or([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
        pixel_spacing: m.pixel_spacing.unwrap_or([1.0, 1.0]),
        slice_thickness: m.slice_thickness,
    }
}

/// Test hook (built only with the `test-hooks` feature): `LUNGSENTRY_TEST_SLOW_ENGINE_MS` adds that many
/// milliseconds to every slice's inference, to stand for a slow box (tract on a Jetson's CPU cores, an emulated
/// build) in the test that the scanner is never made to wait long (`tests/slow_engine.rs`).
#[cfg(feature = "test-hooks")]
fn slow_engine_for_tests() {
    static MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let ms = *MS
        .get_or_init(|| std::env::var("LUNGSENTRY_TEST_SLOW_ENGINE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0));
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Which file a path names and which version of it: the spool stores a repeat of a SOP Instance UID by renaming a
/// new file over the old one, so the inode changes (and usually size and modification time with it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileIdentity {
    fn of(path: &Path) -> Option<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        })
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
