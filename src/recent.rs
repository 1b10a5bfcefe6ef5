//! Each thread's recently used names, so that the lock-free path of a
//! one-name acquisition finds its limit without the engine's lock (the
//! registry's map of names lives behind it).
//!
//! An entry is only a hint: the limit's cell checks the id it names at every
//! take (see [`crate::cell::Cell::try_take`]), so an entry left behind by a
//! deleted or re-created limit costs one trip through the lock, which then
//! replaces it. Entries are keyed by the limiter's id as well, so limiters
//! never see each other's. Names are kept inline (no allocation, no
//! reference count), so remembering costs a copy; longer names are not
//! remembered and always take the lock.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::registry::LimitId;

/// Names remembered per thread: a direct-mapped table.
const WAYS: usize = 8;
/// The longest name remembered, in 8-byte words.
const WORDS: usize = 5;
const LONGEST: usize = WORDS * 8;

/// A limiter and a name, packed into words with a hash of them, so that
/// finding an entry is one hash and a few word comparisons (no call).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Key {
    hash: u64,
    limiter: u64,
    len: usize,
    words: [u64; WORDS],
}

impl Key {
    /// `None` for a name too long to remember.
    #[inline]
    pub fn new(limiter: u64, name: &str) -> Option<Key> {
        let bytes = name.as_bytes();
        if bytes.len() > LONGEST {
            return None;
        }
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut words = [0u64; WORDS];
        let mut hash = (limiter ^ bytes.len() as u64).wrapping_mul(K);
        let mut chunks = bytes.chunks_exact(8);
        let mut n = 0;
        for chunk in &mut chunks {
            words[n] = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            n += 1;
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            // Byte by byte: a copy into a buffer read back as a word costs a
            // call and a stalled load on the hot path.
            let mut word = 0u64;
            for (j, &b) in rest.iter().enumerate() {
                word |= u64::from(b) << (8 * j);
            }
            words[n] = word;
            n += 1;
        }
        for &word in &words[..n] {
            hash = (hash.rotate_left(23) ^ word).wrapping_mul(K);
        }
        Some(Key {
            hash,
            limiter,
            len: bytes.len(),
            words,
        })
    }

    /// Calls `f` with the name, read back from the words it was packed into
    /// (no allocation): an async acquisition keeps its one name in its key
    /// rather than in a `String` of its own.
    pub fn with_name<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        let mut bytes = [0u8; LONGEST];
        for (i, byte) in bytes[..self.len].iter_mut().enumerate() {
            *byte = (self.words[i / 8] >> (8 * (i % 8))) as u8;
        }
        f(std::str::from_utf8(&bytes[..self.len]).expect("packed from a str"))
    }

    #[inline]
    fn slot(&self) -> usize {
        (self.hash >> 61) as usize % WAYS
    }

    #[inline]
    fn same(&self, other: &Key) -> bool {
        self.hash == other.hash
            && self.limiter == other.limiter
            && self.len == other.len
            && self.words.iter().zip(&other.words).all(|(a, b)| a == b)
    }
}

thread_local! {
    static RECENT: RefCell<[Option<(Key, LimitId)>; WAYS]> = const {
        RefCell::new([None; WAYS])
    };
}

/// A new limiter's id, never reused in this process.
pub(crate) fn limiter_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The id this thread last saw `key`'s name resolve to in its limiter.
#[inline]
pub(crate) fn find(key: &Key) -> Option<LimitId> {
    RECENT.with_borrow(|recent| match &recent[key.slot()] {
        Some((k, id)) if k.same(key) => Some(*id),
        _ => None,
    })
}

/// Remembers that `key`'s name resolves to `id` (in place of whatever shared
/// its slot).
pub(crate) fn remember(key: Key, id: LimitId) {
    RECENT.with_borrow_mut(|recent| recent[key.slot()] = Some((key, id)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(idx: u32) -> LimitId {
        LimitId {
            idx,
            uid: idx + 100,
        }
    }

    fn remember(limiter: u64, name: &str, id: LimitId) {
        if let Some(key) = Key::new(limiter, name) {
            super::remember(key, id);
        }
    }

    fn find(limiter: u64, name: &str) -> Option<LimitId> {
        super::find(&Key::new(limiter, name)?)
    }

    #[test]
    fn remembers_names_per_limiter() {
        let names: Vec<String> = (0..100).map(|i| format!("limit-{i:03}")).collect();
        for (i, name) in names.iter().enumerate() {
            remember(7, name, id(i as u32));
        }
        let kept: Vec<usize> = (0..100).filter(|&i| find(7, &names[i]).is_some()).collect();
        assert!(!kept.is_empty() && kept.len() <= WAYS, "{kept:?}");
        for &i in &kept {
            assert_eq!(find(7, &names[i]), Some(id(i as u32)), "never another's id");
            assert_eq!(find(8, &names[i]), None, "another limiter");
        }
        let last = &names[99];
        assert_eq!(find(7, last), Some(id(99)), "the last is kept");
        assert_eq!(find(7, "limit-09"), None, "a prefix");
        assert_eq!(find(7, "limit-0999"), None, "a longer name");
        remember(7, last, id(500));
        assert_eq!(find(7, last), Some(id(500)), "replaced");
    }

    #[test]
    fn a_key_gives_its_name_back() {
        for name in [
            "",
            "a",
            "gpu",
            "exactly8",
            "nine char",
            "ünïcödé €",
            &"z".repeat(LONGEST),
        ] {
            let key = Key::new(1, name).expect("short enough");
            assert_eq!(key.with_name(str::to_string), name);
        }
    }

    #[test]
    fn long_names_are_not_remembered() {
        let long = "x".repeat(LONGEST + 1);
        remember(3, &long, id(1));
        assert_eq!(find(3, &long), None);
        let longest = "y".repeat(LONGEST);
        remember(3, &longest, id(2));
        assert_eq!(find(3, &longest), Some(id(2)));
    }
}
