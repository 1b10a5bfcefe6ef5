//! The acquisition builders, [`Acquire`] and [`RateLimit`]: blocking, `try_`,
//! with a timeout, and async through `IntoFuture`. All four forms share one
//! deadline-based core.

use std::cell::OnceCell;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::cell;
use crate::clock::LazyNow;
use crate::event::Event;
use crate::guard::ConcurrencyGuard;
use crate::limiter::{deliver, Limiter, Shared};
use crate::names::{IntoNames, Names};
use crate::recent;
use crate::registry::LimitId;
use crate::state::{Begin, Look, Request};
use crate::sync::thread;
use crate::sync::timer::{timer, TimerKey};
use crate::waiters::{Ids, Kind, Ticket, Wake, Wakes};
use crate::Error;

/// Options shared by both builders (Prefect's parameters).
#[derive(Debug, Clone, Copy)]
struct Options {
    timeout: Option<Duration>,
    create_if_missing: bool,
    max_retries: Option<u32>,
    strict: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: None,
            create_if_missing: true,
            max_retries: None,
            strict: false,
        }
    }
}

/// What one acquisition asks for.
struct Spec<'a> {
    names: Names<'a>,
    occupy: u32,
    kind: Kind,
    opts: Options,
}

impl<'a> Spec<'a> {
    fn request(&self) -> Request<'_, 'a> {
        Request {
            names: &self.names,
            occupy: self.occupy,
            kind: self.kind,
            strict: self.opts.strict,
            create_if_missing: self.opts.create_if_missing,
            max_retries: self.opts.max_retries,
        }
    }

    /// `None`: wait forever (also when the timeout is too large to add).
    fn deadline(&self, start: Instant) -> Option<Instant> {
        self.opts.timeout.and_then(|t| start.checked_add(t))
    }

    fn waits(&self) -> bool {
        self.opts.timeout != Some(Duration::ZERO)
    }

    fn timed_out(&self, waited: Duration) -> Error {
        Error::Timeout {
            names: self.names.joined(),
            occupy: self.occupy,
            waited,
        }
    }
}

/// Slots taken, from which limits, after how long a wait.
struct Taken {
    ids: Ids,
    /// Up to the grant, for a queued waiter.
    waited: Duration,
    /// When a queued waiter was granted (its hold starts then); `None`:
    /// taken by the caller itself, just now.
    granted_at: Option<Instant>,
}

impl Taken {
    /// Taken at the first attempt.
    fn at_once(ids: Ids) -> Taken {
        Taken {
            ids,
            waited: Duration::ZERO,
            granted_at: None,
        }
    }

    /// Granted at `at` to a waiter queued since `start`.
    fn granted((ids, at): (Ids, Instant), start: Instant) -> Taken {
        Taken {
            ids,
            waited: at.saturating_duration_since(start),
            granted_at: Some(at),
        }
    }
}

/// How the caller wants a first attempt that does not fit handled.
#[derive(PartialEq)]
enum Mode {
    Try,
    Block,
}

/// Spins (yielding now and then) for a short while before a queued thread
/// first parks: holds are often short, and a waiter that is still running
/// when its slots are handed to it uses them at once, where a parked one
/// keeps them idle until the scheduler gets round to it. Only the first in
/// line spins: waiters behind it would take the CPU that the holders and the
/// head of the queue need. Measured with 8 threads sharing a limit of 4 on 2
/// cores: 6.4 M acquisitions/s when only the head spins, 0.9 M when every
/// waiter does, 0.65 M when the others merely yield once before parking.
/// With a limit of 1, everyone spinning was faster (0.3 M/s against 0.06 to
/// 0.08 M/s): there a grant wakes the next in line to spin at the head (see
/// `State::grant`), which brings it to 0.10 to 0.12 M/s.
fn spin_until(woken: &AtomicBool) {
    // Under the model checker every spin would be a schedule to explore.
    if cfg!(feature = "model") {
        return;
    }
    for i in 0..SPINS {
        if woken.load(Ordering::Acquire) {
            return;
        }
        if i % 16 == 15 {
            thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Spin iterations of [`spin_until`].
const SPINS: u32 = 256;

/// The blocking core: a first attempt, then parking until granted, failed or
/// out of time. `Ok(None)` only for `Mode::Try`.
fn run(shared: &Shared, spec: &Spec<'_>, mode: Mode) -> Result<Option<Taken>, Error> {
    // Read only if decay is in play or the acquisition must wait; the wait,
    // and its deadline, start then.
    let mut clock = LazyNow::default();
    let queue = mode == Mode::Block && spec.waits();
    // Made only if the acquisition queues.
    let woken: OnceCell<Arc<AtomicBool>> = OnceCell::new();
    let wake = || Wake::Thread(thread::current(), woken.get_or_init(Arc::default).clone());
    let begin = loop {
        let mut wakes = Wakes::new();
        let begin = shared.state.lock().begin(
            &spec.request(),
            &mut clock,
            queue.then_some(&wake as &dyn Fn() -> Wake),
            &mut wakes,
        );
        deliver(wakes);
        match begin? {
            Begin::Create(names) => shared.create_missing(&names)?,
            begin => break begin,
        }
    };
    let (ticket, first) = match begin {
        Begin::Taken(ids) => return Ok(Some(Taken::at_once(ids))),
        Begin::Refused if mode == Mode::Try => return Ok(None),
        Begin::Refused => return Err(spec.timed_out(Duration::ZERO)),
        Begin::Queued { ticket, first } => (ticket, first),
        Begin::Create(_) => unreachable!("handled above"),
    };
    let start = clock.get();
    let deadline = spec.deadline(start);
    if let (Some(woken), true) = (woken.get(), first) {
        spin_until(woken);
    }
    let mut spun = first;
    loop {
        let now = Instant::now();
        let mut wakes = Wakes::new();
        let look = shared
            .state
            .lock()
            .look(ticket, now, start, deadline, &mut wakes);
        deliver(wakes);
        match look {
            Look::Done(done) => return done.map(|got| Some(Taken::granted(got, start))),
            // A limit it waited for was deleted: created again as by a
            // first attempt (`Begin::Create`), then it looks again.
            Look::Create(names) => {
                if let Err(err) = shared.create_missing(&names) {
                    let mut wakes = Wakes::new();
                    shared
                        .state
                        .lock()
                        .abandon(ticket, Instant::now(), &mut wakes);
                    deliver(wakes);
                    return Err(err);
                }
            }
            Look::Wait { at, first } => {
                // Moved up to the head of the line (its predecessor was
                // granted, and woke it): spin once more before parking.
                if let (Some(woken), true, false) = (woken.get(), first, spun) {
                    spun = true;
                    woken.store(false, Ordering::Release);
                    spin_until(woken);
                    if woken.load(Ordering::Acquire) {
                        continue;
                    }
                }
                // Spurious and early unparks only cost another look.
                match at {
                    Some(at) => thread::park_timeout(at.saturating_duration_since(now)),
                    None => thread::park(),
                }
            }
        }
    }
}

/// The uncontended path of one name: an existing active limit with room,
/// nobody observing. A concurrency acquisition on a limit that is simple
/// (nobody queued, no decay, active) takes its slots from the limit's cell
/// without the engine's lock (see [`crate::cell`]); otherwise one lock and
/// [`crate::state::State::take_one`]. Reads no clock for a concurrency
/// acquisition. `None` leaves everything to [`run`], which decides and
/// reports exactly as if this had not been tried.
#[inline]
fn fast(shared: &Shared, spec: &Spec<'_>, mut now: LazyNow) -> Option<LimitId> {
    if shared.observer.is_some() || spec.occupy == 0 {
        return None;
    }
    let name = spec.names.single()?;
    let mut remember = None;
    if spec.kind == Kind::Concurrency {
        remember = recent::Key::new(shared.id, name);
        if let Some(key) = &remember {
            match take_remembered(shared, key, spec.occupy) {
                Found::Taken(id) => return Some(id),
                Found::Full => return None,
                Found::Ask => {}
            }
        }
    }
    shared
        .state
        .lock()
        .take_one(name, spec.occupy, spec.kind, &mut now, remember)
}

/// The lock-free step of [`fast`]: takes held slots from the cell of the
/// limit this thread last found under `key`'s name. `Ask` leaves the
/// decision to the engine's lock.
#[inline]
fn take_remembered(shared: &Shared, key: &recent::Key, occupy: u32) -> Found {
    let Some(id) = recent::find(key) else {
        return Found::Ask;
    };
    let cells = &shared.index.cells;
    match cells.get(id.idx).map(|c| c.try_take(id.uid, occupy)) {
        Some(cell::Take::Taken) => {
            if shared.store.is_some() {
                cells.mark(id.idx);
            }
            Found::Taken(id)
        }
        // Free but without room: the general path queues or refuses.
        Some(cell::Take::Full) => Found::Full,
        // Claimed, or the name is another limit's now: the lock decides
        // (and this thread remembers what it finds).
        Some(cell::Take::Ask) | None => Found::Ask,
    }
}

/// What [`take_remembered`] found.
enum Found {
    Taken(LimitId),
    Full,
    Ask,
}

/// Tells the observer what was taken.
fn acquired(shared: &Shared, taken: &Taken, occupy: u32, kind: Kind) {
    if shared.observer.is_none() || taken.ids.is_empty() {
        return;
    }
    let names = {
        let state = shared.state.lock();
        taken
            .ids
            .iter()
            .filter_map(|id| state.reg.get(id.idx).filter(|l| l.uid == id.uid))
            .map(|l| l.name.to_string())
            .collect()
    };
    shared.emit(|| Event::Acquired {
        names,
        occupy,
        waited: taken.waited,
        rate_limit: kind == Kind::RateLimit,
    });
}

macro_rules! options {
    () => {
        /// Gives up after `timeout` with [`Error::Timeout`]; the deadline
        /// covers the whole acquisition. `Duration::ZERO` means one attempt
        /// and no waiting. Without it (the default), waits indefinitely.
        pub fn timeout(mut self, timeout: Duration) -> Self {
            self.spec.opts.timeout = Some(timeout);
            self
        }

        /// Whether a missing limit is created, inactive with limit 1, so that
        /// the acquisition passes and an operator can configure it later
        /// (default `true`, as Prefect). With `false` a missing name is
        /// skipped.
        pub fn create_if_missing(mut self, create: bool) -> Self {
            self.spec.opts.create_if_missing = create;
            self
        }

        /// Makes at most `1 + retries` attempts: the first, then one each time
        /// the acquisition is woken (a release, decay, an update of its limits)
        /// and checks again; then fails with [`Error::RetriesExhausted`].
        /// Default: unbounded.
        pub fn max_retries(mut self, retries: u32) -> Self {
            self.spec.opts.max_retries = Some(retries);
            self
        }

        /// With `true`, a missing name is [`Error::NotFound`] (naming the first
        /// missing one), and nothing is created or taken; this wins over
        /// `create_if_missing`. Default `false`.
        pub fn strict(mut self, strict: bool) -> Self {
            self.spec.opts.strict = strict;
            self
        }
    };
}

/// An acquisition of held slots, made by [`Limiter::concurrency`].
///
/// # Fairness
///
/// Waiters are served first come, first served on every limit they share;
/// a later acquisition (including `try_acquire`) passes an earlier one only
/// when it cannot delay it. Several limits are taken all at once or not at all,
/// in any order of names, without deadlock.
///
/// # Cancel safety
///
/// Dropping the future of `.await` at any point, including the instant slots
/// were granted to it, leaves nothing taken and nobody queued. That includes
/// the one poll in 128 at which a task whose acquisitions all fit at once
/// yields to its executor (see the crate docs, *Cooperative scheduling*):
/// that poll returns `Pending` before attempting anything, so a future
/// dropped then has nothing to give back, and one polled again attempts at
/// once.
#[must_use = "an acquisition does nothing until .acquire(), .try_acquire() or .await"]
pub struct Acquire<'a> {
    limiter: &'a Limiter,
    spec: Spec<'a>,
}

impl<'a> Acquire<'a> {
    pub(crate) fn new(limiter: &'a Limiter, names: Names<'a>, occupy: u32) -> Self {
        Acquire {
            limiter,
            spec: Spec {
                names,
                occupy,
                kind: Kind::Concurrency,
                opts: Options::default(),
            },
        }
    }

    options!();

    /// Blocks until the slots are held.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`], [`Error::RetriesExhausted`],
    /// [`Error::OccupyExceedsLimit`] (also if the limit is lowered below
    /// `occupy` while waiting), [`Error::InvalidOccupy`], [`Error::InvalidName`],
    /// [`Error::NotFound`] with `strict`.
    pub fn acquire(self) -> Result<ConcurrencyGuard, Error> {
        #[cfg(feature = "postgres")]
        if self.limiter.shared.remote.is_some() {
            return remote::concurrency(&self.limiter.shared, &self.spec, false)
                .map(|g| g.expect("blocking"));
        }
        if let Some(id) = fast(&self.limiter.shared, &self.spec, LazyNow::default()) {
            return Ok(self.fast_guard(id));
        }
        let taken = run(&self.limiter.shared, &self.spec, Mode::Block)?.expect("blocking");
        Ok(self.guard(taken))
    }

    /// Takes the slots if they fit now, without waiting; `Ok(None)` if not
    /// (or if a limit is paused). Fair: it does not take slots an earlier
    /// waiter is queued for.
    ///
    /// # Errors
    ///
    /// As [`Acquire::acquire`], but never a timeout.
    pub fn try_acquire(self) -> Result<Option<ConcurrencyGuard>, Error> {
        #[cfg(feature = "postgres")]
        if self.limiter.shared.remote.is_some() {
            return remote::concurrency(&self.limiter.shared, &self.spec, true);
        }
        if let Some(id) = fast(&self.limiter.shared, &self.spec, LazyNow::default()) {
            return Ok(Some(self.fast_guard(id)));
        }
        let taken = run(&self.limiter.shared, &self.spec, Mode::Try)?;
        Ok(taken.map(|t| self.guard(t)))
    }

    fn guard(&self, taken: Taken) -> ConcurrencyGuard {
        let shared = &self.limiter.shared;
        acquired(shared, &taken, self.spec.occupy, Kind::Concurrency);
        ConcurrencyGuard::granted(
            shared.clone(),
            taken.ids,
            self.spec.occupy,
            taken.granted_at,
        )
    }

    fn fast_guard(&self, id: LimitId) -> ConcurrencyGuard {
        let ids = Ids::from_elem(id, 1);
        ConcurrencyGuard::new(self.limiter.shared.clone(), ids, self.spec.occupy)
    }
}

impl fmt::Debug for Acquire<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquire")
            .field("names", &self.spec.names.joined())
            .field("occupy", &self.spec.occupy)
            .field("options", &self.spec.opts)
            .finish()
    }
}

impl<'a> IntoFuture for Acquire<'a> {
    type Output = Result<ConcurrencyGuard, Error>;
    type IntoFuture = AcquireFuture;

    #[inline(always)]
    fn into_future(self) -> AcquireFuture {
        AcquireFuture(Attempt::new(&self.limiter.shared, self.spec))
    }
}

/// A rate-limit acquisition, made by [`Limiter::rate_limit`]: it blocks until
/// `occupy` slots fit on every named limit and takes them as decaying slots.
///
/// Fair and cancel-safe as [`Acquire`], and its future yields to the
/// executor as [`Acquire`]'s does (see its `# Cancel safety`): a yielded
/// `rate_limit(..).await` has taken no slots, so dropping it then costs no
/// pace. A waiter held back only by decay is
/// woken at the exact instant enough slots have drained, and charged from that
/// instant, so timer lateness costs no pace.
#[must_use = "a rate limit does nothing until .acquire(), .try_acquire() or .await"]
pub struct RateLimit<'a> {
    limiter: &'a Limiter,
    spec: Spec<'a>,
}

impl<'a> RateLimit<'a> {
    pub(crate) fn new(limiter: &'a Limiter, names: Names<'a>, occupy: u32) -> Self {
        RateLimit {
            limiter,
            spec: Spec {
                names,
                occupy,
                kind: Kind::RateLimit,
                opts: Options::default(),
            },
        }
    }

    options!();

    /// Blocks until the slots fit, then takes them.
    ///
    /// # Errors
    ///
    /// As [`Acquire::acquire`], plus [`Error::NoSlotDecay`] on an active limit
    /// whose `slot_decay_per_second` is 0.
    pub fn acquire(self) -> Result<(), Error> {
        let shared = &self.limiter.shared;
        #[cfg(feature = "postgres")]
        if shared.remote.is_some() {
            return remote::rate(shared, &self.spec, false).map(|_| ());
        }
        if fast(shared, &self.spec, LazyNow::at(Instant::now())).is_some() {
            return Ok(());
        }
        let taken = run(shared, &self.spec, Mode::Block)?.expect("blocking");
        acquired(shared, &taken, self.spec.occupy, Kind::RateLimit);
        Ok(())
    }

    /// Takes the slots if they fit now; `Ok(false)` if not.
    ///
    /// # Errors
    ///
    /// As [`RateLimit::acquire`], but never a timeout.
    pub fn try_acquire(self) -> Result<bool, Error> {
        let shared = &self.limiter.shared;
        #[cfg(feature = "postgres")]
        if shared.remote.is_some() {
            return remote::rate(shared, &self.spec, true);
        }
        if fast(shared, &self.spec, LazyNow::at(Instant::now())).is_some() {
            return Ok(true);
        }
        match run(shared, &self.spec, Mode::Try)? {
            Some(taken) => {
                acquired(shared, &taken, self.spec.occupy, Kind::RateLimit);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl fmt::Debug for RateLimit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("names", &self.spec.names.joined())
            .field("occupy", &self.spec.occupy)
            .field("options", &self.spec.opts)
            .finish()
    }
}

impl<'a> IntoFuture for RateLimit<'a> {
    type Output = Result<(), Error>;
    type IntoFuture = RateLimitFuture;

    #[inline]
    fn into_future(self) -> RateLimitFuture {
        RateLimitFuture(Attempt::new(&self.limiter.shared, self.spec))
    }
}

/// The future of [`Acquire`]'s `.await`: resolves to a guard.
///
/// Works under any executor; timeouts and decay waits use turnstile's own
/// timer thread. Nothing is attempted before the first poll, and dropping it
/// gives back anything it took. A task whose acquisitions all fit at once
/// yields to the executor once every 128 of them (see the crate docs,
/// *Async*).
#[must_use = "futures do nothing unless polled"]
pub struct AcquireFuture(Attempt);

/// The future of [`RateLimit`]'s `.await`.
///
/// Works under any executor; dropping it gives back anything it took. It
/// yields as [`AcquireFuture`] does.
#[must_use = "futures do nothing unless polled"]
pub struct RateLimitFuture(Attempt);

impl Future for AcquireFuture {
    type Output = Result<ConcurrencyGuard, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let attempt = &mut self.get_mut().0;
        #[cfg(feature = "postgres")]
        if let Some((shared, wait)) = attempt.remote() {
            return Pin::new(&mut *wait)
                .poll(cx)
                .map(|grant| Ok(remote::guard(shared, grant?, wait.ask())));
        }
        let first = match attempt.poll_first(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(First::Taken(shared, id, occupy)) => {
                let ids = Ids::from_elem(id, 1);
                return Poll::Ready(Ok(ConcurrencyGuard::new(shared, ids, occupy)));
            }
            Poll::Ready(First::General(first)) => first,
        };
        attempt.poll_general(cx, first).map(|granted| {
            let Granted {
                shared,
                taken,
                occupy,
            } = granted?;
            acquired(&shared, &taken, occupy, Kind::Concurrency);
            Ok(ConcurrencyGuard::granted(
                shared,
                taken.ids,
                occupy,
                taken.granted_at,
            ))
        })
    }
}

impl Future for RateLimitFuture {
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let attempt = &mut self.get_mut().0;
        #[cfg(feature = "postgres")]
        if let Some((shared, wait)) = attempt.remote() {
            return Pin::new(&mut *wait).poll(cx).map(|grant| {
                remote::rate_acquired(shared, &grant?, wait.ask());
                Ok(())
            });
        }
        let first = match attempt.poll_first(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(First::Taken(..)) => return Poll::Ready(Ok(())),
            Poll::Ready(First::General(first)) => first,
        };
        attempt.poll_general(cx, first).map(|granted| {
            let granted = granted?;
            acquired(
                &granted.shared,
                &granted.taken,
                granted.occupy,
                Kind::RateLimit,
            );
            Ok(())
        })
    }
}

impl fmt::Debug for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attempt::Fresh(_) => f.write_str("Fresh"),
            Attempt::Waiting(waiting) => f.debug_tuple("Local").field(&waiting.ticket).finish(),
            Attempt::Done => f.write_str("Done"),
            #[cfg(feature = "postgres")]
            Attempt::Remote(..) => f.write_str("Shared"),
        }
    }
}

impl fmt::Debug for AcquireFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AcquireFuture").field(&self.0).finish()
    }
}

impl fmt::Debug for RateLimitFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RateLimitFuture").field(&self.0).finish()
    }
}

/// Immediate grants in a row to one task on one thread, after which its
/// next first poll yields once to the executor before it attempts anything.
///
/// A future that is ready at its first poll never returns to the executor,
/// so a task looping on acquisitions that always fit would keep its worker
/// thread forever, and the tasks queued behind it on that thread would never
/// run (with 4 such tasks on 2 tokio workers, 2 of them made no acquisition
/// at all). tokio's own resources charge a per-task budget that the runtime
/// keeps; a limiter for every executor cannot see the runtime, so it
/// recognises the task by its waker and counts on each thread the grants it
/// made at first poll with no other task's acquisition in between and no
/// wait. As tokio's, the budget is 128.
const COOP_BUDGET: u32 = 128;

thread_local! {
    /// The task whose immediate grants this thread is counting (its
    /// waker's data pointer), and their number.
    static STREAK: std::cell::Cell<(usize, u32)> = const { std::cell::Cell::new((0, 0)) };
}

/// Counts a first attempt about to be made by the task of `cx`, as a grant;
/// `true` when the task has used up its budget and must yield first (its
/// count then starts again). A task is known by its waker's data pointer:
/// the same for every poll of a task under tokio, `futures` and smol;
/// wakers of two tasks that shared one would only make them yield sooner.
#[inline(always)]
fn coop_spent(cx: &Context<'_>) -> bool {
    let task = cx.waker().data() as usize;
    STREAK.with(|streak| {
        let (last, grants) = streak.get();
        let grants = if last == task { grants + 1 } else { 1 };
        let spent = grants > COOP_BUDGET;
        streak.set((task, if spent { 0 } else { grants }));
        spent
    })
}

/// A first attempt that had to wait: the task returns to the executor
/// anyway, so its count starts again.
fn coop_waits() {
    STREAK.with(|streak| streak.set((streak.get().0, 0)));
}

/// What an async acquisition resolves with, before it becomes a guard.
struct Granted {
    shared: Arc<Shared>,
    taken: Taken,
    occupy: u32,
}

/// An async acquisition: its first attempt, then, if that did not settle
/// it at once, the general path ([`Waiting`]).
enum Attempt {
    /// Not attempted yet: nothing taken, nobody queued.
    Fresh(Fresh),
    /// Past a first attempt that did not settle it on the uncontended path
    /// (boxed: the future stays small to move, and this path allocates
    /// anyway).
    Waiting(Box<Waiting>),
    /// Resolved on the uncontended path.
    Done,
    /// On shared limits (PostgreSQL): the remote engine's wait (boxed: the
    /// local future stays small).
    #[cfg(feature = "postgres")]
    Remote(Box<(Arc<Shared>, crate::postgres::acquire::RemoteWait)>),
}

/// An async acquisition before its first attempt.
struct Fresh {
    /// Always `Some` until the uncontended path settles the acquisition and
    /// takes it for the guard.
    shared: Option<Arc<Shared>>,
    name: Named,
    occupy: u32,
    kind: Kind,
    opts: Options,
    /// Has yielded to the executor once (see [`COOP_BUDGET`]): the next poll
    /// attempts.
    yielded: bool,
}

/// The names of an async acquisition before its first attempt.
enum Named {
    /// One name that the uncontended path may serve, kept inline in its key:
    /// the future has no copy of it on the heap unless it must wait.
    One(recent::Key),
    /// Anything else (several names, a name longer than a key holds,
    /// `occupy == 0`, an observer to tell): owned, and boxed to keep the
    /// future small.
    Names(Box<Names<'static>>),
}

impl Attempt {
    #[inline(always)]
    fn new(shared: &Arc<Shared>, spec: Spec<'_>) -> Attempt {
        #[cfg(feature = "postgres")]
        let local = shared.remote.is_none();
        #[cfg(not(feature = "postgres"))]
        let local = true;
        let one = (local && shared.observer.is_none() && spec.occupy > 0)
            .then(|| spec.names.single())
            .flatten()
            .and_then(|name| recent::Key::new(shared.id, name));
        Attempt::Fresh(Fresh {
            shared: Some(shared.clone()),
            name: match one {
                Some(key) => Named::One(key),
                None => Named::Names(Box::new(spec.names.into_owned())),
            },
            occupy: spec.occupy,
            kind: spec.kind,
            opts: spec.opts,
            yielded: false,
        })
    }

    /// On shared limits, the limiter and the remote engine's wait, made at
    /// the first poll (nothing is asked of the server before it);
    /// `None` in one process.
    #[cfg(feature = "postgres")]
    #[inline(always)]
    fn remote(&mut self) -> Option<(&Arc<Shared>, &mut crate::postgres::acquire::RemoteWait)> {
        if let Attempt::Fresh(fresh) = self {
            if fresh.shared.as_ref().is_some_and(|s| s.remote.is_some()) {
                self.go_remote();
            }
        }
        match self {
            Attempt::Remote(on) => Some((&on.0, &mut on.1)),
            _ => None,
        }
    }

    #[cfg(feature = "postgres")]
    #[cold]
    #[inline(never)]
    fn go_remote(&mut self) {
        let Attempt::Fresh(fresh) = std::mem::replace(self, Attempt::Done) else {
            unreachable!("checked by the caller");
        };
        let Named::Names(names) = fresh.name else {
            unreachable!("shared acquisitions keep their names owned");
        };
        let shared = fresh.shared.expect("not taken before the first poll");
        let spec = Spec {
            names: *names,
            occupy: fresh.occupy,
            kind: fresh.kind,
            opts: fresh.opts,
        };
        let on = shared.remote.as_ref().expect("checked by the caller");
        let wait = remote::wait(on, &spec, spec.kind == Kind::RateLimit);
        *self = Attempt::Remote(Box::new((shared, wait)));
    }

    /// The first attempt, on the uncontended path: `Pending` when the task
    /// yields first (see [`COOP_BUDGET`]), `Ready(First::General(_))` when
    /// this is past the first attempt or it did not settle the acquisition
    /// (the general path then takes over).
    #[inline(always)]
    fn poll_first(&mut self, cx: &mut Context<'_>) -> Poll<First> {
        let Attempt::Fresh(fresh) = self else {
            return Poll::Ready(First::General(false));
        };
        if !fresh.yielded && coop_spent(cx) {
            fresh.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if let Some(id) = fresh.fast() {
            // Taken out rather than moving the whole future out of the way:
            // measurably cheaper on this path.
            let shared = fresh.shared.take().expect("only taken here");
            let occupy = fresh.occupy;
            *self = Attempt::Done;
            return Poll::Ready(First::Taken(shared, id, occupy));
        }
        let Attempt::Fresh(fresh) = std::mem::replace(self, Attempt::Done) else {
            unreachable!("matched above");
        };
        *self = Attempt::Waiting(Box::new(fresh.into_waiting()));
        Poll::Ready(First::General(true))
    }

    /// The general path ([`Waiting`]); `first`: its first poll.
    fn poll_general(&mut self, cx: &mut Context<'_>, first: bool) -> Poll<Result<Granted, Error>> {
        let Attempt::Waiting(waiting) = self else {
            panic!("turnstile future polled after completion");
        };
        let poll = waiting.poll(cx).map(|taken| {
            Ok(Granted {
                shared: waiting.shared.clone(),
                taken: taken?,
                occupy: waiting.spec.occupy,
            })
        });
        if first && poll.is_pending() {
            coop_waits();
        }
        poll
    }
}

/// How [`Attempt::poll_first`] ended.
enum First {
    /// Taken on the uncontended path, from one limit: `occupy` slots.
    Taken(Arc<Shared>, LimitId, u32),
    /// Left to the general path; `true` if this is its first poll.
    General(bool),
}

impl Fresh {
    /// [`fast`] for a future: the same lock-free take (or one lock), no
    /// allocation, no clock read for a concurrency acquisition. `None`
    /// leaves the first attempt to [`Waiting`], which decides and reports
    /// exactly as if this had not been tried.
    #[inline(always)]
    fn fast(&self) -> Option<LimitId> {
        let (Named::One(key), Some(shared)) = (&self.name, &self.shared) else {
            return None;
        };
        let mut remember = None;
        if self.kind == Kind::Concurrency {
            match take_remembered(shared, key, self.occupy) {
                Found::Taken(id) => return Some(id),
                Found::Full => return None,
                Found::Ask => remember = Some(*key),
            }
        }
        key.with_name(|name| {
            shared.state.lock().take_one(
                name,
                self.occupy,
                self.kind,
                &mut LazyNow::default(),
                remember,
            )
        })
    }

    /// The general path, with owned names (a borrowed one is copied now).
    fn into_waiting(self) -> Waiting {
        let names = match self.name {
            Named::One(key) => key.with_name(str::to_string).into_names(),
            Named::Names(names) => *names,
        };
        let spec = Spec {
            names,
            occupy: self.occupy,
            kind: self.kind,
            opts: self.opts,
        };
        Waiting::new(self.shared.expect("taken only when settled"), spec)
    }
}

/// The async core: the same first attempt and looks as [`run`], woken by
/// wakers and the timer thread instead of unparking.
struct Waiting {
    shared: Arc<Shared>,
    spec: Spec<'static>,
    start: Option<Instant>,
    ticket: Option<Ticket>,
    timer: Option<TimerKey>,
    done: bool,
}

impl Waiting {
    fn new(shared: Arc<Shared>, spec: Spec<'static>) -> Self {
        Waiting {
            shared,
            spec,
            start: None,
            ticket: None,
            timer: None,
            done: false,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Taken, Error>> {
        assert!(!self.done, "turnstile future polled after completion");
        let now = Instant::now();
        let start = *self.start.get_or_insert(now);
        let deadline = self.spec.deadline(start);
        let ticket = match self.ticket {
            Some(ticket) => ticket,
            None => {
                let waker = cx.waker();
                let wake = || Wake::Task(waker.clone());
                let begin = loop {
                    let mut wakes = Wakes::new();
                    let begin = self.shared.state.lock().begin(
                        &self.spec.request(),
                        &mut LazyNow::at(now),
                        self.spec.waits().then_some(&wake as &dyn Fn() -> Wake),
                        &mut wakes,
                    );
                    deliver(wakes);
                    match begin {
                        // Rare (a missing name with a store): a short
                        // blocking commit inside poll.
                        Ok(Begin::Create(names)) => {
                            if let Err(err) = self.shared.create_missing(&names) {
                                break Err(err);
                            }
                        }
                        begin => break begin,
                    }
                };
                match begin {
                    Err(err) => return self.finish(Err(err)),
                    Ok(Begin::Taken(ids)) => return self.finish(Ok(Taken::at_once(ids))),
                    Ok(Begin::Refused) => {
                        return self.finish(Err(self.spec.timed_out(Duration::ZERO)))
                    }
                    Ok(Begin::Queued { ticket, .. }) => {
                        self.ticket = Some(ticket);
                        ticket
                    }
                    Ok(Begin::Create(_)) => unreachable!("handled above"),
                }
            }
        };
        let look = loop {
            let mut wakes = Wakes::new();
            let look = {
                let mut state = self.shared.state.lock();
                state.set_waker(ticket, cx.waker(), &mut wakes);
                state.look(ticket, now, start, deadline, &mut wakes)
            };
            deliver(wakes);
            match look {
                // As `run`: a limit it waited for was deleted; create it
                // again (a short blocking commit inside poll with a store).
                Look::Create(names) => {
                    if let Err(err) = self.shared.create_missing(&names) {
                        self.abandon();
                        return self.finish(Err(err));
                    }
                }
                look => break look,
            }
        };
        match look {
            Look::Done(done) => {
                self.ticket = None;
                self.finish(done.map(|got| Taken::granted(got, start)))
            }
            Look::Create(_) => unreachable!("handled above"),
            Look::Wait { at, .. } => {
                // Re-armed at every pending poll: the task's waker may change.
                if let Some(old) = self.timer.take() {
                    timer().cancel(old);
                }
                self.timer = at.map(|at| timer().register(at, cx.waker().clone()));
                Poll::Pending
            }
        }
    }

    fn finish(&mut self, result: Result<Taken, Error>) -> Poll<Result<Taken, Error>> {
        self.done = true;
        if let Some(key) = self.timer.take() {
            timer().cancel(key);
        }
        Poll::Ready(result)
    }

    /// Gives up its place, and anything granted to it and not yet seen.
    fn abandon(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            let mut wakes = Wakes::new();
            self.shared
                .state
                .lock()
                .abandon(ticket, Instant::now(), &mut wakes);
            deliver(wakes);
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(key) = self.timer.take() {
            timer().cancel(key);
        }
        self.abandon();
    }
}

/// The builders' way to shared limits on PostgreSQL.
#[cfg(feature = "postgres")]
mod remote {
    use std::sync::Arc;

    use super::Spec;
    use crate::event::Event;
    use crate::guard::ConcurrencyGuard;
    use crate::limiter::Shared;
    use crate::postgres::acquire::{Ask, Grant, RemoteWait};
    use crate::postgres::guard::Hold;
    use crate::postgres::Remote;
    use crate::waiters::Kind;
    use crate::Error;

    fn ask(spec: &Spec<'_>) -> Ask {
        let mut names: Vec<String> = Vec::new();
        for name in spec.names.iter() {
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
        Ask {
            names,
            occupy: spec.occupy,
            rate: spec.kind == Kind::RateLimit,
            strict: spec.opts.strict,
            create: spec.opts.create_if_missing,
            max_retries: spec.opts.max_retries,
            timeout: spec.opts.timeout,
        }
    }

    fn remote(shared: &Shared) -> &Arc<Remote> {
        shared.remote.as_ref().expect("a shared limiter")
    }

    /// A guard for a grant, told to the observer.
    pub(super) fn guard(shared: &Arc<Shared>, grant: Grant, ask: &Ask) -> ConcurrencyGuard {
        if grant.hold != 0 {
            shared.emit(|| Event::Acquired {
                names: ask.names.clone(),
                occupy: ask.occupy,
                waited: grant.waited,
                rate_limit: false,
            });
        }
        let hold = Hold {
            client: grant.client,
            hold: grant.hold,
            lost: grant.lost,
            names: ask.names.clone(),
        };
        ConcurrencyGuard::remote(shared.clone(), ask.occupy, hold)
    }

    pub(super) fn rate_acquired(shared: &Shared, grant: &Grant, ask: &Ask) {
        shared.emit(|| Event::Acquired {
            names: ask.names.clone(),
            occupy: ask.occupy,
            waited: grant.waited,
            rate_limit: true,
        });
    }

    pub(super) fn concurrency(
        shared: &Arc<Shared>,
        spec: &Spec<'_>,
        try_only: bool,
    ) -> Result<Option<ConcurrencyGuard>, Error> {
        let ask = ask(spec);
        let grant = remote(shared).inner.acquire(&ask, try_only)?;
        Ok(grant.map(|g| guard(shared, g, &ask)))
    }

    pub(super) fn rate(shared: &Shared, spec: &Spec<'_>, try_only: bool) -> Result<bool, Error> {
        let ask = ask(spec);
        match remote(shared).inner.acquire(&ask, try_only)? {
            Some(grant) => {
                rate_acquired(shared, &grant, &ask);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    pub(super) fn wait(remote: &Arc<Remote>, spec: &Spec<'_>, _rate: bool) -> RemoteWait {
        RemoteWait::new(remote.clone(), ask(spec))
    }
}
