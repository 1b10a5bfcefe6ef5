//! Fairness: first come, first served on every shared limit; a large
//! `occupy` is not starved by small ones; `try_acquire` respects queued
//! waiters; a later waiter may pass an earlier one only when it cannot delay
//! it.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{eventually, watchdog, WATCHDOG};
use turnstile::{Error, LimitConfig, Limiter};

const QUEUED: Duration = Duration::from_secs(10);

fn waiters(limiter: &Limiter, name: &str) -> usize {
    limiter.limit(name).expect("limit exists").waiters
}

fn held(limiter: &Limiter, name: &str) -> u32 {
    limiter.limit(name).expect("limit exists").held_slots
}

/// Limit 1, a holder, then A, B, C queued one after another: they get the
/// slot in the order they were queued.
#[test]
fn waiters_are_served_in_enqueue_order() {
    watchdog(WATCHDOG, || {
        for _round in 0..5 {
            let limiter = Limiter::in_memory();
            limiter.create_limit("x", LimitConfig::new(1)).unwrap();
            let holder = limiter.concurrency("x", 1).acquire().unwrap();
            let order = Arc::new(Mutex::new(Vec::new()));

            let mut handles = Vec::new();
            for (i, who) in ["A", "B", "C"].into_iter().enumerate() {
                let l = limiter.clone();
                let order = Arc::clone(&order);
                handles.push(thread::spawn(move || {
                    let guard = l.concurrency("x", 1).acquire().unwrap();
                    order.lock().unwrap().push(who);
                    // Hold it a moment so that the next one really waits for
                    // this release.
                    thread::sleep(Duration::from_millis(2));
                    drop(guard);
                }));
                assert!(
                    eventually(QUEUED, || waiters(&limiter, "x") == i + 1),
                    "waiter {who} was never queued"
                );
            }
            assert_eq!(held(&limiter, "x"), 1);
            drop(holder);
            for h in handles {
                h.join().unwrap();
            }
            assert_eq!(*order.lock().unwrap(), vec!["A", "B", "C"]);
            let info = limiter.limit("x").unwrap();
            assert_eq!((info.held_slots, info.waiters), (0, 0));
        }
    });
}

/// FIFO with weights: limit 3, holder of 3; queued A (3), B (1), C (2):
/// A first, then B and C (B and C fit together).
#[test]
fn weighted_waiters_keep_their_order() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("x", LimitConfig::new(3)).unwrap();
        let holder = limiter.concurrency("x", 3).acquire().unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let a_release = Arc::new(AtomicBool::new(false));

        let mut handles = Vec::new();
        for (i, (who, occupy)) in [("A", 3u32), ("B", 1), ("C", 2)].into_iter().enumerate() {
            let l = limiter.clone();
            let order = Arc::clone(&order);
            let a_release = Arc::clone(&a_release);
            handles.push(thread::spawn(move || {
                let guard = l.concurrency("x", occupy).acquire().unwrap();
                order.lock().unwrap().push(who);
                if who == "A" {
                    // Keep A's slots until the main thread has looked.
                    while !a_release.load(Ordering::SeqCst) {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
                drop(guard);
            }));
            assert!(eventually(QUEUED, || waiters(&limiter, "x") == i + 1));
        }
        drop(holder);
        // A gets all three slots; B and C must still wait behind it.
        assert!(eventually(QUEUED, || order.lock().unwrap().len() == 1));
        assert_eq!(*order.lock().unwrap(), vec!["A"]);
        assert_eq!(held(&limiter, "x"), 3);
        assert_eq!(waiters(&limiter, "x"), 2);
        a_release.store(true, Ordering::SeqCst);
        for h in handles {
            h.join().unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order[0], "A");
        assert_eq!(order.len(), 3);
        let info = limiter.limit("x").unwrap();
        assert_eq!((info.held_slots, info.waiters), (0, 0));
    });
}

/// Limit 4; threads keep taking single slots in a loop (blocking acquires
/// and `try_acquire`s); a waiter for all 4 slots still gets through.
#[test]
fn large_occupy_is_not_starved_by_small_ones() {
    watchdog(WATCHDOG, || {
        for round in 0..3 {
            let limiter = Limiter::in_memory();
            limiter.create_limit("x", LimitConfig::new(4)).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let small_done = Arc::new(AtomicU64::new(0));

            let mut smalls = Vec::new();
            for t in 0..6 {
                let l = limiter.clone();
                let stop = Arc::clone(&stop);
                let small_done = Arc::clone(&small_done);
                smalls.push(thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        i += 1;
                        let guard = if (t + i + round).is_multiple_of(3) {
                            match l.concurrency("x", 1).try_acquire().unwrap() {
                                Some(g) => g,
                                None => {
                                    thread::yield_now();
                                    continue;
                                }
                            }
                        } else {
                            l.concurrency("x", 1).acquire().unwrap()
                        };
                        small_done.fetch_add(1, Ordering::SeqCst);
                        // Overlap with the other holders so that the limit is
                        // rarely empty on its own.
                        for _ in 0..200 {
                            std::hint::spin_loop();
                        }
                        drop(guard);
                    }
                }));
            }
            // The stream is flowing before the big one arrives.
            assert!(eventually(QUEUED, || small_done.load(Ordering::SeqCst) > 100));

            let big = limiter
                .concurrency("x", 4)
                .timeout(Duration::from_secs(10))
                .acquire();
            let big = match big {
                Ok(g) => g,
                Err(e) => panic!("the occupy-4 waiter was starved: {e}"),
            };
            assert_eq!(held(&limiter, "x"), 4);
            stop.store(true, Ordering::SeqCst);
            drop(big);
            for s in smalls {
                s.join().unwrap();
            }
            let info = limiter.limit("x").unwrap();
            assert_eq!((info.held_slots, info.waiters), (0, 0));
        }
    });
}

/// Limit 2, one slot held, a waiter for 2 queued: a `try_acquire(1)` must
/// not take the free slot the waiter is queued for, nor may a zero-timeout
/// acquire.
#[test]
fn try_acquire_does_not_take_slots_a_queued_waiter_needs() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("x", LimitConfig::new(2)).unwrap();
        let first = limiter.concurrency("x", 1).acquire().unwrap();

        let l = limiter.clone();
        let big = thread::spawn(move || {
            let g = l.concurrency("x", 2).acquire().unwrap();
            let held = l.limit("x").unwrap().held_slots;
            drop(g);
            held
        });
        assert!(eventually(QUEUED, || waiters(&limiter, "x") == 1));

        for _ in 0..100 {
            let got = limiter.concurrency("x", 1).try_acquire().unwrap();
            assert!(
                got.is_none(),
                "try_acquire took a slot that a queued waiter of occupy 2 needs"
            );
            match limiter
                .concurrency("x", 1)
                .timeout(Duration::ZERO)
                .acquire()
            {
                Err(Error::Timeout { .. }) => {}
                Ok(_) => panic!("a zero-timeout acquire passed a queued waiter it delays"),
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!(held(&limiter, "x"), 1);
        assert_eq!(waiters(&limiter, "x"), 1);

        drop(first);
        assert_eq!(big.join().unwrap(), 2);
        let info = limiter.limit("x").unwrap();
        assert_eq!((info.held_slots, info.waiters), (0, 0));
        // Now the limit is free for anyone.
        let all = limiter.concurrency("x", 2).try_acquire().unwrap();
        assert!(all.is_some());
    });
}

/// "a" has limit 4, "b" limit 2 and is full. W1 wants ["a","b"] occupy 2
/// and is blocked by "b". W2 wants 2 of "a": it cannot delay W1 (a has room
/// for both), so it goes ahead. A further 1 of "a" would leave W1 short once
/// "b" frees, so that one must not pass.
#[test]
fn later_waiter_passes_when_it_cannot_delay_the_earlier() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("a", LimitConfig::new(4)).unwrap();
        limiter.create_limit("b", LimitConfig::new(2)).unwrap();
        let hold_b = limiter.concurrency("b", 2).acquire().unwrap();

        let l = limiter.clone();
        let w1_go = Arc::new(AtomicBool::new(false));
        let go = Arc::clone(&w1_go);
        let w1 = thread::spawn(move || {
            let g = l.concurrency(["a", "b"], 2).acquire().unwrap();
            let seen = (
                l.limit("a").unwrap().held_slots,
                l.limit("b").unwrap().held_slots,
            );
            while !go.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(1));
            }
            drop(g);
            seen
        });
        assert!(eventually(QUEUED, || waiters(&limiter, "b") == 1));
        // All-or-nothing: W1 holds nothing on "a" while it waits for "b".
        assert_eq!(held(&limiter, "a"), 0);

        // W2: 2 of "a" fit next to W1's 2, so W2 cannot delay W1.
        let w2 = match limiter
            .concurrency("a", 2)
            .timeout(Duration::from_secs(5))
            .acquire()
        {
            Ok(g) => g,
            Err(e) => panic!("W2 (occupy 2 of \"a\", limit 4) was held back behind W1: {e}"),
        };
        assert_eq!(held(&limiter, "a"), 2);
        // One more slot of "a" would leave W1 short once "b" frees.
        assert!(
            limiter.concurrency("a", 1).try_acquire().unwrap().is_none(),
            "try_acquire took a slot of \"a\" that the queued W1 needs"
        );
        assert_eq!(held(&limiter, "a"), 2);
        assert_eq!(waiters(&limiter, "b"), 1);

        // Free "b": W1 now gets both limits.
        drop(hold_b);
        assert!(eventually(QUEUED, || held(&limiter, "a") == 4));
        w1_go.store(true, Ordering::SeqCst);
        let seen = w1.join().unwrap();
        assert_eq!(seen, (4, 2));
        drop(w2);
        for name in ["a", "b"] {
            let info = limiter.limit(name).unwrap();
            assert_eq!((info.held_slots, info.waiters), (0, 0), "{name}");
        }
    });
}

/// As above with a try: W1 waits for "b"; a `try_acquire` of 2 of "a" passes
/// (room for both), a blocking acquire of "a" with occupy 3 must wait.
#[test]
fn try_acquire_passes_a_waiter_it_cannot_delay() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("a", LimitConfig::new(4)).unwrap();
        limiter.create_limit("b", LimitConfig::new(1)).unwrap();
        let hold_b = limiter.concurrency("b", 1).acquire().unwrap();
        let l = limiter.clone();
        let w1 = thread::spawn(move || l.concurrency(["b", "a"], 1).acquire().map(drop));
        assert!(eventually(QUEUED, || waiters(&limiter, "b") == 1));
        assert_eq!(held(&limiter, "a"), 0);

        let passed = limiter.concurrency("a", 3).try_acquire().unwrap();
        assert!(passed.is_some(), "3 of 4 of \"a\" leave room for W1's 1");
        match limiter
            .concurrency("a", 1)
            .timeout(Duration::from_millis(20))
            .acquire()
        {
            Err(Error::Timeout { .. }) => {}
            Ok(_) => panic!("took the last slot of \"a\" that the queued W1 needs"),
            Err(e) => panic!("unexpected error: {e}"),
        }
        drop(hold_b);
        w1.join().unwrap().unwrap();
        drop(passed);
        for name in ["a", "b"] {
            let info = limiter.limit(name).unwrap();
            assert_eq!((info.held_slots, info.waiters), (0, 0), "{name}");
        }
    });
}

/// A later waiter on a different limit is not held back by an earlier waiter
/// that it shares no limit with.
#[test]
fn waiters_on_disjoint_limits_do_not_block_each_other() {
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("a", LimitConfig::new(1)).unwrap();
        limiter.create_limit("b", LimitConfig::new(1)).unwrap();
        let hold_a = limiter.concurrency("a", 1).acquire().unwrap();
        let l = limiter.clone();
        let w = thread::spawn(move || l.concurrency("a", 1).acquire().map(drop));
        assert!(eventually(QUEUED, || waiters(&limiter, "a") == 1));
        let gb = limiter.concurrency("b", 1).try_acquire().unwrap();
        assert!(gb.is_some());
        drop(gb);
        drop(hold_a);
        w.join().unwrap().unwrap();
    });
}
