//! Model checking of the waiter queue and the grants with shuttle: 2–3
//! threads, 2 limits, acquire / release / timeout / cancel / update / try.
//!
//! Built only with the `model` feature, which puts the engine's lock, thread
//! parking and timer under shuttle's control (see `src/sync.rs`):
//!
//! ```text
//! cargo test --release --features model --test model_check -- --nocapture
//! ```
//!
//! Every scenario runs under shuttle's PCT and random schedulers
//! (`TURNSTILE_MODEL_ITERATIONS` schedules each; by default 100,000 in release
//! builds and 2,000 in debug builds; `TURNSTILE_MODEL_SEED` fixes the seeds,
//! otherwise they are random and printed). Each execution checks that:
//!
//! * no limit ever admits more than it may: a shadow count of the slots the
//!   test's threads hold, raised after a guard is had and lowered before it
//!   is dropped, never exceeds the limit, nor does the engine's `held_slots`;
//! * nothing deadlocks or loses a wake-up: a thread parked forever is
//!   reported by shuttle as a deadlock (waits without a timeout park until
//!   unparked; waits with one are woken at points of shuttle's choosing);
//! * every slot comes back and no waiter is left: at the end, every limit
//!   has 0 held and active slots and an empty queue, and the limiter's
//!   waiter table is empty.
//!
//! A failing execution prints a schedule that `shuttle::replay` replays
//! (exactly for scenarios without timeouts; those with timeouts also depend
//! on the real clock).
#![cfg(feature = "model")]

mod common;

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::pin::pin;
use std::sync::{Arc, Mutex as StdMutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use shuttle::rand::{thread_rng, Rng};
use shuttle::scheduler::{PctScheduler, RandomScheduler, Scheduler};
use shuttle::sync::Mutex;
use shuttle::thread;
use shuttle::{Config, Runner};

use common::watchdog;
use turnstile::{ConcurrencyGuard, Error, Event, LimitConfig, LimitUpdate, Limiter};

/// Bound on one scenario, both schedulers: generous, only a hang trips it.
const WATCHDOG: Duration = Duration::from_secs(600);

/// Schedules per scheduler and scenario unless `TURNSTILE_MODEL_ITERATIONS`
/// says otherwise: as many as CI affords in release builds (about 20 µs an
/// execution), fewer in debug builds (about 25 times slower).
const ITERATIONS: usize = if cfg!(debug_assertions) {
    2_000
} else {
    100_000
};

/// A timeout short enough that the real clock passes it within a few
/// scheduling points, so that both "granted first" and "timed out first" are
/// explored.
const SHORT: Duration = Duration::from_micros(20);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `scenario` under PCT (depth 3) and random scheduling, checking each
/// execution; reports the schedules explored and the time taken.
fn check(name: &'static str, scenario: fn()) {
    watchdog(WATCHDOG, move || {
        let iterations = env_or("TURNSTILE_MODEL_ITERATIONS", ITERATIONS);
        let seed = env_or("TURNSTILE_MODEL_SEED", rand_seed());
        let config = Config::new();
        let (pct, pct_time) = run(
            PctScheduler::new_from_seed(seed, 3, iterations),
            &config,
            scenario,
        );
        let (random, random_time) = run(
            RandomScheduler::new_from_seed(seed, iterations),
            &config,
            scenario,
        );
        eprintln!(
            "model {name}: {pct} PCT schedules in {pct_time:.2?}, \
             {random} random schedules in {random_time:.2?} (seed {seed}); outcomes {:?}",
            outcomes(name)
        );
        assert_eq!((pct, random), (iterations, iterations), "schedules run");
    });
}

/// How often each outcome of a scenario occurred, over all its executions:
/// evidence that the schedules reached both sides of each race.
static OUTCOMES: StdMutex<BTreeMap<(&str, &str), u64>> = StdMutex::new(BTreeMap::new());

fn seen(scenario: &'static str, outcome: &'static str) {
    *OUTCOMES
        .lock()
        .unwrap()
        .entry((scenario, outcome))
        .or_default() += 1;
}

fn outcomes(scenario: &str) -> Vec<(&'static str, u64)> {
    let outcomes = OUTCOMES.lock().unwrap();
    outcomes
        .iter()
        .filter(|((s, _), _)| *s == scenario)
        .map(|((_, o), n)| (*o, *n))
        .collect()
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

/// Runs every execution `scheduler` asks for; returns how many, and the time.
fn run(scheduler: impl Scheduler + 'static, config: &Config, scenario: fn()) -> (usize, Duration) {
    let start = Instant::now();
    let n = Runner::new(scheduler, config.clone()).run(scenario);
    (n, start.elapsed())
}

/// The limiter of one execution, the most each limit may ever admit, and the
/// shadow count of what the test's threads hold.
#[derive(Clone)]
struct World {
    limiter: Limiter,
    names: &'static [&'static str],
    bound: &'static [u32],
    shadow: Arc<Mutex<Vec<u32>>>,
}

impl World {
    fn new(
        scenario: &'static str,
        limits: &'static [&'static str],
        configs: &[u32],
        bound: &'static [u32],
    ) -> World {
        // Counts the acquisitions that had to queue: evidence of contention.
        let limiter = Limiter::builder()
            .on_event(move |e| {
                if let Event::Acquired { waited, .. } = e {
                    seen(
                        scenario,
                        if waited.is_zero() {
                            "at once"
                        } else {
                            "queued"
                        },
                    );
                }
            })
            .build()
            .expect("in memory");
        World::with(limiter, limits, configs, bound)
    }

    /// A world without an observer: one-name acquisitions and releases of
    /// simple limits then take the lock-free path (an observer turns it off).
    fn lock_free(limits: &'static [&'static str], configs: &[u32], bound: &'static [u32]) -> World {
        World::with(Limiter::in_memory(), limits, configs, bound)
    }

    fn with(
        limiter: Limiter,
        limits: &'static [&'static str],
        configs: &[u32],
        bound: &'static [u32],
    ) -> World {
        for (name, limit) in limits.iter().zip(configs) {
            limiter
                .create_limit(name, LimitConfig::new(*limit))
                .expect("create");
        }
        World {
            limiter,
            names: limits,
            bound,
            shadow: Arc::new(Mutex::new(vec![0; limits.len()])),
        }
    }

    fn index(&self, name: &str) -> usize {
        self.names.iter().position(|n| *n == name).expect("known")
    }

    /// Counts a guard in; checks the shadow and the engine's figures.
    fn enter(&self, names: &[&str], occupy: u32) {
        let mut shadow = self.shadow.lock().unwrap();
        for name in names {
            let i = self.index(name);
            shadow[i] += occupy;
            assert!(
                shadow[i] <= self.bound[i],
                "{name}: {} slots held, at most {} allowed",
                shadow[i],
                self.bound[i]
            );
        }
        drop(shadow);
        for name in names {
            let info = self.limiter.limit(name).expect("exists");
            let i = self.index(name);
            assert!(info.held_slots >= occupy, "{name}: {info:?} misses ours");
            assert!(info.held_slots <= self.bound[i], "{name}: {info:?}");
        }
    }

    fn leave(&self, names: &[&str], occupy: u32) {
        let mut shadow = self.shadow.lock().unwrap();
        for name in names {
            shadow[self.index(name)] -= occupy;
        }
    }

    /// Holds a guard across a scheduling point, then drops it.
    fn hold(&self, names: &[&str], guard: ConcurrencyGuard) {
        let occupy = guard.occupy();
        self.enter(names, occupy);
        thread::yield_now();
        self.leave(names, occupy);
        drop(guard);
    }

    /// Takes `names` (free at the start of a scenario) and counts them in.
    fn grab(&self, names: &[&str], occupy: u32) -> ConcurrencyGuard {
        let guard = self
            .limiter
            .concurrency(names, occupy)
            .try_acquire()
            .expect("try")
            .expect("free at the start");
        self.enter(names, occupy);
        guard
    }

    /// Counts a guard of `grab` out and drops it.
    fn give(&self, names: &[&str], guard: ConcurrencyGuard) {
        self.leave(names, guard.occupy());
        drop(guard);
    }

    /// Blocks for `names`, holds them a moment and gives them back.
    fn use_once(&self, names: &[&str], occupy: u32) {
        let guard = self
            .limiter
            .concurrency(names, occupy)
            .acquire()
            .expect("acquire");
        self.hold(names, guard);
    }

    /// After every thread has finished: all slots back, nobody waiting.
    fn settled(&self) {
        for name in self.names {
            let info = self.limiter.limit(name).expect("exists");
            assert_eq!(
                (info.held_slots, info.active_slots, info.waiters),
                (0, 0, 0),
                "{name} after the run: {info:?}"
            );
        }
        assert_eq!(*self.shadow.lock().unwrap(), vec![0; self.names.len()]);
        let debug = format!("{:?}", self.limiter);
        assert!(debug.contains("waiters: 0"), "waiter table: {debug}");
    }
}

fn spawn(world: &World, body: impl FnOnce(World) + Send + 'static) -> thread::JoinHandle<()> {
    let world = world.clone();
    thread::spawn(move || body(world))
}

fn join_all(handles: Vec<thread::JoinHandle<()>>) {
    for h in handles {
        h.join().expect("a model thread panicked");
    }
}

/// Polls a future once with a waker that does nothing.
fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    std::pin::Pin::new(fut).poll(&mut Context::from_waker(Waker::noop()))
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// Two limits taken in opposite orders by two threads while a third takes
/// them one by one: all-or-nothing never deadlocks nor over-admits.
fn cross_order() {
    let w = World::new("cross_order", &["a", "b"], &[1, 1], &[1, 1]);
    let h = vec![
        spawn(&w, |w| {
            for _ in 0..2 {
                w.use_once(&["a", "b"], 1);
            }
        }),
        spawn(&w, |w| {
            for _ in 0..2 {
                w.use_once(&["b", "a"], 1);
            }
        }),
    ];
    w.use_once(&["a"], 1);
    w.use_once(&["b"], 1);
    join_all(h);
    w.settled();
}

/// Weighted acquisitions whose sum exceeds the limits, over one and two
/// limits.
fn weighted() {
    let w = World::new("weighted", &["a", "b"], &[3, 2], &[3, 2]);
    let h = vec![
        spawn(&w, |w| w.use_once(&["a", "b"], 2)),
        spawn(&w, |w| {
            w.use_once(&["a"], 2);
            w.use_once(&["a"], 3);
        }),
    ];
    w.use_once(&["b", "a"], 1);
    w.use_once(&["b"], 2);
    join_all(h);
    w.settled();
}

/// An async acquisition of two limits, polled once with a waker that does
/// nothing, then either dropped around the instant it is granted (before,
/// during or after the release that grants it) or driven to the end with
/// another waker: nothing leaks, the new waker is the one woken, and a
/// blocked thread queued behind it on both limits gets through.
fn cancel_at_grant() {
    let w = World::new("cancel_at_grant", &["a", "b"], &[1, 1], &[1, 1]);
    let held = w.grab(&["a"], 1);
    let h = vec![
        spawn(&w, |w| {
            let mut fut = pin!(w.limiter.concurrency(["a", "b"], 1).into_future());
            if let Poll::Ready(guard) = poll_once(&mut fut) {
                seen("cancel_at_grant", "ready at once");
                return w.hold(&["a", "b"], guard.expect("no error"));
            }
            thread::yield_now();
            if thread_rng().gen::<bool>() {
                // Cancelled: queued, or granted and not yet seen.
                seen("cancel_at_grant", "cancelled");
                return;
            }
            let guard = shuttle::future::block_on(fut).expect("no error");
            seen("cancel_at_grant", "ready with a new waker");
            w.hold(&["a", "b"], guard);
        }),
        spawn(&w, |w| {
            w.use_once(&["b"], 1);
            w.use_once(&["a", "b"], 1);
        }),
    ];
    thread::yield_now();
    w.give(&["a"], held);
    join_all(h);
    w.settled();
}

/// Blocking and async timeouts racing the grants that would let them in,
/// with a waiter without a timeout queued behind them on `b`: a timed-out
/// waiter must hand its reservation on.
fn timeouts() {
    let w = World::new("timeouts", &["a", "b"], &[1, 1], &[1, 1]);
    let held = w.grab(&["a"], 1);
    let h = vec![
        spawn(&w, |w| {
            match w
                .limiter
                .concurrency(["a", "b"], 1)
                .timeout(SHORT)
                .acquire()
            {
                Ok(guard) => {
                    seen("timeouts", "blocking granted");
                    w.hold(&["a", "b"], guard)
                }
                Err(Error::Timeout { .. }) => seen("timeouts", "blocking timed out"),
                Err(e) => panic!("unexpected {e}"),
            }
        }),
        spawn(&w, |w| {
            let fut = w.limiter.concurrency("b", 1).timeout(SHORT).into_future();
            match shuttle::future::block_on(fut) {
                Ok(guard) => {
                    seen("timeouts", "async granted");
                    w.hold(&["b"], guard)
                }
                Err(Error::Timeout { .. }) => seen("timeouts", "async timed out"),
                Err(e) => panic!("unexpected {e}"),
            }
            w.use_once(&["b"], 1);
        }),
    ];
    thread::yield_now();
    // Still holding `a`: only a timeout of the first thread lets this in
    // while it waits behind that thread's reservation on `b`.
    w.use_once(&["b"], 1);
    w.give(&["a"], held);
    join_all(h);
    w.settled();
}

/// A limit lowered below a waiter's occupy and raised again while others
/// hold and wait: the waiter fails or passes, never over-admits.
fn update_lower_raise() {
    let w = World::new("update_lower_raise", &["a", "b"], &[2, 2], &[2, 2]);
    let h = vec![
        spawn(&w, |w| {
            match w.limiter.concurrency(["a", "b"], 2).acquire() {
                Ok(guard) => {
                    seen("update_lower_raise", "granted");
                    w.hold(&["a", "b"], guard)
                }
                Err(Error::OccupyExceedsLimit { limit: 1, .. }) => {
                    seen("update_lower_raise", "failed by the update")
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }),
        spawn(&w, |w| {
            w.use_once(&["a"], 1);
            w.use_once(&["b"], 1);
        }),
    ];
    w.limiter
        .update_limit("a", LimitUpdate::new().limit(1))
        .expect("update");
    w.limiter
        .update_limit("a", LimitUpdate::new().limit(2))
        .expect("update");
    join_all(h);
    w.settled();
}

/// A limit raised while two waiters wait on it, one of them also on a
/// second limit, and nothing else lets them in; then lowered below what is
/// held.
fn update_raise() {
    let w = World::new("update_raise", &["a", "b"], &[1, 1], &[2, 1]);
    let held = w.grab(&["a"], 1);
    let h = vec![
        spawn(&w, |w| w.use_once(&["a"], 1)),
        spawn(&w, |w| w.use_once(&["b", "a"], 1)),
    ];
    thread::yield_now();
    w.limiter
        .update_limit("a", LimitUpdate::new().limit(2))
        .expect("update");
    // Still holding `a`: only the raise lets them in.
    join_all(h);
    w.limiter
        .update_limit("a", LimitUpdate::new().limit(1))
        .expect("update");
    w.give(&["a"], held);
    w.settled();
}

/// A limit deactivated (then reactivated) or deleted (then recreated) while
/// a thread holds it and another waits on it and on a second limit: the
/// waiter goes on with the second limit alone, queued fairly behind nobody
/// it should not pass.
fn limit_withdrawn() {
    // `a` holds nothing for acquisitions once withdrawn: no bound on it.
    let w = World::new("limit_withdrawn", &["a", "b"], &[1, 1], &[u32::MAX, 1]);
    let held = w.grab(&["a"], 1);
    let h = vec![
        spawn(&w, |w| {
            let guard = w
                .limiter
                .concurrency(["a", "b"], 1)
                .create_if_missing(false)
                .acquire();
            // Only the withdrawal of `a` lets it in: it holds `b` alone.
            w.hold(&["b"], guard.expect("no error"));
        }),
        spawn(&w, |w| w.use_once(&["b"], 1)),
    ];
    thread::yield_now();
    let delete = thread_rng().gen::<bool>();
    if delete {
        seen("limit_withdrawn", "deleted");
        w.limiter.delete_limit("a").expect("delete");
    } else {
        seen("limit_withdrawn", "deactivated");
        w.limiter
            .update_limit("a", LimitUpdate::new().active(false))
            .expect("update");
    }
    join_all(h);
    w.give(&["a"], held);
    if delete {
        w.limiter
            .create_limit("a", LimitConfig::new(1))
            .expect("recreate");
    } else {
        w.limiter
            .update_limit("a", LimitUpdate::new().active(true))
            .expect("update");
    }
    w.settled();
}

/// The lock-free path of one-name acquisitions and releases racing
/// everything that claims the limit under the lock: a two-limit waiter
/// queueing on it, snapshots, a no-op update, and a deletion and
/// re-creation while a guard of the old limit is out. Never over-admits,
/// never loses a wake-up (every blocking acquisition ends), and the old
/// limit's guard gives nothing to the new one.
fn lock_free_races() {
    let w = World::lock_free(&["a", "b"], &[1, 1], &[1, 1]);
    let h = vec![
        spawn(&w, |w| {
            for _ in 0..3 {
                w.use_once(&["a"], 1);
            }
        }),
        spawn(&w, |w| w.use_once(&["a", "b"], 1)),
        spawn(&w, |w| {
            for _ in 0..2 {
                match w.limiter.concurrency("a", 1).try_acquire().expect("try") {
                    Some(guard) => {
                        seen("lock_free_races", "try took");
                        w.hold(&["a"], guard);
                    }
                    None => seen("lock_free_races", "try refused"),
                }
            }
        }),
    ];
    let info = w.limiter.limit("a").expect("exists");
    assert!(info.held_slots <= 1, "{info:?}");
    w.limiter
        .update_limit("a", LimitUpdate::new().limit(1))
        .expect("update");
    join_all(h);
    w.settled();

    // A guard of "a" outlives it; "a" is created again and used lock-free
    // while the old guard drops.
    let old = w.grab(&["a"], 1);
    w.leave(&["a"], 1);
    w.limiter.delete_limit("a").expect("delete");
    w.limiter
        .create_limit("a", LimitConfig::new(1))
        .expect("create");
    let user = spawn(&w, |w| {
        for _ in 0..2 {
            w.use_once(&["a"], 1);
        }
    });
    thread::yield_now();
    drop(old);
    join_all(vec![user]);
    w.settled();
}

/// Counts a guard in the shadow only (no snapshot, which would claim the
/// limit and send the guard's release through the lock), yields, counts it
/// out and drops it: so that the release really is lock-free whenever the
/// limit was left free.
fn hold_quietly(w: &World, name: &str, guard: ConcurrencyGuard) {
    let i = w.index(name);
    let occupy = guard.occupy();
    {
        let mut shadow = w.shadow.lock().unwrap();
        shadow[i] += occupy;
        assert!(
            shadow[i] <= w.bound[i],
            "{name}: {} slots held, at most {} allowed",
            shadow[i],
            w.bound[i]
        );
    }
    thread::yield_now();
    w.shadow.lock().unwrap()[i] -= occupy;
    drop(guard);
}

/// The lock-free path handing slots over: one-name blocking acquisitions
/// and tries of a limit whose guards are counted without snapshots (so
/// they are taken and given back lock-free whenever the limit is free),
/// racing a waiter that queues on it (a lock-free release must then find
/// the claim and hand over) and a lowering and raising of its capacity.
/// Never over the capacity, no lost wake-up.
fn lock_free_handoff() {
    let w = World::lock_free(&["a"], &[2], &[2]);
    let h = vec![
        spawn(&w, |w| {
            for _ in 0..2 {
                let g = w.limiter.concurrency("a", 1).acquire().expect("acquire");
                hold_quietly(&w, "a", g);
            }
        }),
        spawn(&w, |w| {
            match w.limiter.concurrency("a", 2).acquire() {
                Ok(g) => {
                    seen("lock_free_handoff", "two granted");
                    hold_quietly(&w, "a", g)
                }
                // Lowered below its occupy while it waited (or before).
                Err(Error::OccupyExceedsLimit { .. }) => {
                    seen("lock_free_handoff", "two refused by the lowering")
                }
                Err(e) => panic!("{e:?}"),
            }
        }),
        spawn(&w, |w| {
            for _ in 0..2 {
                match w.limiter.concurrency("a", 1).try_acquire().expect("try") {
                    Some(g) => {
                        seen("lock_free_handoff", "try took");
                        hold_quietly(&w, "a", g);
                    }
                    None => seen("lock_free_handoff", "try refused"),
                }
            }
        }),
    ];
    w.limiter
        .update_limit("a", LimitUpdate::new().limit(1))
        .expect("lower");
    w.limiter
        .update_limit("a", LimitUpdate::new().limit(2))
        .expect("raise");
    join_all(h);
    w.settled();
}

/// A lock-free release of a limit racing its deletion and re-creation
/// (inactive, so that nothing of its own moves its occupancy average): the
/// old guard's hold must not be folded into the new limit's average, which
/// stays at Prefect's initial 2.0.
fn lock_free_reborn_average() {
    let w = World::lock_free(&["a"], &[1], &[1]);
    let take = || {
        w.limiter
            .concurrency("a", 1)
            .try_acquire()
            .expect("try")
            .expect("free")
    };
    drop(take()); // via the lock: "a" is set free
    let old = take(); // lock-free (no snapshot: "a" stays free)
    let releaser = thread::spawn(move || drop(old));
    w.limiter.delete_limit("a").expect("delete");
    w.limiter
        .create_limit("a", LimitConfig::new(1).active(false))
        .expect("create");
    releaser.join().expect("release");
    let info = w.limiter.limit("a").expect("exists");
    assert_eq!(
        (info.held_slots, info.avg_slot_occupancy_seconds),
        (0, 2.0),
        "the new limit got something of the old one's guard: {info:?}"
    );
}

/// The nudge on a limit of one slot (the next in line is woken to spin at
/// the head when its predecessor is granted) and the flag reset of the
/// blocking loop that follows it: three threads queue behind a held slot,
/// one of them with a short timeout, and the slot is handed down the line
/// (lock-free whenever the limit is free). Every blocking waiter without a
/// timeout must be granted (shuttle reports one parked forever as a
/// deadlock), the one with a timeout granted or timed out, and never more
/// than one slot held.
fn nudge_handoff() {
    let w = World::lock_free(&["a"], &[1], &[1]);
    let held = w.limiter.concurrency("a", 1).try_acquire().expect("try");
    let held = held.expect("free at the start");
    w.shadow.lock().unwrap()[0] += 1;
    let quiet = |w: &World| {
        let g = w.limiter.concurrency("a", 1).acquire().expect("acquire");
        hold_quietly(w, "a", g);
    };
    let h = vec![
        spawn(&w, move |w| {
            for _ in 0..2 {
                quiet(&w);
            }
        }),
        spawn(&w, move |w| quiet(&w)),
        spawn(&w, |w| {
            match w.limiter.concurrency("a", 1).timeout(SHORT).acquire() {
                Ok(g) => {
                    seen("nudge_handoff", "timed waiter granted");
                    hold_quietly(&w, "a", g);
                }
                Err(Error::Timeout { .. }) => seen("nudge_handoff", "timed waiter timed out"),
                Err(e) => panic!("unexpected {e}"),
            }
        }),
    ];
    thread::yield_now();
    w.shadow.lock().unwrap()[0] -= 1;
    drop(held);
    join_all(h);
    w.settled();
}

/// `try_acquire` racing a release and a queued multi-limit waiter: it never
/// takes what the waiter is owed beyond the limit, and the waiter gets through.
fn try_races_release() {
    let w = World::new("try_races_release", &["a", "b"], &[1, 1], &[1, 1]);
    let held = w.grab(&["a"], 1);
    let h = vec![
        spawn(&w, |w| {
            for _ in 0..3 {
                match w.limiter.concurrency("a", 1).try_acquire().expect("try") {
                    Some(guard) => {
                        seen("try_races_release", "try took");
                        w.hold(&["a"], guard);
                    }
                    None => seen("try_races_release", "try refused"),
                }
            }
        }),
        spawn(&w, |w| w.use_once(&["a", "b"], 1)),
    ];
    thread::yield_now();
    w.give(&["a"], held);
    if let Some(guard) = w.limiter.concurrency("b", 1).try_acquire().expect("try") {
        w.hold(&["b"], guard);
    }
    join_all(h);
    w.settled();
}

/// Issue 12's case: a limit of 4 lowered to 2 below its held slots, drained
/// to 2, then raised again, while two threads try for 1 or 2 slots of it
/// (lock-free while it is free, through the lock while it is claimed) and
/// hold what they get. Once the controller has seen the held slots drain to
/// the lowered limit, no try may take it past 2 until it is raised. The
/// bound changes under the same lock as the shadow count, so a guard counted
/// in is always judged against the bound in force at that instant.
fn lowered_then_drained() {
    const LO: u32 = 2;
    const HI: u32 = 4;
    let limiter = Limiter::in_memory();
    limiter
        .create_limit("x", LimitConfig::new(HI))
        .expect("create");
    // (slots held by counted guards, the bound they are judged against)
    let count = Arc::new(Mutex::new((0u32, HI)));
    let first = limiter.concurrency("x", 2).try_acquire().expect("try");
    let first = first.expect("free at the start");
    count.lock().unwrap().0 += 2;
    let workers: Vec<_> = (1..=2u32)
        .map(|occupy| {
            let (limiter, count) = (limiter.clone(), count.clone());
            thread::spawn(move || {
                for _ in 0..2 {
                    let Some(guard) = limiter.concurrency("x", occupy).try_acquire().expect("try")
                    else {
                        seen("lowered_then_drained", "try refused");
                        continue;
                    };
                    let bound = {
                        let mut c = count.lock().unwrap();
                        c.0 += occupy;
                        assert!(c.0 <= c.1, "x: {} slots held, bound {}", c.0, c.1);
                        c.1
                    };
                    seen("lowered_then_drained", "try took");
                    // The engine's own count, against a bound that held
                    // throughout the snapshot.
                    let info = limiter.limit("x").expect("exists");
                    if count.lock().unwrap().1 == bound {
                        assert!(info.held_slots <= bound, "{info:?} against {bound}");
                    }
                    thread::yield_now();
                    count.lock().unwrap().0 -= occupy;
                    drop(guard);
                }
            })
        })
        .collect();
    limiter
        .update_limit("x", LimitUpdate::new().limit(LO))
        .expect("lower");
    count.lock().unwrap().0 -= 2;
    drop(first);
    // Drained to the lowered limit (it may not be, if both workers hold
    // now): from here on it must stay within it until raised.
    if limiter.limit("x").expect("exists").held_slots <= LO {
        seen("lowered_then_drained", "drained");
        count.lock().unwrap().1 = LO;
        thread::yield_now();
    }
    count.lock().unwrap().1 = HI;
    limiter
        .update_limit("x", LimitUpdate::new().limit(HI))
        .expect("raise");
    join_all(workers);
    let info = limiter.limit("x").expect("exists");
    assert_eq!((info.held_slots, info.waiters), (0, 0), "{info:?}");
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn model_lock_free_races() {
    check("lock_free_races", lock_free_races);
}

#[test]
fn model_lock_free_handoff() {
    check("lock_free_handoff", lock_free_handoff);
}

#[test]
fn model_lock_free_reborn_average() {
    check("lock_free_reborn_average", lock_free_reborn_average);
}

#[test]
fn model_cross_order() {
    check("cross_order", cross_order);
}

#[test]
fn model_weighted() {
    check("weighted", weighted);
}

#[test]
fn model_cancel_at_grant() {
    check("cancel_at_grant", cancel_at_grant);
}

#[test]
fn model_timeouts() {
    check("timeouts", timeouts);
}

#[test]
fn model_update_lower_raise() {
    check("update_lower_raise", update_lower_raise);
}

#[test]
fn model_update_raise() {
    check("update_raise", update_raise);
}

#[test]
fn model_limit_withdrawn() {
    check("limit_withdrawn", limit_withdrawn);
}

#[test]
fn model_try_races_release() {
    check("try_races_release", try_races_release);
}

#[test]
fn model_nudge_handoff() {
    check("nudge_handoff", nudge_handoff);
}

#[test]
fn model_lowered_then_drained() {
    check("lowered_then_drained", lowered_then_drained);
}
