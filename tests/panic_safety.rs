//! A guard dropped during a panic's unwinding gives its slots back, and the
//! next waiter proceeds.

mod common;

use std::panic::{self, AssertUnwindSafe};
use std::thread;
use std::time::Duration;

use common::{eventually, watchdog, WATCHDOG};
use turnstile::{LimitConfig, Limiter};

const QUEUED: Duration = Duration::from_secs(10);

fn held_waiters(limiter: &Limiter, name: &str) -> (u32, usize) {
    let i = limiter.limit(name).expect("limit exists");
    (i.held_slots, i.waiters)
}

/// Silences the default panic message of the panics these tests cause on
/// purpose (other panics still print).
fn quiet_planned_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let planned = info
                .payload()
                .downcast_ref::<&str>()
                .is_some_and(|s| s.starts_with("planned panic"));
            if !planned {
                default(info);
            }
        }));
    });
}

/// A thread panics while holding a guard; a waiter blocked on that limit
/// proceeds.
#[test]
fn panicking_holder_frees_its_slots_for_a_waiter() {
    quiet_planned_panics();
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("x", LimitConfig::new(1)).unwrap();
        let (held_tx, held_rx) = crossbeam_channel::bounded::<()>(0);
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);

        let l = limiter.clone();
        let holder = thread::spawn(move || {
            let _guard = l.concurrency("x", 1).acquire().unwrap();
            held_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            panic!("planned panic while holding a guard");
        });
        held_rx.recv().unwrap();
        assert_eq!(held_waiters(&limiter, "x"), (1, 0));

        let l = limiter.clone();
        let waiter = thread::spawn(move || {
            let g = l.concurrency("x", 1).acquire().unwrap();
            let seen = l.limit("x").unwrap().held_slots;
            drop(g);
            seen
        });
        assert!(eventually(QUEUED, || held_waiters(&limiter, "x").1 == 1));

        go_tx.send(()).unwrap();
        assert!(holder.join().is_err(), "the holder was meant to panic");
        assert_eq!(waiter.join().unwrap(), 1);
        assert_eq!(held_waiters(&limiter, "x"), (0, 0));
    });
}

/// Several limits and occupy > 1: every slot comes back; waiters on each
/// limit proceed.
#[test]
fn panicking_multi_limit_holder_frees_every_limit() {
    quiet_planned_panics();
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("a", LimitConfig::new(2)).unwrap();
        limiter.create_limit("b", LimitConfig::new(3)).unwrap();
        let (held_tx, held_rx) = crossbeam_channel::bounded::<()>(0);
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);

        let l = limiter.clone();
        let holder = thread::spawn(move || {
            let _guard = l.concurrency(["b", "a"], 2).acquire().unwrap();
            held_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            panic!("planned panic while holding two limits");
        });
        held_rx.recv().unwrap();
        assert_eq!(held_waiters(&limiter, "a"), (2, 0));
        assert_eq!(held_waiters(&limiter, "b"), (2, 0));

        let l = limiter.clone();
        let wa = thread::spawn(move || l.concurrency("a", 2).acquire().map(drop));
        assert!(eventually(QUEUED, || held_waiters(&limiter, "a").1 == 1));
        let l = limiter.clone();
        let wb = thread::spawn(move || l.concurrency("b", 3).acquire().map(drop));
        assert!(eventually(QUEUED, || held_waiters(&limiter, "b").1 == 1));

        go_tx.send(()).unwrap();
        assert!(holder.join().is_err());
        wa.join().unwrap().unwrap();
        wb.join().unwrap().unwrap();
        assert_eq!(held_waiters(&limiter, "a"), (0, 0));
        assert_eq!(held_waiters(&limiter, "b"), (0, 0));
    });
}

/// A panic caught with `catch_unwind` on the same thread: the guard in the
/// unwound frame gave its slots back.
#[test]
fn caught_panic_gives_slots_back() {
    quiet_planned_panics();
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("x", LimitConfig::new(2)).unwrap();
        let keep = limiter.concurrency("x", 1).acquire().unwrap();
        for _ in 0..100 {
            let result = panic::catch_unwind(AssertUnwindSafe(|| {
                let _guard = limiter.concurrency("x", 1).acquire().unwrap();
                assert_eq!(limiter.limit("x").unwrap().held_slots, 2);
                panic!("planned panic in catch_unwind");
            }));
            assert!(result.is_err());
            assert_eq!(held_waiters(&limiter, "x"), (1, 0));
        }
        drop(keep);
        let all = limiter.concurrency("x", 2).try_acquire().unwrap();
        assert!(all.is_some());
    });
}

/// A guard moved into another thread that panics.
#[test]
fn guard_moved_into_a_panicking_thread_is_released() {
    quiet_planned_panics();
    watchdog(WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("x", LimitConfig::new(1)).unwrap();
        let guard = limiter.concurrency("x", 1).acquire().unwrap();
        let l = limiter.clone();
        let waiter = thread::spawn(move || l.concurrency("x", 1).acquire().map(drop));
        assert!(eventually(QUEUED, || held_waiters(&limiter, "x").1 == 1));
        let mover = thread::spawn(move || {
            let _moved = guard;
            panic!("planned panic with a moved guard");
        });
        assert!(mover.join().is_err());
        waiter.join().unwrap().unwrap();
        assert_eq!(held_waiters(&limiter, "x"), (0, 0));
    });
}

/// A tokio task that panics while holding a guard; an async waiter proceeds.
#[test]
fn panicking_task_frees_its_slots_for_an_async_waiter() {
    quiet_planned_panics();
    watchdog(WATCHDOG, || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let limiter = Limiter::in_memory();
            limiter.create_limit("x", LimitConfig::new(1)).unwrap();
            let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
            let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
            let l = limiter.clone();
            let holder = tokio::spawn(async move {
                let _guard = l.concurrency("x", 1).await.unwrap();
                held_tx.send(()).unwrap();
                go_rx.await.unwrap();
                panic!("planned panic in a task");
            });
            held_rx.await.unwrap();
            let l = limiter.clone();
            let waiter = tokio::spawn(async move { l.concurrency("x", 1).await.map(drop) });
            while held_waiters(&limiter, "x").1 != 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            go_tx.send(()).unwrap();
            let err = holder.await.unwrap_err();
            assert!(err.is_panic());
            waiter.await.unwrap().unwrap();
            assert_eq!(held_waiters(&limiter, "x"), (0, 0));
        });
    });
}
