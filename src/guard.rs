//! [`ConcurrencyGuard`]: held slots, given back on drop.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::Stamp;
use crate::event::Event;
use crate::limiter::{deliver, Shared};
use crate::state::EventNames;
use crate::waiters::{Ids, Wakes};

/// Slots held on one or more limits; dropping the guard gives them back (also
/// while a panic unwinds), and hands them to the waiters that now fit.
///
/// The guard keeps its limiter alive and can move to another thread or task.
#[must_use = "the slots are given back as soon as the guard is dropped"]
pub struct ConcurrencyGuard {
    shared: Arc<Shared>,
    ids: Ids,
    occupy: u32,
    /// When the guard was made, on the cheap clock: hold times feed only the
    /// occupancy average (floored at 0.1 s per slot) and `release`'s answer.
    acquired_at: Stamp,
    /// How long the slots had been held when the guard was made: those
    /// granted to a queued waiter are its from the grant, not from when its
    /// thread or task got round to taking them.
    held_before: Duration,
    released: bool,
    /// A hold on the PostgreSQL server, for shared limits.
    #[cfg(feature = "postgres")]
    remote: Option<crate::postgres::guard::Hold>,
}

impl ConcurrencyGuard {
    /// A guard for slots just taken, its hold time counted from now.
    pub(crate) fn new(shared: Arc<Shared>, ids: Ids, occupy: u32) -> Self {
        ConcurrencyGuard {
            shared,
            ids,
            occupy,
            acquired_at: Stamp::now(),
            held_before: Duration::ZERO,
            released: false,
            #[cfg(feature = "postgres")]
            remote: None,
        }
    }

    /// A guard of a hold on the PostgreSQL server.
    #[cfg(feature = "postgres")]
    pub(crate) fn remote(
        shared: Arc<Shared>,
        occupy: u32,
        hold: crate::postgres::guard::Hold,
    ) -> Self {
        let mut guard = ConcurrencyGuard::new(shared, Ids::new(), occupy);
        guard.remote = Some(hold);
        guard
    }

    /// Whether the guard's slots may be someone else's now: its limiter's
    /// lease on the database of shared limits expired (its process was cut
    /// off for longer than the lease) and the server gave them to others.
    /// Always `false` in one process.
    pub fn is_lost(&self) -> bool {
        #[cfg(feature = "postgres")]
        if let (Some(hold), Some(remote)) = (&self.remote, &self.shared.remote) {
            return hold.is_lost(&remote.inner);
        }
        false
    }

    /// A guard for slots granted at `granted_at` (a queued waiter's, handed
    /// to it by whoever made room), its hold time counted from then.
    pub(crate) fn granted(
        shared: Arc<Shared>,
        ids: Ids,
        occupy: u32,
        granted_at: Option<Instant>,
    ) -> Self {
        let mut guard = Self::new(shared, ids, occupy);
        if let Some(at) = granted_at {
            guard.held_before = Instant::now().saturating_duration_since(at);
        }
        guard
    }

    /// Gives the slots back now and returns how long they were held. For
    /// shared limits, returns once the slots are back on the server.
    pub fn release(mut self) -> Duration {
        #[cfg(feature = "postgres")]
        if self.remote.is_some() {
            return self.give_back_remote(true);
        }
        self.give_back()
    }

    /// Gives a shared hold back: now (`wait`), or sent in the background.
    #[cfg(feature = "postgres")]
    fn give_back_remote(&mut self, wait: bool) -> Duration {
        if std::mem::replace(&mut self.released, true) {
            return Duration::ZERO;
        }
        let held = self.held_for();
        let (Some(hold), Some(remote)) = (self.remote.take(), self.shared.remote.clone()) else {
            return held;
        };
        if let Some(names) = hold.give_back(&remote.inner, wait) {
            self.shared.emit(|| Event::Released {
                names,
                occupy: self.occupy,
                held,
            });
        }
        held
    }

    /// Slots held on each limit.
    pub fn occupy(&self) -> u32 {
        self.occupy
    }

    /// How long the slots have been held so far.
    pub fn held_for(&self) -> Duration {
        self.held_before + self.acquired_at.elapsed()
    }

    fn give_back(&mut self) -> Duration {
        // Dropped after `release`: nothing left to do, and no clock to read.
        if std::mem::replace(&mut self.released, true) {
            return Duration::ZERO;
        }
        let held = self.held_for();
        if self.ids.is_empty() {
            return held;
        }
        if let ([id], None) = (&self.ids[..], &self.shared.observer) {
            // A simple limit takes its slots back without the engine's lock.
            let index = &self.shared.index;
            if index
                .cells
                .get(id.idx)
                .is_some_and(|cell| cell.try_give_back(id.uid, self.occupy, held.as_secs_f64()))
            {
                if self.shared.store.is_some() {
                    index.cells.mark(id.idx);
                }
                return held;
            }
        }
        let mut names = self.shared.observer.as_ref().map(|_| EventNames::new());
        let mut state = self.shared.state.lock();
        if state.release(&self.ids, self.occupy, held, names.as_mut()) {
            // Waiters are queued on these limits: hand them what fits.
            let mut wakes = Wakes::new();
            state.pump_after(&self.ids, &mut wakes);
            drop(state);
            deliver(wakes);
        } else {
            drop(state);
        }
        let Some(names) = names else {
            return held;
        };
        if !names.is_empty() {
            self.shared.emit(|| Event::Released {
                names: names.iter().map(|n| n.to_string()).collect(),
                occupy: self.occupy,
                held,
            });
        }
        held
    }
}

impl Drop for ConcurrencyGuard {
    fn drop(&mut self) {
        #[cfg(feature = "postgres")]
        if self.remote.is_some() {
            self.give_back_remote(false);
            return;
        }
        self.give_back();
    }
}

impl fmt::Debug for ConcurrencyGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyGuard")
            .field("limits", &self.ids.len())
            .field("occupy", &self.occupy)
            .field("held_for", &self.held_for())
            .finish()
    }
}
