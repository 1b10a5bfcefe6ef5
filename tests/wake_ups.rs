//! A randomized check of the one-watcher wake-ups (from a review): random
//! acquisitions with and without retry budgets, releases, cancellations,
//! updates, resets, deletes and re-creations, with hand-polled futures whose
//! wakers raise a flag; only woken futures are polled. At the end every
//! guard is dropped and decay drains: every waiter must have been woken and
//! finished (a pending one is a lost wake-up).

mod common;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use common::{watchdog, Rng};
use turnstile::{
    AcquireFuture, ConcurrencyGuard, LimitConfig, LimitUpdate, Limiter, RateLimitFuture,
};

struct Flag(AtomicBool);
impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

enum Fut {
    C(AcquireFuture),
    R(RateLimitFuture),
}

struct Pending {
    fut: Fut,
    flag: Arc<Flag>,
    names: Vec<String>,
    desc: String,
    /// Epochs of its names when created, and whether each was quiet then.
    epochs: Vec<(u64, bool)>,
}

type Epochs = std::collections::HashMap<String, (u64, Instant)>;

fn disturb(e: &mut Epochs, n: &str) {
    let x = e.entry(n.to_string()).or_insert((0, Instant::now()));
    x.0 += 1;
    x.1 = Instant::now();
}

const LIMITS: [&str; 3] = ["a", "b", "c"];

fn poll(p: &mut Pending) -> Poll<Result<Option<ConcurrencyGuard>, turnstile::Error>> {
    p.flag.0.store(false, Ordering::SeqCst);
    let waker = Waker::from(p.flag.clone());
    let mut cx = Context::from_waker(&waker);
    match &mut p.fut {
        Fut::C(f) => Pin::new(f).poll(&mut cx).map(|r| r.map(Some)),
        Fut::R(f) => Pin::new(f).poll(&mut cx).map(|r| r.map(|()| None)),
    }
}

fn check_capacity(limiter: &Limiter, p: &Pending, e: &Epochs, ctx: &str, log: &[String]) {
    for (n, &(epoch, quiet)) in p.names.iter().zip(&p.epochs) {
        if !quiet || e.get(n).map(|x| x.0) != Some(epoch) {
            continue;
        }
        if let Some(info) = limiter.limit(n) {
            if info.active {
                assert!(
                    info.active_slots <= info.limit,
                    "{ctx}: over-admitted {n}: {info:?}\nlog: {log:#?}"
                );
            }
        }
    }
}

fn run(seed: u64, steps: usize) {
    let mut rng = Rng::new(seed);
    let limiter = Limiter::in_memory();
    let rates = [0.0, 20.0, 100.0];
    for n in LIMITS {
        let cfg = LimitConfig::new(1 + rng.below(3) as u32)
            .slot_decay_per_second(rates[rng.below(3) as usize]);
        limiter.create_limit(n, cfg).unwrap();
    }
    let mut pending: Vec<Pending> = Vec::new();
    let mut guards: Vec<ConcurrencyGuard> = Vec::new();
    let mut log: Vec<String> = Vec::new();
    let mut epochs = Epochs::new();
    for n in LIMITS {
        disturb(&mut epochs, n);
    }
    for step in 0..steps {
        let op = rng.below(100);
        let desc;
        if op < 35 {
            let mut names: Vec<String> = LIMITS
                .iter()
                .filter(|_| rng.chance(50))
                .map(|s| s.to_string())
                .collect();
            if names.is_empty() {
                names.push(LIMITS[rng.below(3) as usize].to_string());
            }
            let occupy = 1 + rng.below(2) as u32;
            let retries = rng.chance(50).then(|| 1 + rng.below(4) as u32);
            let rate = rng.chance(40);
            let fut = if rate {
                let mut b = limiter.rate_limit(names.clone(), occupy);
                if let Some(r) = retries {
                    b = b.max_retries(r);
                }
                Fut::R(b.into_future())
            } else {
                let mut b = limiter.concurrency(names.clone(), occupy);
                if let Some(r) = retries {
                    b = b.max_retries(r);
                }
                Fut::C(b.into_future())
            };
            desc = format!(
                "step {step}: new {} {names:?} occupy {occupy} retries {retries:?}",
                if rate { "rate" } else { "conc" }
            );
            let epochs_now = names
                .iter()
                .map(|n| {
                    let x = epochs[n.as_str()];
                    (x.0, x.1.elapsed() > Duration::from_millis(300))
                })
                .collect();
            let p = Pending {
                epochs: epochs_now,
                fut,
                flag: Arc::new(Flag(AtomicBool::new(false))),
                names,
                desc: desc.clone(),
            };
            // First poll: counts as woken.
            p.flag.0.store(true, Ordering::SeqCst);
            pending.push(p);
        } else if op < 60 {
            if guards.is_empty() {
                continue;
            }
            let i = rng.below(guards.len() as u64) as usize;
            drop(guards.swap_remove(i));
            desc = format!("step {step}: drop guard {i}");
        } else if op < 65 {
            if pending.is_empty() {
                continue;
            }
            let i = rng.below(pending.len() as u64) as usize;
            let p = pending.swap_remove(i);
            desc = format!("step {step}: cancel {}", p.desc);
        } else if op < 80 {
            let n = LIMITS[rng.below(3) as usize];
            let mut u = LimitUpdate::new();
            match rng.below(3) {
                0 => u = u.limit(1 + rng.below(3) as u32),
                1 => u = u.slot_decay_per_second([20.0, 100.0][rng.below(2) as usize]),
                _ => {
                    let active = limiter.limit(n).map(|i| i.active).unwrap_or(true);
                    u = u.active(!active);
                }
            }
            desc = format!("step {step}: update {n} {u:?}");
            disturb(&mut epochs, n);
            let _ = limiter.update_limit(n, u);
        } else if op < 85 {
            let n = LIMITS[rng.below(3) as usize];
            desc = format!("step {step}: reset {n}");
            let _ = limiter.reset_limit(n);
        } else if op < 88 {
            let n = LIMITS[rng.below(3) as usize];
            desc = format!("step {step}: delete+create {n}");
            disturb(&mut epochs, n);
            let _ = limiter.delete_limit(n);
            let (cap, rate) = (
                1 + rng.below(3) as u32,
                [20.0, 100.0][rng.below(2) as usize],
            );
            // A waiter that lost it creates it again (inactive, limit 1).
            if limiter.limit(n).is_some() {
                let u = LimitUpdate::new()
                    .limit(cap)
                    .slot_decay_per_second(rate)
                    .active(true);
                limiter.update_limit(n, u).unwrap();
            } else {
                let cfg = LimitConfig::new(cap).slot_decay_per_second(rate);
                limiter.create_limit(n, cfg).unwrap();
            }
        } else {
            let ms = rng.below(30);
            desc = format!("step {step}: sleep {ms} ms");
            std::thread::sleep(Duration::from_millis(ms));
        }
        if std::env::var("DBG").is_ok() && step >= 140 {
            eprintln!("{desc}");
            eprintln!(
                "{:?}",
                limiter
                    .limits()
                    .iter()
                    .map(|i| (
                        i.name.clone(),
                        i.limit,
                        i.active,
                        i.held_slots,
                        i.active_slots,
                        i.waiters,
                        i.slot_decay_per_second
                    ))
                    .collect::<Vec<_>>()
            );
            eprintln!("guards {}", guards.len());
        }
        log.push(desc);
        poll_woken(&limiter, &mut pending, &mut guards, &log, &epochs);
    }
    // Quiesce: drop every guard, let decay drain, poll only woken futures.
    log.push("final: drop all guards".into());
    if std::env::var("DBG").is_ok() {
        eprintln!("FINAL");
    }
    guards.clear();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until && !pending.is_empty() {
        poll_woken(&limiter, &mut pending, &mut guards, &log, &epochs);
        guards.clear();
        std::thread::sleep(Duration::from_millis(2));
    }
    if !pending.is_empty() {
        let infos = limiter.limits();
        let stuck: Vec<String> = pending.iter().map(|p| p.desc.clone()).collect();
        // Are they really stuck? Poll once without a wake-up.
        let mut ready = Vec::new();
        for p in pending.iter_mut() {
            if let Poll::Ready(r) = poll(p) {
                ready.push(format!("{} -> {:?}", p.desc, r.map(|_| ())));
            }
        }
        panic!(
            "seed {seed}: lost wake-up: {} waiter(s) never woken: {stuck:#?}\nlimits: {infos:#?}\nready when polled by hand: {ready:#?}\nlog tail: {:#?}",
            pending.len(),
            &log[log.len().saturating_sub(30)..]
        );
    }
}

fn poll_woken(
    limiter: &Limiter,
    pending: &mut Vec<Pending>,
    guards: &mut Vec<ConcurrencyGuard>,
    log: &[String],
    e: &Epochs,
) {
    loop {
        let mut any = false;
        let mut i = 0;
        while i < pending.len() {
            if pending[i].flag.0.load(Ordering::SeqCst) {
                any = true;
                match poll(&mut pending[i]) {
                    Poll::Pending => i += 1,
                    Poll::Ready(r) => {
                        let p = pending.swap_remove(i);
                        // An error (timeout, retries, ...) is a finished
                        // waiter too; only admissions are checked.
                        if let Ok(g) = r {
                            check_capacity(
                                limiter,
                                &p,
                                e,
                                &format!("{} (after {:?})", p.desc, log.last()),
                                log,
                            );
                            if let Some(g) = g {
                                guards.push(g);
                            }
                        }
                    }
                }
            } else {
                i += 1;
            }
        }
        if !any {
            break;
        }
    }
}

#[test]
fn random_ops_lose_no_wake_up() {
    watchdog(Duration::from_secs(300), || {
        let base = common::seed_from_env("TURNSTILE_WAKE_SEED");
        let runs: u64 = std::env::var("TURNSTILE_WAKE_RUNS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        for k in 0..runs {
            run(base.wrapping_add(k), 150);
        }
    });
}

// ---------------------------------------------------------------------------
// A wider generator (third review): five limits mixing held-only and decaying
// ones, occupy 1..=3, retry budgets 0..=3, timeouts, strict waiters, pauses
// (limit 0), decay rates switched on and off, deactivation and reactivation,
// deletes without re-creation, try_acquire. Errors are checked against the
// options that allow them.

const WIDE: [&str; 5] = ["a", "b", "c", "d", "e"];

struct WidePending {
    p: Pending,
    rate: bool,
    retries: Option<u32>,
    timeout: bool,
    strict: bool,
}

fn wide_check_err(w: &WidePending, err: &turnstile::Error, log: &[String]) {
    use turnstile::Error as E;
    let ok = match err {
        E::Timeout { .. } => w.timeout,
        E::RetriesExhausted { attempts, .. } => w.retries.is_some_and(|r| *attempts == r + 1),
        E::NotFound { .. } => w.strict,
        E::NoSlotDecay { .. } => w.rate,
        E::OccupyExceedsLimit { .. } => true,
        _ => false,
    };
    assert!(
        ok,
        "{}: unexpected error {err:?}\nlog tail: {:#?}",
        w.p.desc,
        &log[log.len().saturating_sub(40)..]
    );
}

fn wide_poll_woken(
    limiter: &Limiter,
    pending: &mut Vec<WidePending>,
    guards: &mut Vec<ConcurrencyGuard>,
    log: &[String],
    e: &Epochs,
) {
    loop {
        let mut any = false;
        let mut i = 0;
        while i < pending.len() {
            if pending[i].p.flag.0.load(Ordering::SeqCst) {
                any = true;
                match poll(&mut pending[i].p) {
                    Poll::Pending => i += 1,
                    Poll::Ready(r) => {
                        let w = pending.swap_remove(i);
                        match r {
                            Ok(g) => {
                                check_capacity(
                                    limiter,
                                    &w.p,
                                    e,
                                    &format!("{} (after {:?})", w.p.desc, log.last()),
                                    log,
                                );
                                if let Some(g) = g {
                                    guards.push(g);
                                }
                            }
                            Err(err) => wide_check_err(&w, &err, log),
                        }
                    }
                }
            } else {
                i += 1;
            }
        }
        if !any {
            break;
        }
    }
}

fn wide_run(seed: u64, steps: usize) -> usize {
    eprintln!("wide seed {seed}");
    let mut rng = Rng::new(seed);
    let limiter = Limiter::in_memory();
    let rates = [0.0, 0.0, 20.0, 100.0, 300.0];
    let cfg = |rng: &mut Rng| {
        LimitConfig::new(1 + rng.below(4) as u32)
            .slot_decay_per_second(rates[rng.below(rates.len() as u64) as usize])
    };
    for n in WIDE {
        let c = cfg(&mut rng);
        limiter.create_limit(n, c).unwrap();
    }
    let mut pending: Vec<WidePending> = Vec::new();
    let mut guards: Vec<ConcurrencyGuard> = Vec::new();
    let mut log: Vec<String> = Vec::new();
    let mut epochs = Epochs::new();
    for n in WIDE {
        disturb(&mut epochs, n);
    }
    let mut ops = 0;
    for step in 0..steps {
        let op = rng.below(100);
        let desc;
        if op < 38 {
            let mut names: Vec<String> = WIDE
                .iter()
                .filter(|_| rng.chance(35))
                .map(|s| s.to_string())
                .collect();
            if names.is_empty() {
                names.push(WIDE[rng.below(5) as usize].to_string());
            }
            let occupy = 1 + rng.below(3) as u32;
            let retries = rng.chance(50).then(|| rng.below(4) as u32);
            let rate = rng.chance(40);
            let timeout = rng
                .chance(20)
                .then(|| Duration::from_millis(rng.below(200)));
            let strict = rng.chance(15);
            let create = rng.chance(70);
            macro_rules! opts {
                ($b:expr) => {{
                    let mut b = $b.strict(strict).create_if_missing(create);
                    if let Some(r) = retries {
                        b = b.max_retries(r);
                    }
                    if let Some(t) = timeout {
                        b = b.timeout(t);
                    }
                    b.into_future()
                }};
            }
            let fut = if rate {
                Fut::R(opts!(limiter.rate_limit(names.clone(), occupy)))
            } else {
                Fut::C(opts!(limiter.concurrency(names.clone(), occupy)))
            };
            desc = format!(
                "step {step}: new {} {names:?} occupy {occupy} retries {retries:?} timeout {timeout:?} strict {strict} create {create}",
                if rate { "rate" } else { "conc" }
            );
            let epochs_now = names
                .iter()
                .map(|n| {
                    let x = epochs.entry(n.clone()).or_insert((0, Instant::now()));
                    (x.0, x.1.elapsed() > Duration::from_millis(300))
                })
                .collect();
            let p = Pending {
                epochs: epochs_now,
                fut,
                flag: Arc::new(Flag(AtomicBool::new(false))),
                names,
                desc: desc.clone(),
            };
            p.flag.0.store(true, Ordering::SeqCst);
            pending.push(WidePending {
                p,
                rate,
                retries,
                timeout: timeout.is_some(),
                strict,
            });
        } else if op < 58 {
            if guards.is_empty() {
                continue;
            }
            let i = rng.below(guards.len() as u64) as usize;
            drop(guards.swap_remove(i));
            desc = format!("step {step}: drop guard {i}");
        } else if op < 62 {
            if pending.is_empty() {
                continue;
            }
            let i = rng.below(pending.len() as u64) as usize;
            let w = pending.swap_remove(i);
            desc = format!("step {step}: cancel {}", w.p.desc);
        } else if op < 64 {
            let names: Vec<&str> = WIDE.iter().copied().filter(|_| rng.chance(40)).collect();
            let occupy = 1 + rng.below(3) as u32;
            desc = format!("step {step}: try_acquire {names:?} occupy {occupy}");
            if let Ok(Some(g)) = limiter.concurrency(names, occupy).try_acquire() {
                guards.push(g);
            }
        } else if op < 80 {
            let n = WIDE[rng.below(5) as usize];
            let mut u = LimitUpdate::new();
            let what = rng.below(100);
            if what < 35 {
                u = u.limit(rng.below(5) as u32);
            }
            if (25..60).contains(&what) {
                u = u.slot_decay_per_second(rates[rng.below(rates.len() as u64) as usize]);
            }
            if what >= 55 {
                let active = limiter.limit(n).map(|i| i.active).unwrap_or(true);
                u = u.active(!active);
            }
            desc = format!("step {step}: update {n} {u:?}");
            disturb(&mut epochs, n);
            let _ = limiter.update_limit(n, u);
        } else if op < 83 {
            let n = WIDE[rng.below(5) as usize];
            desc = format!("step {step}: reset {n}");
            disturb(&mut epochs, n);
            let _ = limiter.reset_limit(n);
        } else if op < 87 {
            let n = WIDE[rng.below(5) as usize];
            disturb(&mut epochs, n);
            let _ = limiter.delete_limit(n);
            if rng.chance(50) {
                let c = cfg(&mut rng);
                desc = format!("step {step}: delete+create {n} {c:?}");
                let _ = limiter.create_limit(n, c);
            } else {
                desc = format!("step {step}: delete {n}");
            }
        } else if op < 89 {
            let n = WIDE[rng.below(5) as usize];
            let c = cfg(&mut rng);
            desc = format!("step {step}: create {n} {c:?}");
            disturb(&mut epochs, n);
            let _ = limiter.create_limit(n, c);
        } else {
            let ms = rng.below(25);
            desc = format!("step {step}: sleep {ms} ms");
            std::thread::sleep(Duration::from_millis(ms));
        }
        // A spurious poll with a new waker (an executor may poll at any
        // time, and from another task's context).
        if !pending.is_empty() && rng.chance(15) {
            let i = rng.below(pending.len() as u64) as usize;
            pending[i].p.flag = Arc::new(Flag(AtomicBool::new(true)));
        }
        ops += 1;
        log.push(desc);
        wide_poll_woken(&limiter, &mut pending, &mut guards, &log, &epochs);
    }
    // Quiesce: unpause paused limits (a legitimate change that wakes their
    // waiters), drop every guard, let decay drain, poll only woken futures.
    log.push("final: unpause, drop all guards".into());
    // Likewise decaying slots frozen by a rate set to 0 (they never drain).
    for info in limiter.limits() {
        if info.limit == 0 {
            disturb(&mut epochs, &info.name);
            limiter
                .update_limit(&info.name, LimitUpdate::new().limit(3))
                .unwrap();
        }
        if info.slot_decay_per_second == 0.0 && info.active_slots > info.held_slots {
            disturb(&mut epochs, &info.name);
            limiter
                .update_limit(&info.name, LimitUpdate::new().slot_decay_per_second(100.0))
                .unwrap();
        }
    }
    guards.clear();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until && !pending.is_empty() {
        wide_poll_woken(&limiter, &mut pending, &mut guards, &log, &epochs);
        guards.clear();
        std::thread::sleep(Duration::from_millis(2));
    }
    if !pending.is_empty() {
        let infos = limiter.limits();
        let stuck: Vec<String> = pending.iter().map(|w| w.p.desc.clone()).collect();
        let mut ready = Vec::new();
        for w in pending.iter_mut() {
            if let Poll::Ready(r) = poll(&mut w.p) {
                ready.push(format!("{} -> {:?}", w.p.desc, r.map(|_| ())));
            }
        }
        panic!(
            "seed {seed}: lost wake-up: {} waiter(s) never woken: {stuck:#?}\nlimits: {infos:#?}\nready when polled by hand: {ready:#?}\nlog tail: {:#?}",
            pending.len(),
            &log[log.len().saturating_sub(40)..]
        );
    }
    // Nothing leaked: no queue entry, no held slot.
    for info in limiter.limits() {
        assert_eq!(info.waiters, 0, "seed {seed}: queue leak {info:?}");
        assert_eq!(info.held_slots, 0, "seed {seed}: held leak {info:?}");
    }
    ops
}

#[test]
fn wide_random_ops_lose_no_wake_up() {
    watchdog(Duration::from_secs(600), || {
        let base = common::seed_from_env("TURNSTILE_WIDE_SEED");
        let runs: u64 = std::env::var("TURNSTILE_WIDE_RUNS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10);
        let steps: usize = std::env::var("TURNSTILE_WIDE_STEPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(200);
        let mut ops = 0;
        for k in 0..runs {
            ops += wide_run(base.wrapping_add(k), steps);
        }
        eprintln!("wide: {runs} runs, {ops} ops from seed {base}");
    });
}
