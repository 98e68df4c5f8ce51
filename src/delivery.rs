//! delivery — the one durable-outbox loop that every delivery shares: the webhook alerts (`notify`) and the DICOM
//! outputs (`outputs::outbox`) each supply only their own attempt and their own store calls ([`Outbox`]).
//!
//! Owns: the loop ([`run`]): read a batch of due rows, attempt them in the groups the outbox asks for (one POST
//! per webhook row, one association per DICOM destination), record each outcome — delivered; failed and retried
//! after an exponential back-off ([`backoff`]: 1 s doubling to 5 min); parked when a retry cannot help or
//! [`Outbox::max_attempts`] ran out (no endless loop) — then sleep until the earliest retry falls due, a wake-up
//! ([`Outbox::wake`]) or [`IDLE_POLL`], never less than [`MIN_WAIT`] (a store that keeps failing must not spin the
//! loop). A full batch goes round again at once. Shutdown: checked before every round and during every attempt
//! and sleep; a shutdown during an attempt abandons it, so the row stays due and is attempted after the restart.
//! Every store call runs on the blocking pool.
//! Hands on: each outcome to the outbox's own [`Outbox::delivered`] / [`Outbox::failed`] (its metric and log line)
//! and its own store marks.
//! Never: decides what is queued, builds a payload or an object, or speaks a protocol.
//!
//! The rows live in SQLite until delivered or parked, so delivery is at least once: a crash between the
//! receiver's success and the mark repeats the attempt (webhooks carry a dedup key; a PACS takes the same SOP
//! instance again as the same object).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::store::now_ms;

/// First retry delay; doubles per failed attempt.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// Longest sleep between rounds when nothing wakes the loop (guards against a missed wake-up, e.g. rows queued by
/// another process sharing the database).
pub const IDLE_POLL: Duration = Duration::from_secs(30);
/// Shortest pause between rounds that found nothing more to send.
pub const MIN_WAIT: Duration = Duration::from_millis(100);

/// Delay before the next try after `attempts_so_far` failed attempts (0 → 1 s, 1 → 2 s, ... capped at 5 min).
pub fn backoff(attempts_so_far: u32) -> Duration {
    let secs = BACKOFF_START.as_secs().saturating_mul(1u64 << attempts_so_far.min(20));
    Duration::from_secs(secs).min(BACKOFF_CAP)
}

/// What one attempt at one row came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver took it, with this status (HTTP status, DIMSE status).
    Delivered(u16),
    /// The receiver did not take it. `status`: the one it answered, if any; `error`: kept in the row; `retry`:
    /// whether trying again may help (false parks the row at once).
    Failed { status: Option<u16>, error: String, retry: bool },
    /// Never attempted, and it never can be (its destination left the configuration): parked without counting
    /// as a failed attempt (no metric, no log line of the outbox's).
    Unsendable(String),
}

/// A failed attempt, as the loop decided it: what the outbox's [`Outbox::failed`] logs.
#[derive(Debug)]
pub struct Failure<'a> {
    /// Why it failed (kept in the row).
    pub error: &'a str,
    /// Attempts at this row, this one included.
    pub attempts: u32,
    /// When it is tried again; None: parked (never retried).
    pub retry_in: Option<Duration>,
}

/// One durable outbox: its rows, its store calls (blocking; the loop runs them on the blocking pool), its attempt
/// and its voice.
pub trait Outbox: Send + Sync + 'static {
    /// A queued row as the store hands it out.
    type Row: Send + 'static;
    /// Names the outbox in the loop's own log lines.
    const NAME: &'static str;
    /// Rows read per round.
    const BATCH: usize;

    /// The row's id (in the loop's log lines).
    fn id(row: &Self::Row) -> i64;
    /// Attempts made at the row before this round.
    fn attempts(row: &Self::Row) -> u32;
    /// Failed attempts after which a row is parked; None: retried until delivered.
    fn max_attempts(&self) -> Option<u32>;
    /// Signalled when rows are queued.
    fn wake(&self) -> &Notify;
    /// Up to `limit` rows due at `now_ms`, oldest first.
    fn due(&self, now_ms: i64, limit: usize) -> crate::store::Result<Vec<Self::Row>>;
    /// When the earliest undelivered row falls due (None: nothing pending).
    fn next_due(&self) -> crate::store::Result<Option<i64>>;
    /// Marks `row` delivered, with the receiver's status.
    fn mark_delivered(&self, row: &Self::Row, status: u16) -> crate::store::Result<()>;
    /// Records a failed attempt at `row`: tried again at `next_attempt_at`, parked when it is None.
    fn mark_failed(
        &self,
        row: &Self::Row,
        status: Option<u16>,
        error: &str,
        next_attempt_at: Option<i64>,
    ) -> crate::store::Result<()>;
    /// Splits a round's due rows into the groups attempted together (default: every row alone).
    fn group(&self, rows: Vec<Self::Row>) -> Vec<Vec<Self::Row>> {
        rows.into_iter().map(|r| vec![r]).collect()
    }
    /// Attempts one group; hands back each row with its outcome (a row left out is not recorded this round).
    fn attempt(&self, rows: Vec<Self::Row>) -> impl Future<Output = Vec<(Self::Row, Outcome)>> + Send;
    /// Counts and logs a delivery (the outbox's own metric and line).
    fn delivered(&self, row: &Self::Row, status: u16);
    /// Counts and logs a failed attempt.
    fn failed(&self, row: &Self::Row, failure: &Failure<'_>);
}

/// Runs `f` on the outbox from the blocking pool.
async fn on_blocking<O: Outbox, T: Send + 'static>(
    outbox: &Arc<O>,
    f: impl FnOnce(&O) -> crate::store::Result<T> + Send + 'static,
) -> Result<crate::store::Result<T>, tokio::task::JoinError> {
    let o = outbox.clone();
    tokio::task::spawn_blocking(move || f(&o)).await
}

/// The loop: delivers due rows until `shutdown` turns true (or its sender is dropped).
pub async fn run<O: Outbox>(outbox: Arc<O>, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let due = match on_blocking(&outbox, |o| o.due(now_ms(), O::BATCH)).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "{}: reading due rows failed", O::NAME);
                Vec::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "{}: store task failed", O::NAME);
                Vec::new()
            }
        };
        let full_batch = due.len() == O::BATCH;
        for group in outbox.group(due) {
            let outcomes = tokio::select! {
                o = outbox.attempt(group) => o,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            for (row, outcome) in outcomes {
                record(&outbox, row, outcome).await;
            }
        }
        if full_batch {
            continue;
        }
        let wait = match on_blocking(&outbox, |o| o.next_due()).await {
            Ok(Ok(Some(at))) => Duration::from_millis((at - now_ms()).max(0) as u64).clamp(MIN_WAIT, IDLE_POLL),
            _ => IDLE_POLL,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = outbox.wake().notified() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Records one outcome: the outbox's metric and log line, then its store mark (delivered, retry at the back-off,
/// or parked).
async fn record<O: Outbox>(outbox: &Arc<O>, row: O::Row, outcome: Outcome) {
    let id = O::id(&row);
    let marked = match outcome {
        Outcome::Delivered(status) => {
            outbox.delivered(&row, status);
            on_blocking(outbox, move |o| o.mark_delivered(&row, status)).await
        }
        Outcome::Failed { status, error, retry } => {
            let attempts = O::attempts(&row) + 1;
            let parked = !retry || outbox.max_attempts().is_some_and(|max| attempts >= max);
            let retry_in = (!parked).then(|| backoff(O::attempts(&row)));
            outbox.failed(&row, &Failure { error: &error, attempts, retry_in });
            let next = retry_in.map(|delay| now_ms() + delay.as_millis() as i64);
            on_blocking(outbox, move |o| o.mark_failed(&row, status, &error, next)).await
        }
        Outcome::Unsendable(reason) => on_blocking(outbox, move |o| o.mark_failed(&row, None, &reason, None)).await,
    };
    match marked {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(outbox_id = id, error = %format!("{e:#}"), "{}: recording the outcome failed", O::NAME)
        }
        Err(e) => tracing::error!(outbox_id = id, error = %e, "{}: store task failed", O::NAME),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_and_caps_at_five_minutes() {
        assert_eq!(backoff(0), BACKOFF_START);
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(8), Duration::from_secs(256));
        assert_eq!(backoff(9), BACKOFF_CAP);
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
    }

    /// A row of the fake outbox and what the store would hold of it.
    #[derive(Debug, Clone, Default)]
    struct Row {
        id: i64,
        group: &'static str,
        attempts: u32,
        next_at: i64,
        delivered: bool,
        parked: bool,
        last_error: Option<String>,
    }

    /// An in-memory outbox: row 1 is taken, row 2 fails and may be retried, row 3 is refused for good, row 4 is
    /// unsendable; rows 1 and 2 are one group.
    struct Fake {
        rows: Mutex<Vec<Row>>,
        wake: Notify,
        events: Mutex<Vec<String>>,
        groups: Mutex<Vec<Vec<i64>>>,
    }

    impl Fake {
        fn update(&self, id: i64, f: impl FnOnce(&mut Row)) {
            f(self.rows.lock().unwrap().iter_mut().find(|r| r.id == id).unwrap());
        }
        fn row(&self, id: i64) -> Row {
            self.rows.lock().unwrap().iter().find(|r| r.id == id).unwrap().clone()
        }
    }

    impl Outbox for Fake {
        type Row = Row;
        const NAME: &'static str = "test outbox";
        const BATCH: usize = 8;

        fn id(row: &Row) -> i64 {
            row.id
        }
        fn attempts(row: &Row) -> u32 {
            row.attempts
        }
        fn max_attempts(&self) -> Option<u32> {
            Some(2)
        }
        fn wake(&self) -> &Notify {
            &self.wake
        }
        fn due(&self, now_ms: i64, limit: usize) -> crate::store::Result<Vec<Row>> {
            let rows = self.rows.lock().unwrap();
            Ok(rows.iter().filter(|r| !r.delivered && !r.parked && r.next_at <= now_ms).take(limit).cloned().collect())
        }
        fn next_due(&self) -> crate::store::Result<Option<i64>> {
            Ok(self.rows.lock().unwrap().iter().filter(|r| !r.delivered && !r.parked).map(|r| r.next_at).min())
        }
        fn mark_delivered(&self, row: &Row, _status: u16) -> crate::store::Result<()> {
            self.update(row.id, |r| (r.attempts, r.delivered) = (r.attempts + 1, true));
            Ok(())
        }
        fn mark_failed(&self, row: &Row, _: Option<u16>, error: &str, next: Option<i64>) -> crate::store::Result<()> {
            self.update(row.id, |r| {
                r.attempts += 1;
                r.last_error = Some(error.to_string());
                match next {
                    Some(t) => r.next_at = t,
                    None => r.parked = true,
                }
            });
            Ok(())
        }
        fn group(&self, rows: Vec<Row>) -> Vec<Vec<Row>> {
            let mut groups: Vec<Vec<Row>> = Vec::new();
            for r in rows {
                match groups.iter_mut().find(|g| g[0].group == r.group) {
                    Some(g) => g.push(r),
                    None => groups.push(vec![r]),
                }
            }
            groups
        }
        async fn attempt(&self, rows: Vec<Row>) -> Vec<(Row, Outcome)> {
            self.groups.lock().unwrap().push(rows.iter().map(|r| r.id).collect());
            let failed = |retry| Outcome::Failed { status: Some(0xA700), error: "busy".into(), retry };
            rows.into_iter()
                .map(|r| {
                    let o = match r.id {
                        1 => Outcome::Delivered(200),
                        2 => failed(true),
                        3 => failed(false),
                        _ => Outcome::Unsendable("gone".into()),
                    };
                    (r, o)
                })
                .collect()
        }
        fn delivered(&self, row: &Row, status: u16) {
            self.events.lock().unwrap().push(format!("{} delivered {status}", row.id));
        }
        fn failed(&self, row: &Row, f: &Failure<'_>) {
            let retry = f.retry_in.map_or("parked".to_string(), |d| format!("retry in {}s", d.as_secs()));
            self.events.lock().unwrap().push(format!("{} failed #{}: {retry}", row.id, f.attempts));
        }
    }

    #[tokio::test]
    async fn delivers_retries_with_backoff_parks_and_stops() {
        let now = now_ms();
        let rows = [(1, "a"), (2, "a"), (3, "b"), (4, "c")]
            .map(|(id, group)| Row { id, group, next_at: now, ..Default::default() })
            .to_vec();
        let fake = Arc::new(Fake {
            rows: Mutex::new(rows),
            wake: Notify::new(),
            events: Mutex::new(Vec::new()),
            groups: Mutex::new(Vec::new()),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(fake.clone(), stop_rx));
        // Row 2 is retried after backoff(0) = 1 s, then parked at max_attempts (2).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !fake.row(2).parked {
            assert!(tokio::time::Instant::now() < deadline, "row 2 never parked: {:?}", fake.events.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("the loop did not stop").unwrap();

        assert!(fake.row(1).delivered && fake.row(1).attempts == 1);
        assert!(fake.row(3).parked && fake.row(3).attempts == 1, "refused for good: parked at once");
        let r4 = fake.row(4);
        assert!(r4.parked && r4.last_error.as_deref() == Some("gone"), "{r4:?}");
        let events = fake.events.lock().unwrap().clone();
        assert_eq!(
            events,
            ["1 delivered 200", "2 failed #1: retry in 1s", "3 failed #1: parked", "2 failed #2: parked"],
            "an unsendable row is parked silently"
        );
        assert_eq!(fake.groups.lock().unwrap()[..3], [vec![1, 2], vec![3], vec![4]]);
        let r2 = fake.row(2);
        assert!(r2.attempts == 2 && r2.next_at >= now + 1000, "{r2:?}");
    }
}
