//! The uncontended hot path (cases 1, 3, 6 and 7), turnstile beside
//! `tokio::sync::Semaphore` (try, blocking through
//! `futures::executor::block_on`, async), `governor` (direct limiter, Instant
//! clock and default clock) and a plain `parking_lot::Mutex` + `Condvar`
//! semaphore (the floor), in the same criterion groups.
//!
//! Every measured iteration is one acquisition and its release. After the
//! groups, the binary reads criterion's medians back and prints a summary
//! table of ratios against the issue's targets (also saved as
//! `target/criterion/turnstile-summary-acquire.md`).

mod common;

use std::cell::OnceCell;
use std::future::{Future, IntoFuture};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::task::Context;
use std::time::{Duration, Instant, SystemTime};

use criterion::{BenchmarkId, Criterion, SamplingMode};
use futures::executor::block_on;
use futures::task::noop_waker;
use governor::clock::MonotonicClock;
use governor::{Quota, RateLimiter};
use tokio::sync::Semaphore;
use turnstile::{LimitConfig, Limiter};

use common::{fmt_ns, Cli, CondvarSemaphore, Results, Table, Target};

/// A limiter with one limit "a" of `limit` slots.
fn limiter_with(limit: u32) -> Limiter {
    let limiter = Limiter::in_memory();
    limiter.create_limit("a", LimitConfig::new(limit)).unwrap();
    limiter
}

fn assert_idle(limiter: &Limiter, name: &str) {
    let info = limiter.limit(name).unwrap();
    assert_eq!((info.held_slots, info.waiters), (0, 0), "{name}");
}

// ---------------------------------------------------------------------------
// Case 1: uncontended, one name
// ---------------------------------------------------------------------------

fn uncontended(c: &mut Criterion) {
    let limiter = limiter_with(1);
    let sem = Semaphore::new(1);
    let floor = CondvarSemaphore::new(1);

    let mut group = c.benchmark_group("uncontended_try");
    group.bench_function("turnstile", |b| {
        b.iter(|| {
            let guard = limiter
                .concurrency(black_box("a"), 1)
                .try_acquire()
                .unwrap()
                .expect("free");
            black_box(guard.release())
        })
    });
    group.bench_function("tokio", |b| {
        b.iter(|| {
            let permit = sem.try_acquire().expect("free");
            drop(black_box(permit));
        })
    });
    group.bench_function("mutex_condvar", |b| {
        b.iter(|| {
            let permit = floor.try_acquire().expect("free");
            drop(black_box(permit));
        })
    });
    group.finish();

    let mut group = c.benchmark_group("uncontended_blocking");
    group.bench_function("turnstile", |b| {
        b.iter(|| {
            let guard = limiter.concurrency(black_box("a"), 1).acquire().unwrap();
            black_box(guard.release())
        })
    });
    group.bench_function("tokio", |b| {
        b.iter(|| {
            let permit = block_on(sem.acquire()).unwrap();
            drop(black_box(permit));
        })
    });
    group.bench_function("mutex_condvar", |b| {
        b.iter(|| {
            let permit = floor.acquire();
            drop(black_box(permit));
        })
    });
    group.finish();

    // The async route: a loop of `.await`s inside one task.
    let mut group = c.benchmark_group("uncontended_async");
    group.bench_function("turnstile", |b| {
        b.iter_custom(|iters| {
            block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let guard = limiter.concurrency(black_box("a"), 1).await.unwrap();
                    black_box(guard.release());
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("tokio", |b| {
        b.iter_custom(|iters| {
            block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let permit = sem.acquire().await.unwrap();
                    drop(black_box(permit));
                }
                start.elapsed()
            })
        })
    });
    group.finish();

    assert_idle(&limiter, "a");
    assert_eq!(sem.available_permits(), 1);
}

// ---------------------------------------------------------------------------
// Case 3: four names, all-or-nothing
// ---------------------------------------------------------------------------

const FOUR: [&str; 4] = ["a", "b", "c", "d"];

fn all_or_nothing(c: &mut Criterion) {
    let limiter = Limiter::in_memory();
    for name in FOUR {
        limiter.create_limit(name, LimitConfig::new(1)).unwrap();
    }
    let sems: Vec<Semaphore> = (0..4).map(|_| Semaphore::new(1)).collect();

    let mut group = c.benchmark_group("all_or_nothing");
    group.bench_function(BenchmarkId::new("turnstile_try", 1), |b| {
        b.iter(|| {
            let guard = limiter
                .concurrency(black_box("a"), 1)
                .try_acquire()
                .unwrap()
                .expect("free");
            black_box(guard.release())
        })
    });
    group.bench_function(BenchmarkId::new("turnstile_try", 4), |b| {
        b.iter(|| {
            let guard = limiter
                .concurrency(black_box(FOUR), 1)
                .try_acquire()
                .unwrap()
                .expect("free");
            black_box(guard.release())
        })
    });
    group.bench_function(BenchmarkId::new("turnstile_blocking", 1), |b| {
        b.iter(|| {
            let guard = limiter.concurrency(black_box("a"), 1).acquire().unwrap();
            black_box(guard.release())
        })
    });
    group.bench_function(BenchmarkId::new("turnstile_blocking", 4), |b| {
        b.iter(|| {
            let guard = limiter.concurrency(black_box(FOUR), 1).acquire().unwrap();
            black_box(guard.release())
        })
    });
    // Not all-or-nothing: four try_acquires one after the other, for scale.
    group.bench_function(BenchmarkId::new("tokio_try_each", 4), |b| {
        b.iter(|| {
            let permits: [_; 4] = std::array::from_fn(|i| sems[i].try_acquire().expect("free"));
            drop(black_box(permits));
        })
    });
    group.finish();

    for name in FOUR {
        assert_idle(&limiter, name);
    }
}

// ---------------------------------------------------------------------------
// Case 6: rate_limit try on a bucket with room
// ---------------------------------------------------------------------------

fn rate_limit_try(c: &mut Criterion) {
    // Room for ever: a huge bucket draining a billion slots a second.
    let limiter = Limiter::in_memory();
    limiter
        .create_limit("r", LimitConfig::new(u32::MAX).slot_decay_per_second(1e9))
        .unwrap();
    let billion = NonZeroU32::new(1_000_000_000).unwrap();
    let governor_instant =
        RateLimiter::direct_with_clock(Quota::per_second(billion), &MonotonicClock);
    let governor_default = RateLimiter::direct(Quota::per_second(billion));

    let mut group = c.benchmark_group("rate_limit_try");
    group.bench_function("turnstile", |b| {
        b.iter(|| assert!(limiter.rate_limit(black_box("r"), 1).try_acquire().unwrap()))
    });
    group.bench_function("governor_instant", |b| {
        b.iter(|| assert!(black_box(governor_instant.check()).is_ok()))
    });
    group.bench_function("governor_default", |b| {
        b.iter(|| assert!(black_box(governor_default.check()).is_ok()))
    });
    group.finish();
}

// ---------------------------------------------------------------------------
// Case 7: scaling with the number of limits and of blocked waiters
// ---------------------------------------------------------------------------

const REGISTERED: [usize; 3] = [10, 10_000, 1_000_000];
/// How many distinct names the "spread" variant cycles through.
const SPREAD: usize = 1024;

fn name_of(i: usize) -> String {
    format!("limit-{i:07}")
}

/// A limiter with `n` limits, the time it took to create them, the hot name
/// and the spread names.
struct Registered {
    limiter: Limiter,
    created_in: Duration,
    hot: String,
    spread: Vec<String>,
}

impl Registered {
    fn new(n: usize) -> Self {
        let limiter = Limiter::in_memory();
        let start = Instant::now();
        for i in 0..n {
            limiter
                .create_limit(&name_of(i), LimitConfig::new(8))
                .unwrap();
        }
        let created_in = start.elapsed();
        assert_eq!(limiter.limits().len(), n);
        // Names spread evenly over the registry, so that lookups miss the cache.
        let spread = (0..SPREAD.min(n))
            .map(|k| name_of(k * n / SPREAD.min(n)))
            .collect();
        Registered {
            limiter,
            created_in,
            hot: name_of(7),
            spread,
        }
    }
}

fn scaling_limits(c: &mut Criterion) -> Vec<(usize, Duration)> {
    let mut setup = Vec::new();
    let mut group = c.benchmark_group("scaling_limits");
    for n in REGISTERED {
        // Built on first use only, so that a filtered run skips it.
        let registered = OnceCell::new();
        let get = || registered.get_or_init(|| Registered::new(n));
        group.bench_with_input(BenchmarkId::new("turnstile", n), &n, |b, _| {
            let r = get();
            b.iter(|| {
                let guard = r
                    .limiter
                    .concurrency(r.hot.as_str(), 1)
                    .try_acquire()
                    .unwrap()
                    .expect("free");
                black_box(guard.release())
            })
        });
        group.bench_with_input(BenchmarkId::new("turnstile_spread", n), &n, |b, _| {
            let r = get();
            let mut k = 0usize;
            b.iter(|| {
                let name = &r.spread[k % r.spread.len()];
                k = k.wrapping_add(1);
                let guard = r
                    .limiter
                    .concurrency(name.as_str(), 1)
                    .try_acquire()
                    .unwrap()
                    .expect("free");
                black_box(guard.release())
            })
        });
        if let Some(r) = registered.get() {
            assert_idle(&r.limiter, &r.hot);
            setup.push((n, r.created_in));
        }
    }
    group.finish();
    setup
}

/// Guards released per setup in the "same limit" cases (their setup queues
/// the waiters anew each time).
const CHUNK: u64 = 20_000;

/// `iters` releases of one slot each on a limit with `waiters` queued
/// waiters, none of which can proceed: each wants the whole limit while a
/// permanent guard holds one slot. Only the releases are timed.
fn turnstile_release_same_limit(waiters: usize, iters: u64) -> Duration {
    let waker = noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        left -= n;
        let cap = u32::try_from(n).unwrap() + 1;
        let limiter = limiter_with(cap);
        let permanent = limiter
            .concurrency("a", 1)
            .try_acquire()
            .unwrap()
            .expect("room");
        let guards: Vec<_> = (0..n)
            .map(|_| {
                limiter
                    .concurrency("a", 1)
                    .try_acquire()
                    .unwrap()
                    .expect("room")
            })
            .collect();
        let mut pending: Vec<_> = (0..waiters)
            .map(|_| Box::pin(limiter.concurrency("a", cap).into_future()))
            .collect();
        for f in &mut pending {
            assert!(f.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(limiter.limit("a").unwrap().waiters, waiters);

        let start = Instant::now();
        for guard in guards {
            black_box(guard.release());
        }
        total += start.elapsed();

        let info = limiter.limit("a").unwrap();
        assert_eq!(
            (info.held_slots, info.waiters),
            (1, waiters),
            "nobody proceeded"
        );
        drop(pending);
        drop(permanent);
        assert_idle(&limiter, "a");
    }
    total
}

/// The same with tokio: `waiters` pending `acquire_many(all)` futures.
fn tokio_release_same_limit(waiters: usize, iters: u64) -> Duration {
    let waker = noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        left -= n;
        let cap = u32::try_from(n).unwrap() + 1;
        let sem = Semaphore::new(cap as usize);
        let permanent = sem.try_acquire().expect("room");
        let permits: Vec<_> = (0..n).map(|_| sem.try_acquire().expect("room")).collect();
        let mut pending: Vec<Pin<Box<_>>> = (0..waiters)
            .map(|_| Box::pin(sem.acquire_many(cap)))
            .collect();
        for f in &mut pending {
            assert!(f.as_mut().poll(&mut cx).is_pending());
        }

        let start = Instant::now();
        for permit in permits {
            drop(black_box(permit));
        }
        total += start.elapsed();

        assert_eq!(sem.available_permits(), 0, "nobody proceeded");
        for f in &mut pending {
            assert!(f.as_mut().poll(&mut cx).is_pending());
        }
        drop(pending);
        drop(permanent);
        assert_eq!(sem.available_permits(), cap as usize);
    }
    total
}

fn release_with_waiters(c: &mut Criterion) {
    let mut group = c.benchmark_group("release_with_waiters");
    group.sampling_mode(SamplingMode::Flat);
    for waiters in [1usize, 1000] {
        group.bench_with_input(
            BenchmarkId::new("turnstile_same_limit", waiters),
            &waiters,
            |b, &w| b.iter_custom(|iters| turnstile_release_same_limit(w, iters)),
        );
        group.bench_with_input(
            BenchmarkId::new("tokio_same_limit", waiters),
            &waiters,
            |b, &w| b.iter_custom(|iters| tokio_release_same_limit(w, iters)),
        );

        // Waiters on ["a", "b"] held back by "b" (full), reserving one slot
        // each on "a"; "a" has room for newcomers beyond them. The measured
        // op is a newcomer's try_acquire + release on "a": each release
        // pumps "a"'s queue, where nobody can proceed.
        let limiter = Limiter::in_memory();
        let cap = u32::try_from(waiters).unwrap() + 16;
        limiter.create_limit("a", LimitConfig::new(cap)).unwrap();
        limiter.create_limit("b", LimitConfig::new(1)).unwrap();
        let full = limiter
            .concurrency("b", 1)
            .try_acquire()
            .unwrap()
            .expect("room");
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut pending: Vec<_> = (0..waiters)
            .map(|_| Box::pin(limiter.concurrency(["a", "b"], 1).into_future()))
            .collect();
        for f in &mut pending {
            assert!(f.as_mut().poll(&mut cx).is_pending());
        }
        group.bench_with_input(
            BenchmarkId::new("turnstile_other_limit", waiters),
            &waiters,
            |b, _| {
                b.iter(|| {
                    let guard = limiter
                        .concurrency(black_box("a"), 1)
                        .try_acquire()
                        .unwrap()
                        .expect("room");
                    black_box(guard.release())
                })
            },
        );
        let info = limiter.limit("a").unwrap();
        assert_eq!(
            (info.held_slots, info.waiters),
            (0, waiters),
            "nobody proceeded"
        );
        drop(pending);
        drop(full);
        assert_idle(&limiter, "a");
    }
    group.finish();
}

// ---------------------------------------------------------------------------

fn main() {
    let since = SystemTime::now();
    let cli = Cli::parse();
    let mut c = common::criterion();
    uncontended(&mut c);
    all_or_nothing(&mut c);
    rate_limit_try(&mut c);
    let setup = scaling_limits(&mut c);
    release_with_waiters(&mut c);
    c.final_summary();
    if !cli.measure {
        return;
    }

    let r = Results::since(since);
    let m = |group: &str, id: &str| r.median_ns(group, id);
    let mut t = Table::default();
    let ours = |group: &str, id: &str| ("", m(group, id));

    t.times(
        "1. try_acquire + release vs tokio try_acquire + drop",
        ours("uncontended_try", "turnstile"),
        ("tokio", m("uncontended_try", "tokio")),
        Target::AtMost(2.0),
    );
    t.times(
        "1. blocking acquire + release vs tokio block_on(acquire) + drop",
        ours("uncontended_blocking", "turnstile"),
        ("tokio", m("uncontended_blocking", "tokio")),
        Target::AtMost(1.0),
    );
    t.times(
        "1. async .await + release vs tokio acquire().await + drop",
        ours("uncontended_async", "turnstile"),
        ("tokio", m("uncontended_async", "tokio")),
        Target::None,
    );
    t.times(
        "1. async .await + release vs blocking acquire + release",
        ("async", m("uncontended_async", "turnstile")),
        ("blocking", m("uncontended_blocking", "turnstile")),
        Target::AtMost(1.2),
    );
    t.times(
        "1. try_acquire + release vs floor",
        ours("uncontended_try", "turnstile"),
        ("mutex_condvar", m("uncontended_try", "mutex_condvar")),
        Target::None,
    );
    t.times(
        "1. blocking acquire + release vs floor",
        ours("uncontended_blocking", "turnstile"),
        ("mutex_condvar", m("uncontended_blocking", "mutex_condvar")),
        Target::None,
    );
    t.times(
        "3. four names, try_acquire: 4 names vs 1 name",
        ("4 names", m("all_or_nothing", "turnstile_try/4")),
        ("1 name", m("all_or_nothing", "turnstile_try/1")),
        Target::AtMost(4.0),
    );
    t.times(
        "3. four names, blocking acquire: 4 names vs 1 name",
        ("4 names", m("all_or_nothing", "turnstile_blocking/4")),
        ("1 name", m("all_or_nothing", "turnstile_blocking/1")),
        Target::AtMost(4.0),
    );
    t.times(
        "3. four names try vs tokio 4 × try_acquire (not atomic)",
        ("4 names", m("all_or_nothing", "turnstile_try/4")),
        ("tokio", m("all_or_nothing", "tokio_try_each/4")),
        Target::None,
    );
    t.times(
        "6. rate_limit try (room) vs governor check(), Instant clock",
        ours("rate_limit_try", "turnstile"),
        ("governor", m("rate_limit_try", "governor_instant")),
        Target::AtMost(2.0),
    );
    t.times(
        "6. rate_limit try (room) vs governor check(), default clock",
        ours("rate_limit_try", "turnstile"),
        ("governor", m("rate_limit_try", "governor_default")),
        Target::None,
    );
    t.times(
        "7. try_acquire + release, one name: 10⁶ vs 10 limits",
        ("10⁶", m("scaling_limits", "turnstile/1000000")),
        ("10", m("scaling_limits", "turnstile/10")),
        Target::AtMost(1.5),
    );
    t.times(
        "7. try_acquire + release, one name: 10⁴ vs 10 limits",
        ("10⁴", m("scaling_limits", "turnstile/10000")),
        ("10", m("scaling_limits", "turnstile/10")),
        Target::None,
    );
    t.times(
        "7. same, names spread over the registry: 10⁶ vs 10",
        ("10⁶", m("scaling_limits", "turnstile_spread/1000000")),
        ("10", m("scaling_limits", "turnstile_spread/10")),
        Target::None,
    );
    t.times(
        "7. release, 1,000 vs 1 waiters that cannot proceed (same limit)",
        (
            "1000",
            m("release_with_waiters", "turnstile_same_limit/1000"),
        ),
        ("1", m("release_with_waiters", "turnstile_same_limit/1")),
        Target::AtMost(2.0),
    );
    t.times(
        "7. same, tokio (acquire_many waiters): 1,000 vs 1",
        ("1000", m("release_with_waiters", "tokio_same_limit/1000")),
        ("1", m("release_with_waiters", "tokio_same_limit/1")),
        Target::None,
    );
    t.times(
        "7. try_acquire + release, 1,000 vs 1 waiters held back by another limit",
        (
            "1000",
            m("release_with_waiters", "turnstile_other_limit/1000"),
        ),
        ("1", m("release_with_waiters", "turnstile_other_limit/1")),
        Target::AtMost(2.0),
    );

    let mut text = t.render(
        "turnstile uncontended: cases 1, 3, 6, 7 (criterion medians; ratios from this run)",
    );
    text += "\nSetup, creating the limits of case 7: ";
    text += &setup
        .iter()
        .map(|(n, d)| {
            format!(
                "{n} in {} ({} each)",
                fmt_ns(d.as_nanos() as f64),
                fmt_ns(d.as_nanos() as f64 / *n as f64)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    text.push('\n');
    println!("{text}");
    if let Some(path) = common::save("acquire", &text) {
        println!("(saved to {})", path.display());
    }
}
