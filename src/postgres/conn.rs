//! One connection to the server, driven on a runtime of its own by the
//! calling thread, with a deadline on every call.
//!
//! Keepalives and `tcp_user_timeout` end a connection whose network is
//! gone, but not one whose server accepts, acknowledges and never answers
//! (a frozen backend, a stalled proxy): the kernel acknowledges for it. So
//! every call here has a deadline; past it the connection is closed (the
//! call then fails as on any broken connection, and the callers' handling
//! of a lost reply applies) and [`Client::timed_out`] says why.
//!
//! tokio refuses to block on a runtime from a thread that is inside another
//! ("Cannot start a runtime from within a runtime"): a call made from a
//! tokio task (an `.await` on a shared limit makes its round trips inside
//! `poll`; a guard's `release()`, `try_acquire` or a management call may be
//! made there too) runs on a short-lived thread of its own instead.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Config, Error, NoTls, Notification, Row, Socket};

type Connection = tokio_postgres::Connection<Socket, NoTlsStream>;

/// Why a connection could not be opened.
pub(crate) enum ConnectError {
    Db(Error),
    /// The server did not finish the start-up by the deadline.
    TimedOut,
    /// No runtime for it (out of threads or descriptors).
    Runtime(std::io::Error),
}

/// A connection: the `postgres` crate's blocking client, with deadlines.
pub(crate) struct Client {
    client: tokio_postgres::Client,
    driver: Driver,
}

/// Everything but the client, so that a call (which borrows the client)
/// can be driven through `&mut` of the rest.
struct Driver {
    /// `None` once closed by a deadline.
    connection: Option<Connection>,
    /// `None` only while being dropped.
    runtime: Option<Runtime>,
    notifications: VecDeque<Notification>,
    /// How long one call may take.
    budget: Duration,
    /// A deadline for every call until changed (the caller's own).
    until: Option<Instant>,
    timed_out: bool,
}

impl Client {
    /// Opens a connection, giving up at `deadline` even if the server
    /// accepts and never answers (the configuration's connect timeout
    /// covers only the socket). Each call then may take `budget`.
    pub fn connect(
        config: &Config,
        deadline: Instant,
        budget: Duration,
    ) -> Result<Client, ConnectError> {
        off_runtime(|| Client::connect_here(config, deadline, budget))
    }

    fn connect_here(
        config: &Config,
        deadline: Instant,
        budget: Duration,
    ) -> Result<Client, ConnectError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(ConnectError::Runtime)?;
        let connect =
            async { tokio::time::timeout_at(deadline.into(), config.connect(NoTls)).await };
        match runtime.block_on(connect) {
            Ok(Ok((client, connection))) => Ok(Client {
                client,
                driver: Driver {
                    connection: Some(connection),
                    runtime: Some(runtime),
                    notifications: VecDeque::new(),
                    budget,
                    until: None,
                    timed_out: false,
                },
            }),
            Ok(Err(e)) => Err(ConnectError::Db(e)),
            Err(_) => Err(ConnectError::TimedOut),
        }
    }

    /// Every call ends by `until` as well as within the budget, until this
    /// is called again (`None`: the budget alone).
    pub fn until(&mut self, until: Option<Instant>) {
        self.driver.until = until;
    }

    /// Whether a call ran out of time (the connection is then closed).
    pub fn timed_out(&self) -> bool {
        self.driver.timed_out
    }

    /// Whether the connection is closed (broken, or by a deadline).
    pub fn is_closed(&self) -> bool {
        self.driver.connection.is_none() || self.client.is_closed()
    }

    /// The next notification, waiting for one until `until` (`None`: none
    /// came). Fails if the connection breaks.
    pub fn notification(&mut self, until: Instant) -> Result<Option<Notification>, Error> {
        let d = &mut self.driver;
        if d.notifications.is_empty() {
            if let Some(connection) = d.connection.as_mut() {
                let notifications = &mut d.notifications;
                rt(&d.runtime).block_on(async {
                    let mut sleep = pin!(tokio::time::sleep_until(until.into()));
                    poll_fn(|cx| {
                        drive(connection, notifications, cx)?;
                        if !notifications.is_empty() || sleep.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Ok(()));
                        }
                        Poll::Pending
                    })
                    .await
                })?;
            }
        }
        match d.notifications.pop_front() {
            Some(n) => Ok(Some(n)),
            None if self.is_closed() => {
                // The error a query on this connection gets.
                let call = self.client.simple_query("");
                self.driver.run(call).map(|_| None)
            }
            None => Ok(None),
        }
    }

    pub fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error> {
        let call = self.client.execute(sql, params);
        self.driver.run(call)
    }

    pub fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Error> {
        let call = self.client.query(sql, params);
        self.driver.run(call)
    }

    pub fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, Error> {
        let call = self.client.query_one(sql, params);
        self.driver.run(call)
    }

    pub fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        let call = self.client.query_opt(sql, params);
        self.driver.run(call)
    }

    /// The one row of a statement whose parameters' types are given: one
    /// round trip, no statement to prepare first.
    pub fn query_typed_one(
        &mut self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Row, Error> {
        let call = self.client.query_typed_one(sql, params);
        self.driver.run(call)
    }

    pub fn batch_execute(&mut self, sql: &str) -> Result<(), Error> {
        let call = self.client.batch_execute(sql);
        self.driver.run(call)
    }
}

impl Drop for Driver {
    /// Shuts the runtime down without waiting: a runtime dropped the usual
    /// way inside a tokio task panics ("Cannot drop a runtime in a context
    /// where blocking is not allowed"), and this one runs no tasks.
    fn drop(&mut self) {
        self.connection = None;
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A driver's runtime (there until the driver is dropped).
fn rt(runtime: &Option<Runtime>) -> &Runtime {
    runtime
        .as_ref()
        .expect("the runtime is there until the drop")
}

impl Driver {
    /// Runs `call` to its end or to the deadline, driving the connection
    /// (and keeping the notifications it brings) meanwhile.
    fn run<T: Send>(
        &mut self,
        call: impl Future<Output = Result<T, Error>> + Send,
    ) -> Result<T, Error> {
        off_runtime(|| self.run_here(call))
    }

    fn run_here<T>(&mut self, call: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        let now = Instant::now();
        let deadline = self
            .until
            .map_or(now + self.budget, |u| u.min(now + self.budget));
        let mut call = pin!(call);
        let Some(connection) = self.connection.as_mut() else {
            // Closed by an earlier deadline: the call fails at once.
            return rt(&self.runtime).block_on(call);
        };
        let notifications = &mut self.notifications;
        let outcome = rt(&self.runtime).block_on(async {
            let mut sleep = pin!(tokio::time::sleep_until(deadline.into()));
            poll_fn(|cx| {
                if let Err(e) = drive(connection, notifications, cx) {
                    return Poll::Ready(Some(Err(e)));
                }
                if let Poll::Ready(r) = call.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        });
        match outcome {
            Some(result) => result,
            None => {
                // Past the deadline: close the socket. The call then fails
                // as on a broken connection.
                self.timed_out = true;
                self.connection = None;
                rt(&self.runtime).block_on(call)
            }
        }
    }
}

/// Runs `f` here, or on a thread of its own if this thread is inside a
/// tokio runtime (see the module's documentation).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("turnstile-pg-call".into())
            .spawn_scoped(s, f)
            .expect("a thread for a call made inside a tokio runtime")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Polls the connection until it has nothing more to give, keeping the
/// notifications.
fn drive(
    connection: &mut Connection,
    notifications: &mut VecDeque<Notification>,
    cx: &mut std::task::Context<'_>,
) -> Result<(), Error> {
    loop {
        match connection.poll_message(cx) {
            Poll::Ready(Some(Ok(AsyncMessage::Notification(n)))) => notifications.push_back(n),
            Poll::Ready(Some(Ok(_))) => {} // notices
            Poll::Ready(Some(Err(e))) => return Err(e),
            Poll::Ready(None) | Poll::Pending => return Ok(()),
        }
    }
}
