//! Wakers that own guards (or other futures) are dropped outside every
//! internal lock (issue 12, item 4).
//!
//! An executor's waker may own its task, and so whatever the task holds: a
//! guard, whose release takes the engine's lock, or another acquisition
//! future, whose drop cancels its timer and withdraws it. If turnstile drops
//! the last clone of such a waker while holding one of its own locks, the
//! thread blocks on itself forever. Each test below drives one place where
//! a waker is let go of into exactly that, under the watchdog; each hung
//! before its fix.

mod common;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use common::{eventually, watchdog, TempDir, WATCHDOG};
use turnstile::{AcquireFuture, Admin, ConcurrencyGuard, Error, LimitConfig, LimitUpdate, Limiter};

/// A task's waker that owns what its task holds: a guard, or another
/// acquisition future, only to drop them with its last clone. Waking it does
/// nothing (the tests poll by hand).
#[derive(Default)]
struct Owner {
    _guard: Mutex<Option<ConcurrencyGuard>>,
    _future: Mutex<Option<Pin<Box<AcquireFuture>>>>,
}

impl Wake for Owner {
    fn wake(self: Arc<Self>) {}
}

fn waker_owning_guard(guard: Option<ConcurrencyGuard>) -> Waker {
    Waker::from(Arc::new(Owner {
        _guard: Mutex::new(guard),
        ..Owner::default()
    }))
}

fn waker_owning_future(future: Pin<Box<AcquireFuture>>) -> Waker {
    Waker::from(Arc::new(Owner {
        _future: Mutex::new(Some(future)),
        ..Owner::default()
    }))
}

fn poll<F: Future + ?Sized>(fut: &mut Pin<Box<F>>, waker: &Waker) -> Poll<F::Output> {
    fut.as_mut().poll(&mut Context::from_waker(waker))
}

fn held_and_waiting(limiter: &Limiter, name: &str) -> (u32, usize) {
    let info = limiter.limit(name).expect("limit exists");
    (info.held_slots, info.waiters)
}

/// An acquisition of "a" with a (long) timeout, so that it registers with
/// the timer thread while it waits.
fn timed(limiter: &Limiter) -> Pin<Box<AcquireFuture>> {
    Box::pin(
        limiter
            .concurrency("a", 1)
            .timeout(Duration::from_secs(600))
            .into_future(),
    )
}

/// A limiter with limit "a" of `cap` slots, and "pin" of many: a guard that
/// also holds "pin" always gives back under the engine's lock (never on the
/// lock-free path of one simple limit), so the hang does not depend on it.
fn limiter(cap: u32) -> Limiter {
    let limiter = Limiter::in_memory();
    limiter.create_limit("a", LimitConfig::new(cap)).unwrap();
    limiter.create_limit("pin", LimitConfig::new(100)).unwrap();
    limiter
}

/// tokio's `release_permits_at_drop` ("second iteration shouldn't
/// deadlock"), for turnstile: the task's waker owns the only slot. The
/// second poll brings a new waker; the engine replaces the old one, whose
/// drop gives the slot back. `State::set_waker` dropped it under the lock.
#[test]
fn second_poll_with_a_new_waker_does_not_deadlock() {
    watchdog(WATCHDOG, || {
        let limiter = limiter(1);
        let mut fut = Box::pin(limiter.concurrency("a", 1).into_future());
        for _ in 0..=1 {
            // The first waker takes the slot; the second finds none (the
            // future is queued for it).
            let waker = waker_owning_guard(limiter.concurrency("a", 1).try_acquire().unwrap());
            assert!(poll(&mut fut, &waker).is_pending());
        }
        // The old waker's slot went to the future when it was dropped.
        let guard = match poll(&mut fut, Waker::noop()) {
            Poll::Ready(guard) => guard.unwrap(),
            Poll::Pending => panic!("the released slot was not handed to the future"),
        };
        assert_eq!(held_and_waiting(&limiter, "a"), (1, 0));
        drop(guard);
        assert_eq!(held_and_waiting(&limiter, "a"), (0, 0));
    });
}

/// The same waker, and the future dropped while queued instead of polled
/// again: `State::withdraw` (from `abandon`) dropped the waiter, and its
/// waker, under the lock.
#[test]
fn dropping_a_queued_future_whose_waker_owns_a_guard_does_not_deadlock() {
    watchdog(WATCHDOG, || {
        let limiter = limiter(1);
        let mut fut = Box::pin(limiter.concurrency("a", 1).into_future());
        let guard = limiter.concurrency(["a", "pin"], 1).acquire().unwrap();
        let waker = waker_owning_guard(Some(guard));
        assert!(poll(&mut fut, &waker).is_pending());
        drop(waker);
        drop(fut);
        assert_eq!(held_and_waiting(&limiter, "a"), (0, 0));
        assert_eq!(held_and_waiting(&limiter, "pin"), (0, 0));
    });
}

/// Slots granted to a future that is dropped before it looks: `abandon`
/// gave them back and dropped the waiter, and its waker, under the lock.
#[test]
fn dropping_a_granted_future_whose_waker_owns_a_guard_does_not_deadlock() {
    watchdog(WATCHDOG, || {
        let limiter = limiter(1);
        let mut fut = Box::pin(limiter.concurrency("a", 1).into_future());
        let guard = limiter.concurrency(["a", "pin"], 1).acquire().unwrap();
        let waker = waker_owning_guard(Some(guard));
        assert!(poll(&mut fut, &waker).is_pending());
        drop(waker);
        // Room for the future: it is granted (and its waker woken, which
        // consumes the engine's clone; the waiter keeps the last one).
        limiter
            .update_limit("a", LimitUpdate::new().limit(2))
            .unwrap();
        assert_eq!(held_and_waiting(&limiter, "a"), (2, 0));
        drop(fut);
        assert_eq!(held_and_waiting(&limiter, "a"), (0, 0));
        assert_eq!(held_and_waiting(&limiter, "pin"), (0, 0));
    });
}

/// A future failed while queued (its limit lowered below its occupy) and
/// dropped before it looks: `abandon` dropped the waiter under the lock.
#[test]
fn dropping_a_failed_future_whose_waker_owns_a_guard_does_not_deadlock() {
    watchdog(WATCHDOG, || {
        let limiter = limiter(2);
        let mut fut = Box::pin(limiter.concurrency("a", 2).into_future());
        let guard = limiter.concurrency(["a", "pin"], 1).acquire().unwrap();
        let waker = waker_owning_guard(Some(guard));
        assert!(poll(&mut fut, &waker).is_pending());
        drop(waker);
        limiter
            .update_limit("a", LimitUpdate::new().limit(1))
            .unwrap();
        drop(fut);
        assert_eq!(held_and_waiting(&limiter, "a"), (0, 0));
        assert_eq!(held_and_waiting(&limiter, "pin"), (0, 0));
    });
}

/// The same failed future, polled with a new waker: the old one goes (as in
/// the first test) and the future sees its error.
#[test]
fn polling_a_failed_future_with_a_new_waker_does_not_deadlock() {
    watchdog(WATCHDOG, || {
        let limiter = limiter(2);
        let mut fut = Box::pin(limiter.concurrency("a", 2).into_future());
        let guard = limiter.concurrency(["a", "pin"], 1).acquire().unwrap();
        let waker = waker_owning_guard(Some(guard));
        assert!(poll(&mut fut, &waker).is_pending());
        drop(waker);
        limiter
            .update_limit("a", LimitUpdate::new().limit(1))
            .unwrap();
        match poll(&mut fut, Waker::noop()) {
            Poll::Ready(Err(Error::OccupyExceedsLimit { .. })) => {}
            other => panic!("expected OccupyExceedsLimit, got {other:?}"),
        }
        assert_eq!(held_and_waiting(&limiter, "a"), (0, 0));
        assert_eq!(held_and_waiting(&limiter, "pin"), (0, 0));
    });
}

/// The timer thread's lock: a future with a timeout registers its waker with
/// the timer, and re-arms at every pending poll, cancelling the old entry.
/// If that entry holds the last clone of a waker that owns another future
/// with a timer, the drop cancels that one's entry: `Timer::cancel` dropped
/// the waker under the timer's own lock, and blocked on it.
#[test]
fn a_waker_owning_a_timed_future_is_dropped_outside_the_timer_lock() {
    watchdog(WATCHDOG, || {
        let limiter = limiter(1);
        let _full = limiter.concurrency("a", 1).acquire().unwrap();
        let mut inner = timed(&limiter);
        assert!(poll(&mut inner, Waker::noop()).is_pending());
        let waker = waker_owning_future(inner);
        let mut fut = timed(&limiter);
        assert!(poll(&mut fut, &waker).is_pending());
        assert_eq!(held_and_waiting(&limiter, "a"), (1, 2));
        drop(waker);
        // The engine's clone goes first (the timer's is still alive), then
        // the timer's, the last: it drops `inner`.
        assert!(poll(&mut fut, Waker::noop()).is_pending());
        assert_eq!(held_and_waiting(&limiter, "a"), (1, 1));
        drop(fut);
        assert_eq!(held_and_waiting(&limiter, "a"), (1, 0));
    });
}

/// The same waker, the outer future dropped instead: its timer entry is
/// cancelled first (not the last clone), then its waiter withdrawn, whose
/// waker is the last: it drops `inner`, which cancels its own timer entry
/// and withdraws from the engine.
#[test]
fn dropping_a_future_whose_waker_owns_a_timed_future_does_not_deadlock() {
    watchdog(WATCHDOG, || {
        let limiter = limiter(1);
        let _full = limiter.concurrency("a", 1).acquire().unwrap();
        let mut inner = timed(&limiter);
        assert!(poll(&mut inner, Waker::noop()).is_pending());
        let waker = waker_owning_future(inner);
        let mut fut = timed(&limiter);
        assert!(poll(&mut fut, &waker).is_pending());
        drop(waker);
        drop(fut);
        assert_eq!(held_and_waiting(&limiter, "a"), (1, 0));
    });
}

/// Observers are called outside every lock: one that reads the limiter (and
/// so takes the engine's lock) from inside `on_event`, for an acquisition
/// that waited and a release that handed its slot on, does not block.
#[test]
fn an_observer_may_use_the_limiter() {
    watchdog(WATCHDOG, || {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cell: Arc<Mutex<Option<Limiter>>> = Arc::default();
        let limiter = {
            let (seen, cell) = (seen.clone(), cell.clone());
            Limiter::builder()
                .on_event(move |_| {
                    let limiter = cell.lock().unwrap().clone();
                    if let Some(limiter) = limiter {
                        seen.lock().unwrap().push(limiter.limit("a").is_some());
                    }
                })
                .build()
                .unwrap()
        };
        *cell.lock().unwrap() = Some(limiter.clone());
        limiter.create_limit("a", LimitConfig::new(1)).unwrap();
        let guard = limiter.concurrency("a", 1).acquire().unwrap();
        let mut fut = Box::pin(limiter.concurrency("a", 1).into_future());
        assert!(poll(&mut fut, Waker::noop()).is_pending());
        drop(guard);
        let Poll::Ready(Ok(guard)) = poll(&mut fut, Waker::noop()) else {
            panic!("the released slot was not handed on");
        };
        drop(guard);
        // Break the cycle limiter -> observer -> limiter.
        cell.lock().unwrap().take();
        assert_eq!(*seen.lock().unwrap(), vec![true; 4]);
    });
}

/// A waker that runs its task inline, as some executors do: the task makes
/// an acquisition naming a missing limit, which a store must commit first.
struct RunsTaskInline {
    limiter: Limiter,
    ran: AtomicBool,
}

impl Wake for RunsTaskInline {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let made = self
            .limiter
            .concurrency("made-by-the-task", 1)
            .try_acquire();
        drop(made.expect("created and taken"));
        self.ran.store(true, Ordering::SeqCst);
    }
}

/// The store's writer applies another process's change (here an update that
/// grants a waiter) and wakes the waiter: `Db::pull` woke it while the
/// writer still held the store's lock, which the task then needed.
#[test]
fn the_store_writer_wakes_outside_the_store_lock() {
    watchdog(WATCHDOG, || {
        let dir = TempDir::new("waker-drop");
        let db = dir.path("limits.db");
        let limiter = Limiter::builder()
            .path(&db)
            .flush_interval(Duration::from_millis(10))
            .build()
            .unwrap();
        limiter.create_limit("x", LimitConfig::new(1)).unwrap();
        let full = limiter.concurrency("x", 1).acquire().unwrap();
        let task = Arc::new(RunsTaskInline {
            limiter: limiter.clone(),
            ran: AtomicBool::new(false),
        });
        let waker = Waker::from(task.clone());
        let mut fut = Box::pin(limiter.concurrency("x", 1).into_future());
        assert!(poll(&mut fut, &waker).is_pending());
        // Another process (the CLI) raises the limit; the owner's writer
        // picks it up, grants the future and wakes its task.
        let mut admin = Admin::open(&db).unwrap();
        admin
            .update_limit("x", LimitUpdate::new().limit(2))
            .unwrap();
        limiter.flush().unwrap();
        assert!(eventually(WATCHDOG, || task.ran.load(Ordering::SeqCst)));
        assert!(limiter.limit("made-by-the-task").is_some());
        let Poll::Ready(guard) = poll(&mut fut, &waker) else {
            panic!("granted by the update");
        };
        drop((guard.unwrap(), full, fut, waker, task));
    });
}
