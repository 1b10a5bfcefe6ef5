//! The cheap clock for hold times.
//!
//! A guard's hold time feeds only the occupancy average (which floors at
//! 0.1 s per slot) and [`ConcurrencyGuard::release`]'s answer, so it does not
//! need `Instant::now()`'s system call path: a raw read of the CPU's
//! time-stamp counter, scaled only when a duration is asked for, costs a
//! fraction of it. Deadlines and decay keep [`std::time::Instant`].
//!
//! [`ConcurrencyGuard::release`]: crate::ConcurrencyGuard::release

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Calibrated once, on the first guard.
fn clock() -> &'static quanta::Clock {
    static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new)
}

/// Calibrates the cheap clock now (a few milliseconds, once per process), so
/// that the first acquisition does not pay for it.
pub(crate) fn calibrate() {
    clock();
}

/// A moment on the cheap clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamp(u64);

impl Stamp {
    #[inline]
    pub fn now() -> Stamp {
        Stamp(clock().raw())
    }

    /// Time since this stamp; zero if the counter appears to have gone back
    /// (a guard dropped on a core whose counter lags).
    #[inline]
    pub fn elapsed(self) -> Duration {
        let clock = clock();
        clock.delta(self.0, clock.raw())
    }
}

/// `Instant::now()`, read at most once and only if something needs it: an
/// acquisition that fits without decay in play reads no clock at all.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LazyNow(Option<Instant>);

impl LazyNow {
    /// Already read.
    pub fn at(now: Instant) -> LazyNow {
        LazyNow(Some(now))
    }

    #[inline]
    pub fn get(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}
