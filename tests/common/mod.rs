//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod kids;
pub mod pg;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Waits (10 s at most) until `n` acquisitions wait on limit `name` of
/// `l`, and fails the test with what it saw otherwise.
pub fn queued(l: &turnstile::Limiter, name: &str, n: usize) {
    assert!(
        eventually(Duration::from_secs(10), || l
            .limit(name)
            .is_some_and(|i| i.waiters == n)),
        "{name}: not {n} waiters: {:?}",
        l.limit(name)
    );
}

/// Seconds since 1970 on this machine's wall clock.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the test machine's clock is after 1970")
        .as_secs_f64()
}

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

/// xorshift64*: a small deterministic generator, so that a failing run can
/// be repeated from its printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A seed from the environment variable `var` if it is set (to repeat a
/// run), else from the clock.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(clock_seed)
}

/// Nanoseconds of the wall clock: a seed that differs from run to run.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// A unique directory under the system temp dir, removed on drop.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "turnstile-{prefix}-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            clock_seed() % 1_000_000_007
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A read-only look at a store that leaves its WAL as a crash left it (no
/// checkpoint when it closes), so that the next owner still meets the
/// crashed state.
pub fn inspect_store(path: &std::path::Path) -> rusqlite::Connection {
    use rusqlite::{config::DbConfig, Connection, OpenFlags};
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open the store to inspect it");
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .expect("no checkpoint on close");
    conn.pragma_update(None, "query_only", true)
        .expect("query_only");
    conn
}

/// What `PRAGMA integrity_check` says ("ok" when sound).
pub fn integrity_check(conn: &rusqlite::Connection) -> String {
    let rows: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    rows.join("\n")
}
