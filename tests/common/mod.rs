//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Runs `body` on its own thread and fails the test if it has not finished
/// within `limit`, so a deadlock fails instead of hanging CI.
pub fn watchdog<T: Send + 'static>(
    limit: Duration,
    body: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let out = body();
        let _ = tx.send(());
        out
    });
    match rx.recv_timeout(limit) {
        Ok(()) => handle.join().expect("test body panicked"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(_) => unreachable!("body finished without signalling"),
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("watchdog: test body did not finish within {limit:?} (deadlock?)")
        }
    }
}

/// The default watchdog bound: generous, so that only a real hang trips it.
pub const WATCHDOG: Duration = Duration::from_secs(30);

/// Polls `cond` until it holds or `limit` passes; returns whether it held.
/// For waiting on another thread to reach a state (e.g. to be queued), never
/// for asserting speed.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
    cond()
}
