//! Retry budgets and decay instants with one watched limit per waiter:
//! regressions a review found (a retry charged for a change of an unrelated
//! limit, a waiter that fits failed for retries, a late grant backdated to
//! when it did not fit).

mod common;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use common::{eventually, watchdog, WATCHDOG};
use turnstile::{LimitConfig, LimitUpdate, Limiter};

struct Noop;
impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
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
