//! webhook_outbox — alerts waiting to be delivered by webhook, and what became of them.
//!
//! Owns: the `outbox` table: queueing an alert (a result's or a link's rows are queued by `results.rs` in the
//! result's transaction; [`Store::enqueue_webhook`] for the others), at most once per dedup key; handing out the
//! due rows; recording each attempt; the totals; and the wake-up ([`Store::outbox_wake`]) when a row is queued.
//! Hands on: [`OutboxRow`]s to the webhook worker in `notify`, [`OutboxCounts`] to metrics and the dashboard.
//! Never: sends anything, decides the back-off, or changes a queued body (the signature covers its bytes).

use rusqlite::{params, Transaction};
use serde::Serialize;

use super::{now_ms, Result, Store};

/// One alert waiting in (or delivered from) the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    /// Row id (for `mark_delivered` / `mark_attempt_failed`).
    pub id: i64,
    /// Delivery channel; only `webhook` exists.
    pub kind: String,
    /// Unique per alert: `"{series_uid}/v{version}"`; receivers deduplicate on it.
    pub dedup_key: String,
    /// JSON body, to be sent byte for byte.
    pub payload_json: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// Not before this time (unix ms).
    pub next_attempt_at: i64,
    /// When it was queued (unix ms).
    pub created_at: i64,
}

/// Outbox totals, for metrics and the dashboard.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct OutboxCounts {
    /// Not yet delivered.
    pub pending: u64,
    /// Not yet delivered and failed at least once.
    pub failing: u64,
    /// Delivered.
    pub delivered: u64,
}

impl Store {
    /// Queues an alert directly (for alerts not tied to a result version). Returns None when the dedup key
    /// already exists (the alert is already queued or delivered).
    pub fn enqueue_webhook(&self, dedup_key: &str, payload_json: &str) -> Result<Option<i64>> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let id = insert_outbox(&tx, dedup_key, payload_json, now_ms())?;
        tx.commit()?;
        drop(c);
        if id.is_some() {
            self.outbox_wake.notify_one();
        }
        Ok(id)
    }

    /// Undelivered rows whose `next_attempt_at <= now_ms`, oldest due first, at most `limit`.
    pub fn due_outbox(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxRow>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT id, kind, dedup_key, payload_json, attempts, next_attempt_at, created_at FROM outbox
             WHERE delivered_at IS NULL AND next_attempt_at <= ?1 ORDER BY next_attempt_at, id LIMIT ?2",
        )?;
        let rows = st.query_map(params![now_ms, limit as i64], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                kind: r.get(1)?,
                dedup_key: r.get(2)?,
                payload_json: r.get(3)?,
                attempts: r.get::<_, i64>(4)? as u32,
                next_attempt_at: r.get(5)?,
                created_at: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// When the next undelivered row falls due (None: nothing pending).
    pub fn next_outbox_due(&self) -> Result<Option<i64>> {
        let c = self.lock();
        Ok(c.query_row("SELECT MIN(next_attempt_at) FROM outbox WHERE delivered_at IS NULL", [], |r| r.get(0))?)
    }

    /// Marks a row delivered (counts the attempt). Returns false when it was unknown or already delivered.
    pub fn mark_delivered(&self, id: i64) -> Result<bool> {
        let c = self.lock();
        let n = c.execute(
            "UPDATE outbox SET delivered_at = ?2, attempts = attempts + 1, last_error = NULL
             WHERE id = ?1 AND delivered_at IS NULL",
            params![id, now_ms()],
        )?;
        Ok(n == 1)
    }

    /// Records a failed attempt and when to try again.
    pub fn mark_attempt_failed(&self, id: i64, error: &str, next_attempt_at: i64) -> Result<()> {
        let c = self.lock();
        c.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3
             WHERE id = ?1 AND delivered_at IS NULL",
            params![id, error, next_attempt_at],
        )?;
        Ok(())
    }

    /// Pending / failing / delivered totals.
    pub fn outbox_counts(&self) -> Result<OutboxCounts> {
        let c = self.lock();
        Ok(c.query_row(
            "SELECT COALESCE(SUM(delivered_at IS NULL), 0), COALESCE(SUM(delivered_at IS NULL AND attempts > 0), 0),
                    COALESCE(SUM(delivered_at IS NOT NULL), 0) FROM outbox",
            [],
            |r| {
                Ok(OutboxCounts {
                    pending: r.get::<_, i64>(0)? as u64,
                    failing: r.get::<_, i64>(1)? as u64,
                    delivered: r.get::<_, i64>(2)? as u64,
                })
            },
        )?)
    }
}

/// Inserts one webhook row; None when its dedup key is already queued (or delivered).
pub(super) fn insert_outbox(
    tx: &Transaction<'_>,
    dedup_key: &str,
    payload_json: &str,
    now: i64,
) -> Result<Option<i64>> {
    let n = tx.execute(
        "INSERT INTO outbox (kind, dedup_key, payload_json, next_attempt_at, created_at)
         VALUES ('webhook', ?1, ?2, ?3, ?3) ON CONFLICT(dedup_key) DO NOTHING",
        params![dedup_key, payload_json, now],
    )?;
    Ok((n == 1).then(|| tx.last_insert_rowid()))
}
