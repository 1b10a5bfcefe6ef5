//! Acquisitions on the server: the first attempt (one call of `acquire`),
//! then, for a waiter, waiting for its notification or its decay instant
//! and looking again (`look`), or giving up (`withdraw`). Blocking and async
//! forms share these steps; a waiter whose client lost its lease queues
//! again, at the back, within its timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread;
use std::time::{Duration, Instant};

use tokio_postgres::types::Type;

use super::conn::Client;
use super::wait::How;
use super::{HoldEntry, Inner, Job, Outcome, Remote};
use crate::config::validate_name;
use crate::sync::timer::{timer, TimerKey};
use crate::Error;

/// One acquisition, as the builders describe it.
#[derive(Debug, Clone)]
pub(crate) struct Ask {
    pub names: Vec<String>,
    pub occupy: u32,
    pub rate: bool,
    pub strict: bool,
    pub create: bool,
    pub max_retries: Option<u32>,
    pub timeout: Option<Duration>,
}

impl Ask {
    fn joined(&self) -> String {
        self.names.join(", ")
    }

    fn check(&self) -> Result<(), Error> {
        if self.occupy == 0 {
            return Err(Error::InvalidOccupy { occupy: 0 });
        }
        for name in &self.names {
            validate_name(name)?;
        }
        Ok(())
    }

    fn timed_out(&self, waited: Duration) -> Error {
        Error::Timeout {
            names: self.joined(),
            occupy: self.occupy,
            waited,
        }
    }

    fn max_retries(&self) -> Option<i32> {
        self.max_retries
            .map(|n| i32::try_from(n).unwrap_or(i32::MAX))
    }
}

/// Slots taken on the server.
#[derive(Debug)]
pub(crate) struct Grant {
    /// The hold to give back (0: nothing held: a rate limit, or only
    /// inactive or skipped limits).
    pub hold: i64,
    pub client: i64,
    pub waited: Duration,
    pub lost: Arc<AtomicBool>,
}

/// How the first attempt ended.
enum First {
    Done(Result<Option<Grant>, Error>),
    Queued {
        client: i64,
        epoch: u64,
        ticket: i64,
        wake_at: Option<Instant>,
    },
    /// The client was lost meanwhile: queue again under the next one.
    Again,
}

impl Inner {
    /// The first attempt. `queue`: wait if it does not fit; `at_once`: the
    /// database must answer now (`try_acquire`).
    fn first(
        &self,
        ask: &Ask,
        queue: bool,
        at_once: bool,
        start: Instant,
        deadline: Option<Instant>,
    ) -> First {
        let registered = if at_once {
            self.current()
                .ok_or_else(|| self.storage("not connected to the database", None))
        } else {
            self.registered(deadline)
                .map_err(|()| ask.timed_out(start.elapsed()))
        };
        let (client, epoch) = match registered {
            Ok(r) => r,
            Err(e) => return First::Done(Err(e)),
        };
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let sql = self
            .ns
            .sql("SELECT * FROM __NS__.acquire($1, $2, $3, $4, $5, $6, $7, $8, $9)");
        let occupy = i32::try_from(ask.occupy).unwrap_or(i32::MAX);
        let max_retries = ask.max_retries();
        let call = |c: &mut Client| {
            self.outcome(
                c,
                &sql,
                &[
                    (&client, Type::INT8),
                    (&req, Type::INT8),
                    (&ask.names, Type::TEXT_ARRAY),
                    (&occupy, Type::INT4),
                    (&ask.rate, Type::BOOL),
                    (&ask.strict, Type::BOOL),
                    (&ask.create, Type::BOOL),
                    (&max_retries, Type::INT4),
                    (&queue, Type::BOOL),
                ],
            )
        };
        let out = match self.pool.with(deadline, call) {
            Ok(out) => out,
            Err(f) if !f.transient() => return First::Done(Err(self.failure(f, &ask.joined()))),
            // The reply may be lost while the call committed: undone in
            // the background once the database answers.
            Err(f) if at_once => {
                self.send(Job::Abandon { client, req });
                return First::Done(Err(self.failure(f, &ask.joined())));
            }
            // The reply was lost: find out whether the call committed.
            Err(_) => match self.find(client, req, deadline) {
                Some(out) if out.outcome != "gone" => out,
                Some(_) => return First::Again,
                None => {
                    self.send(Job::Abandon { client, req });
                    return First::Done(Err(ask.timed_out(start.elapsed())));
                }
            },
        };
        self.judge(ask, &out, client, epoch, start)
    }

    /// What became of request `req`, retrying while the database is away
    /// (`None`: still away at `deadline`).
    fn find(&self, client: i64, req: i64, deadline: Option<Instant>) -> Option<Outcome> {
        let sql = self.ns.sql("SELECT * FROM __NS__.find_request($1, $2)");
        self.patiently(deadline, |c| self.outcome_of(c, &sql, client, req))
    }

    /// Runs `f` until it succeeds or fails for good, pausing while the
    /// database is away; `None` if it is still away at `deadline`.
    fn patiently(
        &self,
        deadline: Option<Instant>,
        mut f: impl FnMut(&mut Client) -> Result<Outcome, tokio_postgres::Error>,
    ) -> Option<Outcome> {
        let mut pause = Duration::from_millis(20);
        loop {
            match self.pool.with(deadline, &mut f) {
                Ok(out) => return Some(out),
                Err(f) if !f.transient() => {
                    return Some(Outcome {
                        outcome: "failed".into(),
                        id: 0,
                        err: Some(f.message()),
                        err_name: None,
                        err_a: None,
                        err_b: None,
                        wait_secs: None,
                    })
                }
                Err(_) => {}
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) || self.stop.load(Ordering::SeqCst) {
                return None;
            }
            let sleep = deadline.map_or(pause, |d| pause.min(d - now));
            thread::sleep(sleep);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// An answer in the library's terms.
    fn judge(&self, ask: &Ask, out: &Outcome, client: i64, epoch: u64, start: Instant) -> First {
        match out.outcome.as_str() {
            "taken" => First::Done(Ok(Some(self.granted(ask, out.id, client, start)))),
            "refused" => First::Done(Ok(None)),
            "error" => First::Done(Err(out.error(&ask.joined(), ask.occupy))),
            "queued" => First::Queued {
                client,
                epoch,
                ticket: out.id,
                wake_at: wake_at(out),
            },
            "lost" | "gone" => First::Again,
            _ => First::Done(Err(self.storage(
                &format!(
                    "the server failed the acquisition: {}",
                    out.err.as_deref().unwrap_or(&out.outcome)
                ),
                None,
            ))),
        }
    }

    /// A grant, tracked so that a lost lease can mark it.
    fn granted(&self, ask: &Ask, hold: i64, client: i64, start: Instant) -> Grant {
        let lost = Arc::new(AtomicBool::new(false));
        if hold != 0 {
            self.holds.lock().insert(
                hold,
                HoldEntry {
                    names: ask.names.clone(),
                    occupy: ask.occupy,
                    lost: lost.clone(),
                },
            );
        }
        Grant {
            hold,
            client,
            waited: start.elapsed(),
            lost,
        }
    }

    /// Whether the client that queued a waiter is gone.
    fn lost_since(&self, epoch: u64) -> bool {
        self.session.lock().epoch != epoch
    }

    /// Looks at a queued waiter: granted, failed, or still waiting (with its
    /// decay instant). `None`: the database is away past `deadline`.
    fn look(&self, client: i64, ticket: i64, deadline: Option<Instant>) -> Option<Outcome> {
        let sql = self.ns.sql("SELECT * FROM __NS__.look($1, $2)");
        self.patiently(deadline, |c| self.outcome_of(c, &sql, client, ticket))
    }

    /// Gives up a queued waiter; a grant that came first is kept (it was
    /// made before the deadline).
    fn withdraw(&self, ask: &Ask, client: i64, ticket: i64, start: Instant) -> Option<First> {
        let sql = self.ns.sql("SELECT * FROM __NS__.withdraw($1, $2)");
        let out = self.patiently(Some(Instant::now() + Duration::from_millis(500)), |c| {
            self.outcome_of(c, &sql, client, ticket)
        });
        match out {
            Some(out) if out.outcome == "taken" || out.outcome == "error" => {
                Some(self.judge(ask, &out, client, 0, start))
            }
            Some(_) => None,
            None => {
                // Away: the releaser withdraws it when the database is back
                // (or the lease frees it).
                self.send(Job::Withdraw { client, ticket });
                None
            }
        }
    }

    /// The blocking form: `Ok(None)` only when `try_only`.
    pub fn acquire(&self, ask: &Ask, try_only: bool) -> Result<Option<Grant>, Error> {
        ask.check()?;
        let start = Instant::now();
        let deadline = ask.timeout.and_then(|t| start.checked_add(t));
        let queue = !try_only && ask.timeout != Some(Duration::ZERO);
        loop {
            let since = self.waits.generation();
            let (client, epoch, ticket, mut wake) = match self
                .first(ask, queue, try_only, start, deadline)
            {
                First::Done(Ok(None)) if !try_only => return Err(ask.timed_out(start.elapsed())),
                First::Done(done) => return done,
                First::Again if try_only => {
                    return Err(self.storage(
                        "the database dropped this client (lease lost); reconnecting",
                        None,
                    ))
                }
                First::Again => {
                    self.pause_until_registered(deadline);
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(ask.timed_out(start.elapsed()));
                    }
                    continue;
                }
                First::Queued {
                    client,
                    epoch,
                    ticket,
                    wake_at,
                } => (client, epoch, ticket, wake_at),
            };
            let flag = Arc::new(AtomicBool::new(false));
            drop(
                self.waits
                    .register(ticket, since, &flag, How::Thread(thread::current())),
            );
            let done = loop {
                if self.lost_since(epoch) {
                    break None;
                }
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    break Some(match self.withdraw(ask, client, ticket, start) {
                        Some(First::Done(done)) => done,
                        _ => Err(ask.timed_out(start.elapsed())),
                    });
                }
                if flag.swap(false, Ordering::SeqCst) || wake.is_some_and(|w| now >= w) {
                    if let Some(hold) = self.waits.take_grant(ticket) {
                        break Some(Ok(Some(self.granted(ask, hold, client, start))));
                    }
                    match self.look(client, ticket, deadline) {
                        None => continue, // deadline: withdraw above
                        Some(out) => match self.judge(ask, &out, client, epoch, start) {
                            First::Done(Err(e)) => {
                                // Failed on the server (already out of its queues)
                                // or an error here: make sure.
                                self.send(Job::Withdraw { client, ticket });
                                break Some(Err(e));
                            }
                            First::Done(done) => break Some(done),
                            First::Queued { wake_at, .. } => wake = wake_at,
                            First::Again => break None,
                        },
                    }
                    continue;
                }
                let until = match (deadline, wake) {
                    (Some(d), Some(w)) => Some(d.min(w)),
                    (d, w) => d.or(w),
                };
                match until {
                    Some(at) => thread::park_timeout(at.saturating_duration_since(now)),
                    None => thread::park(),
                }
            };
            drop(self.waits.unregister(ticket));
            match done {
                Some(done) => return done,
                None => self.pause_until_registered(deadline),
            }
        }
    }

    /// After a lost client: waits (within `deadline`) for the keeper to
    /// notice and register the next one, without hammering the server in
    /// the meantime.
    fn pause_until_registered(&self, deadline: Option<Instant>) {
        thread::sleep(Duration::from_millis(20));
        let _ = self.registered(deadline);
    }

    /// Gives a hold back now and returns once it is back; `false` if it was
    /// lost (its lease expired).
    pub fn release_now(&self, client: i64, hold: i64) -> bool {
        let sql = self.ns.sql("SELECT * FROM __NS__.release($1, $2)");
        let out = self.patiently(Some(Instant::now() + self.lease), |c| {
            self.outcome_of(c, &sql, client, hold)
        });
        matches!(out, Some(out) if out.outcome == "released")
    }
}

/// When decay alone will let a queued waiter in, on this host's clock.
fn wake_at(out: &Outcome) -> Option<Instant> {
    out.wait_secs
        .filter(|s| s.is_finite())
        .map(|s| Instant::now() + Duration::from_secs_f64(s.clamp(0.0, 1e9)))
}

/// The async form: the same steps as [`Inner::acquire`], each database call
/// made inside `poll` (a round trip), waiting between them by waker.
pub(crate) struct RemoteWait {
    remote: Arc<Remote>,
    ask: Ask,
    start: Option<Instant>,
    queued: Option<Queued>,
    timer: Option<TimerKey>,
    done: bool,
}

struct Queued {
    client: i64,
    epoch: u64,
    ticket: i64,
    /// The waits' generation when it queued.
    since: u64,
    wake: Option<Instant>,
    flag: Arc<AtomicBool>,
}

impl RemoteWait {
    pub fn new(remote: Arc<Remote>, ask: Ask) -> Self {
        RemoteWait {
            remote,
            ask,
            start: None,
            queued: None,
            timer: None,
            done: false,
        }
    }

    pub fn ask(&self) -> &Ask {
        &self.ask
    }

    fn finish(&mut self, done: Result<Option<Grant>, Error>) -> Poll<Result<Grant, Error>> {
        self.done = true;
        if let Some(q) = self.queued.take() {
            drop(self.remote.inner.waits.unregister(q.ticket));
        }
        if let Some(key) = self.timer.take() {
            timer().cancel(key);
        }
        let start = self.start.unwrap_or_else(Instant::now);
        Poll::Ready(done.and_then(|g| g.ok_or_else(|| self.ask.timed_out(start.elapsed()))))
    }
}

impl Future for RemoteWait {
    type Output = Result<Grant, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        assert!(!this.done, "turnstile future polled after completion");
        let inner = this.remote.inner.clone();
        let now = Instant::now();
        let start = *this.start.get_or_insert(now);
        let deadline = this.ask.timeout.and_then(|t| start.checked_add(t));
        if let Err(e) = this.ask.check() {
            return this.finish(Err(e));
        }
        let queue = this.ask.timeout != Some(Duration::ZERO);
        loop {
            let Some(q) = &mut this.queued else {
                // The first attempt (again, after a lost client). Waiting for
                // a registration must not block the executor: only look.
                if inner.current().is_none() {
                    if deadline.is_some_and(|d| now >= d) {
                        return this.finish(Err(this.ask.timed_out(start.elapsed())));
                    }
                    // Looked at again shortly.
                    let at = now + Duration::from_millis(20);
                    let at = deadline.map_or(at, |d| d.min(at));
                    this.arm(at, cx);
                    return Poll::Pending;
                }
                let since = inner.waits.generation();
                match inner.first(&this.ask, queue, false, start, deadline) {
                    First::Done(done) => return this.finish(done),
                    First::Again => {
                        this.arm(now + Duration::from_millis(20), cx);
                        return Poll::Pending;
                    }
                    First::Queued {
                        client,
                        epoch,
                        ticket,
                        wake_at,
                    } => {
                        let flag = Arc::new(AtomicBool::new(false));
                        let how = How::Task(cx.waker().clone());
                        drop(inner.waits.register(ticket, since, &flag, how));
                        this.queued = Some(Queued {
                            client,
                            epoch,
                            ticket,
                            since,
                            wake: wake_at,
                            flag,
                        });
                        continue;
                    }
                }
            };
            if inner.lost_since(q.epoch) {
                drop(inner.waits.unregister(q.ticket));
                this.queued = None;
                continue;
            }
            if deadline.is_some_and(|d| now >= d) {
                let (client, ticket) = (q.client, q.ticket);
                this.queued = None;
                drop(inner.waits.unregister(ticket));
                return match inner.withdraw(&this.ask, client, ticket, start) {
                    Some(First::Done(done)) => this.finish(done),
                    _ => this.finish(Err(this.ask.timed_out(start.elapsed()))),
                };
            }
            if q.flag.swap(false, Ordering::SeqCst) || q.wake.is_some_and(|w| now >= w) {
                let (client, epoch, ticket) = (q.client, q.epoch, q.ticket);
                if let Some(hold) = inner.waits.take_grant(ticket) {
                    let grant = inner.granted(&this.ask, hold, client, start);
                    return this.finish(Ok(Some(grant)));
                }
                match inner.look(client, ticket, Some(now + Duration::from_millis(200))) {
                    Some(out) => match inner.judge(&this.ask, &out, client, epoch, start) {
                        First::Done(Err(e)) => {
                            // Out of its queues on the server; make sure.
                            inner.send(Job::Withdraw { client, ticket });
                            return this.finish(Err(e));
                        }
                        First::Done(done) => return this.finish(done),
                        First::Queued { wake_at, .. } => q.wake = wake_at,
                        First::Again => {
                            drop(inner.waits.unregister(ticket));
                            this.queued = None;
                            continue;
                        }
                    },
                    None => q.flag.store(true, Ordering::SeqCst),
                }
            }
            // Re-registered each pending poll: the task's waker may change.
            let (ticket, since, flag) = (q.ticket, q.since, q.flag.clone());
            let wake = q.wake;
            let how = How::Task(cx.waker().clone());
            drop(inner.waits.register(ticket, since, &flag, how));
            let until = match (deadline, wake) {
                (Some(d), Some(w)) => Some(d.min(w)),
                (d, w) => d.or(w),
            };
            if flag.load(Ordering::SeqCst) {
                cx.waker().wake_by_ref();
            } else if let Some(at) = until {
                this.arm(at, cx);
            }
            return Poll::Pending;
        }
    }
}

impl RemoteWait {
    fn arm(&mut self, at: Instant, cx: &Context<'_>) {
        if let Some(old) = self.timer.take() {
            timer().cancel(old);
        }
        self.timer = Some(timer().register(at, cx.waker().clone()));
    }
}

impl Drop for RemoteWait {
    fn drop(&mut self) {
        if let Some(key) = self.timer.take() {
            timer().cancel(key);
        }
        if let Some(q) = self.queued.take() {
            drop(self.remote.inner.waits.unregister(q.ticket));
            // Out of the queue without waiting for the database; a grant
            // that came first is given back.
            self.remote.inner.send(Job::Withdraw {
                client: q.client,
                ticket: q.ticket,
            });
        }
    }
}
