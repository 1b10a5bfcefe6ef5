//! Shared limits on PostgreSQL: the same limits for every process on every
//! host connected to one database and namespace.
//!
//! The server does the accounting: each acquisition, look, withdrawal and
//! release is one call of a function in `schema_v1.sql`, one round trip and
//! one transaction, serialized per namespace by a transaction-level advisory
//! lock (so several limits are taken all-or-nothing, in one global ticket
//! order, without deadlock). A release grants the waiters that now fit in
//! the same transaction and `NOTIFY`s their clients; nobody polls.
//!
//! Each process keeps (see [`keeper`]):
//! * one session connection, which holds the client's advisory lock (freed
//!   by the server the moment the session ends, which is how the others tell
//!   a killed process), `LISTEN`s for grants, renews the lease and reaps dead
//!   clients;
//! * a small pool of connections for acquisitions, releases and
//!   management, so that a process uses at most [`MAX_CONNECTIONS`]
//!   connections however many threads and waiters it has.
//!
//! Session-level features (advisory locks, `LISTEN`) do not survive a
//! transaction-pooling proxy such as PgBouncer: connect to PostgreSQL
//! directly, or through a session-pooling proxy.

pub(crate) mod acquire;
mod conn;
pub(crate) mod guard;
mod keeper;
mod pool;
pub(crate) mod schema;
mod wait;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::Row;

use crate::backend::Manage;
use crate::config::{validate_name, LimitConfig, LimitInfo, LimitUpdate};
use crate::event::{Event, Observer};
use crate::Error;

use conn::Client;
pub(crate) use keeper::Session;
use pool::{Failure, Pool};
pub(crate) use schema::{Missing, Namespace};
pub(crate) use wait::Waits;

/// Connections one process opens at most: the session and the pool.
pub(crate) const MAX_CONNECTIONS: usize = 4;
/// The default lease: how long a host cut off from the database keeps its
/// slots.
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// How long `connect` tries before it gives up.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the builder gathered for a shared limiter.
#[derive(Clone)]
pub(crate) struct Settings {
    pub url: String,
    pub namespace: String,
    pub lease: Duration,
    pub missing: Missing,
}

/// The shared state of one connected limiter (all its clones and guards).
pub(crate) struct Remote {
    pub(crate) inner: Arc<Inner>,
    keeper: Mutex<Option<JoinHandle<()>>>,
}

/// Everything the keeper thread shares with the callers.
pub(crate) struct Inner {
    pub pool: Pool,
    pub ns: Namespace,
    /// The database as errors name it: `user@host:port/dbname`, never the
    /// password.
    pub target: String,
    pub lease: Duration,
    pub session: Mutex<Session>,
    pub session_changed: Condvar,
    /// The client's numbers for its requests, to find one whose reply was
    /// lost.
    pub next_req: AtomicI64,
    pub waits: Waits,
    /// Holds of live guards, so that a lost lease can mark them.
    pub holds: Mutex<HashMap<i64, HoldEntry>>,
    pub observer: Option<Observer>,
    pub stop: AtomicBool,
    /// Releases sent and not yet done, for `flush`.
    pub pending: Mutex<u64>,
    pub pending_done: Condvar,
    pub releases: Sender<Job>,
}

/// A guard's hold, as the limiter tracks it.
pub(crate) struct HoldEntry {
    pub names: Vec<String>,
    pub occupy: u32,
    pub lost: Arc<AtomicBool>,
}

/// Background work sent by dropping threads, done on the releaser thread.
pub(crate) enum Job {
    Release {
        client: i64,
        hold: i64,
    },
    Withdraw {
        client: i64,
        ticket: i64,
    },
    /// A request whose reply was lost, given up on.
    Abandon {
        client: i64,
        req: i64,
    },
}

/// What the server answered to an acquisition, a look, a withdrawal or a
/// release (the `outcome` type of the schema).
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub outcome: String,
    pub id: i64,
    pub err: Option<String>,
    pub err_name: Option<String>,
    pub err_a: Option<i64>,
    pub err_b: Option<i64>,
    pub wait_secs: Option<f64>,
}

impl Outcome {
    fn from_row(row: &Row) -> Outcome {
        Outcome {
            outcome: row.get(0),
            id: row.get::<_, Option<i64>>(1).unwrap_or(0),
            err: row.get(2),
            err_name: row.get(3),
            err_a: row.get(4),
            err_b: row.get(5),
            wait_secs: row.get(6),
        }
    }

    /// The error the server reported, in the library's terms.
    pub fn error(&self, names: &str, occupy: u32) -> Error {
        let name = self.err_name.clone().unwrap_or_default();
        match self.err.as_deref() {
            Some("not_found") => Error::NotFound { name },
            Some("occupy") => Error::OccupyExceedsLimit {
                name,
                occupy: self.err_a.unwrap_or_default() as u32,
                limit: self.err_b.unwrap_or_default() as u32,
            },
            Some("no_decay") => Error::NoSlotDecay { name },
            Some("retries") => Error::RetriesExhausted {
                names: names.to_string(),
                occupy,
                attempts: self.err_b.unwrap_or(1) as u32,
            },
            other => Error::Storage {
                path: String::new(),
                message: format!("unexpected answer from the server: {other:?}"),
                source: None,
            },
        }
    }
}

impl Remote {
    /// Connects (within [`CONNECT_TIMEOUT`]), creates or migrates the
    /// namespace, registers this client and starts its keeper.
    pub fn connect(settings: Settings, observer: Option<Observer>) -> Result<Remote, Error> {
        let ns = Namespace::new(&settings.namespace)?;
        if settings.lease < Duration::from_millis(300) {
            return Err(Error::InvalidConfig {
                name: settings.namespace.clone(),
                reason: format!("lease {:?}: at least 300 ms", settings.lease),
            });
        }
        let (pool, target) = Pool::new(&settings.url, settings.lease, MAX_CONNECTIONS - 1)?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        pool.with_retry(deadline, |client| {
            schema::migrate(client, &ns, settings.missing).map_err(Failure::from_migrate)
        })
        .map_err(|f| f.into_error(&target, &ns))?;
        let (releases, jobs) = crossbeam_channel::unbounded();
        let inner = Arc::new(Inner {
            pool,
            ns,
            target,
            lease: settings.lease,
            session: Mutex::new(Session::default()),
            session_changed: Condvar::new(),
            next_req: AtomicI64::new(1),
            waits: Waits::default(),
            holds: Mutex::new(HashMap::new()),
            observer,
            stop: AtomicBool::new(false),
            pending: Mutex::new(0),
            pending_done: Condvar::new(),
            releases,
        });
        let keeper = keeper::start(inner.clone(), jobs)?;
        let remote = Remote {
            inner: inner.clone(),
            keeper: Mutex::new(Some(keeper)),
        };
        // Registered before `connect` returns, or a clear error.
        inner
            .registered(Some(deadline))
            .map_err(|_| inner.storage("no session could be registered within 10 s", None))?;
        Ok(remote)
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.waits.wake_all();
        if let Some(keeper) = self.keeper.lock().take() {
            let _ = keeper.join();
        }
    }
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let session = self.inner.session.lock();
        f.debug_struct("Postgres")
            .field("database", &self.inner.target)
            .field("namespace", &self.inner.ns.name)
            .field("lease", &self.inner.lease)
            .field("client", &session.id)
            .finish()
    }
}

impl Inner {
    /// An `Error::Storage` naming the database and namespace (never the
    /// password).
    pub fn storage(&self, message: &str, source: Option<tokio_postgres::Error>) -> Error {
        storage_error(&self.target, &self.ns, message, source)
    }

    /// A database error in the library's terms.
    pub fn db_error(&self, e: tokio_postgres::Error, name: &str) -> Error {
        match e.code() {
            Some(code) if code.code() == "TS404" => Error::NotFound {
                name: name.to_string(),
            },
            Some(code) if code.code() == "TS409" => Error::AlreadyExists {
                name: name.to_string(),
            },
            _ => {
                let message = e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string());
                self.storage(&message, Some(e))
            }
        }
    }

    /// The registered client's id and epoch, waiting until the keeper has
    /// registered one (or until `deadline`; `None`: forever).
    pub fn registered(&self, deadline: Option<Instant>) -> Result<(i64, u64), ()> {
        let mut session = self.session.lock();
        loop {
            if session.id != 0 {
                return Ok((session.id, session.epoch));
            }
            if self.stop.load(Ordering::SeqCst) {
                return Err(());
            }
            match deadline {
                Some(d) => {
                    if self.session_changed.wait_until(&mut session, d).timed_out()
                        && session.id == 0
                    {
                        return Err(());
                    }
                }
                None => self.session_changed.wait(&mut session),
            }
        }
    }

    /// The registered client now, without waiting.
    pub fn current(&self) -> Option<(i64, u64)> {
        let session = self.session.lock();
        (session.id != 0).then_some((session.id, session.epoch))
    }

    /// Runs one management call on a pool connection, at once (no waiting
    /// for a database that is away; a connection the server ended while it
    /// sat idle is replaced, and the call made again once).
    fn call<T>(
        &self,
        name: &str,
        f: impl FnMut(&mut Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, Error> {
        self.pool
            .with_fresh_retry(f)
            .map_err(|f| self.failure(f, name))
    }

    /// A failed pool call in the library's terms.
    pub fn failure(&self, f: Failure, name: &str) -> Error {
        match f {
            Failure::Db(e) => self.db_error(e, name),
            other => other.into_error(&self.target, &self.ns),
        }
    }

    /// Calls one of the schema's functions returning an `outcome`, with its
    /// parameters' types given, so that the call is one round trip (no
    /// statement to prepare first).
    pub fn outcome(
        &self,
        client: &mut Client,
        sql: &str,
        params: &[(&(dyn tokio_postgres::types::ToSql + Sync), Type)],
    ) -> Result<Outcome, tokio_postgres::Error> {
        let row = client.query_typed_one(sql, params)?;
        Ok(Outcome::from_row(&row))
    }

    /// [`Inner::outcome`] of a function of a client and one of its ids.
    pub fn outcome_of(
        &self,
        client: &mut Client,
        sql: &str,
        who: i64,
        id: i64,
    ) -> Result<Outcome, tokio_postgres::Error> {
        self.outcome(client, sql, &[(&who, Type::INT8), (&id, Type::INT8)])
    }

    /// Marks every hold of the lost session lost and tells the observer,
    /// once per guard (on the keeper's thread).
    pub fn lose_holds(&self) {
        let lost: Vec<HoldEntry> = self.holds.lock().drain().map(|(_, h)| h).collect();
        for hold in &lost {
            hold.lost.store(true, Ordering::SeqCst);
        }
        if let Some(observer) = &self.observer {
            for hold in lost {
                observer(&Event::LeaseLost {
                    names: hold.names,
                    occupy: hold.occupy,
                });
            }
        }
    }

    /// Counts a release or withdrawal sent to the releaser.
    pub fn send(&self, job: Job) {
        *self.pending.lock() += 1;
        if self.releases.send(job).is_err() {
            self.done_one();
        }
    }

    pub fn done_one(&self) {
        let mut pending = self.pending.lock();
        *pending = pending.saturating_sub(1);
        if *pending == 0 {
            self.pending_done.notify_all();
        }
    }
}

impl Manage for Inner {
    fn create(&self, name: &str, config: &LimitConfig) -> Result<LimitInfo, Error> {
        config.check(name)?;
        let sql = self.ns.sql("SELECT __NS__.create_limit($1, $2, $3, $4)");
        let cap = shared_cap(name, config.limit)?;
        self.call(name, |c| {
            c.execute(
                &sql,
                &[&name, &cap, &config.active, &config.slot_decay_per_second],
            )
        })?;
        self.info(name)?.ok_or_else(|| Error::NotFound {
            name: name.to_string(),
        })
    }

    fn update(&self, name: &str, update: &LimitUpdate) -> Result<LimitInfo, Error> {
        validate_name(name)?;
        update.validate(name)?;
        let sql = self.ns.sql("SELECT __NS__.update_limit($1, $2, $3, $4)");
        let cap = update.limit.map(|l| shared_cap(name, l)).transpose()?;
        self.call(name, |c| {
            c.execute(
                &sql,
                &[&name, &cap, &update.active, &update.slot_decay_per_second],
            )
        })?;
        self.info(name)?.ok_or_else(|| Error::NotFound {
            name: name.to_string(),
        })
    }

    fn delete(&self, name: &str) -> Result<(), Error> {
        validate_name(name)?;
        let sql = self.ns.sql("SELECT __NS__.delete_limit($1)");
        self.call(name, |c| c.execute(&sql, &[&name]))?;
        Ok(())
    }

    fn reset(&self, name: &str) -> Result<LimitInfo, Error> {
        validate_name(name)?;
        let sql = self.ns.sql("SELECT __NS__.reset_limit($1)");
        self.call(name, |c| c.execute(&sql, &[&name]))?;
        self.info(name)?.ok_or_else(|| Error::NotFound {
            name: name.to_string(),
        })
    }

    fn info(&self, name: &str) -> Result<Option<LimitInfo>, Error> {
        let sql = self
            .ns
            .sql("SELECT * FROM __NS__.info($1, clock_timestamp()) WHERE name IS NOT NULL");
        let row = self.call(name, |c| c.query_opt(&sql, &[&name]))?;
        Ok(row.map(|r| info_of(&r)))
    }

    fn infos(&self) -> Result<Vec<LimitInfo>, Error> {
        let sql = self.ns.sql(
            "SELECT i.* FROM __NS__.limits l, __NS__.info(l.name, clock_timestamp()) i \
             ORDER BY l.name COLLATE \"C\"",
        );
        let rows = self.call("", |c| c.query(&sql, &[]))?;
        Ok(rows.iter().map(info_of).collect())
    }

    /// Waits until every release sent so far is done.
    fn flush(&self) -> Result<(), Error> {
        let mut pending = self.pending.lock();
        let deadline = Instant::now() + self.lease;
        while *pending > 0 {
            if self
                .pending_done
                .wait_until(&mut pending, deadline)
                .timed_out()
            {
                return Err(self.storage(
                    &format!(
                        "{} release(s) still unsent after {:?}",
                        *pending, self.lease
                    ),
                    None,
                ));
            }
        }
        Ok(())
    }
}

fn info_of(row: &Row) -> LimitInfo {
    let clamp = |v: i64| v.clamp(0, i64::from(u32::MAX)) as u32;
    LimitInfo {
        name: row.get("name"),
        limit: row.get::<_, i32>("cap").max(0) as u32,
        active: row.get("active"),
        slot_decay_per_second: row.get("decay"),
        active_slots: clamp(row.get("active_slots")),
        held_slots: clamp(row.get("held")),
        denied_slots: row.get::<_, i64>("denied").max(0) as u64,
        waiters: row.get::<_, i64>("waiters").max(0) as usize,
        avg_slot_occupancy_seconds: row.get("avg_occupancy"),
    }
}

/// A limit as the server stores it (a 32-bit signed integer): above
/// 2,147,483,647 is refused, not cut down.
fn shared_cap(name: &str, limit: u32) -> Result<i32, Error> {
    i32::try_from(limit).map_err(|_| Error::InvalidConfig {
        name: name.to_string(),
        reason: format!("limit {limit}: a shared limit holds at most {}", i32::MAX),
    })
}

/// An `Error::Storage` for the database `target` and namespace `ns`.
pub(crate) fn storage_error(
    target: &str,
    ns: &Namespace,
    message: &str,
    source: Option<tokio_postgres::Error>,
) -> Error {
    Error::Storage {
        path: format!("{target} (namespace {})", ns.name),
        message: message.to_string(),
        source: source.map(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
    }
}

/// Whether a database error is worth retrying on another connection after
/// a pause (the connection or the server went away, or PostgreSQL asked
/// for a retry), rather than reported.
pub(crate) fn transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() || e.as_db_error().is_none() {
        return true;
    }
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::ADMIN_SHUTDOWN
            || *c == SqlState::CRASH_SHUTDOWN
            || *c == SqlState::CANNOT_CONNECT_NOW
    )
}
