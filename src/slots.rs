//! Pure slot accounting for one limit: does an acquisition fit, take, give
//! back, and the exact fractional decay of rate-limit slots.
//!
//! Time is always passed in; nothing here reads a clock or takes a lock, so
//! the arithmetic is tested without sleeping.

use std::time::{Duration, Instant};

use crate::clock::LazyNow;

/// Slack for float rounding when comparing decaying slots against room: a
/// waiter woken at the computed instant must find that it fits.
const EPSILON: f64 = 1e-9;

/// The occupancy of one limit.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    /// Capacity; 0 pauses the limit.
    pub limit: u32,
    /// Slots held by live guards, while the engine's lock holder owns the
    /// limit (see [`crate::cell`]); a `Cell` so that claiming a limit can set
    /// it through a shared reference.
    held: std::cell::Cell<u64>,
    /// Slots taken by `rate_limit`, as of `at`; they drain at `rate` per second.
    decaying: f64,
    /// When `decaying` was last brought up to date.
    at: Instant,
    /// Slots drained per second.
    rate: f64,
}

impl Slots {
    pub fn new(limit: u32, rate: f64, now: Instant) -> Self {
        Slots {
            limit,
            held: std::cell::Cell::new(0),
            decaying: 0.0,
            at: now,
            rate,
        }
    }

    pub fn held(&self) -> u64 {
        self.held.get()
    }

    pub fn set_held(&self, held: u64) {
        self.held.set(held);
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Decaying slots left at `now` (never negative; a `now` before the last
    /// update drains nothing).
    pub fn decaying(&self, now: Instant) -> f64 {
        if self.decaying <= 0.0 || self.rate <= 0.0 {
            return self.decaying.max(0.0);
        }
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        (self.decaying - self.rate * secs).max(0.0)
    }

    /// Whether any decaying slots may be left, i.e. whether fitting depends
    /// on the time at all.
    #[inline]
    pub fn has_decaying(&self) -> bool {
        self.decaying > 0.0
    }

    /// Held plus decaying slots, the decaying ones rounded up.
    pub fn active_slots(&self, now: Instant) -> u32 {
        let decaying = (self.decaying(now) - EPSILON).max(0.0).ceil();
        (self.held() as f64 + decaying).min(u32::MAX as f64) as u32
    }

    /// Whether `occupy` more slots fit behind `reserved` slots promised to
    /// earlier waiters, leaving decay aside.
    pub fn fits_held(&self, reserved: u64, occupy: u32) -> bool {
        self.held() + reserved + u64::from(occupy) <= u64::from(self.limit)
    }

    /// [`Slots::fits`], reading the clock only if decaying slots are left.
    #[inline]
    pub fn fits_lazy(&self, reserved: u64, occupy: u32, now: &mut LazyNow) -> bool {
        self.fits_held(reserved, occupy)
            && (!self.has_decaying() || self.fits(reserved, occupy, now.get()))
    }

    /// Whether `occupy` more slots fit at `now` behind `reserved` slots.
    pub fn fits(&self, reserved: u64, occupy: u32, now: Instant) -> bool {
        self.fits_held(reserved, occupy)
            && self.decaying(now) <= self.room(reserved, occupy) + EPSILON
    }

    /// Room left for decaying slots once held, reserved and `occupy` are in.
    fn room(&self, reserved: u64, occupy: u32) -> f64 {
        (u64::from(self.limit) - self.held() - reserved - u64::from(occupy)) as f64
    }

    /// When `occupy` slots behind `reserved` will fit by decay alone: `now` if
    /// they fit already, `None` if decay cannot make room (held or reserved
    /// slots are in the way, or nothing decays).
    pub fn fits_at(&self, reserved: u64, occupy: u32, now: Instant) -> Option<Instant> {
        if !self.fits_held(reserved, occupy) {
            return None;
        }
        // A `now` read before the last take (its reader waited for the
        // lock) counts from that take: decay has not started before it.
        let now = now.max(self.at);
        let excess = self.decaying(now) - self.room(reserved, occupy);
        if excess <= EPSILON {
            return Some(now);
        }
        if self.rate <= 0.0 {
            return None;
        }
        // Rounded up to the nanosecond, so that at the instant it fits.
        let nanos = (excess / self.rate * 1e9).ceil();
        if !nanos.is_finite() || nanos >= u64::MAX as f64 {
            return None;
        }
        now.checked_add(Duration::from_nanos(nanos as u64))
    }

    pub fn take_held(&self, occupy: u32) {
        self.held.set(self.held() + u64::from(occupy));
    }

    pub fn give_back(&self, occupy: u32) {
        self.held.set(self.held().saturating_sub(u64::from(occupy)));
    }

    /// Takes `occupy` decaying slots as of `since` (at most now): a waiter
    /// that fitted at `since` but ran a little later is not charged for its
    /// lateness, so timer slack costs no pace.
    pub fn take_decaying(&mut self, occupy: u32, since: Instant) {
        let since = since.max(self.at);
        self.decaying = self.decaying(since) + f64::from(occupy);
        self.at = since;
    }

    /// Gives back decaying slots that were granted but never used (their
    /// acquisition was cancelled at the instant of the grant).
    pub fn untake_decaying(&mut self, occupy: u32, now: Instant) {
        self.settle(now);
        self.decaying = (self.decaying - f64::from(occupy)).max(0.0);
    }

    /// Brings the decaying slots up to `now`.
    fn settle(&mut self, now: Instant) {
        self.decaying = self.decaying(now);
        self.at = self.at.max(now);
    }

    /// Forgets decaying slots that have all drained by `now`, so that the
    /// limit no longer depends on the time (and may go lock-free again). The
    /// last update moves to the instant they finished draining: a take
    /// backdated to before it (a rate-limit waiter charged from its decay
    /// instant) is charged from that instant, when nothing was left, rather
    /// than from an empty bucket at an earlier time when some still was.
    pub fn forget_drained(&mut self, now: Instant) {
        if !self.has_decaying() || self.decaying(now) > 0.0 {
            return;
        }
        let drained_at = Duration::try_from_secs_f64(self.decaying / self.rate)
            .ok()
            .and_then(|d| self.at.checked_add(d))
            .map_or(now, |t| t.min(now));
        self.at = self.at.max(drained_at);
        self.decaying = 0.0;
    }

    /// Changes the decay rate from `now` on; what drained before stays drained.
    pub fn set_rate(&mut self, rate: f64, now: Instant) {
        self.settle(now);
        self.rate = rate;
    }

    /// Drops every decaying slot.
    pub fn reset_decaying(&mut self, now: Instant) {
        self.decaying = 0.0;
        self.at = self.at.max(now);
    }

    /// Restores decaying slots (from the store), as of `now`.
    #[allow(dead_code)]
    pub fn restore_decaying(&mut self, decaying: f64, now: Instant) {
        self.decaying = decaying.max(0.0);
        self.at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// A `now` read before the last take (its reader waited for the lock)
    /// must not make the fit instant early.
    #[test]
    fn fits_at_from_a_clock_read_before_the_last_take_is_not_early() {
        let t = Instant::now();
        let mut s = Slots::new(1, 10.0, t);
        s.take_decaying(1, t + secs(1.0));
        let at = s.fits_at(0, 1, t + secs(0.5)).unwrap();
        assert!(s.fits(0, 1, at), "fits_at said {:?} after t", at - t);
        assert!(at - t < secs(1.1) + secs(1e-6), "{:?}", at - t);
    }

    #[test]
    fn held_slots_fit_up_to_the_limit() {
        let t = Instant::now();
        let s = Slots::new(3, 0.0, t);
        assert!(s.fits(0, 3, t));
        assert!(!s.fits(0, 4, t));
        s.take_held(2);
        assert!(s.fits(0, 1, t));
        assert!(!s.fits(1, 1, t), "a reservation counts");
        assert!(!s.fits(0, 2, t));
        s.give_back(2);
        assert!(s.fits(0, 3, t));
        assert_eq!(s.fits_at(0, 4, t), None);
    }

    #[test]
    fn a_paused_limit_fits_nothing() {
        let t = Instant::now();
        let s = Slots::new(0, 1.0, t);
        assert!(!s.fits(0, 1, t));
        assert_eq!(s.fits_at(0, 1, t), None);
    }

    #[test]
    fn decay_is_exact_and_fractional() {
        let t = Instant::now();
        let mut s = Slots::new(10, 4.0, t);
        s.take_decaying(10, t);
        assert_eq!(s.decaying(t), 10.0);
        assert!((s.decaying(t + secs(0.25)) - 9.0).abs() < 1e-9);
        assert!((s.decaying(t + secs(0.1)) - 9.6).abs() < 1e-9);
        assert_eq!(s.active_slots(t + secs(0.1)), 10, "rounded up");
        assert_eq!(s.active_slots(t + secs(0.25)), 9);
        assert_eq!(s.decaying(t + secs(10.0)), 0.0, "never negative");
        assert_eq!(s.active_slots(t + secs(10.0)), 0);
    }

    #[test]
    fn fits_at_is_the_exact_instant() {
        let t = Instant::now();
        let mut s = Slots::new(10, 4.0, t);
        s.take_decaying(10, t);
        // 3 slots need 3 / 4 s of draining.
        let at = s.fits_at(0, 3, t).unwrap();
        assert!((at - t).as_secs_f64() - 0.75 < 1e-9);
        assert!(s.fits(0, 3, at), "fits at the computed instant");
        assert!(!s.fits(0, 3, at - secs(0.001)));
        // A reservation by an earlier waiter pushes the instant out.
        let later = s.fits_at(2, 3, t).unwrap();
        assert!(((later - t).as_secs_f64() - 1.25).abs() < 1e-9);
        // Held slots are not drained by decay.
        s.take_held(9);
        assert_eq!(s.fits_at(0, 2, t), None);
    }

    #[test]
    fn drained_slots_are_forgotten_only_once_drained() {
        let t = Instant::now();
        let mut s = Slots::new(2, 4.0, t);
        s.take_decaying(1, t);
        s.forget_drained(t + secs(0.2));
        assert!(s.has_decaying(), "0.2 of a slot left");
        s.forget_drained(t + secs(0.3));
        assert!(!s.has_decaying());
        assert!(s.fits(0, 2, t + secs(0.3)));
        // A take backdated to before the slot drained counts from then.
        s.take_decaying(2, t + secs(0.1));
        let next = s.fits_at(0, 1, t + secs(0.3)).unwrap();
        assert!((next - t).as_secs_f64() >= 0.5 - 1e-9, "{:?}", next - t);
    }

    #[test]
    fn no_decay_means_never() {
        let t = Instant::now();
        let mut s = Slots::new(2, 0.0, t);
        s.take_decaying(2, t);
        assert_eq!(s.decaying(t + secs(100.0)), 2.0);
        assert_eq!(s.fits_at(0, 1, t), None);
    }

    #[test]
    fn a_clock_before_the_last_update_drains_nothing() {
        let t = Instant::now() + secs(5.0);
        let mut s = Slots::new(5, 1.0, t);
        s.take_decaying(5, t);
        assert_eq!(s.decaying(t - secs(1.0)), 5.0);
    }

    #[test]
    fn a_backdated_take_keeps_the_pace() {
        // limit 1, 1000/s: the waiter fitted at t + 1 ms but ran 60 µs late.
        let t = Instant::now();
        let mut s = Slots::new(1, 1000.0, t);
        s.take_decaying(1, t);
        let fitted = s.fits_at(0, 1, t).unwrap();
        let late = fitted + Duration::from_micros(60);
        s.take_decaying(1, fitted);
        // The next slot is free 1 ms after `fitted`, not after `late`.
        let next = s.fits_at(0, 1, late).unwrap();
        assert!(((next - fitted).as_secs_f64() - 0.001).abs() < 1e-9);
    }

    #[test]
    fn a_new_rate_applies_from_now() {
        let t = Instant::now();
        let mut s = Slots::new(10, 1.0, t);
        s.take_decaying(10, t);
        s.set_rate(0.0, t + secs(2.0));
        assert!((s.decaying(t + secs(100.0)) - 8.0).abs() < 1e-9);
        s.set_rate(8.0, t + secs(100.0));
        assert!((s.decaying(t + secs(100.5)) - 4.0).abs() < 1e-9);
        s.reset_decaying(t + secs(100.5));
        assert_eq!(s.decaying(t + secs(100.5)), 0.0);
    }
}
