//! The namespace's schema on PostgreSQL: a version 1 namespace is migrated
//! to this build's version in place, keeping its limits and slots; and
//! version 2's
//! pumps, which pass over the waiters that have no room, still grant every
//! waiter that fits, in ticket order, and still count the attempts of those
//! with `max_retries`.
//!
//! Where PostgreSQL is missing these tests say `SKIPPED` and check nothing;
//! under `CI` they fail.

mod common;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::pg::{shared_cluster_or_skip, Cluster};
use common::{eventually, queued, watchdog};
use turnstile::{ConcurrencyGuard, Error, LimitConfig, Limiter};

const WATCHDOG: Duration = Duration::from_secs(120);

fn connect(cluster: &Cluster, ns: &str) -> Limiter {
    Limiter::builder()
        .postgres(cluster.url().as_str())
        .namespace(ns)
        .build()
        .unwrap()
}

/// An acquisition queued on the server (polled once), polled again by
/// [`Pending::ready`].
type Pending<'a> = Pin<Box<dyn Future<Output = Result<ConcurrencyGuard, Error>> + Send + 'a>>;

fn poll(f: &mut Pending<'_>) -> Option<Result<ConcurrencyGuard, Error>> {
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    }
}

/// Polls `f` until it is done (or `within` passes: `None`).
fn done_within(f: &mut Pending<'_>, within: Duration) -> Option<Result<ConcurrencyGuard, Error>> {
    let mut out = None;
    eventually(within, || {
        out = poll(f);
        out.is_some()
    });
    out
}

#[test]
fn a_version_1_namespace_is_migrated_in_place() {
    watchdog(WATCHDOG, || {
        let Some(cluster) = shared_cluster_or_skip("a_version_1_namespace_is_migrated") else {
            return;
        };
        let ns = "migrated_from_v1";
        // The namespace's lock key, as this build computes it (read back
        // from a function it wrote).
        let key = {
            let l = connect(cluster, ns);
            drop(l);
            let def = cluster
                .psql(&format!("SELECT pg_get_functiondef('{ns}.reap'::regproc)"))
                .unwrap();
            let at = def.find("pg_advisory_xact_lock(").unwrap() + 22;
            def[at..].split(',').next().unwrap().trim().to_string()
        };
        // The namespace as a build of version 1 left it: its tables and
        // functions, a limit, and a hold of 2 of its 3 slots by a client of
        // that build that is still registered.
        let v1 = include_str!("../src/postgres/schema_v1.sql")
            .replace("__NS__", &format!("\"{ns}\""))
            .replace("__KEY__", &key);
        cluster
            .psql(&format!(
                "DROP SCHEMA {ns} CASCADE; CREATE SCHEMA {ns}; \
                 CREATE TABLE {ns}.meta (version integer NOT NULL); \
                 INSERT INTO {ns}.meta VALUES (1);"
            ))
            .unwrap();
        let file = std::env::temp_dir().join(format!("turnstile-v1-{}.sql", std::process::id()));
        std::fs::write(&file, v1).unwrap();
        let loaded = std::process::Command::new(cluster.pg_bin().join("psql"))
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &cluster.url(),
                "-f",
            ])
            .arg(&file)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&file);
        assert!(
            loaded.status.success(),
            "{}",
            String::from_utf8_lossy(&loaded.stderr)
        );
        cluster
            .psql(&format!(
                "SELECT {ns}.create_limit('x', 3, true, 0); \
                 SELECT {ns}.register(999, 3600, 1, 'old-build'); \
                 SELECT pg_advisory_lock({key}, 999);"
            ))
            .unwrap();
        let held = cluster
            .psql(&format!(
                "SELECT outcome FROM {ns}.acquire(999, 1, ARRAY['x'], 2, false, false, false, NULL, false)"
            ))
            .unwrap();
        assert_eq!(held, "taken");

        // This build connects: migrated step by step to the version a new
        // namespace gets, everything kept.
        let current = {
            drop(connect(cluster, "fresh_for_version"));
            cluster
                .psql("SELECT version FROM fresh_for_version.meta")
                .unwrap()
        };
        assert!(current.parse::<i32>().unwrap() >= 4, "{current}");
        let l = connect(cluster, ns);
        let version = cluster
            .psql(&format!("SELECT version FROM {ns}.meta"))
            .unwrap();
        assert_eq!(version, current);
        let def = |f: &str| {
            cluster
                .psql(&format!("SELECT pg_get_functiondef('{ns}.{f}'::regproc)"))
                .unwrap()
        };
        // Version 2's pump, 3's tombstones, 4's grant.
        assert!(def("pump").contains("full_on"), "the pump was not replaced");
        assert_eq!(
            cluster
                .psql(&format!("SELECT to_regclass('{ns}.abandoned') IS NOT NULL"))
                .unwrap(),
            "t"
        );
        assert!(
            def("grant").contains("decaying_now(l, greatest(made, l.decaying_at))"),
            "the grant was not replaced"
        );
        let x = l.try_limit("x").unwrap().unwrap();
        assert_eq!((x.limit, x.active_slots), (3, 2));
        // The slot left is there, and no more.
        let g = l
            .concurrency("x", 1)
            .try_acquire()
            .unwrap()
            .expect("the free slot");
        assert!(l.concurrency("x", 1).try_acquire().unwrap().is_none());
        drop(g);
        l.flush().unwrap();
        // Connecting again finds the same version and changes nothing.
        drop(connect(cluster, ns));
        assert_eq!(
            cluster
                .psql(&format!("SELECT version FROM {ns}.meta"))
                .unwrap(),
            current
        );
        assert_eq!(l.try_limit("x").unwrap().unwrap().active_slots, 2);
    });
}

#[test]
fn pumps_pass_over_waiters_without_room_but_grant_every_one_that_fits() {
    watchdog(WATCHDOG, || {
        let Some(cluster) = shared_cluster_or_skip("pumps_pass_over_waiters") else {
            return;
        };
        let l = connect(cluster, "pump_skips");
        l.create_limit("x", LimitConfig::new(2)).unwrap();
        l.create_limit("y", LimitConfig::new(1)).unwrap();
        // x: 2 of 2 held (one hold on x and y, one on x); y: 1 of 1.
        let both = l.concurrency(["x", "y"], 1).acquire().unwrap();
        let one = l.concurrency("x", 1).acquire().unwrap();

        // Queued in this order:
        //   a: 2 of x         (no room on x until both holds are gone)
        //   b: 1 of x         (behind a on x)
        //   c: 1 of x         (behind a and b on x)
        //   d: 1 of y         (first on y: fits once y is free)
        // (A waiter on x and y behind a would hold d back: it is ahead of
        // d on y, and its place there is kept while it waits for x.)
        let mut a: Pending = Box::pin(l.concurrency("x", 2).into_future());
        let mut b: Pending = Box::pin(l.concurrency("x", 1).into_future());
        let mut c: Pending = Box::pin(l.concurrency("x", 1).into_future());
        let mut d: Pending = Box::pin(l.concurrency("y", 1).into_future());
        for f in [&mut a, &mut b, &mut c, &mut d] {
            assert!(poll(f).is_none());
        }
        queued(&l, "x", 3);
        queued(&l, "y", 1);

        // Releasing the hold on x and y: x has 1 free slot, y 1. a (2 of
        // x) has no room, so b and c are passed over on x; d fits on y.
        drop(both);
        let got_d = done_within(&mut d, Duration::from_secs(10))
            .expect("d, alone on y, was not granted")
            .unwrap();
        for (name, f) in [("a", &mut a), ("b", &mut b), ("c", &mut c)] {
            assert!(poll(f).is_none(), "{name} was granted out of turn");
        }
        // The other hold on x: a fits (2 of 2), nobody else.
        drop(got_d);
        drop(one);
        let got_a = done_within(&mut a, Duration::from_secs(10))
            .expect("a was not granted")
            .unwrap();
        for (name, f) in [("b", &mut b), ("c", &mut c)] {
            assert!(poll(f).is_none(), "{name} was granted out of turn");
        }
        drop(got_a);
        // a's release: b fits, then c (x: 2 of 2).
        let got_b = done_within(&mut b, Duration::from_secs(10))
            .expect("b was not granted")
            .unwrap();
        let got_c = done_within(&mut c, Duration::from_secs(10)).expect("c was not granted");
        assert!(got_c.is_ok(), "{got_c:?}");
        drop((got_b, got_c));
        l.flush().unwrap();
        for name in ["x", "y"] {
            let info = l.try_limit(name).unwrap().unwrap();
            assert_eq!(info.active_slots, 0, "{name}");
        }
    });
}

#[test]
fn attempts_are_counted_behind_a_waiter_without_room() {
    watchdog(WATCHDOG, || {
        let Some(cluster) = shared_cluster_or_skip("attempts_are_counted_behind") else {
            return;
        };
        let l = connect(cluster, "pump_counts");
        l.create_limit("x", LimitConfig::new(2)).unwrap();
        let holds: Vec<_> = (0..2)
            .map(|_| l.concurrency("x", 1).acquire().unwrap())
            .collect();
        // a: 2 of x, waits for both holds; r: 1 of x with one retry, behind
        // a: each release is a wake-up that counts.
        let mut a: Pending = Box::pin(l.concurrency("x", 2).into_future());
        let mut r: Pending = Box::pin(l.concurrency("x", 1).max_retries(1).into_future());
        assert!(poll(&mut a).is_none());
        assert!(poll(&mut r).is_none());
        queued(&l, "x", 2);
        let mut holds = holds.into_iter();
        // First release: a still has no room, so r has none either; it is
        // not passed over all the same, as its attempt counts: its second
        // and last (1 + 1 retry), and it fails.
        drop(holds.next());
        let out =
            done_within(&mut r, Duration::from_secs(10)).expect("r neither granted nor failed");
        assert!(
            matches!(out, Err(Error::RetriesExhausted { .. })),
            "{out:?}"
        );
        assert!(poll(&mut a).is_none());
        // Second release: a fits.
        drop(holds.next());
        let got_a = done_within(&mut a, Duration::from_secs(10)).expect("a not granted");
        assert!(got_a.is_ok());
    });
}
