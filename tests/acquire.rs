//! Basic acquisition semantics of `concurrency(..)`: holding, releasing,
//! options, missing and inactive limits, waiting, events.

mod common;

use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use turnstile::{ConcurrencyGuard, Error, Event, LimitConfig, LimitInfo, LimitUpdate, Limiter};

fn info(limiter: &Limiter, name: &str) -> LimitInfo {
    limiter
        .limit(name)
        .unwrap_or_else(|| panic!("limit {name:?} should exist"))
}

fn held(limiter: &Limiter, name: &str) -> u32 {
    info(limiter, name).held_slots
}

fn waiters(limiter: &Limiter, name: &str) -> usize {
    limiter.limit(name).map_or(0, |i| i.waiters)
}

/// Waits (bounded by the watchdog's patience) until `name` has `n` waiters.
fn wait_for_waiters(limiter: &Limiter, name: &str, n: usize) {
    assert!(
        common::eventually(common::WATCHDOG, || waiters(limiter, name) == n),
        "limit {name:?} never had {n} waiter(s); it has {}",
        waiters(limiter, name)
    );
}

/// Spawns a thread running a blocking acquisition built by `f`.
fn spawn_acquire(
    limiter: &Limiter,
    f: impl FnOnce(&Limiter) -> Result<ConcurrencyGuard, Error> + Send + 'static,
) -> thread::JoinHandle<Result<ConcurrencyGuard, Error>> {
    let limiter = limiter.clone();
    thread::spawn(move || f(&limiter))
}

fn observed() -> (Limiter, Arc<Mutex<Vec<Event>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let limiter = Limiter::builder()
        .on_event(move |e: &Event| sink.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    (limiter, events)
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

#[test]
fn hold_and_release() {
    let limiter = Limiter::in_memory();
    limiter.create_limit("gpu", LimitConfig::new(2)).unwrap();
    let first: ConcurrencyGuard = limiter.concurrency("gpu", 1).acquire().unwrap();
    assert_eq!(held(&limiter, "gpu"), 1);
    assert_eq!(info(&limiter, "gpu").active_slots, 1);
    let second = limiter.concurrency("gpu", 1).acquire().unwrap();
    assert_eq!(held(&limiter, "gpu"), 2);
    assert!(limiter
        .concurrency("gpu", 1)
        .try_acquire()
        .unwrap()
        .is_none());

    drop(first);
    assert_eq!(held(&limiter, "gpu"), 1);

    thread::sleep(Duration::from_millis(20));
    let held_for: Duration = second.release();
    assert!(held_for >= Duration::from_millis(20), "{held_for:?}");
    assert_eq!(held(&limiter, "gpu"), 0);
    assert_eq!(info(&limiter, "gpu").active_slots, 0);

    // Room again for both.
    let both = limiter.concurrency("gpu", 2).try_acquire().unwrap();
    assert!(both.is_some());
}

#[test]
fn weighted_occupy() {
    let limiter = Limiter::in_memory();
    limiter.create_limit("pool", LimitConfig::new(5)).unwrap();
    let big = limiter.concurrency("pool", 3).acquire().unwrap();
    assert_eq!(held(&limiter, "pool"), 3);
    assert!(limiter
        .concurrency("pool", 3)
        .try_acquire()
        .unwrap()
        .is_none());
    let small = limiter
        .concurrency("pool", 2)
        .try_acquire()
        .unwrap()
        .unwrap();
    assert_eq!(held(&limiter, "pool"), 5);
    drop(big);
    assert_eq!(held(&limiter, "pool"), 2);
    drop(small);
    assert_eq!(held(&limiter, "pool"), 0);
}

#[test]
fn several_limits_take_from_each() {
    let limiter = Limiter::in_memory();
    limiter.create_limit("a", LimitConfig::new(3)).unwrap();
    limiter.create_limit("b", LimitConfig::new(2)).unwrap();
    let guard = limiter.concurrency(["a", "b"], 2).acquire().unwrap();
    assert_eq!(held(&limiter, "a"), 2);
    assert_eq!(held(&limiter, "b"), 2);
    // "a" has room, "b" not: all or nothing.
    assert!(limiter
        .concurrency(["a", "b"], 1)
        .try_acquire()
        .unwrap()
        .is_none());
    assert_eq!(held(&limiter, "a"), 2);
    drop(guard);
    assert_eq!(held(&limiter, "a"), 0);
    assert_eq!(held(&limiter, "b"), 0);
}

#[test]
fn every_names_form_works() {
    let limiter = Limiter::in_memory();
    limiter.create_limit("a", LimitConfig::new(1)).unwrap();
    limiter.create_limit("b", LimitConfig::new(1)).unwrap();

    let check_both = |guard: ConcurrencyGuard| {
        assert_eq!(held(&limiter, "a"), 1);
        assert_eq!(held(&limiter, "b"), 1);
        drop(guard);
        assert_eq!(held(&limiter, "a"), 0);
        assert_eq!(held(&limiter, "b"), 0);
    };

    // &str
    let g = limiter.concurrency("a", 1).acquire().unwrap();
    assert_eq!(held(&limiter, "a"), 1);
    assert_eq!(held(&limiter, "b"), 0);
    drop(g);
    // String
    let g = limiter.concurrency(String::from("b"), 1).acquire().unwrap();
    assert_eq!(held(&limiter, "b"), 1);
    assert_eq!(held(&limiter, "a"), 0);
    drop(g);
    // &[&str]
    let slice: &[&str] = &["a", "b"];
    check_both(limiter.concurrency(slice, 1).acquire().unwrap());
    // [&str; N]
    check_both(limiter.concurrency(["a", "b"], 1).acquire().unwrap());
    // Vec<&str>
    check_both(limiter.concurrency(vec!["a", "b"], 1).acquire().unwrap());
    // Vec<String>
    let owned: Vec<String> = vec!["a".to_string(), "b".to_string()];
    check_both(limiter.concurrency(owned.clone(), 1).acquire().unwrap());
    // &[String]
    check_both(limiter.concurrency(&owned[..], 1).acquire().unwrap());
    // And for try_acquire.
    check_both(
        limiter
            .concurrency(owned, 1)
            .try_acquire()
            .unwrap()
            .unwrap(),
    );
}

#[test]
fn duplicate_names_count_once() {
    let limiter = Limiter::in_memory();
    limiter.create_limit("a", LimitConfig::new(1)).unwrap();
    limiter.create_limit("b", LimitConfig::new(2)).unwrap();
    let guard = limiter.concurrency(["a", "a"], 1).acquire().unwrap();
    assert_eq!(held(&limiter, "a"), 1);
    drop(guard);
    assert_eq!(held(&limiter, "a"), 0);

    let guard = limiter
        .concurrency(vec!["b", "a", "b", "a", "b"], 1)
        .try_acquire()
        .unwrap()
        .expect("duplicates must not ask for more than the limit");
    assert_eq!(held(&limiter, "a"), 1);
    assert_eq!(held(&limiter, "b"), 1);
    drop(guard);

    let guard = limiter.concurrency(["b", "b", "b"], 2).acquire().unwrap();
    assert_eq!(held(&limiter, "b"), 2);
    drop(guard);
    assert_eq!(held(&limiter, "b"), 0);
}

#[test]
fn no_names_succeeds_at_once_and_holds_nothing() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("a", LimitConfig::new(1)).unwrap();
        let _full = limiter.concurrency("a", 1).acquire().unwrap();

        let none: Vec<&str> = Vec::new();
        let guard = limiter.concurrency(none, 1).acquire().unwrap();
        let empty: &[&str] = &[];
        let other = limiter.concurrency(empty, 5).try_acquire().unwrap();
        assert!(other.is_some());
        let strict = limiter
            .concurrency(Vec::<String>::new(), 1)
            .strict(true)
            .acquire()
            .unwrap();
        drop((guard, other, strict));
        assert_eq!(limiter.limits().len(), 1);
        assert_eq!(held(&limiter, "a"), 1);
    });
}

#[test]
fn missing_limits_are_created_inactive_with_limit_one_by_default() {
    let limiter = Limiter::in_memory();
    let first = limiter.concurrency("new", 1).acquire().unwrap();
    let created = info(&limiter, "new");
    assert!(!created.active);
    assert_eq!(created.limit, 1);
    assert_eq!(created.held_slots, 0);
    assert_eq!(created.slot_decay_per_second, 0.0);
    // Inactive: more pass than the limit would allow.
    let second = limiter.concurrency("new", 1).try_acquire().unwrap();
    assert!(second.is_some());
    let third = limiter
        .concurrency("new", 1)
        .create_if_missing(true)
        .acquire()
        .unwrap();
    assert_eq!(held(&limiter, "new"), 0);
    drop((first, second, third));
    assert_eq!(limiter.limits().len(), 1);

    // Once an operator activates it, it counts.
    limiter
        .update_limit("new", LimitUpdate::new().active(true))
        .unwrap();
    let guard = limiter.concurrency("new", 1).acquire().unwrap();
    assert_eq!(held(&limiter, "new"), 1);
    assert!(limiter
        .concurrency("new", 1)
        .try_acquire()
        .unwrap()
        .is_none());
    drop(guard);
}

#[test]
fn create_if_missing_false_skips_the_name() {
    let limiter = Limiter::in_memory();
    limiter.create_limit("a", LimitConfig::new(1)).unwrap();
    let guard = limiter
        .concurrency(["a", "ghost"], 1)
        .create_if_missing(false)
        .acquire()
        .unwrap();
    assert!(limiter.limit("ghost").is_none());
    assert_eq!(held(&limiter, "a"), 1);
    drop(guard);
    let alone = limiter
        .concurrency("ghost", 3)
        .create_if_missing(false)
        .try_acquire()
        .unwrap();
    assert!(alone.is_some());
    assert!(limiter.limit("ghost").is_none());
    assert_eq!(limiter.limits().len(), 1);
}

#[test]
fn inactive_limits_pass_through() {
    let limiter = Limiter::in_memory();
    limiter
        .create_limit("off", LimitConfig::new(1).active(false))
        .unwrap();
    limiter.create_limit("on", LimitConfig::new(3)).unwrap();
    let guards: Vec<ConcurrencyGuard> = (0..3)
        .map(|_| limiter.concurrency(["off", "on"], 1).acquire().unwrap())
        .collect();
    let off = info(&limiter, "off");
    assert_eq!(off.held_slots, 0);
    assert_eq!(off.active_slots, 0);
    assert_eq!(held(&limiter, "on"), 3);
    drop(guards);
    assert_eq!(held(&limiter, "on"), 0);
    assert_eq!(held(&limiter, "off"), 0);
}

#[test]
fn limit_zero_pauses() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("p", LimitConfig::new(0)).unwrap();
        assert!(limiter.concurrency("p", 1).try_acquire().unwrap().is_none());

        let start = Instant::now();
        let err = limiter
            .concurrency("p", 1)
            .timeout(Duration::from_millis(30))
            .acquire()
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert_eq!(waiters(&limiter, "p"), 0);

        let waiter = spawn_acquire(&limiter, |l| l.concurrency("p", 1).acquire());
        wait_for_waiters(&limiter, "p", 1);
        assert!(!waiter.is_finished());
        limiter
            .update_limit("p", LimitUpdate::new().limit(1))
            .unwrap();
        let guard = waiter.join().unwrap().unwrap();
        assert_eq!(held(&limiter, "p"), 1);
        assert_eq!(waiters(&limiter, "p"), 0);
        drop(guard);
        assert_eq!(held(&limiter, "p"), 0);
    });
}

#[test]
fn lowering_a_limit_below_a_waiters_occupy_fails_it() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(3)).unwrap();
        let holder = limiter.concurrency("gpu", 1).acquire().unwrap();
        let waiter = spawn_acquire(&limiter, |l| l.concurrency("gpu", 3).acquire());
        wait_for_waiters(&limiter, "gpu", 1);

        limiter
            .update_limit("gpu", LimitUpdate::new().limit(2))
            .unwrap();
        let err = waiter.join().unwrap().unwrap_err();
        assert!(matches!(err, Error::OccupyExceedsLimit { .. }), "{err:?}");
        assert_eq!(waiters(&limiter, "gpu"), 0);
        assert_eq!(held(&limiter, "gpu"), 1);
        drop(holder);
        assert_eq!(held(&limiter, "gpu"), 0);
    });
}

#[test]
fn lowering_a_limit_below_held_slots_keeps_holders_and_newcomers_wait() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(3)).unwrap();
        let a = limiter.concurrency("gpu", 1).acquire().unwrap();
        let b = limiter.concurrency("gpu", 1).acquire().unwrap();
        let c = limiter.concurrency("gpu", 1).acquire().unwrap();
        limiter
            .update_limit("gpu", LimitUpdate::new().limit(2))
            .unwrap();
        assert_eq!(held(&limiter, "gpu"), 3);
        drop(a);
        // 2 held, limit 2: still no room.
        assert!(limiter
            .concurrency("gpu", 1)
            .try_acquire()
            .unwrap()
            .is_none());
        let waiter = spawn_acquire(&limiter, |l| l.concurrency("gpu", 1).acquire());
        wait_for_waiters(&limiter, "gpu", 1);
        drop(b);
        let guard = waiter.join().unwrap().unwrap();
        assert_eq!(held(&limiter, "gpu"), 2);
        drop((c, guard));
        assert_eq!(held(&limiter, "gpu"), 0);
    });
}

#[test]
fn deactivating_a_limit_lets_its_waiters_through() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
        let holder = limiter.concurrency("gpu", 1).acquire().unwrap();
        let w1 = spawn_acquire(&limiter, |l| l.concurrency("gpu", 1).acquire());
        let w2 = spawn_acquire(&limiter, |l| l.concurrency("gpu", 1).acquire());
        wait_for_waiters(&limiter, "gpu", 2);

        limiter
            .update_limit("gpu", LimitUpdate::new().active(false))
            .unwrap();
        let g1 = w1.join().unwrap().unwrap();
        let g2 = w2.join().unwrap().unwrap();
        assert_eq!(waiters(&limiter, "gpu"), 0);
        drop((g1, g2, holder));
    });
}

#[test]
fn deleting_a_limit_under_blocked_waiters() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("x", LimitConfig::new(1)).unwrap();
        let holder = limiter.concurrency("x", 1).acquire().unwrap();
        let strict = spawn_acquire(&limiter, |l| l.concurrency("x", 1).strict(true).acquire());
        wait_for_waiters(&limiter, "x", 1);
        let lenient = spawn_acquire(&limiter, |l| l.concurrency("x", 1).acquire());
        let skip = spawn_acquire(&limiter, |l| {
            l.concurrency("x", 1).create_if_missing(false).acquire()
        });
        wait_for_waiters(&limiter, "x", 3);

        limiter.delete_limit("x").unwrap();
        let err = strict.join().unwrap().unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains('x'), "{err}");
        let g1 = lenient.join().unwrap().unwrap();
        let g2 = skip.join().unwrap().unwrap();
        drop((g1, g2, holder));
    });
}

#[test]
fn try_acquire_on_a_full_limit_is_none() {
    let limiter = Limiter::in_memory();
    limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
    let guard = limiter.concurrency("gpu", 1).try_acquire().unwrap();
    assert!(guard.is_some());
    assert!(limiter
        .concurrency("gpu", 1)
        .try_acquire()
        .unwrap()
        .is_none());
    assert_eq!(held(&limiter, "gpu"), 1);
    assert_eq!(waiters(&limiter, "gpu"), 0);
    drop(guard);
    assert!(limiter
        .concurrency("gpu", 1)
        .try_acquire()
        .unwrap()
        .is_some());
}

#[test]
fn timeout_zero_is_one_attempt() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
        let guard = limiter
            .concurrency("gpu", 1)
            .timeout(Duration::ZERO)
            .acquire()
            .unwrap();
        let err = limiter
            .concurrency("gpu", 1)
            .timeout(Duration::ZERO)
            .acquire()
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert!(err.is_timeout());
        assert_eq!(waiters(&limiter, "gpu"), 0);
        assert_eq!(held(&limiter, "gpu"), 1);
        drop(guard);
    });
}

#[test]
fn timeout_on_a_full_limit_waits_at_least_that_long_and_leaves_nothing() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("a", LimitConfig::new(2)).unwrap();
        limiter.create_limit("b", LimitConfig::new(1)).unwrap();
        let holder = limiter.concurrency("b", 1).acquire().unwrap();

        let d = Duration::from_millis(100);
        let start = Instant::now();
        let err = limiter
            .concurrency(["a", "b"], 1)
            .timeout(d)
            .acquire()
            .unwrap_err();
        let elapsed = start.elapsed();
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert!(elapsed >= d, "gave up after {elapsed:?}, before {d:?}");
        for name in ["a", "b"] {
            assert_eq!(waiters(&limiter, name), 0, "{name}");
        }
        assert_eq!(held(&limiter, "a"), 0);
        assert_eq!(held(&limiter, "b"), 1);

        // Nothing stuck: once "b" is free, everything fits at once.
        drop(holder);
        let guard = limiter
            .concurrency(["a", "b"], 1)
            .timeout(Duration::ZERO)
            .acquire()
            .unwrap();
        assert_eq!(held(&limiter, "a"), 1);
        drop(guard);
    });
}

#[test]
fn a_timeout_that_is_long_enough_gets_the_slots() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
        let holder = limiter.concurrency("gpu", 1).acquire().unwrap();
        let waiter = spawn_acquire(&limiter, |l| {
            l.concurrency("gpu", 1)
                .timeout(Duration::from_secs(3600))
                .acquire()
        });
        wait_for_waiters(&limiter, "gpu", 1);
        drop(holder);
        let guard = waiter.join().unwrap().unwrap();
        assert_eq!(held(&limiter, "gpu"), 1);
        drop(guard);
    });
}

#[test]
fn max_retries_zero_on_a_full_limit_fails_at_once() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
        let guard = limiter
            .concurrency("gpu", 1)
            .max_retries(0)
            .acquire()
            .unwrap();
        let err = limiter
            .concurrency("gpu", 1)
            .max_retries(0)
            .acquire()
            .unwrap_err();
        assert!(matches!(err, Error::RetriesExhausted { .. }), "{err:?}");
        assert!(!err.is_timeout());
        assert!(err.to_string().contains("gpu"), "{err}");
        assert_eq!(waiters(&limiter, "gpu"), 0);
        assert_eq!(held(&limiter, "gpu"), 1);
        drop(guard);
    });
}

#[test]
fn max_retries_counts_wake_ups_that_still_do_not_fit() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("a", LimitConfig::new(30)).unwrap();
        limiter.create_limit("b", LimitConfig::new(2)).unwrap();
        // "b" stays full for the whole test; "a" has plenty of room.
        let b_holder = limiter.concurrency("b", 1).acquire().unwrap();
        let mut a_holders: Vec<ConcurrencyGuard> = (0..20)
            .map(|_| limiter.concurrency("a", 1).acquire().unwrap())
            .collect();

        let waiter = spawn_acquire(&limiter, |l| {
            l.concurrency(["a", "b"], 2).max_retries(2).acquire()
        });
        wait_for_waiters(&limiter, "b", 1);
        // First attempt denied, two retries left: still waiting.
        assert!(!waiter.is_finished());

        // Each release on "a" wakes the waiter, which checks again and still
        // does not fit because "b" is full. Release one at a time, giving
        // the waiter the chance to count each.
        let mut releases = 0;
        while !waiter.is_finished() {
            let guard = a_holders
                .pop()
                .expect("the waiter never ran out of retries after 20 wake-ups");
            drop(guard);
            releases += 1;
            common::eventually(Duration::from_millis(100), || waiter.is_finished());
        }
        let err = waiter.join().unwrap().unwrap_err();
        assert!(matches!(err, Error::RetriesExhausted { .. }), "{err:?}");
        assert!(!err.is_timeout());
        assert!(releases >= 2, "gave up after only {releases} wake-up(s)");
        assert_eq!(waiters(&limiter, "a"), 0);
        assert_eq!(waiters(&limiter, "b"), 0);
        assert_eq!(held(&limiter, "b"), 1);
        assert_eq!(held(&limiter, "a"), a_holders.len() as u32);
        drop(b_holder);
    });
}

#[test]
fn max_retries_is_not_used_up_when_it_fits() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
        let holder = limiter.concurrency("gpu", 1).acquire().unwrap();
        let waiter = spawn_acquire(&limiter, |l| {
            l.concurrency("gpu", 1).max_retries(1).acquire()
        });
        wait_for_waiters(&limiter, "gpu", 1);
        // The first wake-up is a release that makes room: it is granted.
        drop(holder);
        let guard = waiter.join().unwrap().unwrap();
        assert_eq!(held(&limiter, "gpu"), 1);
        drop(guard);
    });
}

#[test]
fn denied_slots_grow_once_per_denied_acquisition() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(3)).unwrap();
        // Fitting at once denies nothing.
        let g1 = limiter.concurrency("gpu", 1).acquire().unwrap();
        let g2 = limiter.concurrency("gpu", 1).acquire().unwrap();
        let g3 = limiter.concurrency("gpu", 1).acquire().unwrap();
        assert_eq!(info(&limiter, "gpu").denied_slots, 0);

        // A refused try counts, by its occupy.
        assert!(limiter
            .concurrency("gpu", 2)
            .try_acquire()
            .unwrap()
            .is_none());
        assert_eq!(info(&limiter, "gpu").denied_slots, 2);
        // So does a one-attempt timeout.
        let err = limiter
            .concurrency("gpu", 1)
            .timeout(Duration::ZERO)
            .acquire()
            .unwrap_err();
        assert!(err.is_timeout());
        assert_eq!(info(&limiter, "gpu").denied_slots, 3);

        // A waiter woken twice without room, then granted: counted once.
        let waiter = spawn_acquire(&limiter, |l| l.concurrency("gpu", 3).acquire());
        wait_for_waiters(&limiter, "gpu", 1);
        assert_eq!(info(&limiter, "gpu").denied_slots, 6);
        drop(g1);
        drop(g2);
        assert_eq!(info(&limiter, "gpu").denied_slots, 6);
        assert!(!waiter.is_finished());
        drop(g3);
        let guard = waiter.join().unwrap().unwrap();
        assert_eq!(info(&limiter, "gpu").denied_slots, 6);
        drop(guard);

        // Each limit that was asked counts it.
        limiter.create_limit("other", LimitConfig::new(5)).unwrap();
        let full = limiter.concurrency("gpu", 3).acquire().unwrap();
        assert!(limiter
            .concurrency(["gpu", "other"], 2)
            .try_acquire()
            .unwrap()
            .is_none());
        assert_eq!(info(&limiter, "gpu").denied_slots, 8);
        drop(full);
    });
}

#[test]
fn events_for_acquire_and_release() {
    let (limiter, events) = observed();
    limiter.create_limit("a", LimitConfig::new(2)).unwrap();
    limiter.create_limit("b", LimitConfig::new(3)).unwrap();
    limiter
        .create_limit("off", LimitConfig::new(1).active(false))
        .unwrap();

    let guard = limiter
        .concurrency(["b", "off", "a", "ghost"], 2)
        .create_if_missing(false)
        .acquire()
        .unwrap();
    {
        let seen = events.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        match &seen[0] {
            Event::Acquired {
                names,
                occupy,
                rate_limit,
                ..
            } => {
                assert_eq!(sorted(names.clone()), ["a", "b"]);
                assert_eq!(*occupy, 2);
                assert!(!*rate_limit);
            }
            other => panic!("expected Acquired, got {other:?}"),
        }
    }

    thread::sleep(Duration::from_millis(20));
    let held_for = guard.release();
    let seen = events.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    match &seen[1] {
        Event::Released {
            names,
            occupy,
            held,
            ..
        } => {
            assert_eq!(sorted(names.clone()), ["a", "b"]);
            assert_eq!(*occupy, 2);
            assert!(*held >= Duration::from_millis(20), "{held:?}");
            let diff = held.abs_diff(held_for);
            assert!(diff < Duration::from_millis(50), "{held:?} vs {held_for:?}");
        }
        other => panic!("expected Released, got {other:?}"),
    }
}

#[test]
fn acquired_event_reports_the_wait() {
    common::watchdog(common::WATCHDOG, || {
        let (limiter, events) = observed();
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
        let holder = limiter.concurrency("gpu", 1).acquire().unwrap();
        let waiter = spawn_acquire(&limiter, |l| l.concurrency("gpu", 1).acquire());
        wait_for_waiters(&limiter, "gpu", 1);
        thread::sleep(Duration::from_millis(30));
        drop(holder);
        let guard = waiter.join().unwrap().unwrap();
        let acquired = || -> Vec<Event> {
            events
                .lock()
                .unwrap()
                .iter()
                .filter(|e| matches!(e, Event::Acquired { .. }))
                .cloned()
                .collect()
        };
        assert!(
            common::eventually(common::WATCHDOG, || acquired().len() == 2),
            "{:?}",
            events.lock().unwrap()
        );
        let waited: Vec<Duration> = acquired()
            .into_iter()
            .map(|e| match e {
                Event::Acquired { waited, .. } => waited,
                _ => unreachable!(),
            })
            .collect();
        // The holder did not wait noticeably; the waiter waited 30 ms or more.
        assert!(
            waited.iter().any(|w| *w >= Duration::from_millis(30)),
            "{waited:?}"
        );
        let released = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, Event::Released { .. }))
            .count();
        assert_eq!(released, 1);
        drop(guard);
    });
}

#[test]
fn events_leave_out_inactive_limits_and_rate_limit_emits_only_acquired() {
    let (limiter, events) = observed();
    limiter
        .create_limit("api", LimitConfig::new(5).slot_decay_per_second(1.0))
        .unwrap();
    limiter
        .create_limit("off", LimitConfig::new(1).active(false))
        .unwrap();
    limiter.rate_limit(["api", "off"], 2).acquire().unwrap();
    assert!(limiter.rate_limit("api", 1).try_acquire().unwrap());
    let seen = events.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (event, want) in seen.iter().zip([2, 1]) {
        match event {
            Event::Acquired {
                names,
                occupy,
                rate_limit,
                ..
            } => {
                assert_eq!(names, &["api"]);
                assert_eq!(*occupy, want);
                assert!(*rate_limit);
            }
            other => panic!("expected Acquired, got {other:?}"),
        }
    }

    // An inactive-only acquisition holds nothing and its release gives back
    // to no limit: whatever events it emits name no limit.
    let guard = limiter.concurrency("off", 1).acquire().unwrap();
    drop(guard);
    let seen = events.lock().unwrap().clone();
    for event in &seen[2..] {
        match event {
            Event::Acquired { names, .. } | Event::Released { names, .. } => {
                assert!(names.is_empty(), "{event:?}")
            }
            _ => {}
        }
    }
    assert!(!seen
        .iter()
        .any(|e| matches!(e, Event::Released { names, .. } if !names.is_empty())));
}

#[test]
fn clones_share_one_registry() {
    let limiter = Limiter::in_memory();
    let clone = limiter.clone();
    clone.create_limit("gpu", LimitConfig::new(1)).unwrap();
    assert_eq!(info(&limiter, "gpu").limit, 1);
    let guard = clone.concurrency("gpu", 1).acquire().unwrap();
    assert_eq!(held(&limiter, "gpu"), 1);
    assert!(limiter
        .concurrency("gpu", 1)
        .try_acquire()
        .unwrap()
        .is_none());
    drop(clone);
    // The guard keeps working after the clone it came from is gone.
    drop(guard);
    assert_eq!(held(&limiter, "gpu"), 0);
    limiter.delete_limit("gpu").unwrap();
}

#[test]
fn a_guard_can_move_to_another_thread() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
        let guard = limiter.concurrency("gpu", 1).acquire().unwrap();
        let (tx, rx) = mpsc::channel();
        let worker = thread::spawn(move || {
            let _guard = guard;
            tx.send(()).unwrap();
        });
        rx.recv().unwrap();
        worker.join().unwrap();
        assert_eq!(held(&limiter, "gpu"), 0);

        // And released there explicitly.
        let guard = limiter.concurrency("gpu", 1).acquire().unwrap();
        thread::spawn(move || guard.release()).join().unwrap();
        assert_eq!(held(&limiter, "gpu"), 0);
    });
}

#[test]
fn a_panic_releases_the_slots_while_unwinding() {
    let limiter = Limiter::in_memory();
    limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
    let inner = limiter.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _guard = inner.concurrency("gpu", 1).acquire().unwrap();
        assert_eq!(inner.limit("gpu").unwrap().held_slots, 1);
        panic!("boom while holding a slot");
    }));
    assert!(result.is_err());
    assert_eq!(held(&limiter, "gpu"), 0);
    assert!(limiter
        .concurrency("gpu", 1)
        .try_acquire()
        .unwrap()
        .is_some());
}

#[test]
fn a_panic_while_holding_wakes_a_waiter() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
        let (tx, rx) = mpsc::channel::<()>();
        let panicker = {
            let limiter = limiter.clone();
            thread::spawn(move || {
                let _guard = limiter.concurrency("gpu", 1).acquire().unwrap();
                // Wait for the go-ahead, then die holding the slot.
                rx.recv().unwrap();
                panic!("worker died holding a slot");
            })
        };
        assert!(common::eventually(common::WATCHDOG, || held(
            &limiter, "gpu"
        ) == 1));
        let waiter = spawn_acquire(&limiter, |l| l.concurrency("gpu", 1).acquire());
        wait_for_waiters(&limiter, "gpu", 1);
        tx.send(()).unwrap();
        assert!(panicker.join().is_err());
        let guard = waiter.join().unwrap().unwrap();
        assert_eq!(held(&limiter, "gpu"), 1);
        drop(guard);
    });
}
