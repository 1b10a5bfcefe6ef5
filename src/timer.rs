//! One lazily started timer thread for async waits, so that timeouts and
//! decay waits work under any executor (or none but `block_on`).

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::task::Waker;
use std::thread;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

/// A registered wake-up, to cancel it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct TimerKey {
    at: Instant,
    seq: u64,
}

#[derive(Default)]
struct Deadlines {
    due: BTreeMap<TimerKey, Waker>,
    seq: u64,
}

pub(crate) struct Timer {
    deadlines: Mutex<Deadlines>,
    changed: Condvar,
}

/// The process's timer, started on first use.
pub(crate) fn timer() -> &'static Timer {
    static TIMER: OnceLock<&'static Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let timer: &'static Timer = Box::leak(Box::new(Timer {
            deadlines: Mutex::new(Deadlines::default()),
            changed: Condvar::new(),
        }));
        thread::Builder::new()
            .name("turnstile-timer".into())
            .spawn(move || timer.run())
            .expect("spawn the turnstile timer thread");
        timer
    })
}

impl Timer {
    /// Wakes `waker` at `at` (or a little after).
    pub fn register(&self, at: Instant, waker: Waker) -> TimerKey {
        let mut d = self.deadlines.lock();
        d.seq += 1;
        let key = TimerKey { at, seq: d.seq };
        let earliest = d.due.keys().next().is_none_or(|first| key < *first);
        d.due.insert(key, waker);
        if earliest {
            self.changed.notify_one();
        }
        key
    }

    /// Forgets a registered wake-up. Its waker is dropped after the lock:
    /// it may be the last clone of its task's, whose drop may drop another
    /// future, which cancels its own wake-up here.
    pub fn cancel(&self, key: TimerKey) {
        let waker = self.deadlines.lock().due.remove(&key);
        drop(waker);
    }

    fn run(&self) {
        let mut d = self.deadlines.lock();
        loop {
            let now = Instant::now();
            let mut fired = Vec::new();
            while let Some(entry) = d.due.first_entry() {
                if entry.key().at > now {
                    break;
                }
                fired.push(entry.remove());
            }
            if !fired.is_empty() {
                // Wake outside the lock: a waker may run the task inline.
                parking_lot::MutexGuard::unlocked(&mut d, || {
                    fired.into_iter().for_each(Waker::wake)
                });
                continue;
            }
            match d.due.keys().next() {
                Some(first) => {
                    let at = first.at;
                    self.changed.wait_until(&mut d, at);
                }
                None => self.changed.wait(&mut d),
            }
        }
    }
}
