//! Random sequences of operations against a small reference model.
//!
//! Operations: create / update (limit, active, decay) / delete / reset,
//! acquisitions (`concurrency` and `rate_limit`, one or several names,
//! weighted `occupy`, strict or not, with or without `create_if_missing`) in
//! four forms — `try_acquire`, a blocking `acquire` with `timeout(ZERO)`, a
//! blocking `acquire` with `max_retries(0)`, and an async future polled by
//! hand, which may queue — then polling and cancelling those futures,
//! dropping or releasing guards, and time passing. After every step every
//! limit's `LimitInfo` must match the model field for field, and every
//! admission must match (`Ok` vs which `Error` variant).
//!
//! # Time
//!
//! The public API has no injectable clock, so the model only uses decay rates
//! whose outcome does not depend on how much time passes:
//!
//! * `0` (no decay) and [`TINY`] (1e-12 slots/s) on `a`, `b`, `c`: decaying
//!   slots stay whole for the length of any run (a slot needs 30 000 years to
//!   drain), so they are modelled as integers that never drain;
//! * `0` and [`HUGE`] (1e15 slots/s) on `h`: any slot drains within a
//!   femtosecond, so the model holds `h`'s bucket empty at every step.
//!   Each step ends by spinning until `Instant::now()` has moved on, so at
//!   least a nanosecond separates a take from the next observation.
//!
//! A name never moves between the two classes. Async futures are polled
//! with a no-op waker and never have a timeout, so the timer thread plays no
//! part: queued waiters are only granted by the operations the test makes
//! (releases, cancellations, updates, deletes, resets). `rate_limit` futures
//! do not name `h`, so no waiter is ever held back by `h`'s decay (which
//! would need its timer to fire).
//!
//! Queued waiters follow the contract's fairness rule: a waiter fits a limit
//! when `held + decaying + (occupy of earlier waiters queued on it) + occupy
//! <= limit`, newcomers count every queued waiter, and after any change every
//! waiter that fits is granted (grants never make another waiter's fit worse,
//! so the order does not matter).
//!
//! `avg_slot_occupancy_seconds` is checked to 1e-9 relative (the limiter
//! keeps 36 bits of its mantissa, about 11 digits): `release()` returns the
//! held duration the limiter folds in; for a guard that is dropped instead,
//! the model knows the figure only while the hold was surely under 0.1 s per
//! slot (Prefect's floor), and stops checking that limit otherwise.
//!
//! Failing cases are saved to `proptest-regressions/model.txt` and re-run
//! first on every later run. 256 sequences by default; to run long:
//!
//! ```sh
//! TURNSTILE_MODEL_CASES=20000 cargo test --test model
//! ```

mod common;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseError};
use turnstile::{
    AcquireFuture, ConcurrencyGuard, Error, IntoNames, LimitConfig, LimitInfo, LimitUpdate,
    Limiter, Names, RateLimitFuture,
};

/// `a`, `b`, `c` decay at 0 or [`TINY`]; `h` at 0 or [`HUGE`]; `" bad"` is
/// not a valid name (never created).
const NAMES: [&str; 5] = ["a", "b", "c", "h", " bad"];
const H: usize = 3;
const BAD: usize = 4;
/// So slow that no slot drains within any run.
const TINY: f64 = 1e-12;
/// So fast that any slot has drained by the next step.
const HUGE: f64 = 1e15;
/// Invalid decay rates: `InvalidConfig`.
const BAD_RATES: [f64; 5] = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, -1e-300];
/// Prefect's floor for one slot's occupancy in the average.
const MIN_OCCUPANCY: f64 = 0.1;

fn is_valid_rate(rate: f64) -> bool {
    rate.is_finite() && rate >= 0.0
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

/// A decay rate, made concrete per name (see the module docs).
#[derive(Debug, Clone, Copy)]
enum Decay {
    Zero,
    /// `-0.0`: valid (it is `>= 0`) and means no decay.
    NegZero,
    /// [`TINY`] on `a`, `b`, `c`; [`HUGE`] on `h`.
    Positive,
    Invalid(usize),
}

impl Decay {
    fn rate(self, name: usize) -> f64 {
        match self {
            Decay::Zero => 0.0,
            Decay::NegZero => -0.0,
            Decay::Positive if name == H => HUGE,
            Decay::Positive => TINY,
            Decay::Invalid(i) => BAD_RATES[i],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Concurrency,
    RateLimit,
}

/// How an acquisition is made.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// `try_acquire()`.
    Try,
    /// `acquire()` with `timeout(Duration::ZERO)`.
    ZeroTimeout,
    /// `acquire()` with `max_retries(0)`.
    NoRetries,
    /// `.into_future()`, polled once now and later by `Poll`.
    Future,
}

#[derive(Debug, Clone)]
enum Op {
    Create {
        name: usize,
        limit: u32,
        active: bool,
        decay: Decay,
    },
    Update {
        name: usize,
        limit: Option<u32>,
        active: Option<bool>,
        decay: Option<Decay>,
    },
    Delete {
        name: usize,
    },
    Reset {
        name: usize,
    },
    Acquire {
        kind: Kind,
        names: Vec<usize>,
        occupy: u32,
        strict: bool,
        create_if_missing: bool,
        mode: Mode,
    },
    /// Gives a guard back: `release()` or a plain drop.
    Release {
        index: usize,
        explicit: bool,
    },
    /// Polls a pending future.
    Poll {
        index: usize,
    },
    /// Drops a pending future.
    Cancel {
        index: usize,
    },
    /// Lets some time pass (every step lets at least a nanosecond pass).
    Wait {
        micros: u64,
    },
}

fn name() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => Just(0usize),
        6 => Just(1usize),
        4 => Just(2usize),
        6 => Just(H),
        1 => Just(BAD),
    ]
}

fn decay() -> impl Strategy<Value = Decay> {
    prop_oneof![
        2 => Just(Decay::Zero),
        1 => Just(Decay::NegZero),
        8 => Just(Decay::Positive),
        1 => (0..BAD_RATES.len()).prop_map(Decay::Invalid),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (name(), 0u32..6, prop::bool::weighted(0.85), decay())
            .prop_map(|(name, limit, active, decay)| Op::Create { name, limit, active, decay }),
        3 => (
            name(),
            prop::option::weighted(0.6, prop_oneof![1 => Just(0u32), 6 => 1u32..6]),
            prop::option::weighted(0.3, any::<bool>()),
            prop::option::weighted(0.3, decay()),
        )
            .prop_map(|(name, limit, active, decay)| Op::Update { name, limit, active, decay }),
        1 => name().prop_map(|name| Op::Delete { name }),
        1 => name().prop_map(|name| Op::Reset { name }),
        12 => (
            prop_oneof![3 => Just(Kind::Concurrency), 2 => Just(Kind::RateLimit)],
            prop_oneof![
                1 => Just(Vec::new()),
                12 => prop::collection::vec(name(), 1..4),
            ],
            prop_oneof![1 => Just(0u32), 20 => Just(1u32), 10 => Just(2u32), 4 => Just(3u32), 1 => 4u32..=7],
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.8),
            prop_oneof![
                3 => Just(Mode::Try),
                1 => Just(Mode::ZeroTimeout),
                1 => Just(Mode::NoRetries),
                5 => Just(Mode::Future),
            ],
        )
            .prop_map(|(kind, mut names, occupy, strict, create_if_missing, mode)| {
                if kind == Kind::RateLimit && mode == Mode::Future {
                    // A rate-limit waiter held back by `h`'s decay would need
                    // its timer: keep `h` out of rate-limit futures.
                    names.retain(|&n| n != H);
                }
                Op::Acquire { kind, names, occupy, strict, create_if_missing, mode }
            }),
        3 => (any::<usize>(), any::<bool>())
            .prop_map(|(index, explicit)| Op::Release { index, explicit }),
        4 => any::<usize>().prop_map(|index| Op::Poll { index }),
        2 => any::<usize>().prop_map(|index| Op::Cancel { index }),
        1 => (0u64..200).prop_map(|micros| Op::Wait { micros }),
    ]
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

/// One incarnation of a limit: (name, generation).
type LimitRef = (usize, u64);

#[derive(Debug, Clone)]
struct MLimit {
    generation: u64,
    limit: u32,
    active: bool,
    rate: f64,
    held: u64,
    /// Whole decaying slots (always 0 on `h`).
    decaying: u64,
    denied: u64,
    /// `None` once a drop made the figure unknowable.
    avg: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
enum Status {
    /// Queued on these limits.
    Queued(Vec<LimitRef>),
    /// Slots taken on these limits, not yet seen by the future.
    Granted(Vec<LimitRef>),
    /// Will resolve to one of these errors.
    Failed(Vec<&'static str>),
}

struct MFuture {
    future: Fut,
    kind: Kind,
    occupy: u32,
    strict: bool,
    create_if_missing: bool,
    ticket: u64,
    status: Status,
}

enum Fut {
    Concurrency(AcquireFuture),
    RateLimit(RateLimitFuture),
}

/// A guard and what the model says it holds.
struct MGuard {
    guard: ConcurrencyGuard,
    taken: Vec<LimitRef>,
    occupy: u32,
    /// At or before the guard's acquisition.
    since: Instant,
}

#[derive(Default)]
struct Model {
    limits: [Option<MLimit>; NAMES.len()],
    next_generation: u64,
    next_ticket: u64,
    guards: Vec<MGuard>,
    /// In ticket order.
    futures: Vec<MFuture>,
}

/// Figures gathered over a run, to show that the interesting paths ran.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    steps: u64,
    admitted: u64,
    denied: u64,
    errors: u64,
    queued: u64,
    granted_later: u64,
    failed_later: u64,
}

impl Model {
    fn get(&self, r: LimitRef) -> Option<&MLimit> {
        self.limits[r.0].as_ref().filter(|l| l.generation == r.1)
    }

    fn get_mut(&mut self, r: LimitRef) -> Option<&mut MLimit> {
        self.limits[r.0].as_mut().filter(|l| l.generation == r.1)
    }

    fn live(&self, name: usize) -> Option<LimitRef> {
        self.limits[name].as_ref().map(|l| (name, l.generation))
    }

    fn insert(&mut self, name: usize, limit: u32, active: bool, rate: f64) {
        self.next_generation += 1;
        self.limits[name] = Some(MLimit {
            generation: self.next_generation,
            limit,
            active,
            rate,
            held: 0,
            decaying: 0,
            denied: 0,
            avg: Some(2.0),
        });
    }

    /// Slots promised to queued waiters on `r`; only those queued before
    /// `before` if given.
    fn reserved(&self, r: LimitRef, before: Option<u64>) -> u64 {
        self.futures
            .iter()
            .filter(|f| before.is_none_or(|t| f.ticket < t))
            .filter(|f| matches!(&f.status, Status::Queued(on) if on.contains(&r)))
            .map(|f| u64::from(f.occupy))
            .sum()
    }

    fn waiters(&self, r: LimitRef) -> usize {
        self.futures
            .iter()
            .filter(|f| matches!(&f.status, Status::Queued(on) if on.contains(&r)))
            .count()
    }

    /// Whether `occupy` more fits `r` behind `reserved` promised slots.
    fn fits(&self, r: LimitRef, reserved: u64, occupy: u32) -> bool {
        let l = self.get(r).expect("live");
        l.limit > 0 && l.held + l.decaying + reserved + u64::from(occupy) <= u64::from(l.limit)
    }

    /// Takes `occupy` slots of `kind` from every limit in `on`.
    fn take(&mut self, on: &[LimitRef], occupy: u32, kind: Kind) {
        for &r in on {
            let l = self.get_mut(r).expect("live");
            match kind {
                Kind::Concurrency => l.held += u64::from(occupy),
                // `h`'s bucket is empty again by the next step.
                Kind::RateLimit if r.0 == H => {}
                Kind::RateLimit => l.decaying += u64::from(occupy),
            }
        }
    }

    /// Grants every queued waiter that fits, until none does.
    fn settle(&mut self, counts: &mut Counts) {
        loop {
            let mut granted = false;
            for i in 0..self.futures.len() {
                let Status::Queued(on) = &self.futures[i].status else {
                    continue;
                };
                let (ticket, occupy) = (self.futures[i].ticket, self.futures[i].occupy);
                let fits = on
                    .iter()
                    .all(|&r| self.fits(r, self.reserved(r, Some(ticket)), occupy));
                if fits {
                    let on = on.clone();
                    let kind = self.futures[i].kind;
                    self.take(&on, occupy, kind);
                    self.futures[i].status = Status::Granted(on);
                    counts.granted_later += 1;
                    granted = true;
                }
            }
            if !granted {
                return;
            }
        }
    }

    /// Waiters queued on `r` stop waiting for it (deactivated or deleted).
    /// Returns whether a waiter that lost `r` to its deletion creates it
    /// again (as for a missing limit: not strict, `create_if_missing`).
    fn forget(&mut self, r: LimitRef, deleted: bool, counts: &mut Counts) -> bool {
        let mut recreate = false;
        for f in &mut self.futures {
            let Status::Queued(on) = &mut f.status else {
                continue;
            };
            if !on.contains(&r) {
                continue;
            }
            on.retain(|&x| x != r);
            if deleted && f.strict {
                f.status = Status::Failed(vec!["NotFound"]);
                counts.failed_later += 1;
                continue;
            }
            recreate |= deleted && f.create_if_missing;
            if on.is_empty() {
                // Nothing left to wait for: it passes, holding nothing.
                f.status = Status::Granted(Vec::new());
                counts.granted_later += 1;
            }
        }
        recreate
    }

    /// Fails the waiters queued on `r` that its configuration rules out.
    fn fail_impossible(&mut self, r: LimitRef, counts: &mut Counts) {
        let l = self.get(r).expect("live").clone();
        for f in &mut self.futures {
            let Status::Queued(on) = &f.status else {
                continue;
            };
            if !on.contains(&r) {
                continue;
            }
            let mut kinds = Vec::new();
            if l.limit > 0 && f.occupy > l.limit {
                kinds.push("OccupyExceedsLimit");
            }
            if f.kind == Kind::RateLimit && l.rate <= 0.0 {
                kinds.push("NoSlotDecay");
            }
            if !kinds.is_empty() {
                f.status = Status::Failed(kinds);
                counts.failed_later += 1;
            }
        }
    }

    /// Gives back what a guard (or a granted future) took.
    fn give_back(&mut self, taken: &[LimitRef], occupy: u32, kind: Kind) {
        for &r in taken {
            // A deleted (or recreated) limit gets nothing back.
            if let Some(l) = self.get_mut(r) {
                match kind {
                    Kind::Concurrency => {
                        assert!(l.held >= u64::from(occupy), "model: held underflow");
                        l.held -= u64::from(occupy);
                    }
                    Kind::RateLimit => l.decaying = l.decaying.saturating_sub(u64::from(occupy)),
                }
            }
        }
    }

    /// Folds one release into the occupancy averages, as Prefect does;
    /// `held_secs` is `None` when only known to be over the floor.
    fn record(&mut self, taken: &[LimitRef], occupy: u32, held_secs: Option<f64>) {
        for &r in taken {
            if let Some(l) = self.get_mut(r) {
                l.avg = match (l.avg, held_secs) {
                    (Some(avg), Some(secs)) => {
                        let per_slot = (secs / f64::from(occupy.max(1))).max(MIN_OCCUPANCY);
                        let weight = 2.0 * f64::from(l.limit.max(1));
                        Some(avg + (per_slot - avg) / weight)
                    }
                    _ => None,
                };
            }
        }
    }
}

fn kind_of(err: &Error) -> &'static str {
    match err {
        Error::Timeout { .. } => "Timeout",
        Error::RetriesExhausted { .. } => "RetriesExhausted",
        Error::OccupyExceedsLimit { .. } => "OccupyExceedsLimit",
        Error::InvalidOccupy { .. } => "InvalidOccupy",
        Error::NotFound { .. } => "NotFound",
        Error::AlreadyExists { .. } => "AlreadyExists",
        Error::InvalidName { .. } => "InvalidName",
        Error::InvalidConfig { .. } => "InvalidConfig",
        Error::NoSlotDecay { .. } => "NoSlotDecay",
        _ => "other",
    }
}

fn fail(step: usize, op: &Op, what: String) -> TestCaseError {
    TestCaseError::fail(format!("step {step} ({op:?}): {what}"))
}

// ---------------------------------------------------------------------------
// Comparing
// ---------------------------------------------------------------------------

fn expected_info(model: &Model, name: usize) -> Option<(LimitInfo, bool)> {
    let l = model.limits[name].as_ref()?;
    let r = (name, l.generation);
    let info = LimitInfo {
        name: NAMES[name].to_string(),
        limit: l.limit,
        active: l.active,
        slot_decay_per_second: l.rate,
        active_slots: u32::try_from(l.held + l.decaying).unwrap(),
        held_slots: u32::try_from(l.held).unwrap(),
        denied_slots: l.denied,
        waiters: model.waiters(r),
        avg_slot_occupancy_seconds: l.avg.unwrap_or(f64::NAN),
    };
    Some((info, l.avg.is_some()))
}

fn same_info(got: &LimitInfo, want: &LimitInfo, avg_known: bool) -> bool {
    let avg_ok = !avg_known
        || (got.avg_slot_occupancy_seconds - want.avg_slot_occupancy_seconds).abs()
            <= 1e-9 * want.avg_slot_occupancy_seconds.abs().max(1.0);
    let rest = |i: &LimitInfo| LimitInfo {
        avg_slot_occupancy_seconds: 0.0,
        ..i.clone()
    };
    avg_ok && rest(got) == rest(want)
}

fn check_info(
    got: &LimitInfo,
    model: &Model,
    name: usize,
    step: usize,
    op: &Op,
) -> Result<(), TestCaseError> {
    let (want, avg_known) = expected_info(model, name)
        .ok_or_else(|| fail(step, op, format!("{} is not in the model", NAMES[name])))?;
    if !same_info(got, &want, avg_known) {
        return Err(fail(
            step,
            op,
            format!(
                "limit {:?}:\n  got   {got:?}\n  model {want:?}",
                NAMES[name]
            ),
        ));
    }
    Ok(())
}

fn check_all(limiter: &Limiter, model: &Model, step: usize, op: &Op) -> Result<(), TestCaseError> {
    let mut listed = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        match (limiter.limit(name), model.limits[i].is_some()) {
            (Some(got), true) => {
                check_info(&got, model, i, step, op)?;
                listed.push(got);
            }
            (None, false) => {}
            (got, in_model) => {
                return Err(fail(
                    step,
                    op,
                    format!("{name:?}: limiter has {got:?}; in the model: {in_model}"),
                ))
            }
        }
    }
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    let all = limiter.limits();
    let (names, want): (Vec<_>, Vec<_>) = (
        all.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        listed.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
    );
    prop_assert_eq!(names, want, "step {}: limits() lists other names", step);
    Ok(())
}

/// Spins until the monotonic clock has moved past the instant it was called
/// at: then every slot of `h` taken before has drained (see the module docs).
fn let_time_pass() {
    let t = Instant::now();
    while Instant::now() <= t {
        std::hint::spin_loop();
    }
}

// ---------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------

/// What the model says an acquisition's first attempt does.
#[derive(Debug, PartialEq)]
enum Expect {
    Admit,
    Deny,
    /// One of these errors (the contract does not order some checks).
    Fail(Vec<&'static str>),
    /// No names and `occupy == 0`: the contract names both "succeeds at
    /// once" and `InvalidOccupy`.
    AdmitOrInvalidOccupy,
}

/// What an acquisition came back with, in one shape for every mode.
enum Got {
    Admitted(Option<ConcurrencyGuard>),
    Denied,
    Queued(Fut),
    Failed(Error),
}

fn first_attempt(
    model: &Model,
    kind: Kind,
    names: &[usize],
    occupy: u32,
    strict: bool,
) -> (Expect, Vec<usize>, Vec<LimitRef>) {
    let mut distinct: Vec<usize> = Vec::new();
    for &n in names {
        if !distinct.contains(&n) {
            distinct.push(n);
        }
    }
    let missing: Vec<usize> = distinct
        .iter()
        .copied()
        .filter(|&n| model.limits[n].is_none())
        .collect();
    let active: Vec<LimitRef> = distinct
        .iter()
        .filter_map(|&n| model.live(n))
        .filter(|&r| model.get(r).unwrap().active)
        .collect();
    if occupy == 0 {
        let expect = if names.is_empty() {
            Expect::AdmitOrInvalidOccupy
        } else {
            Expect::Fail(vec!["InvalidOccupy"])
        };
        return (expect, missing, active);
    }
    let mut errors = Vec::new();
    if missing.contains(&BAD) {
        errors.push("InvalidName");
    }
    if strict && !missing.is_empty() {
        errors.push("NotFound");
    }
    if active.iter().any(|&r| {
        let l = model.get(r).unwrap();
        l.limit > 0 && occupy > l.limit
    }) {
        errors.push("OccupyExceedsLimit");
    }
    if kind == Kind::RateLimit && active.iter().any(|&r| model.get(r).unwrap().rate <= 0.0) {
        errors.push("NoSlotDecay");
    }
    if !errors.is_empty() {
        return (Expect::Fail(errors), missing, active);
    }
    let fits = active
        .iter()
        .all(|&r| model.fits(r, model.reserved(r, None), occupy));
    let expect = if fits { Expect::Admit } else { Expect::Deny };
    (expect, missing, active)
}

#[allow(clippy::too_many_arguments)]
fn acquire(
    limiter: &Limiter,
    kind: Kind,
    names: &[usize],
    occupy: u32,
    strict: bool,
    create_if_missing: bool,
    mode: Mode,
) -> Got {
    // One name goes in as a `&str` (the limiter's fast path), several as a
    // `Vec`.
    let list = || -> Names<'static> {
        match names {
            &[one] => NAMES[one].into_names(),
            _ => names
                .iter()
                .map(|&n| NAMES[n])
                .collect::<Vec<_>>()
                .into_names(),
        }
    };
    let poll_once = |mut future: Fut| {
        let mut cx = Context::from_waker(Waker::noop());
        let polled = match &mut future {
            Fut::Concurrency(f) => Pin::new(f).poll(&mut cx).map(|r| r.map(Some)),
            Fut::RateLimit(f) => Pin::new(f).poll(&mut cx).map(|r| r.map(|()| None)),
        };
        match polled {
            Poll::Ready(Ok(guard)) => Got::Admitted(guard),
            Poll::Ready(Err(e)) => Got::Failed(e),
            Poll::Pending => Got::Queued(future),
        }
    };
    macro_rules! configured {
        ($builder:expr) => {{
            let b = $builder.strict(strict).create_if_missing(create_if_missing);
            match mode {
                Mode::ZeroTimeout => b.timeout(Duration::ZERO),
                Mode::NoRetries => b.max_retries(0),
                Mode::Try | Mode::Future => b,
            }
        }};
    }
    match (kind, mode) {
        (Kind::Concurrency, Mode::Try) => {
            match configured!(limiter.concurrency(list(), occupy)).try_acquire() {
                Ok(Some(g)) => Got::Admitted(Some(g)),
                Ok(None) => Got::Denied,
                Err(e) => Got::Failed(e),
            }
        }
        (Kind::RateLimit, Mode::Try) => {
            match configured!(limiter.rate_limit(list(), occupy)).try_acquire() {
                Ok(true) => Got::Admitted(None),
                Ok(false) => Got::Denied,
                Err(e) => Got::Failed(e),
            }
        }
        (Kind::Concurrency, Mode::Future) => poll_once(Fut::Concurrency(
            configured!(limiter.concurrency(list(), occupy)).into_future(),
        )),
        (Kind::RateLimit, Mode::Future) => poll_once(Fut::RateLimit(
            configured!(limiter.rate_limit(list(), occupy)).into_future(),
        )),
        (Kind::Concurrency, _) => {
            match configured!(limiter.concurrency(list(), occupy)).acquire() {
                Ok(g) => Got::Admitted(Some(g)),
                Err(e) => Got::Failed(e),
            }
        }
        (Kind::RateLimit, _) => match configured!(limiter.rate_limit(list(), occupy)).acquire() {
            Ok(()) => Got::Admitted(None),
            Err(e) => Got::Failed(e),
        },
    }
}

/// Checks a result against the error kinds the model allows.
fn expect_error<T: std::fmt::Debug>(
    got: Result<T, Error>,
    kinds: &[&'static str],
    step: usize,
    op: &Op,
) -> Result<(), TestCaseError> {
    match got {
        Err(e) if kinds.contains(&kind_of(&e)) => Ok(()),
        got => Err(fail(
            step,
            op,
            format!("expected one of {kinds:?}, got {got:?}"),
        )),
    }
}

/// Runs one operation on the limiter and the model, and compares what it
/// returned.
fn apply(
    limiter: &Limiter,
    model: &mut Model,
    counts: &mut Counts,
    step: usize,
    op: &Op,
) -> Result<(), TestCaseError> {
    let started = Instant::now();
    match *op {
        Op::Create {
            name,
            limit,
            active,
            decay,
        } => {
            let rate = decay.rate(name);
            let got = limiter.create_limit(
                NAMES[name],
                LimitConfig::new(limit)
                    .active(active)
                    .slot_decay_per_second(rate),
            );
            let mut kinds = Vec::new();
            if name == BAD {
                kinds.push("InvalidName");
            }
            if !is_valid_rate(rate) {
                kinds.push("InvalidConfig");
            }
            if model.limits[name].is_some() {
                kinds.push("AlreadyExists");
            }
            if !kinds.is_empty() {
                return expect_error(got, &kinds, step, op);
            }
            let info = got.map_err(|e| fail(step, op, format!("unexpected {e}")))?;
            model.insert(name, limit, active, rate);
            check_info(&info, model, name, step, op)
        }
        Op::Update {
            name,
            limit,
            active,
            decay,
        } => {
            let rate = decay.map(|d| d.rate(name));
            let mut update = LimitUpdate::new();
            if let Some(limit) = limit {
                update = update.limit(limit);
            }
            if let Some(active) = active {
                update = update.active(active);
            }
            if let Some(rate) = rate {
                update = update.slot_decay_per_second(rate);
            }
            let got = limiter.update_limit(NAMES[name], update);
            let mut kinds = Vec::new();
            if rate.is_some_and(|r| !is_valid_rate(r)) {
                kinds.push("InvalidConfig");
            }
            let r = model.live(name);
            if r.is_none() {
                kinds.push("NotFound");
            }
            let (Some(r), true) = (r, kinds.is_empty()) else {
                return expect_error(got, &kinds, step, op);
            };
            let l = model.get_mut(r).unwrap();
            let was_active = l.active;
            if let Some(limit) = limit {
                l.limit = limit;
            }
            if let Some(active) = active {
                l.active = active;
            }
            if let Some(rate) = rate {
                l.rate = rate;
            }
            let now_active = l.active;
            if was_active && !now_active {
                model.forget(r, false, counts);
            } else if now_active {
                model.fail_impossible(r, counts);
            }
            model.settle(counts);
            let info = got.map_err(|e| fail(step, op, format!("unexpected {e}")))?;
            check_info(&info, model, name, step, op)
        }
        Op::Delete { name } => {
            let got = limiter.delete_limit(NAMES[name]);
            let Some(r) = model.live(name) else {
                return expect_error(got, &["NotFound"], step, op);
            };
            got.map_err(|e| fail(step, op, format!("unexpected {e}")))?;
            let recreate = model.forget(r, true, counts);
            model.limits[name] = None;
            if recreate {
                // In memory, at once: inactive with limit 1.
                model.insert(name, 1, false, 0.0);
            }
            model.settle(counts);
            Ok(())
        }
        Op::Reset { name } => {
            let got = limiter.reset_limit(NAMES[name]);
            let Some(r) = model.live(name) else {
                return expect_error(got, &["NotFound"], step, op);
            };
            let l = model.get_mut(r).unwrap();
            l.decaying = 0;
            l.denied = 0;
            model.settle(counts);
            let info = got.map_err(|e| fail(step, op, format!("unexpected {e}")))?;
            check_info(&info, model, name, step, op)
        }
        Op::Acquire {
            kind,
            ref names,
            occupy,
            strict,
            create_if_missing,
            mode,
        } => {
            let (expect, missing, active) = first_attempt(model, kind, names, occupy, strict);
            let got = acquire(
                limiter,
                kind,
                names,
                occupy,
                strict,
                create_if_missing,
                mode,
            );
            // Missing names: created inactive with limit 1 by a first attempt
            // that gets past the checks, unless strict or told not to. After
            // an error the contract does not say whether that happened: follow
            // the limiter, except that strict creates nothing.
            let create = |model: &mut Model, must: Option<bool>| -> Result<(), TestCaseError> {
                for &n in &missing {
                    let exists = limiter.limit(NAMES[n]).is_some();
                    if let Some(must) = must {
                        prop_assert_eq!(
                            exists,
                            must && n != BAD,
                            "step {}: was missing {:?} created?",
                            step,
                            NAMES[n]
                        );
                    }
                    if exists {
                        model.insert(n, 1, false, 0.0);
                    }
                }
                Ok(())
            };
            match (expect, got) {
                (Expect::Admit | Expect::AdmitOrInvalidOccupy, Got::Admitted(guard)) => {
                    counts.admitted += 1;
                    create(model, Some(create_if_missing))?;
                    model.take(&active, occupy, kind);
                    match (kind, guard) {
                        (Kind::Concurrency, Some(guard)) => model.guards.push(MGuard {
                            guard,
                            taken: active,
                            occupy,
                            since: started,
                        }),
                        (Kind::RateLimit, None) => {}
                        (kind, guard) => {
                            return Err(fail(step, op, format!("{kind:?} gave {guard:?}")))
                        }
                    }
                }
                (Expect::Deny, got @ (Got::Denied | Got::Queued(_) | Got::Failed(_))) => {
                    let want = match mode {
                        Mode::Try => "denied",
                        Mode::Future => "queued",
                        Mode::ZeroTimeout => "Timeout",
                        Mode::NoRetries => "RetriesExhausted",
                    };
                    let was = match &got {
                        Got::Denied => "denied",
                        Got::Queued(_) => "queued",
                        Got::Failed(e) => kind_of(e),
                        Got::Admitted(_) => unreachable!(),
                    };
                    if want != was {
                        return Err(fail(step, op, format!("model: {want}, limiter: {was}")));
                    }
                    counts.denied += 1;
                    create(model, Some(create_if_missing))?;
                    for &r in &active {
                        model.get_mut(r).unwrap().denied += u64::from(occupy);
                    }
                    if let Got::Queued(future) = got {
                        counts.queued += 1;
                        model.next_ticket += 1;
                        model.futures.push(MFuture {
                            future,
                            kind,
                            occupy,
                            strict,
                            create_if_missing,
                            ticket: model.next_ticket,
                            status: Status::Queued(active),
                        });
                    }
                }
                (Expect::Fail(kinds), Got::Failed(err)) if kinds.contains(&kind_of(&err)) => {
                    counts.errors += 1;
                    if let Error::NotFound { name } = &err {
                        prop_assert_eq!(
                            name.as_str(),
                            NAMES[missing[0]],
                            "step {}: NotFound should name the first missing limit",
                            step
                        );
                    }
                    create(model, strict.then_some(false))?;
                }
                (Expect::AdmitOrInvalidOccupy, Got::Failed(Error::InvalidOccupy { .. })) => {
                    counts.errors += 1;
                }
                (expect, got) => {
                    let got = match got {
                        Got::Admitted(_) => "admitted".to_string(),
                        Got::Denied => "denied".to_string(),
                        Got::Queued(_) => "queued".to_string(),
                        Got::Failed(e) => format!("error {e}"),
                    };
                    return Err(fail(step, op, format!("model: {expect:?}, limiter: {got}")));
                }
            }
            Ok(())
        }
        Op::Release { index, explicit } => {
            if model.guards.is_empty() {
                return Ok(());
            }
            let g = model.guards.remove(index % model.guards.len());
            let held_secs = if explicit {
                Some(g.guard.release().as_secs_f64())
            } else {
                drop(g.guard);
                // Known only while surely under the floor.
                let bound = g.since.elapsed().as_secs_f64();
                (bound / f64::from(g.occupy) < MIN_OCCUPANCY).then_some(0.0)
            };
            model.give_back(&g.taken, g.occupy, Kind::Concurrency);
            model.record(&g.taken, g.occupy, held_secs);
            model.settle(counts);
            Ok(())
        }
        Op::Poll { index } => {
            if model.futures.is_empty() {
                return Ok(());
            }
            let i = index % model.futures.len();
            let mut f = model.futures.remove(i);
            let mut cx = Context::from_waker(Waker::noop());
            let polled = match &mut f.future {
                Fut::Concurrency(fut) => Pin::new(fut).poll(&mut cx).map(|r| r.map(Some)),
                Fut::RateLimit(fut) => Pin::new(fut).poll(&mut cx).map(|r| r.map(|()| None)),
            };
            match (&f.status, polled) {
                (Status::Queued(_), Poll::Pending) => model.futures.insert(i, f),
                (Status::Granted(taken), Poll::Ready(Ok(guard))) => match (f.kind, guard) {
                    (Kind::Concurrency, Some(guard)) => model.guards.push(MGuard {
                        guard,
                        taken: taken.clone(),
                        occupy: f.occupy,
                        since: started,
                    }),
                    (Kind::RateLimit, None) => {}
                    (kind, guard) => {
                        return Err(fail(step, op, format!("{kind:?} gave {guard:?}")))
                    }
                },
                (Status::Failed(kinds), Poll::Ready(Err(e))) if kinds.contains(&kind_of(&e)) => {}
                (status, polled) => {
                    let polled = match polled {
                        Poll::Pending => "pending".to_string(),
                        Poll::Ready(Ok(_)) => "granted".to_string(),
                        Poll::Ready(Err(e)) => format!("error {e}"),
                    };
                    return Err(fail(
                        step,
                        op,
                        format!(
                            "future with ticket {}: model {status:?}, limiter {polled}",
                            f.ticket
                        ),
                    ));
                }
            }
            Ok(())
        }
        Op::Cancel { index } => {
            if model.futures.is_empty() {
                return Ok(());
            }
            let f = model.futures.remove(index % model.futures.len());
            drop(f.future);
            if let Status::Granted(taken) = &f.status {
                // Granted but never seen: given back, with no occupancy
                // recorded.
                model.give_back(taken, f.occupy, f.kind);
            }
            model.settle(counts);
            Ok(())
        }
        Op::Wait { micros } => {
            let until = Instant::now() + Duration::from_micros(micros);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            Ok(())
        }
    }
}

/// Runs one sequence; returns the figures for the record.
fn run(ops: Vec<Op>) -> Result<Counts, TestCaseError> {
    let limiter = Limiter::in_memory();
    let mut model = Model::default();
    let mut counts = Counts::default();
    for (step, op) in ops.iter().enumerate() {
        apply(&limiter, &mut model, &mut counts, step, op)?;
        let_time_pass();
        check_all(&limiter, &model, step, op)?;
        counts.steps += 1;
    }
    // Cancelling every future and dropping every guard leaves nothing held
    // and nobody queued.
    for f in std::mem::take(&mut model.futures) {
        drop(f.future);
        if let Status::Granted(taken) = &f.status {
            model.give_back(taken, f.occupy, f.kind);
        }
    }
    for g in std::mem::take(&mut model.guards) {
        drop(g.guard);
        model.give_back(&g.taken, g.occupy, Kind::Concurrency);
        model.record(&g.taken, g.occupy, None);
    }
    let_time_pass();
    check_all(&limiter, &model, ops.len(), &Op::Wait { micros: 0 })?;
    for info in limiter.limits() {
        prop_assert_eq!(
            info.held_slots,
            0,
            "{} after everything was dropped",
            info.name
        );
        prop_assert_eq!(
            info.waiters,
            0,
            "{} after everything was dropped",
            info.name
        );
    }
    Ok(counts)
}

/// A few limits up front, so that more of each sequence meets full limits.
fn sequence() -> impl Strategy<Value = Vec<Op>> {
    (
        prop::collection::vec(
            (0usize..4, 2u32..6, prop::bool::weighted(0.9), decay()),
            1..6,
        ),
        prop::collection::vec(op(), 1..90),
    )
        .prop_map(|(start, ops)| {
            start
                .into_iter()
                .map(|(name, limit, active, decay)| Op::Create {
                    name,
                    limit,
                    active,
                    decay,
                })
                .chain(ops)
                .collect()
        })
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("TURNSTILE_MODEL_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(256),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/model.txt",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Every admission and every `LimitInfo` figure matches the model.
    #[test]
    fn the_limiter_follows_the_model(ops in sequence()) {
        common::watchdog(common::WATCHDOG, move || run(ops).map(|_| ()))?;
    }
}

/// The figures behind one fixed-seed batch, so that a run shows how much of
/// the model was exercised (`cargo test --test model -- --nocapture`), and
/// fails if the generator stops reaching the interesting paths.
#[test]
fn the_sequences_reach_every_path() {
    const SEQUENCES: usize = 40;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let total = common::watchdog(common::WATCHDOG, move || {
        let mut total = Counts::default();
        for _ in 0..SEQUENCES {
            let ops = sequence().new_tree(&mut runner).unwrap().current();
            let c = run(ops).expect("the model holds");
            total.steps += c.steps;
            total.admitted += c.admitted;
            total.denied += c.denied;
            total.errors += c.errors;
            total.queued += c.queued;
            total.granted_later += c.granted_later;
            total.failed_later += c.failed_later;
        }
        total
    });
    eprintln!("model: {SEQUENCES} sequences: {total:?}");
    assert!(total.admitted > 100, "{total:?}");
    assert!(total.denied > 50, "{total:?}");
    assert!(total.errors > 20, "{total:?}");
    assert!(total.queued > 20, "{total:?}");
    assert!(total.granted_later > 10, "{total:?}");
    assert!(total.failed_later > 0, "{total:?}");
}

/// A single name takes the limiter's fast path; it must still respect the
/// slots reserved for a queued waiter (a planted bug there went unnoticed
/// while the model passed every name list as a `Vec`).
#[test]
fn the_fast_path_does_not_pass_a_queued_waiter() {
    let acquire = |occupy, mode| Op::Acquire {
        kind: Kind::Concurrency,
        names: vec![0],
        occupy,
        strict: false,
        create_if_missing: true,
        mode,
    };
    let ops = vec![
        Op::Create {
            name: 0,
            limit: 2,
            active: true,
            decay: Decay::Zero,
        },
        acquire(1, Mode::Try),
        acquire(2, Mode::Future),
        acquire(1, Mode::Try),
        Op::Release {
            index: 0,
            explicit: true,
        },
        Op::Poll { index: 0 },
    ];
    let counts = common::watchdog(common::WATCHDOG, move || run(ops)).expect("the model holds");
    assert_eq!(
        (counts.queued, counts.denied, counts.granted_later),
        (1, 2, 1)
    );
}
