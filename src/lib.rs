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
