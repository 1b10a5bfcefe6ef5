//! Shared limits on PostgreSQL (issue 10, "Speed"), on one throwaway
//! loopback cluster with PostgreSQL's default settings (fsync on: the floor
//! must be durable), `pg_stat_statements` preloaded to count queries.
//!
//! * Case 1, a criterion group `shared_uncontended`: one-name `acquire()` +
//!   `release()` (which waits for the server) beside a naive durable floor
//!   (two autocommit one-row `UPDATE`s on one connection) and two bare
//!   `SELECT 1` round trips, all prepared where the `postgres` crate allows.
//! * Cases 2–6, multi-second scenarios across processes: this binary
//!   re-executes itself as children (role and parameters in environment
//!   variables), which connect, print `READY`, wait for `GO` on stdin, run,
//!   print their figures (`H`, `COUNT` lines) and `DONE`. Each scenario runs
//!   [`RUNS`] times; the table shows the median run.
//! * Case 7: `release()` of a limit of 1 with 1,000 acquisitions queued
//!   behind it, beside the same with 10 (alternating rounds, medians): a
//!   release must not cost more with a long queue.
//!
//! Besides the table: the server's WAL flushes per case (`pg_stat_wal`,
//! count and mean time: commit latency dominates everything here) and the
//! server time of the busiest statements (`pg_stat_statements`).
//! `TURNSTILE_BENCH_PG_SETTINGS=synchronous_commit=off` (any `name=value,...`)
//! starts the cluster with extra settings, for experiments.
//!
//! Without PostgreSQL the bench prints `SKIPPED` and exits 0 (it panics
//! under `CI`). The table is also saved as
//! `target/criterion/turnstile-summary-shared.md`.

mod common;
#[path = "../tests/common/pg.rs"]
mod pg;

use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::Criterion;
use turnstile::{LimitConfig, Limiter};

use common::{fmt_ns, fmt_rate, median, percentile, Cli, Results, Table, Target};

const ROLE_ENV: &str = "TURNSTILE_BENCH_ROLE";
const URL_ENV: &str = "TURNSTILE_BENCH_URL";
const NS_ENV: &str = "TURNSTILE_BENCH_NS";
const ID_ENV: &str = "TURNSTILE_BENCH_ID";
const ARGS_ENV: &str = "TURNSTILE_BENCH_ARGS";
/// Extra settings for the cluster, `name=value,...` (experiments only).
const SETTINGS_ENV: &str = "TURNSTILE_BENCH_PG_SETTINGS";

/// Runs of each multi-second scenario; the table shows the median.
const RUNS: usize = 3;
/// How long a child may take to connect, or a scenario to finish.
const PATIENCE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Children
// ---------------------------------------------------------------------------

fn unix_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as i64
}

fn connect(url: &str, ns: &str) -> Limiter {
    Limiter::builder()
        .postgres(url)
        .namespace(ns)
        .lease(Duration::from_secs(30))
        .build()
        .expect("connect")
}

/// Prints `READY` and waits for the parent's `GO`.
fn ready() {
    println!("READY");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("GO");
}

fn child(role: &str) {
    let url = std::env::var(URL_ENV).expect("url");
    let ns = std::env::var(NS_ENV).expect("namespace");
    let id: usize = std::env::var(ID_ENV).expect("id").parse().unwrap();
    let args: Vec<String> = std::env::var(ARGS_ENV)
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let arg = |i: usize| -> u64 { args[i].parse().expect("a number") };
    let limiter = connect(&url, &ns);
    let mut out = String::new();
    match role {
        // `n` holds of `name`, `hold_ms` each: the grant and release
        // instants of each (the release instant taken just before release()).
        "contend" => {
            let (name, hold, n) = (&args[0], Duration::from_millis(arg(1)), arg(2));
            ready();
            for _ in 0..n {
                let guard = limiter.concurrency(name.as_str(), 1).acquire().unwrap();
                let granted = unix_ns();
                thread::sleep(hold);
                let released = unix_ns();
                guard.release();
                let back = unix_ns();
                out += &format!("H {id} {granted} {released} {back}\n");
            }
        }
        // Acquire + release of `name` as fast as possible for `secs`.
        "spin" => {
            let (name, secs) = (&args[0], Duration::from_secs(arg(1)));
            ready();
            let end = Instant::now() + secs;
            let mut count = 0u64;
            while Instant::now() < end {
                let guard = limiter.concurrency(name.as_str(), 1).acquire().unwrap();
                guard.release();
                count += 1;
            }
            out += &format!("COUNT {id} {count}\n");
        }
        // `n` rate_limit(name, 1) calls.
        "rate" => {
            let (name, n) = (&args[0], arg(1));
            ready();
            for _ in 0..n {
                limiter.rate_limit(name.as_str(), 1).acquire().unwrap();
            }
        }
        // `threads` threads waiting on `name` (paused) until killed.
        "idle" => {
            let (name, threads) = (args[0].clone(), arg(1));
            for _ in 0..threads {
                let limiter = limiter.clone();
                let name = name.clone();
                thread::spawn(move || {
                    let _ = limiter.concurrency(name.as_str(), 1).acquire();
                });
            }
            ready();
            thread::sleep(Duration::from_secs(600));
        }
        other => panic!("unknown role {other}"),
    }
    println!("{out}DONE");
    std::io::stdout().flush().unwrap();
    limiter.flush().unwrap();
}

// ---------------------------------------------------------------------------
// The parent's side of the children
// ---------------------------------------------------------------------------

struct Kid {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Kid {
    fn spawn(role: &str, url: &str, ns: &str, id: usize, args: &str) -> Kid {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = Command::new(exe)
            .env(ROLE_ENV, role)
            .env(URL_ENV, url)
            .env(NS_ENV, ns)
            .env(ID_ENV, id.to_string())
            .env(ARGS_ENV, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn a child");
        let stdout = child.stdout.take().expect("piped");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Kid {
            child,
            stdin,
            lines,
        }
    }

    /// Lines up to (without) `last`, within `within`.
    fn until(&self, last: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == last => return got,
                Ok(line) => got.push(line),
                Err(e) => panic!("child: no {last:?} within {within:?} ({e})"),
            }
        }
    }

    fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(b"GO\n").expect("GO");
        stdin.flush().expect("GO");
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `n` children of `role`, lets them go together once all are
/// connected, and returns the wall time until the last said `DONE` and the
/// lines each printed.
fn scenario(url: &str, ns: &str, role: &str, n: usize, args: &str) -> (Duration, Vec<String>) {
    let mut kids: Vec<Kid> = (0..n).map(|i| Kid::spawn(role, url, ns, i, args)).collect();
    for kid in &kids {
        kid.until("READY", PATIENCE);
    }
    let start = Instant::now();
    for kid in &mut kids {
        kid.go();
    }
    let mut lines = Vec::new();
    for kid in &kids {
        lines.extend(kid.until("DONE", PATIENCE));
    }
    let wall = start.elapsed();
    for mut kid in kids {
        drop(kid.stdin.take());
        let _ = kid.child.wait();
    }
    (wall, lines)
}

/// A fresh namespace holding `limits`, made by a limiter of the parent's
/// (dropped before the scenario runs).
fn namespace(url: &str, ns: &str, limits: &[(&str, LimitConfig)]) {
    let limiter = connect(url, ns);
    for (name, config) in limits {
        limiter.create_limit(name, config.clone()).unwrap();
    }
}

// ---------------------------------------------------------------------------
// Case 1: criterion
// ---------------------------------------------------------------------------

/// Case 1's contestants, on one limiter and one plain connection.
struct Uncontended {
    limiter: Limiter,
    client: postgres::Client,
    take: postgres::Statement,
    give: postgres::Statement,
    one: postgres::Statement,
}

impl Uncontended {
    fn new(url: &str) -> Uncontended {
        let limiter = connect(url, "bench_uncontended");
        limiter.create_limit("u", LimitConfig::new(1)).unwrap();
        let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect");
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS floor (id int PRIMARY KEY, n bigint NOT NULL);
                 INSERT INTO floor VALUES (1, 0) ON CONFLICT DO NOTHING",
            )
            .unwrap();
        let take = client
            .prepare("UPDATE floor SET n = n + 1 WHERE id = 1")
            .unwrap();
        let give = client
            .prepare("UPDATE floor SET n = n - 1 WHERE id = 1")
            .unwrap();
        let one = client.prepare("SELECT 1").unwrap();
        Uncontended {
            limiter,
            client,
            take,
            give,
            one,
        }
    }

    /// One-name acquire + release (which waits for the server).
    fn turnstile(&mut self) {
        let guard = self
            .limiter
            .concurrency(black_box("u"), 1)
            .acquire()
            .unwrap();
        black_box(guard.release());
    }

    /// Two autocommit one-row UPDATEs, prepared: two round trips, two
    /// commits.
    fn floor(&mut self) {
        assert_eq!(self.client.execute(&self.take, &[]).unwrap(), 1);
        assert_eq!(self.client.execute(&self.give, &[]).unwrap(), 1);
    }

    /// Two prepared `SELECT 1`: two bare round trips.
    fn two_select_1(&mut self) {
        black_box(self.client.query_one(&self.one, &[]).unwrap());
        black_box(self.client.query_one(&self.one, &[]).unwrap());
    }

    /// Two `SELECT 1` passed as text, as the library passes its calls: the
    /// crate prepares each (a round trip) before running it.
    fn two_select_1_unprepared(&mut self) {
        black_box(self.client.query_one("SELECT 1", &[]).unwrap());
        black_box(self.client.query_one("SELECT 1", &[]).unwrap());
    }

    fn check_idle(&self) {
        let info = self.limiter.limit("u").unwrap();
        assert_eq!((info.held_slots, info.waiters), (0, 0), "all given back");
    }
}

fn uncontended(c: &mut Criterion, u: &mut Uncontended) {
    let mut group = c.benchmark_group("shared_uncontended");
    group.bench_function("turnstile", |b| b.iter(|| u.turnstile()));
    group.bench_function("floor_two_updates", |b| b.iter(|| u.floor()));
    group.bench_function("two_select_1", |b| b.iter(|| u.two_select_1()));
    group.finish();
    u.check_idle();
}

/// Case 1 again, the contestants taking turns iteration by iteration, so
/// that all see the same load on this shared machine (criterion runs them
/// one after the other, seconds apart): median ns of each, in the order
/// turnstile, floor, two SELECT 1, two unprepared SELECT 1.
fn interleaved(u: &mut Uncontended, rounds: usize) -> [f64; 4] {
    let mut times: [Vec<f64>; 4] = Default::default();
    for round in 0..rounds {
        for k in 0..4 {
            let which = (round + k) % 4;
            let start = Instant::now();
            match which {
                0 => u.turnstile(),
                1 => u.floor(),
                2 => u.two_select_1(),
                _ => u.two_select_1_unprepared(),
            }
            times[which].push(start.elapsed().as_nanos() as f64);
        }
    }
    u.check_idle();
    times.map(|mut t| median(&mut t))
}

// ---------------------------------------------------------------------------
// Cases 2–6
// ---------------------------------------------------------------------------

/// One hold as a child reported it.
struct Hold {
    process: usize,
    granted: i64,
    released: i64,
    /// When release() returned (the server had it back).
    back: i64,
}

fn holds(lines: &[String]) -> Vec<Hold> {
    let mut holds: Vec<Hold> = lines
        .iter()
        .filter_map(|l| {
            let mut w = l.strip_prefix("H ")?.split(' ');
            Some(Hold {
                process: w.next()?.parse().ok()?,
                granted: w.next()?.parse().ok()?,
                released: w.next()?.parse().ok()?,
                back: w.next()?.parse().ok()?,
            })
        })
        .collect();
    holds.sort_by_key(|h| h.granted);
    holds
}

/// The fraction of hand-overs back to the process that released, the
/// delays (ns) from a release to the next grant in another process, and of
/// each the part spent inside release() (the server's release call).
fn hand_overs(holds: &[Hold]) -> (f64, Vec<f64>, Vec<f64>) {
    let mut same = 0;
    let mut delays = Vec::new();
    let mut calls = Vec::new();
    for pair in holds.windows(2) {
        assert!(
            pair[1].granted >= pair[0].released,
            "two holders of a limit of 1 at once"
        );
        if pair[0].process == pair[1].process {
            same += 1;
        } else {
            delays.push((pair[1].granted - pair[0].released) as f64);
            calls.push((pair[0].back - pair[0].released) as f64);
        }
    }
    (same as f64 / (holds.len() - 1) as f64, delays, calls)
}

/// The server's WAL flushes so far (`pg_stat_wal`, with
/// `track_wal_io_timing`): how many, and the milliseconds spent in them.
fn wal(url: &str) -> (i64, f64) {
    // Backends report their counts when they end or at most once a second:
    // let those of finished children arrive.
    thread::sleep(Duration::from_millis(1100));
    let mut c = postgres::Client::connect(
        &format!("{url}?application_name=bench-monitor"),
        postgres::NoTls,
    )
    .expect("connect");
    let row = c
        .query_one("SELECT wal_sync, wal_sync_time FROM pg_stat_wal", &[])
        .unwrap();
    (row.get(0), row.get(1))
}

/// The statements that took the server longest since the last call
/// (`pg_stat_statements`, reset after reading): calls and mean execution
/// time (the commit, and so the WAL flush, not included).
fn statements(url: &str) -> String {
    let mut c = postgres::Client::connect(
        &format!("{url}?application_name=bench-monitor"),
        postgres::NoTls,
    )
    .expect("connect");
    let rows = c
        .query(
            "SELECT calls, mean_exec_time, regexp_replace(query, '^SELECT \\* FROM \"?[a-z_0-9]+\"?\\.', '') \
             FROM pg_stat_statements WHERE query NOT ILIKE '%pg_stat_%' \
             ORDER BY total_exec_time DESC LIMIT 4",
            &[],
        )
        .unwrap_or_default();
    let _ = c.execute("SELECT pg_stat_statements_reset()", &[]);
    rows.iter()
        .map(|r| {
            let query: String = r.get(2);
            let query: String = query.chars().take(40).collect();
            format!(
                "{query} {} × {:.3} ms",
                r.get::<_, i64>(0),
                r.get::<_, f64>(1)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// One case's WAL flushes: (case, flushes, mean ms per flush, flushes per
/// acquisition).
type Flushes = (String, i64, f64, Option<f64>);

fn flushes(
    case: &str,
    before: (i64, f64),
    after: (i64, f64),
    acquisitions: Option<u64>,
) -> Flushes {
    let n = after.0 - before.0;
    let mean = if n > 0 {
        (after.1 - before.1) / n as f64
    } else {
        0.0
    };
    (
        case.to_string(),
        n,
        mean,
        acquisitions.map(|a| n as f64 / a as f64),
    )
}

struct Figures {
    /// The statements of cases 2 and 3.
    statements: String,
    /// WAL flushes of each case.
    flushes: Vec<Flushes>,
    /// Case 2: wall times (s) and fractions back to the releaser.
    contended: Vec<(f64, f64)>,
    /// Case 2's cross-process hand-off delays (ns), pooled.
    contended_delays: Vec<f64>,
    /// Cases 2 and 3: how long release() took, of each cross-process
    /// hand-off (ns).
    release_calls: Vec<f64>,
    /// Case 3: hand-off delays (ns), pooled over the runs.
    handoff: Vec<f64>,
    /// Case 4: (acquisitions/s, busiest/idlest) per run.
    throughput: Vec<(f64, f64, u64, u64)>,
    /// Case 5: wall times (s).
    rate: Vec<f64>,
    /// Case 6: (connections of the process, queries/s by pg_stat_statements,
    /// transactions/s by xact_commit).
    idle: Option<(i64, Option<f64>, f64)>,
    /// Case 7: release() times (ns) with few and with many waiters queued.
    queue: (Vec<f64>, Vec<f64>),
}

fn scenarios(url: &str) -> Figures {
    let mut f = Figures {
        statements: String::new(),
        flushes: Vec::new(),
        contended: Vec::new(),
        contended_delays: Vec::new(),
        release_calls: Vec::new(),
        handoff: Vec::new(),
        throughput: Vec::new(),
        rate: Vec::new(),
        idle: None,
        queue: (Vec::new(), Vec::new()),
    };

    // 2. limit 1, 4 processes × 50, 10 ms each.
    statements(url);
    let mut mark = wal(url);
    let mut next = |f: &mut Figures, case: &str, acquisitions: Option<u64>| {
        let now = wal(url);
        f.flushes.push(flushes(case, mark, now, acquisitions));
        mark = wal(url);
    };
    for run in 0..RUNS {
        let ns = format!("bench_contended_{run}");
        namespace(url, &ns, &[("c", LimitConfig::new(1))]);
        let (wall, lines) = scenario(url, &ns, "contend", 4, "c 10 50");
        let holds = holds(&lines);
        assert_eq!(holds.len(), 200);
        let (back, delays, calls) = hand_overs(&holds);
        eprintln!(
            "case 2 run {run}: {:.3} s, {:.1}% back to the releaser",
            wall.as_secs_f64(),
            back * 100.0
        );
        f.contended.push((wall.as_secs_f64(), back));
        f.contended_delays.extend(delays);
        f.release_calls.extend(calls);
    }

    next(&mut f, "2", Some(200 * RUNS as u64));

    // 3. two processes taking turns: 2 × 25 holds of 10 ms.
    for run in 0..RUNS {
        let ns = format!("bench_handoff_{run}");
        namespace(url, &ns, &[("h", LimitConfig::new(1))]);
        let (_, lines) = scenario(url, &ns, "contend", 2, "h 10 25");
        let (_, delays, calls) = hand_overs(&holds(&lines));
        f.release_calls.extend(calls);
        let mut d = delays.clone();
        eprintln!(
            "case 3 run {run}: {} hand-offs, median {}",
            d.len(),
            fmt_ns(median(&mut d))
        );
        f.handoff.extend(delays);
    }

    next(&mut f, "3", Some(50 * RUNS as u64));
    f.statements = statements(url);

    // 4. 8 processes, limit 4, zero hold, 3 s.
    for run in 0..RUNS {
        let ns = format!("bench_throughput_{run}");
        namespace(url, &ns, &[("t", LimitConfig::new(4))]);
        let (_, lines) = scenario(url, &ns, "spin", 8, "t 3");
        let counts: Vec<u64> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("COUNT ")?.split(' ').nth(1)?.parse().ok())
            .collect();
        assert_eq!(counts.len(), 8);
        let total: u64 = counts.iter().sum();
        let (max, min) = (*counts.iter().max().unwrap(), *counts.iter().min().unwrap());
        let per_sec = total as f64 / 3.0;
        eprintln!("case 4 run {run}: {per_sec:.0}/s, per process {counts:?}");
        f.throughput
            .push((per_sec, max as f64 / min.max(1) as f64, max, min));
    }

    let total = f.throughput.iter().map(|x| x.0 * 3.0).sum::<f64>() as u64;
    next(&mut f, "4", Some(total));

    // 5. rate_limit, limit 1, decay 500/s, 1,000 calls over 4 processes.
    for run in 0..RUNS {
        let ns = format!("bench_rate_{run}");
        namespace(
            url,
            &ns,
            &[("r", LimitConfig::new(1).slot_decay_per_second(500.0))],
        );
        let (wall, _) = scenario(url, &ns, "rate", 4, "r 250");
        eprintln!("case 5 run {run}: {:.3} s", wall.as_secs_f64());
        f.rate.push(wall.as_secs_f64());
    }

    next(&mut f, "5", Some(1000 * RUNS as u64));

    // 6. one process, 100 threads waiting on a paused limit.
    f.idle = Some(idle_waiters(url));

    // 7. release() with 10 and with 1,000 waiters queued on its limit.
    f.queue = queued_releases(url);
    f
}

/// An acquisition queued on the server, polled by hand.
type Queued<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<turnstile::ConcurrencyGuard, turnstile::Error>>
            + 'a,
    >,
>;

/// One limit of 1 with `n` acquisitions queued behind its holder.
struct Queue<'a> {
    limiter: &'a Limiter,
    waiting: std::collections::VecDeque<Queued<'a>>,
    holder: Option<turnstile::ConcurrencyGuard>,
}

impl<'a> Queue<'a> {
    fn new(limiter: &'a Limiter, n: usize) -> Queue<'a> {
        let holder = Some(limiter.concurrency("x", 1).acquire().unwrap());
        let mut q = Queue {
            limiter,
            waiting: Default::default(),
            holder,
        };
        for _ in 0..n {
            q.push();
        }
        let deadline = Instant::now() + PATIENCE;
        while limiter.limit("x").unwrap().waiters < n {
            assert!(Instant::now() < deadline, "the waiters never all queued");
            thread::sleep(Duration::from_millis(20));
        }
        q
    }

    fn push(&mut self) {
        let mut f: Queued<'a> = Box::pin(std::future::IntoFuture::into_future(
            self.limiter.concurrency("x", 1),
        ));
        assert!(poll_once(&mut f).is_none(), "a waiter was let in at once");
        self.waiting.push_back(f);
    }

    /// Releases the holder (timed: the call waits for the server), then
    /// takes the head waiter's grant as the next holder and queues one more
    /// at the back.
    fn turn(&mut self) -> f64 {
        let holder = self.holder.take().unwrap();
        let start = Instant::now();
        holder.release();
        let took = start.elapsed().as_nanos() as f64;
        let mut head = self.waiting.pop_front().unwrap();
        let deadline = Instant::now() + PATIENCE;
        let granted = loop {
            if let Some(r) = poll_once(&mut head) {
                break r.unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "the head waiter was never let in"
            );
            thread::sleep(Duration::from_micros(200));
        };
        self.holder = Some(granted);
        self.push();
        took
    }
}

fn poll_once<T>(f: &mut std::pin::Pin<Box<dyn std::future::Future<Output = T> + '_>>) -> Option<T> {
    let waker = std::task::Waker::noop();
    match f.as_mut().poll(&mut std::task::Context::from_waker(waker)) {
        std::task::Poll::Ready(r) => Some(r),
        std::task::Poll::Pending => None,
    }
}

/// Case 7: release() times with 10 and with 1,000 waiters queued on the
/// limit, in alternating rounds.
fn queued_releases(url: &str) -> (Vec<f64>, Vec<f64>) {
    const FEW: usize = 10;
    const MANY: usize = 1000;
    const ROUNDS: usize = 40;
    namespace(url, "bench_queue_few", &[("x", LimitConfig::new(1))]);
    namespace(url, "bench_queue_many", &[("x", LimitConfig::new(1))]);
    let (few_l, many_l) = (
        connect(url, "bench_queue_few"),
        connect(url, "bench_queue_many"),
    );
    let mut few = Queue::new(&few_l, FEW);
    let mut many = Queue::new(&many_l, MANY);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        a.push(few.turn());
        b.push(many.turn());
    }
    eprintln!(
        "case 7: release() {} with {FEW} waiters, {} with {MANY}",
        fmt_ns(median(&mut a.clone())),
        fmt_ns(median(&mut b.clone()))
    );
    (a, b)
}

/// Case 6: (connections, queries/s, transactions/s).
fn idle_waiters(url: &str) -> (i64, Option<f64>, f64) {
    const WAITERS: usize = 100;
    let ns = "bench_idle";
    namespace(url, ns, &[("p", LimitConfig::new(0))]);
    let mut kid = Kid::spawn("idle", url, ns, 0, &format!("p {WAITERS}"));
    kid.until("READY", PATIENCE);
    kid.go();
    // Wait until every waiter is queued on the server (looked at by a
    // limiter of the parent's, dropped before measuring).
    {
        let sep = if url.contains('?') { '&' } else { '?' };
        let looker = connect(&format!("{url}{sep}application_name=bench-parent"), ns);
        let deadline = Instant::now() + PATIENCE;
        while looker.limit("p").unwrap().waiters < WAITERS {
            assert!(Instant::now() < deadline, "the waiters never all queued");
            thread::sleep(Duration::from_millis(50));
        }
    }
    thread::sleep(Duration::from_millis(500)); // settle
    let mut client = postgres::Client::connect(
        &format!("{url}?application_name=bench-monitor"),
        postgres::NoTls,
    )
    .expect("connect");
    let connections: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'turnstile'",
            &[],
        )
        .unwrap()
        .get(0);
    // Calls by everyone but this monitor (whose queries name pg_stat_).
    let statements = |c: &mut postgres::Client| -> Option<i64> {
        c.query_one(
            "SELECT sum(calls)::bigint FROM pg_stat_statements \
             WHERE query NOT ILIKE '%pg_stat_%'",
            &[],
        )
        .ok()
        .and_then(|r| r.get::<_, Option<i64>>(0))
    };
    let commits = |c: &mut postgres::Client| -> i64 {
        c.query_one(
            "SELECT pg_stat_clear_snapshot(), xact_commit FROM pg_stat_database \
             WHERE datname = current_database()",
            &[],
        )
        .unwrap()
        .get(1)
    };
    const WINDOW: Duration = Duration::from_secs(5);
    let (q0, x0) = (statements(&mut client), commits(&mut client));
    let start = Instant::now();
    thread::sleep(WINDOW);
    let (q1, x1) = (statements(&mut client), commits(&mut client));
    let secs = start.elapsed().as_secs_f64();
    // This monitor's own transactions between the two counts: the
    // statements query and the commits query of the second reading (one
    // each, autocommit).
    let own = 2;
    let qps = q0.zip(q1).map(|(a, b)| (b - a) as f64 / secs);
    let tps = (x1 - x0 - own).max(0) as f64 / secs;
    eprintln!(
        "case 6: {connections} connections with {WAITERS} waiters; \
         {qps:?} queries/s, {tps:.1} transactions/s"
    );
    drop(kid);
    (connections, qps, tps)
}

// ---------------------------------------------------------------------------

/// The machine's 1-minute load average (2 cores, shared with other builds).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".into())
}

fn main() {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        child(&role);
        return;
    }
    let since = SystemTime::now();
    let cli = Cli::parse();
    // Extra server settings for experiments, `name=value,name=value` (e.g.
    // `synchronous_commit=off` to see what is left without WAL flushes;
    // the floor is then no longer durable).
    let extra = std::env::var(SETTINGS_ENV).unwrap_or_default();
    let mut settings: Vec<(&str, &str)> = vec![
        ("shared_preload_libraries", "pg_stat_statements"),
        ("pg_stat_statements.track", "top"),
        ("track_wal_io_timing", "on"),
    ];
    settings.extend(extra.split(',').filter_map(|kv| kv.split_once('=')));
    let cluster = match pg::Cluster::start_with(&settings) {
        Ok(cluster) => cluster,
        Err(why) => {
            if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
                panic!("benches/shared.rs needs PostgreSQL and CI is set: {why}");
            }
            println!("SKIPPED benches/shared.rs: {why}");
            return;
        }
    };
    cluster
        .stop_when_this_process_exits()
        .expect("a watcher for the cluster");
    let url = cluster.url();
    if let Err(e) = cluster.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements") {
        eprintln!("no pg_stat_statements ({e}): case 6 counts transactions only");
    }
    // initdb (--no-sync) leaves tens of MB dirty in the page cache; their
    // writeback competes with every WAL flush for the next half minute or
    // so. Flush them now, so that commits are timed on a quiet disk (as
    // quiet as a shared machine allows).
    let synced = Instant::now();
    let _ = cluster.psql("CHECKPOINT");
    let _ = Command::new("sync")
        .arg("-f")
        .arg(cluster.data_dir())
        .status();
    eprintln!("flushed the new cluster in {:?}", synced.elapsed());
    let settings = cluster
        .psql(
            "SELECT string_agg(name || '=' || setting, ' ' ORDER BY name) FROM pg_settings \
             WHERE name IN ('fsync', 'synchronous_commit', 'wal_sync_method', 'server_version')",
        )
        .unwrap_or_default();

    let mut c = common::criterion();
    let wal_start = wal(&url);
    let mut u = Uncontended::new(&url);
    statements(&url);
    uncontended(&mut c, &mut u);
    c.final_summary();
    if !cli.measure {
        return;
    }
    let [i_ours, i_floor, i_select, i_unprepared] = interleaved(&mut u, 400);
    drop(u);
    let case1 = flushes("1 (criterion + interleaved)", wal_start, wal(&url), None);
    let case1_statements = statements(&url);
    let load_before = loadavg();
    let f = scenarios(&url);

    let r = Results::since(since);
    let m = |id: &str| r.median_ns("shared_uncontended", id);
    let mut t = Table::default();
    t.times(
        "1. acquire + release vs two autocommit UPDATEs (durable floor)",
        ("", m("turnstile")),
        ("floor", m("floor_two_updates")),
        Target::AtMost(1.3),
    );
    t.times(
        "1. acquire + release vs two SELECT 1 round trips",
        ("", m("turnstile")),
        ("2 × SELECT 1", m("two_select_1")),
        Target::None,
    );
    t.times(
        "1. interleaved, 400 rounds: acquire + release vs durable floor",
        ("", Some(i_ours)),
        ("floor", Some(i_floor)),
        Target::AtMost(1.3),
    );
    t.times(
        "1. interleaved: acquire + release vs two SELECT 1 round trips",
        ("", Some(i_ours)),
        ("2 × SELECT 1", Some(i_select)),
        Target::None,
    );
    t.times(
        "1. interleaved: two SELECT 1 as text (prepared each time) vs prepared",
        ("text", Some(i_unprepared)),
        ("prepared", Some(i_select)),
        Target::None,
    );

    let mut walls: Vec<f64> = f.contended.iter().map(|x| x.0 * 1e9).collect();
    let mut backs: Vec<f64> = f.contended.iter().map(|x| x.1).collect();
    t.times(
        "2. 4 processes × 50 holds of 10 ms, limit 1: wall vs ideal",
        ("", Some(median(&mut walls))),
        ("ideal", Some(2e9)),
        Target::AtMost(1.10),
    );
    t.counts(
        "2. same: fraction of hand-overs back to the releasing process",
        ("", Some((median(&mut backs) * 1000.0).round() / 1000.0)),
        ("all", Some(1.0)),
        Target::AtMost(0.10),
    );
    let mut d2 = f.contended_delays.clone();
    if !d2.is_empty() {
        t.times(
            "2. same: release → next holder running (median, cross-process)",
            ("", Some(median(&mut d2))),
            ("p90", Some(percentile(&mut d2, 90.0))),
            Target::None,
        );
    }
    let mut d3 = f.handoff.clone();
    t.times(
        &format!(
            "3. hand-off across processes, release → waiter running (median of {})",
            d3.len()
        ),
        ("", Some(median(&mut d3))),
        ("p90", Some(percentile(&mut d3, 90.0))),
        Target::OursAtMost(2e6),
    );
    let mut calls = f.release_calls.clone();
    t.times(
        "2–3. of a hand-off, the releaser's release() call (median)",
        ("", Some(median(&mut calls))),
        ("p90", Some(percentile(&mut calls, 90.0))),
        Target::None,
    );
    let mut rates: Vec<f64> = f.throughput.iter().map(|x| x.0).collect();
    let mid = median(&mut rates);
    let run = f
        .throughput
        .iter()
        .find(|x| x.0 == mid)
        .copied()
        .unwrap_or(f.throughput[0]);
    t.rates(
        "4. 8 processes, limit 4, zero hold: acquisitions/s",
        ("", Some(run.0)),
        ("—", None),
        Target::None,
    );
    t.counts(
        &format!(
            "4. same: busiest / idlest process ({} / {} in 3 s)",
            run.2, run.3
        ),
        ("", Some((run.1 * 100.0).round() / 100.0)),
        ("1", Some(1.0)),
        Target::None,
    );
    let mut rate_walls: Vec<f64> = f.rate.iter().map(|x| x * 1e9).collect();
    t.times(
        "5. rate_limit, limit 1, 500/s, 1,000 calls over 4 processes: wall vs ideal",
        ("", Some(median(&mut rate_walls))),
        ("ideal", Some(2e9)),
        Target::AtMost(1.05),
    );
    if let Some((conns, qps, _)) = f.idle {
        t.counts(
            "6. connections of one process with 100 waiting threads",
            ("", Some(conns as f64)),
            ("max", Some(4.0)),
            Target::AtMost(1.0),
        );
        t.rates(
            "6. same: queries/s (pg_stat_statements) while idle",
            ("", qps),
            ("—", None),
            Target::None,
        );
    }

    let (mut few, mut many) = f.queue.clone();
    t.times(
        "7. release() with 1,000 waiters queued on its limit vs with 10",
        ("", Some(median(&mut many))),
        ("10 queued", Some(median(&mut few))),
        Target::AtMost(2.0),
    );

    let idle_tps = f.idle.map_or(0.0, |x| x.2);
    let mut text = t.render(&format!(
        "turnstile shared limits on PostgreSQL: cases 1–7 ({RUNS} runs of 2–5, median run)"
    ));
    text += &format!("\nServer: {settings}\n");
    text += &format!(
        "Case 6, transactions/s by pg_stat_database.xact_commit over the same 5 s: \
         {idle_tps:.1} (not to be trusted: backends report up to 10 s late, \
         so the waiters' own queueing lands in the window)\n"
    );
    text += &format!(
        "Load average before / after: {load_before} / {}\n",
        loadavg()
    );
    text += &format!(
        "Case 2 runs: {}\n",
        f.contended
            .iter()
            .map(|(w, b)| format!("{w:.3} s / {:.1}% back", b * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    text += &format!(
        "Case 4 runs: {}\n",
        f.throughput
            .iter()
            .map(|x| format!("{} ({}/{})", fmt_rate(x.0), x.2, x.3))
            .collect::<Vec<_>>()
            .join(", ")
    );
    text += &format!(
        "Case 5 runs: {}\n",
        f.rate
            .iter()
            .map(|w| format!("{w:.3} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    text += &format!("Server time per call, case 1 (pg_stat_statements): {case1_statements}\n");
    text += &format!(
        "Server time per call, cases 2–3 (pg_stat_statements): {}\n",
        f.statements
    );
    text += "WAL flushes (pg_stat_wal, track_wal_io_timing): ";
    text += &std::iter::once(&case1)
        .chain(&f.flushes)
        .map(|(case, n, mean, per)| {
            let per = per.map_or(String::new(), |p| format!(", {p:.2} per acquisition"));
            format!("case {case}: {n} × {mean:.3} ms{per}")
        })
        .collect::<Vec<_>>()
        .join("; ");
    text.push('\n');
    println!("{text}");
    if let Some(path) = common::save("shared", &text) {
        println!("(saved to {})", path.display());
    }
}
