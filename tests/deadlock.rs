//! All-or-nothing over several limits: opposite orders never deadlock, and a
//! blocked multi-limit acquisition holds nothing on the limits that are free.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{eventually, watchdog, WATCHDOG};
use turnstile::{Error, LimitConfig, Limiter};

const QUEUED: Duration = Duration::from_secs(10);

fn info(limiter: &Limiter, name: &str) -> (u32, usize) {
    let i = limiter.limit(name).expect("limit exists");
    (i.held_slots, i.waiters)
}

/// Runs `threads`, each acquiring its name list `iterations` times, and
/// checks with shadow counters that no limit is ever over-committed.
fn hammer(
    limits: &[(&'static str, u32)],
    plans: Vec<(Vec<&'static str>, u32)>,
    iterations: usize,
) -> Limiter {
    let limiter = Limiter::in_memory();
    for (name, limit) in limits {
        limiter
            .create_limit(name, LimitConfig::new(*limit))
            .unwrap();
    }
    let shadows: Arc<Vec<(&'static str, u32, AtomicU32)>> = Arc::new(
        limits
            .iter()
            .map(|(n, l)| (*n, *l, AtomicU32::new(0)))
            .collect(),
    );
    let handles: Vec<_> = plans
        .into_iter()
        .map(|(names, occupy)| {
            let l = limiter.clone();
            let shadows = Arc::clone(&shadows);
            thread::spawn(move || {
                let mine: Vec<_> = shadows
                    .iter()
                    .filter(|(n, _, _)| names.contains(n))
                    .collect();
                for i in 0..iterations {
                    let guard = l.concurrency(names.as_slice(), occupy).acquire().unwrap();
                    for (name, limit, count) in &mine {
                        let now = count.fetch_add(occupy, Ordering::SeqCst) + occupy;
                        assert!(now <= *limit, "{name}: {now} slots held, limit {limit}");
                    }
                    if i.is_multiple_of(7) {
                        thread::yield_now();
                    }
                    for (_, _, count) in &mine {
                        count.fetch_sub(occupy, Ordering::SeqCst);
                    }
                    drop(guard);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for (name, _) in limits {
        assert_eq!(info(&limiter, name), (0, 0), "{name} at the end");
    }
    limiter
}

#[test]
fn opposite_orders_on_two_limits_do_not_deadlock() {
    watchdog(WATCHDOG, || {
        let mut plans = Vec::new();
        for _ in 0..3 {
            plans.push((vec!["a", "b"], 1));
            plans.push((vec!["b", "a"], 1));
        }
        hammer(&[("a", 1), ("b", 1)], plans, 1000);
    });
}

#[test]
fn all_permutations_of_three_limits_do_not_deadlock() {
    watchdog(WATCHDOG, || {
        let perms = [
            ["a", "b", "c"],
            ["a", "c", "b"],
            ["b", "a", "c"],
            ["b", "c", "a"],
            ["c", "a", "b"],
            ["c", "b", "a"],
        ];
        let mut plans: Vec<_> = perms.iter().map(|p| (p.to_vec(), 1)).collect();
        // Pairs that overlap the triples in every way, too.
        plans.push((vec!["b", "a"], 1));
        plans.push((vec!["c", "b"], 1));
        plans.push((vec!["a", "c"], 1));
        hammer(&[("a", 1), ("b", 1), ("c", 1)], plans, 500);
    });
}

#[test]
fn weighted_opposite_orders_do_not_deadlock() {
    watchdog(WATCHDOG, || {
        let plans = vec![
            (vec!["a", "b", "c"], 2),
            (vec!["c", "b", "a"], 1),
            (vec!["b", "a"], 2),
            (vec!["c", "a"], 1),
            (vec!["b", "c"], 3),
            (vec!["a"], 1),
        ];
        hammer(&[("a", 3), ("b", 3), ("c", 4)], plans, 500);
    });
}

/// The classic cycle for per-limit queues: W1 waits in "a" and "b", W2 in
/// "b" and "a", both blocked; both must get through once the holders go.
#[test]
fn crossed_waiters_both_proceed() {
    watchdog(WATCHDOG, || {
        for _ in 0..20 {
            let limiter = Limiter::in_memory();
            limiter.create_limit("a", LimitConfig::new(1)).unwrap();
            limiter.create_limit("b", LimitConfig::new(1)).unwrap();
            let ha = limiter.concurrency("a", 1).acquire().unwrap();
            let hb = limiter.concurrency("b", 1).acquire().unwrap();
            let queued = || info(&limiter, "a").1 + info(&limiter, "b").1;
            let l1 = limiter.clone();
            let w1 = thread::spawn(move || l1.concurrency(["a", "b"], 1).acquire().map(drop));
            assert!(eventually(QUEUED, || queued() >= 1));
            let after_w1 = queued();
            let l2 = limiter.clone();
            let w2 = thread::spawn(move || l2.concurrency(["b", "a"], 1).acquire().map(drop));
            assert!(eventually(QUEUED, || queued() > after_w1));
            // Release "b" first: the order of releases must not matter.
            drop(hb);
            drop(ha);
            w1.join().unwrap().unwrap();
            w2.join().unwrap().unwrap();
            assert_eq!(info(&limiter, "a"), (0, 0));
            assert_eq!(info(&limiter, "b"), (0, 0));
        }
    });
}

/// While an acquisition of ["a","b"] is blocked on "b", it holds nothing on
/// "a".
#[test]
fn blocked_multi_limit_acquisition_holds_nothing() {
    watchdog(WATCHDOG, || {
        for names in [["a", "b"], ["b", "a"]] {
            let limiter = Limiter::in_memory();
            limiter.create_limit("a", LimitConfig::new(1)).unwrap();
            limiter.create_limit("b", LimitConfig::new(1)).unwrap();
            let hold_b = limiter.concurrency("b", 1).acquire().unwrap();

            let l = limiter.clone();
            let (tx, rx) = crossbeam_channel::bounded::<()>(0);
            let waiter = thread::spawn(move || {
                let g = l.concurrency(names, 1).acquire().unwrap();
                let seen = (info(&l, "a").0, info(&l, "b").0);
                rx.recv().unwrap();
                drop(g);
                seen
            });
            assert!(eventually(QUEUED, || info(&limiter, "b").1 == 1));
            for _ in 0..50 {
                let a = limiter.limit("a").unwrap();
                assert_eq!(
                    a.held_slots, 0,
                    "holds a slot of \"a\" while waiting for \"b\""
                );
                assert_eq!(a.active_slots, 0);
                thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(info(&limiter, "b").0, 1);

            drop(hold_b);
            // Now it holds both at once.
            tx.send(()).unwrap();
            assert_eq!(waiter.join().unwrap(), (1, 1));
            assert_eq!(info(&limiter, "a"), (0, 0));
            assert_eq!(info(&limiter, "b"), (0, 0));
        }
    });
}

/// Four limits, the last one full: the acquisition holds nothing on the
/// three free ones; when it times out it leaves nothing taken or queued.
#[test]
fn timed_out_multi_limit_acquisition_leaves_nothing() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        for name in ["a", "b", "c", "d"] {
            limiter.create_limit(name, LimitConfig::new(2)).unwrap();
        }
        let hold_d = limiter.concurrency("d", 2).acquire().unwrap();
        let l = limiter.clone();
        let waiter = thread::spawn(move || {
            l.concurrency(["a", "b", "c", "d"], 1)
                .timeout(Duration::from_millis(300))
                .acquire()
                .map(drop)
        });
        assert!(eventually(QUEUED, || info(&limiter, "d").1 == 1));
        for name in ["a", "b", "c"] {
            assert_eq!(info(&limiter, name).0, 0, "{name}");
        }
        match waiter.join().unwrap() {
            Err(Error::Timeout { .. }) => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
        for name in ["a", "b", "c"] {
            assert_eq!(info(&limiter, name), (0, 0), "{name}");
        }
        assert_eq!(info(&limiter, "d"), (2, 0));
        drop(hold_d);
        let all = limiter
            .concurrency(["d", "c", "b", "a"], 2)
            .try_acquire()
            .unwrap();
        assert!(all.is_some());
    });
}
