//! The one error type of the crate.

use std::time::Duration;

/// Everything that can go wrong in turnstile.
///
/// The variants fall into three kinds, kept apart so that callers can react to
/// each in its own way:
///
/// * **never possible** — [`Error::OccupyExceedsLimit`], [`Error::NoSlotDecay`]:
///   retrying the same call cannot succeed until an operator changes the limit;
/// * **not now** — [`Error::Timeout`], [`Error::RetriesExhausted`]: the slots
///   were busy; the same call may succeed later;
/// * **wrong input** — [`Error::InvalidName`], [`Error::InvalidConfig`],
///   [`Error::InvalidOccupy`], [`Error::NotFound`], [`Error::AlreadyExists`];
///
/// plus the store's own: [`Error::StoreInUse`] and [`Error::Storage`].
///
/// Every message names the limit and the numbers involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The acquisition did not get its slots within its timeout.
    #[error("timed out after {waited:?} waiting for {occupy} slot(s) of {names}")]
    Timeout {
        /// The limits asked for, comma-separated.
        names: String,
        /// Slots asked for on each limit.
        occupy: u32,
        /// How long the acquisition waited in all.
        waited: Duration,
    },
    /// The acquisition was denied on its first attempt and on each of its
    /// `max_retries` retries (Prefect's `ConcurrencySlotAcquisitionError`).
    #[error("gave up on {occupy} slot(s) of {names} after {attempts} attempt(s)")]
    RetriesExhausted {
        /// The limits asked for, comma-separated.
        names: String,
        /// Slots asked for on each limit.
        occupy: u32,
        /// Attempts made: `1 + max_retries`.
        attempts: u32,
    },
    /// `occupy` is larger than the capacity of an (active, unpaused) limit,
    /// so the acquisition can never succeed.
    #[error("cannot occupy {occupy} slot(s) of limit {name:?}, whose limit is {limit}")]
    OccupyExceedsLimit {
        /// The limit.
        name: String,
        /// Slots asked for.
        occupy: u32,
        /// The limit's capacity.
        limit: u32,
    },
    /// `occupy` was 0.
    #[error("occupy must be at least 1, got {occupy}")]
    InvalidOccupy {
        /// The value given.
        occupy: u32,
    },
    /// No limit has this name.
    #[error("no limit named {name:?}")]
    NotFound {
        /// The missing name.
        name: String,
    },
    /// `create_limit` on a name that exists.
    #[error("a limit named {name:?} already exists")]
    AlreadyExists {
        /// The name.
        name: String,
    },
    /// A name that is empty, longer than 255 bytes, holds control characters
    /// or starts or ends with white space.
    #[error("invalid limit name {name:?}: {reason}")]
    InvalidName {
        /// The name given (possibly truncated for display).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value out of range.
    #[error("invalid configuration for limit {name:?}: {reason}")]
    InvalidConfig {
        /// The limit.
        name: String,
        /// What is wrong, with the value.
        reason: String,
    },
    /// `rate_limit` on an active limit whose `slot_decay_per_second` is 0:
    /// its slots would never drain.
    #[error(
        "limit {name:?} has no slot decay (slot_decay_per_second = 0), so rate_limit cannot use it"
    )]
    NoSlotDecay {
        /// The limit.
        name: String,
    },
    /// Another live `Limiter` owns the store.
    #[error("store {path} is in use by process {pid}")]
    StoreInUse {
        /// The store's path.
        path: String,
        /// The owner's process id.
        pid: u32,
    },
    /// The store could not be read or written, or is not a turnstile store.
    #[error("store {path}: {message}")]
    Storage {
        /// The store's path.
        path: String,
        /// What went wrong.
        message: String,
        /// The underlying error (SQLite's or the file system's), if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
}

/// Equal when the variant and its figures are; a `Storage` error's `source`
/// is left out, since underlying errors cannot be compared.
///
/// ```
/// use turnstile::Error;
/// assert_eq!(Error::InvalidOccupy { occupy: 0 }, Error::InvalidOccupy { occupy: 0 });
/// assert_ne!(Error::NotFound { name: "a".into() }, Error::AlreadyExists { name: "a".into() });
/// ```
impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        use Error::*;
        match (self, other) {
            (
                Timeout {
                    names,
                    occupy,
                    waited,
                },
                Timeout {
                    names: n,
                    occupy: o,
                    waited: w,
                },
            ) => (names, occupy, waited) == (n, o, w),
            (
                RetriesExhausted {
                    names,
                    occupy,
                    attempts,
                },
                RetriesExhausted {
                    names: n,
                    occupy: o,
                    attempts: a,
                },
            ) => (names, occupy, attempts) == (n, o, a),
            (
                OccupyExceedsLimit {
                    name,
                    occupy,
                    limit,
                },
                OccupyExceedsLimit {
                    name: n,
                    occupy: o,
                    limit: l,
                },
            ) => (name, occupy, limit) == (n, o, l),
            (InvalidOccupy { occupy }, InvalidOccupy { occupy: o }) => occupy == o,
            (NotFound { name }, NotFound { name: n })
            | (AlreadyExists { name }, AlreadyExists { name: n })
            | (NoSlotDecay { name }, NoSlotDecay { name: n }) => name == n,
            (InvalidName { name, reason }, InvalidName { name: n, reason: r })
            | (InvalidConfig { name, reason }, InvalidConfig { name: n, reason: r }) => {
                (name, reason) == (n, r)
            }
            (StoreInUse { path, pid }, StoreInUse { path: p, pid: i }) => (path, pid) == (p, i),
            (
                Storage { path, message, .. },
                Storage {
                    path: p,
                    message: m,
                    ..
                },
            ) => (path, message) == (p, m),
            _ => false,
        }
    }
}

impl Error {
    /// Whether this is [`Error::Timeout`].
    ///
    /// ```
    /// # use turnstile::{Limiter, LimitConfig};
    /// # use std::time::Duration;
    /// let limiter = Limiter::in_memory();
    /// limiter.create_limit("gpu", LimitConfig::new(1))?;
    /// let _held = limiter.concurrency("gpu", 1).acquire()?;
    /// let err = limiter.concurrency("gpu", 1).timeout(Duration::ZERO).acquire().unwrap_err();
    /// assert!(err.is_timeout());
    /// # Ok::<(), turnstile::Error>(())
    /// ```
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
}
