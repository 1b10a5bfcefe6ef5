//! Contention, hand-off and Prefect's own scenarios (cases 4, 5 and 9),
//! turnstile beside `tokio::sync::Semaphore`, `governor` and a plain
//! `parking_lot::Mutex` + `Condvar` semaphore (the floor).
//!
//! * Case 4 runs in criterion (`contended_limit1`, `contended_limit4`): each
//!   sample is `iters` acquire + release pairs split over N threads, timed from
//!   a common start to the last thread's end, so criterion's "time" is wall
//!   time per operation of the whole pool (its inverse the throughput).
//!   Each sample starts its threads afresh, so short samples may end before
//!   a convoy forms; the steady state (fixed 300 ms runs, all threads busy
//!   to the end) is measured after the groups, with fairness: the spread
//!   between the busiest and the idlest worker.
//! * Cases 5 and 9 are one-off measurements (latencies of single hand-offs,
//!   and multi-second wall times), printed in the summary.
//!
//! `cargo bench --bench contended` prints the summary table at the end (also
//! saved as `target/criterion/turnstile-summary-contended.md`). A filter
//! argument also selects the one-offs by name: `steady`, `handoff`, `prefect`
//! (e.g. `cargo bench --bench contended -- handoff`).

mod common;

use std::future::IntoFuture;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use criterion::{BenchmarkId, Criterion, SamplingMode};
use futures::executor::block_on;
use governor::clock::{Clock, MonotonicClock};
use governor::{Quota, RateLimiter};
use tokio::sync::Semaphore;
use turnstile::{LimitConfig, Limiter};

use common::{fmt_ns, fmt_rate, median, percentile, Cli, CondvarSemaphore, Results, Table, Target};

const THREADS: [usize; 3] = [2, 4, 8];
const LIMITS: [u32; 2] = [1, 4];

// ---------------------------------------------------------------------------
// Case 4: contended throughput
// ---------------------------------------------------------------------------

/// Runs `iters` calls of `op` on `threads` threads that start together and
/// take work from a shared counter in small batches, so that all of them
/// contend until the end; returns the wall time from the start to the last
/// one's end.
fn split(threads: usize, iters: u64, op: &(dyn Fn() + Sync)) -> Duration {
    const BATCH: u64 = 16;
    let next = AtomicU64::new(0);
    let start_line = Barrier::new(threads + 1);
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (next, start_line) = (&next, &start_line);
                s.spawn(move || {
                    start_line.wait();
                    loop {
                        let from = next.fetch_add(BATCH, Ordering::Relaxed);
                        if from >= iters {
                            break;
                        }
                        for _ in from..(from + BATCH).min(iters) {
                            op();
                        }
                    }
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        for w in workers {
            w.join().expect("worker");
        }
        start.elapsed()
    })
}

/// The three contenders' zero-hold acquire + release on a limit of `limit`.
struct Contenders {
    limiter: Limiter,
    tokio: Semaphore,
    floor: CondvarSemaphore,
}

impl Contenders {
    fn new(limit: u32) -> Self {
        let limiter = Limiter::in_memory();
        limiter.create_limit("a", LimitConfig::new(limit)).unwrap();
        Contenders {
            limiter,
            tokio: Semaphore::new(limit as usize),
            floor: CondvarSemaphore::new(limit),
        }
    }

    fn turnstile(&self) {
        let guard = self
            .limiter
            .concurrency("a", 1)
            .acquire()
            .expect("acquired");
        drop(black_box(guard));
    }

    fn tokio(&self) {
        let permit = block_on(self.tokio.acquire()).expect("open");
        drop(black_box(permit));
    }

    fn floor(&self) {
        let permit = self.floor.acquire();
        drop(black_box(permit));
    }

    fn check_idle(&self, limit: u32) {
        let info = self.limiter.limit("a").unwrap();
        assert_eq!((info.held_slots, info.waiters), (0, 0));
        assert_eq!(self.tokio.available_permits(), limit as usize);
        assert!(self.floor.try_acquire().is_some());
    }
}

fn contended(c: &mut Criterion) {
    for limit in LIMITS {
        let mut group = c.benchmark_group(format!("contended_limit{limit}"));
        group.sampling_mode(SamplingMode::Flat);
        let k = Contenders::new(limit);
        for threads in THREADS {
            group.bench_with_input(BenchmarkId::new("turnstile", threads), &threads, |b, &t| {
                b.iter_custom(|iters| split(t, iters, &|| k.turnstile()))
            });
            group.bench_with_input(BenchmarkId::new("tokio", threads), &threads, |b, &t| {
                b.iter_custom(|iters| split(t, iters, &|| k.tokio()))
            });
            group.bench_with_input(
                BenchmarkId::new("mutex_condvar", threads),
                &threads,
                |b, &t| b.iter_custom(|iters| split(t, iters, &|| k.floor())),
            );
        }
        group.finish();
        k.check_idle(limit);
    }
}

/// Throughput (ops/s) and spread (busiest worker's count / idlest's) of one
/// fixed-duration run.
fn fixed_run(threads: usize, run_for: Duration, op: &(dyn Fn() + Sync)) -> (f64, f64) {
    let stop = AtomicBool::new(false);
    let start_line = Barrier::new(threads + 1);
    let counts: Vec<AtomicU64> = (0..threads).map(|_| AtomicU64::new(0)).collect();
    let elapsed = thread::scope(|s| {
        for count in &counts {
            let (stop, start_line) = (&stop, &start_line);
            s.spawn(move || {
                start_line.wait();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    op();
                    n += 1;
                }
                count.store(n, Ordering::Relaxed);
            });
        }
        start_line.wait();
        let start = Instant::now();
        thread::sleep(run_for);
        stop.store(true, Ordering::Relaxed);
        start.elapsed()
    });
    let counts: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let total: u64 = counts.iter().sum();
    let (max, min) = (*counts.iter().max().unwrap(), *counts.iter().min().unwrap());
    let spread = if min == 0 {
        f64::INFINITY
    } else {
        max as f64 / min as f64
    };
    (total as f64 / elapsed.as_secs_f64(), spread)
}

const STEADY_RUNS: usize = 5;
const STEADY_RUN: Duration = Duration::from_millis(300);

/// Median throughput and median spread of a few fixed-duration runs.
fn steady(threads: usize, op: &(dyn Fn() + Sync)) -> (f64, f64) {
    let runs: Vec<(f64, f64)> = (0..STEADY_RUNS)
        .map(|_| fixed_run(threads, STEADY_RUN, op))
        .collect();
    let mut rates: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let mut spreads: Vec<f64> = runs.iter().map(|r| r.1).collect();
    (median(&mut rates), median(&mut spreads))
}

/// Case 4 in steady state: rows for the main table (throughput against
/// tokio's blocking route) and a table of throughput and fairness.
fn steady_state(table: &mut Table) -> String {
    let mut out = format!(
        "\n## 4. Steady state: fixed {} ms runs, medians of {STEADY_RUNS}; spread = busiest worker's ops / idlest's (1.00 = even)\n\n\
         | limit | threads | turnstile ops/s | spread | tokio blocking ops/s | spread | mutex_condvar ops/s | spread |\n\
         |---|---|---|---|---|---|---|---|\n",
        STEADY_RUN.as_millis()
    );
    for limit in LIMITS {
        let k = Contenders::new(limit);
        for threads in THREADS {
            let ours = steady(threads, &|| k.turnstile());
            let tokio = steady(threads, &|| k.tokio());
            let floor = steady(threads, &|| k.floor());
            table.rates(
                &format!("4. limit {limit}, {threads} threads, steady state: throughput (spread {:.2} vs {:.2})", ours.1, tokio.1),
                ("", Some(ours.0)),
                ("tokio", Some(tokio.0)),
                Target::AtLeast(1.0),
            );
            out += &format!(
                "| {limit} | {threads} | {} | {:.2} | {} | {:.2} | {} | {:.2} |\n",
                fmt_rate(ours.0),
                ours.1,
                fmt_rate(tokio.0),
                tokio.1,
                fmt_rate(floor.0),
                floor.1
            );
        }
        k.check_idle(limit);
    }
    out
}

// ---------------------------------------------------------------------------
// Case 5: hand-off latency
// ---------------------------------------------------------------------------

/// How long the main thread lets a waiter settle into its blocking wait
/// before releasing.
const SETTLE: Duration = Duration::from_millis(1);
const HANDOFF_ROUNDS: usize = 200;

/// Latencies (ns) from the instant the holder starts releasing to the instant
/// the blocked waiter's acquire returns. `hold` takes the only slot (it is
/// free); `wait` runs on the waiter thread: it blocks in acquire, records the
/// instant it returned, releases and returns that instant; `queued` tells
/// when the waiter is blocked (after which the holder still waits `SETTLE`).
fn handoff<G>(
    hold: impl Fn() -> G,
    wait: impl Fn() -> Instant + Sync,
    queued: impl Fn() -> bool,
) -> Vec<f64> {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (at_tx, at_rx) = mpsc::channel::<Instant>();
    thread::scope(|s| {
        let wait = &wait;
        s.spawn(move || {
            for () in go_rx {
                at_tx.send(wait()).expect("main waits");
            }
        });
        let mut latencies = Vec::with_capacity(HANDOFF_ROUNDS);
        for _ in 0..HANDOFF_ROUNDS {
            let guard = hold();
            go_tx.send(()).expect("waiter runs");
            let deadline = Instant::now() + Duration::from_secs(5);
            while !queued() {
                assert!(Instant::now() < deadline, "the waiter never blocked");
                thread::yield_now();
            }
            thread::sleep(SETTLE);
            let released = Instant::now();
            drop(guard);
            let acquired = at_rx.recv().expect("waiter acquired");
            latencies.push(acquired.saturating_duration_since(released).as_nanos() as f64);
        }
        drop(go_tx);
        latencies
    })
}

struct Latency {
    median: f64,
    p90: f64,
    p99: f64,
}

impl Latency {
    fn of(mut ns: Vec<f64>) -> Latency {
        Latency {
            median: median(&mut ns),
            p90: percentile(&mut ns, 90.0),
            p99: percentile(&mut ns, 99.0),
        }
    }

    fn cells(&self) -> String {
        format!(
            "{} | {} | {}",
            fmt_ns(self.median),
            fmt_ns(self.p90),
            fmt_ns(self.p99)
        )
    }
}

struct Handoffs {
    turnstile: Latency,
    turnstile_async: Latency,
    tokio: Latency,
    floor: Latency,
}

fn handoffs() -> Handoffs {
    let limiter = Limiter::in_memory();
    limiter.create_limit("a", LimitConfig::new(1)).unwrap();
    let queued = || limiter.limit("a").unwrap().waiters == 1;
    let hold = || {
        limiter
            .concurrency("a", 1)
            .try_acquire()
            .unwrap()
            .expect("free")
    };
    let turnstile = Latency::of(handoff(
        hold,
        || {
            let guard = limiter.concurrency("a", 1).acquire().unwrap();
            let at = Instant::now();
            drop(guard);
            at
        },
        queued,
    ));
    let turnstile_async = Latency::of(handoff(
        hold,
        || {
            let guard = block_on(limiter.concurrency("a", 1).into_future()).unwrap();
            let at = Instant::now();
            drop(guard);
            at
        },
        queued,
    ));
    let sem = Semaphore::new(1);
    let tokio = Latency::of(handoff(
        || sem.try_acquire().expect("free"),
        || {
            let permit = block_on(sem.acquire()).unwrap();
            let at = Instant::now();
            drop(permit);
            at
        },
        || true,
    ));
    let floor_sem = CondvarSemaphore::new(1);
    let floor = Latency::of(handoff(
        || floor_sem.try_acquire().expect("free"),
        || {
            let permit = floor_sem.acquire();
            let at = Instant::now();
            drop(permit);
            at
        },
        || true,
    ));
    Handoffs {
        turnstile,
        turnstile_async,
        tokio,
        floor,
    }
}

// ---------------------------------------------------------------------------
// Case 9: Prefect's contended scenarios
// ---------------------------------------------------------------------------

const PREFECT_RUNS: usize = 3;
const IDEAL: Duration = Duration::from_secs(2);

/// Limit 1, 4 threads × 50 acquisitions, each holding 10 ms: the wall time.
fn prefect_concurrency<G>(acquire: impl Fn() -> G + Sync) -> Duration {
    let start_line = Barrier::new(5);
    thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (acquire, start_line) = (&acquire, &start_line);
                s.spawn(move || {
                    start_line.wait();
                    for _ in 0..50 {
                        let guard = acquire();
                        thread::sleep(Duration::from_millis(10));
                        drop(guard);
                    }
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        for w in workers {
            w.join().expect("worker");
        }
        start.elapsed()
    })
}

fn median_secs(runs: impl FnMut(usize) -> Duration) -> f64 {
    let mut secs: Vec<f64> = (0..PREFECT_RUNS)
        .map(runs)
        .map(|d| d.as_secs_f64())
        .collect();
    median(&mut secs)
}

struct Prefect {
    turnstile: f64,
    tokio: f64,
    floor: f64,
}

fn prefect() -> Prefect {
    let turnstile = median_secs(|_| {
        let limiter = Limiter::in_memory();
        limiter.create_limit("a", LimitConfig::new(1)).unwrap();
        let wall = prefect_concurrency(|| limiter.concurrency("a", 1).acquire().unwrap());
        let info = limiter.limit("a").unwrap();
        assert_eq!((info.held_slots, info.waiters), (0, 0));
        wall
    });
    let tokio = median_secs(|_| {
        let sem = Semaphore::new(1);
        prefect_concurrency(|| block_on(sem.acquire()).unwrap())
    });
    let floor = median_secs(|_| {
        let sem = CondvarSemaphore::new(1);
        prefect_concurrency(|| sem.acquire())
    });
    Prefect {
        turnstile,
        tokio,
        floor,
    }
}

/// Limit 1 (no burst), decay 1,000/s: 2,000 blocking calls in one thread.
fn prefect_rate() -> (f64, f64) {
    let turnstile = median_secs(|_| {
        let limiter = Limiter::in_memory();
        limiter
            .create_limit("r", LimitConfig::new(1).slot_decay_per_second(1000.0))
            .unwrap();
        let start = Instant::now();
        for _ in 0..2000 {
            limiter.rate_limit("r", 1).acquire().unwrap();
        }
        start.elapsed()
    });
    // governor's blocking route: check, and sleep until it says.
    let governor = median_secs(|_| {
        let clock = MonotonicClock;
        let quota = Quota::with_period(Duration::from_millis(1)).unwrap();
        let limiter = RateLimiter::direct_with_clock(quota, &clock);
        let start = Instant::now();
        for _ in 0..2000 {
            while let Err(not_until) = limiter.check() {
                thread::sleep(not_until.wait_time_from(clock.now()));
            }
        }
        start.elapsed()
    });
    (turnstile, governor)
}

// ---------------------------------------------------------------------------

fn main() {
    let since = SystemTime::now();
    let cli = Cli::parse();
    let mut c = common::criterion();
    contended(&mut c);
    c.final_summary();
    if !cli.measure {
        return;
    }

    let results = Results::since(since);
    let mut table = Table::default();
    for limit in LIMITS {
        let group = format!("contended_limit{limit}");
        for threads in THREADS {
            let rate = |id: &str| {
                results
                    .median_ns(&group, &format!("{id}/{threads}"))
                    .map(|ns| 1e9 / ns)
            };
            table.rates(
                &format!("4. limit {limit}, {threads} threads, criterion (cold start per sample): throughput"),
                ("", rate("turnstile")),
                ("tokio", rate("tokio")),
                Target::AtLeast(1.0),
            );
        }
    }
    let mut extra = String::new();
    if cli.wants("steady") {
        extra += &steady_state(&mut table);
    }

    if cli.wants("handoff") {
        let h = handoffs();
        table.times(
            "5. hand-off, release → blocked waiter runs (median)",
            ("", Some(h.turnstile.median)),
            ("tokio", Some(h.tokio.median)),
            Target::OursAtMost(20_000.0),
        );
        table.times(
            "5. hand-off, async waiter (block_on) (median)",
            ("", Some(h.turnstile_async.median)),
            ("tokio", Some(h.tokio.median)),
            Target::OursAtMost(20_000.0),
        );
        table.times(
            "5. hand-off vs floor (median)",
            ("", Some(h.turnstile.median)),
            ("mutex_condvar", Some(h.floor.median)),
            Target::None,
        );
        extra += &format!(
            "\n## 5. Hand-off latency, {HANDOFF_ROUNDS} rounds\n\n\
             | contender | median | p90 | p99 |\n|---|---|---|---|\n\
             | turnstile (thread) | {} |\n| turnstile (async, block_on) | {} |\n\
             | tokio (block_on) | {} |\n| mutex_condvar | {} |\n",
            h.turnstile.cells(),
            h.turnstile_async.cells(),
            h.tokio.cells(),
            h.floor.cells()
        );
    }

    if cli.wants("prefect") {
        let p = prefect();
        let ideal = Some(IDEAL.as_secs_f64() * 1e9);
        table.times(
            "9. Prefect: limit 1, 4 threads × 50 × 10 ms hold: wall (median of 3)",
            ("", Some(p.turnstile * 1e9)),
            ("ideal", ideal),
            Target::AtMost(1.05),
        );
        table.times(
            "9. same, tokio blocking route",
            ("tokio", Some(p.tokio * 1e9)),
            ("ideal", ideal),
            Target::None,
        );
        table.times(
            "9. same, mutex_condvar",
            ("mutex_condvar", Some(p.floor * 1e9)),
            ("ideal", ideal),
            Target::None,
        );
        let (ours, governor) = prefect_rate();
        table.times(
            "9. Prefect rate_limit: limit 1, 1,000/s, 2,000 blocking calls: wall (median of 3)",
            ("", Some(ours * 1e9)),
            ("ideal", ideal),
            Target::AtMost(1.02),
        );
        table.times(
            "9. same, governor (check + sleep, Instant clock)",
            ("governor", Some(governor * 1e9)),
            ("ideal", ideal),
            Target::None,
        );
    }

    let mut text =
        table.render("turnstile contended: cases 4, 5, 9 (medians; ratios from this run)");
    text += &extra;
    println!("{text}");
    if let Some(path) = common::save("contended", &text) {
        println!("(saved to {})", path.display());
    }
}
