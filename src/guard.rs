//! [`ConcurrencyGuard`]: held slots, given back on drop.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    acquired_at: Instant,
    released: bool,
}

impl ConcurrencyGuard {
    pub(crate) fn new(shared: Arc<Shared>, ids: Ids, occupy: u32, acquired_at: Instant) -> Self {
        ConcurrencyGuard {
            shared,
            ids,
            occupy,
            acquired_at,
            released: false,
        }
    }

    /// Gives the slots back now and returns how long they were held.
    pub fn release(mut self) -> Duration {
        self.give_back()
    }

    /// Slots held on each limit.
    pub fn occupy(&self) -> u32 {
        self.occupy
    }

    /// How long the slots have been held so far.
    pub fn held_for(&self) -> Duration {
        self.acquired_at.elapsed()
    }

    fn give_back(&mut self) -> Duration {
        let now = Instant::now();
        let held = now.saturating_duration_since(self.acquired_at);
        if std::mem::replace(&mut self.released, true) || self.ids.is_empty() {
            return held;
        }
        let mut wakes = Wakes::new();
        let mut names = self.shared.observer.as_ref().map(|_| EventNames::new());
        self.shared.state.lock().release(
            &self.ids,
            self.occupy,
            held,
            now,
            names.as_mut(),
            &mut wakes,
        );
        deliver(wakes);
        if let Some(names) = names.filter(|n| !n.is_empty()) {
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
