//! The keeper: one thread per connected limiter that owns its session
//! connection. It holds the client's advisory lock (the server frees it
//! when the session ends, which is how other processes tell a killed one),
//! `LISTEN`s for grants and wakes exactly the waiters named, renews the
//! lease at least every `lease / 3` (and at most every second), and frees
//! what dead clients held (`reap`). Beside it, the releaser thread sends the
//! releases and withdrawals of dropped guards and futures, and the lease
//! watcher loses the holds when the lease runs out (the other two may be
//! stuck connecting then).
//!
//! A lost session (the connection broke) is resumed with backoff on a new
//! one; notifications sent meanwhile are lost, so every local waiter looks
//! again. A lease that ran out (no renewal for `lease`, counted from when
//! the last successful renewal was *sent*, so never later than the server
//! counts) loses every hold: guards report `is_lost()`, one
//! `Event::LeaseLost` each, and the client registers anew.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::conn::Client;
use super::{Inner, Job};
use crate::Error;

/// The client's registration, as the keeper maintains it.
#[derive(Debug, Default)]
pub(crate) struct Session {
    /// The client's id on the server; 0 while none is registered.
    pub id: i64,
    /// Counts registrations: a waiter or guard of an older epoch belongs to
    /// a lost client.
    pub epoch: u64,
    /// When the last successful renewal (or the registration) was sent.
    pub renewed: Option<Instant>,
}

/// How often the keeper looks up from its notifications (for the stop flag
/// and the renewal schedule).
const SLICE: Duration = Duration::from_millis(50);

/// Starts the keeper, the releaser and the lease watcher.
pub(crate) fn start(inner: Arc<Inner>, jobs: Receiver<Job>) -> Result<JoinHandle<()>, Error> {
    let releaser = {
        let inner = inner.clone();
        thread::Builder::new()
            .name("turnstile-pg-release".into())
            .spawn(move || release_loop(&inner, &jobs))
    }
    .map_err(|e| inner.storage(&format!("cannot start a thread: {e}"), None))?;
    let watcher = {
        let inner = inner.clone();
        thread::Builder::new()
            .name("turnstile-pg-lease".into())
            .spawn(move || watch_lease(&inner))
    }
    .map_err(|e| inner.storage(&format!("cannot start a thread: {e}"), None))?;
    let keeper_inner = inner.clone();
    thread::Builder::new()
        .name("turnstile-pg-keeper".into())
        .spawn(move || {
            keep(&keeper_inner);
            let _ = releaser.join();
            let _ = watcher.join();
        })
        .map_err(|e| inner.storage(&format!("cannot start a thread: {e}"), None))
}

/// Renewals: every third of the lease, at most a second apart, so that
/// dead clients are reaped within about a second of their death.
fn renew_every(lease: Duration) -> Duration {
    (lease / 3).min(Duration::from_secs(1))
}

fn keep(inner: &Inner) {
    let mut pause = Duration::from_millis(20);
    while !inner.stop.load(Ordering::SeqCst) {
        match inner.pool.connect_keeper() {
            Ok(mut conn) => {
                pause = Duration::from_millis(20);
                match session(inner, &mut conn) {
                    Ok(()) => break, // stopping
                    Err(e) => {
                        // Broken: look again everywhere (notifications may be
                        // lost), then reconnect.
                        let _ = e;
                        inner.waits.wake_all();
                    }
                }
            }
            Err(_) => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(500));
            }
        }
    }
    // Stopping: give everything back (guards are gone by now: each keeps
    // the limiter alive), and tell the waiters.
    let id = inner.session.lock().id;
    if id != 0 {
        let sql = inner.ns.sql("SELECT __NS__.unregister($1)");
        let _ = inner.pool.with(None, |c| c.execute(&sql, &[&id]));
    }
    inner.waits.wake_all();
    inner.session_changed.notify_all();
}

/// Loses the holds when the lease runs out, on time: the keeper and the
/// releaser cannot tell while they wait for a connection to a database they
/// are cut off from (up to the connect timeout, 5 s).
fn watch_lease(inner: &Inner) {
    while !inner.stop.load(Ordering::SeqCst) {
        thread::sleep(SLICE);
        expire_if_due(inner);
    }
}

/// Loses the session's holds if its lease ran out while it could not renew.
fn expire_if_due(inner: &Inner) {
    let expired = {
        let mut session = inner.session.lock();
        let due = session.id != 0
            && session
                .renewed
                .is_some_and(|at| at.elapsed() >= inner.lease);
        if due {
            session.id = 0;
            session.epoch += 1;
            session.renewed = None;
        }
        due
    };
    if expired {
        inner.lose_holds();
        inner.waits.wake_all();
        inner.session_changed.notify_all();
    }
}

/// Runs one session connection until it breaks (`Err`) or the limiter
/// stops (`Ok`).
fn session(inner: &Inner, conn: &mut Client) -> Result<(), tokio_postgres::Error> {
    let key = inner.ns.key;
    conn.batch_execute(&format!("LISTEN {}", inner.ns.channel()))?;
    let existing = inner.session.lock().id;
    if existing != 0 {
        // A new session for the same client: its lock again, then the
        // server's word that it is still alive.
        if !relock(inner, conn, existing)? {
            return Ok(()); // stopping
        }
        let sent = Instant::now();
        let alive: bool = conn
            .query_one(&inner.ns.sql("SELECT __NS__.renew($1, true)"), &[&existing])?
            .get(0);
        if alive {
            inner.session.lock().renewed = Some(sent);
        } else {
            conn.execute(
                "SELECT pg_advisory_unlock($1, ($2::bigint)::int4)",
                &[&key, &existing],
            )?;
            lose(inner);
        }
        inner.waits.wake_all();
    }
    let mut next_renewal = Instant::now();
    loop {
        if inner.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        if inner.session.lock().id == 0 {
            register(inner, conn)?;
            next_renewal = Instant::now() + renew_every(inner.lease);
        }
        // Notifications until the next renewal, a slice at a time.
        let wait = next_renewal
            .saturating_duration_since(Instant::now())
            .min(SLICE);
        // The slice ends on time however many notifications come, so that
        // under steady traffic the lease is still renewed and the dead
        // reaped.
        let slice_end = Instant::now() + wait;
        while let Some(note) = conn.notification(slice_end)? {
            dispatch(inner, note.payload());
        }
        if Instant::now() >= next_renewal {
            renew(inner, conn)?;
            next_renewal = Instant::now() + renew_every(inner.lease);
        }
    }
}

/// Takes the client's lock again on a new session. The old session may
/// still hold it (this side noticed the break first, the server has not
/// yet): it is ended, as this client's own. `false` if the limiter stops
/// meanwhile. The lease keeps running out while this waits.
fn relock(inner: &Inner, conn: &mut Client, id: i64) -> Result<bool, tokio_postgres::Error> {
    let key = inner.ns.key;
    loop {
        let got: bool = conn
            .query_one(
                "SELECT pg_try_advisory_lock($1, ($2::bigint)::int4)",
                &[&key, &id],
            )?
            .get(0);
        if got {
            return Ok(true);
        }
        if inner.stop.load(Ordering::SeqCst) {
            return Ok(false);
        }
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks \
              WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid() \
                AND classid = ($1::int4)::oid AND objid = (($2::bigint)::int4)::oid \
                AND objsubid = 2",
            &[&key, &id],
        )?;
        thread::sleep(Duration::from_millis(50));
    }
}

/// Registers a new client: its lock first (so that nobody takes it for dead
/// in between), then its row.
fn register(inner: &Inner, conn: &mut Client) -> Result<(), tokio_postgres::Error> {
    let key = inner.ns.key;
    let id: i64 = conn
        .query_one(&inner.ns.sql("SELECT nextval('__NS__.client_ids')"), &[])?
        .get(0);
    conn.execute(
        "SELECT pg_advisory_lock($1, ($2::bigint)::int4)",
        &[&key, &id],
    )?;
    let sent = Instant::now();
    let host = hostname();
    conn.execute(
        &inner.ns.sql("SELECT __NS__.register($1, $2, $3, $4)"),
        &[
            &id,
            &inner.lease.as_secs_f64(),
            &(std::process::id() as i32),
            &host,
        ],
    )?;
    {
        let mut session = inner.session.lock();
        session.id = id;
        session.epoch += 1;
        session.renewed = Some(sent);
    }
    inner.session_changed.notify_all();
    Ok(())
}

/// Renews the lease and reaps dead clients.
fn renew(inner: &Inner, conn: &mut Client) -> Result<(), tokio_postgres::Error> {
    let id = inner.session.lock().id;
    if id == 0 {
        return Ok(());
    }
    let sent = Instant::now();
    let alive: bool = conn
        .query_one(&inner.ns.sql("SELECT __NS__.renew($1, false)"), &[&id])?
        .get(0);
    if alive {
        let mut session = inner.session.lock();
        if session.id == id {
            session.renewed = Some(sent);
        }
    } else {
        conn.execute(
            "SELECT pg_advisory_unlock($1, ($2::bigint)::int4)",
            &[&inner.ns.key, &id],
        )?;
        lose(inner);
    }
    conn.execute(&inner.ns.sql("SELECT __NS__.reap()"), &[])?;
    Ok(())
}

/// The server dropped this client (its lease ran out): every hold is lost,
/// every waiter queues again under a new registration.
fn lose(inner: &Inner) {
    {
        let mut session = inner.session.lock();
        session.id = 0;
        session.epoch += 1;
        session.renewed = None;
    }
    inner.lose_holds();
    inner.waits.wake_all();
    inner.session_changed.notify_all();
}

/// A notification: `client ticket what [hold]`.
fn dispatch(inner: &Inner, payload: &str) {
    let mut parts = payload.split(' ');
    let (Some(client), Some(ticket)) = (
        parts.next().and_then(|p| p.parse::<i64>().ok()),
        parts.next().and_then(|p| p.parse::<i64>().ok()),
    ) else {
        return;
    };
    let what = parts.next().unwrap_or("");
    if client != inner.session.lock().id {
        return;
    }
    match what {
        "lost" => lose(inner),
        "granted" => {
            let hold = parts.next().and_then(|p| p.parse::<i64>().ok());
            inner.waits.notify(ticket, hold);
        }
        _ => inner.waits.notify(ticket, None),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Sends the releases and withdrawals of dropped guards and futures,
/// retrying while the database is away (within the lease: after it, the
/// server has given the slots back anyway).
fn release_loop(inner: &Inner, jobs: &Receiver<Job>) {
    loop {
        let job = match jobs.recv_timeout(SLICE) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                if inner.stop.load(Ordering::SeqCst) {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let (sql, client, id, withdraw) = match job {
            Job::Release { client, hold } => {
                ("SELECT * FROM __NS__.release($1, $2)", client, hold, false)
            }
            Job::Withdraw { client, ticket } => (
                "SELECT * FROM __NS__.withdraw($1, $2)",
                client,
                ticket,
                true,
            ),
            Job::Abandon { client, req } => (
                "SELECT * FROM __NS__.abandon_request($1, $2)",
                client,
                req,
                false,
            ),
        };
        let sql = inner.ns.sql(sql);
        let deadline = Instant::now() + inner.lease;
        let mut pause = Duration::from_millis(20);
        loop {
            match inner
                .pool
                .with(Some(deadline), |c| inner.outcome_of(c, &sql, client, id))
            {
                Ok(out) => {
                    // A withdrawal that met a grant gives the grant back.
                    if withdraw && out.outcome == "taken" && out.id != 0 {
                        let release = inner.ns.sql("SELECT * FROM __NS__.release($1, $2)");
                        let hold = out.id;
                        let _ = inner.pool.with(Some(deadline), |c| {
                            inner.outcome_of(c, &release, client, hold)
                        });
                    }
                    break;
                }
                // Stopping: the keeper's unregister gives everything back.
                Err(f)
                    if f.transient()
                        && Instant::now() < deadline
                        && !inner.stop.load(Ordering::SeqCst) =>
                {
                    thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(_) => break,
            }
        }
        inner.done_one();
    }
}
