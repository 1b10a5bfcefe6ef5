//! # turnstile
//!
//! Prefect's *global concurrency limits*, in one process: a registry of named
//! limits whose slots worker threads and async tasks take and give back, in
//! nanoseconds, fairly, and all-or-nothing across several limits.
//!
//! ## The model
//!
//! * A **limit** is a named counter of *slots* with a capacity (`limit`), a
//!   flag `active` and a `slot_decay_per_second`.
//! * [`Limiter::concurrency`] takes `occupy` slots from **each** named limit
//!   and holds them until the [`ConcurrencyGuard`] drops.
//! * [`Limiter::rate_limit`] takes `occupy` *decaying* slots, which are never
//!   given back but drain continuously at `slot_decay_per_second`: a token
//!   bucket whose capacity is `limit`.
//! * An acquisition fits a limit when `held + decaying + occupy <= limit`.
//!   Across several limits it takes from all at the same instant or from none.
//! * Waiters are served first come, first served on every limit they share;
//!   a release hands its slots straight to the waiters that now fit and wakes
//!   exactly those.
//! * Inactive limits let everything through; `limit == 0` pauses a limit.
//!
//! ## A worker pool
//!
//! ```
//! use std::thread;
//! use std::time::Duration;
//! use turnstile::{Limiter, LimitConfig};
//!
//! let limiter = Limiter::in_memory();
//! limiter.create_limit("gpu", LimitConfig::new(2))?;
//! limiter.create_limit("api", LimitConfig::new(5).slot_decay_per_second(100.0))?;
//!
//! let workers: Vec<_> = (0..4)
//!     .map(|job| {
//!         let limiter = limiter.clone();
//!         thread::spawn(move || -> Result<(), turnstile::Error> {
//!             // Big jobs take both GPU slots.
//!             let occupy = if job % 2 == 0 { 2 } else { 1 };
//!             let _gpu = limiter
//!                 .concurrency("gpu", occupy)
//!                 .timeout(Duration::from_secs(10))
//!                 .acquire()?;
//!             limiter.rate_limit("api", 1).acquire()?; // at most 100 calls/s
//!             Ok(())
//!         })
//!     })
//!     .collect();
//! for worker in workers {
//!     worker.join().unwrap()?;
//! }
//! assert_eq!(limiter.limit("gpu").unwrap().held_slots, 0);
//! # Ok::<(), turnstile::Error>(())
//! ```
//!
//! ## Async
//!
//! The builders are [`IntoFuture`](std::future::IntoFuture): `.await` them
//! under any executor. Dropping the future gives back anything it took.
//!
//! ```
//! # use turnstile::{Limiter, LimitConfig};
//! # let limiter = Limiter::in_memory();
//! # limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
//! futures::executor::block_on(async {
//!     let guard = limiter.concurrency("gpu", 1).await?;
//!     drop(guard);
//!     Ok::<(), turnstile::Error>(())
//! })?;
//! # Ok::<(), turnstile::Error>(())
//! ```
//!
//! Nothing happens before the first poll. That poll makes the same first
//! attempt as the blocking form, on the same lock-free path when one name is
//! asked for and fits: the future keeps a name of up to 40 bytes inline, so
//! an `.await` that fits at once allocates nothing and reads no clock (a
//! `String` name costs only the `String`). Measured on 2 shared cores (an
//! `.await` plus the guard's release, medians of interleaved batches,
//! `examples/async_overhead.rs`): 72 ns, 1.05× the blocking `acquire()`
//! (69 ns; the `.await` was 2.5× it before this path), and about 2.3×
//! tokio's `acquire().await` (31 to 33 ns), which has no names to look up.
//! An acquisition that must wait, or that names several limits, owns its
//! names and its queue entry on the heap. On shared limits (PostgreSQL) the
//! future makes its request at its first poll, and waits on the server.
//!
//! ### Cooperative scheduling
//!
//! A future that is ready at its first poll never returns to its executor,
//! so a task looping on acquisitions that always fit would keep its worker
//! thread to itself: with 4 tasks on a 2-thread tokio runtime looping on a
//! limit of 4 with no hold, two tasks made no acquisition at all (fairness,
//! the fewest acquisitions of a task over the most in a 50 ms window, 0.00
//! in 40 windows of 40). tokio's own semaphore avoids this by charging the
//! runtime's per-task budget, which only tokio can see; turnstile works
//! under any executor, so it keeps a budget of its own: after **128**
//! acquisitions in a row granted at first poll to one task on one thread (the
//! task known by its waker, with no other task's acquisition and no wait in
//! between), the next one returns `Pending` once, having woken its task,
//! before it attempts anything. The task goes to the back of its executor's
//! queue, like tokio's `yield_now`. With it, in the same test no task is
//! ever starved (no window at 0 in 160), with median fairness 0.3 to 0.8
//! and worst windows 0.02 to 0.2; tokio's semaphore in the same runs:
//! medians 0.5 to 0.9, worst 0.05 to 0.56. What remains is how the runtime
//! spreads 4 tasks over 2 threads (3 on one, 1 on the other gives 0.33);
//! `examples/async_fairness.rs` measures it. It costs the uncontended
//! `.await` about 14 instructions (1 to 2 ns) and one extra poll per 128
//! acquisitions. An optional `tokio` feature that spends tokio's own budget
//! was not taken: it would tie the build to tokio's internals and help only
//! under tokio.
//!
//! ### Cancel safety
//!
//! A future can be dropped at any point: before its first poll, after it
//! yielded for the budget (it has taken nothing and is queued nowhere),
//! while queued, or after slots were granted to it but before it was polled
//! again (they go to the next waiter). It leaves nothing taken and nobody
//! queued.
//!
//! ## Persistence
//!
//! [`Limiter::open`] keeps the limits in an SQLite file. Definitions are
//! committed before each call returns; slot state is written behind by one
//! thread, at most once per `flush_interval`, and never on the acquire path.
//! On reopening, decaying slots come back drained by the time that passed and
//! the dead owner's held slots are free. One live limiter owns a store
//! ([`Error::StoreInUse`] otherwise).
//!
//! ```
//! # use turnstile::{Limiter, LimitConfig};
//! # let dir = std::env::temp_dir().join(format!("turnstile-lib-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("limits.db");
//! # let _ = std::fs::remove_file(&path);
//! {
//!     let limiter = Limiter::open(&path)?;
//!     limiter.create_limit("gpu", LimitConfig::new(2))?;
//! } // dropped: flushed and closed
//! let limiter = Limiter::open(&path)?;
//! assert_eq!(limiter.limit("gpu").unwrap().limit, 2);
//! # drop(limiter);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), turnstile::Error>(())
//! ```
//!
//! ## Operating limits
//!
//! The `turnstile` binary (`turnstile --db limits.db ls`, `create`, `update`,
//! `enable`, `disable`, `reset`, `delete`, `inspect`, `watch`) administers a
//! store, also while its owner runs; the owner applies what it changes
//! within `flush_interval`. [`Admin`] is the same from code.
//!
//! ## Shared limits (PostgreSQL)
//!
//! With the `postgres` feature (on by default), [`Limiter::connect`] shares
//! limits among every process, on every host, connected to one database and
//! namespace: the same API, all-or-nothing, first come first served across
//! processes, push hand-off (a release grants the waiters that now fit and
//! notifies exactly those), decay timed by the server's clock.
//!
//! ```no_run
//! # use std::time::Duration;
//! # use turnstile::{Limiter, LimitConfig};
//! let limiter = Limiter::builder()
//!     .postgres("postgres://app@db.internal/limits")
//!     .namespace("team_a")
//!     .lease(Duration::from_secs(30))
//!     .build()?;
//! let guard = limiter.concurrency("gpu", 1).timeout(Duration::from_secs(5)).acquire()?;
//! assert!(!guard.is_lost());
//! # Ok::<(), turnstile::Error>(())
//! ```
//!
//! * A process that ends, even by `kill -9`, gives everything back as soon
//!   as the server notices its session is gone (about a second).
//! * A process cut off from the database keeps its slots until its lease
//!   runs out, counted from its last renewal; then they go to others, its
//!   guards report [`ConcurrencyGuard::is_lost`], and the observer hears
//!   [`Event::LeaseLost`] once per guard.
//! * While the database is away, blocking and async acquisitions wait for
//!   it within their timeout; `try_acquire` and the management methods
//!   ([`Limiter::try_limit`], ...) return [`Error::Storage`] at once.
//! * Every call to the server has a deadline: the acquisition's timeout,
//!   or 10 s for a call without one. A server that accepts and then stops
//!   answering (frozen, or behind a stalled proxy) therefore fails the call
//!   with [`Error::Storage`] ("did not answer"), or the acquisition with
//!   [`Error::Timeout`], on time; the connection is closed and the next
//!   call opens a new one. Dropping a limiter then takes up to those 10 s.
//! * Each acquisition, look and release is one round trip. An `.await` on a
//!   shared limit makes those round trips inside `poll` (a fraction of a
//!   millisecond on a nearby server), and waits between them without
//!   blocking the executor.
//! * Advisory locks and `LISTEN` belong to a session: connect directly, or
//!   through a session-pooling proxy, not a transaction-pooling one.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod acquire;
mod backend;
mod cell;
mod clock;
mod config;
mod error;
mod event;
mod guard;
mod limiter;
mod names;
#[cfg(feature = "postgres")]
mod postgres;
mod recent;
mod registry;
mod slots;
mod state;
mod store;
mod sync;
// Under the model, crate::sync replaces the timer thread.
#[cfg_attr(feature = "model", allow(dead_code))]
mod timer;
mod waiters;

pub use acquire::{Acquire, AcquireFuture, RateLimit, RateLimitFuture};
pub use config::{LimitConfig, LimitInfo, LimitUpdate, MAX_NAME_LEN};
pub use error::Error;
pub use event::Event;
pub use guard::ConcurrencyGuard;
pub use limiter::{Limiter, LimiterBuilder, DEFAULT_FLUSH_INTERVAL};
pub use names::{IntoNames, Names};
pub use store::admin::Admin;

/// Compile-time checks of the auto traits the contract promises.
#[allow(dead_code)]
fn bounds() {
    fn send_sync_static<T: Send + Sync + 'static>() {}
    fn send_static<T: Send + 'static>() {}
    send_sync_static::<Limiter>();
    send_sync_static::<Error>();
    send_sync_static::<Event>();
    send_static::<ConcurrencyGuard>();
    send_static::<AcquireFuture>();
    send_static::<RateLimitFuture>();
}
