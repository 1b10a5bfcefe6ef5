//! Async acquisition: under tokio and under `futures::executor::block_on`,
//! timeouts without any runtime timer, rate limits, and cancellation at
//! every point (before queueing, while queued, after a grant not yet seen).

mod common;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use common::{eventually, watchdog, WATCHDOG};
use futures::executor::block_on;
use turnstile::{ConcurrencyGuard, Error, LimitConfig, Limiter};

const QUEUED: Duration = Duration::from_secs(10);

/// Runs `body` on a multi-thread tokio runtime with 2 workers, under the
/// watchdog.
fn tokio_mt<F>(body: impl FnOnce() -> F + Send + 'static)
where
    F: Future<Output = ()>,
{
    watchdog(WATCHDOG, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(body());
    });
}

/// Polls `cond` on the tokio timer until it holds (or 10 s pass).
async fn until(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < QUEUED {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    cond()
}

fn held_waiters(limiter: &Limiter, name: &str) -> (u32, usize) {
    let i = limiter.limit(name).expect("limit exists");
    (i.held_slots, i.waiters)
}

fn assert_send_static<T: Send + 'static>(_: &T) {}

/// A waker that records that it was woken.
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Polls a future once with `waker`.
fn poll_once<F: Future + Unpin>(fut: &mut F, waker: &Waker) -> Poll<F::Output> {
    Pin::new(fut).poll(&mut Context::from_waker(waker))
}

#[test]
fn await_under_tokio_multi_thread() {
    tokio_mt(|| async {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
        let holder = limiter.concurrency("gpu", 1).await.unwrap();
        assert_eq!(held_waiters(&limiter, "gpu"), (1, 0));

        let l = limiter.clone();
        let waiter = tokio::spawn(async move {
            let g = l.concurrency("gpu", 1).await.unwrap();
            let held = l.limit("gpu").unwrap().held_slots;
            drop(g);
            held
        });
        assert!(until(|| held_waiters(&limiter, "gpu").1 == 1).await);
        drop(holder);
        assert_eq!(waiter.await.unwrap(), 1);
        assert_eq!(held_waiters(&limiter, "gpu"), (0, 0));
    });
}

#[test]
fn futures_are_send_and_static_for_tokio_spawn() {
    tokio_mt(|| async {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();

        // The future itself, straight from the builder.
        let fut = limiter.concurrency("gpu", 1).into_future();
        assert_send_static(&fut);
        let guard: ConcurrencyGuard = tokio::spawn(fut).await.unwrap().unwrap();
        assert_eq!(held_waiters(&limiter, "gpu"), (1, 0));

        // The guard moves between tasks.
        tokio::spawn(async move { drop(guard) }).await.unwrap();
        assert_eq!(held_waiters(&limiter, "gpu"), (0, 0));

        // A cloned limiter moved into an async block.
        let l = limiter.clone();
        let task = tokio::spawn(async move {
            let g = l.concurrency(vec!["gpu"], 1).await?;
            Ok::<_, Error>(g.release())
        });
        task.await.unwrap().unwrap();

        let api = Limiter::in_memory();
        api.create_limit("api", LimitConfig::new(5).slot_decay_per_second(100.0))
            .unwrap();
        let rate = api.rate_limit("api", 1).into_future();
        assert_send_static(&rate);
        tokio::spawn(rate).await.unwrap().unwrap();
        assert_eq!(held_waiters(&limiter, "gpu"), (0, 0));
    });
}

#[test]
fn await_under_block_on_waits_for_a_release() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
        let holder = block_on(limiter.concurrency("gpu", 1).into_future()).unwrap();
        let l = limiter.clone();
        let waiter = thread::spawn(move || {
            block_on(async {
                let g = l.concurrency(["gpu"], 1).await?;
                Ok::<_, Error>(g.release())
            })
        });
        assert!(eventually(QUEUED, || held_waiters(&limiter, "gpu").1 == 1));
        drop(holder);
        waiter.join().unwrap().unwrap();
        assert_eq!(held_waiters(&limiter, "gpu"), (0, 0));
    });
}

/// The async timeout needs no runtime timer: under `block_on`.
#[test]
fn async_timeout_under_block_on() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
        limiter.create_limit("db", LimitConfig::new(3)).unwrap();
        let _holder = limiter.concurrency("gpu", 1).acquire().unwrap();
        for names in [vec!["gpu"], vec!["db", "gpu"]] {
            let d = Duration::from_millis(80);
            let start = Instant::now();
            let result = block_on(
                limiter
                    .concurrency(names.clone(), 1)
                    .timeout(d)
                    .into_future(),
            );
            let waited = start.elapsed();
            match result {
                Err(Error::Timeout { .. }) => {}
                other => panic!("expected a timeout, got {other:?}"),
            }
            assert!(waited >= d, "gave up after {waited:?}, before {d:?}");
            assert_eq!(held_waiters(&limiter, "gpu"), (1, 0));
            assert_eq!(held_waiters(&limiter, "db"), (0, 0));
        }
    });
}

/// The async timeout needs no runtime timer: on a tokio runtime built
/// without its timer (using tokio's would panic).
#[test]
fn async_timeout_on_a_runtime_without_a_timer() {
    watchdog(WATCHDOG, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let limiter = Limiter::in_memory();
            limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
            let _holder = limiter.concurrency("gpu", 1).await.unwrap();
            let d = Duration::from_millis(60);
            let start = Instant::now();
            let err = limiter.concurrency("gpu", 1).timeout(d).await.unwrap_err();
            assert!(err.is_timeout(), "{err}");
            assert!(start.elapsed() >= d);
            assert_eq!(held_waiters(&limiter, "gpu"), (1, 0));

            // Zero timeout: one attempt, no waiting.
            let err = limiter
                .concurrency("gpu", 1)
                .timeout(Duration::ZERO)
                .await
                .unwrap_err();
            assert!(matches!(err, Error::Timeout { .. }), "{err}");
            assert_eq!(held_waiters(&limiter, "gpu"), (1, 0));
        });
    });
}

/// `rate_limit(..).await` waits for decay under `block_on`.
#[test]
fn rate_limit_await_waits_for_decay_under_block_on() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        // One slot drains in 50 ms.
        limiter
            .create_limit("api", LimitConfig::new(1).slot_decay_per_second(20.0))
            .unwrap();
        let start = Instant::now();
        assert!(limiter.rate_limit("api", 1).try_acquire().unwrap());
        assert!(!limiter.rate_limit("api", 1).try_acquire().unwrap());
        block_on(limiter.rate_limit("api", 1).into_future()).unwrap();
        let waited = start.elapsed();
        // Exact decay: the slot is free 50 ms after it was taken (a little
        // slack for floating point).
        assert!(
            waited >= Duration::from_millis(45),
            "waited only {waited:?}"
        );
        assert_eq!(held_waiters(&limiter, "api"), (0, 0));

        // A slow bucket: a short timeout gives up and leaves nobody queued.
        limiter
            .create_limit("slow", LimitConfig::new(1).slot_decay_per_second(0.5))
            .unwrap();
        assert!(limiter.rate_limit("slow", 1).try_acquire().unwrap());
        let d = Duration::from_millis(30);
        let start = Instant::now();
        let err = block_on(limiter.rate_limit(["slow"], 1).timeout(d).into_future()).unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert!(start.elapsed() >= d);
        assert_eq!(held_waiters(&limiter, "slow"), (0, 0));
    });
}

/// Dropping a queued future leaves nobody queued and nothing taken.
#[test]
fn dropping_a_pending_future_leaves_nothing() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("a", LimitConfig::new(2)).unwrap();
        limiter.create_limit("b", LimitConfig::new(1)).unwrap();
        let holder = limiter.concurrency("b", 1).acquire().unwrap();

        for names in [vec!["b"], vec!["a", "b"], vec!["b", "a"]] {
            let mut fut = limiter.concurrency(names.clone(), 1).into_future();
            assert!(poll_once(&mut fut, Waker::noop()).is_pending());
            assert_eq!(held_waiters(&limiter, "b"), (1, 1), "{names:?}");
            assert_eq!(held_waiters(&limiter, "a").0, 0, "{names:?}");
            drop(fut);
            assert_eq!(held_waiters(&limiter, "b"), (1, 0), "{names:?}");
            assert_eq!(held_waiters(&limiter, "a"), (0, 0), "{names:?}");
        }

        // A future dropped before its first poll takes nothing either.
        let fut = limiter.concurrency("a", 2).into_future();
        drop(fut);
        assert_eq!(held_waiters(&limiter, "a"), (0, 0));

        // A rate-limit future dropped while waiting for decay.
        limiter
            .create_limit("api", LimitConfig::new(1).slot_decay_per_second(0.5))
            .unwrap();
        assert!(limiter.rate_limit("api", 1).try_acquire().unwrap());
        let mut fut = limiter.rate_limit("api", 1).into_future();
        assert!(poll_once(&mut fut, Waker::noop()).is_pending());
        assert_eq!(held_waiters(&limiter, "api").1, 1);
        drop(fut);
        let api = limiter.limit("api").unwrap();
        assert_eq!(api.waiters, 0);
        assert_eq!(api.active_slots, 1, "only the first decaying slot");

        drop(holder);
        let all = limiter.concurrency(["a", "b"], 1).try_acquire().unwrap();
        assert!(all.is_some());
    });
}

/// Slots granted to a queued future that is dropped before it is polled
/// again go back, and the next waiter gets them.
#[test]
fn dropping_a_granted_unpolled_future_passes_the_slots_on() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("x", LimitConfig::new(1)).unwrap();
        for round in 0..20u32 {
            let holder = limiter.concurrency("x", 1).acquire().unwrap();
            let flag = Arc::new(Flag(AtomicBool::new(false)));
            let waker = Waker::from(Arc::clone(&flag));
            let mut first = limiter.concurrency("x", 1).into_future();
            assert!(poll_once(&mut first, &waker).is_pending());
            assert_eq!(held_waiters(&limiter, "x"), (1, 1));

            // A second waiter, queued behind the first.
            let l = limiter.clone();
            let second = thread::spawn(move || {
                l.concurrency("x", 1)
                    .timeout(Duration::from_secs(10))
                    .acquire()
                    .map(|g| g.release())
            });
            assert!(eventually(QUEUED, || held_waiters(&limiter, "x").1 == 2));

            drop(holder);
            // The first future is told (its slot is ready for it) ...
            assert!(
                eventually(QUEUED, || flag.0.load(Ordering::SeqCst)),
                "the queued future was never woken after the release"
            );
            if round.is_multiple_of(2) {
                // ... but is dropped without being polled again.
                drop(first);
            } else {
                // ... polled: it has the slot; then the guard goes.
                match poll_once(&mut first, &waker) {
                    Poll::Ready(Ok(g)) => drop(g),
                    other => panic!("woken but not ready: {other:?}"),
                }
            }
            match second.join().unwrap() {
                Ok(_) => {}
                Err(e) => panic!("the next waiter never got the abandoned slot: {e}"),
            }
            assert_eq!(held_waiters(&limiter, "x"), (0, 0));
        }
    });
}

/// Many rounds: the holder releases on one thread while the queued future
/// is dropped on another at about the same instant; a third waiter queued
/// behind must then get the slot, and nothing may leak.
#[test]
fn release_and_cancel_at_the_same_instant() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("x", LimitConfig::new(1)).unwrap();
        limiter.create_limit("y", LimitConfig::new(2)).unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let (tx, rx) = crossbeam_channel::bounded::<ConcurrencyGuard>(1);
        let releaser = {
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                while let Ok(guard) = rx.recv() {
                    barrier.wait();
                    drop(guard);
                }
            })
        };
        for round in 0..1000u32 {
            let names: Vec<&str> = if round.is_multiple_of(3) {
                vec!["y", "x"]
            } else {
                vec!["x"]
            };
            let holder = limiter.concurrency("x", 1).acquire().unwrap();
            let mut first = limiter.concurrency(names.clone(), 1).into_future();
            assert!(poll_once(&mut first, Waker::noop()).is_pending());
            let mut second = limiter
                .concurrency(names.clone(), 1)
                .timeout(Duration::from_secs(10))
                .into_future();
            assert!(poll_once(&mut second, Waker::noop()).is_pending());
            assert_eq!(held_waiters(&limiter, "x"), (1, 2));

            tx.send(holder).unwrap();
            barrier.wait();
            if round % 4 == 1 {
                thread::yield_now();
            }
            drop(first);
            // The second must get the slot (it waits with a real waker now).
            match block_on(&mut second) {
                Ok(g) => drop(g),
                Err(e) => panic!("round {round}: the slot was lost: {e}"),
            }
            drop(second);
            assert_eq!(held_waiters(&limiter, "x"), (0, 0), "round {round}");
            assert_eq!(held_waiters(&limiter, "y"), (0, 0), "round {round}");
        }
        drop(tx);
        releaser.join().unwrap();
        let all = limiter.concurrency(["x", "y"], 1).try_acquire().unwrap();
        assert!(all.is_some());
    });
}

/// xorshift64*: deterministic per seed, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// 200 tasks race for a small limit while `tokio::time::timeout` and
/// `tokio::select!` cancel them at random points; no slot leaks, nobody
/// stays queued, and the limits are never over-committed.
#[test]
fn cancellation_storm() {
    tokio_mt(|| async {
        let limiter = Limiter::in_memory();
        limiter.create_limit("x", LimitConfig::new(3)).unwrap();
        limiter.create_limit("y", LimitConfig::new(2)).unwrap();
        let shadow = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
        let acquired = Arc::new(AtomicU32::new(0));
        let cancelled = Arc::new(AtomicU32::new(0));

        let mut tasks = Vec::new();
        for t in 0..200u64 {
            let l = limiter.clone();
            let shadow = Arc::clone(&shadow);
            let acquired = Arc::clone(&acquired);
            let cancelled = Arc::clone(&cancelled);
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng::new(t + 1);
                for _ in 0..20 {
                    let (names, uses): (Vec<&str>, [bool; 2]) = match rng.below(3) {
                        0 => (vec!["x"], [true, false]),
                        1 => (vec!["y", "x"], [true, true]),
                        _ => (vec!["y"], [false, true]),
                    };
                    let occupy = 1 + rng.below(2) as u32;
                    let fut = l.concurrency(names, occupy).into_future();
                    let got: Option<ConcurrencyGuard> = match rng.below(4) {
                        0 => {
                            let d = Duration::from_micros(rng.below(2_000));
                            tokio::time::timeout(d, fut).await.ok().map(Result::unwrap)
                        }
                        1 => {
                            // Cancelled after at most a few polls.
                            let spins = rng.below(3);
                            tokio::select! {
                                g = fut => Some(g.unwrap()),
                                _ = async {
                                    for _ in 0..spins {
                                        tokio::task::yield_now().await;
                                    }
                                } => None,
                            }
                        }
                        2 => {
                            let d = Duration::from_micros(rng.below(1_000));
                            tokio::select! {
                                g = fut => Some(g.unwrap()),
                                _ = tokio::time::sleep(d) => None,
                            }
                        }
                        _ => Some(fut.await.unwrap()),
                    };
                    let Some(guard) = got else {
                        cancelled.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    acquired.fetch_add(1, Ordering::Relaxed);
                    for (i, limit) in [(0, 3), (1, 2)] {
                        if uses[i] {
                            let now = shadow[i].fetch_add(occupy, Ordering::SeqCst) + occupy;
                            assert!(now <= limit, "limit {i}: {now} > {limit}");
                        }
                    }
                    match rng.below(3) {
                        0 => {}
                        1 => tokio::task::yield_now().await,
                        _ => tokio::time::sleep(Duration::from_micros(rng.below(500))).await,
                    }
                    for i in 0..2 {
                        if uses[i] {
                            shadow[i].fetch_sub(occupy, Ordering::SeqCst);
                        }
                    }
                    drop(guard);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let (acquired, cancelled) = (
            acquired.load(Ordering::Relaxed),
            cancelled.load(Ordering::Relaxed),
        );
        assert!(acquired > 100, "only {acquired} acquisitions");
        assert!(cancelled > 100, "only {cancelled} cancellations");
        assert_eq!(held_waiters(&limiter, "x"), (0, 0));
        assert_eq!(held_waiters(&limiter, "y"), (0, 0));
        let full = limiter.concurrency("x", 3).try_acquire().unwrap();
        assert!(full.is_some(), "the full limit of x cannot be taken");
        drop(full);
        let full = limiter.concurrency(["x", "y"], 2).try_acquire().unwrap();
        assert!(full.is_some(), "x and y cannot be taken");
    });
}

/// A queued waiter granted by another thread's release owns the slots from
/// that grant, however late its task is polled: `Event::Acquired`'s `waited`
/// ends at the grant, and the guard's hold time (`held_for`, `release()`,
/// `Event::Released`) starts there. Both used to be measured from when the
/// task got round to taking the slots.
#[test]
fn a_grant_is_charged_from_the_release_not_from_the_poll() {
    use std::sync::Mutex;
    use turnstile::Event;
    watchdog(WATCHDOG, || {
        let events: Arc<Mutex<Vec<Event>>> = Arc::default();
        let sink = events.clone();
        let limiter = Limiter::builder()
            .on_event(move |e: &Event| sink.lock().unwrap().push(e.clone()))
            .build()
            .unwrap();
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
        let holder = limiter.concurrency("gpu", 1).acquire().unwrap();
        let waker = Waker::from(Arc::new(Flag(AtomicBool::new(false))));
        let mut cx = Context::from_waker(&waker);
        let mut fut = limiter.concurrency("gpu", 1).into_future();
        let queued = Instant::now();
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        drop(holder); // grants the slot to `fut`, whose task is not polled
        let released = Instant::now();
        assert_eq!(held_waiters(&limiter, "gpu"), (1, 0), "granted");
        // The task is kept from running for longer than it waited, however
        // slow this machine is.
        let delay = released.duration_since(queued) + Duration::from_millis(50);
        while released.elapsed() < delay {
            thread::yield_now();
        }
        let polled = Instant::now();
        let guard = match Pin::new(&mut fut).poll(&mut cx) {
            Poll::Ready(Ok(guard)) => guard,
            other => panic!("granted, yet {:?}", other.map(|r| r.map(|_| ()))),
        };
        let late = polled.duration_since(released);
        // The grant came before `released`: held at least since then.
        assert!(
            guard.held_for() >= late,
            "{:?} < {late:?}",
            guard.held_for()
        );
        let held = guard.release();
        assert!(
            held >= late,
            "release() says {held:?}, granted {late:?} before the poll"
        );
        let events = events.lock().unwrap();
        let waited: Vec<Duration> = events
            .iter()
            .filter_map(|e| match e {
                Event::Acquired { waited, .. } => Some(*waited),
                _ => None,
            })
            .collect();
        let [_, waited] = waited[..] else {
            panic!("expected the holder's and the waiter's Acquired: {events:?}")
        };
        // Queued after `queued`, granted before `released`.
        let span = released.duration_since(queued);
        assert!(
            waited <= span,
            "waited {waited:?}, but it was granted within {span:?}"
        );
        match events.last() {
            Some(Event::Released { held: h, .. }) => assert_eq!(*h, held),
            other => panic!("expected the waiter's Released last, got {other:?}"),
        }
    });
}

// ---------------------------------------------------------------------------
// Cooperative scheduling: a future ready at once still lets other tasks run
// ---------------------------------------------------------------------------

/// Acquisitions each task makes in the starvation tests.
const LOOPS: u32 = 5_000;

/// Two tasks on one thread loop on a limit that always has room. A future
/// that is ready at its first poll never returns to the executor, so
/// without a yield now and then the first task would make all its
/// acquisitions before the second ran once.
#[test]
fn tasks_looping_on_a_free_limit_take_turns_on_a_local_pool() {
    use futures::executor::LocalPool;
    use futures::task::LocalSpawnExt;
    use std::cell::Cell;
    use std::rc::Rc;

    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("free", LimitConfig::new(4)).unwrap();
        let counts: Rc<[Cell<u32>; 2]> = Rc::default();
        // What the other task had made when each task finished.
        let seen: Rc<[Cell<Option<u32>>; 2]> = Rc::default();
        let mut pool = LocalPool::new();
        for me in 0..2 {
            let (limiter, counts, seen) = (limiter.clone(), counts.clone(), seen.clone());
            pool.spawner()
                .spawn_local(async move {
                    for _ in 0..LOOPS {
                        drop(limiter.concurrency("free", 1).await.unwrap());
                        counts[me].set(counts[me].get() + 1);
                    }
                    seen[me].set(Some(counts[1 - me].get()));
                })
                .unwrap();
        }
        pool.run();
        let seen = [seen[0].get().unwrap(), seen[1].get().unwrap()];
        assert!(
            seen.iter().all(|&other| other > 0),
            "a task made all {LOOPS} acquisitions before the other made one: {seen:?}"
        );
        assert_eq!(held_waiters(&limiter, "free"), (0, 0));
    });
}

/// The same on tokio's current-thread runtime, whose budget a runtime-
/// agnostic future does not consume; and with rate limits and several names
/// (the general path's first poll yields as the uncontended path's does).
#[test]
fn tasks_looping_on_a_free_limit_take_turns_under_tokio_current_thread() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("free", LimitConfig::new(4)).unwrap();
        limiter.create_limit("other", LimitConfig::new(4)).unwrap();
        limiter
            .create_limit(
                "bucket",
                LimitConfig::new(u32::MAX).slot_decay_per_second(1e9),
            )
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        type Acquisition = fn(&Limiter) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
        let kinds: [(&str, Acquisition); 3] = [
            ("one name", |l| {
                Box::pin(async move { drop(l.concurrency("free", 1).await.unwrap()) })
            }),
            ("two names", |l| {
                Box::pin(async move { drop(l.concurrency(["free", "other"], 1).await.unwrap()) })
            }),
            ("rate limit", |l| {
                Box::pin(async move { l.rate_limit("bucket", 1).await.unwrap() })
            }),
        ];
        for (what, acquire) in kinds {
            let counts: Arc<[AtomicU32; 2]> = Arc::default();
            let seen = rt.block_on(async {
                let tasks: Vec<_> = (0..2)
                    .map(|me| {
                        let (limiter, counts) = (limiter.clone(), counts.clone());
                        tokio::spawn(async move {
                            for _ in 0..LOOPS {
                                acquire(&limiter).await;
                                counts[me].fetch_add(1, Ordering::Relaxed);
                            }
                            counts[1 - me].load(Ordering::Relaxed)
                        })
                    })
                    .collect();
                let mut seen = Vec::new();
                for task in tasks {
                    seen.push(task.await.unwrap());
                }
                seen
            });
            assert!(
                seen.iter().all(|&other| other > 0),
                "{what}: a task made all {LOOPS} acquisitions before the other made one: {seen:?}"
            );
        }
        assert_eq!(held_waiters(&limiter, "free"), (0, 0));
    });
}

/// The yield is cancel-safe: a future that returned `Pending` to let others
/// run has taken nothing and queued nowhere, has woken its task, and is
/// granted when polled again.
#[test]
fn a_future_that_yields_to_the_executor_holds_nothing() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("free", LimitConfig::new(1)).unwrap();
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let mut yielded = None;
        for _ in 0..10_000 {
            let mut fut = limiter.concurrency("free", 1).into_future();
            match poll_once(&mut fut, &waker) {
                Poll::Ready(guard) => drop(guard.unwrap()),
                Poll::Pending => {
                    yielded = Some(fut);
                    break;
                }
            }
        }
        let mut fut = yielded.expect("a task granted at once 10,000 times in a row never yielded");
        assert!(flag.0.load(Ordering::SeqCst), "it woke its task");
        assert_eq!(
            held_waiters(&limiter, "free"),
            (0, 0),
            "nothing taken or queued"
        );
        // Another acquisition meanwhile is not held back by it.
        drop(
            limiter
                .concurrency("free", 1)
                .try_acquire()
                .unwrap()
                .expect("free"),
        );
        let guard = match poll_once(&mut fut, &waker) {
            Poll::Ready(guard) => guard.unwrap(),
            Poll::Pending => panic!("a yielded future must attempt when polled again"),
        };
        assert_eq!(held_waiters(&limiter, "free"), (1, 0));
        drop(guard);

        // Dropped while yielded: nothing to give back.
        let mut dropped = None;
        for _ in 0..10_000 {
            let mut fut = limiter.concurrency("free", 1).into_future();
            match poll_once(&mut fut, &waker) {
                Poll::Ready(guard) => drop(guard.unwrap()),
                Poll::Pending => {
                    dropped = Some(fut);
                    break;
                }
            }
        }
        drop(dropped.expect("yielded again"));
        assert_eq!(held_waiters(&limiter, "free"), (0, 0));
    });
}
