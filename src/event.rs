//! What an `on_event` observer is told.

use std::sync::Arc;
use std::time::Duration;

/// Something that happened to slots, told to the observer given to
/// [`LimiterBuilder::on_event`](crate::LimiterBuilder::on_event) synchronously,
/// on the thread that caused it, after the state change and outside every
/// internal lock. Names are those of the active limits slots were taken from
/// or given back to (Prefect's `prefect.concurrency-limit.acquired` and
/// `.released`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// Slots were taken.
    Acquired {
        /// The active limits taken from.
        names: Vec<String>,
        /// Slots taken from each.
        occupy: u32,
        /// How long the acquisition waited.
        waited: Duration,
        /// Whether these are decaying slots of `rate_limit` (never released).
        rate_limit: bool,
    },
    /// A guard gave its slots back.
    Released {
        /// The limits given back to (deleted ones are left out).
        names: Vec<String>,
        /// Slots given back to each.
        occupy: u32,
        /// How long they were held.
        held: Duration,
    },
    /// Shared limits only: a guard's lease expired (its process was cut off
    /// from the database for longer than the lease), so its slots may be
    /// someone else's now. Emitted once per guard, on the limiter's
    /// background thread; the guard's `is_lost()` is then `true`.
    LeaseLost {
        /// The limits whose slots it held.
        names: Vec<String>,
        /// Slots it held on each.
        occupy: u32,
    },
}

/// The observer, shared by every clone of a limiter.
pub(crate) type Observer = Arc<dyn Fn(&Event) + Send + Sync + 'static>;
