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
//! * Each acquisition, look and release is one round trip. An `.await` on a
//!   shared limit makes those round trips inside `poll` (a fraction of a
//!   millisecond on a nearby server), and waits between them without
//!   blocking the executor.
//! * Advisory locks and `LISTEN` belong to a session: connect directly, or
//!   through a session-pooling proxy, not a transaction-pooling one.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod acquire;
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
