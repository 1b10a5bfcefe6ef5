//! The SQLite store's costs (issue 5, cases 2 and 8; issue 3's speed claims):
//!
//! * case 2: uncontended one-name acquisition + release with a store open
//!   (write-behind, default `flush_interval`) beside the same on an
//!   in-memory limiter, in the same criterion groups;
//! * case 8a: opening a store that holds 100,000 limits (`Limiter::open`
//!   alone, and `Limiter::open` + drop, since dropping flushes, clears the
//!   owner and checkpoints the WAL);
//! * case 8b: the writer's transactions per `flush_interval` under a
//!   saturating acquisition loop, counted from outside the library: the
//!   commit frames SQLite appends to the store's `-wal` file (read as
//!   SQLite's file format describes it, checksums verified), cross-checked
//!   by `PRAGMA data_version` on a second connection.
//!
//! After the groups, the binary reads criterion's medians back and prints a
//! summary table of ratios against the issues' targets (also saved as
//! `target/criterion/turnstile-summary-store.md`).

mod common;

use std::cell::OnceCell;
use std::fs::{self, File};
use std::hint::black_box;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{BenchmarkId, Criterion, SamplingMode};
use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags};
use turnstile::{LimitConfig, Limiter};

use common::{fmt_ns, Cli, Results, Table, Target};

/// The default `flush_interval` (API.md: 100 ms); the limiters here leave it
/// unset.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "turnstile-bench-{what}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
        ));
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Gives `limiter` the limits of the hot-path groups: "a" (1 slot) and "r"
/// (a rate limit with room for ever).
fn hot_limits(limiter: &Limiter) {
    limiter.create_limit("a", LimitConfig::new(1)).unwrap();
    limiter
        .create_limit("r", LimitConfig::new(u32::MAX).slot_decay_per_second(1e9))
        .unwrap();
}

fn assert_idle(limiter: &Limiter, name: &str) {
    let info = limiter.limit(name).unwrap();
    assert_eq!((info.held_slots, info.waiters), (0, 0), "{name}");
}

// ---------------------------------------------------------------------------
// Case 2: the hot path with a store open
// ---------------------------------------------------------------------------

fn with_store(c: &mut Criterion) {
    let dir = TempDir::new("hot");
    let stored = Limiter::builder().path(dir.path("hot.db")).build().unwrap();
    let in_memory = Limiter::in_memory();
    let limiters = [("in_memory", &in_memory), ("with_store", &stored)];
    for (_, limiter) in limiters {
        hot_limits(limiter);
    }

    let mut group = c.benchmark_group("store_try");
    for (id, limiter) in limiters {
        group.bench_function(id, |b| {
            b.iter(|| {
                let guard = limiter
                    .concurrency(black_box("a"), 1)
                    .try_acquire()
                    .unwrap()
                    .expect("free");
                black_box(guard.release())
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("store_blocking");
    for (id, limiter) in limiters {
        group.bench_function(id, |b| {
            b.iter(|| {
                let guard = limiter.concurrency(black_box("a"), 1).acquire().unwrap();
                black_box(guard.release())
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("store_rate_limit_try");
    for (id, limiter) in limiters {
        group.bench_function(id, |b| {
            b.iter(|| assert!(limiter.rate_limit(black_box("r"), 1).try_acquire().unwrap()))
        });
    }
    group.finish();

    for (_, limiter) in limiters {
        assert_idle(limiter, "a");
    }
    stored.flush().unwrap();
}

// ---------------------------------------------------------------------------
// Case 8a: opening a store of 100,000 limits
// ---------------------------------------------------------------------------

const STORED: usize = 100_000;

/// A store of `STORED` limits, built through the library: three in four are
/// concurrency limits of 8 slots, every fourth a rate limit (0.5 slots/s)
/// with one decaying slot, so that opening also drains decaying state. Every
/// limit has a slot-state row (the library writes one for each).
struct Stored {
    _dir: TempDir,
    path: PathBuf,
    /// Creating the limits: `create_limit` each, each committed.
    created_in: Duration,
    /// Taking a rate-limit slot on every fourth limit, then `flush()`.
    filled_in: Duration,
    slot_rows: i64,
}

impl Stored {
    fn build() -> Stored {
        let dir = TempDir::new("open");
        let path = dir.path("100k.db");
        let names: Vec<String> = (0..STORED).map(|i| format!("limit-{i:07}")).collect();
        let limiter = Limiter::open(&path).unwrap();
        let start = Instant::now();
        for (i, name) in names.iter().enumerate() {
            let config = if i % 4 == 0 {
                LimitConfig::new(8).slot_decay_per_second(0.5)
            } else {
                LimitConfig::new(8)
            };
            limiter.create_limit(name, config).unwrap();
        }
        let created_in = start.elapsed();
        let start = Instant::now();
        for name in names.iter().step_by(4) {
            assert!(limiter.rate_limit(name.as_str(), 1).try_acquire().unwrap());
        }
        limiter.flush().unwrap();
        let filled_in = start.elapsed();
        drop(limiter);

        let reopened = Limiter::open(&path).unwrap();
        assert_eq!(reopened.limits().len(), STORED);
        assert!(reopened.limit(&names[0]).unwrap().active_slots > 0);
        drop(reopened);
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let slot_rows = conn
            .query_row("SELECT count(*) FROM slot_state", [], |r| r.get(0))
            .unwrap();
        Stored {
            _dir: dir,
            path,
            created_in,
            filled_in,
            slot_rows,
        }
    }
}

fn store_open(c: &mut Criterion) -> Option<(Duration, Duration, i64)> {
    // Built on first use only, so that a filtered run skips it.
    let stored = OnceCell::new();
    let get = || stored.get_or_init(Stored::build);
    let mut group = c.benchmark_group("store_open");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(3));
    group.bench_function(BenchmarkId::new("open", STORED), |b| {
        let path = &get().path;
        b.iter_custom(|iters| {
            let mut opening = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let limiter = Limiter::open(path).unwrap();
                opening += start.elapsed();
                drop(black_box(limiter));
            }
            opening
        })
    });
    group.bench_function(BenchmarkId::new("open_drop", STORED), |b| {
        let path = &get().path;
        b.iter(|| drop(black_box(Limiter::open(path).unwrap())))
    });
    group.finish();
    stored
        .get()
        .map(|s| (s.created_in, s.filled_in, s.slot_rows))
}

// ---------------------------------------------------------------------------
// Case 8b: writer transactions per flush_interval
// ---------------------------------------------------------------------------

/// Counts the transactions committed to an SQLite database in WAL mode by
/// reading its `-wal` file as SQLite's file format documents it: a 32-byte
/// header (magic, page size, salts, checksum), then frames of a 24-byte
/// header and one page; a frame whose "database size" field is not zero
/// ends a transaction (a commit). Frames count only while their salts match
/// the header's and their cumulative checksums verify, so a frame still
/// being written is not counted until it is whole. A checkpoint that
/// restarts the log changes the salts; the frames of the new generation all
/// came after the previous look (polled every few ms, far more often than
/// the log restarts).
struct WalCommits {
    wal: PathBuf,
    /// The generation followed: the header's salts.
    salt: Option<[u8; 8]>,
    /// Just past the last commit frame counted, and the checksum there.
    offset: u64,
    chain: (u32, u32),
    commits: u64,
}

const WAL_MAGIC_LE: u32 = 0x377f_0682;
const WAL_MAGIC_BE: u32 = 0x377f_0683;

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

/// SQLite's WAL checksum over `data` (a multiple of 8 bytes), continuing
/// from `(s0, s1)`, reading 32-bit words big- or little-endian as the
/// header's magic says.
fn wal_checksum((mut s0, mut s1): (u32, u32), data: &[u8], big_endian: bool) -> (u32, u32) {
    let word = |b: &[u8]| {
        let b: [u8; 4] = b.try_into().expect("4 bytes");
        if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    for pair in data.chunks_exact(8) {
        s0 = s0.wrapping_add(word(&pair[..4]).wrapping_add(s1));
        s1 = s1.wrapping_add(word(&pair[4..]).wrapping_add(s0));
    }
    (s0, s1)
}

impl WalCommits {
    fn new(store: &Path) -> WalCommits {
        let mut wal = store.as_os_str().to_owned();
        wal.push("-wal");
        WalCommits {
            wal: wal.into(),
            salt: None,
            offset: 0,
            chain: (0, 0),
            commits: 0,
        }
    }

    /// Counts the commits appended since the last look; returns the total.
    fn poll(&mut self) -> u64 {
        let Ok(mut file) = File::open(&self.wal) else {
            return self.commits;
        };
        let mut header = [0u8; 32];
        if file.read_exact(&mut header).is_err() {
            return self.commits; // empty (just truncated): no frames
        }
        let big_endian = match be32(&header[0..]) {
            WAL_MAGIC_BE => true,
            WAL_MAGIC_LE => false,
            _ => return self.commits,
        };
        let page_size = match be32(&header[8..]) {
            1 => 65536,
            n => n as usize,
        };
        let salt: [u8; 8] = header[16..24].try_into().expect("8 bytes");
        if self.salt != Some(salt) {
            // A new generation (or the first look): start at its first frame.
            let expected = wal_checksum((0, 0), &header[..24], big_endian);
            if expected != (be32(&header[24..]), be32(&header[28..])) {
                return self.commits; // the header is being written
            }
            self.salt = Some(salt);
            self.offset = 32;
            self.chain = expected;
        }
        let mut rest = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_err() || file.read_to_end(&mut rest).is_err()
        {
            return self.commits;
        }
        let frame_len = 24 + page_size;
        let (mut pos, mut chain) = (0, self.chain);
        while pos + frame_len <= rest.len() {
            let frame = &rest[pos..pos + frame_len];
            if frame[8..16] != salt {
                break;
            }
            chain = wal_checksum(chain, &frame[..8], big_endian);
            chain = wal_checksum(chain, &frame[24..], big_endian);
            if chain != (be32(&frame[16..]), be32(&frame[20..])) {
                break;
            }
            pos += frame_len;
            if be32(&frame[4..]) != 0 {
                self.commits += 1;
                self.offset += pos as u64;
                self.chain = chain;
                rest.drain(..pos);
                pos = 0;
            }
        }
        self.commits
    }
}

/// Both counters of a store's commits, polled every 2 ms by a thread.
struct Watcher {
    counts: Arc<Mutex<Counts>>,
    stop: Arc<AtomicBool>,
    poller: Option<thread::JoinHandle<()>>,
}

struct Counts {
    wal: WalCommits,
    /// A second connection: its `PRAGMA data_version` changes whenever
    /// another connection has committed since it last asked.
    conn: Connection,
    last_version: i64,
    version_changes: u64,
}

impl Counts {
    fn poll(&mut self) -> (u64, u64) {
        let commits = self.wal.poll();
        let version: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .expect("data_version");
        if version != self.last_version {
            self.last_version = version;
            self.version_changes += 1;
        }
        (commits, self.version_changes)
    }
}

impl Watcher {
    fn new(store: &Path) -> Watcher {
        let conn = Connection::open_with_flags(store, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("second connection");
        let last_version = conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .expect("data_version");
        let mut wal = WalCommits::new(store);
        wal.poll();
        let counts = Arc::new(Mutex::new(Counts {
            wal,
            conn,
            last_version,
            version_changes: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let poller = {
            let (counts, stop) = (counts.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    counts.lock().poll();
                    thread::sleep(Duration::from_millis(2));
                }
            })
        };
        Watcher {
            counts,
            stop,
            poller: Some(poller),
        }
    }

    /// (WAL commits, data_version changes) so far.
    fn now(&self) -> (u64, u64) {
        self.counts.lock().poll()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(p) = self.poller.take() {
            let _ = p.join();
        }
    }
}

/// The counters agree with what they count: `flush()` after a change is
/// exactly one transaction. Else the figures below would mean nothing.
fn check_the_counters() {
    let dir = TempDir::new("count-check");
    let path = dir.path("check.db");
    let limiter = Limiter::builder()
        .path(&path)
        .flush_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    limiter.create_limit("a", LimitConfig::new(1)).unwrap();
    limiter.flush().unwrap();
    let watcher = Watcher::new(&path);
    let before = watcher.now();
    const ROUNDS: u64 = 20;
    for _ in 0..ROUNDS {
        drop(
            limiter
                .concurrency("a", 1)
                .try_acquire()
                .unwrap()
                .expect("free"),
        );
        limiter.flush().unwrap();
        // Let the poller see each commit on its own.
        thread::sleep(Duration::from_millis(10));
    }
    let after = watcher.now();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (ROUNDS, ROUNDS),
        "{ROUNDS} flushes after a change: (WAL commits, data_version changes)"
    );
}

/// One phase's figures.
struct Phase {
    what: String,
    commits: u64,
    version_changes: u64,
    intervals: f64,
    ops: u64,
}

/// Runs `work` for `run_for` (it loops until told to stop and returns its
/// operation count) and counts the store's commits meanwhile.
fn phase(
    watcher: &Watcher,
    what: &str,
    run_for: Duration,
    work: impl FnOnce(&AtomicBool) -> u64 + Send,
) -> Phase {
    let stop = AtomicBool::new(false);
    let before = watcher.now();
    let start = Instant::now();
    let ops = thread::scope(|s| {
        let worker = s.spawn(|| work(&stop));
        thread::sleep(run_for);
        stop.store(true, Ordering::Relaxed);
        worker.join().expect("worker")
    });
    let elapsed = start.elapsed();
    let after = watcher.now();
    Phase {
        what: what.to_string(),
        commits: after.0 - before.0,
        version_changes: after.1 - before.1,
        intervals: elapsed.as_secs_f64() / FLUSH_INTERVAL.as_secs_f64(),
        ops,
    }
}

const SPREAD: usize = 1000;
const SATURATE: Duration = Duration::from_secs(3);

fn writer_transactions() -> Vec<Phase> {
    check_the_counters();

    let dir = TempDir::new("transactions");
    let path = dir.path("tx.db");
    let limiter = Limiter::builder().path(&path).build().unwrap();
    limiter.create_limit("a", LimitConfig::new(1)).unwrap();
    let spread: Vec<String> = (0..SPREAD).map(|i| format!("n{i:04}")).collect();
    for name in &spread {
        limiter.create_limit(name, LimitConfig::new(1)).unwrap();
    }
    limiter.flush().unwrap();
    let watcher = Watcher::new(&path);

    let loop_on = |names: &[String], stop: &AtomicBool| {
        let mut ops = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let name = &names[ops as usize % names.len()];
            let guard = limiter
                .concurrency(name.as_str(), 1)
                .try_acquire()
                .unwrap()
                .expect("free");
            black_box(guard.release());
            ops += 1;
        }
        ops
    };
    let one = [String::from("a")];
    let phases = vec![
        phase(
            &watcher,
            "idle (no acquisitions)",
            Duration::from_secs(1),
            |_| 0,
        ),
        phase(
            &watcher,
            "saturating try_acquire + release loop, one name",
            SATURATE,
            |stop| loop_on(&one, stop),
        ),
        phase(
            &watcher,
            &format!("saturating loop over {SPREAD} names"),
            SATURATE,
            |stop| loop_on(&spread, stop),
        ),
    ];
    drop(watcher);
    assert_idle(&limiter, "a");
    phases
}

// ---------------------------------------------------------------------------

fn main() {
    let since = SystemTime::now();
    let cli = Cli::parse();
    let mut c = common::criterion();
    with_store(&mut c);
    let stored = store_open(&mut c);
    c.final_summary();
    if !cli.measure {
        return;
    }

    let r = Results::since(since);
    let m = |group: &str, id: &str| r.median_ns(group, id);
    let mut t = Table::default();
    for (case, group, target) in [
        (
            "2. try_acquire + release: with a store vs in memory",
            "store_try",
            Target::AtMost(1.2),
        ),
        (
            "2. blocking acquire + release: with a store vs in memory",
            "store_blocking",
            Target::AtMost(1.2),
        ),
        (
            "2. rate_limit try (room): with a store vs in memory",
            "store_rate_limit_try",
            Target::None,
        ),
    ] {
        t.times(
            case,
            ("store", m(group, "with_store")),
            ("memory", m(group, "in_memory")),
            target,
        );
    }
    let open = m("store_open", &format!("open/{STORED}"));
    let open_drop = m("store_open", &format!("open_drop/{STORED}"));
    t.times(
        "8. open a store of 100,000 limits: Limiter::open alone (drop untimed)",
        ("", open),
        ("", None),
        Target::OursAtMost(1e9),
    );
    t.times(
        "8. same: Limiter::open + drop (drop flushes, clears the owner, checkpoints the WAL)",
        ("", open_drop),
        ("", None),
        Target::OursAtMost(1e9),
    );
    let mut extra = String::new();
    if let Some((created, filled, slot_rows)) = stored {
        t.times(
            &format!(
                "8. creating those 100,000 limits (create_limit, one commit each; {} per limit)",
                fmt_ns(created.as_nanos() as f64 / STORED as f64)
            ),
            ("", Some(created.as_nanos() as f64)),
            ("", None),
            Target::None,
        );
        extra += &format!(
            "\nThe 100,000-limit store: 3 in 4 concurrency limits (8 slots), every 4th a rate \
             limit (0.5/s) holding one decaying slot; {slot_rows} slot-state rows. Creating \
             the limits took {}; taking the 25,000 rate-limit slots and flush(), {}.\n",
            fmt_ns(created.as_nanos() as f64),
            fmt_ns(filled.as_nanos() as f64)
        );
    }

    if cli.wants("writer_transactions") {
        let phases = writer_transactions();
        extra += &format!(
            "\n## 8. Writer transactions, flush_interval {} ms (default), counted from the WAL's \
             commit frames; data_version changes seen by a second connection polled every 2 ms beside\n\n\
             | phase | intervals | transactions (WAL) | data_version changes | per interval | acquisitions |\n\
             |---|---|---|---|---|---|\n",
            FLUSH_INTERVAL.as_millis()
        );
        for p in &phases {
            t.counts(
                &format!("8. writer transactions per flush_interval: {}", p.what),
                ("transactions", Some(p.commits as f64)),
                ("intervals", Some(p.intervals)),
                Target::AtMost(2.0),
            );
            extra += &format!(
                "| {} | {:.1} | {} | {} | {:.2} | {} |\n",
                p.what,
                p.intervals,
                p.commits,
                p.version_changes,
                p.commits as f64 / p.intervals,
                p.ops
            );
        }
    }

    let mut text = t.render("turnstile store: cases 2 and 8 (medians; ratios from this run)");
    text += &extra;
    println!("{text}");
    if let Some(path) = common::save("store", &text) {
        println!("(saved to {})", path.display());
    }
}
