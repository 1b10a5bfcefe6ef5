//! The SQLite store: schema versioning and migration, definitions committed
//! before each call returns, write-behind slot state, restoring decaying and
//! held slots on reopen, one owner per store, files that are not stores, and
//! names full of quotes and SQL.
//!
//! Stores are inspected and crafted with separate `rusqlite` connections.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::{eventually, unix_now, watchdog, TempDir, WATCHDOG};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use turnstile::{Error, LimitConfig, LimitUpdate, Limiter};

/// `PRAGMA application_id` of a turnstile store ("trns").
const APPLICATION_ID: i32 = 0x7472_6e73;

/// The schema version this build writes.
const VERSION: i32 = 3;

/// The version-1 schema, as an older build created it (a fixture: a real v1
/// file would have been made by that older build).
const SCHEMA_V1: &str = r#"
CREATE TABLE limits (
    name                  TEXT PRIMARY KEY NOT NULL,
    "limit"               INTEGER NOT NULL CHECK ("limit" >= 0 AND "limit" <= 4294967295),
    active                INTEGER NOT NULL CHECK (active IN (0, 1)),
    slot_decay_per_second REAL NOT NULL CHECK (slot_decay_per_second >= 0)
) WITHOUT ROWID;
CREATE TABLE slot_state (
    name                       TEXT PRIMARY KEY NOT NULL REFERENCES limits(name) ON DELETE CASCADE,
    held_slots                 INTEGER NOT NULL DEFAULT 0,
    decaying_slots             REAL NOT NULL DEFAULT 0,
    decaying_at                REAL NOT NULL DEFAULT 0,
    denied_slots               INTEGER NOT NULL DEFAULT 0,
    avg_slot_occupancy_seconds REAL NOT NULL DEFAULT 2.0,
    waiters                    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"#;

/// A flush interval long enough that only `flush()` and drop write slot
/// state during a test.
const NEVER: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Which of the store's sidecar files exist, with their contents.
fn sidecars(path: &Path) -> Vec<(String, Vec<u8>)> {
    ["-lock", "-wal", "-shm", "-journal"]
        .iter()
        .filter_map(|suffix| {
            fs::read(with_suffix(path, suffix))
                .ok()
                .map(|bytes| (suffix.to_string(), bytes))
        })
        .collect()
}

fn sidecar_names(sidecars: &[(String, Vec<u8>)]) -> Vec<&str> {
    sidecars.iter().map(|(name, _)| name.as_str()).collect()
}

/// A separate connection to look at a store, also while its owner runs.
fn peek(path: &Path) -> Connection {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open the store for reading")
}

fn pragma_i64(path: &Path, pragma: &str) -> i64 {
    peek(path)
        .query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0))
        .expect("read pragma")
}

fn journal_mode(path: &Path) -> String {
    peek(path)
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("read journal_mode")
}

/// `(limit, active, slot_decay_per_second)` as committed to the file.
fn def_row(path: &Path, name: &str) -> Option<(u32, bool, f64)> {
    peek(path)
        .query_row(
            r#"SELECT "limit", active, slot_decay_per_second FROM limits WHERE name = ?1"#,
            [name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .expect("query limits")
}

#[derive(Debug, Clone, PartialEq)]
struct SlotRow {
    held_slots: i64,
    decaying_slots: f64,
    decaying_at: f64,
    denied_slots: i64,
    avg_slot_occupancy_seconds: f64,
    waiters: i64,
}

fn slot_row(path: &Path, name: &str) -> Option<SlotRow> {
    peek(path)
        .query_row(
            "SELECT held_slots, decaying_slots, decaying_at, denied_slots,
                    avg_slot_occupancy_seconds, waiters
             FROM slot_state WHERE name = ?1",
            [name],
            |r| {
                Ok(SlotRow {
                    held_slots: r.get(0)?,
                    decaying_slots: r.get(1)?,
                    decaying_at: r.get(2)?,
                    denied_slots: r.get(3)?,
                    avg_slot_occupancy_seconds: r.get(4)?,
                    waiters: r.get(5)?,
                })
            },
        )
        .optional()
        .expect("query slot_state")
}

/// Edits a store while nobody owns it.
fn edit(path: &Path, sql: &str) {
    let conn = Connection::open(path).expect("open the store to edit it");
    conn.execute_batch(sql).expect("edit the store");
}

fn open_long_interval(path: &Path) -> Limiter {
    Limiter::builder()
        .path(path)
        .flush_interval(NEVER)
        .build()
        .expect("open store")
}

/// Asserts an `Error::Storage` whose message names `path`.
fn assert_storage_error(result: Result<Limiter, Error>, path: &Path, case: &str) {
    match result {
        Err(err @ Error::Storage { .. }) => {
            let message = err.to_string();
            assert!(
                message.contains(&path.display().to_string()),
                "{case}: the message should name {}: {message}",
                path.display()
            );
        }
        Err(other) => panic!("{case}: expected Error::Storage, got {other:?}"),
        Ok(_) => panic!("{case}: open should fail"),
    }
}

/// Opening `path` fails with `Error::Storage` and leaves the file and its
/// sidecars byte-for-byte as they were.
fn assert_rejected_untouched(path: &Path, case: &str) {
    let sidecars_before = sidecars(path);
    assert_rejected_bytes_untouched(path, case);
    assert_sidecars_unchanged(path, &sidecars_before, case);
}

/// Opening `path` fails with `Error::Storage` and leaves the file itself
/// byte-for-byte as it was.
fn assert_rejected_bytes_untouched(path: &Path, case: &str) {
    let before = fs::read(path).expect("read the file before");
    let result = Limiter::open(path);
    assert_storage_error(result, path, case);
    let after = fs::read(path).expect("read the file after");
    assert!(
        before == after,
        "{case}: the file changed ({} bytes before, {} after)",
        before.len(),
        after.len()
    );
}

/// No `-lock`, `-wal`, `-shm` or `-journal` file appeared, vanished or
/// changed next to `path`.
fn assert_sidecars_unchanged(path: &Path, before: &[(String, Vec<u8>)], case: &str) {
    let after = sidecars(path);
    assert_eq!(
        sidecar_names(&after),
        sidecar_names(before),
        "{case}: sidecar files appeared or vanished next to the rejected file"
    );
    assert!(after == before, "{case}: a sidecar file changed");
}

/// Whether an SQLite file's header says WAL (read and write versions 2),
/// read without SQLite.
fn header_says_wal(path: &Path) -> bool {
    let bytes = fs::read(path).expect("read the file");
    bytes.len() >= 20 && bytes[18] == 2 && bytes[19] == 2
}

/// Deterministic noise that does not start like an SQLite file.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Versioned schema, migration, WAL
// ---------------------------------------------------------------------------

#[test]
fn new_store_is_versioned_and_in_wal_mode() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        let limiter = Limiter::open(&db).expect("create store");
        assert!(db.exists(), "open creates the file");
        assert_eq!(pragma_i64(&db, "user_version"), VERSION as i64);
        assert_eq!(pragma_i64(&db, "application_id"), APPLICATION_ID as i64);
        assert_eq!(journal_mode(&db).to_lowercase(), "wal");
        drop(limiter);
        assert_eq!(pragma_i64(&db, "user_version"), VERSION as i64);
        assert_eq!(journal_mode(&db).to_lowercase(), "wal");
    });
}

#[test]
fn version_1_store_is_migrated_forward_on_open() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("v1.db");
        let written_at = unix_now();
        {
            let conn = Connection::open(&db).expect("create v1 file");
            conn.execute_batch(SCHEMA_V1).expect("v1 schema");
            conn.execute_batch(&format!(
                "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 1;"
            ))
            .expect("v1 pragmas");
            conn.execute(
                r#"INSERT INTO limits (name, "limit", active, slot_decay_per_second)
                   VALUES ('gpu', 3, 1, 0.01), ('later', 4, 0, 0)"#,
                [],
            )
            .expect("v1 limits");
            conn.execute(
                "INSERT INTO slot_state (name, held_slots, decaying_slots, decaying_at,
                                         denied_slots, avg_slot_occupancy_seconds, waiters)
                 VALUES ('gpu', 1, 1.5, ?1, 7, 3.25, 1)",
                [written_at],
            )
            .expect("v1 slot_state");
        }
        assert_eq!(pragma_i64(&db, "user_version"), 1);

        let limiter = Limiter::open(&db).expect("open a v1 store");
        assert_eq!(journal_mode(&db).to_lowercase(), "wal");
        let gpu = limiter.limit("gpu").expect("gpu survives the migration");
        assert_eq!(gpu.limit, 3);
        assert!(gpu.active);
        assert_eq!(gpu.slot_decay_per_second, 0.01);
        assert_eq!(gpu.denied_slots, 7);
        assert_eq!(gpu.avg_slot_occupancy_seconds, 3.25);
        assert_eq!(gpu.held_slots, 0, "the old owner's held slots are free");
        assert_eq!(gpu.waiters, 0);
        // 1.5 decaying slots drain at 0.01/s: rounded up, 2 for over a minute.
        assert_eq!(gpu.active_slots, 2);
        let later = limiter
            .limit("later")
            .expect("later survives the migration");
        assert_eq!((later.limit, later.active), (4, false));
        assert_eq!(later.slot_decay_per_second, 0.0);
        assert_eq!(later.active_slots, 0);
        assert_eq!(limiter.limits().len(), 2);

        // The migrated store takes new definitions.
        limiter
            .create_limit("new", LimitConfig::new(5).slot_decay_per_second(2.0))
            .expect("create in a migrated store");
        limiter
            .update_limit("gpu", LimitUpdate::new().limit(6))
            .expect("update in a migrated store");
        assert_eq!(def_row(&db, "new"), Some((5, true, 2.0)));
        drop(limiter);

        assert_eq!(pragma_i64(&db, "user_version"), VERSION as i64);
        assert_eq!(pragma_i64(&db, "application_id"), APPLICATION_ID as i64);

        let limiter = Limiter::open(&db).expect("reopen the migrated store");
        let names: Vec<String> = limiter.limits().into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["gpu", "later", "new"]);
        assert_eq!(limiter.limit("gpu").unwrap().limit, 6);
        assert_eq!(limiter.limit("gpu").unwrap().denied_slots, 7);
        assert_eq!(limiter.limit("new").unwrap().slot_decay_per_second, 2.0);
    });
}

/// What version 2 added to version 1, as that build wrote it.
const MIGRATE_V1_TO_V2: &str = r#"
ALTER TABLE limits ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
ALTER TABLE limits ADD COLUMN reset_count INTEGER NOT NULL DEFAULT 0;
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value
) WITHOUT ROWID;
"#;

/// Version 3 gave each definition an incarnation, so that an owner tells a
/// limit deleted and created again by another process from an updated one.
#[test]
fn version_2_store_is_migrated_forward_on_open() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("v2.db");
        {
            let conn = Connection::open(&db).expect("create v2 file");
            conn.execute_batch(SCHEMA_V1).expect("v1 schema");
            conn.execute_batch(MIGRATE_V1_TO_V2).expect("v2 schema");
            conn.execute_batch(&format!(
                "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 2;"
            ))
            .expect("v2 pragmas");
            conn.execute(
                r#"INSERT INTO limits (name, "limit", active, slot_decay_per_second, revision,
                                       reset_count)
                   VALUES ('gpu', 3, 1, 0, 4, 1)"#,
                [],
            )
            .expect("v2 limits");
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('owner_pid', NULL)",
                [],
            )
            .expect("v2 meta");
        }

        let limiter = Limiter::open(&db).expect("open a v2 store");
        assert_eq!(pragma_i64(&db, "user_version"), VERSION as i64);
        let gpu = limiter.limit("gpu").expect("gpu survives the migration");
        assert_eq!((gpu.limit, gpu.active), (3, true));
        let old: i64 = peek(&db)
            .query_row(
                "SELECT incarnation FROM limits WHERE name = 'gpu'",
                [],
                |r| r.get(0),
            )
            .expect("incarnation column");
        assert_eq!(old, 0, "rows from before version 3 are incarnation 0");

        // Deleted and created again: a new incarnation, never an old one.
        let guard = limiter.concurrency("gpu", 1).acquire().unwrap();
        limiter.delete_limit("gpu").unwrap();
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
        let new: i64 = peek(&db)
            .query_row(
                "SELECT incarnation FROM limits WHERE name = 'gpu'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(new > old, "incarnation {new} after {old}");
        drop(guard);
        assert_eq!(limiter.limit("gpu").unwrap().held_slots, 0);
        drop(limiter);
        let limiter = Limiter::open(&db).expect("reopen the migrated store");
        assert_eq!(limiter.limit("gpu").unwrap().limit, 1);
    });
}

// ---------------------------------------------------------------------------
// 2. Definitions committed before returning; slot state written behind
// ---------------------------------------------------------------------------

#[test]
fn definitions_are_committed_before_the_call_returns() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        // The writer never wakes by itself: only the calls themselves write.
        let limiter = open_long_interval(&db);

        limiter
            .create_limit("gpu", LimitConfig::new(2))
            .expect("create");
        assert_eq!(def_row(&db, "gpu"), Some((2, true, 0.0)));

        limiter
            .update_limit(
                "gpu",
                LimitUpdate::new()
                    .limit(5)
                    .active(false)
                    .slot_decay_per_second(1.5),
            )
            .expect("update");
        assert_eq!(def_row(&db, "gpu"), Some((5, false, 1.5)));

        limiter
            .update_limit("gpu", LimitUpdate::new().active(true))
            .expect("update");
        assert_eq!(def_row(&db, "gpu"), Some((5, true, 1.5)));

        // Reset: give "api" decaying and denied slots, make them durable,
        // then reset and look at once.
        limiter
            .create_limit("api", LimitConfig::new(10).slot_decay_per_second(0.001))
            .expect("create api");
        assert!(limiter.rate_limit("api", 4).try_acquire().unwrap());
        assert!(!limiter.rate_limit("api", 7).try_acquire().unwrap());
        limiter.flush().expect("flush");
        let row = slot_row(&db, "api").expect("api slot state");
        assert!(
            row.decaying_slots > 3.9 && row.decaying_slots <= 4.0,
            "{row:?}"
        );
        assert_eq!(row.denied_slots, 7);
        limiter.reset_limit("api").expect("reset");
        let row = slot_row(&db, "api").expect("api slot state after reset");
        assert_eq!(row.decaying_slots, 0.0, "reset is committed: {row:?}");
        assert_eq!(row.denied_slots, 0, "reset is committed: {row:?}");
        assert_eq!(def_row(&db, "api"), Some((10, true, 0.001)));

        limiter.delete_limit("gpu").expect("delete");
        assert_eq!(def_row(&db, "gpu"), None);
        assert_eq!(slot_row(&db, "gpu"), None);

        // A limit created by an acquisition (create_if_missing) is a
        // definition too: inactive, limit 1.
        let guard = limiter.concurrency("auto", 1).acquire().expect("acquire");
        assert_eq!(def_row(&db, "auto"), Some((1, false, 0.0)));
        drop(guard);

        // Failed changes commit nothing.
        assert!(limiter.create_limit("api", LimitConfig::new(1)).is_err());
        assert_eq!(def_row(&db, "api"), Some((10, true, 0.001)));
        assert!(limiter
            .update_limit("missing", LimitUpdate::new().limit(1))
            .is_err());
        assert_eq!(def_row(&db, "missing"), None);
    });
}

#[test]
fn slot_state_is_durable_after_flush() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        let limiter = open_long_interval(&db);
        limiter.create_limit("gpu", LimitConfig::new(4)).unwrap();
        limiter
            .create_limit("api", LimitConfig::new(10).slot_decay_per_second(0.001))
            .unwrap();

        let held = limiter.concurrency("gpu", 2).acquire().unwrap();
        assert!(limiter
            .concurrency("gpu", 3)
            .try_acquire()
            .unwrap()
            .is_none());
        assert!(limiter.rate_limit("api", 3).try_acquire().unwrap());
        assert!(!limiter.rate_limit("api", 8).try_acquire().unwrap());

        let before = unix_now();
        limiter.flush().expect("flush");
        let after = unix_now();

        let gpu = slot_row(&db, "gpu").expect("gpu slot state");
        assert_eq!(gpu.held_slots, 2, "{gpu:?}");
        assert_eq!(gpu.denied_slots, 3, "{gpu:?}");
        assert_eq!(gpu.decaying_slots, 0.0, "{gpu:?}");
        let api = slot_row(&db, "api").expect("api slot state");
        assert!(
            api.decaying_slots > 2.9 && api.decaying_slots <= 3.0,
            "{api:?}"
        );
        assert_eq!(api.denied_slots, 8, "{api:?}");
        assert_eq!(api.held_slots, 0, "{api:?}");
        assert!(
            api.decaying_at >= before - 1.0 && api.decaying_at <= after + 1.0,
            "decaying_at {} is the flush time ({before}..{after})",
            api.decaying_at
        );

        // Releasing updates the held count and the occupancy average.
        drop(held);
        limiter.flush().expect("flush");
        let gpu = slot_row(&db, "gpu").expect("gpu slot state");
        assert_eq!(gpu.held_slots, 0, "{gpu:?}");
        let info = limiter.limit("gpu").unwrap();
        assert_eq!(
            gpu.avg_slot_occupancy_seconds, info.avg_slot_occupancy_seconds,
            "{gpu:?}"
        );
        assert_ne!(gpu.avg_slot_occupancy_seconds, 2.0, "a release moved it");
    });
}

#[test]
fn slot_state_is_written_behind_without_flush() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        let limiter = Limiter::builder()
            .path(&db)
            .flush_interval(Duration::from_millis(20))
            .build()
            .unwrap();
        limiter
            .create_limit("api", LimitConfig::new(10).slot_decay_per_second(0.001))
            .unwrap();
        assert!(limiter.rate_limit("api", 5).try_acquire().unwrap());
        assert!(!limiter.rate_limit("api", 6).try_acquire().unwrap());
        assert!(
            eventually(Duration::from_secs(10), || {
                slot_row(&db, "api").is_some_and(|r| r.decaying_slots > 4.9 && r.denied_slots == 6)
            }),
            "the background writer saves slot state: {:?}",
            slot_row(&db, "api")
        );
    });
}

#[test]
fn dropping_the_last_clone_flushes() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        let limiter = open_long_interval(&db);
        limiter
            .create_limit("api", LimitConfig::new(10).slot_decay_per_second(0.001))
            .unwrap();
        let clone = limiter.clone();
        assert!(clone.rate_limit("api", 3).try_acquire().unwrap());
        assert!(!clone.rate_limit("api", 9).try_acquire().unwrap());
        drop(limiter);
        drop(clone);
        let row = slot_row(&db, "api").expect("slot state");
        assert!(row.decaying_slots > 2.9, "{row:?}");
        assert_eq!(row.denied_slots, 9, "{row:?}");
    });
}

#[test]
fn flush_in_memory_is_ok() {
    let limiter = Limiter::in_memory();
    limiter.flush().expect("nothing to flush");
    limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
    let _guard = limiter.concurrency("gpu", 1).acquire().unwrap();
    limiter.flush().expect("nothing to flush");
}

// ---------------------------------------------------------------------------
// 3. Reopening: decaying slots drained by wall time, held slots freed
// ---------------------------------------------------------------------------

#[test]
fn decaying_slots_come_back_drained_by_wall_time() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        let limiter = Limiter::open(&db).unwrap();
        limiter
            .create_limit("api", LimitConfig::new(10).slot_decay_per_second(10.0))
            .unwrap();
        let taken = Instant::now();
        assert!(limiter.rate_limit("api", 10).try_acquire().unwrap());
        limiter.flush().unwrap();
        drop(limiter);

        thread::sleep(Duration::from_millis(300));

        let limiter = Limiter::open(&db).expect("reopen");
        let info = limiter.limit("api").expect("api");
        let elapsed = taken.elapsed().as_secs_f64();
        // At least 300 ms passed since the 10 slots were taken: 3 drained.
        assert!(
            info.active_slots <= 8,
            "the restart does not reset the drain: {info:?}"
        );
        // And no more than the time measured: the bound follows the clock.
        let least = (10.0 - 10.0 * elapsed - 0.5).max(0.0).ceil() as u32;
        assert!(
            info.active_slots >= least,
            "{elapsed:.3} s after taking 10, at least {least} left: {info:?}"
        );
        assert_eq!(info.held_slots, 0);
        drop(limiter);

        // Long enough for everything to drain, across another restart.
        let full_drain = Duration::from_millis(1100);
        if let Some(rest) = full_drain.checked_sub(taken.elapsed()) {
            thread::sleep(rest);
        }
        let limiter = Limiter::open(&db).expect("reopen");
        assert_eq!(limiter.limit("api").unwrap().active_slots, 0);
        assert!(limiter.rate_limit("api", 10).try_acquire().unwrap());
    });
}

#[test]
fn held_slots_of_the_previous_owner_are_free_after_reopen() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        {
            let limiter = Limiter::open(&db).unwrap();
            limiter.create_limit("gpu", LimitConfig::new(4)).unwrap();
        }
        // As a crashed owner would have left it (see tests/crash.rs for the
        // real thing).
        edit(
            &db,
            "UPDATE slot_state SET held_slots = 3, waiters = 2 WHERE name = 'gpu'",
        );
        let limiter = Limiter::open(&db).unwrap();
        let gpu = limiter.limit("gpu").unwrap();
        assert_eq!((gpu.held_slots, gpu.active_slots, gpu.waiters), (0, 0, 0));
        let all = limiter.concurrency("gpu", 4).try_acquire().unwrap();
        assert!(all.is_some(), "all 4 slots are free");
    });
}

/// Writes a store with "api" (limit 10, decay 0.01/s) holding 6 decaying
/// slots, then sets its stored `decaying_at` by hand.
fn store_with_decaying_at(db: &Path, decaying_at: &str) {
    {
        let limiter = Limiter::open(db).unwrap();
        limiter
            .create_limit("api", LimitConfig::new(10).slot_decay_per_second(0.01))
            .unwrap();
        assert!(limiter.rate_limit("api", 6).try_acquire().unwrap());
        limiter.flush().unwrap();
    }
    edit(
        db,
        &format!("UPDATE slot_state SET decaying_at = {decaying_at} WHERE name = 'api'"),
    );
}

#[test]
fn decaying_at_in_the_far_future_drains_nothing() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        store_with_decaying_at(&db, "1e12");
        let limiter = Limiter::open(&db).expect("a future timestamp is no error");
        let api = limiter.limit("api").unwrap();
        // 6 slots at 0.01/s: rounded up, still 6 for over a minute.
        assert_eq!(api.active_slots, 6, "{api:?}");
        assert!(limiter.rate_limit("api", 4).try_acquire().unwrap());
        assert!(!limiter.rate_limit("api", 1).try_acquire().unwrap());
    });
}

#[test]
fn decaying_at_in_the_far_past_drains_everything() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        store_with_decaying_at(&db, "0");
        let limiter = Limiter::open(&db).expect("open");
        let api = limiter.limit("api").unwrap();
        assert_eq!(api.active_slots, 0, "{api:?}");
        assert!(limiter.rate_limit("api", 10).try_acquire().unwrap());
    });
}

// ---------------------------------------------------------------------------
// 4. One owner per store
// ---------------------------------------------------------------------------

fn assert_in_use(result: Result<Limiter, Error>, path: &Path) {
    match result {
        Err(err @ Error::StoreInUse { .. }) => {
            let Error::StoreInUse { pid, .. } = &err else {
                unreachable!()
            };
            assert_eq!(*pid, std::process::id(), "{err}");
            let message = err.to_string();
            assert!(
                message.contains(&path.display().to_string()),
                "the message names the store: {message}"
            );
            assert!(
                message.contains(&std::process::id().to_string()),
                "the message names the owner: {message}"
            );
        }
        Err(other) => panic!("expected Error::StoreInUse, got {other:?}"),
        Ok(_) => panic!("a second owner opened the store"),
    }
}

#[test]
fn a_second_open_in_the_same_process_is_store_in_use() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        let first = Limiter::open(&db).unwrap();
        first.create_limit("gpu", LimitConfig::new(2)).unwrap();
        assert_in_use(Limiter::open(&db), &db);
        assert_in_use(
            Limiter::builder()
                .path(&db)
                .flush_interval(Duration::from_millis(5))
                .build(),
            &db,
        );
        // The failed opens did not disturb the owner.
        first.create_limit("api", LimitConfig::new(3)).unwrap();
        let _g = first.concurrency("gpu", 2).acquire().unwrap();
        first.flush().unwrap();
        drop(_g);
        drop(first);

        let second = Limiter::open(&db).expect("free again once the owner is dropped");
        let names: Vec<String> = second.limits().into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["api", "gpu"]);
    });
}

#[test]
fn clones_and_guards_keep_the_store_owned() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        let limiter = Limiter::open(&db).unwrap();
        limiter.create_limit("gpu", LimitConfig::new(2)).unwrap();
        let clone = limiter.clone();
        drop(limiter);
        assert_in_use(Limiter::open(&db), &db);

        let guard = clone.concurrency("gpu", 1).acquire().unwrap();
        drop(clone);
        assert_in_use(Limiter::open(&db), &db);

        // A guard moved to another thread keeps it owned as well.
        let guard = thread::spawn(move || guard).join().unwrap();
        assert_in_use(Limiter::open(&db), &db);

        let held = guard.release();
        assert!(held < Duration::from_secs(3600));
        let limiter = Limiter::open(&db).expect("free once the last guard is gone");
        assert_eq!(limiter.limit("gpu").unwrap().held_slots, 0);
    });
}

// ---------------------------------------------------------------------------
// 5. Files that are not (usable) stores
// ---------------------------------------------------------------------------

#[test]
fn random_bytes_are_rejected_untouched() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("random.db");
        fs::write(&db, noise(8192)).unwrap();
        assert_rejected_untouched(&db, "random bytes");
    });
}

#[test]
fn a_text_file_is_rejected_untouched() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("notes.txt");
        let text = "Dear diary,\ntoday I tried to open a text file as a database.\n".repeat(40);
        fs::write(&db, text).unwrap();
        assert_rejected_untouched(&db, "text file");
    });
}

#[test]
fn a_tiny_file_is_rejected_untouched() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("tiny.db");
        fs::write(&db, b"hello").unwrap();
        assert_rejected_untouched(&db, "5-byte file");
    });
}

#[test]
fn an_sqlite_header_over_garbage_is_rejected_untouched() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("corrupt.db");
        let mut bytes = b"SQLite format 3\0".to_vec();
        bytes.extend(noise(4096 - 16));
        fs::write(&db, bytes).unwrap();
        assert_rejected_untouched(&db, "SQLite magic over garbage");
    });
}

#[test]
fn another_applications_database_is_rejected_untouched() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("users.db");
        {
            let conn = Connection::open(&db).unwrap();
            conn.execute_batch(
                "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
                 INSERT INTO users (name) VALUES ('alice'), ('bob');",
            )
            .unwrap();
        }
        assert_rejected_untouched(&db, "SQLite with unrelated tables");
        let conn = Connection::open(&db).unwrap();
        let users: i64 = conn
            .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
            .unwrap();
        assert_eq!(users, 2);
    });
}

/// Another application's database in WAL mode, closed cleanly (no
/// sidecars).
fn foreign_wal_database(db: &Path) {
    {
        let conn = Connection::open(db).unwrap();
        conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
            .unwrap();
        conn.execute_batch(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
             INSERT INTO users (name) VALUES ('alice');",
        )
        .unwrap();
    }
    // Read from the header: a connection here could leave sidecars.
    assert!(header_says_wal(db), "the fixture is in WAL mode");
    assert!(sidecars(db).is_empty(), "the fixture has no sidecars");
}

#[test]
fn another_applications_wal_database_is_rejected_untouched() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("users-wal.db");
        foreign_wal_database(&db);
        assert_rejected_bytes_untouched(&db, "unrelated SQLite database in WAL mode");
    });
}

#[test]
fn another_applications_wal_database_gets_no_sidecars() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("users-wal.db");
        foreign_wal_database(&db);
        assert!(Limiter::open(&db).is_err());
        assert_sidecars_unchanged(&db, &[], "unrelated SQLite database in WAL mode");
    });
}

#[test]
fn an_empty_sqlite_database_with_unrelated_pragmas_is_rejected_untouched() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("other-app.db");
        {
            let conn = Connection::open(&db).unwrap();
            // Another application's id, no tables yet.
            conn.execute_batch("PRAGMA application_id = 1234; CREATE TABLE t (x);")
                .unwrap();
        }
        assert_rejected_untouched(&db, "SQLite with another application_id");
    });
}

/// A real store, made by this build, then marked as version 99 by hand.
fn future_store(db: &Path) {
    {
        let limiter = Limiter::open(db).unwrap();
        limiter.create_limit("gpu", LimitConfig::new(2)).unwrap();
    }
    edit(db, "PRAGMA user_version = 99");
}

#[test]
fn a_newer_store_version_is_rejected_untouched() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("future.db");
        future_store(&db);
        assert_rejected_bytes_untouched(&db, "store version 99");
        assert_eq!(pragma_i64(&db, "user_version"), 99);
    });
}

#[test]
fn a_newer_store_version_gets_no_new_sidecars() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("future.db");
        future_store(&db);
        let before = sidecars(&db);
        assert_eq!(sidecar_names(&before), ["-lock"], "left by the first owner");
        assert!(Limiter::open(&db).is_err());
        assert_sidecars_unchanged(&db, &before, "store version 99");
    });
}

/// Whether this process can write `path` despite its permissions (root can).
fn can_write(path: &Path) -> bool {
    fs::OpenOptions::new().write(true).open(path).is_ok()
}

/// A valid store with mode 0444, or `None` (with a note) when this process
/// can write it anyway (root ignores the mode bits).
#[cfg(unix)]
fn read_only_store(dir: &TempDir) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let db = dir.path("readonly.db");
    {
        let limiter = Limiter::open(&db).unwrap();
        limiter.create_limit("gpu", LimitConfig::new(2)).unwrap();
    }
    fs::set_permissions(&db, fs::Permissions::from_mode(0o444)).unwrap();
    if can_write(&db) {
        eprintln!(
            "note: {} is writable despite mode 0444 (running as root?); \
             skipping the read-only assertions",
            db.display()
        );
        // Nothing to assert, but opening must not panic.
        let result = Limiter::open(&db);
        eprintln!("note: opening the 0444 store: ok = {}", result.is_ok());
        return None;
    }
    Some(db)
}

#[cfg(unix)]
#[test]
fn a_read_only_store_is_a_storage_error() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let Some(db) = read_only_store(&dir) else {
            return;
        };
        assert_rejected_bytes_untouched(&db, "read-only store");
        // Still readable by others: the definitions are there.
        let limit: u32 = peek(&db)
            .query_row(
                r#"SELECT "limit" FROM limits WHERE name = 'gpu'"#,
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(limit, 2);
    });
}

#[cfg(unix)]
#[test]
fn a_read_only_store_gets_no_new_sidecars() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let Some(db) = read_only_store(&dir) else {
            return;
        };
        let before = sidecars(&db);
        if let Err(e) = Limiter::open(&db) {
            eprintln!("read-only store: {e}");
        }
        assert_sidecars_unchanged(&db, &before, "read-only store");
    });
}

#[test]
fn a_path_in_a_missing_directory_is_a_storage_error() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let missing = dir.path("no-such-dir");
        let db = missing.join("limits.db");
        let result = Limiter::open(&db);
        assert_storage_error(result, &db, "missing directory");
        assert!(!missing.exists(), "the directory was not created");
        assert!(!db.exists());
    });
}

#[test]
fn an_empty_file_becomes_a_store() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("empty.db");
        fs::File::create(&db).unwrap().flush().unwrap();
        let limiter = Limiter::open(&db).expect("an empty file is a new store");
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
        assert_eq!(pragma_i64(&db, "user_version"), VERSION as i64);
    });
}

// ---------------------------------------------------------------------------
// 6. Names with quotes, SQL and non-ASCII text
// ---------------------------------------------------------------------------

#[test]
fn awkward_names_round_trip_verbatim() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("names.db");
        let long = format!("{}x", "é".repeat(127)); // 255 bytes
        let names: Vec<String> = vec![
            r#"it's "q"; DROP TABLE limits; --"#.to_string(),
            "日本語 ✓".to_string(),
            "Robert'); --".to_string(),
            "Robert'); DROP TABLE slot_state; --".to_string(),
            r"100% _wild_ \card\".to_string(),
            "emoji 🚦 limit".to_string(),
            "GPU".to_string(),
            "gpu".to_string(),
            long.clone(),
        ];
        assert_eq!(long.len(), 255);
        {
            let limiter = Limiter::open(&db).unwrap();
            for (i, name) in names.iter().enumerate() {
                let limit = 10 + i as u32;
                limiter
                    .create_limit(name, LimitConfig::new(limit).slot_decay_per_second(0.001))
                    .unwrap_or_else(|e| panic!("create {name:?}: {e}"));
                assert_eq!(def_row(&db, name), Some((limit, true, 0.001)), "{name:?}");
                assert!(limiter.rate_limit(name.as_str(), 2).try_acquire().unwrap());
            }
            limiter.flush().unwrap();
        }

        // Stored verbatim, and the SQL in them never ran.
        let conn = Connection::open(&db).unwrap();
        let mut stored: Vec<String> = conn
            .prepare("SELECT name FROM limits")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        stored.sort();
        let mut expected = names.clone();
        expected.sort();
        assert_eq!(stored, expected);
        let slot_rows: i64 = conn
            .query_row("SELECT count(*) FROM slot_state", [], |r| r.get(0))
            .unwrap();
        assert_eq!(slot_rows, names.len() as i64);
        drop(conn);

        let limiter = Limiter::open(&db).expect("reopen");
        let listed: Vec<String> = limiter.limits().into_iter().map(|l| l.name).collect();
        assert_eq!(listed, expected, "limits() is sorted by name");
        for (i, name) in names.iter().enumerate() {
            let info = limiter
                .limit(name)
                .unwrap_or_else(|| panic!("{name:?} is back"));
            assert_eq!(&info.name, name);
            assert_eq!(info.limit, 10 + i as u32, "{name:?}");
            assert_eq!(info.active_slots, 2, "{name:?}");
        }
        // Delete and reset find them by their exact names.
        limiter.reset_limit(&names[0]).unwrap();
        assert_eq!(slot_row(&db, &names[0]).unwrap().decaying_slots, 0.0);
        limiter.delete_limit(&names[2]).unwrap();
        assert_eq!(def_row(&db, &names[2]), None);
        assert!(def_row(&db, &names[3]).is_some(), "a different name");
        limiter.delete_limit("GPU").unwrap();
        assert!(def_row(&db, "gpu").is_some(), "names are case-sensitive");
    });
}

/// Regression: a store given up by this process looked still owned by it
/// (`StoreInUse` naming our own pid) when another thread had just spawned a
/// process, whose copy of the lock lives from `fork` until its `exec`.
#[test]
fn reopening_while_another_thread_spawns_processes_is_not_store_in_use() {
    watchdog(WATCHDOG * 2, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spawner = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut spawned = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = std::process::Command::new("true").status();
                    spawned += 1;
                }
                spawned
            })
        };
        for round in 0..300 {
            match Limiter::open(&db) {
                Ok(limiter) => drop(limiter),
                Err(e) => {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    panic!("round {round}: {e}");
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(spawner.join().unwrap() > 0, "the spawner ran");
        // Still one owner at a time within the process.
        let owner = Limiter::open(&db).unwrap();
        assert!(matches!(Limiter::open(&db), Err(Error::StoreInUse { .. })));
        drop(owner);
    });
}

// ---------------------------------------------------------------------------
// A limit deleted under its waiters (issue 12, item 5): with a store, a
// non-strict waiter with `create_if_missing` creates it again as a first
// attempt naming a missing limit does, committed before it exists in memory.
// ---------------------------------------------------------------------------

/// Opens `db`, holds limit "x" of one slot and blocks `waiter` on it.
fn deleted_under_a_waiter<T>(db: &Path, waiter: impl FnOnce(&Limiter) -> T) -> (Limiter, T) {
    let limiter = open_long_interval(db);
    limiter
        .create_limit("x", LimitConfig::new(1).slot_decay_per_second(1e-9))
        .unwrap();
    assert!(limiter.rate_limit("x", 1).try_acquire().unwrap());
    let waiting = waiter(&limiter);
    assert!(
        eventually(WATCHDOG, || limiter.limit("x").unwrap().waiters == 1),
        "never queued"
    );
    limiter.delete_limit("x").unwrap();
    (limiter, waiting)
}

fn assert_created_inactive(limiter: &Limiter, db: &Path) {
    let info = limiter.limit("x").expect("created again");
    assert_eq!((info.limit, info.active, info.waiters), (1, false, 0));
    assert_eq!(def_row(db, "x"), Some((1, false, 0.0)));
}

#[test]
fn a_blocked_acquisition_creates_its_deleted_limit_again_in_the_store() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        let (limiter, waiter) = deleted_under_a_waiter(&db, |l| {
            let l = l.clone();
            thread::spawn(move || l.concurrency("x", 1).acquire().map(drop))
        });
        waiter.join().unwrap().expect("passes");
        assert_created_inactive(&limiter, &db);
        drop(limiter);
        let reopened = open_long_interval(&db);
        assert_created_inactive(&reopened, &db);
    });
}

#[test]
fn a_pending_future_creates_its_deleted_limit_again_in_the_store() {
    use std::future::{Future, IntoFuture};
    use std::task::{Context, Poll, Waker};

    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        let mut cx = Context::from_waker(Waker::noop());
        let (limiter, mut fut) = deleted_under_a_waiter(&db, |l| {
            let mut fut = Box::pin(l.rate_limit("x", 1).into_future());
            assert!(fut.as_mut().poll(&mut cx).is_pending());
            fut
        });
        // Its owner commits it when it looks again.
        assert_eq!(def_row(&db, "x"), None);
        let Poll::Ready(done) = fut.as_mut().poll(&mut cx) else {
            panic!("a waiter left with no limit passes");
        };
        done.expect("passes");
        assert_created_inactive(&limiter, &db);
        drop((fut, limiter));
        let reopened = open_long_interval(&db);
        assert_created_inactive(&reopened, &db);
    });
}

#[test]
fn a_waiter_still_queued_elsewhere_creates_its_deleted_limit_at_once() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        let mut holder = None;
        let (limiter, waiter) = deleted_under_a_waiter(&db, |l| {
            l.create_limit("y", LimitConfig::new(1)).unwrap();
            holder = Some(l.concurrency("y", 1).acquire().unwrap());
            let l = l.clone();
            thread::spawn(move || l.concurrency(["x", "y"], 1).acquire().map(drop))
        });
        // Woken to commit it, then back to waiting for "y".
        assert!(
            eventually(WATCHDOG, || def_row(&db, "x").is_some()),
            "not created again"
        );
        assert_created_inactive(&limiter, &db);
        assert_eq!(limiter.limit("y").unwrap().waiters, 1);
        drop(holder);
        waiter.join().unwrap().expect("granted when y was released");
    });
}

#[test]
fn a_waiter_without_create_if_missing_leaves_its_deleted_limit_deleted() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("persistence");
        let db = dir.path("limits.db");
        let (limiter, waiter) = deleted_under_a_waiter(&db, |l| {
            let l = l.clone();
            thread::spawn(move || {
                l.concurrency("x", 1)
                    .create_if_missing(false)
                    .acquire()
                    .map(drop)
            })
        });
        waiter.join().unwrap().expect("passes");
        assert!(limiter.limit("x").is_none());
        assert_eq!(def_row(&db, "x"), None);
    });
}
