//! The registry: names to limits, each limit's slots, counters and queue.
//!
//! Limits live in a slab; a [`LimitId`] is a slab index plus a unique id, so a
//! guard of a deleted limit never gives slots back to a new limit that reuses
//! the index or the name.
//!
//! Beside the slab, outside the engine's lock, the [`Index`] holds what the
//! lock-free paths reach: each limit's [`Cell`] of atomics. Every accessor of
//! a limit here claims its cell for the lock holder (see [`crate::cell`]), and
//! [`Registry::settle`] sets free again the simple ones the one-name paths
//! asked for when the engine's lock is released.

use std::cell::{Cell as Flag, RefCell};
use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use std::sync::Arc;
use std::time::Instant;

use crate::cell::{Cell, Cells, INITIAL_AVG_OCCUPANCY};
use crate::config::{LimitConfig, LimitInfo};
use crate::slots::Slots;
use crate::waiters::Ticket;

/// What the lock-free paths share with the registry.
#[derive(Debug, Default)]
pub(crate) struct Index {
    pub cells: Cells,
}

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
    /// Waiters blocked on this limit, in ticket order.
    pub queue: Queue,
    /// Sum of the queue's occupy: slots promised to waiters, which newcomers
    /// may not take.
    pub queued_occupy: u64,
    /// Queue entries with `watch` set.
    pub watchers: u32,
    /// Queue entries with `retries` set.
    pub retriers: u32,
    /// Whether the lock holder owns the limit's cell (set when first looked
    /// at under the lock; cleared when it is set free).
    claimed: Flag<bool>,
    /// Whether the limit was looked at under the current hold of the lock.
    in_section: Flag<bool>,
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

impl Limit {
    pub fn id(&self, idx: u32) -> LimitId {
        LimitId { idx, uid: self.uid }
    }

    /// Whether lock-free acquisitions and releases may have it: active,
    /// nobody queued, no decaying slots (fitting does not depend on time).
    fn simple(&self) -> bool {
        self.active && self.queue.is_empty() && !self.slots.has_decaying()
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

    /// A snapshot; `avg` is the occupancy average from its cell.
    pub fn info(&self, now: Instant, avg: f64) -> LimitInfo {
        LimitInfo {
            name: self.name.to_string(),
            limit: self.slots.limit,
            active: self.active,
            slot_decay_per_second: self.slots.rate(),
            active_slots: self.slots.active_slots(now),
            held_slots: self.slots.held().min(u64::from(u32::MAX)) as u32,
            denied_slots: self.denied,
            waiters: self.queue.len(),
            avg_slot_occupancy_seconds: avg,
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
    pub index: Arc<Index>,
    slab: Vec<Option<Limit>>,
    free: Vec<u32>,
    next_uid: u32,
    /// Whether a store wants to hear of slot changes.
    pub persist: bool,
    /// Limits to set free (if simple) when the lock is released.
    section: RefCell<SmallVec<[u32; 8]>>,
}

/// Notes that the lock holder looks at `limit` (at `idx`): claims its cell if
/// it is free, so that its held count is the registry's from now on.
#[inline]
fn enter(index: &Index, idx: u32, limit: &Limit) {
    if !limit.claimed.replace(true) {
        let cell = index.cells.get(idx).expect("every limit has a cell");
        limit.slots.set_held(cell.claim());
    }
}

impl Registry {
    /// Notes that a limit's slot state changed, for the store's next sweep.
    /// Costs one branch without a store, and one load per change with one.
    pub fn touch(&mut self, idx: u32) {
        if self.persist {
            self.index.cells.mark(idx);
        }
    }

    /// Puts the limits changed since the last call into `into` (cleared
    /// first); nothing is allocated while `into` has room.
    pub fn take_unsaved(&mut self, into: &mut Vec<u32>) {
        into.clear();
        self.index.cells.sweep(|idx| into.push(idx));
    }

    /// Asks for the limit at `idx` to be set free when the lock is released,
    /// if it is simple then. The one-name paths ask (the lock-free paths
    /// serve only them); a limit claimed by anything else stays claimed until
    /// one of them meets it, so that acquisitions of several limits do not
    /// claim and free every one of them each time.
    pub fn free_later(&self, idx: u32) {
        if let Some(Some(limit)) = self.slab.get(idx as usize) {
            if limit.claimed.get() && !limit.in_section.replace(true) {
                self.section.borrow_mut().push(idx);
            }
        }
    }

    /// Sets free the cells [`Registry::free_later`] asked for that are
    /// simple, with the registry's held count, capacity and id. Runs
    /// whenever the engine's lock is released.
    #[inline]
    pub fn settle(&mut self) {
        if self.section.get_mut().is_empty() {
            return;
        }
        let section = self.section.get_mut();
        for idx in section.drain(..) {
            let Some(Some(limit)) = self.slab.get(idx as usize) else {
                continue; // deleted: its cell stays claimed until reused
            };
            if !limit.in_section.replace(false) {
                continue; // asked twice
            }
            if limit.claimed.get() && limit.simple() {
                let cell = self.index.cells.get(idx).expect("every limit has a cell");
                cell.free(limit.slots.held(), limit.slots.limit, limit.uid);
                limit.claimed.set(false);
            }
        }
    }

    pub fn lookup(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// The limit at `idx`, claimed for the lock holder.
    pub fn get(&self, idx: u32) -> Option<&Limit> {
        let limit = self.slab.get(idx as usize)?.as_ref()?;
        enter(&self.index, idx, limit);
        Some(limit)
    }

    /// The limit at `idx`, claimed for the lock holder.
    pub fn get_mut(&mut self, idx: u32) -> Option<&mut Limit> {
        let limit = self.slab.get_mut(idx as usize)?.as_mut()?;
        enter(&self.index, idx, limit);
        Some(limit)
    }

    /// The id of the limit at `idx`, without claiming it: a limit's id (like
    /// its name) never changes while it lives.
    pub fn id_of(&self, idx: u32) -> Option<LimitId> {
        Some(self.slab.get(idx as usize)?.as_ref()?.id(idx))
    }

    /// The cell of the limit at `idx`.
    pub fn cell(&self, idx: u32) -> &Cell {
        self.index.cells.get(idx).expect("every limit has a cell")
    }

    /// The limit `id` names, if it still exists (not deleted, not recreated).
    pub fn resolve(&self, id: LimitId) -> Option<&Limit> {
        self.get(id.idx).filter(|l| l.uid == id.uid)
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

    /// A snapshot of the limit at `idx`.
    pub fn info(&self, idx: u32, now: Instant) -> Option<LimitInfo> {
        let limit = self.get(idx)?;
        Some(limit.info(now, self.cell(idx).avg()))
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
            queue: Queue::default(),
            queued_occupy: 0,
            watchers: 0,
            retriers: 0,
            // A new cell, or a deleted limit's, is claimed until settled.
            claimed: Flag::new(true),
            in_section: Flag::new(false),
            stored: Stored::default(),
        };
        let idx = match self.free.pop() {
            Some(idx) => idx,
            None => {
                self.slab.push(None);
                u32::try_from(self.slab.len() - 1).expect("fewer than 2^32 limits")
            }
        };
        let cell = self.index.cells.make(idx);
        cell.claim();
        cell.set_avg(self.next_uid, INITIAL_AVG_OCCUPANCY);
        self.slab[idx as usize] = Some(limit);
        self.get(idx).expect("inserted");
        self.free_later(idx);
        self.by_name.insert(name, idx);
        idx
    }

    pub fn remove(&mut self, idx: u32) -> Option<Limit> {
        // Claimed (stopping the lock-free paths) before it goes; its cell
        // stays claimed until the index is reused.
        self.get(idx)?;
        let limit = self.slab.get_mut(idx as usize)?.take()?;
        self.by_name.remove(&*limit.name);
        self.free.push(idx);
        Some(limit)
    }

    /// Every limit, each claimed for the lock holder.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Limit)> {
        self.slab.iter().enumerate().filter_map(|(i, l)| {
            let limit = l.as_ref()?;
            enter(&self.index, i as u32, limit);
            Some((i as u32, limit))
        })
    }

    pub fn len(&self) -> usize {
        self.slab.len() - self.free.len()
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
