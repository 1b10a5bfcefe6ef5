//! The fair queue: tickets, all-or-nothing grants and targeted wake-ups.
//!
//! # Fairness
//!
//! Every waiter takes one ticket from a global counter when it is queued, and
//! every limit's queue is sorted by ticket. A waiter fits a limit when
//! `held + decaying + (occupy of every earlier waiter on that limit) + occupy
//! <= limit`: slots are *reserved* for earlier waiters, so a later waiter (or a
//! newcomer, or a `try_acquire`) may pass an earlier one only when it cannot
//! delay it. The oldest waiter has nothing reserved ahead of it on any of its
//! limits, so it proceeds as soon as capacity allows; hence no deadlock and no
//! starvation, whatever order names were given in.
//!
//! # Wake-ups
//!
//! Grants are made by whoever changes the state (a release, an update, a
//! cancellation, a decay timer): slots are taken on the waiter's behalf, and
//! exactly that waiter is woken. Along one limit's queue the sum `reserved +
//! occupy` only grows, so a pass stops at the first waiter that cannot fit even
//! without decay; waiters behind it are never looked at.
//!
//! A waiter that does not fit *watches* one limit it does not fit, and a
//! release looks only at the watchers of its limits (see [`State::pump`]):
//! waiters held back elsewhere cost it nothing. Retry budgets
//! (`max_retries`) are charged apart, only where a waiter has one.
//!
//! A grant never makes another waiter's fit worse on the granted limits: what
//! leaves the reservation enters `held` (or the decaying slots), so one pass
//! suffices.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use smallvec::SmallVec;

use crate::registry::LimitId;
use crate::state::State;
use crate::sync::thread::Thread;
use crate::Error;

/// A waiter's place in the global order.
pub(crate) type Ticket = u64;

/// Limit ids, inline for the common case of a few names.
pub(crate) type Ids = SmallVec<[LimitId; 4]>;

/// How to wake a waiter: a (possibly still spinning) thread or an async task.
#[derive(Debug, Clone)]
pub(crate) enum Wake {
    /// The flag tells a thread that spins before parking to look now.
    Thread(Thread, Arc<AtomicBool>),
    Task(Waker),
}

impl Wake {
    pub fn wake(self) {
        match self {
            Wake::Thread(t, flag) => {
                flag.store(true, Ordering::Release);
                t.unpark();
            }
            Wake::Task(w) => w.wake(),
        }
    }
}

/// Wake-ups to deliver, and wakers to drop, once the state lock is released
/// (see [`crate::limiter::deliver`]).
///
/// A waker is user code: waking it may run its task, and dropping the last
/// clone of it drops whatever the task owns, such as a guard whose release
/// takes the engine's lock. So nothing under the lock wakes or drops one: a
/// waker a waiter lets go of (replaced, or its waiter done) is *buried* here
/// and dropped after the lock, as tokio's semaphore drops its old waker.
#[derive(Debug, Default)]
pub(crate) struct Wakes {
    wake: SmallVec<[Wake; 2]>,
    buried: SmallVec<[Wake; 1]>,
}

impl Wakes {
    pub fn new() -> Wakes {
        Wakes::default()
    }

    /// Wakes `wake` once the lock is released.
    pub fn push(&mut self, wake: Wake) {
        self.wake.push(wake);
    }

    /// Drops `wake` once the lock is released.
    pub fn bury(&mut self, wake: Wake) {
        self.buried.push(wake);
    }

    /// Wake-ups to deliver.
    pub fn len(&self) -> usize {
        self.wake.len()
    }

    /// Nothing to wake and nothing to drop.
    pub fn is_empty(&self) -> bool {
        self.wake.is_empty() && self.buried.is_empty()
    }

    /// Wakes, then drops what was buried. Only with the lock released.
    pub fn deliver(self) {
        for wake in self.wake {
            wake.wake();
        }
        drop(self.buried);
    }
}

/// What a waiter is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Held slots, given back by a guard.
    Concurrency,
    /// Decaying slots, never given back.
    RateLimit,
}

#[derive(Debug)]
pub(crate) enum Status {
    Queued,
    Granted,
    Failed(Error),
}

#[derive(Debug)]
pub(crate) struct Waiter {
    /// The active limits still to be taken from, in id order.
    pub ids: Ids,
    pub occupy: u32,
    pub kind: Kind,
    pub strict: bool,
    /// Whether a limit of its deleted while it waits is created again (as a
    /// missing one is by its first attempt), or skipped.
    pub create_if_missing: bool,
    /// Limits its owner must create (committing them to the store first)
    /// before it proceeds: those deleted while it waited (see
    /// [`State::delete`]).
    pub create: Vec<String>,
    /// All names asked for, for error messages.
    pub names: String,
    /// Attempts made so far (the first included).
    pub attempts: u32,
    pub max_retries: Option<u32>,
    /// The last pump that counted a retry for it.
    pub counted_in: u64,
    pub status: Status,
    /// The instant it was granted from (see [`State::grant`]): its wait
    /// ends and its hold starts there, however late its thread or task runs.
    pub granted_at: Option<Instant>,
    /// When decay alone will let it fit, if that is all it waits for.
    pub decay_at: Option<Instant>,
    pub wake: Wake,
}

impl Waiter {
    /// Counts one more attempt that did not fit; the error if that was one
    /// more than its `max_retries` allow.
    fn attempt(&mut self) -> Option<Error> {
        self.attempts += 1;
        self.max_retries
            .is_some_and(|n| self.attempts > n)
            .then(|| Error::RetriesExhausted {
                names: self.names.clone(),
                occupy: self.occupy,
                attempts: self.attempts,
            })
    }
}

/// A limit whose capacity may have grown, to be pumped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pump {
    pub idx: u32,
    /// Whether the change counts as a retry for the waiters it looks at (a
    /// release, an update, decay), rather than someone else's grant or
    /// cancellation.
    pub counts: bool,
    /// Look at every waiter, not only those watching the limit: its
    /// configuration changed, which may change whom it blocks.
    pub all: bool,
}

impl Pump {
    /// Slots came back (or a reservation left): only the waiters that
    /// watch this limit can be let through by it.
    pub fn watchers(idx: u32, counts: bool) -> Pump {
        Pump {
            idx,
            counts,
            all: false,
        }
    }

    /// The limit itself changed: look at everyone queued on it.
    pub fn everyone(idx: u32) -> Pump {
        Pump {
            idx,
            counts: true,
            all: true,
        }
    }
}

/// Limits to pump.
pub(crate) type Dirty = SmallVec<[Pump; 4]>;

/// Whether a waiter fits now.
enum Fit {
    Yes,
    No {
        decay_at: Option<Instant>,
        /// A limit it does not fit, for it to watch: one that only a
        /// release or a change can open (decay alone cannot), if any; else
        /// the one whose decay lets it in last.
        blocker: u32,
    },
}

impl State {
    /// Queues a waiter; its first attempt has been made and denied.
    pub fn enqueue(&mut self, waiter: Waiter, now: Instant, wakes: &mut Wakes) -> Ticket {
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        for id in &waiter.ids {
            let limit = self.reg.get_mut(id.idx).expect("ids are live");
            limit.enqueue(ticket, waiter.occupy, waiter.max_retries.is_some());
            self.reg.touch(id.idx);
        }
        self.waiters.insert(ticket, waiter);
        match self.fit(ticket, now, None) {
            Fit::No { decay_at, blocker } => {
                self.waiters.get_mut(&ticket).expect("just queued").decay_at = decay_at;
                self.watch(ticket, blocker);
            }
            // Only if time moved between the first attempt and now.
            Fit::Yes => {
                let (mut dirty, before) = (Dirty::new(), wakes.len());
                self.grant(ticket, now, now, &mut dirty, wakes);
                self.pump(&mut dirty, now, wakes);
                debug_assert!(
                    wakes.len() - before <= 1,
                    "nobody else can have been let in"
                );
            }
        }
        ticket
    }

    /// Re-examines the waiters of the dirty limits, granting every one that
    /// now fits and failing those out of retries.
    ///
    /// A waiter that does not fit watches one limit it does not fit, and
    /// only that limit's releases look at it: a release on a limit whose
    /// waiters are all held back elsewhere costs nothing per waiter. This is
    /// sound because, whatever happens on a limit, a waiter it does not
    /// watch fits no better: newcomers take only what leaves room for every
    /// queued waiter, grants turn reservations into held slots, and only
    /// changes to a limit itself (`Pump::everyone`) can make matters worse
    /// for a waiter behind.
    pub fn pump(&mut self, dirty: &mut Dirty, now: Instant, wakes: &mut Wakes) {
        // One change is one retry, however many of a waiter's limits it
        // touched.
        self.pumps += 1;
        let pump = self.pumps;
        while let Some(Pump { idx, counts, all }) = dirty.pop() {
            let mut pos = 0;
            let mut reserved = 0u64;
            // Watchers of this limit passed (and still watching it).
            let mut passed = 0;
            while let Some(limit) = self.reg.get(idx) {
                if !all && passed >= limit.watchers {
                    break;
                }
                let Some(&q) = limit.queue.get(pos) else {
                    break;
                };
                if !limit.slots.fits_held(reserved, q.occupy) {
                    // Everyone behind needs at least as much: stop here.
                    if all {
                        // The limit changed (lowered, say): those behind are
                        // now held back by it, whatever they watched and
                        // whenever their decay was due.
                        self.held_back_by(idx, pos);
                    }
                    break;
                }
                if !all && !q.watch {
                    // Held back by another limit, which has not changed.
                    reserved += u64::from(q.occupy);
                    pos += 1;
                    continue;
                }
                match self.fit(q.ticket, now, Some((idx, reserved))) {
                    Fit::Yes => self.grant(q.ticket, now, now, dirty, wakes),
                    Fit::No { decay_at, blocker } => {
                        let waiter = self.waiters.get_mut(&q.ticket).expect("queued");
                        if counts && waiter.counted_in != pump {
                            waiter.counted_in = pump;
                            if let Some(err) = waiter.attempt() {
                                self.fail(q.ticket, err, dirty, wakes);
                                continue;
                            }
                        }
                        self.not_yet(q.ticket, decay_at, blocker, wakes);
                        passed += u32::from(blocker == idx);
                        reserved += u64::from(q.occupy);
                        pos += 1;
                    }
                }
            }
            if counts {
                self.count_retries(idx, pump, now, dirty, wakes);
            }
        }
    }

    /// Counts pump `pump` of limit `idx` as one more attempt of every waiter
    /// on it with a retry budget that was not looked at already, fit or not
    /// (as a Prefect client counts each denied poll), and fails those out of
    /// budget. Waiters without a budget cost nothing here.
    fn count_retries(
        &mut self,
        idx: u32,
        pump: u64,
        now: Instant,
        dirty: &mut Dirty,
        wakes: &mut Wakes,
    ) {
        let Some(limit) = self.reg.get(idx).filter(|l| l.retriers > 0) else {
            return;
        };
        let budgeted: SmallVec<[Ticket; 8]> = limit
            .queue
            .iter()
            .filter(|q| q.retries)
            .map(|q| q.ticket)
            .collect();
        for ticket in budgeted {
            let Some(waiter) = self.waiters.get(&ticket) else {
                continue;
            };
            if !matches!(waiter.status, Status::Queued) || waiter.counted_in == pump {
                continue;
            }
            // It checks again: it may fit (its decay came due and its own
            // retry has not run yet).
            self.waiters.get_mut(&ticket).expect("queued").counted_in = pump;
            self.recheck(ticket, now, dirty, wakes);
        }
    }

    /// A queued waiter checks again after a change of its limits: granted if
    /// it fits, else one attempt counted (failing it out of budget).
    fn recheck(&mut self, ticket: Ticket, now: Instant, dirty: &mut Dirty, wakes: &mut Wakes) {
        match self.fit(ticket, now, None) {
            Fit::Yes => self.grant(ticket, now, now, dirty, wakes),
            Fit::No { decay_at, blocker } => {
                let waiter = self.waiters.get_mut(&ticket).expect("queued");
                match waiter.attempt() {
                    Some(err) => self.fail(ticket, err, dirty, wakes),
                    None => self.not_yet(ticket, decay_at, blocker, wakes),
                }
            }
        }
    }

    /// A waiter looked at does not fit yet: it watches `blocker`, and if
    /// decay will let it in earlier than its timer is set for (or it has no
    /// timer), it is woken to re-arm it.
    fn not_yet(
        &mut self,
        ticket: Ticket,
        decay_at: Option<Instant>,
        blocker: u32,
        wakes: &mut Wakes,
    ) {
        let waiter = self.waiters.get_mut(&ticket).expect("queued");
        let earlier = match (decay_at, waiter.decay_at) {
            (Some(new), Some(old)) => new < old,
            (new, _) => new.is_some(),
        };
        waiter.decay_at = decay_at;
        if earlier {
            wakes.push(waiter.wake.clone());
        }
        self.watch(ticket, blocker);
    }

    /// The waiters of limit `idx` from queue position `from` on do not fit
    /// its held slots and reservations: they watch it, and no decay instant
    /// of theirs stands (so none is backdated to).
    fn held_back_by(&mut self, idx: u32, from: usize) {
        let Some(limit) = self.reg.get(idx) else {
            return;
        };
        let behind: SmallVec<[Ticket; 8]> =
            limit.queue.iter().skip(from).map(|q| q.ticket).collect();
        for ticket in behind {
            if let Some(waiter) = self.waiters.get_mut(&ticket) {
                waiter.decay_at = None;
                self.watch(ticket, idx);
            }
        }
    }

    /// Makes a queued waiter watch `blocker`, and none of its other limits.
    fn watch(&mut self, ticket: Ticket, blocker: u32) {
        let waiter = &self.waiters[&ticket];
        for id in &waiter.ids {
            if let Some(limit) = self.reg.get_mut(id.idx) {
                limit.set_watch(ticket, id.idx == blocker);
            }
        }
    }

    /// The waiter's own check, when its decay timer fires: grants it if it
    /// fits (counting one attempt either way).
    pub fn retry(&mut self, ticket: Ticket, now: Instant, wakes: &mut Wakes) {
        let mut dirty = Dirty::new();
        match self.fit(ticket, now, None) {
            Fit::Yes => {
                // It fitted at its decay instant: charge it from then, not from
                // the moment its (late) timer fired, so timer slack costs no
                // pace. Its `decay_at` is fresh: any change that could have
                // made it stale and then undone would have pumped it.
                let waiter = &self.waiters[&ticket];
                let since = waiter.decay_at.filter(|&t| t <= now).unwrap_or(now);
                self.grant(ticket, since, now, &mut dirty, wakes)
            }
            Fit::No { decay_at, blocker } => {
                let waiter = self.waiters.get_mut(&ticket).expect("queued");
                waiter.decay_at = decay_at;
                if let Some(err) = waiter.attempt() {
                    self.fail(ticket, err, &mut dirty, wakes);
                } else {
                    self.watch(ticket, blocker);
                }
            }
        }
        self.pump(&mut dirty, now, wakes);
    }

    /// Whether a queued waiter fits on all its limits, behind the waiters
    /// queued before it. `known` gives its reservation on one limit when the
    /// caller has summed it already.
    fn fit(&self, ticket: Ticket, now: Instant, known: Option<(u32, u64)>) -> Fit {
        let waiter = &self.waiters[&ticket];
        let mut decay_at = Some(now);
        // (limit, when it lets the waiter in by decay; None: never by decay)
        let mut blocker: Option<(u32, Option<Instant>)> = None;
        for id in &waiter.ids {
            let limit = self.reg.get(id.idx).expect("ids are live");
            let reserved = match known {
                Some((idx, reserved)) if idx == id.idx => limit
                    .slots
                    .fits_held(reserved, waiter.occupy)
                    .then_some(reserved),
                _ => limit.reserved_for(ticket, waiter.occupy),
            };
            let at = reserved.and_then(|reserved| {
                if limit.slots.fits(reserved, waiter.occupy, now) {
                    Some(now)
                } else {
                    limit.slots.fits_at(reserved, waiter.occupy, now)
                }
            });
            if at != Some(now) {
                let worse = match (blocker, at) {
                    (None, _) => true,
                    (Some((_, None)), _) => false,
                    (Some(_), None) => true,
                    (Some((_, Some(then))), Some(at)) => at > then,
                };
                if worse {
                    blocker = Some((id.idx, at));
                }
            }
            decay_at = decay_at.zip(at).map(|(a, b)| a.max(b));
        }
        match blocker {
            Some((blocker, _)) => Fit::No { decay_at, blocker },
            None => Fit::Yes,
        }
    }

    /// Takes the waiter's slots on all its limits at once and wakes it.
    /// Decaying slots are charged from `since` (at most `now`), and so are
    /// its wait and hold times: it is granted then, whenever it runs.
    fn grant(
        &mut self,
        ticket: Ticket,
        since: Instant,
        now: Instant,
        dirty: &mut Dirty,
        wakes: &mut Wakes,
    ) {
        debug_assert!(since <= now);
        let waiter = self.waiters.get_mut(&ticket).expect("queued");
        for id in &waiter.ids {
            let limit = self.reg.get_mut(id.idx).expect("ids are live");
            limit.dequeue(ticket);
            match waiter.kind {
                Kind::Concurrency => limit.slots.take_held(waiter.occupy),
                Kind::RateLimit => {
                    limit.slots.take_decaying(waiter.occupy, since);
                    // Followers now wait on decay rather than on this
                    // reservation: let them set their timers.
                    if !limit.queue.is_empty() {
                        dirty.push(Pump::watchers(id.idx, false));
                    }
                }
            }
        }
        for id in &waiter.ids {
            self.reg.touch(id.idx);
        }
        waiter.status = Status::Granted;
        waiter.granted_at = Some(since);
        wakes.push(waiter.wake.clone());
        // On a limit of one slot, its next in line (a thread waiting for that
        // limit alone) is woken to spin at the head: its turn comes exactly
        // when the waiter just granted releases, and it had better be
        // running then. With more slots its turn comes with whichever holder
        // releases first, and a spinner only takes the CPU from them
        // (measured: 8 threads on a limit of 4 fell from 2.7-5.4 to 1.3-1.5 M
        // acquisitions/s with it; a limit of 1 rose from 0.07-0.08 to 0.10-0.12).
        if let [id] = waiter.ids[..] {
            let next = self
                .reg
                .get(id.idx)
                .filter(|l| l.slots.limit == 1)
                .and_then(|l| l.queue.get(0))
                .and_then(|q| self.waiters.get(&q.ticket));
            if let Some(
                next @ Waiter {
                    wake: Wake::Thread(..),
                    status: Status::Queued,
                    ..
                },
            ) = next
            {
                wakes.push(next.wake.clone());
            }
        }
    }

    /// Fails a queued waiter with `err`, giving its reservations back.
    pub fn fail(&mut self, ticket: Ticket, err: Error, dirty: &mut Dirty, wakes: &mut Wakes) {
        let waiter = self.waiters.get_mut(&ticket).expect("queued");
        for id in waiter.ids.drain(..) {
            let limit = self.reg.get_mut(id.idx).expect("ids are live");
            limit.dequeue(ticket);
            dirty.push(Pump::watchers(id.idx, false));
            self.reg.touch(id.idx);
        }
        waiter.status = Status::Failed(err);
        wakes.push(waiter.wake.clone());
    }

    /// Takes a queued waiter out of every queue (it timed out or was
    /// cancelled) and lets those behind it move up.
    pub fn withdraw(&mut self, ticket: Ticket, now: Instant, wakes: &mut Wakes) {
        let Some(waiter) = self.waiters.remove(&ticket) else {
            return;
        };
        debug_assert!(matches!(waiter.status, Status::Queued));
        wakes.bury(waiter.wake);
        let mut dirty = Dirty::new();
        for id in &waiter.ids {
            let limit = self.reg.get_mut(id.idx).expect("ids are live");
            limit.dequeue(ticket);
            dirty.push(Pump::watchers(id.idx, false));
            self.reg.touch(id.idx);
        }
        self.pump(&mut dirty, now, wakes);
    }

    /// Drops limit `idx` from the needs of every waiter queued on it (it was
    /// deactivated or deleted); strict waiters fail when it is deleted.
    ///
    /// For the others, losing one of their limits is a change of their
    /// limits: each checks again, counting an attempt if it still does not
    /// fit. Returns those that proceed as for a missing limit and would
    /// create it (`create_if_missing`), when it was deleted.
    pub fn forget_limit(
        &mut self,
        idx: u32,
        deleted: bool,
        now: Instant,
        dirty: &mut Dirty,
        wakes: &mut Wakes,
    ) -> SmallVec<[Ticket; 2]> {
        let mut recreate = SmallVec::new();
        let Some(limit) = self.reg.get_mut(idx) else {
            return recreate;
        };
        let queue = limit.queue.take();
        limit.queued_occupy = 0;
        limit.watchers = 0;
        limit.retriers = 0;
        let name = limit.name.to_string();
        let mut affected: SmallVec<[Ticket; 8]> = SmallVec::new();
        for q in queue {
            let waiter = self.waiters.get_mut(&q.ticket).expect("queued");
            waiter.ids.retain(|id| id.idx != idx);
            if deleted && waiter.strict {
                let err = Error::NotFound { name: name.clone() };
                self.fail(q.ticket, err, dirty, wakes);
                continue;
            }
            if deleted && waiter.create_if_missing {
                recreate.push(q.ticket);
            }
            if waiter.ids.is_empty() {
                // Nothing left to wait for: it passes, holding nothing.
                waiter.status = Status::Granted;
                waiter.granted_at = Some(now);
                wakes.push(waiter.wake.clone());
            } else {
                affected.push(q.ticket);
            }
        }
        // In ticket order, once this limit is out of every waiter's needs.
        for ticket in affected {
            if matches!(self.waiters[&ticket].status, Status::Queued) {
                self.recheck(ticket, now, dirty, wakes);
            }
        }
        recreate
    }

    /// Fails the waiters of `idx` that can never fit its new configuration.
    pub fn fail_impossible(&mut self, idx: u32, dirty: &mut Dirty, wakes: &mut Wakes) {
        let Some(limit) = self.reg.get(idx) else {
            return;
        };
        let (cap, no_decay, name) = (
            limit.slots.limit,
            limit.slots.rate() <= 0.0,
            limit.name.clone(),
        );
        let doomed: SmallVec<[(Ticket, Error); 2]> = limit
            .queue
            .iter()
            .filter_map(|q| {
                let waiter = &self.waiters[&q.ticket];
                if cap > 0 && waiter.occupy > cap {
                    Some((
                        q.ticket,
                        Error::OccupyExceedsLimit {
                            name: name.to_string(),
                            occupy: waiter.occupy,
                            limit: cap,
                        },
                    ))
                } else if no_decay && waiter.kind == Kind::RateLimit {
                    Some((
                        q.ticket,
                        Error::NoSlotDecay {
                            name: name.to_string(),
                        },
                    ))
                } else {
                    None
                }
            })
            .collect();
        for (ticket, err) in doomed {
            self.fail(ticket, err, dirty, wakes);
        }
    }
}
