//! The write-behind thread.
//!
//! The hot path never talks to it: acquisitions only flag the limits they
//! change (see `Registry::touch`). Each `flush_interval` the writer picks up
//! definitions other processes committed, then writes the flagged limits' slot
//! state in one transaction, so any acquisition rate costs at most one
//! transaction per interval. The channel carries only `flush()` requests and
//! the stop signal.

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::{schema, Persist};
use crate::limiter::deliver;
use crate::waiters::Wakes;
use crate::Error;

pub(crate) enum Msg {
    /// Write everything now and say how it went.
    Flush(Sender<Result<(), Error>>),
    /// Write everything, then end.
    Stop,
}

pub(crate) fn spawn(
    persist: Arc<Persist>,
    interval: Duration,
) -> std::io::Result<(Sender<Msg>, JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let handle = thread::Builder::new()
        .name("turnstile-writer".into())
        .spawn(move || run(&persist, &rx, interval))?;
    Ok((tx, handle))
}

fn run(persist: &Persist, rx: &Receiver<Msg>, interval: Duration) {
    loop {
        match rx.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {
                // Nobody to tell: a failed sweep is retried next tick, and
                // reported by the next flush().
                let _ = sync(persist);
            }
            Ok(Msg::Flush(ack)) => {
                let _ = ack.send(sync(persist));
            }
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                let _ = sync(persist);
                let db = persist.db.lock();
                let _ = schema::set_owner_pid(&db.conn, None);
                // Leave no -wal behind for the next reader.
                let _ = db.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
                drop(db);
                return;
            }
        }
    }
}

/// Picks up other processes' definitions, then saves changed slot state.
fn sync(persist: &Persist) -> Result<(), Error> {
    let mut wakes = Wakes::new();
    let mut db = persist.db.lock();
    let synced = db
        .pull(&persist.state, &mut wakes)
        .and_then(|()| db.save(&persist.state));
    // The wakers after every lock: a task run by its waker may need the store.
    drop(db);
    deliver(wakes);
    synced.map(drop)
}
