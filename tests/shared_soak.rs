//! Shared soak (issue 11 item 7): 4 processes × 4 threads of mixed traffic
//! on one PostgreSQL namespace for `TURNSTILE_SHARED_SOAK_SECS` seconds
//! (default 600; CI runs 60), while the parent edits the limits with the
//! `turnstile` binary.
//!
//! Each child thread mixes blocking acquisitions (with timeouts, retry
//! budgets, weights 1–2, one to three names), `try_acquire`, async ones
//! under tokio cancelled by `tokio::time::timeout`, futures polled once and
//! dropped while queued, and rate-limit calls (blocking, try, async); each
//! child also holds one slot of `h` from start to end. The parent runs the
//! CLI every few hundred milliseconds: `update --limit` up and down,
//! `disable` / `enable`, `update --slot-decay-per-second`, `reset`, `ls`,
//! `inspect -o json`.
//!
//! Every 2 s it samples each child's resident memory (`VmRSS`), its TCP
//! connections to the server (from `/proc`), and the rows of the
//! namespace's tables, and asserts that:
//! * resident memory stays flat: in the last third of the run at most the
//!   first third's median × 1.2 + 2 MiB, for every child;
//! * no child ever has more than 4 connections (`MAX_CONNECTIONS`);
//! * rows stay bounded: clients at most one per live limiter (+1 for a CLI
//!   run), holds at most the slots the limits can hold at once (each hold
//!   takes at least one slot; held slots never exceed the highest limit
//!   the editor sets), rows of queued and failed waiters do not grow with
//!   time (the last third's peak within twice the first third's + 64), and
//!   no row of a grant of nothing held (kept for a lease, so that a retried
//!   look gets the same answer) outlives its lease by more than 5 s.
//!
//! At the end traffic stops; each child checks its own shadow counts (every
//! guard it got, it gave back; its `Acquired` and `Released` events match
//! per limit; no lease lost) and prints them; then the final `LimitInfo` of
//! every limit must agree: nothing held but the children's 4 slots of `h`,
//! nobody waiting, limit / active / decay as the CLI last set them, the
//! rate limit's active slots within its limit; and once the children exit,
//! `h` is free and only the parent's client is left.
//!
//! Ignored by plain `cargo test`; `.ci/run` runs it in release:
//!
//! ```sh
//! TURNSTILE_SHARED_SOAK_SECS=60 cargo test --release --test shared_soak -- --ignored --nocapture
//! ```

#![cfg(all(feature = "postgres", feature = "cli"))]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::future::{Future, IntoFuture};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::kids::{child_args, rss_kib, ChildArgs, Kid};
use common::pg::cluster_or_skip;
use common::{clock_seed, eventually, watchdog, Rng, TempDir};
use turnstile::{Error, Event, LimitConfig, Limiter};

const CHILDREN: usize = 4;
const THREADS: usize = 4;
/// Short, so that rows kept for a lease (grants of nothing held) turn over
/// several times in a 60 s run.
const LEASE: Duration = Duration::from_secs(6);
/// Limits the CLI edits (name, starting limit); it keeps them in `1..=MAX`.
const EDITED: [(&str, u32); 3] = [("a", 3), ("b", 2), ("c", 4)];
const MAX: u32 = 5;
/// The rate limit: name, limit, starting decay; the CLI changes the decay
/// among `DECAYS` and resets it.
const RATE: (&str, u32, f64) = ("r", 5, 100.0);
const DECAYS: [f64; 3] = [50.0, 100.0, 200.0];
/// Each child holds one slot of it from start to end.
const KEPT: (&str, u32) = ("h", 8);
/// Name sets of the concurrency traffic.
const SETS: [&[&str]; 6] = [
    &["a"],
    &["b"],
    &["c"],
    &["a", "b"],
    &["c", "a"],
    &["b", "c", "a"],
];
/// The counters each child thread keeps.
const COUNTS: [&str; 10] = [
    "acquired",
    "released",
    "timed_out",
    "retries_exhausted",
    "occupy_exceeds",
    "refused",
    "async_acquired",
    "cancelled",
    "rate_slots",
    "rate_refused",
];

#[test]
fn child() {
    let Some(role) = child_args() else {
        return; // only ever run as a child
    };
    match role.role.as_str() {
        "soak" => soak_child(&role),
        other => panic!("unknown child role {other}"),
    }
}

/// Events of this child's limiter per limit: `[acquired, released]`.
type EventTally = Arc<Mutex<BTreeMap<String, [u64; 2]>>>;

/// `arg`: the stop file's path. Traffic until the stop file exists, then
/// the shadow and `DONE`; exits (giving back its slot of `h`) once
/// `<stop>.exit` exists.
fn soak_child(role: &ChildArgs) {
    let stop = role.arg.clone();
    let events: EventTally = Arc::default();
    let lost = Arc::new(AtomicU64::new(0));
    let (tally, lost_count) = (events.clone(), lost.clone());
    let l = Limiter::builder()
        .postgres(role.url.as_str())
        .namespace(role.ns.as_str())
        .lease(LEASE)
        .on_event(move |e| match e {
            Event::Acquired {
                names,
                rate_limit: false,
                ..
            } => {
                let mut t = tally.lock().unwrap();
                for n in names {
                    t.entry(n.clone()).or_default()[0] += 1;
                }
            }
            Event::Released { names, .. } => {
                let mut t = tally.lock().unwrap();
                for n in names {
                    t.entry(n.clone()).or_default()[1] += 1;
                }
            }
            Event::LeaseLost { .. } => {
                lost_count.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        })
        .build()
        .unwrap();
    let kept = l
        .concurrency(KEPT.0, 1)
        .timeout(Duration::from_secs(30))
        .acquire()
        .unwrap();
    println!("READY");
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            let (l, stop) = (l.clone(), stop.clone());
            thread::spawn(move || worker(&l, &stop, i as u64))
        })
        .collect();
    let mut total = [0u64; COUNTS.len()];
    for w in workers {
        for (sum, n) in total.iter_mut().zip(w.join().unwrap()) {
            *sum += n;
        }
    }
    l.flush().unwrap();
    assert_eq!(
        total[0], total[1],
        "every guard this child got it gave back"
    );
    assert!(!kept.is_lost());
    assert_eq!(lost.load(Ordering::SeqCst), 0, "a lease was lost");
    // Its events, per limit: every hold it took on a limit it gave back
    // (`h` is still held: one acquired, not released).
    let events = events.lock().unwrap().clone();
    for (name, [acquired, released]) in &events {
        let open = u64::from(name == KEPT.0);
        assert_eq!(
            *acquired,
            released + open,
            "{name}: {acquired} Acquired events, {released} Released"
        );
    }
    let counts: Vec<String> = COUNTS
        .iter()
        .zip(total)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("COUNTS {}", counts.join(" "));
    println!("EVENTS {events:?}");
    println!("DONE");
    let exit = format!("{stop}.exit");
    while !Path::new(&exit).exists() {
        thread::sleep(Duration::from_millis(20));
    }
    kept.release();
    l.flush().unwrap();
}

/// One child thread's traffic until `stop` exists; its counts, as
/// [`COUNTS`] names them.
fn worker(l: &Limiter, stop: &str, salt: u64) -> [u64; COUNTS.len()] {
    let mut rng = Rng::new(clock_seed() ^ (u64::from(std::process::id()) << 8) ^ salt);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut n = [0u64; COUNTS.len()];
    let mut round = 0u64;
    while !round.is_multiple_of(16) || !Path::new(stop).exists() {
        round += 1;
        let names = SETS[rng.below(SETS.len() as u64) as usize];
        let occupy = 1 + rng.below(2) as u32;
        let hold = Duration::from_micros(rng.below(3000));
        match rng.below(10) {
            0..=2 => {
                let ask = l
                    .concurrency(names, occupy)
                    .timeout(Duration::from_millis(rng.below(300)));
                match ask.acquire() {
                    Ok(g) => {
                        n[0] += 1;
                        thread::sleep(hold);
                        if rng.chance(50) {
                            g.release();
                        } else {
                            drop(g);
                        }
                        n[1] += 1;
                    }
                    Err(e) => err(e, &mut n),
                }
            }
            3 => {
                let ask = l
                    .concurrency(names, occupy)
                    .max_retries(rng.below(3) as u32)
                    .timeout(Duration::from_secs(1));
                match ask.acquire() {
                    Ok(g) => {
                        n[0] += 1;
                        thread::sleep(hold);
                        drop(g);
                        n[1] += 1;
                    }
                    Err(e) => err(e, &mut n),
                }
            }
            4 => match l.concurrency(names, occupy).try_acquire() {
                Ok(Some(g)) => {
                    n[0] += 1;
                    thread::sleep(hold);
                    drop(g);
                    n[1] += 1;
                }
                Ok(None) => n[5] += 1,
                Err(e) => err(e, &mut n),
            },
            5 | 6 => {
                // Async under tokio, cancelled by a timeout of its own.
                let fut = l.concurrency(names, occupy).into_future();
                let within = Duration::from_millis(rng.below(30));
                match rt.block_on(async { tokio::time::timeout(within, fut).await }) {
                    Ok(Ok(g)) => {
                        n[0] += 1;
                        n[6] += 1;
                        rt.block_on(async { tokio::time::sleep(hold).await });
                        drop(g);
                        n[1] += 1;
                    }
                    Ok(Err(e)) => err(e, &mut n),
                    Err(_) => n[7] += 1,
                }
            }
            7 => {
                // Polled once (queued, or granted at once), dropped later:
                // cancelled whatever became of it.
                let mut fut = Box::pin(l.concurrency(names, occupy).into_future());
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                match fut.as_mut().poll(&mut cx) {
                    std::task::Poll::Ready(Ok(g)) => {
                        n[0] += 1;
                        drop(g);
                        n[1] += 1;
                    }
                    std::task::Poll::Ready(Err(e)) => err(e, &mut n),
                    std::task::Poll::Pending => {
                        thread::sleep(Duration::from_micros(rng.below(2000)));
                        drop(fut);
                        n[7] += 1;
                    }
                }
            }
            _ => {
                let ask = l.rate_limit(RATE.0, occupy);
                let took = match rng.below(3) {
                    0 => ask.try_acquire().unwrap(),
                    1 => match ask.timeout(Duration::from_millis(200)).acquire() {
                        Ok(()) => true,
                        Err(e) => {
                            err(e, &mut n);
                            false
                        }
                    },
                    _ => {
                        let fut = ask.timeout(Duration::from_millis(200)).into_future();
                        match rt.block_on(fut) {
                            Ok(()) => true,
                            Err(e) => {
                                err(e, &mut n);
                                false
                            }
                        }
                    }
                };
                if took {
                    n[8] += u64::from(occupy);
                } else {
                    n[9] += 1;
                }
            }
        }
    }
    n
}

/// Counts an acquisition's error as [`COUNTS`] names it; any other error
/// fails the child.
fn err(e: Error, n: &mut [u64; COUNTS.len()]) {
    match e {
        Error::Timeout { .. } => n[2] += 1,
        Error::RetriesExhausted { .. } => n[3] += 1,
        Error::OccupyExceedsLimit { .. } => n[4] += 1,
        e => panic!("unexpected error: {e}"),
    }
}

/// TCP connections of process `pid` to `port` on the loopback (its socket
/// inodes from `/proc/PID/fd`, matched in `/proc/PID/net/tcp`).
fn connections(pid: u32, port: u16) -> usize {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .map(str::to_string)
        })
        .collect();
    let remote = format!(":{port:04X}");
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() > 9 && f[2].ends_with(&remote) && f[3] == "01" && inodes.contains(f[9])
        })
        .count()
}

/// One sample of the soak's figures.
struct Sample {
    at: f64,
    rss: Vec<u64>,
    conns: Vec<usize>,
    clients: i64,
    holds: i64,
    /// Queued waiters' rows.
    queued: i64,
    /// Rows of grants of nothing held (rate limits, inactive limits), kept
    /// for a lease so that a retried look gets the same answer.
    kept: i64,
    /// Those of them older than a lease + 5 s: ought to be gone.
    stale: i64,
    /// Rows of failed waiters not yet seen by their client.
    failed: i64,
    waiter_limits: i64,
    dead: i64,
    backends: i64,
}

/// What the CLI last set, per limit: (limit, active, decay).
type Defs = BTreeMap<&'static str, (u32, bool, f64)>;

fn cli(url: &str, ns: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(["--db", url, "--namespace", ns])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "turnstile {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One random CLI edit (or look), recorded in `defs`.
fn edit(url: &str, ns: &str, rng: &mut Rng, defs: &mut Defs) {
    let (name, _) = EDITED[rng.below(EDITED.len() as u64) as usize];
    match rng.below(8) {
        0..=2 => {
            let limit = 1 + rng.below(u64::from(MAX)) as u32;
            cli(url, ns, &["update", name, "--limit", &limit.to_string()]);
            defs.get_mut(name).unwrap().0 = limit;
        }
        3 => {
            cli(url, ns, &["disable", name]);
            defs.get_mut(name).unwrap().1 = false;
        }
        4 => {
            cli(url, ns, &["enable", name]);
            defs.get_mut(name).unwrap().1 = true;
        }
        5 => {
            let decay = DECAYS[rng.below(DECAYS.len() as u64) as usize];
            cli(
                url,
                ns,
                &[
                    "update",
                    RATE.0,
                    "--slot-decay-per-second",
                    &decay.to_string(),
                ],
            );
            defs.get_mut(RATE.0).unwrap().2 = decay;
        }
        6 => {
            cli(url, ns, &["reset", RATE.0]);
        }
        _ => {
            let out = if rng.chance(50) {
                cli(url, ns, &["ls"])
            } else {
                cli(url, ns, &["inspect", name, "-o", "json"])
            };
            assert!(out.contains(name), "{out}");
        }
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
#[ignore = "a long soak: run by .ci/run with TURNSTILE_SHARED_SOAK_SECS=60"]
fn shared_soak() {
    let secs: u64 = std::env::var("TURNSTILE_SHARED_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    watchdog(Duration::from_secs(secs + 300), move || soak(secs));
}

fn soak(secs: u64) {
    let Some(cluster) = cluster_or_skip("shared_soak") else {
        return;
    };
    let (url, ns) = (cluster.url(), "soak");
    let l = Limiter::builder()
        .postgres(url.as_str())
        .namespace(ns)
        .build()
        .unwrap();
    let mut defs = Defs::new();
    for (name, limit) in EDITED {
        l.create_limit(name, LimitConfig::new(limit)).unwrap();
        defs.insert(name, (limit, true, 0.0));
    }
    l.create_limit(
        RATE.0,
        LimitConfig::new(RATE.1).slot_decay_per_second(RATE.2),
    )
    .unwrap();
    defs.insert(RATE.0, (RATE.1, true, RATE.2));
    l.create_limit(KEPT.0, LimitConfig::new(KEPT.1)).unwrap();
    defs.insert(KEPT.0, (KEPT.1, true, 0.0));

    let dir = TempDir::new("shared-soak");
    let stop = dir.path("stop").to_string_lossy().into_owned();
    let kids: Vec<Kid> = (0..CHILDREN)
        .map(|_| Kid::spawn("soak", &url, ns, &stop))
        .collect();
    for kid in &kids {
        kid.expect("READY", Duration::from_secs(60));
    }
    let pids: Vec<u32> = kids.iter().map(Kid::pid).collect();
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut count = |sql: &str| -> i64 { db.query_one(sql, &[]).unwrap().get(0) };
    let mut rng = Rng::new(clock_seed());
    let start = Instant::now();
    let run = Duration::from_secs(secs);
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = start;
    let mut cli_runs = 0u64;
    while start.elapsed() < run {
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(2);
            let rss = pids
                .iter()
                .map(|&p| rss_kib(p).expect("a child died"))
                .collect();
            let conns = pids
                .iter()
                .map(|&p| connections(p, cluster.port()))
                .collect();
            samples.push(Sample {
                at: start.elapsed().as_secs_f64(),
                rss,
                conns,
                clients: count(&format!("SELECT count(*) FROM {ns}.clients")),
                holds: count(&format!("SELECT count(*) FROM {ns}.holds")),
                queued: count(&format!(
                    "SELECT count(*) FROM {ns}.waiters WHERE status = 'queued'"
                )),
                kept: count(&format!(
                    "SELECT count(*) FROM {ns}.waiters WHERE status = 'granted' AND hold IS NULL"
                )),
                stale: count(&format!(
                    "SELECT count(*) FROM {ns}.waiters WHERE status = 'granted' AND hold IS NULL \
                      AND granted_at < clock_timestamp() - make_interval(secs => {})",
                    LEASE.as_secs() + 5
                )),
                failed: count(&format!(
                    "SELECT count(*) FROM {ns}.waiters WHERE status = 'failed'"
                )),
                waiter_limits: count(&format!("SELECT count(*) FROM {ns}.waiter_limits")),
                dead: count(&format!(
                    "SELECT coalesce(sum(n_dead_tup), 0)::int8 FROM pg_stat_user_tables \
                      WHERE schemaname = '{ns}'"
                )),
                backends: count(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'turnstile'",
                ),
            });
            let s = samples.last().unwrap();
            println!(
                "{:6.1} s: RSS KiB {:?}, connections {:?} ({} turnstile backends), rows: \
                 clients {} holds {} waiters queued {} kept {} (stale {}) failed {} \
                 waiter_limits {}, dead tuples {}",
                s.at,
                s.rss,
                s.conns,
                s.backends,
                s.clients,
                s.holds,
                s.queued,
                s.kept,
                s.stale,
                s.failed,
                s.waiter_limits,
                s.dead
            );
        }
        edit(&url, ns, &mut rng, &mut defs);
        cli_runs += 1;
        thread::sleep(Duration::from_millis(100 + rng.below(300)));
    }
    std::fs::write(&stop, "").unwrap();
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for kid in &kids {
        let line = kid.expect("COUNTS", Duration::from_secs(120));
        for word in line.split(' ').skip(1) {
            let (k, v) = word.split_once('=').unwrap();
            *totals.entry(k.to_string()).or_default() += v.parse::<u64>().unwrap();
        }
        let events = kid.expect("EVENTS", Duration::from_secs(10));
        println!("child {}: {line}; {events}", kid.pid());
        kid.expect("DONE", Duration::from_secs(10));
    }

    // Traffic stopped: the final figures agree with the shadow.
    l.flush().unwrap();
    assert!(
        eventually(Duration::from_secs(20), || {
            l.limits().iter().all(|i| {
                i.waiters == 0 && i.held_slots == if i.name == KEPT.0 { CHILDREN as u32 } else { 0 }
            })
        }),
        "held or waiting after the traffic stopped: {:#?}",
        l.limits()
    );
    for info in l.limits() {
        let (limit, active, decay) = defs[info.name.as_str()];
        assert_eq!(
            (info.limit, info.active, info.slot_decay_per_second),
            (limit, active, decay),
            "{}: not as the CLI left it: {info:?}",
            info.name
        );
        if info.name == RATE.0 {
            assert!(info.active_slots <= limit, "{info:?}");
        } else {
            let kept = if info.name == KEPT.0 {
                CHILDREN as u32
            } else {
                0
            };
            assert_eq!(info.active_slots, kept, "{info:?}");
        }
        assert!(
            info.avg_slot_occupancy_seconds.is_finite() && info.avg_slot_occupancy_seconds > 0.0,
            "{info:?}"
        );
        println!("final {info:?}");
    }
    assert_eq!(l.limits().len(), defs.len(), "{:?}", l.limits());
    std::fs::write(format!("{stop}.exit"), "").unwrap();
    for kid in kids {
        kid.wait_ok();
    }
    assert!(
        eventually(Duration::from_secs(20), || {
            l.limit(KEPT.0).is_some_and(|i| i.held_slots == 0)
                && count(&format!("SELECT count(*) FROM {ns}.clients")) == 1
        }),
        "the children's slots of {} or their clients are left: {:?}",
        KEPT.0,
        l.limit(KEPT.0)
    );

    // Flat: memory, connections, rows.
    assert!(samples.len() >= 6, "only {} samples", samples.len());
    let third = samples.len() / 3;
    let (first, last) = (&samples[..third], &samples[samples.len() - third..]);
    for (k, pid) in pids.iter().enumerate() {
        let early = median(first.iter().map(|s| s.rss[k]).collect());
        let late = last.iter().map(|s| s.rss[k]).max().unwrap();
        let allowed = early + early / 5 + 2048;
        println!(
            "child {pid}: RSS {} KiB first sample, {early} KiB first third's median, \
             {late} KiB last third's peak (allowed {allowed}), {} KiB last sample",
            samples[0].rss[k],
            samples.last().unwrap().rss[k]
        );
        assert!(
            late <= allowed,
            "child {pid}: RSS grew from {early} KiB to {late} KiB"
        );
    }
    let max_conns = samples
        .iter()
        .flat_map(|s| s.conns.iter().copied())
        .max()
        .unwrap();
    assert!(max_conns <= 4, "a child had {max_conns} connections");
    assert!(
        samples.iter().all(|s| s.conns.iter().all(|&c| c >= 1)),
        "a child had no connection: the count is wrong"
    );
    let peak = |f: fn(&Sample) -> i64, part: &[Sample]| part.iter().map(f).max().unwrap();
    let max_clients = peak(|s| s.clients, &samples);
    assert!(
        max_clients <= CHILDREN as i64 + 2,
        "{max_clients} clients at once"
    );
    // Each hold takes a slot of at least one limit; held slots never pass
    // the highest limit the CLI sets (a lowered limit keeps what it held),
    // and `h` holds the children's.
    let hold_bound = i64::from(MAX) * EDITED.len() as i64 + CHILDREN as i64;
    let max_holds = peak(|s| s.holds, &samples);
    assert!(max_holds <= hold_bound, "{max_holds} holds at once");
    // Rows of grants of nothing held go with their client's first renewal
    // a lease after the grant: never older than that (+5 s for a loaded
    // machine), however long the run.
    let max_stale = peak(|s| s.stale, &samples);
    assert_eq!(max_stale, 0, "rows of grants kept past their lease");
    for (what, f) in [
        ("queued waiters", (|s| s.queued) as fn(&Sample) -> i64),
        ("failed waiters", |s| s.failed),
        ("waiter_limits", |s| s.waiter_limits),
    ] {
        let (early, late) = (peak(f, first), peak(f, last));
        println!("{what}: peak {early} in the first third, {late} in the last");
        assert!(
            late <= 2 * early + 64,
            "{what} grew: peak {early} in the first third, {late} in the last"
        );
    }
    let max_dead = peak(|s| s.dead, &samples);
    let max_backends = peak(|s| s.backends, &samples);
    let acquired = totals["acquired"];
    println!(
        "shared soak, {secs} s, {CHILDREN} processes × {THREADS} threads: {acquired} holds \
         ({} async), {} cancellations, {} timeouts, {} retries exhausted, {} refused tries, \
         {} occupy above a lowered limit, {} rate-limit slots ({} refused or timed out), \
         {cli_runs} CLI runs; RSS first/last sample {:?} / {:?} KiB; connections per process \
         max {max_conns}, turnstile backends max {max_backends}; rows max: clients \
         {max_clients}, holds {max_holds}, queued waiters {}, kept grants {}, failed {}, \
         waiter_limits {}; dead tuples max {max_dead}",
        totals["async_acquired"],
        totals["cancelled"],
        totals["timed_out"],
        totals["retries_exhausted"],
        totals["refused"],
        totals["occupy_exceeds"],
        totals["rate_slots"],
        totals["rate_refused"],
        samples[0].rss,
        samples.last().unwrap().rss,
        peak(|s| s.queued, &samples),
        peak(|s| s.kept, &samples),
        peak(|s| s.failed, &samples),
        peak(|s| s.waiter_limits, &samples),
    );
    assert!(acquired > 0 && totals["cancelled"] > 0 && totals["rate_slots"] > 0);
}
