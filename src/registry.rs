//! The registry: names to limits, each limit's slots, counters and queue.
//!
//! Limits live in a slab; a [`LimitId`] is a slab index plus a unique id, so a
//! guard of a deleted limit never gives slots back to a new limit that reuses
//! the index or the name.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{LimitConfig, LimitInfo};
use crate::slots::Slots;
use crate::waiters::Ticket;

/// Where a limit lives, and which incarnation of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct LimitId {
    pub idx: u32,
    /// The incarnation: a counter of creations, wrapping at 2^32. A stale id
    /// could only match again if its guard outlived four billion creations
    /// of limits that all landed in its slot.
    pub uid: u32,
}

/// A queued waiter as its limits see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Queued {
    pub ticket: Ticket,
    pub occupy: u32,
    /// Whether the waiter watches this limit: it does not fit here, so a
    /// release here must look at it. Each waiter watches one limit it does
    /// not fit.
    pub watch: bool,
    /// Whether the waiter has a retry budget (`max_retries`), so that every
    /// pump of this limit must count against it, fit or not.
    pub retries: bool,
}

/// A limit's queue of waiters, in ticket order: a pointer while the limit
/// has never had one (most limits), so that idle limits stay small.
///
/// The box is the point (an empty `VecDeque` is 32 bytes inline), hence the
/// lint's exception.
#[derive(Debug, Default)]
#[allow(clippy::box_collection)]
pub(crate) struct Queue(Option<Box<VecDeque<Queued>>>);

impl Queue {
    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|q| q.is_empty())
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    pub fn get(&self, pos: usize) -> Option<&Queued> {
        self.0.as_ref()?.get(pos)
    }

    pub fn back(&self) -> Option<&Queued> {
        self.0.as_ref()?.back()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Queued> {
        self.0.iter().flat_map(|q| q.iter())
    }

    /// Position of `ticket` (the queue is sorted by ticket).
    pub fn position(&self, ticket: Ticket) -> Option<usize> {
        self.0
            .as_ref()?
            .binary_search_by_key(&ticket, |q| q.ticket)
            .ok()
    }

    pub fn get_mut(&mut self, pos: usize) -> Option<&mut Queued> {
        self.0.as_mut()?.get_mut(pos)
    }

    /// Queues last; the queue is allocated on first use and kept.
    pub fn push_back(&mut self, q: Queued) {
        self.0.get_or_insert_default().push_back(q);
    }

    pub fn remove(&mut self, pos: usize) -> Option<Queued> {
        self.0.as_mut()?.remove(pos)
    }

    /// Empties the queue, handing back its entries.
    pub fn take(&mut self) -> VecDeque<Queued> {
        self.0
            .as_mut()
            .map(|q| std::mem::take(&mut **q))
            .unwrap_or_default()
    }
}

/// One limit.
#[derive(Debug)]
pub(crate) struct Limit {
    pub uid: u32,
    pub name: Arc<str>,
    pub active: bool,
    pub slots: Slots,
    pub denied: u64,
    pub avg_occupancy: f64,
    /// Waiters blocked on this limit, in ticket order.
    pub queue: Queue,
    /// Sum of the queue's occupy: slots promised to waiters, which newcomers
    /// may not take.
    pub queued_occupy: u64,
    /// Queue entries with `watch` set.
    pub watchers: u32,
    /// Queue entries with `retries` set.
    pub retriers: u32,
    /// Whether its slot state changed since the store last saved it.
    pub unsaved: bool,
    /// The store's record of the limit as this owner last read or wrote it.
    pub stored: Stored,
}

/// What the store's row of a limit holds beyond its configuration: with the
/// configuration in memory, the base against which another process's edits
/// are detected (so the owner keeps no second copy of every name). Kept to
/// 32 bits each: only a change matters, and the row's counters would have to
/// move by a multiple of 2^32 between two looks to hide one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stored {
    /// Which creation of the name the row is (a deletion and creation by
    /// another process makes a new limit).
    pub incarnation: u32,
    /// How many resets the row has seen.
    pub resets: u32,
}

/// Prefect's starting value for the occupancy average.
const INITIAL_AVG_OCCUPANCY: f64 = 2.0;
/// Prefect's floor for one slot's occupancy in the average.
const MIN_OCCUPANCY: f64 = 0.1;

impl Limit {
    pub fn id(&self, idx: u32) -> LimitId {
        LimitId { idx, uid: self.uid }
    }

    /// Folds one release into the occupancy average, as Prefect does.
    pub fn record_occupancy(&mut self, held_secs: f64, occupy: u32) {
        let per_slot = (held_secs / f64::from(occupy.max(1))).max(MIN_OCCUPANCY);
        let weight = 2.0 * f64::from(self.slots.limit.max(1));
        self.avg_occupancy += (per_slot - self.avg_occupancy) / weight;
    }

    /// Position of `ticket` in the queue (the queue is sorted by ticket).
    pub fn position(&self, ticket: Ticket) -> Option<usize> {
        self.queue.position(ticket)
    }

    /// Takes `ticket` out of the queue; returns whether it was there.
    pub fn dequeue(&mut self, ticket: Ticket) -> bool {
        match self.position(ticket) {
            Some(pos) => {
                let q = self.queue.remove(pos).expect("position is in range");
                self.queued_occupy -= u64::from(q.occupy);
                self.watchers -= u32::from(q.watch);
                self.retriers -= u32::from(q.retries);
                true
            }
            None => false,
        }
    }

    /// Queues `ticket` last, not watching.
    pub fn enqueue(&mut self, ticket: Ticket, occupy: u32, retries: bool) {
        debug_assert!(self.queue.back().is_none_or(|q| q.ticket < ticket));
        self.queue.push_back(Queued {
            ticket,
            occupy,
            watch: false,
            retries,
        });
        self.queued_occupy += u64::from(occupy);
        self.retriers += u32::from(retries);
    }

    /// Sets whether `ticket` watches this limit.
    pub fn set_watch(&mut self, ticket: Ticket, watch: bool) {
        if let Some(pos) = self.position(ticket) {
            let q = self.queue.get_mut(pos).expect("position is in range");
            if q.watch != watch {
                q.watch = watch;
                if watch {
                    self.watchers += 1;
                } else {
                    self.watchers -= 1;
                }
            }
        }
    }

    /// Slots promised to waiters queued before `ticket`, knowing whether it
    /// is the last in the queue (then the sum is at hand).
    pub fn reserved_for(&self, ticket: Ticket, occupy: u32) -> Option<u64> {
        match self.queue.back() {
            Some(last) if last.ticket == ticket => {
                let reserved = self.queued_occupy - u64::from(last.occupy);
                self.slots.fits_held(reserved, occupy).then_some(reserved)
            }
            _ => self.reserved_before(ticket, occupy),
        }
    }

    /// Slots promised to waiters queued before `ticket`, or `None` if they
    /// already leave no room for `occupy` (then the sum is not finished: the
    /// walk stops early, so its cost is bounded by the limit).
    pub fn reserved_before(&self, ticket: Ticket, occupy: u32) -> Option<u64> {
        let mut reserved = 0u64;
        for q in self.queue.iter() {
            if q.ticket >= ticket {
                break;
            }
            reserved += u64::from(q.occupy);
            if !self.slots.fits_held(reserved, occupy) {
                return None;
            }
        }
        Some(reserved)
    }

    pub fn info(&self, now: Instant) -> LimitInfo {
        LimitInfo {
            name: self.name.to_string(),
            limit: self.slots.limit,
            active: self.active,
            slot_decay_per_second: self.slots.rate(),
            active_slots: self.slots.active_slots(now),
            held_slots: self.slots.held.min(u64::from(u32::MAX)) as u32,
            denied_slots: self.denied,
            waiters: self.queue.len(),
            avg_slot_occupancy_seconds: self.avg_occupancy,
        }
    }
}

/// Names to limits.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// Fx hashing: names come from the program and its operators, not from
    /// an adversary, and SipHash would cost more than the rest of an
    /// uncontended acquisition.
    by_name: FxHashMap<Arc<str>, u32>,
    slab: Vec<Option<Limit>>,
    free: Vec<u32>,
    next_uid: u32,
    /// Whether a store wants to hear of slot changes.
    pub persist: bool,
    /// Limits whose slot state changed since the store's last sweep.
    unsaved: Vec<u32>,
}

impl Registry {
    /// Notes that a limit's slot state changed, for the store's next sweep.
    /// Costs one branch without a store, and one flag test per change with one.
    pub fn touch(&mut self, idx: u32) {
        if !self.persist {
            return;
        }
        if let Some(limit) = self.get_mut(idx) {
            if !std::mem::replace(&mut limit.unsaved, true) {
                self.unsaved.push(idx);
            }
        }
    }

    /// Swaps the limits changed since the last call into `into` (cleared
    /// first), and clears their flags; `into`'s old buffer becomes the new
    /// list, so that in a steady state nothing is allocated.
    pub fn take_unsaved(&mut self, into: &mut Vec<u32>) {
        into.clear();
        std::mem::swap(&mut self.unsaved, into);
        for &idx in into.iter() {
            if let Some(limit) = self.get_mut(idx) {
                limit.unsaved = false;
            }
        }
    }

    pub fn lookup(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    pub fn get(&self, idx: u32) -> Option<&Limit> {
        self.slab.get(idx as usize).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, idx: u32) -> Option<&mut Limit> {
        self.slab.get_mut(idx as usize).and_then(Option::as_mut)
    }

    /// The limit `id` names, if it still exists (not deleted, not recreated).
    pub fn resolve_mut(&mut self, id: LimitId) -> Option<&mut Limit> {
        self.get_mut(id.idx).filter(|l| l.uid == id.uid)
    }

    pub fn by_name_mut(&mut self, name: &str) -> Option<&mut Limit> {
        let idx = self.lookup(name)?;
        self.get_mut(idx)
    }

    pub fn by_name(&self, name: &str) -> Option<(u32, &Limit)> {
        let idx = self.lookup(name)?;
        Some((idx, self.get(idx)?))
    }

    /// Inserts a new limit; the caller has checked that the name is free and
    /// valid.
    pub fn insert(&mut self, name: &str, config: &LimitConfig, now: Instant) -> u32 {
        debug_assert!(self.lookup(name).is_none());
        self.next_uid = self.next_uid.wrapping_add(1);
        let name: Arc<str> = Arc::from(name);
        let limit = Limit {
            uid: self.next_uid,
            name: name.clone(),
            active: config.active,
            slots: Slots::new(config.limit, config.slot_decay_per_second, now),
            denied: 0,
            avg_occupancy: INITIAL_AVG_OCCUPANCY,
            queue: Queue::default(),
            queued_occupy: 0,
            watchers: 0,
            retriers: 0,
            unsaved: false,
            stored: Stored::default(),
        };
        let idx = match self.free.pop() {
            Some(idx) => {
                self.slab[idx as usize] = Some(limit);
                idx
            }
            None => {
                self.slab.push(Some(limit));
                u32::try_from(self.slab.len() - 1).expect("fewer than 2^32 limits")
            }
        };
        self.by_name.insert(name, idx);
        idx
    }

    pub fn remove(&mut self, idx: u32) -> Option<Limit> {
        let limit = self.slab.get_mut(idx as usize)?.take()?;
        self.by_name.remove(&*limit.name);
        self.free.push(idx);
        Some(limit)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &Limit)> {
        self.slab
            .iter()
            .enumerate()
            .filter_map(|(i, l)| Some((i as u32, l.as_ref()?)))
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_index_is_a_new_limit() {
        let now = Instant::now();
        let mut reg = Registry::default();
        let idx = reg.insert("a", &LimitConfig::new(1), now);
        let old = reg.get(idx).unwrap().id(idx);
        reg.remove(idx);
        assert!(reg.lookup("a").is_none());
        let again = reg.insert("a", &LimitConfig::new(1), now);
        assert_eq!(again, idx, "the slab slot is reused");
        assert!(reg.resolve_mut(old).is_none(), "but the old id is dead");
    }

    #[test]
    fn occupancy_average_follows_prefect() {
        let now = Instant::now();
        let mut reg = Registry::default();
        let idx = reg.insert("a", &LimitConfig::new(2), now);
        let limit = reg.get_mut(idx).unwrap();
        limit.record_occupancy(0.0, 1); // floored at 0.1
        assert!((limit.avg_occupancy - (2.0 + (0.1 - 2.0) / 4.0)).abs() < 1e-12);
        let before = limit.avg_occupancy;
        limit.record_occupancy(6.0, 2); // 3 s per slot
        assert!((limit.avg_occupancy - (before + (3.0 - before) / 4.0)).abs() < 1e-12);
    }

    #[test]
    fn reserved_before_stops_when_nothing_can_fit() {
        let now = Instant::now();
        let mut reg = Registry::default();
        let idx = reg.insert("a", &LimitConfig::new(4), now);
        let limit = reg.get_mut(idx).unwrap();
        limit.enqueue(1, 2, false);
        limit.enqueue(2, 1, false);
        limit.enqueue(5, 3, true);
        assert_eq!(limit.reserved_before(1, 2), Some(0));
        assert_eq!(limit.reserved_before(2, 1), Some(2));
        assert_eq!(limit.reserved_before(5, 1), Some(3));
        assert_eq!(limit.reserved_before(5, 2), None);
        assert!(limit.dequeue(2));
        assert!(!limit.dequeue(2));
        assert_eq!(limit.queued_occupy, 5);
        assert_eq!(limit.reserved_before(5, 2), Some(2));
    }
}
