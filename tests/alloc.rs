//! Heap use (issue 5, case 10; issue 12 for `.await`): the uncontended
//! one-name acquire + release path allocates nothing, blocking, `try_` or
//! async, and an idle limit costs at most 256 bytes.
//!
//! Counted by a counting global allocator: the `allocation-counter`
//! dev-dependency replaces the global allocator of this test binary (a
//! `GlobalAlloc` is `unsafe` to write, and this crate allows no `unsafe`) and
//! counts per thread, so the harness and the other tests' threads never
//! disturb a measurement. Counts are of requested bytes; SQLite allocates
//! through its own `malloc` and is not counted.
//!
//! Deterministic, so these are tests: no timing is asserted.

mod common;

use std::future::{Future, IntoFuture};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use allocation_counter::{measure, AllocationInfo};
use turnstile::{LimitConfig, Limiter};

use common::{watchdog, TempDir, WATCHDOG};

/// Measured calls per path, after one warm-up call.
const ROUNDS: usize = 1000;
/// Idle limits created for the per-limit figure.
const IDLE: usize = 100_000;
/// The issue's target.
const BYTES_PER_IDLE_LIMIT: f64 = 256.0;
/// A flush interval that never elapses during a test: the writer then sweeps
/// only when asked to (`flush()`).
const NEVER: Duration = Duration::from_secs(3600);

/// The counter counts on this thread: else a zero would prove nothing.
fn assert_counting() {
    let info = measure(|| drop(black_box(Box::new(7u64))));
    assert_eq!(
        (info.count_total, info.bytes_total),
        (1, 8),
        "the counting allocator is not in place"
    );
}

/// Drives a future to completion on this thread with a waker that does
/// nothing (a future that yields to the executor has woken itself: poll it
/// again). No executor of its own, so every allocation counted is the
/// future's.
fn ready<F: IntoFuture>(fut: F) -> F::Output {
    let mut fut = pin!(fut.into_future());
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

/// Heap use of each uncontended one-name path, `ROUNDS` calls each after
/// one warm-up call: concurrency `try_acquire` and release, blocking
/// `acquire` and release, `.await` and release (a `&str` name), `rate_limit`
/// try on a bucket with room, and `rate_limit(..).await` there.
struct HotPath {
    try_acquire: AllocationInfo,
    acquire: AllocationInfo,
    await_acquire: AllocationInfo,
    rate_limit: AllocationInfo,
    await_rate_limit: AllocationInfo,
}

impl HotPath {
    fn measure(limiter: &Limiter) -> HotPath {
        limiter.create_limit("a", LimitConfig::new(1)).unwrap();
        limiter
            .create_limit("r", LimitConfig::new(u32::MAX).slot_decay_per_second(1e9))
            .unwrap();

        let try_once = || {
            let guard = limiter
                .concurrency(black_box("a"), 1)
                .try_acquire()
                .unwrap()
                .expect("free");
            drop(black_box(guard));
        };
        let acquire_once = || {
            let guard = limiter.concurrency(black_box("a"), 1).acquire().unwrap();
            drop(black_box(guard));
        };
        let await_once = || {
            let guard = ready(limiter.concurrency(black_box("a"), 1)).unwrap();
            drop(black_box(guard));
        };
        let rate_once = || {
            assert!(limiter.rate_limit(black_box("r"), 1).try_acquire().unwrap());
        };
        let await_rate_once = || {
            ready(limiter.rate_limit(black_box("r"), 1)).unwrap();
        };
        let rounds = |once: &dyn Fn()| {
            once();
            measure(|| (0..ROUNDS).for_each(|_| once()))
        };
        let hot = HotPath {
            try_acquire: rounds(&try_once),
            acquire: rounds(&acquire_once),
            await_acquire: rounds(&await_once),
            rate_limit: rounds(&rate_once),
            await_rate_limit: rounds(&await_rate_once),
        };
        let info = limiter.limit("a").unwrap();
        assert_eq!((info.held_slots, info.waiters), (0, 0));
        hot
    }

    fn assert_none(&self, what: &str) {
        let counts = [
            ("try_acquire + drop", self.try_acquire),
            ("acquire + drop", self.acquire),
            (".await + drop", self.await_acquire),
            ("rate_limit try", self.rate_limit),
            ("rate_limit .await", self.await_rate_limit),
        ];
        let report: Vec<String> = counts
            .iter()
            .map(|(path, i)| {
                format!(
                    "{path}: {} allocations, {} bytes in {ROUNDS} calls",
                    i.count_total, i.bytes_total
                )
            })
            .collect();
        assert!(
            counts.iter().all(|(_, i)| i.count_total == 0),
            "{what}: the hot path allocates: {report:?}"
        );
    }
}

#[test]
fn the_uncontended_hot_path_does_not_allocate_in_memory() {
    watchdog(WATCHDOG, || {
        assert_counting();
        let limiter = Limiter::in_memory();
        HotPath::measure(&limiter).assert_none("in memory");
    });
}

#[test]
fn the_uncontended_hot_path_does_not_allocate_with_a_store() {
    watchdog(WATCHDOG, || {
        assert_counting();
        let dir = TempDir::new("alloc");
        let limiter = Limiter::builder()
            .path(dir.path("hot.db"))
            .flush_interval(NEVER)
            .build()
            .unwrap();
        HotPath::measure(&limiter).assert_none("with a store, between sweeps");
    });
}

/// What the async paths that are not the one-`&str`-name case cost, for the
/// record (only the one-name case is promised to allocate nothing): a
/// `String` name is the caller's allocation (the future keeps no copy of
/// it); several names, or a future that must wait, own their names.
#[test]
fn what_other_async_acquisitions_allocate() {
    watchdog(WATCHDOG, || {
        assert_counting();
        let limiter = Limiter::in_memory();
        for name in ["a", "b"] {
            limiter.create_limit(name, LimitConfig::new(1)).unwrap();
        }
        let per_call = |once: &dyn Fn()| {
            once();
            let info = measure(|| (0..ROUNDS).for_each(|_| once()));
            (
                info.count_total as f64 / ROUNDS as f64,
                info.bytes_total as f64 / ROUNDS as f64,
            )
        };
        let string_name = per_call(&|| {
            drop(black_box(
                ready(limiter.concurrency(black_box("a".to_string()), 1)).unwrap(),
            ));
        });
        let string_made = per_call(&|| drop(black_box(black_box("a").to_string())));
        let two_names = per_call(&|| {
            drop(black_box(
                ready(limiter.concurrency(black_box(["a", "b"]), 1)).unwrap(),
            ));
        });
        println!(
            ".await + drop, per call: a String name {:.1} allocations / {:.1} B \
             (making the String alone: {:.1} / {:.1} B); two &str names {:.1} / {:.1} B",
            string_name.0, string_name.1, string_made.0, string_made.1, two_names.0, two_names.1
        );
        assert_eq!(
            string_name, string_made,
            "a String name costs the future nothing beyond the String itself"
        );
        let info = limiter.limit("a").unwrap();
        assert_eq!((info.held_slots, info.waiters), (0, 0));
    });
}

/// The writer's sweep takes the list of changed limits; the first change
/// after it must not have to allocate a new list.
#[test]
fn the_first_acquisition_after_a_store_sweep_does_not_allocate() {
    watchdog(WATCHDOG, || {
        assert_counting();
        let dir = TempDir::new("alloc");
        let limiter = Limiter::builder()
            .path(dir.path("sweep.db"))
            .flush_interval(NEVER)
            .build()
            .unwrap();
        limiter.create_limit("a", LimitConfig::new(1)).unwrap();
        let once = || {
            let guard = limiter
                .concurrency(black_box("a"), 1)
                .try_acquire()
                .unwrap()
                .expect("free");
            drop(black_box(guard));
        };
        once();
        let mut total = AllocationInfo::default();
        for _ in 0..20 {
            limiter.flush().unwrap();
            total += measure(once);
        }
        assert_eq!(
            total.count_total, 0,
            "20 acquisitions, each right after a sweep: {total:?}"
        );
    });
}

// ---------------------------------------------------------------------------
// Memory per idle limit
// ---------------------------------------------------------------------------

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("limit-{i:07}")).collect()
}

/// Live bytes (and allocations) per limit that `create` leaves behind.
fn per_limit(n: usize, create: impl FnOnce()) -> (f64, f64, AllocationInfo) {
    let info = measure(create);
    (
        info.bytes_current as f64 / n as f64,
        info.count_current as f64 / n as f64,
        info,
    )
}

#[test]
fn an_idle_limit_costs_at_most_256_bytes_in_memory() {
    watchdog(WATCHDOG, || {
        assert_counting();
        let names = names(IDLE);
        let limiter = Limiter::in_memory();
        let (bytes, allocs, info) = per_limit(IDLE, || {
            for name in &names {
                limiter.create_limit(name, LimitConfig::new(8)).unwrap();
            }
        });
        assert_eq!(limiter.limits().len(), IDLE);
        println!(
            "in memory: {IDLE} idle limits ({}-byte names): {bytes:.1} B/limit live, \
             {allocs:.2} allocations/limit live, peak {:.1} B/limit",
            names[0].len(),
            info.bytes_max as f64 / IDLE as f64
        );
        assert!(
            bytes <= BYTES_PER_IDLE_LIMIT,
            "{bytes:.1} B per idle limit (target {BYTES_PER_IDLE_LIMIT}): {info:?}"
        );
        // Not vacuous: each limit keeps at least its name.
        assert!(bytes >= names[0].len() as f64);
    });
}

/// The store keeps no second copy of the names: what it needs to tell other
/// processes' edits apart lives in the registry's limits.
#[test]
fn an_idle_limit_costs_at_most_256_bytes_with_a_store() {
    watchdog(WATCHDOG * 4, || {
        assert_counting();
        let dir = TempDir::new("alloc");
        let path = dir.path("idle.db");
        let names = names(IDLE);
        let limiter = Limiter::builder()
            .path(&path)
            .flush_interval(NEVER)
            .build()
            .unwrap();
        let (created, created_allocs, info) = per_limit(IDLE, || {
            for name in &names {
                limiter.create_limit(name, LimitConfig::new(8)).unwrap();
            }
        });
        drop(limiter);

        // The same limits loaded back by open.
        let mut reopened = None;
        let (opened, opened_allocs, _) = per_limit(IDLE, || {
            reopened = Some(Limiter::open(&path).unwrap());
        });
        assert_eq!(reopened.expect("opened").limits().len(), IDLE);
        println!(
            "with a store (Rust heap only; SQLite's own cache not counted): {IDLE} idle limits: \
             created {created:.1} B/limit ({created_allocs:.2} allocations/limit), \
             reopened {opened:.1} B/limit ({opened_allocs:.2} allocations/limit); {info:?}"
        );
        for (what, bytes) in [("created", created), ("reopened", opened)] {
            assert!(
                bytes <= BYTES_PER_IDLE_LIMIT,
                "{what}: {bytes:.1} B per idle limit (target {BYTES_PER_IDLE_LIMIT})"
            );
            assert!(bytes >= names[0].len() as f64);
        }
    });
}
