//! A few connections for acquisitions, releases and management, shared by
//! every thread of the process: a caller takes an idle one, opens one while
//! fewer than the bound are open, or waits for one.

use std::str::FromStr;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use postgres::config::Host;
use postgres::{Client, Config, NoTls};

use super::schema::{MigrateError, Namespace};
use super::{storage_error, transient};
use crate::Error;

pub(crate) struct Pool {
    config: Config,
    max: usize,
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
    Db(postgres::Error),
    Refused(String),
    /// No answer by the deadline.
    TimedOut,
}

impl Failure {
    pub fn from_migrate(e: MigrateError) -> Failure {
        match e {
            MigrateError::Db(e) => Failure::Db(e),
            MigrateError::Refused(m) => Failure::Refused(m),
        }
    }

    pub fn into_error(self, target: &str, ns: &Namespace) -> Error {
        match self {
            Failure::Db(e) => {
                let message = e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string());
                storage_error(target, ns, &message, Some(e))
            }
            Failure::Refused(m) => storage_error(target, ns, &m, None),
            Failure::TimedOut => storage_error(
                target,
                ns,
                "no answer from the server within 10 s (is it PostgreSQL?)",
                None,
            ),
        }
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
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
        };
        Ok((pool, target))
    }

    /// Opens a new connection with this pool's configuration (the keeper's
    /// session too).
    pub fn connect(&self) -> Result<Client, postgres::Error> {
        self.config.connect(NoTls)
    }

    /// Opens a connection, giving up at `deadline` even if the server
    /// accepts and never answers (the client's connect timeout covers only
    /// the socket): the attempt runs on a thread of its own, left to end
    /// when the server or the operating system gives up.
    fn connect_within(&self, deadline: Instant) -> Result<Client, Failure> {
        let config = self.config.clone();
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::Builder::new()
            .name("turnstile-pg-connect".into())
            .spawn(move || {
                let _ = tx.send(config.connect(NoTls));
            })
            .map_err(|e| Failure::Refused(format!("cannot start a thread: {e}")))?;
        match rx.recv_deadline(deadline) {
            Ok(result) => result.map_err(Failure::Db),
            Err(_) => Err(Failure::TimedOut),
        }
    }

    fn take(&self) -> Result<Client, postgres::Error> {
        let mut state = self.state.lock();
        loop {
            if let Some(client) = state.idle.pop() {
                if !client.is_closed() {
                    return Ok(client);
                }
                state.open -= 1;
                continue;
            }
            if state.open < self.max {
                state.open += 1;
                drop(state);
                return self.connect().inspect_err(|_| {
                    self.state.lock().open -= 1;
                    self.freed.notify_one();
                });
            }
            self.freed.wait(&mut state);
        }
    }

    fn give(&self, client: Client, broken: bool) {
        let mut state = self.state.lock();
        if broken || client.is_closed() {
            state.open -= 1;
        } else {
            state.idle.push(client);
        }
        drop(state);
        self.freed.notify_one();
    }

    /// Runs `f` on a connection, once.
    pub fn with<T>(
        &self,
        mut f: impl FnMut(&mut Client) -> Result<T, postgres::Error>,
    ) -> Result<T, postgres::Error> {
        let mut client = self.take()?;
        let result = f(&mut client);
        let broken = matches!(&result, Err(e) if e.is_closed() || e.as_db_error().is_none());
        self.give(client, broken);
        result
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
            let idle = self.state.lock().idle.pop();
            let client = match idle {
                Some(client) => Ok(client),
                None => {
                    self.state.lock().open += 1;
                    self.connect_within(deadline).inspect_err(|_| {
                        self.state.lock().open -= 1;
                    })
                }
            };
            let result = match client {
                Ok(mut client) => {
                    let result = f(&mut client);
                    let broken = matches!(&result, Err(Failure::Db(e)) if transient(e));
                    self.give(client, broken);
                    result
                }
                Err(e) => Err(e),
            };
            match result {
                Err(Failure::Db(e)) if transient(&e) => {
                    let now = Instant::now();
                    if now + pause > deadline {
                        return Err(if now >= deadline {
                            Failure::Db(e)
                        } else {
                            std::thread::sleep(deadline - now);
                            Failure::Db(e)
                        });
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
