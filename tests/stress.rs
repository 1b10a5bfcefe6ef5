//! The invariant stress test: random weighted multi-limit acquisitions from
//! several threads; shadow counters prove that no limit is ever
//! over-committed, and at the end nothing is held and nobody waits.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{eventually, watchdog, WATCHDOG};
use parking_lot::RwLock;
use turnstile::{ConcurrencyGuard, Error, LimitConfig, LimitUpdate, Limiter};

const NAMES: [&str; 4] = ["l0", "l1", "l2", "l3"];
const THREADS: u64 = 5;
const OPS_PER_THREAD: usize = 4000;

/// xorshift64*: deterministic per seed, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What the workers check against, per limit.
struct Shadow {
    /// Slots held by guards, counted after the acquire returned and
    /// uncounted before the guard drops; so never more than the library's
    /// held slots.
    held: [AtomicU32; 4],
    /// An upper bound on the library's held slots at every instant: the
    /// limit, raised before the limit is raised and lowered only once the
    /// library's held slots drained below the new limit.
    ceiling: [AtomicU32; 4],
    /// Taken for reading around a (count, check) pair; for writing to change
    /// a ceiling, so that no check straddles a change.
    lock: RwLock<()>,
    /// Successful acquisitions, timeouts, retries exhausted, exceeds.
    outcomes: [AtomicU64; 4],
}

impl Shadow {
    fn new(limits: [u32; 4]) -> Shadow {
        Shadow {
            held: Default::default(),
            ceiling: limits.map(AtomicU32::new),
            lock: RwLock::new(()),
            outcomes: Default::default(),
        }
    }
}

fn pick_names(rng: &mut Rng) -> Vec<usize> {
    loop {
        let mask = rng.below(16);
        if mask == 0 {
            continue;
        }
        let mut picked: Vec<usize> = (0..4).filter(|i| mask & (1 << i) != 0).collect();
        // Random order: the library must not care.
        for i in (1..picked.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            picked.swap(i, j);
        }
        // Sometimes a duplicate, which counts once.
        if rng.chance(10) {
            let d = picked[0];
            picked.push(d);
        }
        return picked;
    }
}

/// One worker: `OPS_PER_THREAD` random acquisitions.
fn worker(limiter: Limiter, shadow: Arc<Shadow>, seed: u64, limits_change: bool) {
    let mut rng = Rng::new(seed);
    for op in 0..OPS_PER_THREAD {
        let picked = pick_names(&mut rng);
        let names: Vec<&str> = picked.iter().map(|&i| NAMES[i]).collect();
        let mut distinct = picked.clone();
        distinct.sort_unstable();
        distinct.dedup();
        // Mostly an occupy that can fit; now and then one that may not.
        let smallest = distinct
            .iter()
            .map(|&i| shadow.ceiling[i].load(Ordering::SeqCst))
            .min()
            .unwrap()
            .clamp(1, 2);
        let occupy = if rng.chance(90) {
            1 + rng.below(u64::from(smallest)) as u32
        } else {
            1 + rng.below(2) as u32
        };
        let builder = limiter.concurrency(names.clone(), occupy);
        let mode = rng.below(10);
        let result: Result<Option<ConcurrencyGuard>, Error> = match mode {
            0..=2 => builder
                .timeout(Duration::from_micros(rng.below(5_000)))
                .acquire()
                .map(Some),
            3 | 4 => builder.try_acquire(),
            5 => builder.timeout(Duration::ZERO).acquire().map(Some),
            6 => builder
                .max_retries(rng.below(4) as u32)
                .timeout(Duration::from_millis(20))
                .acquire()
                .map(Some),
            7 => builder.max_retries(rng.below(3) as u32).acquire().map(Some),
            // Wait as long as it takes: progress is part of the contract.
            _ => builder.acquire().map(Some),
        };
        let guard = match result {
            Ok(Some(g)) => g,
            Ok(None) => continue,
            Err(Error::Timeout { .. }) => {
                shadow.outcomes[1].fetch_add(1, Ordering::Relaxed);
                assert!(mode <= 6, "timeout without a timeout (mode {mode})");
                continue;
            }
            Err(Error::RetriesExhausted { .. }) => {
                shadow.outcomes[2].fetch_add(1, Ordering::Relaxed);
                assert!(
                    matches!(mode, 6 | 7),
                    "retries exhausted without max_retries"
                );
                continue;
            }
            Err(Error::OccupyExceedsLimit { .. }) => {
                shadow.outcomes[3].fetch_add(1, Ordering::Relaxed);
                if !limits_change {
                    let min = distinct
                        .iter()
                        .map(|&i| shadow.ceiling[i].load(Ordering::SeqCst))
                        .min()
                        .unwrap();
                    assert!(
                        occupy > min,
                        "OccupyExceedsLimit with occupy {occupy}, limits >= {min}"
                    );
                }
                continue;
            }
            Err(e) => panic!("unexpected error: {e}"),
        };
        shadow.outcomes[0].fetch_add(1, Ordering::Relaxed);
        {
            let _r = shadow.lock.read();
            for &i in &distinct {
                let now = shadow.held[i].fetch_add(occupy, Ordering::SeqCst) + occupy;
                let ceiling = shadow.ceiling[i].load(Ordering::SeqCst);
                assert!(
                    now <= ceiling,
                    "{}: {now} slots held by guards, limit {ceiling}",
                    NAMES[i]
                );
            }
            if op.is_multiple_of(32) {
                for &i in &distinct {
                    let info = limiter.limit(NAMES[i]).unwrap();
                    let ceiling = shadow.ceiling[i].load(Ordering::SeqCst);
                    assert!(
                        info.held_slots <= ceiling,
                        "{}: LimitInfo.held_slots {} > limit {ceiling}",
                        NAMES[i],
                        info.held_slots
                    );
                    assert!(
                        info.held_slots >= occupy,
                        "{}: my own slots are not counted",
                        NAMES[i]
                    );
                }
            }
        }
        match rng.below(4) {
            0 => {}
            1 => thread::yield_now(),
            2 => {
                for _ in 0..rng.below(2_000) {
                    std::hint::spin_loop();
                }
            }
            _ => thread::sleep(Duration::from_micros(rng.below(200))),
        }
        for &i in &distinct {
            shadow.held[i].fetch_sub(occupy, Ordering::SeqCst);
        }
        if rng.chance(50) {
            drop(guard);
        } else {
            guard.release();
        }
    }
}

fn check_quiet(limiter: &Limiter, limits: [u32; 4]) {
    for (i, name) in NAMES.iter().enumerate() {
        let info = limiter.limit(name).unwrap();
        assert_eq!(info.held_slots, 0, "{name}: slots still held at the end");
        assert_eq!(info.waiters, 0, "{name}: waiters still queued at the end");
        assert_eq!(info.active_slots, 0, "{name}");
        // The whole limit is free for a newcomer.
        let all = limiter.concurrency(*name, limits[i]).try_acquire().unwrap();
        assert!(
            all.is_some(),
            "{name}: the full limit cannot be taken at the end"
        );
    }
    let all = limiter.concurrency(NAMES, 1).try_acquire().unwrap();
    assert!(all.is_some());
}

fn run(seed: u64, limits: [u32; 4]) -> Arc<Shadow> {
    let limiter = Limiter::in_memory();
    for (name, limit) in NAMES.iter().zip(limits) {
        limiter.create_limit(name, LimitConfig::new(limit)).unwrap();
    }
    let shadow = Arc::new(Shadow::new(limits));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let l = limiter.clone();
            let s = Arc::clone(&shadow);
            thread::spawn(move || worker(l, s, seed * 1000 + t, false))
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    check_quiet(&limiter, limits);
    report(&shadow);
    shadow
}

fn report(shadow: &Shadow) {
    let [ok, timeout, exhausted, exceeds] = shadow
        .outcomes
        .each_ref()
        .map(|o| o.load(Ordering::Relaxed));
    eprintln!("acquired {ok}, timed out {timeout}, retries exhausted {exhausted}, occupy exceeds limit {exceeds}");
}

#[test]
fn random_multi_limit_acquisitions_keep_every_limit() {
    watchdog(WATCHDOG, || {
        let shadow = run(1, [1, 2, 3, 4]);
        let ok = shadow.outcomes[0].load(Ordering::Relaxed);
        assert!(ok > 1000, "only {ok} acquisitions succeeded");
        run(2, [2, 2, 1, 3]);
    });
}

/// The same while a control thread raises, lowers and pauses the limits.
/// Holders keep their slots when a limit is lowered, so the ceiling a worker
/// checks against is lowered only once the library's held slots have drained
/// below the new limit (newcomers wait until the limit has room, so they
/// stay below it from then on).
#[test]
fn random_acquisitions_while_limits_change() {
    watchdog(WATCHDOG, || {
        let start = [2, 2, 3, 4];
        let limiter = Limiter::in_memory();
        for (name, limit) in NAMES.iter().zip(start) {
            limiter.create_limit(name, LimitConfig::new(limit)).unwrap();
        }
        let shadow = Arc::new(Shadow::new(start));
        let done = Arc::new(AtomicBool::new(false));

        let control = {
            let l = limiter.clone();
            let s = Arc::clone(&shadow);
            let done = Arc::clone(&done);
            thread::spawn(move || {
                let mut rng = Rng::new(77);
                let mut changes = 0u32;
                while !done.load(Ordering::SeqCst) {
                    let i = rng.below(4) as usize;
                    let name = NAMES[i];
                    let new = if rng.chance(10) {
                        0
                    } else {
                        1 + rng.below(4) as u32
                    };
                    let old = s.ceiling[i].load(Ordering::SeqCst);
                    if new >= old {
                        {
                            let _w = s.lock.write();
                            s.ceiling[i].store(new, Ordering::SeqCst);
                        }
                        l.update_limit(name, LimitUpdate::new().limit(new)).unwrap();
                    } else {
                        l.update_limit(name, LimitUpdate::new().limit(new)).unwrap();
                        assert!(
                            eventually(Duration::from_secs(10), || {
                                l.limit(name).unwrap().held_slots <= new
                            }),
                            "{name}: held slots never drained below the lowered limit {new}"
                        );
                        let _w = s.lock.write();
                        let held = l.limit(name).unwrap().held_slots;
                        assert!(
                            held <= new,
                            "{name}: newcomers took slots above the lowered limit: {held} > {new}"
                        );
                        s.ceiling[i].store(new, Ordering::SeqCst);
                    }
                    changes += 1;
                    thread::sleep(Duration::from_micros(300 + rng.below(700)));
                }
                // Everything back to a generous limit so every waiter can finish.
                for (i, name) in NAMES.iter().enumerate() {
                    {
                        let _w = s.lock.write();
                        s.ceiling[i].store(4, Ordering::SeqCst);
                    }
                    l.update_limit(name, LimitUpdate::new().limit(4)).unwrap();
                }
                changes
            })
        };
        // The workers run a fixed number of operations; the control thread
        // keeps changing limits until they are done. A worker that waits
        // without a timeout on a paused limit is freed by a later change.
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let l = limiter.clone();
                let s = Arc::clone(&shadow);
                thread::spawn(move || worker(l, s, 5000 + t, true))
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        done.store(true, Ordering::SeqCst);
        let changes = control.join().unwrap();
        assert!(changes > 10, "only {changes} limit changes happened");
        check_quiet(&limiter, [4; 4]);
        report(&shadow);
        eprintln!("limit changes: {changes}");
        let ok = shadow.outcomes[0].load(Ordering::Relaxed);
        assert!(ok > 1000, "only {ok} acquisitions succeeded");
    });
}
