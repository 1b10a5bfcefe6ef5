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
}

impl Waits {
    /// Registers (or re-registers, with a new waker) the waiter of `ticket`;
    /// its flag is set if a notification came first. Returns the waker it
    /// replaces, for the caller to drop.
    #[must_use]
    pub fn register(&self, ticket: i64, flag: &Arc<AtomicBool>, how: How) -> Option<How> {
        let mut inner = self.inner.lock();
        if inner.mailbox.remove(&ticket) {
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
        inner.by_ticket.remove(&ticket).map(|(_, how)| how)
    }

    /// A notification for `ticket`: wakes its waiter, or keeps it for when
    /// it registers.
    pub fn notify(&self, ticket: i64) {
        let how = {
            let mut inner = self.inner.lock();
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
            let inner = self.inner.lock();
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
