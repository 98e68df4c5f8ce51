//! read — the read side of the store: a small pool of read-only SQLite connections for the dashboard,
//! `/metrics`, `/readyz` and the API.
//!
//! Owns: the pool (a fixed number of [`Store::open_read_only`] connections, checked out one caller at a time and
//! handed back when the [`Reader`] drops). In WAL mode a reader sees the last committed state and neither waits
//! for nor blocks the writer, so the C-STORE path (`Store::record_instance` on the writer's connection) never
//! queues behind a dashboard query or a result's JSON being parsed.
//! Hands on: [`Reader`]s, which deref to a read-only [`Store`] (its read methods; its write methods fail).
//! Never: writes, or runs on an async worker (checkout blocks: call it from `spawn_blocking`).

use std::ops::Deref;
use std::path::Path;
use std::sync::{Condvar, Mutex};

use super::{Result, Store};

/// Read-only connections, checked out one caller at a time.
#[derive(Debug)]
pub struct ReadPool {
    /// Connections not checked out now.
    free: Mutex<Vec<Store>>,
    /// Signalled when a connection comes back.
    returned: Condvar,
    /// Connections in all.
    size: usize,
}

/// Connections a daemon's pool holds: the live view's snapshot, a scrape and an API request or two at once.
pub const DEFAULT_READERS: usize = 3;

impl ReadPool {
    /// `size` (at least 1) read-only connections to the database at `path`, which must exist (the daemon's
    /// writer [`Store::open`] created and migrated it).
    pub fn open(path: &Path, size: usize) -> Result<ReadPool> {
        let size = size.max(1);
        let free = (0..size).map(|_| Store::open_read_only(path)).collect::<Result<Vec<_>>>()?;
        Ok(ReadPool { free: Mutex::new(free), returned: Condvar::new(), size })
    }

    /// Connections in all.
    pub fn size(&self) -> usize {
        self.size
    }

    /// A connection, waiting (blocking) while all are checked out.
    pub fn get(&self) -> Reader<'_> {
        // The pool's Vec stays consistent whatever panicked while holding it (a push or a pop): keep going.
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(store) = free.pop() {
                return Reader { pool: self, store: Some(store) };
            }
            free = self.returned.wait(free).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// One checked-out read-only connection; back to the pool when dropped.
#[derive(Debug)]
pub struct Reader<'a> {
    /// The pool it goes back to.
    pool: &'a ReadPool,
    /// The connection (always Some until drop).
    store: Option<Store>,
}

impl Deref for Reader<'_> {
    type Target = Store;
    fn deref(&self) -> &Store {
        self.store.as_ref().expect("a reader holds its connection until dropped")
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.store.take() {
            self.pool.free.lock().unwrap_or_else(|p| p.into_inner()).push(s);
            self.pool.returned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_commits_and_do_not_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let writer = Store::open(&path).unwrap();
        let pool = ReadPool::open(&path, 2).unwrap();
        let (a, b) = (pool.get(), pool.get());
        let v0 = a.data_version().unwrap();
        assert!(a.recent_series(10).unwrap().is_empty());
        writer.enqueue_webhook("s/v1", "{}").unwrap();
        assert_eq!(b.outbox_counts().unwrap().pending, 1, "a reader sees the writer's commit");
        assert_ne!(a.data_version().unwrap(), v0, "data_version moves with another connection's commit");
        assert!(a.enqueue_webhook("s/v2", "{}").is_err(), "read-only");
        drop(a);
        let c = pool.get();
        assert_eq!(c.outbox_counts().unwrap().pending, 1);
    }
}
