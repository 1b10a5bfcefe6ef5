//! `kill -9` of a store's owner: the test binary runs itself again as a
//! child that owns a store, and the parent kills it with SIGKILL and reopens.
//!
//! The child role is the test `crash_child`: when `TURNSTILE_CRASH_CHILD`
//! names a store it opens it, takes slots, flushes, prints `READY` and waits
//! to be killed (idle), or keeps hammering the limits and changing
//! definitions (traffic). Without the variable it passes at once.
//!
//! After the kill: the store opens at once (the OS lock died with the
//! process), passes `PRAGMA integrity_check`, holds every definition the
//! child reported as done, frees the dead owner's held slots, and its
//! decaying state is no older than the flush interval.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{unix_now, watchdog, TempDir, WATCHDOG};
use rusqlite::{Connection, OptionalExtension};
use turnstile::{Error, LimitConfig, LimitUpdate, Limiter};

/// The store the child owns; unset in the parent.
const CHILD_ENV: &str = "TURNSTILE_CRASH_CHILD";
/// `idle` or `traffic`.
const MODE_ENV: &str = "TURNSTILE_CRASH_MODE";

/// The child's flush interval: the bound on lost slot state.
const FLUSH: Duration = Duration::from_millis(100);
/// Slack on top of `FLUSH` for a loaded machine.
const SLACK_SECS: f64 = 2.0;
/// A child that is never killed gives up after this long.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);
/// How long the parent waits for `READY`.
const READY_WITHIN: Duration = Duration::from_secs(20);

const API_LIMIT: u32 = 100;
const API_DECAY: f64 = 50.0;
const API_TAKEN: u32 = 60;
const GPU_LIMIT: u32 = 4;
const GPU_HELD: u32 = 3;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn stored_limit(conn: &Connection, name: &str) -> Option<(u32, bool, f64)> {
    conn.query_row(
        r#"SELECT "limit", active, slot_decay_per_second FROM limits WHERE name = ?1"#,
        [name],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()
    .unwrap()
}

/// `(held_slots, decaying_slots, decaying_at)` as stored.
fn stored_slots(conn: &Connection, name: &str) -> Option<(i64, f64, f64)> {
    conn.query_row(
        "SELECT held_slots, decaying_slots, decaying_at FROM slot_state WHERE name = ?1",
        [name],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()
    .unwrap()
}

// ---------------------------------------------------------------------------
// The child role
// ---------------------------------------------------------------------------

/// The child: acts only when `TURNSTILE_CRASH_CHILD` is set; otherwise a
/// no-op that passes.
#[test]
fn crash_child() {
    let Some(db) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let traffic = std::env::var(MODE_ENV).is_ok_and(|m| m == "traffic");
    let deadline = Instant::now() + CHILD_LIFETIME;

    let limiter = Limiter::builder()
        .path(PathBuf::from(db))
        .flush_interval(FLUSH)
        .build()
        .expect("child: open the store");
    limiter
        .create_limit("gpu", LimitConfig::new(GPU_LIMIT))
        .expect("child: create gpu");
    limiter
        .create_limit(
            "api",
            LimitConfig::new(API_LIMIT).slot_decay_per_second(API_DECAY),
        )
        .expect("child: create api");
    limiter
        .create_limit("db", LimitConfig::new(2))
        .expect("child: create db");
    let guards: Vec<_> = (0..GPU_HELD)
        .map(|_| {
            limiter
                .concurrency("gpu", 1)
                .acquire()
                .expect("child: hold gpu")
        })
        .collect();
    let t0 = unix_now();
    for _ in 0..API_TAKEN {
        assert!(limiter.rate_limit("api", 1).try_acquire().unwrap());
    }
    let t1 = unix_now();

    if traffic {
        // READY only once every thread is under way.
        let (started, all_started) = mpsc::channel();
        for worker in 0..4 {
            let limiter = limiter.clone();
            let started = started.clone();
            thread::spawn(move || hammer(&limiter, worker, deadline, started));
        }
        let creator = limiter.clone();
        thread::spawn(move || change_definitions(&creator, deadline, started));
        for _ in 0..5 {
            all_started.recv().expect("child: a traffic thread died");
        }
    }

    limiter.flush().expect("child: flush");
    println!("TOOK {t0} {t1}");
    println!("READY");

    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    drop(guards);
    panic!("child: nobody killed me within {CHILD_LIFETIME:?}");
}

/// Takes and gives back slots as fast as it can.
fn hammer(limiter: &Limiter, worker: u32, deadline: Instant, started: mpsc::Sender<()>) {
    let mut round = 0u64;
    while Instant::now() < deadline {
        if round == 1 {
            let _ = started.send(());
        }
        round += 1;
        let names: &[&str] = if (round + u64::from(worker)).is_multiple_of(2) {
            &["gpu"]
        } else {
            &["gpu", "db"]
        };
        match limiter
            .concurrency(names, 1)
            .timeout(Duration::from_millis(20))
            .acquire()
        {
            Ok(guard) => drop(guard),
            Err(e) if e.is_timeout() => {}
            Err(e) => panic!("child: acquire: {e}"),
        }
        let _ = limiter.rate_limit("api", 1).try_acquire().unwrap();
    }
}

/// Creates, updates and deletes limits, saying so on stdout once each call
/// has returned.
fn change_definitions(limiter: &Limiter, deadline: Instant, started: mpsc::Sender<()>) {
    let mut i = 0u64;
    while Instant::now() < deadline {
        if i == 1 {
            let _ = started.send(());
        }
        let name = format!("job-{i}");
        limiter
            .create_limit(&name, LimitConfig::new(1))
            .expect("child: create job");
        println!("CREATED {name}");
        limiter
            .update_limit(&name, LimitUpdate::new().limit(2))
            .expect("child: update job");
        println!("UPDATED {name}");
        if i.is_multiple_of(3) {
            limiter.delete_limit(&name).expect("child: delete job");
            println!("DELETED {name}");
        }
        i += 1;
        // Pacing only, so the store does not grow without bound.
        thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------------------
// The parent
// ---------------------------------------------------------------------------

/// Kills the child if the test fails before it does.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running child and the lines it printed.
struct Running {
    child: ChildGuard,
    pid: u32,
    lines: mpsc::Receiver<String>,
    stdout: thread::JoinHandle<()>,
    stderr: thread::JoinHandle<String>,
    took: (f64, f64),
    /// Every line read so far.
    seen: Vec<String>,
}

/// What the parent saw of the child's definition changes.
#[derive(Debug, Default)]
struct Changes {
    created: BTreeMap<String, bool>,
    updated: BTreeMap<String, bool>,
    deleted: BTreeMap<String, bool>,
}

impl Changes {
    fn note(&mut self, line: &str) {
        // libtest may put "test crash_child ... " before the first line.
        let mut words = line
            .split_whitespace()
            .skip_while(|w| !["CREATED", "UPDATED", "DELETED"].contains(w));
        let map = match words.next() {
            Some("CREATED") => &mut self.created,
            Some("UPDATED") => &mut self.updated,
            Some("DELETED") => &mut self.deleted,
            _ => return,
        };
        if let Some(name) = words.next() {
            map.insert(name.to_string(), true);
        }
    }

    /// The stored limits `name` may have after the changes reported so far
    /// (the kill may come after a call returned but before its line was
    /// printed): `None` for deleted.
    fn allowed(&self, name: &str) -> Vec<Option<u32>> {
        let index: u64 = name
            .strip_prefix("job-")
            .and_then(|i| i.parse().ok())
            .expect("a job name");
        // change_definitions deletes every third job right after updating it.
        let deleted_next = index.is_multiple_of(3);
        if self.deleted.contains_key(name) {
            vec![None]
        } else if self.updated.contains_key(name) {
            if deleted_next {
                vec![Some(2), None]
            } else {
                vec![Some(2)]
            }
        } else if self.created.contains_key(name) {
            vec![Some(1), Some(2)]
        } else {
            vec![None, Some(1), Some(2)]
        }
    }
}

fn spawn_child(db: &Path, mode: &str) -> Running {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, db)
        .env(MODE_ENV, mode)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let pid = child.id();
    let out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    let stdout = thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    let mut running = Running {
        child: ChildGuard(Some(child)),
        pid,
        lines,
        stdout,
        stderr,
        took: (0.0, 0.0),
        seen: Vec::new(),
    };
    running.wait_ready();
    running
}

impl Running {
    /// Reads lines until `READY`, remembering `TOOK`.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    // libtest may put "test crash_child ... " before it.
                    let words: Vec<&str> = line.split_whitespace().collect();
                    if let Some(i) = words.iter().position(|w| *w == "TOOK") {
                        self.took = (
                            words[i + 1].parse().expect("TOOK t0"),
                            words[i + 2].parse().expect("TOOK t1"),
                        );
                    }
                    if words.contains(&"READY") {
                        assert!(self.took.0 > 0.0, "TOOK comes before READY");
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the child did not print READY within {READY_WITHIN:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let mut child = self.child.0.take().unwrap();
                    let status = child.wait().unwrap();
                    let stderr = std::mem::replace(&mut self.stderr, thread::spawn(String::new));
                    panic!(
                        "the child ended ({status}) before READY; its stderr:\n{}",
                        stderr.join().unwrap()
                    );
                }
            }
        }
    }

    /// Reads what the child prints for `wait`.
    fn read_for(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    thread::sleep(left);
                    break;
                }
            }
        }
    }

    /// SIGKILLs the child and waits for it; returns the Unix time of the
    /// kill and every line it printed.
    fn kill(mut self) -> (f64, Vec<String>) {
        let mut child = self.child.0.take().unwrap();
        let killed_at = unix_now();
        child.kill().expect("SIGKILL the child");
        let status = child.wait().expect("wait for the child");
        assert!(!status.success(), "killed, not exited: {status}");
        // The pipe closes with the process: everything it wrote arrives.
        self.stdout.join().unwrap();
        let mut lines = std::mem::take(&mut self.seen);
        lines.extend(self.lines.try_iter());
        let _ = self.stderr.join();
        (killed_at, lines)
    }
}

/// Checks the store a killed child left, then reopens it.
fn check_after_kill(db: &Path, killed_at: f64, took: Option<(f64, f64)>, changes: &Changes) {
    // Before any Limiter touches it.
    let conn = common::inspect_store(db);
    assert_eq!(
        common::integrity_check(&conn),
        "ok",
        "integrity after the kill"
    );
    assert_eq!(stored_limit(&conn, "gpu"), Some((GPU_LIMIT, true, 0.0)));
    assert_eq!(
        stored_limit(&conn, "api"),
        Some((API_LIMIT, true, API_DECAY))
    );
    assert_eq!(stored_limit(&conn, "db"), Some((2, true, 0.0)));
    for name in changes.created.keys() {
        let stored = stored_limit(&conn, name).map(|(limit, active, decay)| {
            assert!(active && decay == 0.0, "{name}");
            limit
        });
        let allowed = changes.allowed(name);
        assert!(
            allowed.contains(&stored),
            "{name}: stored limit {stored:?}, but after what the child reported only {allowed:?}"
        );
    }

    let (gpu_held, _, _) = stored_slots(&conn, "gpu").expect("gpu slot state");
    assert!(
        gpu_held >= i64::from(GPU_HELD) && gpu_held <= i64::from(GPU_LIMIT),
        "the flush wrote the held gpu slots: {gpu_held}"
    );
    let (_, decaying, decaying_at) = stored_slots(&conn, "api").expect("api slot state");
    let bound = FLUSH.as_secs_f64() + SLACK_SECS;
    assert!(
        decaying_at >= killed_at - bound && decaying_at <= killed_at + SLACK_SECS,
        "api's decaying state is from {:.3} s before the kill (bound {bound} s)",
        killed_at - decaying_at
    );
    assert!(
        (0.0..=f64::from(API_LIMIT)).contains(&decaying),
        "{decaying}"
    );
    if let Some((t0, t1)) = took {
        // Nothing touched "api" after the 60 were taken: what was stored
        // is 60 drained from then to decaying_at.
        let most = (f64::from(API_TAKEN) - API_DECAY * (decaying_at - t1)).max(0.0) + 1.0;
        let least = (f64::from(API_TAKEN) - API_DECAY * (decaying_at - t0)).max(0.0) - 1.0;
        assert!(
            decaying >= least && decaying <= most,
            "stored {decaying} decaying slots, expected {least}..{most}"
        );
    }
    drop(conn);

    // The OS lock died with the child: the store opens at once.
    let before_open = unix_now();
    let limiter = Limiter::open(db).expect("open right after the kill");
    let gpu = limiter.limit("gpu").expect("gpu");
    let api = limiter.limit("api").expect("api");
    let after_read = unix_now();
    assert_eq!(gpu.limit, GPU_LIMIT);
    assert_eq!(
        (gpu.held_slots, gpu.active_slots, gpu.waiters),
        (0, 0, 0),
        "the dead owner's slots are free: {gpu:?}"
    );
    let db_limit = limiter.limit("db").expect("db");
    assert_eq!(db_limit.held_slots, 0, "{db_limit:?}");
    assert_eq!(
        (api.limit, api.slot_decay_per_second),
        (API_LIMIT, API_DECAY)
    );
    assert_eq!(api.held_slots, 0);
    // Drained by the wall time since decaying_at, within rounding.
    let most = (decaying - API_DECAY * (before_open - decaying_at))
        .max(0.0)
        .ceil()
        + 1.0;
    let least = (decaying - API_DECAY * (after_read - decaying_at))
        .max(0.0)
        .ceil()
        - 1.0;
    let active = f64::from(api.active_slots);
    assert!(
        active <= f64::from(API_TAKEN).max(f64::from(API_LIMIT)) && active <= most,
        "api: {active} active slots, at most {most} expected: {api:?}"
    );
    assert!(
        active >= least,
        "api: {active} active slots, at least {least} expected: {api:?}"
    );
    if took.is_some() {
        assert!(api.active_slots <= API_TAKEN, "{api:?}");
    }
    for name in changes.created.keys() {
        let limit = limiter.limit(name).map(|info| info.limit);
        let allowed = changes.allowed(name);
        assert!(
            allowed.contains(&limit),
            "{name}: limit {limit:?} after reopening, but after what the child reported only {allowed:?}"
        );
    }
    let all = limiter.concurrency("gpu", GPU_LIMIT).try_acquire().unwrap();
    assert!(all.is_some(), "every gpu slot is free");
    drop(all);
    drop(limiter);

    let conn = common::inspect_store(db);
    assert_eq!(
        common::integrity_check(&conn),
        "ok",
        "integrity after reopening"
    );
}

#[test]
fn kill_9_of_an_idle_owner() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("crash");
        let db = dir.path("limits.db");
        let child = spawn_child(&db, "idle");

        // While the child lives, it owns the store.
        match Limiter::open(&db) {
            Err(Error::StoreInUse { pid, .. }) => assert_eq!(pid, child.pid),
            Err(other) => panic!("expected StoreInUse, got {other:?}"),
            Ok(_) => panic!("opened a store another process owns"),
        }

        let took = child.took;
        let (killed_at, lines) = child.kill();
        let mut changes = Changes::default();
        lines.iter().for_each(|l| changes.note(l));
        check_after_kill(&db, killed_at, Some(took), &changes);
    });
}

#[test]
fn kill_9_under_traffic() {
    watchdog(WATCHDOG, || {
        for round in 0..4u64 {
            let dir = TempDir::new("crash");
            let db = dir.path("limits.db");
            let mut child = spawn_child(&db, "traffic");

            // A random-ish moment 50-300 ms after READY.
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64;
            let delay = Duration::from_millis(50 + (nanos / 1000 + round * 97) % 251);
            child.read_for(delay);
            let pid = child.pid;
            let (killed_at, lines) = child.kill();
            let mut changes = Changes::default();
            lines.iter().for_each(|l| changes.note(l));
            assert!(
                !changes.created.is_empty(),
                "round {round}: the child (pid {pid}) made definitions before the kill"
            );
            eprintln!(
                "round {round}: killed {delay:?} after READY, {} created, {} updated, {} deleted",
                changes.created.len(),
                changes.updated.len(),
                changes.deleted.len()
            );
            check_after_kill(&db, killed_at, None, &changes);
        }
    });
}
