//! The lock-free side of each limit: its held slots, capacity, identity and
//! occupancy average in atomics, so that an uncontended one-name acquisition
//! and its release need no lock at all.
//!
//! # The protocol
//!
//! A limit's [`Cell`] is either *free* or *claimed* (the `CLAIMED` bit of its
//! word):
//!
//! * **Free**: the cell is the truth about held slots. Any thread may take
//!   slots (compare-and-swap, if they fit under the capacity) or give them
//!   back, without the engine's lock. A limit is left free only while it is
//!   *simple*: active, nobody queued, no decaying slots.
//! * **Claimed**: the engine's lock holder owns the limit. Whoever holds the
//!   lock and looks at a limit claims it first (the registry's accessors do
//!   it, so nothing under the lock can read a stale count), and from then on
//!   the registry's copy of the held count is the truth. Lock-free takes and
//!   releases see the bit and go through the lock instead. When the lock is
//!   released, every limit looked at that is simple again is set free, with
//!   its held count, capacity and identity written back.
//!
//! Every release of a claim advances the word's epoch, so a lock-free
//! compare-and-swap that read the word before a claim can never succeed
//! after it (no ABA), and the capacity and identity it read alongside were
//! those of the word it swapped. A waiter queues (claiming the limit) before
//! it decides that it does not fit, so a lock-free release either happened
//! before (and the waiter saw the room) or finds the claim and hands the
//! slots over under the lock: no wake-up is lost.
//!
//! The occupancy average lives only here: every release, lock-free or not,
//! folds into it by compare-and-swap, so none is lost to a race with a claim.
//! It carries the low 16 bits of its limit's id beside 48 bits of the `f64`
//! (36 bits of mantissa: about 11 significant digits), so that a lock-free
//! release that lost a race with the deletion of its limit cannot fold its
//! hold into the average of a limit re-created in the same cell.

use std::sync::OnceLock;

use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

/// Held slots, the low 32 bits of a word.
const HELD: u64 = 0xFFFF_FFFF;
/// Set while the engine's lock holder owns the limit.
const CLAIMED: u64 = 1 << 63;
/// The epoch: bits 32 to 62.
const EPOCH_SHIFT: u32 = 32;
const EPOCH_MASK: u64 = !HELD & !CLAIMED;

/// Prefect's starting value for the occupancy average.
pub(crate) const INITIAL_AVG_OCCUPANCY: f64 = 2.0;
/// Prefect's floor for one slot's occupancy in the average.
const MIN_OCCUPANCY: f64 = 0.1;

/// What a lock-free take found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// The slots are taken.
    Taken,
    /// Free, but without room: the acquisition does not fit now.
    Full,
    /// Claimed by the lock holder, or another limit's cell now: ask under
    /// the lock.
    Ask,
}

/// One limit's atomics.
///
/// Orderings are `SeqCst` throughout: on x86 they cost what `AcqRel` costs
/// for read-modify-writes and nothing for loads, and the store's dirty marks
/// (see [`Cells::mark`]) rely on one total order with these words.
#[derive(Debug)]
pub(crate) struct Cell {
    /// Held slots | epoch | `CLAIMED`.
    word: AtomicU64,
    /// The capacity, as of the last release of a claim.
    limit: AtomicU32,
    /// The limit's unique id, as of the last release of a claim.
    uid: AtomicU32,
    /// The occupancy average, tagged with its limit's id (see [`Avg`]).
    avg: AtomicU64,
}

impl Default for Cell {
    fn default() -> Self {
        Cell {
            // Claimed until a limit is created here and set free.
            word: AtomicU64::new(CLAIMED),
            limit: AtomicU32::new(0),
            uid: AtomicU32::new(0),
            avg: AtomicU64::new(Avg::pack(0, INITIAL_AVG_OCCUPANCY)),
        }
    }
}

impl Cell {
    /// Takes `occupy` held slots of the limit `uid` if the cell is free and
    /// they fit under its capacity.
    #[inline]
    pub fn try_take(&self, uid: u32, occupy: u32) -> Take {
        let mut word = self.word.load(SeqCst);
        loop {
            // Read after the word: a claim in between changes the word, and
            // the swap below then fails.
            if word & CLAIMED != 0 || self.uid.load(SeqCst) != uid {
                return Take::Ask;
            }
            let limit = self.limit.load(SeqCst);
            if (word & HELD) + u64::from(occupy) > u64::from(limit) {
                return Take::Full;
            }
            match self
                .word
                .compare_exchange_weak(word, word + u64::from(occupy), SeqCst, SeqCst)
            {
                Ok(_) => return Take::Taken,
                Err(now) => word = now,
            }
        }
    }

    /// Gives back `occupy` held slots of the limit `uid` if the cell is free,
    /// and folds the hold into the occupancy average. `false` leaves it all
    /// to the lock (claimed, or not the limit `uid` any more).
    #[inline]
    pub fn try_give_back(&self, uid: u32, occupy: u32, held_secs: f64) -> bool {
        let mut word = self.word.load(SeqCst);
        loop {
            if word & CLAIMED != 0
                || self.uid.load(SeqCst) != uid
                || word & HELD < u64::from(occupy)
            {
                return false;
            }
            match self
                .word
                .compare_exchange_weak(word, word - u64::from(occupy), SeqCst, SeqCst)
            {
                Ok(_) => break,
                Err(now) => word = now,
            }
        }
        self.record_occupancy(uid, held_secs, occupy, self.limit.load(SeqCst));
        true
    }

    /// Claims the cell for the lock holder; returns the held slots, which
    /// only the lock holder changes from now on.
    pub fn claim(&self) -> u64 {
        self.word.fetch_or(CLAIMED, SeqCst) & HELD
    }

    /// Sets a claimed cell free with the registry's truth, advancing the
    /// epoch. Only the lock holder calls it, on a cell it claimed.
    pub fn free(&self, held: u64, limit: u32, uid: u32) {
        let word = self.word.load(SeqCst);
        debug_assert!(word & CLAIMED != 0, "freeing an unclaimed cell");
        debug_assert!(held <= HELD, "held slots beyond 32 bits");
        self.limit.store(limit, SeqCst);
        self.uid.store(uid, SeqCst);
        let epoch = (word & EPOCH_MASK).wrapping_add(1 << EPOCH_SHIFT) & EPOCH_MASK;
        self.word.store(epoch | held.min(HELD), SeqCst);
    }

    pub fn avg(&self) -> f64 {
        Avg::value(self.avg.load(SeqCst))
    }

    /// Sets the average of the limit `uid` (a new one, or one restored).
    pub fn set_avg(&self, uid: u32, avg: f64) {
        self.avg.store(Avg::pack(uid, avg), SeqCst);
    }

    /// Folds one release of the limit `uid` into the occupancy average, as
    /// Prefect does: `avg += (max(held / occupy, 0.1) - avg) / (2 * limit)`.
    /// Nothing if the cell is another limit's now.
    pub fn record_occupancy(&self, uid: u32, held_secs: f64, occupy: u32, limit: u32) {
        let per_slot = (held_secs / f64::from(occupy.max(1))).max(MIN_OCCUPANCY);
        let weight = 2.0 * f64::from(limit.max(1));
        let mut old = self.avg.load(SeqCst);
        loop {
            if !Avg::is_of(old, uid) {
                return;
            }
            let avg = Avg::value(old);
            let new = Avg::pack(uid, avg + (per_slot - avg) / weight);
            match self.avg.compare_exchange_weak(old, new, SeqCst, SeqCst) {
                Ok(_) => return,
                Err(now) => old = now,
            }
        }
    }
}

/// The packing of a tagged occupancy average: the low 16 bits of the
/// limit's id, then the top 48 bits of the `f64`.
struct Avg;

impl Avg {
    const TAG_SHIFT: u32 = 48;
    const VALUE: u64 = (1 << Avg::TAG_SHIFT) - 1;

    /// Rounded to the nearest kept value (a carry into the exponent is the
    /// right rounding too).
    fn pack(uid: u32, avg: f64) -> u64 {
        let bits = avg.to_bits();
        let rounded = (bits >> 16) + ((bits >> 15) & 1);
        (u64::from(uid & 0xFFFF) << Avg::TAG_SHIFT) | (rounded & Avg::VALUE)
    }

    fn value(packed: u64) -> f64 {
        f64::from_bits((packed & Avg::VALUE) << 16)
    }

    fn is_of(packed: u64, uid: u32) -> bool {
        packed >> Avg::TAG_SHIFT == u64::from(uid & 0xFFFF)
    }
}

/// Cells of the first bucket; bucket `b` holds `FIRST << b`.
const FIRST: usize = 64;
/// Enough buckets for every `u32` index.
const BUCKETS: usize = 27;

/// One bucket: cells and their dirty bits (one per cell, for the store).
#[derive(Debug)]
struct Bucket {
    cells: Box<[Cell]>,
    dirty: Box<[AtomicU64]>,
}

/// Every limit's cell, by registry index: buckets of doubling size that are
/// never moved or freed while the limiter lives, so that a cell is reached
/// without a lock (one atomic load of its bucket).
#[derive(Debug)]
pub(crate) struct Cells {
    buckets: [OnceLock<Bucket>; BUCKETS],
}

impl Default for Cells {
    fn default() -> Self {
        Cells {
            buckets: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

/// Bucket and offset of index `idx`.
#[inline]
fn locate(idx: u32) -> (usize, usize) {
    let n = idx as usize / FIRST + 1;
    let bucket = (usize::BITS - 1 - n.leading_zeros()) as usize;
    (bucket, idx as usize - ((1 << bucket) - 1) * FIRST)
}

impl Cells {
    /// The cell at `idx`, if its bucket exists (it does for every index the
    /// registry handed out).
    #[inline]
    pub fn get(&self, idx: u32) -> Option<&Cell> {
        let (bucket, offset) = locate(idx);
        self.buckets.get(bucket)?.get()?.cells.get(offset)
    }

    /// The cell at `idx`, making its bucket if needed (under the engine's
    /// lock: buckets are made by one thread at a time).
    pub fn make(&self, idx: u32) -> &Cell {
        let (bucket, offset) = locate(idx);
        let bucket = self.buckets[bucket].get_or_init(|| {
            let len = FIRST << bucket;
            Bucket {
                cells: (0..len).map(|_| Cell::default()).collect(),
                dirty: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            }
        });
        &bucket.cells[offset]
    }

    /// Marks `idx` as changed since the store's last sweep. Costs one load
    /// when it is already marked.
    #[inline]
    pub fn mark(&self, idx: u32) {
        let (bucket, offset) = locate(idx);
        if let Some(bucket) = self.buckets[bucket].get() {
            let word = &bucket.dirty[offset / 64];
            let bit = 1u64 << (offset % 64);
            if word.load(SeqCst) & bit == 0 {
                word.fetch_or(bit, SeqCst);
            }
        }
    }

    /// Clears every mark and hands the marked indices to `f`.
    pub fn sweep(&self, mut f: impl FnMut(u32)) {
        for (b, bucket) in self.buckets.iter().enumerate() {
            let Some(bucket) = bucket.get() else {
                break;
            };
            let base = ((1usize << b) - 1) * FIRST;
            for (w, word) in bucket.dirty.iter().enumerate() {
                if word.load(SeqCst) == 0 {
                    continue;
                }
                let mut bits = word.swap(0, SeqCst);
                while bits != 0 {
                    let i = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    f((base + w * 64 + i) as u32);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_map_to_distinct_cells_in_order() {
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(63), (0, 63));
        assert_eq!(locate(64), (1, 0));
        assert_eq!(locate(191), (1, 127));
        assert_eq!(locate(192), (2, 0));
        assert_eq!(locate(u32::MAX).0, BUCKETS - 1);
        let mut last = (0, 0);
        for idx in 1..5000u32 {
            let at = locate(idx);
            assert!(at > last, "{idx}: {at:?} after {last:?}");
            assert!(at.1 < FIRST << at.0);
            last = at;
        }
    }

    #[test]
    fn a_free_cell_takes_what_fits_and_a_claim_stops_it() {
        let cells = Cells::default();
        let cell = cells.make(70);
        assert_eq!(cell.try_take(1, 1), Take::Ask, "claimed until set free");
        cell.free(0, 3, 1);
        assert_eq!(cell.try_take(1, 2), Take::Taken);
        assert_eq!(cell.try_take(1, 2), Take::Full, "over the capacity");
        assert_eq!(cell.try_take(2, 1), Take::Ask, "another limit's id");
        assert_eq!(cell.try_take(1, 1), Take::Taken);
        assert_eq!(cell.word.load(SeqCst) & HELD, 3);
        assert!(cell.try_give_back(1, 2, 0.0));
        assert_eq!(cell.claim(), 1);
        assert_eq!(cell.try_take(1, 1), Take::Ask);
        assert!(!cell.try_give_back(1, 1, 0.0));
        cell.free(1, 3, 1);
        assert!(cell.try_give_back(1, 1, 0.0));
        assert!(!cell.try_give_back(1, 1, 0.0), "nothing left to give");
    }

    #[test]
    fn a_swap_read_before_a_claim_fails_after_it() {
        let cell = Cell::default();
        cell.free(0, 1, 1);
        let before = cell.word.load(SeqCst);
        cell.claim();
        cell.free(0, 1, 1); // same count, same capacity: only the epoch moved
        assert_ne!(cell.word.load(SeqCst), before);
    }

    #[test]
    fn the_average_follows_prefect() {
        let cell = Cell::default();
        cell.set_avg(7, 2.0);
        cell.record_occupancy(7, 0.0, 1, 2); // floored at 0.1
        assert!((cell.avg() - (2.0 + (0.1 - 2.0) / 4.0)).abs() < 1e-10);
        let before = cell.avg();
        cell.record_occupancy(7, 6.0, 2, 2); // 3 s per slot
        assert!((cell.avg() - (before + (3.0 - before) / 4.0)).abs() < 1e-10);
    }

    #[test]
    fn the_average_is_its_limits_only() {
        let cell = Cell::default();
        cell.set_avg(7, 2.0);
        cell.set_avg(8, 2.0); // limit 7 deleted, 8 created in its cell
        cell.record_occupancy(7, 0.0, 1, 1);
        assert_eq!(cell.avg(), 2.0, "a late release of 7 changed 8's average");
        cell.record_occupancy(8, 0.0, 1, 1);
        assert!((cell.avg() - 1.05).abs() < 1e-10);
        for avg in [0.1, 2.0, 3.25, 1e9, 0.0] {
            cell.set_avg(u32::MAX, avg);
            assert!(
                (cell.avg() - avg).abs() <= avg * 1e-10,
                "{avg}: {}",
                cell.avg()
            );
        }
    }

    #[test]
    fn marks_are_swept_once() {
        let cells = Cells::default();
        for idx in [0, 5, 63, 64, 200, 1000] {
            cells.make(idx);
        }
        for idx in [5, 200, 64, 5] {
            cells.mark(idx);
        }
        let mut seen = Vec::new();
        cells.sweep(|i| seen.push(i));
        seen.sort();
        assert_eq!(seen, [5, 64, 200]);
        cells.sweep(|i| panic!("{i} swept twice"));
    }
}
