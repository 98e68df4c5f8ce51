//! liveness — the daemon's own evidence that it is making progress, and the systemd watchdog that trusts only it.
//!
//! Owns: heartbeats of the completion ticker (proves the async runtime still schedules), "busy" markers around
//! every blocking step of a series worker (a segmentation or a 3D analysis that never returns is a stuck
//! pipeline), a store probe, the decision whether to pet the watchdog (`WATCHDOG=1`), and the `STATUS=` line.
//! Never: restarts anything itself — when the pipeline is stuck it stops petting and lets systemd
//! (`WatchdogSec=`, `Restart=on-failure`) kill and restart the service, which then resumes from the durable store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::store::Store;

/// Progress evidence shared by the ticker, the workers and the watchdog task.
#[derive(Debug)]
pub struct Liveness {
    /// Reference point of the millisecond counters below.
    origin: Instant,
    /// Milliseconds since `origin` of the completion ticker's last beat.
    last_beat_ms: AtomicU64,
    /// Blocking steps in progress: id → (started, what).
    busy: Mutex<HashMap<u64, (Instant, &'static str)>>,
    /// Next busy-marker id.
    next_id: AtomicU64,
    /// Series analysed since start (for STATUS=).
    analysed: AtomicU64,
}

/// Marks one blocking step as in progress until dropped.
pub struct BusyGuard {
    live: Arc<Liveness>,
    id: u64,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.live.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// Why the watchdog is not being petted.
#[derive(Debug, Clone, PartialEq)]
pub enum Stuck {
    /// The completion ticker has not beaten for this long.
    TickerSilent(Duration),
    /// A blocking step has been running for this long.
    StepTooLong(&'static str, Duration),
    /// The SQLite store did not answer a probe.
    StoreUnresponsive(String),
}

impl std::fmt::Display for Stuck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stuck::TickerSilent(d) => write!(f, "completion ticker silent for {:.1} s", d.as_secs_f64()),
            Stuck::StepTooLong(w, d) => write!(f, "{w} running for {:.1} s", d.as_secs_f64()),
            Stuck::StoreUnresponsive(e) => write!(f, "store unresponsive: {e}"),
        }
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            origin: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            busy: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            analysed: AtomicU64::new(0),
        }
    }
}

impl Liveness {
    /// The completion ticker ran.
    pub fn beat(&self) {
        self.last_beat_ms.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// A series analysis finished (counted in STATUS=).
    pub fn analysed(&self) {
        self.analysed.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks a blocking step as running until the guard drops.
    pub fn busy(self: &Arc<Self>, what: &'static str) -> BusyGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (Instant::now(), what));
        BusyGuard { live: self.clone(), id }
    }

    /// Whether the pipeline is making progress at `now`: the ticker beat within `max_silence` and no blocking
    /// step has run longer than `max_step`.
    pub fn verdict(&self, now: Instant, max_silence: Duration, max_step: Duration) -> Result<(), Stuck> {
        let beat = self.origin + Duration::from_millis(self.last_beat_ms.load(Ordering::Relaxed));
        let silent = now.saturating_duration_since(beat);
        if silent > max_silence {
            return Err(Stuck::TickerSilent(silent));
        }
        let busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((started, what)) = busy.values().min_by_key(|(s, _)| *s) {
            let d = now.saturating_duration_since(*started);
            if d > max_step {
                return Err(Stuck::StepTooLong(what, d));
            }
        }
        Ok(())
    }

    /// One `STATUS=` line.
    pub fn status_line(&self, workers: usize) -> String {
        format!(
            "serving; {} series analysed since start; {} series open; {} step(s) running",
            self.analysed.load(Ordering::Relaxed),
            workers,
            self.busy.lock().unwrap_or_else(|p| p.into_inner()).len()
        )
    }
}

/// Limits the watchdog applies for a systemd `WatchdogSec` of `watchdog`: pet every half period; the ticker
/// (100 ms) may be silent for half a period; one blocking step may take half a period but at least 10 s.
pub fn limits(watchdog: Duration) -> (Duration, Duration, Duration) {
    let half = watchdog / 2;
    (half, half, half.max(Duration::from_secs(10)))
}

/// Pets the systemd watchdog while the pipeline makes progress; sends `STATUS=` lines. Runs only when systemd
/// asked for a watchdog (`WATCHDOG_USEC` for our pid); otherwise sends STATUS= every 10 s.
pub async fn run(
    live: Arc<Liveness>,
    store: Arc<Store>,
    workers: impl Fn() -> usize + Send + 'static,
    mut shutdown: watch::Receiver<bool>,
) {
    let watchdog = sd_notify::watchdog_enabled();
    let (period, max_silence, max_step) = match watchdog {
        Some(w) => limits(w),
        None => (Duration::from_secs(10), Duration::MAX, Duration::MAX),
    };
    if let Some(w) = watchdog {
        tracing::info!(
            watchdog_s = w.as_secs_f64(),
            "systemd watchdog enabled: petting while the pipeline makes progress"
        );
    }
    let mut tick = tokio::time::interval(period);
    let mut was_stuck = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = shutdown.changed() => return,
        }
        // The store answers within the step limit (a wedged SQLite lock is a stuck pipeline too).
        let probe = {
            let store = store.clone();
            let t = tokio::task::spawn_blocking(move || store.pragmas().map(|_| ()));
            match tokio::time::timeout(max_step.min(Duration::from_secs(3600)), t).await {
                Ok(Ok(Ok(()))) => Ok(()),
                Ok(Ok(Err(e))) => Err(Stuck::StoreUnresponsive(format!("{e:#}"))),
                Ok(Err(e)) => Err(Stuck::StoreUnresponsive(e.to_string())),
                Err(_) => Err(Stuck::StoreUnresponsive("probe timed out".into())),
            }
        };
        let verdict = probe.and_then(|()| live.verdict(Instant::now(), max_silence, max_step));
        let status = match &verdict {
            Ok(()) => live.status_line(workers()),
            Err(s) => format!("STUCK: {s}"),
        };
        match verdict {
            Ok(()) => {
                if was_stuck {
                    tracing::warn!("pipeline progressing again");
                }
                was_stuck = false;
                let mut states = vec![sd_notify::NotifyState::Status(&status)];
                if watchdog.is_some() {
                    states.push(sd_notify::NotifyState::Watchdog);
                }
                let _ = sd_notify::notify(&states);
            }
            Err(s) => {
                if !was_stuck {
                    tracing::error!(reason = %s, "pipeline stuck: no longer petting the systemd watchdog");
                }
                was_stuck = true;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progressing_pipeline_is_alive() {
        let live = Arc::new(Liveness::default());
        live.beat();
        let _g = live.busy("segmentation");
        assert_eq!(live.verdict(Instant::now(), Duration::from_secs(5), Duration::from_secs(10)), Ok(()));
    }

    #[test]
    fn silent_ticker_is_stuck() {
        let live = Liveness::default();
        live.beat();
        let later = Instant::now() + Duration::from_secs(6);
        assert!(matches!(
            live.verdict(later, Duration::from_secs(5), Duration::from_secs(10)),
            Err(Stuck::TickerSilent(_))
        ));
    }

    #[test]
    fn a_step_that_never_returns_is_stuck_and_clears_when_it_does() {
        let live = Arc::new(Liveness::default());
        let g = live.busy("3D analysis");
        let later = Instant::now() + Duration::from_secs(11);
        live.last_beat_ms.store(11_000 + live.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
        assert!(matches!(
            live.verdict(later, Duration::from_secs(5), Duration::from_secs(10)),
            Err(Stuck::StepTooLong("3D analysis", _))
        ));
        drop(g);
        assert_eq!(live.verdict(later, Duration::from_secs(5), Duration::from_secs(10)), Ok(()));
    }

    #[test]
    fn limits_follow_the_watchdog_period() {
        let (pet, silence, step) = limits(Duration::from_secs(30));
        assert_eq!((pet, silence, step), (Duration::from_secs(15), Duration::from_secs(15), Duration::from_secs(15)));
        assert_eq!(limits(Duration::from_secs(4)).2, Duration::from_secs(10));
    }
}
