//! The same semantics in one process and across processes: each behaviour
//! is written once, as a function of a `Limiter`, and run against the
//! in-process engine and against shared limits on PostgreSQL (a throwaway
//! cluster of this test binary, one namespace per test; the PostgreSQL half
//! says `SKIPPED` and checks nothing where PostgreSQL is missing, and fails
//! under `CI`).

#![cfg(feature = "postgres")]

mod common;

use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::pg::shared_cluster_or_skip;
use common::{queued, watchdog, WATCHDOG};
use turnstile::{Error, Event, LimitConfig, LimitUpdate, Limiter};

type Observer = Arc<dyn Fn(&Event) + Send + Sync>;

/// A fresh namespace on the binary's cluster, or `None` (skipped).
fn shared(test: &str, observer: Option<Observer>) -> Option<Limiter> {
    let cluster = shared_cluster_or_skip(test)?;
    let mut builder = Limiter::builder()
        .postgres(cluster.url())
        .namespace(test)
        .lease(Duration::from_secs(5));
    if let Some(observer) = observer {
        builder = builder.on_event(move |e| observer(e));
    }
    Some(builder.build().expect("connect"))
}

/// Runs `behaviour` in one process, then on PostgreSQL.
fn both(test: &'static str, behaviour: fn(&Limiter)) {
    watchdog(WATCHDOG, move || behaviour(&Limiter::in_memory()));
    watchdog(WATCHDOG * 2, move || {
        if let Some(limiter) = shared(test, None) {
            behaviour(&limiter);
        }
    });
}

/// Blocks for `occupy` slots of `name` on another thread (30 s at most).
fn spawn_waiter(
    l: &Limiter,
    name: &'static str,
    occupy: u32,
) -> thread::JoinHandle<Result<u32, Error>> {
    let l = l.clone();
    thread::spawn(move || {
        l.concurrency(name, occupy)
            .timeout(Duration::from_secs(30))
            .acquire()
            .map(|g| g.occupy())
    })
}

fn management(l: &Limiter) {
    let info = l.create_limit("gpu", LimitConfig::new(2)).unwrap();
    assert_eq!((info.limit, info.active, info.held_slots), (2, true, 0));
    assert!(matches!(
        l.create_limit("gpu", LimitConfig::new(1)),
        Err(Error::AlreadyExists { .. })
    ));
    assert!(matches!(
        l.create_limit("", LimitConfig::new(1)),
        Err(Error::InvalidName { .. })
    ));
    assert!(matches!(
        l.create_limit("x", LimitConfig::new(1).slot_decay_per_second(-1.0)),
        Err(Error::InvalidConfig { .. })
    ));
    // Unicode, and the longest name (255 bytes), round trip exactly.
    let long = "é".repeat(127) + "x";
    assert_eq!(long.len(), 255);
    for name in ["Ünïcødé ✓ 限制", long.as_str(), "Gpu"] {
        l.create_limit(name, LimitConfig::new(1)).unwrap();
        let g = l.concurrency(name, 1).try_acquire().unwrap().expect("free");
        assert_eq!(l.limit(name).unwrap().held_slots, 1, "{name}");
        drop(g);
        l.delete_limit(name).unwrap();
    }
    assert!(matches!(
        l.create_limit(&format!("{long}y"), LimitConfig::new(1)),
        Err(Error::InvalidName { .. })
    ));
    let quoted = "it's \"quoted\"; DROP TABLE limits; --";
    l.create_limit(quoted, LimitConfig::new(3).slot_decay_per_second(0.5))
        .unwrap();
    let info = l
        .update_limit("gpu", LimitUpdate::new().limit(4).active(false))
        .unwrap();
    assert_eq!((info.limit, info.active), (4, false));
    assert!(matches!(
        l.update_limit("nope", LimitUpdate::new().limit(1)),
        Err(Error::NotFound { .. })
    ));
    let names: Vec<String> = l.limits().into_iter().map(|i| i.name).collect();
    assert_eq!(names, vec!["gpu".to_string(), quoted.to_string()]);
    assert_eq!(l.limit(quoted).unwrap().slot_decay_per_second, 0.5);
    l.delete_limit("gpu").unwrap();
    assert!(l.limit("gpu").is_none());
    assert!(matches!(l.delete_limit("gpu"), Err(Error::NotFound { .. })));
    assert!(matches!(l.reset_limit("gpu"), Err(Error::NotFound { .. })));
}

fn weighted_all_or_nothing(l: &Limiter) {
    l.create_limit("a", LimitConfig::new(3)).unwrap();
    l.create_limit("b", LimitConfig::new(2)).unwrap();
    let g = l.concurrency(["a", "b"], 2).acquire().unwrap();
    let (a, b) = (l.limit("a").unwrap(), l.limit("b").unwrap());
    assert_eq!((a.held_slots, b.held_slots), (2, 2));
    // b is full: nothing is taken from a either.
    assert!(l
        .concurrency(["b", "a"], 1)
        .try_acquire()
        .unwrap()
        .is_none());
    assert_eq!(l.limit("a").unwrap().held_slots, 2);
    let one = l
        .concurrency("a", 1)
        .try_acquire()
        .unwrap()
        .expect("a has room");
    assert!(l.concurrency("a", 1).try_acquire().unwrap().is_none());
    assert!(matches!(
        l.concurrency("a", 4).try_acquire(),
        Err(Error::OccupyExceedsLimit {
            limit: 3,
            occupy: 4,
            ..
        })
    ));
    assert!(matches!(
        l.concurrency("a", 0).try_acquire(),
        Err(Error::InvalidOccupy { .. })
    ));
    drop(one);
    g.release();
    l.flush().unwrap();
    let (a, b) = (l.limit("a").unwrap(), l.limit("b").unwrap());
    assert_eq!((a.held_slots, b.held_slots), (0, 0));
    assert!(a.denied_slots >= 2, "{a:?}");
}

fn fifo_hand_off(l: &Limiter) {
    l.create_limit("one", LimitConfig::new(1)).unwrap();
    let held = l.concurrency("one", 1).acquire().unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..3 {
        let (l2, order) = (l.clone(), order.clone());
        waiters.push(thread::spawn(move || {
            let g = l2
                .concurrency("one", 1)
                .timeout(Duration::from_secs(30))
                .acquire()
                .unwrap();
            order.lock().unwrap().push(i);
            drop(g);
        }));
        // Queued in this order.
        queued(l, "one", i + 1);
    }
    // A try never passes the queue.
    drop(held);
    for w in waiters {
        w.join().unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
    l.flush().unwrap();
    let info = l.limit("one").unwrap();
    assert_eq!((info.held_slots, info.waiters), (0, 0), "{info:?}");
}

fn try_respects_the_queue(l: &Limiter) {
    l.create_limit("q", LimitConfig::new(3)).unwrap();
    let held = l.concurrency("q", 2).acquire().unwrap();
    let l2 = l.clone();
    let big = thread::spawn(move || {
        l2.concurrency("q", 3)
            .timeout(Duration::from_secs(30))
            .acquire()
            .unwrap()
            .release();
    });
    queued(l, "q", 1);
    // One slot is free, but promised to the large waiter.
    assert!(l.concurrency("q", 1).try_acquire().unwrap().is_none());
    drop(held);
    big.join().unwrap();
}

fn timeout_and_cancel_leave_nothing(l: &Limiter) {
    l.create_limit("t", LimitConfig::new(1)).unwrap();
    let held = l.concurrency("t", 1).acquire().unwrap();
    let start = Instant::now();
    let err = l
        .concurrency("t", 1)
        .timeout(Duration::from_millis(200))
        .acquire()
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert!(matches!(
        l.concurrency("t", 1).timeout(Duration::ZERO).acquire(),
        Err(Error::Timeout { .. })
    ));
    // An async waiter dropped while queued leaves no ticket.
    let mut fut = Box::pin(l.concurrency("t", 1).into_future());
    let waker = std::task::Waker::noop();
    assert!(fut
        .as_mut()
        .poll(&mut std::task::Context::from_waker(waker))
        .is_pending());
    queued(l, "t", 1);
    drop(fut);
    queued(l, "t", 0);
    drop(held);
    l.flush().unwrap();
    // Nothing was left taken: the whole limit is free.
    let all = l.concurrency("t", 1).try_acquire().unwrap();
    assert!(all.is_some());
}

fn missing_strict_inactive_paused(l: &Limiter) {
    // Missing: created inactive with limit 1, and passed.
    let g = l.concurrency("fresh", 5).acquire().unwrap();
    let info = l.limit("fresh").unwrap();
    assert_eq!((info.active, info.limit, info.held_slots), (false, 1, 0));
    drop(g);
    assert!(matches!(
        l.concurrency(["fresh", "absent"], 1).strict(true).try_acquire(),
        Err(Error::NotFound { name }) if name == "absent"
    ));
    assert!(l.limit("absent").is_none());
    drop(
        l.concurrency("skipped", 1)
            .create_if_missing(false)
            .acquire()
            .unwrap(),
    );
    assert!(l.limit("skipped").is_none());
    // Paused: waits until raised.
    l.create_limit("paused", LimitConfig::new(0)).unwrap();
    assert!(l.concurrency("paused", 1).try_acquire().unwrap().is_none());
    let waiter = spawn_waiter(l, "paused", 2);
    queued(l, "paused", 1);
    l.update_limit("paused", LimitUpdate::new().limit(2))
        .unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), 2);
    // Lowered below a waiter's occupy: it fails.
    let held = l.concurrency("paused", 2).acquire().unwrap();
    let waiter = spawn_waiter(l, "paused", 2);
    queued(l, "paused", 1);
    l.update_limit("paused", LimitUpdate::new().limit(1))
        .unwrap();
    assert!(matches!(
        waiter.join().unwrap(),
        Err(Error::OccupyExceedsLimit { limit: 1, .. })
    ));
    drop(held);
}

fn failures_leave_nothing(l: &Limiter) {
    // An acquisition that fails creates none of its missing limits.
    l.create_limit("small", LimitConfig::new(1)).unwrap();
    assert!(matches!(
        l.concurrency(["brand_new", "small"], 5).try_acquire(),
        Err(Error::OccupyExceedsLimit { .. })
    ));
    assert!(l.limit("brand_new").is_none());
    // Deleting a limit fails its strict waiters all at once: the room one
    // leaves is not handed to another that fails too (which would leak it).
    l.create_limit("p", LimitConfig::new(1)).unwrap();
    l.create_limit("q", LimitConfig::new(1)).unwrap();
    l.create_limit("r", LimitConfig::new(5)).unwrap();
    let q = l.concurrency("q", 1).acquire().unwrap();
    let strict = |names: [&'static str; 2]| {
        let l = l.clone();
        thread::spawn(move || {
            l.concurrency(names, 1)
                .strict(true)
                .timeout(Duration::from_secs(30))
                .acquire()
                .map(drop)
        })
    };
    let w1 = strict(["p", "q"]);
    queued(l, "p", 1);
    let w2 = strict(["p", "r"]);
    queued(l, "p", 2);
    l.delete_limit("p").unwrap();
    for w in [w1, w2] {
        assert!(matches!(w.join().unwrap(), Err(Error::NotFound { .. })));
    }
    l.flush().unwrap();
    assert_eq!(l.limit("r").unwrap().held_slots, 0, "r leaked a slot");
    drop(q);
}

/// Many rate-limit waiters let in at once (one reset) are each granted.
fn many_rate_waiters_at_once(l: &Limiter) {
    l.create_limit("burst", LimitConfig::new(300).slot_decay_per_second(0.001))
        .unwrap();
    assert!(l.rate_limit("burst", 300).try_acquire().unwrap());
    let mut futures: Vec<_> = (0..300)
        .map(|_| Box::pin(l.rate_limit("burst", 1).into_future()))
        .collect();
    let waker = std::task::Waker::noop();
    for f in &mut futures {
        assert!(f
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker))
            .is_pending());
    }
    queued(l, "burst", 300);
    l.reset_limit("burst").unwrap();
    for f in &mut futures {
        let got = loop {
            match f.as_mut().poll(&mut std::task::Context::from_waker(waker)) {
                std::task::Poll::Ready(got) => break got,
                std::task::Poll::Pending => thread::sleep(Duration::from_millis(1)),
            }
        };
        got.unwrap();
    }
    assert_eq!(l.limit("burst").unwrap().waiters, 0);
}

fn retries_and_deactivation(l: &Limiter) {
    l.create_limit("r", LimitConfig::new(1)).unwrap();
    let held = l.concurrency("r", 1).acquire().unwrap();
    assert!(matches!(
        l.concurrency("r", 1).max_retries(0).acquire(),
        Err(Error::RetriesExhausted { attempts: 1, .. })
    ));
    let l2 = l.clone();
    let waiter = thread::spawn(move || l2.concurrency("r", 1).max_retries(1).acquire().map(drop));
    queued(l, "r", 1);
    // A change that does not let it in counts an attempt; the second fails it.
    l.update_limit("r", LimitUpdate::new().slot_decay_per_second(1.0))
        .unwrap();
    l.update_limit("r", LimitUpdate::new().slot_decay_per_second(2.0))
        .unwrap();
    assert!(matches!(
        waiter.join().unwrap(),
        Err(Error::RetriesExhausted { .. })
    ));
    // Deactivating lets a waiter through, holding nothing.
    let waiter = spawn_waiter(l, "r", 1);
    queued(l, "r", 1);
    l.update_limit("r", LimitUpdate::new().active(false))
        .unwrap();
    waiter.join().unwrap().unwrap();
    drop(held);
}

fn rate_limit_paces(l: &Limiter) {
    assert!(matches!(
        {
            l.create_limit("nodecay", LimitConfig::new(1)).unwrap();
            l.rate_limit("nodecay", 1).try_acquire()
        },
        Err(Error::NoSlotDecay { .. })
    ));
    l.create_limit("api", LimitConfig::new(2).slot_decay_per_second(20.0))
        .unwrap();
    assert!(l.rate_limit("api", 2).try_acquire().unwrap());
    assert!(!l.rate_limit("api", 1).try_acquire().unwrap());
    // 10 more at 20 per second: at least 0.5 s from an empty bucket.
    let start = Instant::now();
    for _ in 0..10 {
        l.rate_limit("api", 1)
            .timeout(Duration::from_secs(30))
            .acquire()
            .unwrap();
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(480), "{took:?}");
    eprintln!("10 rate-limit slots at 20/s behind a full bucket of 2: {took:?} (ideal 500 ms)");
    l.reset_limit("api").unwrap();
    assert!(l.rate_limit("api", 2).try_acquire().unwrap());
}

fn async_acquisitions(l: &Limiter) {
    l.create_limit("a", LimitConfig::new(1)).unwrap();
    futures::executor::block_on(async {
        let g = l.concurrency("a", 1).await.unwrap();
        let l2 = l.clone();
        let waiter = thread::spawn(move || {
            futures::executor::block_on(async {
                l2.concurrency("a", 1)
                    .timeout(Duration::from_secs(30))
                    .await
                    .map(|g| g.occupy())
            })
        });
        queued(l, "a", 1);
        drop(g);
        assert_eq!(waiter.join().unwrap().unwrap(), 1);
    });
}

/// Everything called from tokio tasks, on a current-thread and on a
/// multi-thread runtime: management, `try_acquire`, a blocking acquisition,
/// `.await`, `release()`, and tasks handing a limit of 1 to each other.
fn inside_tokio(l: &Limiter) {
    l.create_limit("t", LimitConfig::new(1)).unwrap();
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for rt in [current, multi] {
        let l = l.clone();
        rt.block_on(async move {
            l.update_limit("t", LimitUpdate::new().limit(1)).unwrap();
            assert_eq!(l.try_limit("t").unwrap().unwrap().limit, 1);
            let g = l.concurrency("t", 1).try_acquire().unwrap().expect("free");
            assert!(l.concurrency("t", 1).try_acquire().unwrap().is_none());
            g.release();
            let g = l
                .concurrency("t", 1)
                .timeout(Duration::from_secs(10))
                .acquire()
                .unwrap();
            drop(g);
            let g = l.concurrency("t", 1).await.unwrap();
            g.release();
            // Tasks taking turns, each holding a moment.
            let tasks: Vec<_> = (0..4)
                .map(|_| {
                    let l = l.clone();
                    tokio::spawn(async move {
                        for _ in 0..3 {
                            let g = l
                                .concurrency("t", 1)
                                .timeout(Duration::from_secs(30))
                                .await
                                .unwrap();
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            g.release();
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
    }
    l.flush().unwrap();
    assert_eq!(l.try_limit("t").unwrap().unwrap().active_slots, 0);
}

/// An acquisition's deadline is its own: calls made after it ran out,
/// on the same connections, have theirs.
fn deadlines_are_per_call(l: &Limiter) {
    l.create_limit("d", LimitConfig::new(1)).unwrap();
    for _ in 0..3 {
        // Taken well within its deadline, which then passes.
        let start = Instant::now();
        let g = l
            .concurrency("d", 1)
            .timeout(Duration::from_millis(200))
            .acquire()
            .unwrap();
        while start.elapsed() < Duration::from_millis(300) {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(l.try_limit("d").unwrap().unwrap().active_slots, 1);
        l.update_limit("d", LimitUpdate::new().limit(1)).unwrap();
        assert!(l.concurrency("d", 1).try_acquire().unwrap().is_none());
        g.release();
    }
}

#[test]
fn deadlines_are_per_call_both() {
    both("deadlines", deadlines_are_per_call);
}

#[test]
fn inside_tokio_both() {
    both("inside_tokio", inside_tokio);
}

#[test]
fn management_both() {
    both("management", management);
}

#[test]
fn weighted_all_or_nothing_both() {
    both("weighted", weighted_all_or_nothing);
}

#[test]
fn fifo_hand_off_both() {
    both("fifo", fifo_hand_off);
}

#[test]
fn try_respects_the_queue_both() {
    both("try_queue", try_respects_the_queue);
}

#[test]
fn timeout_and_cancel_leave_nothing_both() {
    both("timeouts", timeout_and_cancel_leave_nothing);
}

#[test]
fn missing_strict_inactive_paused_both() {
    both("missing", missing_strict_inactive_paused);
}

#[test]
fn failures_leave_nothing_both() {
    both("failures", failures_leave_nothing);
}

#[test]
fn many_rate_waiters_at_once_both() {
    both("many_rate", many_rate_waiters_at_once);
}

#[test]
fn retries_and_deactivation_both() {
    both("retries", retries_and_deactivation);
}

#[test]
fn rate_limit_paces_both() {
    both("rate", rate_limit_paces);
}

#[test]
fn async_acquisitions_both() {
    both("async", async_acquisitions);
}

/// Events: a limiter's own acquisitions and releases, on both engines.
#[test]
fn events_both() {
    let check = |l: Option<Limiter>, seen: Arc<AtomicU32>| {
        let Some(l) = l else {
            return;
        };
        l.create_limit("e", LimitConfig::new(1)).unwrap();
        drop(l.concurrency("e", 1).acquire().unwrap());
        assert_eq!(seen.load(Ordering::SeqCst), 2, "one Acquired, one Released");
    };
    let counting = || {
        let seen = Arc::new(AtomicU32::new(0));
        let counter = seen.clone();
        let observer: Observer = Arc::new(move |e: &Event| {
            if matches!(e, Event::Acquired { .. } | Event::Released { .. }) {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        (seen, observer)
    };
    watchdog(WATCHDOG, move || {
        let (seen, observer) = counting();
        let l = Limiter::builder()
            .on_event(move |e| observer(e))
            .build()
            .unwrap();
        check(Some(l), seen);
        let (seen, observer) = counting();
        check(shared("events", Some(observer)), seen);
    });
}
