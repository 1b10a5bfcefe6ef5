//! A few connections for acquisitions, releases and management, shared by
//! every thread of the process: a caller takes an idle one, opens one while
//! fewer than the bound are open, or waits for one.

use std::str::FromStr;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio_postgres::config::Host;
use tokio_postgres::Config;

use super::conn::{Client, ConnectError};
use super::schema::{MigrateError, Namespace};
use super::{storage_error, transient};
use crate::Error;

/// How long a call may take when its caller has no deadline of its own,
/// and how long a connection's start-up may take.
pub(crate) const CALL_BUDGET: Duration = Duration::from_secs(10);

pub(crate) struct Pool {
    config: Config,
    max: usize,
    /// The keeper's calls' budget: a renewal that takes half the lease is
    /// as good as lost.
    keeper_budget: Duration,
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Default)]
struct State {
    idle: Vec<Client>,
    open: usize,
}

/// Why a pooled call failed.
pub(crate) enum Failure {
    Db(tokio_postgres::Error),
    Refused(String),
    /// Connected, but the server did not finish the start-up in time.
    NoStartup,
    /// No answer within this long.
    TimedOut(Duration),
}

impl Failure {
    pub fn from_migrate(e: MigrateError) -> Failure {
        match e {
            MigrateError::Db(e) => Failure::Db(e),
            MigrateError::Refused(m) => Failure::Refused(m),
        }
    }

    pub fn into_error(self, target: &str, ns: &Namespace) -> Error {
        let message = self.message();
        match self {
            Failure::Db(e) => storage_error(target, ns, &message, Some(e)),
            _ => storage_error(target, ns, &message, None),
        }
    }

    /// Whether trying again, on another connection after a pause, may
    /// succeed: the connection or the server went away, a call ran out of
    /// time (it may have been done all the same), or PostgreSQL asked for a
    /// retry.
    pub fn transient(&self) -> bool {
        match self {
            Failure::Db(e) => transient(e),
            Failure::NoStartup | Failure::TimedOut(_) => true,
            Failure::Refused(_) => false,
        }
    }

    /// What went wrong, in the server's words where it has some.
    pub fn message(&self) -> String {
        match self {
            Failure::Db(e) => match e.as_db_error() {
                Some(d) => d.message().to_string(),
                // "error communicating with the server", and why.
                None => match std::error::Error::source(e) {
                    Some(cause) => format!("{e}: {cause}"),
                    None => e.to_string(),
                },
            },
            Failure::Refused(m) => m.clone(),
            Failure::NoStartup => format!(
                "the server accepted the connection but did not answer its start-up \
                 within {} s (is it PostgreSQL?)",
                CALL_BUDGET.as_secs()
            ),
            Failure::TimedOut(d) => format!(
                "the server did not answer within {:.1} s (connection closed)",
                d.as_secs_f64()
            ),
        }
    }

    fn from_connect(e: ConnectError) -> Failure {
        match e {
            ConnectError::Db(e) => Failure::Db(e),
            ConnectError::TimedOut => Failure::NoStartup,
            ConnectError::Runtime(e) => Failure::Refused(format!("cannot start a runtime: {e}")),
        }
    }
}

/// Whether `e` says the server ended the session (or it was found closed)
/// rather than refused the call.
fn ended_by_server(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c) => *c == SqlState::ADMIN_SHUTDOWN || *c == SqlState::CRASH_SHUTDOWN,
        None => e.is_closed() || e.as_db_error().is_none(),
    }
}

/// `user@host:port/dbname` of a configuration: what errors name, never the
/// password.
pub(crate) fn describe(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

/// Parses a URL or key=value connection string, without echoing it: a
/// malformed one may hold a password.
pub(crate) fn parse(url: &str, lease: Duration) -> Result<(Config, String), Error> {
    let mut config = Config::from_str(url).map_err(|e| Error::InvalidConfig {
        name: "postgres".to_string(),
        reason: format!(
            "not a PostgreSQL URL or key=value connection string ({})",
            redact(&e.to_string(), url)
        ),
    })?;
    if config.get_user().is_none() {
        if let Ok(user) = std::env::var("USER") {
            config.user(&user);
        }
    }
    config
        .connect_timeout(Duration::from_secs(5))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(3)
        // A send the server does not acknowledge fails within a third of
        // the lease, so that a partition is noticed in time.
        .tcp_user_timeout(lease / 3);
    if config.get_application_name().is_none() {
        config.application_name("turnstile");
    }
    // The server's side of a connection whose client is gone (a host cut
    // off) would otherwise idle on for hours with PostgreSQL's defaults,
    // using up connections on a flapping network. It ends them, but only
    // after the lease has run out: ending the keeper's session frees its
    // lock, and the client is then reaped at once.
    let idle = lease.as_secs_f64().ceil().max(1.0) as u64;
    let server_side = format!(
        "-c tcp_keepalives_idle={idle} -c tcp_keepalives_interval=1 \
         -c tcp_keepalives_count=3 -c tcp_user_timeout={}",
        (lease + Duration::from_secs(3)).as_millis()
    );
    let options = match config.get_options() {
        Some(own) if !own.is_empty() => format!("{own} {server_side}"),
        _ => server_side,
    };
    config.options(&options);
    let target = describe(&config);
    Ok((config, target))
}

/// `message` without any part of `url` that could be a password.
fn redact(message: &str, url: &str) -> String {
    let mut out = message.to_string();
    if let Some(at) = url.find('@') {
        if let Some(colon) = url[..at].rfind(':') {
            let password = &url[colon + 1..at];
            if !password.is_empty() && !password.contains('/') {
                out = out.replace(password, "***");
            }
        }
    }
    out
}

impl Pool {
    pub fn new(url: &str, lease: Duration, max: usize) -> Result<(Pool, String), Error> {
        let (config, target) = parse(url, lease)?;
        let pool = Pool {
            config,
            max,
            keeper_budget: (lease / 2).max(Duration::from_secs(1)),
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
        };
        Ok((pool, target))
    }

    /// Opens the keeper's session connection (its lease is watched apart:
    /// see `keeper::watch_lease`).
    pub fn connect_keeper(&self) -> Result<Client, Failure> {
        let deadline = Instant::now() + CALL_BUDGET;
        Client::connect(&self.config, deadline, self.keeper_budget).map_err(Failure::from_connect)
    }

    /// An idle connection, or a new one while fewer than the bound are
    /// open (given up at `until`, or after the budget), or the next one
    /// given back.
    fn take(&self, until: Option<Instant>) -> Result<Client, Failure> {
        self.take_reused(until).map(|(client, _)| client)
    }

    /// [`Pool::take`], and whether the connection was idle in the pool.
    fn take_reused(&self, until: Option<Instant>) -> Result<(Client, bool), Failure> {
        let mut state = self.state.lock();
        loop {
            if let Some(client) = state.idle.pop() {
                if !client.is_closed() {
                    return Ok((client, true));
                }
                state.open -= 1;
                continue;
            }
            if state.open < self.max {
                state.open += 1;
                drop(state);
                let budget = Instant::now() + CALL_BUDGET;
                let deadline = until.map_or(budget, |u| u.min(budget));
                return Client::connect(&self.config, deadline, CALL_BUDGET)
                    .map(|client| (client, false))
                    .map_err(|e| {
                        self.state.lock().open -= 1;
                        self.freed.notify_one();
                        Failure::from_connect(e)
                    });
            }
            match until {
                Some(u) => {
                    if self.freed.wait_until(&mut state, u).timed_out() && state.idle.is_empty() {
                        return Err(Failure::TimedOut(Duration::ZERO));
                    }
                }
                None => self.freed.wait(&mut state),
            }
        }
    }

    fn give(&self, mut client: Client) {
        // The next borrower's deadline is its own.
        client.until(None);
        let mut state = self.state.lock();
        if client.is_closed() {
            state.open -= 1;
        } else {
            state.idle.push(client);
        }
        drop(state);
        self.freed.notify_one();
    }

    /// Runs `f` on a connection, once, each call ending by `until` (if
    /// given) and within [`CALL_BUDGET`]. A call past its deadline closes
    /// its connection and fails as on any broken connection (the server
    /// may have done it: see [`transient`](super::transient)).
    pub fn with<T>(
        &self,
        until: Option<Instant>,
        f: impl FnOnce(&mut Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, Failure> {
        self.lend(until, f).0
    }

    /// Runs `f` on a connection, once, as [`Pool::with`]; but if the
    /// connection had been idle in the pool and the server had ended it
    /// meanwhile (a restart, `pg_terminate_backend`, an idle timeout), `f`
    /// runs again on a new one. For management calls: the call on the old
    /// connection was, with near certainty, never run (the server's goodbye
    /// was waiting in the socket), but an acquisition must not be sent
    /// twice.
    pub fn with_fresh_retry<T>(
        &self,
        mut f: impl FnMut(&mut Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, Failure> {
        match self.lend(None, &mut f) {
            (Err(Failure::Db(e)), true) if ended_by_server(&e) => {
                // The others idle since are likely ended too.
                self.close_idle();
                self.lend(None, f).0
            }
            (result, _) => result,
        }
    }

    /// Runs `f` on a connection taken from the pool and gives it back:
    /// what `f` said, a call past its deadline as [`Failure::TimedOut`];
    /// and whether the connection had been idle in the pool.
    fn lend<T>(
        &self,
        until: Option<Instant>,
        f: impl FnOnce(&mut Client) -> Result<T, tokio_postgres::Error>,
    ) -> (Result<T, Failure>, bool) {
        let started = Instant::now();
        let (mut client, reused) = match self.take_reused(until) {
            Ok(taken) => taken,
            Err(failure) => return (Err(failure), false),
        };
        client.until(until);
        let result = f(&mut client);
        let timed_out = client.timed_out();
        self.give(client);
        let result = match result {
            Ok(v) => Ok(v),
            Err(_) if timed_out => Err(Failure::TimedOut(started.elapsed())),
            Err(e) => Err(Failure::Db(e)),
        };
        (result, reused)
    }

    /// Closes the idle connections.
    fn close_idle(&self) {
        let closed: Vec<Client> = {
            let mut state = self.state.lock();
            state.open -= state.idle.len();
            state.idle.drain(..).collect()
        };
        drop(closed);
        self.freed.notify_all();
    }

    /// Runs `f` on a connection, retrying failures of the connection (the
    /// server restarting, say) with backoff until `deadline`.
    pub fn with_retry<T>(
        &self,
        deadline: Instant,
        mut f: impl FnMut(&mut Client) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let mut pause = Duration::from_millis(20);
        loop {
            let result = self.take(Some(deadline)).and_then(|mut client| {
                client.until(Some(deadline));
                let result = f(&mut client);
                self.give(client);
                result
            });
            match result {
                Err(f) if f.transient() => {
                    let now = Instant::now();
                    if now + pause > deadline {
                        if now < deadline {
                            std::thread::sleep(deadline - now);
                        }
                        return Err(f);
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_never_show_the_password() {
        let lease = Duration::from_secs(30);
        for url in [
            "postgres://app:s3cret@db.internal:6543/limits",
            "host=db.internal port=6543 user=app password=s3cret dbname=limits",
        ] {
            let (_, target) = parse(url, lease).unwrap();
            assert_eq!(target, "postgres://app@db.internal:6543/limits");
            assert!(!target.contains("s3cret"));
        }
        let err = parse("postgres://app:s3cret@db:notaport/x", lease).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(!format!("{err:?}").contains("s3cret"), "{err:?}");
    }
}
