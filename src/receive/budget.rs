//! budget — the memory budget shared by every association (`dicom.max_buffered_mb`).
//!
//! Owns: one byte count for everything the SCP holds of datasets at once — the bytes of messages still arriving,
//! and (topped up when a message completes) the spool's working copy of each until its status is known — and
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

    fn try_add(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(bytes).filter(|n| *n <= self.limit))
            .is_ok()
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
    /// Takes `more` bytes of the budget before the buffer grows by them; `false` (nothing taken) when that would
    /// pass the limit.
    pub fn grow(&mut self, more: u64) -> bool {
        if more == 0 {
            return true;
        }
        if self.budget.try_add(more) {
            self.bytes += more;
            true
        } else {
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
        assert!(!a.grow(1));
        drop(a);
        assert_eq!(b.used(), 40);
        assert!(c.grow(60));
        drop(c);
        assert_eq!(b.used(), 0);
    }
}
