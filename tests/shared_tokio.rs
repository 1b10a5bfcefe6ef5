//! Regression: a shared (PostgreSQL) acquisition awaited under tokio. Its
//! future made its database calls with the blocking `postgres` client
//! inside `poll`, whose own `block_on` panics within a tokio runtime
//! ("Cannot start a runtime from within a runtime"), and a second panic
//! while unwinding aborted the process. API.md promises that any executor
//! works and that `tokio::spawn` takes the futures.
//!
//! Where PostgreSQL is missing this says `SKIPPED`; under `CI` it fails.

#![cfg(feature = "postgres")]

mod common;

use std::future::IntoFuture;
use std::time::Duration;

use common::pg::shared_cluster_or_skip;
use common::{watchdog, WATCHDOG};
use turnstile::{LimitConfig, Limiter};

fn limiter(test: &str, ns: &str) -> Option<Limiter> {
    let url = shared_cluster_or_skip(test)?.url();
    let l = Limiter::builder()
        .postgres(url.as_str())
        .namespace(ns)
        .build()
        .unwrap();
    l.create_limit("x", LimitConfig::new(1)).unwrap();
    l.create_limit("r", LimitConfig::new(1).slot_decay_per_second(50.0))
        .unwrap();
    Some(l)
}

/// Awaited, queued behind a holder, timed out, cancelled, and rate-limited,
/// under `rt`.
async fn every_kind(l: Limiter) {
    let g = l.concurrency("x", 1).into_future().await.unwrap();
    // Queued behind `g`, given up by its timeout.
    let err = l
        .concurrency("x", 1)
        .timeout(Duration::from_millis(50))
        .into_future()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    // Queued, then cancelled by tokio.
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        l.concurrency("x", 1).into_future(),
    )
    .await;
    assert!(cancelled.is_err());
    drop(g);
    let g = l.concurrency("x", 1).into_future().await.unwrap();
    drop(g);
    for _ in 0..3 {
        l.rate_limit("r", 1).into_future().await.unwrap();
    }
}

#[test]
fn a_shared_acquisition_awaited_under_tokio_current_thread() {
    watchdog(WATCHDOG, || {
        let Some(l) = limiter("tokio_current_thread", "tokio_current") else {
            return;
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(every_kind(l.clone()));
        l.flush().unwrap();
        assert_eq!(l.limit("x").unwrap().held_slots, 0);
    });
}

#[test]
fn a_shared_acquisition_spawned_on_tokio_multi_thread() {
    watchdog(WATCHDOG, || {
        let Some(l) = limiter("tokio_multi_thread", "tokio_multi") else {
            return;
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let task = l.clone();
        rt.block_on(async move { tokio::spawn(every_kind(task)).await })
            .unwrap();
        l.flush().unwrap();
        assert_eq!(l.limit("x").unwrap().held_slots, 0);
    });
}
