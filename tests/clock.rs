//! The wall clock across restarts: decaying slots are stored with the Unix
//! time they were measured at (`slot_state.decaying_at`) and drained by the
//! time that passed when the store is opened again.
//!
//! The rule: a clock that went backwards — a stored timestamp in the future,
//! `+inf` included — drains nothing (a restart is no way around a rate
//! limit); a timestamp far in the past, `-inf` and times before 1970
//! included, drains everything; nothing of it panics. Timestamps are edited
//! with SQLite while no limiter owns the store.
//!
//! A system clock set before the Unix epoch cannot be simulated here without
//! privileges; `store::unix_seconds` is unit-tested with such a `SystemTime`
//! inside `src/store/mod.rs` instead.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::Connection;
use turnstile::{Admin, Error, LimitConfig, LimitInfo, Limiter};

use common::{unix_now, watchdog, WATCHDOG};

/// A unique directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "turnstile-clock-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("limits.db")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A store whose "api" (limit 10, decaying at `rate`) has `taken` decaying
/// slots, with no owner.
fn store_with_bucket(db: &Path, rate: f64, taken: u32) {
    let limiter = Limiter::open(db).expect("open");
    limiter
        .create_limit("api", LimitConfig::new(10).slot_decay_per_second(rate))
        .unwrap();
    assert!(limiter.rate_limit("api", taken).try_acquire().unwrap());
    limiter.flush().unwrap();
}

fn edit(db: &Path, sql: &str) {
    Connection::open(db)
        .expect("open the store with SQLite")
        .execute_batch(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn set_decaying_at(db: &Path, value: &str) {
    edit(
        db,
        &format!("UPDATE slot_state SET decaying_at = {value} WHERE name = 'api'"),
    );
}

fn stored_decaying_at(db: &Path) -> f64 {
    Connection::open(db)
        .unwrap()
        .query_row(
            "SELECT decaying_at FROM slot_state WHERE name = 'api'",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

fn api(limiter: &Limiter) -> LimitInfo {
    limiter.limit("api").expect("api exists")
}

/// What `Admin` (the CLI) reports for "api" without an owner.
fn api_seen_by_admin(db: &Path) -> LimitInfo {
    Admin::open(db)
        .expect("admin")
        .limit("api")
        .expect("read")
        .expect("api exists")
}

/// At 0.001 slots/s, the few milliseconds a test takes drain a few
/// millionths of a slot: rounded up, whole slots stay whole.
const SLOW: f64 = 0.001;

#[test]
fn a_timestamp_in_the_future_drains_nothing() {
    watchdog(WATCHDOG, || {
        let now = unix_now();
        let future = [
            format!("{}", now + 60.0),
            format!("{}", now + 3600.0),
            format!("{}", now + 1e9),
            "1e300".to_string(),
            "1.7976931348623157e308".to_string(),
            "9e999".to_string(), // +inf
        ];
        for at in &future {
            let scratch = Scratch::new();
            let db = scratch.db();
            store_with_bucket(&db, SLOW, 6);
            set_decaying_at(&db, at);
            assert_eq!(api_seen_by_admin(&db).active_slots, 6, "admin, at {at}");
            let limiter = Limiter::open(&db).expect("a future timestamp is no error");
            assert_eq!(api(&limiter).active_slots, 6, "owner, at {at}");
            assert!(limiter.rate_limit("api", 4).try_acquire().unwrap(), "{at}");
            assert!(!limiter.rate_limit("api", 1).try_acquire().unwrap(), "{at}");
        }
    });
}

#[test]
fn a_timestamp_in_the_past_drains_by_the_time_passed() {
    watchdog(WATCHDOG, || {
        let scratch = Scratch::new();
        let db = scratch.db();
        store_with_bucket(&db, SLOW, 6);
        // An hour ago at 0.001/s: 3.6 slots drained, 2.4 left, shown as 3.
        set_decaying_at(&db, &format!("{}", unix_now() - 3600.0));
        assert_eq!(api_seen_by_admin(&db).active_slots, 3);
        let limiter = Limiter::open(&db).unwrap();
        assert_eq!(api(&limiter).active_slots, 3);
        assert!(
            limiter.rate_limit("api", 7).try_acquire().unwrap(),
            "2.4 + 7 fit in 10"
        );
        assert!(
            !limiter.rate_limit("api", 1).try_acquire().unwrap(),
            "10.4 do not"
        );
    });
}

#[test]
fn a_timestamp_far_in_the_past_drains_everything() {
    watchdog(WATCHDOG, || {
        let far_past = [
            "0",
            "-1",
            "-86400",
            "-2177452800", // 1901
            "-1e18",
            "-1.7976931348623157e308",
            "-9e999", // -inf
        ];
        for at in far_past {
            let scratch = Scratch::new();
            let db = scratch.db();
            store_with_bucket(&db, SLOW, 6);
            set_decaying_at(&db, at);
            assert_eq!(api_seen_by_admin(&db).active_slots, 0, "admin, at {at}");
            let limiter = Limiter::open(&db).expect("a past timestamp is no error");
            assert_eq!(api(&limiter).active_slots, 0, "owner, at {at}");
            assert!(limiter.rate_limit("api", 10).try_acquire().unwrap(), "{at}");
        }
    });
}

#[test]
fn without_decay_no_timestamp_drains_anything() {
    watchdog(WATCHDOG, || {
        for at in ["-9e999", "0", "9e999"] {
            let scratch = Scratch::new();
            let db = scratch.db();
            store_with_bucket(&db, SLOW, 6);
            // Decay switched off (by the CLI, say) while nobody owned it.
            edit(
                &db,
                &format!(
                    "UPDATE limits SET slot_decay_per_second = 0 WHERE name = 'api';
                     UPDATE slot_state SET decaying_at = {at} WHERE name = 'api';"
                ),
            );
            let limiter = Limiter::open(&db).unwrap();
            let info = api(&limiter);
            assert_eq!(
                (info.active_slots, info.slot_decay_per_second),
                (6, 0.0),
                "{at}"
            );
        }
    });
}

/// After an open that drained nothing (the stored time was ahead), decay
/// goes on from the moment of the open, not from the stored time.
#[test]
fn a_future_timestamp_does_not_stall_decay_after_the_open() {
    watchdog(WATCHDOG, || {
        let scratch = Scratch::new();
        let db = scratch.db();
        // 100/s: the full bucket drains in 0.1 s.
        store_with_bucket(&db, 100.0, 10);
        set_decaying_at(&db, &format!("{}", unix_now() + 1e9));
        let limiter = Limiter::open(&db).unwrap();
        // Generous: only a stall (until the stored time) makes it fail.
        limiter
            .rate_limit("api", 10)
            .timeout(Duration::from_secs(20))
            .acquire()
            .expect("the bucket drains from the open on");
        let before = unix_now();
        limiter.flush().unwrap();
        let after = unix_now();
        drop(limiter);
        // The stored time is the owner's wall clock again, not the future.
        let stored = stored_decaying_at(&db);
        assert!(
            stored <= after && stored >= before - 30.0,
            "decaying_at {stored} should be about now ({before}..{after})"
        );
    });
}

/// The owner stamps decaying slots with the wall clock it flushed them at.
#[test]
fn the_owner_stamps_decaying_slots_with_the_wall_clock() {
    watchdog(WATCHDOG, || {
        let scratch = Scratch::new();
        let db = scratch.db();
        let before = unix_now();
        store_with_bucket(&db, SLOW, 3);
        let after = unix_now();
        let stored = stored_decaying_at(&db);
        assert!(
            (before..=after).contains(&stored),
            "decaying_at {stored} outside {before}..={after}"
        );
    });
}

/// Decaying-slot counts that make no sense count as none left; an absurdly
/// full bucket stays full (nothing fits) until a reset empties it.
#[test]
fn nonsense_bucket_contents_never_panic() {
    watchdog(WATCHDOG, || {
        let now = unix_now();
        for (slots, left) in [
            ("9e999", 0),
            ("-9e999", 0),
            ("-5", 0),
            ("0", 0),
            ("4.25", 5),
        ] {
            let scratch = Scratch::new();
            let db = scratch.db();
            store_with_bucket(&db, SLOW, 6);
            edit(
                &db,
                &format!(
                    "UPDATE slot_state SET decaying_slots = {slots}, decaying_at = {now} \
                     WHERE name = 'api'"
                ),
            );
            let limiter = Limiter::open(&db).unwrap();
            assert_eq!(api(&limiter).active_slots, left, "decaying_slots = {slots}");
        }

        let scratch = Scratch::new();
        let db = scratch.db();
        store_with_bucket(&db, SLOW, 6);
        edit(
            &db,
            &format!(
                "UPDATE slot_state SET decaying_slots = 1e300, decaying_at = {now} \
                 WHERE name = 'api'"
            ),
        );
        let limiter = Limiter::open(&db).unwrap();
        assert_eq!(
            api(&limiter).active_slots,
            u32::MAX,
            "saturated, not wrapped"
        );
        assert!(!limiter.rate_limit("api", 1).try_acquire().unwrap());
        assert!(limiter
            .concurrency("api", 1)
            .try_acquire()
            .unwrap()
            .is_none());
        let err = limiter
            .rate_limit("api", 1)
            .timeout(Duration::from_millis(20))
            .acquire()
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        limiter.reset_limit("api").unwrap();
        assert_eq!(api(&limiter).active_slots, 0);
        assert!(limiter.rate_limit("api", 10).try_acquire().unwrap());
    });
}

/// SQLite cannot store NaN in a REAL column (it becomes NULL), so a NaN
/// timestamp can only come as text, a blob or a NULL from a hand edit that
/// dropped the constraints. The store is then refused with a Storage error
/// (or, should it ever be read leniently, must drain nothing): never a panic.
#[test]
fn an_unreadable_timestamp_is_an_error_or_drains_nothing() {
    watchdog(WATCHDOG, || {
        for at in ["'NaN'", "'soon'", "x'00'", "NULL"] {
            let scratch = Scratch::new();
            let db = scratch.db();
            store_with_bucket(&db, SLOW, 6);
            edit(
                &db,
                &format!(
                    "PRAGMA foreign_keys = OFF;
                     CREATE TABLE loose AS SELECT * FROM slot_state;
                     DROP TABLE slot_state;
                     ALTER TABLE loose RENAME TO slot_state;
                     UPDATE slot_state SET decaying_at = {at} WHERE name = 'api';"
                ),
            );
            match Limiter::open(&db) {
                Err(e @ Error::Storage { .. }) => {
                    let text = e.to_string();
                    assert!(!text.contains('\n'), "{text}");
                }
                Err(e) => panic!("decaying_at = {at}: {e}"),
                Ok(limiter) => assert_eq!(api(&limiter).active_slots, 6, "{at}"),
            }
        }
    });
}
