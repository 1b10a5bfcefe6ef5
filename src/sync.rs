//! The synchronisation the engine uses, in one place, so that a model checker
//! can stand in for it (as tokio does for loom).
//!
//! Normal builds re-export parking_lot's `Mutex`, std's thread parking and
//! turnstile's own timer thread. With the `model` feature (for
//! `tests/model_check.rs` only) they come from shuttle, whose scheduler then
//! controls every lock, park and wake-up of the engine:
//!
//! * `Mutex` is shuttle's, with parking_lot's signature (no poisoning), and
//!   the atomics of the lock-free paths are shuttle's too.
//! * `thread::park_timeout` returns at once: shuttle has no clock, so a timed
//!   wait ends at whatever scheduling point shuttle picks, then the caller
//!   looks at the real clock, which is what an early (spurious) return of the
//!   real `park_timeout` also leads to.
//! * The timer thread is replaced by one that wakes the task at once when it
//!   registers, for the same reason (a real thread outside shuttle could not
//!   wake shuttle's tasks).

#[cfg(not(feature = "model"))]
pub(crate) use parking_lot::{Mutex, MutexGuard};

#[cfg(not(feature = "model"))]
pub(crate) mod atomic {
    pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
}

#[cfg(not(feature = "model"))]
pub(crate) mod thread {
    pub(crate) use std::thread::{current, park, park_timeout, yield_now, Thread};
}

#[cfg(not(feature = "model"))]
pub(crate) mod timer {
    pub(crate) use crate::timer::{timer, TimerKey};
}

#[cfg(feature = "model")]
pub(crate) use model::{thread, timer, Mutex, MutexGuard};

#[cfg(feature = "model")]
pub(crate) mod atomic {
    pub(crate) use shuttle::sync::atomic::{AtomicU32, AtomicU64, Ordering};
}

#[cfg(feature = "model")]
mod model {
    use std::sync::PoisonError;

    /// shuttle's mutex behind parking_lot's signature.
    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(shuttle::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Mutex(shuttle::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> shuttle::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(PoisonError::into_inner)
        }
    }

    pub(crate) type MutexGuard<'a, T> = shuttle::sync::MutexGuard<'a, T>;

    pub(crate) mod thread {
        use std::time::Duration;

        pub(crate) use shuttle::thread::{current, park, yield_now, Thread};

        /// Returns at a scheduling point of shuttle's choosing.
        pub(crate) fn park_timeout(_: Duration) {
            shuttle::thread::yield_now();
        }
    }

    pub(crate) mod timer {
        use std::task::Waker;
        use std::time::Instant;

        #[derive(Debug, Clone, Copy)]
        pub(crate) struct TimerKey;

        pub(crate) struct Timer;

        pub(crate) fn timer() -> &'static Timer {
            &Timer
        }

        impl Timer {
            /// Wakes the task at once: it polls again, looks at the clock,
            /// and registers again if its instant has not come.
            pub(crate) fn register(&self, _at: Instant, waker: Waker) -> TimerKey {
                waker.wake();
                TimerKey
            }

            pub(crate) fn cancel(&self, _key: TimerKey) {}
        }
    }
}
