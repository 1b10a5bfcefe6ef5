//! Each thread's recently used names, so that the lock-free path of a
//! one-name acquisition finds its limit without the engine's lock (the
//! registry's map of names lives behind it).
//!
//! An entry is only a hint: the limit's cell checks the id it names at every
//! take (see [`crate::cell::Cell::try_take`]), so an entry left behind by a
//! deleted or re-created limit costs one trip through the lock, which then
//! replaces it. Entries are keyed by the limiter's id as well, so limiters
//! never see each other's.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::registry::LimitId;

/// Names remembered per thread.
const WAYS: usize = 4;

#[derive(Debug)]
struct Entry {
    limiter: u64,
    name: Arc<str>,
    id: LimitId,
}

thread_local! {
    /// Most recently remembered first.
    static RECENT: RefCell<[Option<Entry>; WAYS]> = const { RefCell::new([const { None }; WAYS]) };
}

/// A new limiter's id, never reused in this process.
pub(crate) fn limiter_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The id this thread last saw `name` resolve to in `limiter`.
#[inline]
pub(crate) fn find(limiter: u64, name: &str) -> Option<LimitId> {
    RECENT
        .try_with(|recent| {
            let recent = recent.borrow();
            recent
                .iter()
                .flatten()
                .find(|e| e.limiter == limiter && *e.name == *name)
                .map(|e| e.id)
        })
        .ok()
        .flatten()
}

/// Remembers that `name` resolves to `id` in `limiter` (first, pushing the
/// least recent out).
pub(crate) fn remember(limiter: u64, name: &Arc<str>, id: LimitId) {
    let _ = RECENT.try_with(|recent| {
        let mut recent = recent.borrow_mut();
        let pos = recent
            .iter()
            .position(|e| {
                e.as_ref()
                    .is_some_and(|e| e.limiter == limiter && *e.name == **name)
            })
            .unwrap_or(WAYS - 1);
        recent[..=pos].rotate_right(1);
        recent[0] = Some(Entry {
            limiter,
            name: name.clone(),
            id,
        });
    });
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

    #[test]
    fn remembers_the_last_few_per_limiter() {
        let names: Vec<Arc<str>> = ["a", "b", "c", "d", "e"].map(Arc::from).to_vec();
        for (i, name) in names.iter().enumerate() {
            remember(7, name, id(i as u32));
        }
        assert_eq!(find(7, "a"), None, "pushed out by the fifth");
        assert_eq!(find(7, "e"), Some(id(4)));
        assert_eq!(find(7, "b"), Some(id(1)));
        assert_eq!(find(8, "e"), None, "another limiter");
        remember(7, &names[1], id(9));
        assert_eq!(find(7, "b"), Some(id(9)), "replaced, not duplicated");
        assert_eq!(find(7, "c"), Some(id(2)));
    }
}
