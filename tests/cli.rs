//! The `turnstile` admin binary, run as a separate process: every verb with
//! and without a running owner, live changes reaching the owner, errors that
//! exit 1 with one line and leave files alone, `TURNSTILE_DB`, and `watch`.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{eventually, watchdog, WATCHDOG};
use serde_json::Value;
use turnstile::{LimitConfig, LimitInfo, LimitUpdate, Limiter};

const BIN: &str = env!("CARGO_BIN_EXE_turnstile");

/// How long one CLI run (other than `watch`) may take before it counts as hung.
const RUN_LIMIT: Duration = Duration::from_secs(20);

/// Bound for waiting on the owner to pick up a change (flush_interval is 50 or
/// 100 ms): generous, only a change that never arrives trips it.
const REACH: Duration = Duration::from_secs(10);

/// The field names of `LimitInfo`, as `-o json` must give them.
const FIELDS: [&str; 9] = [
    "name",
    "limit",
    "active",
    "slot_decay_per_second",
    "active_slots",
    "held_slots",
    "denied_slots",
    "waiters",
    "avg_slot_occupancy_seconds",
];

// ---------------------------------------------------------------------------
// Helpers

/// A scratch directory of its own, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "turnstile-cli-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The names of the files in the directory, sorted.
    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One finished run of the binary.
#[derive(Debug)]
struct Run {
    what: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn success(self) -> Run {
        assert_eq!(
            self.code,
            Some(0),
            "`{}` should succeed; stdout: {:?}, stderr: {:?}",
            self.what,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Exit status 1 and exactly one non-empty line on stderr.
    #[track_caller]
    fn failure(self) -> Run {
        assert_eq!(
            self.code,
            Some(1),
            "`{}` should fail with status 1; stdout: {:?}, stderr: {:?}",
            self.what,
            self.stdout,
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert!(
            lines.len() == 1 && !lines[0].trim().is_empty() && self.stderr.ends_with('\n'),
            "`{}` should print exactly one line on stderr, printed {:?}",
            self.what,
            self.stderr
        );
        self
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "`{}` should print JSON ({e}), printed {:?}",
                self.what, self.stdout
            )
        })
    }
}

/// The binary with no `TURNSTILE_DB` inherited and stdin not a terminal.
fn bin() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("TURNSTILE_DB").stdin(Stdio::null());
    cmd
}

/// Spawns `cmd` with stdout and stderr piped, draining both on threads.
fn spawn_piped(cmd: &mut Command) -> (Child, mpsc::Receiver<String>, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the turnstile binary");
    let drain = |mut from: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = from.read_to_end(&mut bytes);
            let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
        });
        rx
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    (child, out, err)
}

/// Runs `cmd` to the end; kills it and fails if it takes over `RUN_LIMIT`.
#[track_caller]
fn run(mut cmd: Command) -> Run {
    let what = format!("{cmd:?}");
    let (mut child, out, err) = spawn_piped(&mut cmd);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{what}` did not finish within {RUN_LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(2));
    };
    Run {
        what,
        code: status.code(),
        stdout: out.recv_timeout(RUN_LIMIT).unwrap(),
        stderr: err.recv_timeout(RUN_LIMIT).unwrap(),
    }
}

/// `turnstile --db <db> <args>`.
#[track_caller]
fn turnstile(db: &Path, args: &[&str]) -> Run {
    let mut cmd = bin();
    cmd.arg("--db").arg(db).args(args);
    run(cmd)
}

/// The keys of a JSON object, which must be exactly `LimitInfo`'s fields.
#[track_caller]
fn assert_info_keys(value: &Value) {
    let keys: BTreeSet<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("a limit should be a JSON object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, FIELDS.into_iter().collect::<BTreeSet<_>>());
}

/// `inspect <name> -o json`, checked for its keys.
#[track_caller]
fn inspect(db: &Path, name: &str) -> Value {
    let value = turnstile(db, &["inspect", name, "-o", "json"])
        .success()
        .json();
    assert_info_keys(&value);
    assert_eq!(value["name"], name);
    value
}

/// `ls -o json`, checked for its keys.
#[track_caller]
fn ls_json(db: &Path) -> Vec<Value> {
    let value = turnstile(db, &["ls", "-o", "json"]).success().json();
    let all = value
        .as_array()
        .unwrap_or_else(|| panic!("`ls -o json` should print an array: {value}"))
        .clone();
    for one in &all {
        assert_info_keys(one);
    }
    all
}

fn names(all: &[Value]) -> Vec<&str> {
    all.iter().map(|v| v["name"].as_str().unwrap()).collect()
}

/// The cell of column `column` in the `ls` table row of limit `name`.
#[track_caller]
fn ls_cell(table: &str, name: &str, column: &str) -> String {
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let idx = header
        .iter()
        .position(|h| *h == column)
        .unwrap_or_else(|| panic!("no column {column} in {table:?}"));
    let row: Vec<&str> = lines
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row for {name} in {table:?}"));
    row[idx].to_string()
}

/// An owner of the store at `path` that picks up the CLI's edits quickly.
fn owner(path: &Path) -> Limiter {
    Limiter::builder()
        .path(path)
        .flush_interval(Duration::from_millis(50))
        .build()
        .unwrap()
}

fn info(limiter: &Limiter, name: &str) -> LimitInfo {
    limiter
        .limit(name)
        .unwrap_or_else(|| panic!("the owner should have limit {name:?}"))
}

/// Waits (bounded) for the owner to see `cond` hold.
#[track_caller]
fn reaches(limiter: &Limiter, name: &str, what: &str, cond: impl Fn(Option<LimitInfo>) -> bool) {
    assert!(
        eventually(REACH, || cond(limiter.limit(name))),
        "the owner never saw {what} on {name:?}; it has {:?}",
        limiter.limit(name)
    );
}

/// Starts a thread blocked in `concurrency(name, 1).acquire()` and waits until
/// the owner counts it as a waiter; the thread returns once it got through.
fn blocked_waiter(limiter: &Limiter, name: &str) -> thread::JoinHandle<()> {
    let waiter = {
        let limiter = limiter.clone();
        let name = name.to_string();
        thread::spawn(move || {
            let guard = limiter.concurrency(name.as_str(), 1).acquire().unwrap();
            drop(guard);
        })
    };
    assert!(
        eventually(REACH, || info(limiter, name).waiters == 1),
        "the waiter never queued on {name:?}"
    );
    waiter
}

/// Joins `handle` under the watchdog: a waiter that never wakes fails.
fn join(handle: thread::JoinHandle<()>) {
    watchdog(WATCHDOG, move || {
        handle.join().expect("the waiter panicked")
    });
}

// ---------------------------------------------------------------------------
// 1. Every verb, with and without an owner

/// Runs every verb against `db`; with `owner`, also checks that each change
/// reaches it.
fn every_verb(db: &Path, owner: Option<&Limiter>) {
    let reached = |name: &str, what: &str, cond: &dyn Fn(Option<LimitInfo>) -> bool| {
        if let Some(limiter) = owner {
            reaches(limiter, name, what, cond);
        }
    };

    let created = turnstile(db, &["create", "gpu", "--limit", "2"]).success();
    assert!(created.stdout.contains("gpu"), "{created:?}");
    turnstile(
        db,
        &[
            "create",
            "api",
            "--limit",
            "5",
            "--slot-decay-per-second",
            "0.5",
            "--disable",
        ],
    )
    .success();
    reached("gpu", "the creation", &|i| {
        i.is_some_and(|i| i.limit == 2 && i.active)
    });
    reached("api", "the creation", &|i| {
        i.is_some_and(|i| i.limit == 5 && !i.active && i.slot_decay_per_second == 0.5)
    });

    // ls, table and JSON.
    let table = turnstile(db, &["ls"]).success().stdout;
    for column in ["NAME", "LIMIT", "ACTIVE", "SLOTS", "DECAY/S", "DENIED"] {
        assert!(table.contains(column), "no {column} in {table:?}");
    }
    assert_eq!(ls_cell(&table, "gpu", "LIMIT"), "2");
    assert_eq!(ls_cell(&table, "api", "ACTIVE"), "false");
    let all = ls_json(db);
    assert_eq!(names(&all), ["api", "gpu"], "sorted by name");
    assert_eq!(all[0]["limit"], 5);
    assert_eq!(all[0]["active"], false);
    assert_eq!(all[0]["slot_decay_per_second"], 0.5);
    assert_eq!(all[1]["limit"], 2);
    assert_eq!(all[1]["active"], true);
    assert_eq!(all[1]["slot_decay_per_second"], 0.0);

    // inspect, table and JSON.
    let shown = turnstile(db, &["inspect", "gpu"]).success().stdout;
    for field in FIELDS {
        assert!(shown.contains(field), "no {field} in {shown:?}");
    }
    let gpu = inspect(db, "gpu");
    assert_eq!(gpu["limit"], 2);
    assert_eq!(gpu["active"], true);
    assert_eq!(gpu["held_slots"], 0);
    assert_eq!(gpu["denied_slots"], 0);
    assert_eq!(gpu["avg_slot_occupancy_seconds"], 2.0);

    // update, each flag.
    turnstile(
        db,
        &[
            "update",
            "gpu",
            "--limit",
            "4",
            "--slot-decay-per-second",
            "1.5",
        ],
    )
    .success();
    let gpu = inspect(db, "gpu");
    assert_eq!(
        (gpu["limit"].as_u64(), gpu["active"].as_bool()),
        (Some(4), Some(true))
    );
    assert_eq!(gpu["slot_decay_per_second"], 1.5);
    reached("gpu", "the update", &|i| {
        i.is_some_and(|i| i.limit == 4 && i.slot_decay_per_second == 1.5)
    });
    turnstile(db, &["update", "gpu", "--disable"]).success();
    assert_eq!(inspect(db, "gpu")["active"], false);
    reached("gpu", "update --disable", &|i| i.is_some_and(|i| !i.active));
    turnstile(db, &["update", "gpu", "--enable"]).success();
    assert_eq!(inspect(db, "gpu")["active"], true);
    reached("gpu", "update --enable", &|i| i.is_some_and(|i| i.active));
    assert_eq!(
        inspect(db, "gpu")["limit"],
        4,
        "flags change only themselves"
    );

    // enable, disable.
    turnstile(db, &["disable", "gpu"]).success();
    assert_eq!(inspect(db, "gpu")["active"], false);
    reached("gpu", "disable", &|i| i.is_some_and(|i| !i.active));
    turnstile(db, &["enable", "api"]).success();
    assert_eq!(inspect(db, "api")["active"], true);
    reached("api", "enable", &|i| i.is_some_and(|i| i.active));
    turnstile(db, &["enable", "gpu"]).success();
    assert_eq!(inspect(db, "gpu")["active"], true);

    // reset.
    turnstile(db, &["reset", "api"]).success();
    let api = inspect(db, "api");
    assert_eq!(
        (api["active_slots"].as_u64(), api["denied_slots"].as_u64()),
        (Some(0), Some(0))
    );

    // delete.
    turnstile(db, &["delete", "api"]).success();
    assert_eq!(names(&ls_json(db)), ["gpu"]);
    reached("api", "the deletion", &|i| i.is_none());
    turnstile(db, &["delete", "gpu", "--yes"]).success();
    assert!(ls_json(db).is_empty());
    reached("gpu", "the deletion", &|i| i.is_none());
    let table = turnstile(db, &["ls"]).success().stdout;
    assert!(table.contains("NAME"), "{table:?}");
}

#[test]
fn every_verb_works_on_a_store_with_no_owner() {
    let scratch = Scratch::new("no-owner");
    let db = scratch.path("limits.db");
    // `create` makes the store.
    every_verb(&db, None);
    assert!(db.exists());
}

#[test]
fn every_verb_works_on_a_store_whose_owner_is_running() {
    let scratch = Scratch::new("owner");
    let db = scratch.path("limits.db");
    let limiter = Limiter::open(&db).unwrap();
    every_verb(&db, Some(&limiter));
    // The owner still owns it: the CLI took nothing from it.
    assert!(matches!(
        Limiter::open(&db),
        Err(turnstile::Error::StoreInUse { .. })
    ));
    drop(limiter);
}

// ---------------------------------------------------------------------------
// 2. Live changes reach the running owner

#[test]
fn cli_update_wakes_a_waiter_blocked_in_the_owner() {
    let scratch = Scratch::new("update-wakes");
    let db = scratch.path("limits.db");
    let limiter = owner(&db);
    limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
    let _held = limiter.concurrency("gpu", 1).acquire().unwrap();
    let waiter = blocked_waiter(&limiter, "gpu");

    turnstile(&db, &["update", "gpu", "--limit", "2"]).success();
    join(waiter);
    reaches(&limiter, "gpu", "limit 2", |i| {
        i.is_some_and(|i| i.limit == 2)
    });
}

#[test]
fn cli_create_reaches_the_owner() {
    let scratch = Scratch::new("create-reaches");
    let db = scratch.path("limits.db");
    let limiter = owner(&db);
    turnstile(
        &db,
        &[
            "create",
            "db",
            "--limit",
            "3",
            "--slot-decay-per-second",
            "2",
        ],
    )
    .success();
    reaches(&limiter, "db", "the creation", |i| {
        i.is_some_and(|i| i.limit == 3 && i.active && i.slot_decay_per_second == 2.0)
    });
    // And the owner uses it as a limit of its own.
    let guards: Vec<_> = (0..3)
        .map(|_| limiter.concurrency("db", 1).acquire().unwrap())
        .collect();
    assert!(limiter
        .concurrency("db", 1)
        .try_acquire()
        .unwrap()
        .is_none());
    drop(guards);
}

#[test]
fn cli_delete_reaches_the_owner() {
    let scratch = Scratch::new("delete-reaches");
    let db = scratch.path("limits.db");
    let limiter = owner(&db);
    limiter.create_limit("gone", LimitConfig::new(1)).unwrap();
    let _held = limiter.concurrency("gone", 1).acquire().unwrap();
    let waiter = {
        let limiter = limiter.clone();
        thread::spawn(move || {
            let guard = limiter
                .concurrency("gone", 1)
                .create_if_missing(false)
                .acquire()
                .unwrap();
            drop(guard);
        })
    };
    assert!(eventually(REACH, || info(&limiter, "gone").waiters == 1));

    turnstile(&db, &["delete", "gone"]).success();
    // A waiter on a deleted limit goes on as for a missing one (skipped).
    join(waiter);
    reaches(&limiter, "gone", "the deletion", |i| i.is_none());
    assert!(ls_json(&db).is_empty());
}

#[test]
fn cli_disable_lets_a_waiter_blocked_in_the_owner_through() {
    let scratch = Scratch::new("disable-wakes");
    let db = scratch.path("limits.db");
    let limiter = owner(&db);
    limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
    let _held = limiter.concurrency("gpu", 1).acquire().unwrap();
    let waiter = blocked_waiter(&limiter, "gpu");

    turnstile(&db, &["disable", "gpu"]).success();
    join(waiter);
    reaches(&limiter, "gpu", "the deactivation", |i| {
        i.is_some_and(|i| !i.active)
    });
}

#[test]
fn cli_reset_drops_decaying_slots_in_the_owner() {
    let scratch = Scratch::new("reset-reaches");
    let db = scratch.path("limits.db");
    let limiter = owner(&db);
    // Drains one slot in 1000 s: full for the whole test unless reset.
    limiter
        .create_limit("api", LimitConfig::new(1).slot_decay_per_second(0.001))
        .unwrap();
    assert!(limiter.rate_limit("api", 1).try_acquire().unwrap());
    assert!(!limiter.rate_limit("api", 1).try_acquire().unwrap());
    assert_eq!(info(&limiter, "api").denied_slots, 1);

    turnstile(&db, &["reset", "api"]).success();
    reaches(&limiter, "api", "the reset", |i| {
        i.is_some_and(|i| i.active_slots == 0 && i.denied_slots == 0)
    });
    assert!(limiter.rate_limit("api", 1).try_acquire().unwrap());
}

/// The owner's own creation and reset are the base for telling the CLI's
/// edits apart: a later edit of another limit must not make the owner take
/// them for another process's (re-creating the limit, dropping its held
/// slots, or resetting it again).
#[test]
fn the_owners_own_edits_are_not_taken_for_another_processs() {
    let scratch = Scratch::new("own-edits");
    let db = scratch.path("limits.db");
    let limiter = owner(&db);
    limiter.create_limit("gpu", LimitConfig::new(2)).unwrap();
    limiter
        .create_limit("api", LimitConfig::new(2).slot_decay_per_second(0.001))
        .unwrap();
    assert!(limiter.rate_limit("api", 1).try_acquire().unwrap());
    limiter.reset_limit("api").unwrap();
    let _held = limiter.concurrency("gpu", 1).acquire().unwrap();
    assert!(limiter.rate_limit("api", 1).try_acquire().unwrap());

    turnstile(&db, &["create", "other", "--limit", "3"]).success();
    reaches(&limiter, "other", "the creation", |i| i.is_some());
    let gpu = info(&limiter, "gpu");
    assert_eq!(gpu.held_slots, 1, "gpu was taken for re-created: {gpu:?}");
    let api = info(&limiter, "api");
    assert_eq!(api.active_slots, 1, "api was reset again: {api:?}");
}

/// The owner changes the limit while the CLI deactivates it: neither edit may
/// be lost, neither in the owner's memory nor in the file.
#[test]
fn edits_from_code_and_from_the_cli_never_lose_one_another() {
    let scratch = Scratch::new("both-edits");
    let db = scratch.path("limits.db");
    let limiter = owner(&db);
    for round in 0..4 {
        let name = format!("x{round}");
        limiter.create_limit(&name, LimitConfig::new(1)).unwrap();
        let cli = {
            let db = db.clone();
            let name = name.clone();
            thread::spawn(move || turnstile(&db, &["disable", &name]).success())
        };
        // Vary which one tends to come first.
        if round % 2 == 1 {
            thread::sleep(Duration::from_millis(5 * round));
        }
        limiter
            .update_limit(&name, LimitUpdate::new().limit(7))
            .unwrap();
        cli.join().expect("the CLI run failed");
        limiter.flush().unwrap();

        reaches(&limiter, &name, "limit 7 and inactive", |i| {
            i.is_some_and(|i| i.limit == 7 && !i.active)
        });
        let stored = inspect(&db, &name);
        assert_eq!(stored["limit"], 7, "the file lost the owner's edit");
        assert_eq!(stored["active"], false, "the file lost the CLI's edit");
    }
    // The other order, strictly one after the other.
    limiter.create_limit("y", LimitConfig::new(1)).unwrap();
    turnstile(&db, &["disable", "y"]).success();
    limiter
        .update_limit("y", LimitUpdate::new().limit(7))
        .unwrap();
    limiter.flush().unwrap();
    reaches(&limiter, "y", "limit 7 and inactive", |i| {
        i.is_some_and(|i| i.limit == 7 && !i.active)
    });
    let stored = inspect(&db, "y");
    assert_eq!(
        (stored["limit"].as_u64(), stored["active"].as_bool()),
        (Some(7), Some(false))
    );
}

// ---------------------------------------------------------------------------
// 3. Occupancy as the owner last wrote it

#[test]
fn ls_and_inspect_show_the_owners_live_occupancy() {
    let scratch = Scratch::new("occupancy");
    let db = scratch.path("limits.db");
    let limiter = owner(&db);
    limiter.create_limit("gpu", LimitConfig::new(3)).unwrap();
    let held = limiter.concurrency("gpu", 2).acquire().unwrap();
    limiter.flush().unwrap();

    let table = turnstile(&db, &["ls"]).success().stdout;
    assert_eq!(ls_cell(&table, "gpu", "HELD"), "2", "{table}");
    assert_eq!(ls_cell(&table, "gpu", "SLOTS"), "2", "{table}");
    let all = ls_json(&db);
    assert_eq!(all[0]["held_slots"], 2);
    assert_eq!(all[0]["active_slots"], 2);

    let shown = turnstile(&db, &["inspect", "gpu"]).success().stdout;
    for field in FIELDS {
        assert!(shown.contains(field), "no {field} in {shown:?}");
    }
    let held_line = shown
        .lines()
        .find(|l| l.starts_with("held_slots"))
        .unwrap_or_else(|| panic!("no held_slots line in {shown:?}"));
    assert!(held_line.trim_end().ends_with('2'), "{held_line:?}");
    assert_eq!(inspect(&db, "gpu")["held_slots"], 2);

    // A denied try and the release show up too, once written.
    assert!(limiter
        .concurrency("gpu", 2)
        .try_acquire()
        .unwrap()
        .is_none());
    drop(held);
    limiter.flush().unwrap();
    let gpu = inspect(&db, "gpu");
    assert_eq!(gpu["held_slots"], 0);
    assert_eq!(gpu["denied_slots"], 2);
    assert_eq!(
        ls_cell(&turnstile(&db, &["ls"]).success().stdout, "gpu", "HELD"),
        "0"
    );
}

#[test]
fn ls_shows_the_owners_decaying_slots_and_waiters() {
    let scratch = Scratch::new("decay-waiters");
    let db = scratch.path("limits.db");
    let limiter = owner(&db);
    // One slot drains in 1000 s: still there when the CLI reads it.
    limiter
        .create_limit("api", LimitConfig::new(2).slot_decay_per_second(0.001))
        .unwrap();
    assert!(limiter.rate_limit("api", 1).try_acquire().unwrap());
    limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
    let held = limiter.concurrency("gpu", 1).acquire().unwrap();
    let waiter = blocked_waiter(&limiter, "gpu");
    limiter.flush().unwrap();

    let table = turnstile(&db, &["ls"]).success().stdout;
    assert_eq!(ls_cell(&table, "api", "SLOTS"), "1", "{table}");
    assert_eq!(ls_cell(&table, "api", "DECAYING"), "1", "{table}");
    assert_eq!(ls_cell(&table, "api", "HELD"), "0", "{table}");
    assert_eq!(ls_cell(&table, "gpu", "WAITERS"), "1", "{table}");
    assert_eq!(inspect(&db, "gpu")["waiters"], 1);

    drop(held);
    join(waiter);
    limiter.flush().unwrap();
    let gpu = inspect(&db, "gpu");
    assert_eq!(
        (gpu["waiters"].as_u64(), gpu["held_slots"].as_u64()),
        (Some(0), Some(0))
    );
}

// ---------------------------------------------------------------------------
// 4. Errors: status 1, one line on stderr, files left alone

/// A store with limit "a", made by the CLI, and its bytes.
fn store_with_a(scratch: &Scratch) -> (PathBuf, Vec<u8>) {
    let db = scratch.path("limits.db");
    turnstile(&db, &["create", "a", "--limit", "2"]).success();
    let bytes = fs::read(&db).unwrap();
    (db, bytes)
}

/// Runs `args`, which must fail, and checks the store and its directory did
/// not change.
#[track_caller]
fn fails_untouched(scratch: &Scratch, db: &Path, args: &[&str]) -> Run {
    let before = fs::read(db).unwrap();
    let files = scratch.entries();
    let run = turnstile(db, args).failure();
    assert!(
        fs::read(db).unwrap() == before,
        "`{}` altered the file",
        run.what
    );
    assert_eq!(scratch.entries(), files, "`{}` left files behind", run.what);
    run
}

/// A hand edit that leaves text where a number belongs in a slot row: the
/// owner refuses the store without writing to it, the CLI's reads name the
/// limit and the repair, and `reset` repairs it.
#[test]
fn an_unreadable_slot_value_is_named_and_reset_repairs_it() {
    let scratch = Scratch::new("unreadable-slot");
    let db = scratch.path("limits.db");
    turnstile(
        &db,
        &[
            "create",
            "api",
            "--limit",
            "2",
            "--slot-decay-per-second",
            "1",
        ],
    )
    .success();
    turnstile(&db, &["create", "gpu", "--limit", "1"]).success();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute(
            "INSERT OR REPLACE INTO slot_state (name, decaying_slots, decaying_at) \
             VALUES ('api', 1.0, 'yesterday')",
            [],
        )
        .unwrap();
    }
    let before = fs::read(&db).unwrap();
    let files = scratch.entries();
    let err = Limiter::open(&db).expect_err("an unreadable slot value");
    let message = err.to_string();
    for part in ["\"api\"", "decaying_at", "turnstile reset api"] {
        assert!(message.contains(part), "{part} missing from: {message}");
    }
    assert!(
        fs::read(&db).unwrap() == before,
        "the owner altered the file"
    );
    assert_eq!(scratch.entries(), files, "the owner left files behind");

    let ls = fails_untouched(&scratch, &db, &["ls"]);
    assert!(ls.stderr.contains("turnstile reset api"), "{}", ls.stderr);
    turnstile(&db, &["reset", "api"]).success();
    let limiter = Limiter::open(&db).expect("repaired");
    let api = limiter.limit("api").unwrap();
    assert_eq!((api.limit, api.active_slots), (2, 0), "{api:?}");
    assert_eq!(
        limiter.limit("gpu").unwrap().limit,
        1,
        "the other limit kept"
    );
}

const MISSING_NAME_VERBS: &[&[&str]] = &[
    &["update", "nope", "--limit", "3"],
    &["update", "nope", "--disable"],
    &["delete", "nope"],
    &["delete", "nope", "--yes"],
    &["reset", "nope"],
    &["inspect", "nope"],
    &["inspect", "nope", "-o", "json"],
    &["enable", "nope"],
    &["disable", "nope"],
];

#[test]
fn an_unknown_limit_is_an_error_and_changes_nothing() {
    let scratch = Scratch::new("unknown");
    let (db, _) = store_with_a(&scratch);
    for args in MISSING_NAME_VERBS {
        let run = fails_untouched(&scratch, &db, args);
        assert!(
            run.stderr.contains("nope"),
            "should name the limit: {run:?}"
        );
        assert!(run.stdout.is_empty(), "{run:?}");
    }
    assert_eq!(names(&ls_json(&db)), ["a"]);
}

#[test]
fn an_unknown_limit_is_an_error_while_the_owner_runs() {
    let scratch = Scratch::new("unknown-owner");
    let db = scratch.path("limits.db");
    let limiter = owner(&db);
    limiter.create_limit("a", LimitConfig::new(2)).unwrap();
    limiter.flush().unwrap();
    let before = ls_json(&db);
    for args in MISSING_NAME_VERBS {
        turnstile(&db, args).failure();
    }
    limiter.flush().unwrap();
    assert_eq!(ls_json(&db), before);
    let limits = limiter.limits();
    assert_eq!(limits.len(), 1);
    assert_eq!((limits[0].limit, limits[0].active), (2, true));
}

const INVALID_VALUES: &[&[&str]] = &[
    &["--limit", "-1"],
    &["--limit", "99999999999"],
    &["--limit", "two"],
    &["--limit", "1", "--slot-decay-per-second", "NaN"],
    &["--limit", "1", "--slot-decay-per-second", "-1"],
    &["--limit", "1", "--slot-decay-per-second", "inf"],
];

#[test]
fn an_invalid_value_is_an_error_and_changes_nothing() {
    let scratch = Scratch::new("invalid");
    let (db, _) = store_with_a(&scratch);
    for values in INVALID_VALUES {
        let create: Vec<&str> = ["create", "b"].iter().chain(*values).copied().collect();
        fails_untouched(&scratch, &db, &create);
        let update: Vec<&str> = ["update", "a"].iter().chain(*values).copied().collect();
        fails_untouched(&scratch, &db, &update);
    }
    // A bad name is a bad value too.
    fails_untouched(&scratch, &db, &["create", " padded", "--limit", "1"]);
    let a = inspect(&db, "a");
    assert_eq!(
        (a["limit"].as_u64(), a["slot_decay_per_second"].as_f64()),
        (Some(2), Some(0.0))
    );
    assert_eq!(names(&ls_json(&db)), ["a"]);
}

/// `create` with a bad value must not leave a new, empty store behind.
#[test]
fn create_with_an_invalid_value_creates_no_store() {
    let scratch = Scratch::new("invalid-new");
    let db = scratch.path("limits.db");
    let mut cases: Vec<Vec<&str>> = INVALID_VALUES
        .iter()
        .map(|values| ["create", "b"].iter().chain(*values).copied().collect())
        .collect();
    cases.push(vec!["create", " padded", "--limit", "1"]);
    // Every case is tried (each on an empty directory), then all offenders
    // are reported together.
    let mut offenders = Vec::new();
    for args in &cases {
        turnstile(&db, args).failure();
        let created = scratch.entries();
        if !created.is_empty() {
            offenders.push(format!("`{}` created {created:?}", args.join(" ")));
            for file in created {
                fs::remove_file(scratch.path(&file)).unwrap();
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:#?}");
}

/// Every verb, as run against something that is not a usable store.
const EVERY_VERB: &[&[&str]] = &[
    &["create", "a", "--limit", "1"],
    &["ls"],
    &["ls", "-o", "json"],
    &["inspect", "a"],
    &["inspect", "a", "-o", "json"],
    &["update", "a", "--limit", "3"],
    &["enable", "a"],
    &["disable", "a"],
    &["reset", "a"],
    &["delete", "a"],
    &["delete", "a", "--yes"],
    &["watch", "--interval", "0.2"],
];

#[test]
fn a_text_file_is_not_a_store() {
    let scratch = Scratch::new("text");
    let db = scratch.path("notes.txt");
    fs::write(&db, "these are notes, not limits\n".repeat(20)).unwrap();
    for args in EVERY_VERB {
        fails_untouched(&scratch, &db, args);
    }
}

#[test]
fn an_sqlite_file_with_another_schema_is_not_a_store() {
    let scratch = Scratch::new("foreign");
    let db = scratch.path("other.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE limits (name TEXT PRIMARY KEY, size INTEGER);
             INSERT INTO limits VALUES ('a', 1);",
        )
        .unwrap();
    }
    assert_eq!(scratch.entries(), ["other.db"]);
    for args in EVERY_VERB {
        fails_untouched(&scratch, &db, args);
    }
}

#[test]
fn a_missing_file_is_an_error_for_every_verb_but_create() {
    let scratch = Scratch::new("missing");
    let db = scratch.path("limits.db");
    for args in EVERY_VERB.iter().filter(|a| a[0] != "create") {
        let run = turnstile(&db, args).failure();
        assert!(!db.exists(), "`{}` created the store", run.what);
        assert!(
            scratch.entries().is_empty(),
            "`{}` created {:?}",
            run.what,
            scratch.entries()
        );
    }
    // And in a directory that does not exist.
    let deeper = scratch.path("no/such/dir/limits.db");
    turnstile(&deeper, &["ls"]).failure();
    assert!(scratch.entries().is_empty());
}

#[test]
fn creating_an_existing_name_is_an_error_and_changes_nothing() {
    let scratch = Scratch::new("exists");
    let (db, _) = store_with_a(&scratch);
    let run = fails_untouched(&scratch, &db, &["create", "a", "--limit", "9"]);
    assert!(run.stderr.contains('a'), "{run:?}");
    fails_untouched(&scratch, &db, &["create", "a", "--limit", "2", "--disable"]);
    assert_eq!(inspect(&db, "a")["limit"], 2);

    // While the owner runs, too.
    let limiter = owner(&db);
    turnstile(&db, &["create", "a", "--limit", "9"]).failure();
    limiter.flush().unwrap();
    assert_eq!(inspect(&db, "a")["limit"], 2);
    assert_eq!(info(&limiter, "a").limit, 2);
}

#[test]
fn no_store_given_is_an_error() {
    let mut cmd = bin();
    cmd.arg("ls");
    let out = run(cmd).failure();
    assert!(out.stdout.is_empty(), "{out:?}");
}

// ---------------------------------------------------------------------------
// 5. delete without a terminal

#[test]
fn delete_without_a_terminal_does_not_ask() {
    let scratch = Scratch::new("delete");
    let db = scratch.path("limits.db");
    for name in ["a", "b", "c"] {
        turnstile(&db, &["create", name, "--limit", "1"]).success();
    }
    // `turnstile()` runs with stdin from /dev/null: not a terminal.
    let run = turnstile(&db, &["delete", "a"]).success();
    assert!(run.stdout.contains('a'), "{run:?}");
    assert_eq!(names(&ls_json(&db)), ["b", "c"]);
    turnstile(&db, &["delete", "b", "--yes"]).success();
    turnstile(&db, &["delete", "c", "-y"]).success();
    assert!(ls_json(&db).is_empty());
}

// ---------------------------------------------------------------------------
// 6. TURNSTILE_DB

#[test]
fn turnstile_db_names_the_store() {
    let scratch = Scratch::new("env");
    let db = scratch.path("limits.db");
    let with_env = |args: &[&str]| {
        let mut cmd = bin();
        cmd.env("TURNSTILE_DB", &db).args(args);
        run(cmd)
    };
    with_env(&["create", "gpu", "--limit", "2"]).success();
    assert!(db.exists());
    assert_eq!(
        ls_cell(&with_env(&["ls"]).success().stdout, "gpu", "LIMIT"),
        "2"
    );
    with_env(&["update", "gpu", "--limit", "5"]).success();
    let shown = with_env(&["inspect", "gpu", "-o", "json"]).success().json();
    assert_info_keys(&shown);
    assert_eq!(shown["limit"], 5);
    // The same store as --db names.
    assert_eq!(inspect(&db, "gpu")["limit"], 5);
    with_env(&["delete", "gpu"]).success();
    assert!(ls_json(&db).is_empty());
    with_env(&["inspect", "gpu"]).failure();
}

// ---------------------------------------------------------------------------
// 7. watch

/// Runs `watch --interval 0.2` until its table has been drawn `times` times;
/// returns what it printed.
fn watch_until_drawn(db: &Path, times: usize) -> String {
    let mut cmd = bin();
    cmd.arg("--db")
        .arg(db)
        .args(["watch", "--interval", "0.2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("cannot start turnstile watch");
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match stdout.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
            let text = String::from_utf8_lossy(&seen).into_owned();
            if text.matches("DENIED").count() >= times {
                let _ = tx.send(text);
                return;
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
    });
    let printed = rx.recv_timeout(RUN_LIMIT);
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let printed = printed.expect("watch printed nothing for too long");
    assert!(still_running, "watch ended by itself: {printed:?}");
    assert!(
        printed.matches("DENIED").count() >= times,
        "watch should redraw its table: {printed:?}"
    );
    printed
}

#[test]
fn watch_redraws_the_table() {
    let scratch = Scratch::new("watch");
    let db = scratch.path("limits.db");
    turnstile(&db, &["create", "gpu", "--limit", "2"]).success();
    let printed = watch_until_drawn(&db, 2);
    assert!(printed.contains("gpu"), "{printed:?}");
    assert!(printed.contains("no owner"), "{printed:?}");
}

#[test]
fn watch_shows_the_owner_and_its_occupancy() {
    let scratch = Scratch::new("watch-owner");
    let db = scratch.path("limits.db");
    let limiter = owner(&db);
    limiter.create_limit("gpu", LimitConfig::new(3)).unwrap();
    let _held = limiter.concurrency("gpu", 2).acquire().unwrap();
    limiter.flush().unwrap();
    let printed = watch_until_drawn(&db, 2);
    assert!(
        printed.contains(&format!("owned by process {}", std::process::id())),
        "{printed:?}"
    );
    // The first drawing is complete (a second one began after it); its table
    // shows the held slots.
    let first = printed.split("\x1b[2J\x1b[H").nth(1).unwrap();
    let table = first.split("\n\n").nth(1).unwrap_or(first);
    assert_eq!(ls_cell(table, "gpu", "HELD"), "2", "{printed:?}");
}

#[test]
fn watch_rejects_a_bad_interval() {
    let scratch = Scratch::new("watch-bad");
    let (db, bytes) = store_with_a(&scratch);
    for interval in ["0", "-1", "NaN", "soon"] {
        turnstile(&db, &["watch", "--interval", interval]).failure();
    }
    assert!(fs::read(&db).unwrap() == bytes);
}
