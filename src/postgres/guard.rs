//! A guard's hold on the server: given back on drop (sent in the
//! background) or by `release()` (waited for), unless its lease was lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{Inner, Job};

/// One hold of one guard.
#[derive(Debug)]
pub(crate) struct Hold {
    pub client: i64,
    /// The server's hold (0: nothing held: only inactive or skipped limits).
    pub hold: i64,
    /// Set by the keeper when the lease is lost.
    pub lost: Arc<AtomicBool>,
    /// The limits named, for `Event::Released`.
    pub names: Vec<String>,
}

impl Hold {
    /// Lost: the keeper said so, or the lease ran out without a renewal
    /// (counted from when the last one was sent, never later than the
    /// server counts), or the client it belongs to is gone.
    pub fn is_lost(&self, inner: &Inner) -> bool {
        if self.hold == 0 {
            return false;
        }
        if self.lost.load(Ordering::SeqCst) {
            return true;
        }
        let session = inner.session.lock();
        session.id != self.client || session.renewed.is_none_or(|at| at.elapsed() >= inner.lease)
    }

    /// Gives the hold back; the names given back to, for the event, unless
    /// nothing was held or the hold was lost.
    pub fn give_back(self, inner: &Inner, wait: bool) -> Option<Vec<String>> {
        if self.hold == 0 {
            return None;
        }
        let tracked = inner.holds.lock().remove(&self.hold).is_some();
        if !tracked || self.is_lost(inner) {
            return None;
        }
        if wait {
            inner.release_now(self.client, self.hold);
        } else {
            inner.send(Job::Release {
                client: self.client,
                hold: self.hold,
            });
        }
        Some(self.names)
    }
}
