//! budget — the memory budget shared by every association (`dicom.max_buffered_mb`).
//!
//! Owns: one byte count for everything the SCP holds of datasets at once — the bytes of messages still arriving
//! and, reserved as they arrive, the spool's working copy of each until its status is known (topped up for the
//! inflated form of a deflated message when it completes) — and
//! the rule that a message whose buffer would grow past the budget is refused: it gets 0xA700, its bytes so far
//! are freed at once and the rest of it is read and dropped, never allocated. Whichever message hits the limit is
//! the one refused; the others keep growing into what it freed, so with a budget of at least one maximum-size
//! message plus its working copy, some message always completes (no livelock among peers that all send big).
//! Hands on: [`Charge`]s, which give their bytes back when dropped (with the message or after its reply).
//! Never: waits, blocks a peer, or allocates anything itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The budget: a limit and what is charged against it now.
#[derive(Debug)]
pub struct BufferBudget {
    /// Bytes that may be charged at once.
    limit: u64,
    /// Bytes charged now (sum of the live [`Charge`]s).
    used: AtomicU64,
}

impl BufferBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<BufferBudget> {
        Arc::new(BufferBudget { limit, used: AtomicU64::new(0) })
    }

    /// The limit, bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// An empty charge against this budget, to grow with [`Charge::grow`].
    pub fn charge(self: &Arc<Self>) -> Charge {
        Charge { budget: self.clone(), bytes: 0 }
    }

    /// One atomic step: adds `more` when `held + more` fits beside everything else, else takes `held` back.
    /// Growing and giving up in the same step is what guarantees progress: two messages that each see the other's
    /// bytes and fail in separate steps could both give up (it happened: 16 of 16 refused), but here the one that
    /// fails first has already left the room when the other looks.
    fn grow_or_release(&self, held: u64, more: u64) -> bool {
        let mut grew = false;
        let _ = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
            grew = u.checked_add(more).is_some_and(|n| n <= self.limit);
            Some(if grew { u + more } else { u - held })
        });
        grew
    }
}

/// Bytes one message holds of the budget; given back when dropped.
#[derive(Debug)]
pub struct Charge {
    /// The budget charged.
    budget: Arc<BufferBudget>,
    /// Bytes this charge holds.
    bytes: u64,
}

impl Charge {
    /// Takes `more` bytes of the budget before the buffer grows by them; when that would pass the limit, gives
    /// back everything this charge held instead (in the same atomic step) and returns `false`: the message is
    /// refused, and its buffer must be freed.
    pub fn grow(&mut self, more: u64) -> bool {
        if more == 0 {
            return true;
        }
        if self.budget.grow_or_release(self.bytes, more) {
            self.bytes += more;
            true
        } else {
            self.bytes = 0;
            false
        }
    }

    /// The whole budget's limit, bytes.
    pub fn limit(&self) -> u64 {
        self.budget.limit
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Above this size a buffer gets its own mapping from the allocator (see [`return_freed_buffers_to_the_system`]):
/// a message growing past it, and every larger one. Not lower: at 256 KiB the per-slice buffers of the lung guard
/// and of tract's inference (a few MiB each) were mapped and unmapped per slice, which doubled the guard's seeding
/// time on the RICORD series (359 → 682 ms) and slowed tract's inference by about a quarter.
pub const OWN_MAPPING_BYTES: usize = 16 * 1024 * 1024;

/// Makes the budget hold for resident memory, not only for what is charged: glibc's allocator raises its mmap
/// threshold each time a large mapped buffer is freed (up to 32 MiB), after which buffers that size come from
/// per-thread arenas, whose freed space stays resident and fragments — with 16 peers all sending 40 MiB at once
/// that left the peak 123–168 MiB above idle for a 96 MiB budget (margin 64 MiB, exceeded once in CI). A fixed
/// threshold turns the dynamic one off: every buffer of [`OWN_MAPPING_BYTES`] or more is its own mapping, returned
/// to the system when freed and grown by `mremap` without a copy (the same run: +86 to +102 MiB over six runs).
/// Process-wide and idempotent; nothing on other C libraries, whose allocators have no such setting.
pub fn return_freed_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's tuning parameters; any value is valid.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_MAPPING_BYTES as libc::c_int) };
        if ok != 1 {
            tracing::warn!("mallopt(M_MMAP_THRESHOLD) refused: the memory budget bounds charged bytes only");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_stop_at_the_limit_and_give_back_when_dropped() {
        let b = BufferBudget::new(100);
        let mut a = b.charge();
        let mut c = b.charge();
        assert!(a.grow(60));
        assert!(!c.grow(41), "60 + 41 passes 100");
        assert_eq!(c.bytes(), 0, "a refused growth takes nothing");
        assert!(c.grow(40));
        assert_eq!(b.used(), 100);
        assert!(!a.grow(1), "full");
        assert_eq!((a.bytes(), b.used()), (0, 40), "a refused growth gives back what the charge held");
        drop(a);
        assert_eq!(b.used(), 40);
        assert!(c.grow(60));
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn of_two_messages_racing_for_the_last_room_one_always_keeps_its_bytes() {
        // Each thread holds half the budget and tries to grow past it at the same moment: whichever step comes
        // second sees the room the first one gave back.
        for _ in 0..200 {
            let b = BufferBudget::new(100);
            let go = Arc::new(std::sync::Barrier::new(2));
            let run = |b: Arc<BufferBudget>, go: Arc<std::sync::Barrier>| {
                std::thread::spawn(move || {
                    let mut c = b.charge();
                    assert!(c.grow(50));
                    go.wait();
                    let grew = c.grow(10);
                    (grew, c)
                })
            };
            let (x, y) = (run(b.clone(), go.clone()), run(b.clone(), go));
            let ((gx, cx), (gy, cy)) = (x.join().unwrap(), y.join().unwrap());
            assert!(gx != gy, "exactly one grows");
            assert_eq!(b.used(), cx.bytes() + cy.bytes());
            assert_eq!(b.used(), 60);
        }
    }
}
