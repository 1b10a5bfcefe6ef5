//! The public face: [`Limiter`] and [`LimiterBuilder`].

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::acquire::{Acquire, RateLimit};
use crate::backend::Manage;
use crate::event::{Event, Observer};
use crate::names::IntoNames;
use crate::registry::Index;
use crate::state::{Engine, State};
use crate::store::{Change, Store};
use crate::waiters::Wakes;
use crate::{Error, LimitConfig, LimitInfo, LimitUpdate};

/// What every clone of a limiter, and every guard, shares.
pub(crate) struct Shared {
    pub state: Arc<Engine>,
    /// What the lock-free paths reach (the registry's, shared).
    pub index: Arc<Index>,
    /// This limiter's id among the process's, for threads' memory of names.
    pub id: u64,
    pub observer: Option<Observer>,
    /// The SQLite store, if any; dropping it flushes and stops its writer.
    pub store: Option<Store>,
    /// Shared limits on PostgreSQL, if connected: then every operation goes
    /// to the server, and the in-process engine above stays empty.
    #[cfg(feature = "postgres")]
    pub remote: Option<Arc<crate::postgres::Remote>>,
}

impl Shared {
    /// Creates missing limits (inactive, limit 1) for an acquisition, each
    /// committed to the store before it exists in memory.
    pub fn create_missing(&self, names: &[String]) -> Result<(), Error> {
        let config = LimitConfig::new(1).active(false);
        let Some(store) = &self.store else {
            let mut state = self.state.lock();
            for name in names {
                let _ = state.create(name, &config, Instant::now());
            }
            return Ok(());
        };
        let mut wakes = Wakes::new();
        let mut db = store.persist.db.lock();
        let created = names.iter().try_for_each(|name| {
            if self.state.lock().reg.lookup(name).is_some() {
                return Ok(());
            }
            let change = Change::Create(config.clone());
            match db.commit(name, &change) {
                Ok(incarnation) => {
                    let mut state = self.state.lock();
                    if state.create(name, &config, Instant::now()).is_ok() {
                        let limit = state.reg.by_name_mut(name).expect("created");
                        change.record(limit, incarnation);
                    }
                    Ok(())
                }
                // Created by another process (the CLI) since the writer last
                // looked: take its definition now, as the writer would have.
                Err(Error::AlreadyExists { .. }) => db.pull(&self.state, &mut wakes),
                Err(err) => Err(err),
            }
        });
        drop(db);
        deliver(wakes);
        created
    }

    /// Runs one definition change: with a store, `plan` validates it and the
    /// store commits it before `apply` changes memory, all under the store's
    /// lock, so memory never holds a definition the file lacks.
    fn change<R>(
        &self,
        name: &str,
        plan: impl FnOnce(&State) -> Result<Change, Error>,
        apply: impl FnOnce(&mut State, Instant, &mut Wakes) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let mut db = self.store.as_ref().map(|s| s.persist.db.lock());
        let committed = match db.as_mut() {
            Some(db) => {
                let change = plan(&self.state.lock())?;
                let incarnation = db.commit(name, &change)?;
                Some((change, incarnation))
            }
            None => None,
        };
        let mut wakes = Wakes::new();
        let result = {
            let mut state = self.state.lock();
            let result = apply(&mut state, Instant::now(), &mut wakes);
            if let (Ok(_), Some((change, incarnation))) = (&result, committed) {
                if let Some(limit) = state.reg.by_name_mut(name) {
                    change.record(limit, incarnation);
                }
            }
            result
        };
        drop(db);
        deliver(wakes);
        result
    }

    /// Tells the observer, if there is one.
    pub fn emit(&self, event: impl FnOnce() -> Event) {
        if let Some(observer) = &self.observer {
            observer(&event());
        }
    }
}

/// The in-process engine, with its store if it has one.
impl Manage for Shared {
    fn create(&self, name: &str, config: &LimitConfig) -> Result<LimitInfo, Error> {
        self.change(
            name,
            |state| {
                state.check_create(name, config)?;
                Ok(Change::Create(config.clone()))
            },
            |state, now, _| state.create(name, config, now),
        )
    }

    fn update(&self, name: &str, update: &LimitUpdate) -> Result<LimitInfo, Error> {
        self.change(
            name,
            |state| {
                state.updated_config(name, update)?;
                Ok(Change::Update(update.clone()))
            },
            |state, now, wakes| state.update(name, update, now, wakes),
        )
    }

    fn delete(&self, name: &str) -> Result<(), Error> {
        self.change(
            name,
            |state| state.config(name).map(|_| Change::Delete),
            |state, now, wakes| state.delete(name, now, wakes),
        )
    }

    fn reset(&self, name: &str) -> Result<LimitInfo, Error> {
        self.change(
            name,
            |state| state.config(name).map(|_| Change::Reset),
            |state, now, wakes| state.reset(name, now, wakes),
        )
    }

    fn info(&self, name: &str) -> Result<Option<LimitInfo>, Error> {
        Ok(self.state.lock().info(name, Instant::now()))
    }

    fn infos(&self) -> Result<Vec<LimitInfo>, Error> {
        Ok(self.state.lock().infos(Instant::now()))
    }

    fn flush(&self) -> Result<(), Error> {
        match &self.store {
            Some(store) => store.flush(),
            None => Ok(()),
        }
    }
}

/// Delivers wake-ups collected under the lock, and drops the wakers it let
/// go of, once it is released.
#[inline]
pub(crate) fn deliver(wakes: Wakes) {
    if wakes.is_empty() {
        return;
    }
    wakes.deliver();
}

/// A registry of named limits whose slots threads and tasks take and give
/// back.
///
/// Cheap to clone: clones share one registry. Share one limiter among all
/// the workers of a process.
///
/// ```
/// use turnstile::{Limiter, LimitConfig};
/// use std::thread;
///
/// let limiter = Limiter::in_memory();
/// limiter.create_limit("gpu", LimitConfig::new(2))?;
/// let workers: Vec<_> = (0..4)
///     .map(|_| {
///         let limiter = limiter.clone();
///         thread::spawn(move || {
///             let _gpu = limiter.concurrency("gpu", 1).acquire()?;
///             // At most two workers are here at once.
///             Ok::<_, turnstile::Error>(())
///         })
///     })
///     .collect();
/// for w in workers {
///     w.join().unwrap()?;
/// }
/// assert_eq!(limiter.limit("gpu").unwrap().held_slots, 0);
/// # Ok::<(), turnstile::Error>(())
/// ```
#[derive(Clone)]
pub struct Limiter {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        #[cfg(feature = "postgres")]
        if let Some(remote) = &self.shared.remote {
            return f
                .debug_struct("Limiter")
                .field("shared", remote)
                .field("observed", &self.shared.observer.is_some())
                .finish();
        }
        let state = self.shared.state.lock();
        f.debug_struct("Limiter")
            .field("limits", &state.reg.len())
            .field("waiters", &state.waiters.len())
            .field("observed", &self.shared.observer.is_some())
            .finish()
    }
}

impl Limiter {
    /// A limiter that keeps everything in memory.
    pub fn in_memory() -> Limiter {
        Limiter::from_parts(None)
    }

    /// A limiter backed by the SQLite store at `path`, created if missing.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] if the file cannot be opened, is not a turnstile
    /// store, or is a damaged one (tables missing columns or keys, rows it
    /// could not have written, what SQLite's `quick_check` finds): such a
    /// file is left as it was; [`Error::StoreInUse`] if another live limiter
    /// owns it.
    pub fn open(path: impl Into<PathBuf>) -> Result<Limiter, Error> {
        Limiter::builder().path(path).build()
    }

    /// A limiter of shared limits on PostgreSQL: the same limits for every
    /// process, on every host, connected to the same database and namespace
    /// (`"turnstile"`; see [`LimiterBuilder::namespace`]). `url` is a
    /// `postgres://` URL or a `key=value` connection string.
    ///
    /// ```no_run
    /// # use turnstile::{Limiter, LimitConfig};
    /// let limiter = Limiter::connect("postgres://app@db.internal/limits")?;
    /// let _gpu = limiter.concurrency("gpu", 1).acquire()?; // shared by every process
    /// # Ok::<(), turnstile::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a malformed URL; [`Error::Storage`]
    /// (naming the host, never the password) if the database cannot be
    /// reached within 10 s or its namespace is not a turnstile one.
    #[cfg(feature = "postgres")]
    pub fn connect(url: &str) -> Result<Limiter, Error> {
        Limiter::builder().postgres(url).build()
    }

    /// The engine its limits are managed by: the one place the public face
    /// chooses between them.
    fn manage(&self) -> &dyn Manage {
        #[cfg(feature = "postgres")]
        if let Some(remote) = &self.shared.remote {
            return &*remote.inner;
        }
        &*self.shared
    }

    /// A builder for a limiter with a store, a flush interval or an observer.
    pub fn builder() -> LimiterBuilder {
        LimiterBuilder::default()
    }

    fn from_parts(observer: Option<Observer>) -> Limiter {
        crate::clock::calibrate();
        let state = Arc::new(Engine::default());
        let index = state.lock().reg.index.clone();
        Limiter {
            shared: Arc::new(Shared {
                state,
                index,
                id: crate::recent::limiter_id(),
                observer,
                store: None,
                #[cfg(feature = "postgres")]
                remote: None,
            }),
        }
    }

    /// Creates a limit.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`], [`Error::InvalidConfig`], or
    /// [`Error::AlreadyExists`] if the name is taken.
    ///
    /// ```
    /// # use turnstile::{Limiter, LimitConfig};
    /// let limiter = Limiter::in_memory();
    /// let info = limiter.create_limit("api", LimitConfig::new(10).slot_decay_per_second(5.0))?;
    /// assert_eq!((info.limit, info.active), (10, true));
    /// # Ok::<(), turnstile::Error>(())
    /// ```
    pub fn create_limit(&self, name: &str, config: LimitConfig) -> Result<LimitInfo, Error> {
        self.manage().create(name, &config)
    }

    /// Changes a limit. Raising it, deactivating it or giving it faster decay
    /// wakes the waiters that now fit; lowering it below a waiter's `occupy`
    /// fails that waiter with [`Error::OccupyExceedsLimit`]. Holders keep
    /// their slots when the limit is lowered below them.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`], [`Error::InvalidConfig`].
    pub fn update_limit(&self, name: &str, update: LimitUpdate) -> Result<LimitInfo, Error> {
        self.manage().update(name, &update)
    }

    /// Deletes a limit. Its blocked acquisitions go on as for a missing
    /// limit: strict ones fail with [`Error::NotFound`]; the others stop
    /// waiting for it, and if one of them has `create_if_missing` (the
    /// default) it is created again, inactive with limit 1, as a first
    /// attempt naming a missing limit would (with a store, committed by that
    /// acquisition when it wakes). Guards holding its slots give nothing
    /// back, not even to a new limit of the same name.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`].
    pub fn delete_limit(&self, name: &str) -> Result<(), Error> {
        self.manage().delete(name)
    }

    /// Drops a limit's decaying slots and zeroes its `denied_slots`; slots
    /// held by live guards stay held.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`].
    pub fn reset_limit(&self, name: &str) -> Result<LimitInfo, Error> {
        self.manage().reset(name)
    }

    /// A snapshot of one limit; `None` if there is none of that name (or,
    /// for shared limits, if the database cannot be reached: see
    /// [`Limiter::try_limit`]).
    pub fn limit(&self, name: &str) -> Option<LimitInfo> {
        self.try_limit(name).ok().flatten()
    }

    /// Snapshots of every limit, sorted by name (empty, for shared limits,
    /// if the database cannot be reached: see [`Limiter::try_limits`]).
    pub fn limits(&self) -> Vec<LimitInfo> {
        self.try_limits().unwrap_or_default()
    }

    /// A snapshot of one limit, reporting a database failure. In one
    /// process it never fails.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] if the database of shared limits cannot be
    /// reached.
    pub fn try_limit(&self, name: &str) -> Result<Option<LimitInfo>, Error> {
        self.manage().info(name)
    }

    /// Snapshots of every limit, sorted by name, reporting a database
    /// failure. In one process it never fails.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] if the database of shared limits cannot be
    /// reached.
    pub fn try_limits(&self) -> Result<Vec<LimitInfo>, Error> {
        self.manage().infos()
    }

    /// Holds `occupy` slots of each named limit until the returned guard
    /// drops. Configure the acquisition on the builder, then `.acquire()`,
    /// `.try_acquire()` or `.await` it.
    ///
    /// ```
    /// # use turnstile::{Limiter, LimitConfig};
    /// # use std::time::Duration;
    /// let limiter = Limiter::in_memory();
    /// limiter.create_limit("gpu", LimitConfig::new(2))?;
    /// limiter.create_limit("db", LimitConfig::new(4))?;
    /// let guard = limiter
    ///     .concurrency(["gpu", "db"], 2)
    ///     .timeout(Duration::from_secs(5))
    ///     .acquire()?;
    /// assert_eq!(limiter.limit("db").unwrap().held_slots, 2);
    /// guard.release();
    /// # Ok::<(), turnstile::Error>(())
    /// ```
    pub fn concurrency<'a>(&'a self, names: impl IntoNames<'a>, occupy: u32) -> Acquire<'a> {
        Acquire::new(self, names.into_names(), occupy)
    }

    /// Takes `occupy` decaying slots of each named limit once they fit;
    /// they are never given back but drain at the limit's
    /// `slot_decay_per_second`.
    ///
    /// ```
    /// # use turnstile::{Limiter, LimitConfig};
    /// let limiter = Limiter::in_memory();
    /// limiter.create_limit("api", LimitConfig::new(2).slot_decay_per_second(10.0))?;
    /// assert!(limiter.rate_limit("api", 2).try_acquire()?);
    /// assert!(!limiter.rate_limit("api", 1).try_acquire()?, "bucket empty");
    /// limiter.rate_limit("api", 1).acquire()?; // waits ~0.1 s for one slot to drain
    /// # Ok::<(), turnstile::Error>(())
    /// ```
    pub fn rate_limit<'a>(&'a self, names: impl IntoNames<'a>, occupy: u32) -> RateLimit<'a> {
        RateLimit::new(self, names.into_names(), occupy)
    }

    /// Blocks until all state so far is durable. Without a store there is
    /// nothing to do.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] if the store cannot be written.
    pub fn flush(&self) -> Result<(), Error> {
        self.manage().flush()
    }
}

/// Configures a [`Limiter`].
///
/// ```
/// use turnstile::{Event, Limiter};
/// use std::time::Duration;
/// let limiter = Limiter::builder()
///     .flush_interval(Duration::from_millis(100))
///     .on_event(|e: &Event| eprintln!("{e:?}"))
///     .build()?;
/// # drop(limiter);
/// # Ok::<(), turnstile::Error>(())
/// ```
#[derive(Default)]
#[must_use = "a builder does nothing until .build()"]
pub struct LimiterBuilder {
    path: Option<PathBuf>,
    flush_interval: Option<Duration>,
    observer: Option<Observer>,
    #[cfg(feature = "postgres")]
    postgres: Option<String>,
    #[cfg(feature = "postgres")]
    namespace: Option<String>,
    #[cfg(feature = "postgres")]
    lease: Option<Duration>,
    #[cfg(feature = "postgres")]
    keep_namespace: bool,
}

impl fmt::Debug for LimiterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimiterBuilder")
            .field("path", &self.path)
            .field("flush_interval", &self.flush_interval)
            .field("observed", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

/// How stale the store's slot state may get, unless configured.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(100);

impl LimiterBuilder {
    /// Keeps limits in the SQLite store at `path` (created if missing).
    /// Without it, the limiter is in memory.
    pub fn path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Bounds how much slot state a crash may lose (default 100 ms).
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = Some(interval);
        self
    }

    /// Calls `observer` with every [`Event`], synchronously, on the thread
    /// that caused it, outside every internal lock.
    pub fn on_event(mut self, observer: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Shares the limits through PostgreSQL (see [`Limiter::connect`]):
    /// `url` is a `postgres://` URL or a `key=value` connection string.
    /// Not with [`LimiterBuilder::path`].
    #[cfg(feature = "postgres")]
    pub fn postgres(mut self, url: impl Into<String>) -> Self {
        self.postgres = Some(url.into());
        self
    }

    /// The namespace of shared limits: the PostgreSQL schema holding their
    /// tables (default `"turnstile"`), created on first connection. A plain
    /// identifier, `[A-Za-z_][A-Za-z0-9_]{0,62}`, not starting with `pg_`;
    /// case-sensitive. Limiters on different namespaces are independent.
    #[cfg(feature = "postgres")]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// How long a process cut off from the database keeps its shared slots
    /// (default 30 s, at least 300 ms), counted from its last renewal; the
    /// lease is renewed in the background at least every `lease / 3`.
    #[cfg(feature = "postgres")]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// With `false`, connecting to a namespace that does not exist yet is
    /// an error rather than creating it (the CLI's verbs other than
    /// `create`). Default `true`.
    #[cfg(feature = "postgres")]
    pub fn create_namespace(mut self, create: bool) -> Self {
        self.keep_namespace = !create;
        self
    }

    /// Builds the limiter, opening its store if a path was given.
    ///
    /// # Errors
    ///
    /// As [`Limiter::open`] or [`Limiter::connect`];
    /// [`Error::InvalidConfig`] for both a path and a PostgreSQL URL.
    pub fn build(self) -> Result<Limiter, Error> {
        #[cfg(feature = "postgres")]
        if let Some(url) = self.postgres {
            if self.path.is_some() {
                return Err(Error::InvalidConfig {
                    name: "postgres".to_string(),
                    reason: "a store path and a PostgreSQL URL together: choose one".to_string(),
                });
            }
            let settings = crate::postgres::Settings {
                url,
                namespace: self.namespace.unwrap_or_else(|| "turnstile".to_string()),
                lease: self.lease.unwrap_or(crate::postgres::DEFAULT_LEASE),
                missing: if self.keep_namespace {
                    crate::postgres::Missing::Refuse
                } else {
                    crate::postgres::Missing::Create
                },
            };
            let remote = crate::postgres::Remote::connect(settings, self.observer.clone())?;
            let mut limiter = Limiter::from_parts(self.observer);
            Arc::get_mut(&mut limiter.shared).expect("just made").remote = Some(Arc::new(remote));
            return Ok(limiter);
        }
        let Some(path) = self.path else {
            return Ok(Limiter::from_parts(self.observer));
        };
        let state = Arc::new(Engine::default());
        let interval = self.flush_interval.unwrap_or(DEFAULT_FLUSH_INTERVAL);
        let store = Store::open(&path, interval, state.clone())?;
        let index = {
            let mut state = state.lock();
            state.reg.persist = true;
            state.reg.index.clone()
        };
        crate::clock::calibrate();
        Ok(Limiter {
            shared: Arc::new(Shared {
                state,
                index,
                id: crate::recent::limiter_id(),
                observer: self.observer,
                store: Some(store),
                #[cfg(feature = "postgres")]
                remote: None,
            }),
        })
    }
}
