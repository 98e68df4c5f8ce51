//! retention — keeps the spool from growing without bound: purges the pixel data (spool instance files) of
//! finished series after `storage.retention_hours`, and oldest-first when the data dir's file system is fuller
//! than `storage.purge_high_water_percent` or a new instance does not fit.
//!
//! With a series' pixel data go the files made from its pixels: the dashboard key image and the DICOM output
//! files (SEG, SR, key images) — all delivered or parked by then.
//!
//! Owns: choosing what to purge (through [`Store::purge_candidates`]: only series analysed or skipped with a
//! result of their current revision and no DICOM output pending in the outbox), marking it purged in the store,
//! deleting the files, and the periodic background task.
//! Never: deletes results, alerts, outputs rows (the outbox rows stay, their files go), the masks summary in the result JSON, or the instance rows (a
//! purged instance keeps its routing attributes, so a late re-analysis can say its pixels were purged); never
//! touches a series that is receiving, waiting for analysis, failed, or still has DICOM outputs to deliver.
//!
//! The disk reserve: a purge writes to the store (it marks the instances purged before deleting their files, so
//! a crash in between never leaves rows pointing at files that are gone), and on a completely full disk SQLite
//! cannot grow its log for that write — the purge that would make room fails for want of room. So the data dir
//! keeps a small reserve file ([`RESERVE_FILE`], [`RESERVE_BYTES`]); a purge that fails with
//! [`StoreError::DiskFull`] deletes it and tries once more, and the periodic pass puts it back once there is room
//! again.
//!
//! Deletes: every file and directory goes through [`DataDir::remove_inside`] (or `remove_dir_if_empty`), which
//! refuses anything that is not strictly inside the data dir or is a fixed part of its layout — a spool path
//! read back from the store, or a series UID that an older version stored unvalidated (`..`), can never make a
//! purge delete the store, the data dir, or anything outside it. The key image and output directory of a
//! series are found through the layout ([`DataDir::key_image_of`], [`DataDir::series_outputs_of`]): a stored
//! UID that is not a UID names only a hash there.
//!
//! Concurrency: a purge holds the write side of the daemon's spool guard while it marks and deletes, and every
//! instance is spooled and recorded under the read side — so a re-sent instance can never have its freshly
//! acknowledged file deleted by a purge that chose its series a moment before.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::StorageConfig;
use crate::datadir::{DataDir, Removed};
use crate::store::{now_ms, series_log_key, Result, Store, StoreError};

/// Longest pause between two periodic checks.
const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// Shortest pause between two periodic checks.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Series examined per round.
const BATCH: usize = 64;
/// The disk reserve's file name in the data dir.
pub const RESERVE_FILE: &str = crate::datadir::RESERVE_FILE;
/// The disk reserve's size: room for the store to record a purge on an otherwise full disk.
pub const RESERVE_BYTES: u64 = 4 << 20;

/// What one purge pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Series whose pixel data was purged.
    pub series: usize,
    /// Spool files deleted.
    pub files: usize,
    /// Bytes those files held (as recorded when they were stored).
    pub bytes: u64,
}

impl PurgeReport {
    fn add(&mut self, other: PurgeReport) {
        self.series += other.series;
        self.files += other.files;
        self.bytes += other.bytes;
    }
}

/// The retention policy over one data dir.
#[derive(Debug)]
pub struct Retention {
    store: Arc<Store>,
    cfg: StorageConfig,
    /// The data dir's layout: where the files named after a series are, and the checked delete.
    layout: DataDir,
    /// Write side held while purging; the instance path holds the read side while spooling + recording.
    guard: Arc<RwLock<()>>,
}

impl Retention {
    /// `guard` is the daemon's spool guard (see the module docs).
    pub fn new(store: Arc<Store>, cfg: StorageConfig, guard: Arc<RwLock<()>>) -> Retention {
        let layout = DataDir::new(&cfg.data_dir);
        Retention { store, cfg, guard, layout }
    }

    /// Percent used of the data dir's file system (None when it cannot be read).
    pub fn disk_used_percent(&self) -> Option<f64> {
        crate::datadir::disk_usage(&self.cfg.data_dir).map(|(ratio, _)| ratio * 100.0)
    }

    /// Whether the data dir's file system is fuller than `purge_high_water_percent`.
    pub fn above_high_water(&self) -> bool {
        self.disk_used_percent().is_some_and(|p| p > self.cfg.purge_high_water_percent)
    }

    /// Purges one series' pixel data if it is still purgeable; blocking.
    pub fn purge_series(&self, series_uid: &str, why: &str) -> Result<PurgeReport> {
        let _w = self.guard.write().unwrap_or_else(|p| p.into_inner());
        let paths = self.store.mark_series_purged(series_uid)?;
        if paths.is_empty() {
            return Ok(PurgeReport::default());
        }
        let mut report = PurgeReport { series: 1, ..Default::default() };
        let mut dirs: Vec<PathBuf> = Vec::new();
        for p in &paths {
            match self.layout.remove_inside(p) {
                Ok(Removed::File { bytes }) => {
                    report.files += 1;
                    report.bytes += bytes;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(series = %series_log_key(series_uid), error = %e, "retention: a spool file was not deleted")
                }
            }
            if let Some(d) = p.parent() {
                if !dirs.iter().any(|x| x == d) {
                    dirs.push(d.to_path_buf());
                }
            }
        }
        for d in dirs {
            // Empty series directories go too (and their parent when that empties); kept otherwise.
            if self.layout.remove_dir_if_empty(&d).unwrap_or(false) {
                if let Some(parent) = d.parent() {
                    let _ = self.layout.remove_dir_if_empty(parent);
                }
            }
        }
        // What was made from the pixels goes with them: the dashboard's key image and the DICOM output files
        // (every output row of a purgeable series is delivered or parked; the rows stay).
        let mut derived = 0usize;
        for (what, path) in [
            ("the key image", self.layout.key_image_of(series_uid)),
            ("the DICOM output files", self.layout.series_outputs_of(series_uid)),
        ] {
            match self.layout.remove_inside(&path) {
                Ok(Removed::Absent) => {}
                Ok(_) => derived += 1,
                Err(e) => {
                    tracing::error!(series = %series_log_key(series_uid), error = %e, "retention: {what} not deleted")
                }
            }
        }
        tracing::info!(
            series = %series_log_key(series_uid),
            stage = "retention",
            reason = why,
            files = report.files,
            bytes = report.bytes,
            derived,
            "retention: purged the series' pixel data, key image and DICOM output files (results and alerts kept)"
        );
        Ok(report)
    }

    /// Purges the pixel data of finished series whose last instance is older than `retention_hours`.
    pub fn purge_expired(&self) -> Result<PurgeReport> {
        let mut report = PurgeReport::default();
        if self.cfg.retention_hours <= 0.0 {
            return Ok(report);
        }
        let cutoff = now_ms() - (self.cfg.retention_hours * 3_600_000.0) as i64;
        loop {
            let batch = self.store.purge_candidates(Some(cutoff), BATCH)?;
            let mut progressed = false;
            for c in &batch {
                let r = self.purge_series(&c.series_instance_uid, "retention_hours")?;
                progressed |= r.series > 0;
                report.add(r);
            }
            if batch.len() < BATCH || !progressed {
                return Ok(report);
            }
        }
    }

    /// Purges finished series oldest first while the file system is fuller than `purge_high_water_percent`.
    pub fn relieve_pressure(&self) -> Result<PurgeReport> {
        let mut report = PurgeReport::default();
        while self.above_high_water() {
            let r = self.purge_oldest("disk above storage.purge_high_water_percent")?;
            if r.series == 0 {
                break;
            }
            report.add(r);
        }
        Ok(report)
    }

    /// Purges the oldest purgeable series (a new instance did not fit). `series == 0`: nothing could be purged.
    pub fn purge_oldest(&self, why: &str) -> Result<PurgeReport> {
        for c in self.store.purge_candidates(None, 8)? {
            let r = self.purge_series(&c.series_instance_uid, why)?;
            if r.series > 0 {
                return Ok(r);
            }
        }
        Ok(PurgeReport::default())
    }

    /// One periodic pass: expired series, then disk pressure, then the disk reserve; blocking.
    pub fn pass(&self) -> Result<PurgeReport> {
        let mut r = self.purge_expired()?;
        r.add(self.relieve_pressure()?);
        self.ensure_reserve();
        Ok(r)
    }

    /// [`Retention::purge_oldest`] for an instance that found the disk full: when the purge itself fails because
    /// the disk is full (the store could not record it), the disk reserve is released and the purge tried again.
    pub fn purge_oldest_on_full_disk(&self, why: &str) -> Result<PurgeReport> {
        match self.purge_oldest(why) {
            Err(e @ StoreError::DiskFull(_)) if self.release_reserve() => {
                tracing::warn!(stage = "retention", error = %format!("{e:#}"),
                    "the disk is too full to record a purge: released the disk reserve and trying again");
                self.purge_oldest(why)
            }
            other => other,
        }
    }

    fn reserve_path(&self) -> PathBuf {
        self.layout.reserve_file()
    }

    /// Deletes the disk reserve; true when there was one.
    pub fn release_reserve(&self) -> bool {
        matches!(self.layout.remove_inside(&self.reserve_path()), Ok(Removed::File { .. }))
    }

    /// Creates the disk reserve when it is missing and the file system has room for it several times over (it is
    /// never what fills the disk). Written with zeros and fsynced, so its blocks are really allocated; best effort.
    pub fn ensure_reserve(&self) {
        let path = self.reserve_path();
        if path.exists() {
            return;
        }
        let free = crate::datadir::disk_usage(&self.cfg.data_dir).map(|(_, free)| free).unwrap_or(0);
        if free < 4 * RESERVE_BYTES {
            return;
        }
        let tmp = path.with_extension("tmp");
        let made = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..RESERVE_BYTES / (1 << 20) {
                f.write_all(&zeros)?;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = made {
            let _ = self.layout.remove_inside(&tmp);
            tracing::warn!(stage = "retention", error = %e, "could not create the disk reserve");
        }
    }

    /// How often the background task looks: a tenth of the retention period, within 1 s ..= 60 s.
    pub fn interval(&self) -> Duration {
        let tenth = Duration::from_secs_f64((self.cfg.retention_hours * 360.0).max(0.0));
        if self.cfg.retention_hours <= 0.0 {
            MAX_INTERVAL
        } else {
            tenth.clamp(MIN_INTERVAL, MAX_INTERVAL)
        }
    }
}

/// The background task: a pass every [`Retention::interval`] until `shutdown` turns true.
pub async fn run(retention: Arc<Retention>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(retention.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = shutdown.changed() => return,
        }
        let r = retention.clone();
        match tokio::task::spawn_blocking(move || r.pass()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(stage = "retention", error = %format!("{e:#}"), "retention pass failed"),
            Err(e) => tracing::error!(stage = "retention", error = %e, "retention pass panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_reserve_is_made_when_there_is_room_and_released_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("s.sqlite")).unwrap());
        let cfg = StorageConfig { data_dir: dir.path().to_path_buf(), ..Default::default() };
        let r = Retention::new(store, cfg, Arc::new(RwLock::new(())));
        let path = dir.path().join(RESERVE_FILE);
        assert!(!r.release_reserve(), "nothing to release before it exists");
        r.pass().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), RESERVE_BYTES, "the pass creates the reserve");
        assert!(r.release_reserve());
        assert!(!path.exists());
        r.ensure_reserve();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), RESERVE_BYTES, "and puts it back");
        // Nothing purgeable: the full-disk purge reports nothing purged and keeps the reserve.
        assert_eq!(r.purge_oldest_on_full_disk("test").unwrap().series, 0);
        assert!(path.exists());
    }
}
