//! A store's owner killed with SIGKILL 20 times at random moments of heavy
//! traffic, all on one store, each owner opening what the last one left.
//!
//! As in tests/crash.rs, the test binary runs itself again as a child (the
//! test `crash_loop_child`, which does nothing unless
//! `TURNSTILE_CRASH_LOOP_CHILD` names a store). Each child opens the store,
//! reports what it found, holds a slot, and runs heavy traffic: three
//! threads of concurrency acquisitions (one or two limits, weighted, with
//! timeouts), one of rate-limit acquisitions, one that creates, updates and
//! deletes limits and changes `gpu`'s limit, printing a line after each call
//! returned, and one that touches the rate limit, flushes and reports the
//! instant. The parent kills it at a random moment (seeded, printed; set
//! `TURNSTILE_CRASH_SEED` to repeat) and checks, before any owner touches
//! the file again:
//!
//! * `PRAGMA integrity_check` is ok;
//! * no definition is lost: every limit of earlier rounds is exactly as it
//!   was, and each one this child reported is there as reported (or as the
//!   next call, which may have committed before the kill, left it); no limit
//!   appears that the child did not make;
//! * the rate limit's state is no older than the flush interval (with slack
//!   for a loaded machine), and no older than the last flush the child
//!   reported — exactly; its decaying slots are within the limit;
//! * held slots of the dead owner are in the file (the child held one) and
//!   free once the store is reopened — by the parent on even rounds, by the
//!   next child (which reports it) on odd ones;
//! * the store opens at once: the owner lock died with the process.
//!
//! This also covers issue 3's "kill the child while it is under heavy
//! acquisition traffic, several times" beyond tests/crash.rs's four rounds:
//! twenty kills at random moments, each recovery checked.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::{seed_from_env, unix_now, watchdog, Rng, TempDir};
use rusqlite::{Connection, OptionalExtension};
use turnstile::{Error, LimitConfig, LimitUpdate, Limiter};

/// The store the child owns; unset in the parent.
const CHILD_ENV: &str = "TURNSTILE_CRASH_LOOP_CHILD";
/// The round, which names the limits the child creates.
const ROUND_ENV: &str = "TURNSTILE_CRASH_LOOP_ROUND";

const ROUNDS: u64 = 20;
/// The child's flush interval: the bound on lost slot state.
const FLUSH: Duration = Duration::from_millis(50);
/// Slack on top of `FLUSH` for a loaded machine (the writer thread may not
/// run for a while on two busy cores).
const SLACK_SECS: f64 = 2.0;
/// The kill comes this long after the child is under way, at most.
const MAX_DELAY_MS: u64 = 200;
/// A child that is never killed gives up after this long.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);
const READY_WITHIN: Duration = Duration::from_secs(30);
/// Only a hang trips it.
const LOOP_WATCHDOG: Duration = Duration::from_secs(240);

const GPU_LIMITS: [u32; 3] = [3, 4, 5];
const DB_LIMIT: u32 = 3;
const API_LIMIT: u32 = 50;
const API_DECAY: f64 = 100.0;

/// What the child prints starts with this, so that libtest's own output on
/// the same line does not matter.
const TAG: &str = "@@";

fn say(line: std::fmt::Arguments<'_>) {
    println!("{TAG} {line}");
}

/// The limit that follows `v` in the child's cycle of `gpu` limits.
fn next_gpu(v: u32) -> u32 {
    let i = GPU_LIMITS.iter().position(|&g| g == v).unwrap_or(0);
    GPU_LIMITS[(i + 1) % GPU_LIMITS.len()]
}

// ---------------------------------------------------------------------------
// The child
// ---------------------------------------------------------------------------

/// The child role: acts only when `TURNSTILE_CRASH_LOOP_CHILD` is set.
#[test]
fn crash_loop_child() {
    let Some(db) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let round: u64 = std::env::var(ROUND_ENV)
        .expect("round")
        .parse()
        .expect("round");
    let deadline = Instant::now() + CHILD_LIFETIME;
    let limiter = Limiter::builder()
        .path(PathBuf::from(db))
        .flush_interval(FLUSH)
        .build()
        .expect("child: open the store");
    let all = limiter.limits();
    say(format_args!(
        "OPENED limits={} held={} waiters={}",
        all.len(),
        all.iter().map(|i| u64::from(i.held_slots)).sum::<u64>(),
        all.iter().map(|i| i.waiters).sum::<usize>()
    ));
    for (name, config) in [
        ("gpu", LimitConfig::new(GPU_LIMITS[0])),
        ("db", LimitConfig::new(DB_LIMIT)),
        (
            "api",
            LimitConfig::new(API_LIMIT).slot_decay_per_second(API_DECAY),
        ),
    ] {
        match limiter.create_limit(name, config) {
            Ok(_) => say(format_args!("CREATED {name}")),
            Err(Error::AlreadyExists { .. }) => {}
            Err(e) => panic!("child: create {name}: {e}"),
        }
    }
    // Held for the child's life: the store records it; reopening frees it.
    let pinned = limiter
        .concurrency("db", 1)
        .acquire()
        .expect("child: hold db");

    let acquired = Arc::new(AtomicU64::new(0));
    let (started, all_started) = mpsc::channel();
    let mut threads = 0;
    for worker in 0..3u64 {
        let (l, a, s) = (limiter.clone(), acquired.clone(), started.clone());
        thread::spawn(move || concurrency_traffic(&l, worker, deadline, &a, s));
        threads += 1;
    }
    {
        let (l, a, s) = (limiter.clone(), acquired.clone(), started.clone());
        thread::spawn(move || rate_traffic(&l, deadline, &a, s));
        threads += 1;
    }
    {
        let (l, s) = (limiter.clone(), started.clone());
        thread::spawn(move || change_definitions(&l, round, deadline, s));
        threads += 1;
    }
    for _ in 0..threads {
        all_started.recv().expect("child: a traffic thread died");
    }
    // Touch the rate limit, flush, say when: the store then holds its state
    // as of that instant or later.
    let mut first = true;
    while Instant::now() < deadline {
        let t = unix_now();
        let _ = limiter.rate_limit("api", 1).try_acquire().unwrap();
        limiter.flush().expect("child: flush");
        say(format_args!(
            "FLUSHED {t} acquired={}",
            acquired.load(Ordering::Relaxed)
        ));
        if first {
            say(format_args!("READY"));
            first = false;
        }
        thread::sleep(Duration::from_millis(10));
    }
    drop(pinned);
    panic!("child: nobody killed me within {CHILD_LIFETIME:?}");
}

fn concurrency_traffic(
    limiter: &Limiter,
    worker: u64,
    deadline: Instant,
    acquired: &AtomicU64,
    started: mpsc::Sender<()>,
) {
    let mut rng = Rng::new(worker + 1);
    let mut round = 0u64;
    while Instant::now() < deadline {
        round += 1;
        if round == 2 {
            let _ = started.send(());
        }
        let names: &[&str] = match rng.below(3) {
            0 => &["gpu"],
            1 => &["db", "gpu"],
            _ => &["gpu", "db"],
        };
        let occupy = 1 + rng.below(2) as u32;
        match limiter
            .concurrency(names, occupy)
            .timeout(Duration::from_micros(rng.below(20_000)))
            .acquire()
        {
            Ok(guard) => {
                acquired.fetch_add(1, Ordering::Relaxed);
                if rng.chance(30) {
                    thread::sleep(Duration::from_micros(rng.below(500)));
                }
                drop(guard);
            }
            Err(e) if e.is_timeout() => {}
            Err(e) => panic!("child: acquire: {e}"),
        }
    }
}

fn rate_traffic(
    limiter: &Limiter,
    deadline: Instant,
    acquired: &AtomicU64,
    started: mpsc::Sender<()>,
) {
    let mut rng = Rng::new(99);
    let mut round = 0u64;
    while Instant::now() < deadline {
        round += 1;
        if round == 2 {
            let _ = started.send(());
        }
        let occupy = 1 + rng.below(2) as u32;
        let took = if rng.chance(50) {
            limiter.rate_limit("api", occupy).try_acquire().unwrap()
        } else {
            match limiter
                .rate_limit("api", occupy)
                .timeout(Duration::from_micros(rng.below(20_000)))
                .acquire()
            {
                Ok(()) => true,
                Err(e) if e.is_timeout() => false,
                Err(e) => panic!("child: rate_limit: {e}"),
            }
        };
        if took {
            acquired.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Creates, updates and deletes this round's limits, and cycles `gpu`'s
/// limit, saying so once each call has returned (so committed).
fn change_definitions(limiter: &Limiter, round: u64, deadline: Instant, started: mpsc::Sender<()>) {
    let mut gpu = limiter.limit("gpu").expect("gpu").limit;
    let mut i = 0u64;
    while Instant::now() < deadline {
        if i == 1 {
            let _ = started.send(());
        }
        let name = format!("r{round}-j{i}");
        limiter
            .create_limit(&name, LimitConfig::new(1))
            .expect("child: create");
        say(format_args!("CREATED {name}"));
        limiter
            .update_limit(&name, LimitUpdate::new().limit(2))
            .expect("child: update");
        say(format_args!("UPDATED {name}"));
        if i.is_multiple_of(3) {
            limiter.delete_limit(&name).expect("child: delete");
            say(format_args!("DELETED {name}"));
        }
        if i.is_multiple_of(2) {
            gpu = next_gpu(gpu);
            limiter
                .update_limit("gpu", LimitUpdate::new().limit(gpu))
                .expect("child: update gpu");
            say(format_args!("SET gpu {gpu}"));
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

/// What one child printed, parsed.
#[derive(Debug, Default)]
struct Report {
    opened: Option<(usize, u64, usize)>,
    created: Vec<String>,
    updated: Vec<String>,
    deleted: Vec<String>,
    gpu_set: Option<u32>,
    last_flushed: Option<f64>,
    acquired: u64,
    ready: bool,
}

impl Report {
    fn note(&mut self, line: &str) {
        let Some(at) = line.find(TAG) else { return };
        let words: Vec<&str> = line[at + TAG.len()..].split_whitespace().collect();
        let field = |key: &str| {
            words
                .iter()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{key} in {line:?}"))
        };
        match words.first().copied() {
            Some("OPENED") => {
                self.opened = Some((
                    field("limits=") as usize,
                    field("held="),
                    field("waiters=") as usize,
                ))
            }
            Some("CREATED") => self.created.push(words[1].to_string()),
            Some("UPDATED") => self.updated.push(words[1].to_string()),
            Some("DELETED") => self.deleted.push(words[1].to_string()),
            Some("SET") => self.gpu_set = Some(words[2].parse().expect("gpu limit")),
            Some("FLUSHED") => {
                self.last_flushed = Some(words[1].parse().expect("flush time"));
                self.acquired = field("acquired=");
            }
            Some("READY") => self.ready = true,
            _ => {}
        }
    }
}

struct Running {
    child: ChildGuard,
    lines: mpsc::Receiver<String>,
    stdout: thread::JoinHandle<()>,
    stderr: thread::JoinHandle<String>,
    report: Report,
}

fn spawn_child(db: &Path, round: u64) -> Running {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "crash_loop_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, db)
        .env(ROUND_ENV, round.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child");
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
    Running {
        child: ChildGuard(Some(child)),
        lines,
        stdout,
        stderr,
        report: Report::default(),
    }
}

impl Running {
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_WITHIN;
        while !self.report.ready {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.report.note(&line),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the child did not get under way within {READY_WITHIN:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.0.take().unwrap().wait().unwrap();
                    let stderr = std::mem::replace(&mut self.stderr, thread::spawn(String::new));
                    panic!(
                        "the child ended ({status}) before it was under way; its stderr:\n{}",
                        stderr.join().unwrap()
                    );
                }
            }
        }
    }

    /// SIGKILLs the child and waits for it; returns the Unix time of the
    /// kill and everything it printed.
    fn kill(mut self) -> (f64, Report) {
        let mut child = self.child.0.take().unwrap();
        let killed_at = unix_now();
        child.kill().expect("SIGKILL the child");
        let status = child.wait().expect("wait for the child");
        assert!(!status.success(), "killed, not exited: {status}");
        // The pipe closes with the process: everything it wrote arrives.
        self.stdout.join().unwrap();
        for line in self.lines.try_iter() {
            self.report.note(&line);
        }
        let _ = self.stderr.join();
        (killed_at, self.report)
    }
}

/// Every stored definition: name -> limit.
fn stored_limits(conn: &Connection) -> BTreeMap<String, u32> {
    conn.prepare(r#"SELECT name, "limit" FROM limits"#)
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
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

/// The stored limits a child's limit may have, given what it reported: the
/// last reported call, or the next one, which may have committed just before
/// the kill. `None` for absent.
fn allowed(report: &Report, name: &str, index: u64) -> Vec<Option<u32>> {
    let has = |list: &[String]| list.iter().any(|n| n == name);
    let deleted_next = index.is_multiple_of(3);
    if has(&report.deleted) {
        vec![None]
    } else if has(&report.updated) {
        if deleted_next {
            vec![Some(2), None]
        } else {
            vec![Some(2)]
        }
    } else if has(&report.created) {
        vec![Some(1), Some(2)]
    } else {
        vec![None, Some(1)]
    }
}

/// What the parent has settled about the store so far.
#[derive(Default)]
struct Ledger {
    /// Every definition the store must hold from now on, exactly.
    limits: BTreeMap<String, u32>,
    kills: u64,
    acquired: u64,
    created: u64,
    checks: std::cell::Cell<u64>,
}

impl Ledger {
    fn check(&self, ok: bool, what: impl FnOnce() -> String) {
        assert!(ok, "{}", what());
        self.checks.set(self.checks.get() + 1);
    }
}

/// Checks the store a killed child left, before anyone opens it, and
/// settles the round's definitions in the ledger.
fn check_killed(db: &Path, round: u64, killed_at: f64, report: &Report, ledger: &mut Ledger) {
    let conn = common::inspect_store(db);
    let integrity = common::integrity_check(&conn);
    ledger.check(integrity == "ok", || {
        format!("round {round}: integrity after the kill: {integrity}")
    });

    // The child saw every definition settled so far, and nothing held.
    let (limits, held, waiters) = report.opened.expect("the child reported its open");
    ledger.check(limits == ledger.limits.len(), || {
        format!(
            "round {round}: the child opened {limits} limits, {} were settled",
            ledger.limits.len()
        )
    });
    ledger.check((held, waiters) == (0, 0), || {
        format!("round {round}: the child found {held} slots held and {waiters} waiters on open")
    });

    let stored = stored_limits(&conn);
    // Every definition of earlier rounds, exactly as settled.
    for (name, limit) in &ledger.limits {
        if name == "gpu" {
            continue;
        }
        let got = stored.get(name);
        ledger.check(got == Some(limit), || {
            format!("round {round}: {name} was {limit}, now {got:?}")
        });
    }
    // gpu: the last limit the child set, or the next one.
    let before = report
        .gpu_set
        .or_else(|| ledger.limits.get("gpu").copied())
        .unwrap_or(GPU_LIMITS[0]);
    let gpu = stored.get("gpu").copied();
    ledger.check(gpu == Some(before) || gpu == Some(next_gpu(before)), || {
        format!("round {round}: gpu's limit {gpu:?}, the child last set {before}")
    });
    ledger.check(
        stored.get("db") == Some(&DB_LIMIT) && stored.get("api") == Some(&API_LIMIT),
        || format!("round {round}: db or api changed: {stored:?}"),
    );
    // This round's limits: as reported, and none that the child did not
    // make (at most the one whose creation had not been reported yet).
    let prefix = format!("r{round}-j");
    let mut highest = None;
    for name in stored.keys().filter(|n| n.starts_with(&prefix)) {
        let index: u64 = name[prefix.len()..].parse().expect("an index");
        highest = highest.max(Some(index));
    }
    let reported = report
        .created
        .iter()
        .filter(|n| n.starts_with(&prefix))
        .count() as u64;
    ledger.check(highest.is_none_or(|h| h <= reported), || {
        format!("round {round}: limit {prefix}{highest:?} in the store, only {reported} reported")
    });
    for index in 0..=reported {
        let name = format!("{prefix}{index}");
        let got = stored.get(&name).copied();
        let allowed = allowed(report, &name, index);
        ledger.check(allowed.contains(&got), || {
            format!("round {round}: {name} stored as {got:?}, after what the child reported only {allowed:?}")
        });
    }
    ledger.created += reported;

    // Slot state: the held slot is in the file; the rate limit's state is
    // no older than the flush interval, nor than the child's last flush.
    let (db_held, _, _) = stored_slots(&conn, "db").expect("db slot state");
    ledger.check((1..=i64::from(DB_LIMIT)).contains(&db_held), || {
        format!("round {round}: the flushes wrote db's held slots: {db_held}")
    });
    let (_, decaying, decaying_at) = stored_slots(&conn, "api").expect("api slot state");
    let flushed = report.last_flushed.expect("a flush was reported");
    ledger.check(decaying_at >= flushed, || {
        format!(
            "round {round}: api's state is from {decaying_at:.6}, before the last flush the child reported ({flushed:.6})"
        )
    });
    let bound = FLUSH.as_secs_f64() + SLACK_SECS;
    ledger.check(
        decaying_at >= killed_at - bound && decaying_at <= killed_at + SLACK_SECS,
        || {
            format!(
                "round {round}: api's state is from {:.3} s before the kill (bound {bound} s)",
                killed_at - decaying_at
            )
        },
    );
    ledger.check((0.0..=f64::from(API_LIMIT)).contains(&decaying), || {
        format!("round {round}: api stored with {decaying} decaying slots")
    });
    drop(conn);

    // Nothing else: no limit of an earlier round came back.
    for name in stored.keys() {
        let known = ["gpu", "db", "api"].contains(&name.as_str())
            || name.starts_with(&prefix)
            || ledger.limits.contains_key(name);
        ledger.check(known, || {
            format!("round {round}: {name} is in the store, but nobody made it")
        });
    }
    ledger.limits = stored;
}

/// Opens the store the way a restarted owner would: at once (the lock died
/// with the child), every definition there, nothing held, decaying slots
/// drained by the time that passed.
fn check_reopen(db: &Path, round: u64, ledger: &mut Ledger) {
    let (_, decaying, decaying_at) = {
        let conn = common::inspect_store(db);
        stored_slots(&conn, "api").expect("api slot state")
    };
    let before_open = unix_now();
    let limiter = match Limiter::open(db) {
        Ok(l) => l,
        Err(Error::StoreInUse { pid, .. }) => {
            panic!("round {round}: the dead owner (pid {pid}) still holds the store")
        }
        Err(e) => panic!("round {round}: cannot reopen: {e}"),
    };
    let api = limiter.limit("api").expect("api");
    let after_read = unix_now();
    let all: HashMap<String, u32> = limiter
        .limits()
        .into_iter()
        .map(|i| {
            assert_eq!(
                (i.held_slots, i.waiters),
                (0, 0),
                "round {round}: the dead owner's slots are free: {i:?}"
            );
            (i.name, i.limit)
        })
        .collect();
    ledger.check(all.len() == ledger.limits.len(), || {
        format!(
            "round {round}: {} limits after reopening, {} settled",
            all.len(),
            ledger.limits.len()
        )
    });
    for (name, limit) in &ledger.limits {
        let got = all.get(name);
        ledger.check(got == Some(limit), || {
            format!("round {round}: {name} is {got:?} after reopening, settled as {limit}")
        });
    }
    // Drained by the wall time since it was stored, within rounding.
    let most = (decaying - API_DECAY * (before_open - decaying_at))
        .max(0.0)
        .ceil()
        + 1.0;
    let least = (decaying - API_DECAY * (after_read - decaying_at))
        .max(0.0)
        .ceil()
        - 1.0;
    let active = f64::from(api.active_slots);
    ledger.check(active <= most && active >= least, || {
        format!("round {round}: api has {active} active slots, expected {least}..={most}: {api:?}")
    });
    let gpu = limiter.limit("gpu").expect("gpu");
    let all_gpu = limiter.concurrency("gpu", gpu.limit).try_acquire().unwrap();
    ledger.check(all_gpu.is_some(), || {
        format!("round {round}: gpu is not all free")
    });
    drop(all_gpu);
    drop(limiter);
    let conn = common::inspect_store(db);
    let integrity = common::integrity_check(&conn);
    ledger.check(integrity == "ok", || {
        format!("round {round}: integrity after reopening: {integrity}")
    });
}

#[test]
fn twenty_kills_under_traffic() {
    let seed = seed_from_env("TURNSTILE_CRASH_SEED");
    eprintln!("crash loop: seed {seed} (TURNSTILE_CRASH_SEED={seed} repeats the kill delays)");
    watchdog(LOOP_WATCHDOG, move || {
        let mut rng = Rng::new(seed);
        let dir = TempDir::new("crash-loop");
        let db = dir.path("limits.db");
        let mut ledger = Ledger::default();
        let mut delays = Vec::new();
        for round in 0..ROUNDS {
            let mut child = spawn_child(&db, round);
            child.wait_ready();
            let delay = Duration::from_millis(rng.below(MAX_DELAY_MS + 1));
            // Keep reading while the child runs, so its pipe never fills.
            let until = Instant::now() + delay;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match child.lines.recv_timeout(left) {
                    Ok(line) => child.report.note(&line),
                    Err(_) => break,
                }
            }
            let (killed_at, report) = child.kill();
            ledger.kills += 1;
            ledger.acquired += report.acquired;
            delays.push(delay.as_millis());
            check_killed(&db, round, killed_at, &report, &mut ledger);
            // Even rounds: the parent reopens. Odd rounds: the next child
            // opens the crashed store itself and reports what it found.
            if round % 2 == 0 || round == ROUNDS - 1 {
                check_reopen(&db, round, &mut ledger);
            }
        }
        eprintln!(
            "crash loop: {} rounds, {} SIGKILLs at {:?} ms after the child was under way; \
             {} acquisitions done before the kills, {} limits created, {} definitions survive; {} checks passed",
            ROUNDS,
            ledger.kills,
            delays,
            ledger.acquired,
            ledger.created,
            ledger.limits.len(),
            ledger.checks.get()
        );
        assert_eq!(ledger.kills, ROUNDS);
    });
}
