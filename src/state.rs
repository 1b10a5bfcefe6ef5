//! The engine's state behind the limiter's one lock, and every operation on
//! it: first attempts, waiting, releases and the registry's changes (which
//! must wake, pass or fail waiters).
//!
//! One lock guards the registry and all queues; the all-or-nothing check over
//! several limits and the fair grants then need no lock ordering at all, so
//! they cannot deadlock. An uncontended one-name acquisition on a simple limit
//! and its release skip the lock altogether (see [`crate::cell`]); releasing
//! the lock ([`Locked`]'s drop) sets such limits free again.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use crate::cell::Take;
use crate::clock::LazyNow;
use crate::config::{validate_name, LimitConfig, LimitInfo, LimitUpdate};
use crate::names::Names;
use crate::recent;
use crate::registry::{LimitId, Registry};
use crate::sync::{Mutex, MutexGuard};
use crate::waiters::{Dirty, Ids, Kind, Pump, Status, Ticket, Waiter, Wake, Wakes};
use crate::Error;

/// The engine's one lock around [`State`]. Releasing it sets free the limits
/// looked at under it that are simple again, for the lock-free paths (see
/// [`crate::cell`]).
#[derive(Debug, Default)]
pub(crate) struct Engine(Mutex<State>);

impl Engine {
    #[inline]
    pub fn lock(&self) -> Locked<'_> {
        Locked(self.0.lock())
    }
}

/// The engine's lock, held.
pub(crate) struct Locked<'a>(MutexGuard<'a, State>);

impl Deref for Locked<'_> {
    type Target = State;

    fn deref(&self) -> &State {
        &self.0
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.0
    }
}

impl Drop for Locked<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.reg.settle();
    }
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub reg: Registry,
    pub waiters: HashMap<Ticket, Waiter>,
    pub next_ticket: Ticket,
    /// Pumps run so far.
    pub pumps: u64,
}

/// One acquisition, as the builders describe it.
pub(crate) struct Request<'r, 'n> {
    pub names: &'r Names<'n>,
    pub occupy: u32,
    pub kind: Kind,
    pub strict: bool,
    pub create_if_missing: bool,
    pub max_retries: Option<u32>,
}

/// The outcome of a first attempt.
pub(crate) enum Begin {
    /// Slots taken from these limits (none if every name was inactive,
    /// skipped or absent).
    Taken(Ids),
    /// Did not fit, and the caller did not want to wait.
    Refused,
    /// Did not fit; queued. `first`: nobody was queued before it on any of
    /// its limits, so it is next in line.
    Queued { ticket: Ticket, first: bool },
    /// These missing limits must be created (and stored) first; then try
    /// again.
    Create(Vec<String>),
}

/// The outcome of a look at a queued waiter. `Done(Ok(_))` gives the limits
/// taken from and the instant it was granted from.
pub(crate) enum Look {
    Done(Result<(Ids, Instant), Error>),
    /// These limits, deleted while it waited, must be created (and stored)
    /// first; then look again. Abandon the waiter if that fails.
    Create(Vec<String>),
    /// Still queued; look again when woken or at `at`. `first`: at the head
    /// of its limit's queue (next in line).
    Wait {
        at: Option<Instant>,
        first: bool,
    },
}

/// Names of limits, for events; only gathered when someone observes.
pub(crate) type EventNames = SmallVec<[Arc<str>; 4]>;

impl State {
    /// The first attempt of an acquisition: validates it, creates missing
    /// limits if asked to, and takes the slots if they fit now. If they do not,
    /// queues it when `wake` is given. `wakes` must be delivered once the lock
    /// is released.
    pub fn begin(
        &mut self,
        req: &Request<'_, '_>,
        now: &mut LazyNow,
        wake: Option<&dyn Fn() -> Wake>,
        wakes: &mut Wakes,
    ) -> Result<Begin, Error> {
        if req.occupy == 0 {
            return Err(Error::InvalidOccupy { occupy: 0 });
        }
        if let Some(name) = req.names.single() {
            if let Some(id) = self.take_one(name, req.occupy, req.kind, now, None) {
                return Ok(Begin::Taken(Ids::from_elem(id, 1)));
            }
        }
        let mut ids = Ids::new();
        let mut missing: SmallVec<[&str; 2]> = SmallVec::new();
        for name in req.names.iter() {
            match self.reg.by_name(name) {
                Some((idx, limit)) => ids.push(limit.id(idx)),
                None => {
                    validate_name(name)?;
                    if !missing.contains(&name) {
                        missing.push(name);
                    }
                }
            }
        }
        if let (true, Some(first)) = (req.strict, missing.first()) {
            return Err(Error::NotFound {
                name: first.to_string(),
            });
        }
        if ids.len() > 1 {
            ids.sort_unstable();
            ids.dedup();
        }
        ids.retain(|id| self.reg.get(id.idx).expect("looked up").active);
        for id in &ids {
            let limit = self.reg.get(id.idx).expect("looked up");
            if limit.slots.limit > 0 && req.occupy > limit.slots.limit {
                return Err(Error::OccupyExceedsLimit {
                    name: limit.name.to_string(),
                    occupy: req.occupy,
                    limit: limit.slots.limit,
                });
            }
            if req.kind == Kind::RateLimit && limit.slots.rate() <= 0.0 {
                return Err(Error::NoSlotDecay {
                    name: limit.name.to_string(),
                });
            }
        }
        if req.create_if_missing && !missing.is_empty() {
            // They are inactive, so nothing is taken from them.
            let owed = self.create_missing(&missing, now.get());
            if !owed.is_empty() {
                return Ok(Begin::Create(owed));
            }
        }

        let fits = ids.iter().all(|id| {
            let limit = self.reg.get(id.idx).expect("looked up");
            limit.slots.fits_lazy(limit.queued_occupy, req.occupy, now)
        });
        if fits {
            for id in &ids {
                let slots = &mut self.reg.get_mut(id.idx).expect("looked up").slots;
                match req.kind {
                    Kind::Concurrency => slots.take_held(req.occupy),
                    Kind::RateLimit => slots.take_decaying(req.occupy, now.get()),
                }
                self.reg.touch(id.idx);
            }
            return Ok(Begin::Taken(ids));
        }
        for id in &ids {
            self.reg.get_mut(id.idx).expect("looked up").denied += u64::from(req.occupy);
            self.reg.touch(id.idx);
        }
        if req.max_retries == Some(0) {
            return Err(Error::RetriesExhausted {
                names: req.names.joined(),
                occupy: req.occupy,
                attempts: 1,
            });
        }
        let Some(wake) = wake else {
            return Ok(Begin::Refused);
        };
        let waiter = Waiter {
            ids,
            occupy: req.occupy,
            kind: req.kind,
            strict: req.strict,
            create_if_missing: req.create_if_missing,
            create: Vec::new(),
            names: req.names.joined(),
            attempts: 1,
            max_retries: req.max_retries,
            counted_in: 0,
            status: Status::Queued,
            granted_at: None,
            decay_at: None,
            wake: wake(),
        };
        let ticket = self.enqueue(waiter, now.get(), wakes);
        Ok(Begin::Queued {
            ticket,
            first: self.at_head(ticket),
        })
    }

    /// Creates the missing limits an acquisition proceeds through (on its
    /// first attempt, or when one it waits for is deleted), as Prefect's
    /// server did: inactive with limit 1, so that it passes and an operator
    /// can configure them later. In memory they are created at once. A store
    /// must commit them first, outside this lock: then they are returned, for
    /// the acquisition's owner to create with
    /// [`Shared::create_missing`](crate::limiter::Shared::create_missing)
    /// before it goes on.
    fn create_missing(&mut self, names: &[&str], now: Instant) -> Vec<String> {
        if self.reg.persist {
            return names.iter().map(|n| n.to_string()).collect();
        }
        for name in names {
            if self.reg.lookup(name).is_none() {
                self.reg
                    .insert(name, &LimitConfig::new(1).active(false), now);
            }
        }
        Vec::new()
    }

    /// The fast path: one name, an existing active limit with room and
    /// nothing unusual (a positive `occupy` within its limit; for a rate
    /// limit, a decay rate). `None` sends the acquisition down the general
    /// path of [`State::begin`], which also reports every error.
    ///
    /// `now` is read only if fitting depends on the time (decaying slots): a
    /// concurrency acquisition on a limit without decaying slots reads no
    /// clock. For a concurrency acquisition it takes from a free cell without
    /// claiming it, or asks for the claimed limit to be set free for the
    /// lock-free path; with `remember` (the name's key in this thread's
    /// memory) this thread remembers where the name leads.
    #[inline]
    pub fn take_one(
        &mut self,
        name: &str,
        occupy: u32,
        kind: Kind,
        now: &mut LazyNow,
        remember: Option<recent::Key>,
    ) -> Option<LimitId> {
        let idx = self.reg.lookup(name)?;
        if kind == Kind::Concurrency {
            // The lock-free path serves this name: let this thread find it.
            let id = self.reg.id_of(idx)?;
            if let Some(key) = remember {
                recent::remember(key, id);
            }
            // A free cell takes the slots itself, unclaimed.
            match self.reg.cell(idx).try_take(id.uid, occupy) {
                Take::Taken => {
                    self.reg.touch(idx);
                    return Some(id);
                }
                Take::Full => return None,
                // Claimed: decide below, and set it free again if simple.
                Take::Ask => {
                    self.reg.get(idx)?;
                    self.reg.free_later(idx);
                }
            }
        }
        let limit = self.reg.get_mut(idx)?;
        if kind == Kind::Concurrency && limit.slots.has_decaying() {
            // A limit once rate-limited may go lock-free again when drained.
            limit.slots.forget_drained(now.get());
        }
        let usable = limit.active
            && occupy > 0
            && occupy <= limit.slots.limit
            && match kind {
                Kind::Concurrency => true,
                Kind::RateLimit => limit.slots.rate() > 0.0,
            };
        if !usable || !limit.slots.fits_lazy(limit.queued_occupy, occupy, now) {
            return None;
        }
        match kind {
            Kind::Concurrency => limit.slots.take_held(occupy),
            Kind::RateLimit => limit.slots.take_decaying(occupy, now.get()),
        }
        let id = limit.id(idx);
        self.reg.touch(idx);
        Some(id)
    }

    /// Looks at a queued waiter: done (granted or failed), timed out at
    /// `deadline`, or still waiting. Runs its decay retry when that is due.
    pub fn look(
        &mut self,
        ticket: Ticket,
        now: Instant,
        started: Instant,
        deadline: Option<Instant>,
        wakes: &mut Wakes,
    ) -> Look {
        if let Some(waiter) = self.waiters.get_mut(&ticket) {
            if !waiter.create.is_empty() {
                return Look::Create(std::mem::take(&mut waiter.create));
            }
        }
        for _ in 0..2 {
            let waiter = self
                .waiters
                .get_mut(&ticket)
                .expect("looked at by its owner only");
            match waiter.status {
                Status::Granted => {
                    let waiter = self.waiters.remove(&ticket).expect("present");
                    let granted_at = waiter.granted_at.unwrap_or(now);
                    wakes.bury(waiter.wake);
                    return Look::Done(Ok((waiter.ids, granted_at)));
                }
                Status::Failed(_) => {
                    let waiter = self.waiters.remove(&ticket).expect("present");
                    wakes.bury(waiter.wake);
                    let Status::Failed(err) = waiter.status else {
                        unreachable!()
                    };
                    return Look::Done(Err(err));
                }
                Status::Queued => {}
            }
            match waiter.decay_at {
                Some(at) if at <= now => self.retry(ticket, now, wakes),
                _ => break,
            }
        }
        let waiter = &self.waiters[&ticket];
        if deadline.is_some_and(|d| d <= now) {
            let err = Error::Timeout {
                names: waiter.names.clone(),
                occupy: waiter.occupy,
                waited: now.saturating_duration_since(started),
            };
            self.withdraw(ticket, now, wakes);
            return Look::Done(Err(err));
        }
        let wake_at = match (deadline, waiter.decay_at) {
            (Some(d), Some(at)) => Some(d.min(at)),
            (d, at) => d.or(at),
        };
        Look::Wait {
            at: wake_at,
            first: self.at_head(ticket),
        }
    }

    /// Whether a queued waiter is first in line on every limit it waits for.
    fn at_head(&self, ticket: Ticket) -> bool {
        self.waiters.get(&ticket).is_some_and(|waiter| {
            matches!(waiter.status, Status::Queued)
                && waiter.ids.iter().all(|id| {
                    self.reg
                        .get(id.idx)
                        .and_then(|l| l.queue.get(0))
                        .is_some_and(|q| q.ticket == ticket)
                })
        })
    }

    /// Replaces the waker of a queued async waiter. The old one is buried in
    /// `wakes`: it may be the last clone of its task's waker, and dropping it
    /// may drop a guard, which takes this lock (tokio's "second iteration
    /// shouldn't deadlock").
    pub fn set_waker(&mut self, ticket: Ticket, waker: &std::task::Waker, wakes: &mut Wakes) {
        if let Some(waiter) = self.waiters.get_mut(&ticket) {
            match &waiter.wake {
                Wake::Task(w) if w.will_wake(waker) => {}
                _ => wakes.bury(std::mem::replace(
                    &mut waiter.wake,
                    Wake::Task(waker.clone()),
                )),
            }
        }
    }

    /// A waiter gives up (its future was dropped): withdraw it if queued, or
    /// give back what was granted to it and not yet seen.
    pub fn abandon(&mut self, ticket: Ticket, now: Instant, wakes: &mut Wakes) {
        let Some(waiter) = self.waiters.get(&ticket) else {
            return;
        };
        match waiter.status {
            Status::Queued => self.withdraw(ticket, now, wakes),
            Status::Failed(_) => {
                let waiter = self.waiters.remove(&ticket).expect("present");
                wakes.bury(waiter.wake);
            }
            Status::Granted => {
                let waiter = self.waiters.remove(&ticket).expect("present");
                wakes.bury(waiter.wake);
                let mut dirty = Dirty::new();
                for id in &waiter.ids {
                    let Some(limit) = self.reg.resolve_mut(*id) else {
                        continue;
                    };
                    match waiter.kind {
                        Kind::Concurrency => limit.slots.give_back(waiter.occupy),
                        Kind::RateLimit => limit.slots.untake_decaying(waiter.occupy, now),
                    }
                    if !limit.queue.is_empty() {
                        dirty.push(Pump::watchers(id.idx, false));
                    }
                    self.reg.touch(id.idx);
                }
                self.pump(&mut dirty, now, wakes);
            }
        }
    }

    /// Gives back a guard's slots; names the limits given back to when
    /// `names` is asked for. Returns whether waiters are queued on any of
    /// them: then the caller hands them what fits with [`State::pump_after`]
    /// (only then is the time needed).
    #[must_use]
    pub fn release(
        &mut self,
        ids: &[LimitId],
        occupy: u32,
        held: Duration,
        mut names: Option<&mut EventNames>,
    ) -> bool {
        let mut waiters = false;
        let held_secs = held.as_secs_f64();
        for id in ids {
            // A deleted (or deleted and recreated) limit gets nothing back.
            let Some(limit) = self.reg.resolve(*id) else {
                continue;
            };
            limit.slots.give_back(occupy);
            self.reg
                .cell(id.idx)
                .record_occupancy(id.uid, held_secs, occupy, limit.slots.limit);
            if ids.len() == 1 {
                // A guard of one limit: the lock-free path could serve it.
                self.reg.free_later(id.idx);
            }
            if let Some(names) = names.as_deref_mut() {
                names.push(limit.name.clone());
            }
            waiters |= !limit.queue.is_empty();
            self.reg.touch(id.idx);
        }
        waiters
    }

    /// Pumps the queues of `ids` after slots were given back to them. Only
    /// waiters that watch those limits (or count retries on them) can be
    /// concerned: without any, this reads no clock and looks at nobody.
    pub fn pump_after(&mut self, ids: &[LimitId], wakes: &mut Wakes) {
        let mut dirty: Dirty = ids
            .iter()
            .filter(|id| {
                self.reg
                    .get(id.idx)
                    .is_some_and(|l| l.uid == id.uid && (l.watchers > 0 || l.retriers > 0))
            })
            .map(|id| Pump::watchers(id.idx, true))
            .collect();
        if !dirty.is_empty() {
            self.pump(&mut dirty, Instant::now(), wakes);
        }
    }

    /// Whether `create` would succeed.
    pub fn check_create(&self, name: &str, config: &LimitConfig) -> Result<(), Error> {
        validate_name(name)?;
        config.validate(name)?;
        if self.reg.lookup(name).is_some() {
            return Err(Error::AlreadyExists {
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// A limit's configuration now.
    pub fn config(&self, name: &str) -> Result<LimitConfig, Error> {
        let limit = self.reg.get(self.find(name)?).expect("found");
        Ok(LimitConfig::new(limit.slots.limit)
            .active(limit.active)
            .slot_decay_per_second(limit.slots.rate()))
    }

    /// The configuration `update` would give a limit (validated).
    pub fn updated_config(&self, name: &str, update: &LimitUpdate) -> Result<LimitConfig, Error> {
        update.validate(name)?;
        let mut config = self.config(name)?;
        if let Some(limit) = update.limit {
            config.limit = limit;
        }
        if let Some(active) = update.active {
            config.active = active;
        }
        if let Some(rate) = update.slot_decay_per_second {
            config.slot_decay_per_second = rate;
        }
        Ok(config)
    }

    pub fn create(
        &mut self,
        name: &str,
        config: &LimitConfig,
        now: Instant,
    ) -> Result<LimitInfo, Error> {
        self.check_create(name, config)?;
        let idx = self.reg.insert(name, config, now);
        self.reg.touch(idx);
        Ok(self.reg.info(idx, now).expect("inserted"))
    }

    pub fn update(
        &mut self,
        name: &str,
        update: &LimitUpdate,
        now: Instant,
        wakes: &mut Wakes,
    ) -> Result<LimitInfo, Error> {
        update.validate(name)?;
        let idx = self.find(name)?;
        let limit = self.reg.get_mut(idx).expect("found");
        let unchanged = update.limit.is_none_or(|cap| cap == limit.slots.limit)
            && update.active.is_none_or(|active| active == limit.active)
            && update
                .slot_decay_per_second
                .is_none_or(|rate| rate == limit.slots.rate());
        if unchanged {
            // Nobody fits better or worse: as Prefect's clients retry only on
            // a real change, no waiter is looked at or charged an attempt.
            return Ok(self.reg.info(idx, now).expect("found"));
        }
        let was_active = limit.active;
        if let Some(rate) = update.slot_decay_per_second {
            limit.slots.set_rate(rate, now);
        }
        if let Some(cap) = update.limit {
            limit.slots.limit = cap;
        }
        if let Some(active) = update.active {
            limit.active = active;
        }
        let active = limit.active;
        self.reg.touch(idx);
        let mut dirty = Dirty::new();
        if was_active && !active {
            // Deactivated: its waiters stop waiting for it.
            self.forget_limit(idx, false, now, &mut dirty, wakes);
        } else if active {
            self.fail_impossible(idx, &mut dirty, wakes);
            dirty.push(Pump::everyone(idx));
        }
        self.pump(&mut dirty, now, wakes);
        Ok(self.reg.info(idx, now).expect("found"))
    }

    /// Deletes a limit. Its waiters proceed as for a missing limit: strict
    /// ones fail, the others go on without it, and it is created again
    /// (inactive, limit 1) if one of them has `create_if_missing`, by the
    /// same path as for a first attempt.
    pub fn delete(&mut self, name: &str, now: Instant, wakes: &mut Wakes) -> Result<(), Error> {
        let idx = self.find(name)?;
        let mut dirty = Dirty::new();
        let recreate = self.forget_limit(idx, true, now, &mut dirty, wakes);
        let limit = self.reg.remove(idx).expect("found");
        if !recreate.is_empty() {
            let owed = self.create_missing(&[&limit.name], now);
            if !owed.is_empty() {
                // Their owners commit it, then go on: wake those still
                // queued (the others are woken already).
                for ticket in recreate {
                    let waiter = self.waiters.get_mut(&ticket).expect("not looked at yet");
                    waiter.create.extend_from_slice(&owed);
                    if matches!(waiter.status, Status::Queued) {
                        wakes.push(waiter.wake.clone());
                    }
                }
            }
        }
        self.pump(&mut dirty, now, wakes);
        Ok(())
    }

    pub fn reset(
        &mut self,
        name: &str,
        now: Instant,
        wakes: &mut Wakes,
    ) -> Result<LimitInfo, Error> {
        let idx = self.find(name)?;
        let limit = self.reg.get_mut(idx).expect("found");
        limit.slots.reset_decaying(now);
        limit.denied = 0;
        self.reg.touch(idx);
        let mut dirty: Dirty = SmallVec::from_elem(Pump::everyone(idx), 1);
        self.pump(&mut dirty, now, wakes);
        Ok(self.reg.info(idx, now).expect("found"))
    }

    pub fn info(&self, name: &str, now: Instant) -> Option<LimitInfo> {
        self.reg.info(self.reg.lookup(name)?, now)
    }

    pub fn infos(&self, now: Instant) -> Vec<LimitInfo> {
        let mut all: Vec<LimitInfo> = self
            .reg
            .iter()
            .map(|(idx, l)| l.info(now, self.reg.cell(idx).avg()))
            .collect();
        all.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        all
    }

    fn find(&self, name: &str) -> Result<u32, Error> {
        self.reg.lookup(name).ok_or_else(|| Error::NotFound {
            name: name.to_string(),
        })
    }
}
