//! segpool — the threads that segment slices, one per core, at a lower CPU priority than the receive path.
//!
//! Receiving is what the scanner waits on; segmentation is deferred work whose queue is bounded in seconds by
//! `backlog`. On a 2-core appliance both compete for the same cores, and at equal priority an unpaced sender was
//! answered at about a third of DCMTK storescp's speed while the engine's threads ran. So slice segmentation runs
//! on its own threads at `engine.segment_nice` (default +10; the Linux scheduler then gives a runnable receive
//! thread ~90 % of a contended core) and fills the time the receive path spends waiting for fsync. The engine's
//! own worker threads (ONNX Runtime's intra-op pool) inherit the priority of the thread that builds the engine,
//! so the daemon builds it through [`at_nice`] too. The 3D analysis, the store and the notifications stay at the
//! daemon's priority: they are on the alert's critical path.
//!
//! Owns: the threads, their priority, handing a job over and its result back. Never: decides what to segment.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of segmentation threads fed through one queue.
pub struct SegmentPool {
    tx: mpsc::Sender<Job>,
}

/// The job panicked (its thread lives on).
#[derive(Debug)]
pub struct Panicked;

impl SegmentPool {
    /// `threads` threads (at least one) running `nice` levels below the daemon's priority (0 = the same).
    pub fn new(threads: usize, nice: i32) -> std::io::Result<SegmentPool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new().name(format!("segment-{i}")).spawn(move || {
                set_thread_nice(nice);
                loop {
                    // The lock is held only while waiting for the next job, never while running one.
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return, // the pool was dropped
                    }
                }
            })?;
        }
        Ok(SegmentPool { tx })
    }

    /// Runs `f` on a pool thread and waits (asynchronously) for its result. Jobs start in submission order as
    /// threads free up.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, Panicked> {
        let (done_tx, done_rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| Panicked);
            let _ = done_tx.send(out);
        });
        if self.tx.send(job).is_err() {
            return Err(Panicked);
        }
        done_rx.await.map_err(|_| Panicked)?
    }
}

/// Runs `f` on a short-lived thread `nice` levels below the caller's priority and returns its result: threads that `f` starts (an engine's
/// worker pool) inherit that priority.
pub fn at_nice<T: Send + 'static>(nice: i32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::scope(|s| {
        s.spawn(move || {
            set_thread_nice(nice);
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Lowers the calling thread's priority by `nice` levels (Linux: nice is per thread; capped at 19). Lowering needs
/// no privilege; a failure only costs the ordering, so it is logged, not fatal.
fn set_thread_nice(nice: i32) {
    if nice <= 0 {
        return;
    }
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    // SAFETY: getpriority/setpriority with PRIO_PROCESS and a thread id read or change only that thread. getpriority
    // returns -1 both as a value and as an error; errno tells them apart (an error leaves the base at 0).
    let base = unsafe {
        *libc::__errno_location() = 0;
        let p = libc::getpriority(libc::PRIO_PROCESS, tid);
        if p == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            p
        }
    };
    // SAFETY: setpriority on this thread's own id changes only this thread's nice value.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, (base + nice).min(19)) };
    if r != 0 {
        tracing::warn!(nice, error = %std::io::Error::last_os_error(), "could not lower the segmentation threads' priority");
    }
}

/// The calling thread's nice value.
#[cfg(test)]
fn thread_nice() -> i32 {
    // SAFETY: getpriority only reads (the tests' nice values are never -1).
    unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_at_the_pool_priority_and_panics_are_reported() {
        let base = thread_nice();
        let pool = SegmentPool::new(2, 5).unwrap();
        let seen = pool.run(thread_nice).await.unwrap();
        assert_eq!(seen, (base + 5).min(19), "the pool thread runs 5 nice levels lower");
        assert!(pool.run(|| panic!("boom")).await.is_err());
        // The thread that caught the panic still serves jobs.
        let sum: u32 = futures_sum(&pool).await;
        assert_eq!(sum, (0..8).sum::<u32>());
        // at_nice: the closure and threads it starts inherit the priority; the caller keeps its own.
        let inner = at_nice(3, || std::thread::spawn(thread_nice).join().unwrap());
        assert_eq!(inner, (base + 3).min(19));
        assert_eq!(thread_nice(), base);
    }

    async fn futures_sum(pool: &SegmentPool) -> u32 {
        let mut total = 0;
        for i in 0..8u32 {
            total += pool.run(move || i).await.unwrap();
        }
        total
    }
}
