//! This process's waiters on the server's queues, by ticket: the keeper
//! wakes exactly the one a notification names. Wakers are cloned and
//! dropped outside the lock (a waker may own a task, and its drop may come
//! back here).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Waker;
use std::thread::Thread;

use parking_lot::Mutex;

/// How to wake one waiter.
#[derive(Clone)]
pub(crate) enum How {
    Thread(Thread),
    Task(Waker),
}

impl How {
    fn wake(self) {
        match self {
            How::Thread(t) => t.unpark(),
            How::Task(w) => w.wake(),
        }
    }
}

/// Notifications kept for tickets not registered yet (the grant can reach
/// the keeper before the call that queued the waiter returns): a bounded
/// memory, the oldest forgotten first.
const MAILBOX: usize = 4096;

#[derive(Default)]
pub(crate) struct Waits {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_ticket: HashMap<i64, (Arc<AtomicBool>, How)>,
    mailbox: HashSet<i64>,
    order: VecDeque<i64>,
    /// Grants told by notification (ticket to hold; 0: nothing held), kept
    /// until their waiter takes them. Bounded as the mailbox is.
    grants: HashMap<i64, i64>,
    /// Counts `wake_all`s: a waiter that queued before one and registers
    /// after it may have missed both its notification and the wake-up.
    generation: u64,
}

impl Waits {
    /// The count of `wake_all`s so far, read before a waiter's ticket is
    /// taken.
    pub fn generation(&self) -> u64 {
        self.inner.lock().generation
    }

    /// Registers (or re-registers, with a new waker) the waiter of `ticket`,
    /// queued when the count of `wake_all`s was `since`; its flag is set if
    /// a notification or a `wake_all` came first. Returns the waker it
    /// replaces, for the caller to drop.
    #[must_use]
    pub fn register(
        &self,
        ticket: i64,
        since: u64,
        flag: &Arc<AtomicBool>,
        how: How,
    ) -> Option<How> {
        let mut inner = self.inner.lock();
        if inner.mailbox.remove(&ticket) || inner.generation != since {
            flag.store(true, Ordering::SeqCst);
        }
        inner
            .by_ticket
            .insert(ticket, (flag.clone(), how))
            .map(|(_, old)| old)
    }

    /// Forgets the waiter of `ticket`; returns its waker, for the caller to
    /// drop.
    #[must_use]
    pub fn unregister(&self, ticket: i64) -> Option<How> {
        let mut inner = self.inner.lock();
        inner.mailbox.remove(&ticket);
        inner.grants.remove(&ticket);
        inner.by_ticket.remove(&ticket).map(|(_, how)| how)
    }

    /// The grant told for `ticket` by notification, if any: its hold.
    pub fn take_grant(&self, ticket: i64) -> Option<i64> {
        self.inner.lock().grants.remove(&ticket)
    }

    /// A notification for `ticket` (with its grant's hold, if it tells
    /// one): wakes its waiter, or keeps it for when it registers.
    pub fn notify(&self, ticket: i64, grant: Option<i64>) {
        let how = {
            let mut inner = self.inner.lock();
            if let Some(hold) = grant {
                inner.grants.insert(ticket, hold);
            }
            match inner.by_ticket.get(&ticket) {
                Some((flag, how)) => {
                    flag.store(true, Ordering::SeqCst);
                    Some(how.clone())
                }
                None => {
                    if inner.mailbox.insert(ticket) {
                        inner.order.push_back(ticket);
                        while inner.order.len() > MAILBOX {
                            if let Some(old) = inner.order.pop_front() {
                                inner.mailbox.remove(&old);
                                inner.grants.remove(&old);
                            }
                        }
                    }
                    None
                }
            }
        };
        if let Some(how) = how {
            how.wake();
        }
    }

    /// Wakes every waiter to look again (notifications may have been lost:
    /// a reconnection, a lost session, the limiter stopping).
    pub fn wake_all(&self) {
        let all: Vec<How> = {
            let mut inner = self.inner.lock();
            inner.generation += 1;
            inner
                .by_ticket
                .values()
                .map(|(flag, how)| {
                    flag.store(true, Ordering::SeqCst);
                    how.clone()
                })
                .collect()
        };
        for how in all {
            how.wake();
        }
    }
}
