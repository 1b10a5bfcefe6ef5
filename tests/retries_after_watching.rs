//! Retry budgets and decay instants with one watched limit per waiter:
//! regressions a review found (a retry charged for a change of an unrelated
//! limit, a waiter that fits failed for retries, a late grant backdated to
//! when it did not fit, a retry count that set a decay instant without
//! arming a timer, a deactivation that cost no attempt).

mod common;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use common::{eventually, watchdog, WATCHDOG};
use turnstile::{Error, LimitConfig, LimitUpdate, Limiter};

struct Noop;
impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

/// A waker that raises a flag.
struct Flag(AtomicBool);
impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    let waker = Waker::from(Arc::new(Noop));
    Pin::new(fut).poll(&mut Context::from_waker(&waker))
}

/// Deleting (or deactivating) limit `a` is no release, decay or update of
/// limit `b`: a waiter that names only `b` must not be charged a retry for it.
#[test]
fn a_change_of_an_unrelated_limit_is_no_retry() {
    watchdog(WATCHDOG, || {
        for deactivate in [false, true] {
            let limiter = Limiter::in_memory();
            limiter.create_limit("a", LimitConfig::new(1)).unwrap();
            limiter.create_limit("b", LimitConfig::new(1)).unwrap();
            let _ga = limiter.concurrency("a", 1).acquire().unwrap();
            let gb = limiter.concurrency("b", 1).acquire().unwrap();
            // F waits on both a and b.
            let mut f = limiter.concurrency(["a", "b"], 1).into_future();
            assert!(poll_once(&mut f).is_pending());
            // G waits on b only, with one retry.
            let mut g = limiter.concurrency("b", 1).max_retries(1).into_future();
            assert!(poll_once(&mut g).is_pending());
            assert_eq!(limiter.limit("b").unwrap().waiters, 2);

            if deactivate {
                limiter
                    .update_limit("a", LimitUpdate::new().active(false))
                    .unwrap();
            } else {
                limiter.delete_limit("a").unwrap();
            }
            // Nothing happened on b: G must still be waiting.
            match poll_once(&mut g) {
                Poll::Pending => {}
                Poll::Ready(r) => panic!(
                    "deactivate={deactivate}: G finished without any change to b: {:?}",
                    r.map(|_| ())
                ),
            }
            assert_eq!(limiter.limit("b").unwrap().waiters, 2);
            drop(gb);
        }
    });
}

/// A waiter with a retry budget that fits when a release wakes it is
/// granted, not failed: here its decay instant has passed but its task has
/// not been polled yet (a busy executor) when a release on one of its limits
/// comes.
#[test]
fn a_waiter_that_fits_at_a_release_is_not_failed_for_retries() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter
            .create_limit("a", LimitConfig::new(2).slot_decay_per_second(20.0))
            .unwrap();
        limiter
            .create_limit("b", LimitConfig::new(1).slot_decay_per_second(5.0))
            .unwrap();
        let holder = limiter.concurrency("a", 1).acquire().unwrap();
        assert!(limiter.rate_limit("a", 1).try_acquire().unwrap());
        assert!(limiter.rate_limit("b", 1).try_acquire().unwrap());
        // W: a's decay lets it in after 50 ms, b's after 200 ms.
        let mut w = limiter
            .rate_limit(["a", "b"], 1)
            .max_retries(1)
            .into_future();
        assert!(poll_once(&mut w).is_pending());
        // Both buckets drain; W fits everywhere now, but is not polled.
        assert!(eventually(Duration::from_secs(10), || {
            limiter.limit("a").unwrap().active_slots == 1
                && limiter.limit("b").unwrap().active_slots == 0
        }));
        // A release on a: one wake-up, and W fits.
        drop(holder);
        match poll_once(&mut w) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => panic!("W fitted, yet: {e}"),
            Poll::Pending => panic!("W fits but is still queued"),
        }
    });
}

/// A rate-limit waiter whose decay instant passed while another of its
/// limits was full (held slots, after that limit was lowered) must not be
/// charged from that instant: the bucket had no room then.
#[test]
fn a_late_grant_is_not_backdated_to_when_it_did_not_fit() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter
            .create_limit("a", LimitConfig::new(2).slot_decay_per_second(1.0))
            .unwrap();
        limiter
            .create_limit("b", LimitConfig::new(1).slot_decay_per_second(20.0))
            .unwrap();
        assert!(limiter.rate_limit("b", 1).try_acquire().unwrap());
        let t0 = std::time::Instant::now();
        // W fits a, and b after 50 ms of decay.
        let mut w = limiter.rate_limit(["a", "b"], 1).into_future();
        assert!(poll_once(&mut w).is_pending());
        // a fills with a held slot, then is lowered to 1: W no longer fits a.
        let holder = limiter.concurrency("a", 1).acquire().unwrap();
        limiter
            .update_limit("a", LimitUpdate::new().limit(1))
            .unwrap();
        // Well past W's decay instant (b drained), a is still full.
        assert!(eventually(Duration::from_secs(10), || {
            limiter.limit("b").unwrap().active_slots == 0
                && t0.elapsed() > Duration::from_millis(1500)
        }));
        // a's holder leaves; W (not polled so far) now fits both.
        drop(holder);
        assert!(matches!(poll_once(&mut w), Poll::Ready(Ok(()))));
        // W's slot of a was taken just now: at 1 slot/s it is still there.
        let a = limiter.limit("a").unwrap();
        assert_eq!(a.active_slots, 1, "W's slot on a was charged from the past");
        assert!(!limiter.rate_limit("a", 1).try_acquire().unwrap());
    });
}

/// W (occupy 2, with a retry budget) is held back by held slots on `a` (it
/// watches `a`, no timer) and by decay on `b` (2 decaying of 3). One guard on both is released: the
/// pump of `b` runs first, its retry count finds W fits `a` now and needs
/// only `b`'s decay, moves W's watch to `b` and sets its decay instant, but
/// wakes nobody; the pump of `a` then skips W (no longer watching `a`). W
/// has no timer: with no timeout, it sleeps forever (the watchdog fires)
/// although it fits after 200 ms.
#[test]
fn a_retry_count_that_finds_a_decay_instant_arms_the_timer() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("a", LimitConfig::new(2)).unwrap();
        limiter
            .create_limit("b", LimitConfig::new(3).slot_decay_per_second(5.0))
            .unwrap();
        // b: 2 decaying slots, then 1 held (with 1 on a) by `both`.
        assert!(limiter.rate_limit("b", 2).try_acquire().unwrap());
        let both = limiter.concurrency(["a", "b"], 1).acquire().unwrap();
        let w = {
            let limiter = limiter.clone();
            std::thread::spawn(move || {
                limiter
                    .concurrency(["a", "b"], 2)
                    .max_retries(5)
                    .acquire()
                    .map(|_| ())
            })
        };
        assert!(eventually(Duration::from_secs(10), || {
            limiter.limit("a").unwrap().waiters == 1
        }));
        drop(both);
        // One of b's decaying slots drains in 200 ms; then W fits both.
        match w.join().unwrap() {
            Ok(()) => {}
            Err(e) => panic!("W fitted after 200 ms of decay, yet: {e}"),
        }
    });
}

/// The same with a hand-polled future: after the release, W's waker must be
/// called (within the decay time, generously bounded).
#[test]
fn a_retry_count_that_finds_a_decay_instant_wakes_the_task() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("a", LimitConfig::new(2)).unwrap();
        limiter
            .create_limit("b", LimitConfig::new(3).slot_decay_per_second(5.0))
            .unwrap();
        // b: 2 decaying slots, then 1 held (with 1 on a) by `both`.
        assert!(limiter.rate_limit("b", 2).try_acquire().unwrap());
        let both = limiter.concurrency(["a", "b"], 1).acquire().unwrap();
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let mut w = limiter
            .concurrency(["a", "b"], 2)
            .max_retries(5)
            .into_future();
        assert!(Pin::new(&mut w)
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        drop(both);
        assert!(
            eventually(Duration::from_secs(5), || flag.0.load(Ordering::SeqCst)),
            "W was never woken (no timer armed for its decay instant)"
        );
        // Once woken and polled after the decay, it is granted.
        assert!(eventually(Duration::from_secs(5), || {
            matches!(
                Pin::new(&mut w).poll(&mut Context::from_waker(&waker)),
                Poll::Ready(Ok(_))
            )
        }));
    });
}

/// API.md: a waiter with `max_retries` is attempted once each time it is
/// woken by "a release, decay, an update of its limits". Deactivating one
/// of its limits is an update of its limits (as raising its capacity is),
/// but since 8bc71d9 it cost no attempt. (An update that changes nothing is
/// charged nothing: see `a_no_op_update_costs_no_attempt`.)
#[test]
fn deactivating_a_named_limit_is_an_attempt() {
    watchdog(WATCHDOG, || {
        for deactivate in [true, false] {
            let limiter = Limiter::in_memory();
            limiter.create_limit("a", LimitConfig::new(1)).unwrap();
            limiter.create_limit("b", LimitConfig::new(1)).unwrap();
            let _ga = limiter.concurrency("a", 1).acquire().unwrap();
            let _gb = limiter.concurrency("b", 1).acquire().unwrap();
            let mut w = limiter
                .concurrency(["a", "b"], 1)
                .max_retries(1)
                .into_future();
            let waker = Waker::from(Arc::new(Flag(AtomicBool::new(false))));
            let mut cx = Context::from_waker(&waker);
            assert!(Pin::new(&mut w).poll(&mut cx).is_pending());
            // An update of a: W's one retry, denied (b is full): out of
            // retries.
            let update = if deactivate {
                LimitUpdate::new().active(false)
            } else {
                LimitUpdate::new().limit(2)
            };
            limiter.update_limit("a", update).unwrap();
            match Pin::new(&mut w).poll(&mut cx) {
                Poll::Ready(Err(Error::RetriesExhausted { attempts, .. })) => {
                    assert_eq!(attempts, 2)
                }
                Poll::Ready(r) => panic!("deactivate={deactivate}: {:?}", r.map(|_| ())),
                Poll::Pending => panic!(
                    "deactivate={deactivate}: an update of one of its limits after its \
                     first attempt, max_retries(1), yet still waiting"
                ),
            }
        }
    });
}

/// An update that changes nothing (an empty `LimitUpdate`, or the limit's
/// current capacity, activity and decay set again) is no change of the
/// waiter's limits: as a Prefect client retries only when something changed,
/// it costs a budgeted waiter no attempt. Two real changes still use up
/// `max_retries(2)`: the first attempt, then one retry per change, and the
/// third denied attempt fails it.
#[test]
fn a_no_op_update_costs_no_attempt() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter
            .create_limit("gpu", LimitConfig::new(1).slot_decay_per_second(0.5))
            .unwrap();
        let _held = limiter.concurrency("gpu", 1).acquire().unwrap();
        let mut waiter = limiter.concurrency("gpu", 1).max_retries(2).into_future();
        assert!(poll_once(&mut waiter).is_pending());
        let no_ops = [
            LimitUpdate::new(),
            LimitUpdate::new().limit(1),
            LimitUpdate::new().active(true),
            LimitUpdate::new().slot_decay_per_second(0.5),
            LimitUpdate::new()
                .limit(1)
                .active(true)
                .slot_decay_per_second(0.5),
        ];
        for round in 0..3 {
            for update in &no_ops {
                limiter.update_limit("gpu", update.clone()).unwrap();
                match poll_once(&mut waiter) {
                    Poll::Pending => {}
                    Poll::Ready(r) => panic!(
                        "round {round}: a no-op update {update:?} ended the wait: {:?}",
                        r.map(|_| ())
                    ),
                }
            }
        }
        assert_eq!(limiter.limit("gpu").unwrap().waiters, 1);
        // A real change (still full) is its one retry...
        limiter
            .update_limit("gpu", LimitUpdate::new().slot_decay_per_second(1.0))
            .unwrap();
        assert!(poll_once(&mut waiter).is_pending(), "one retry left");
        // ...and the next one is more than its budget.
        limiter
            .update_limit("gpu", LimitUpdate::new().slot_decay_per_second(2.0))
            .unwrap();
        match poll_once(&mut waiter) {
            Poll::Ready(Err(Error::RetriesExhausted { attempts, .. })) => assert_eq!(attempts, 3),
            other => panic!(
                "expected RetriesExhausted, got {:?}",
                other.map(|r| r.map(|_| ()))
            ),
        }
        assert_eq!(limiter.limit("gpu").unwrap().waiters, 0);
    });
}
