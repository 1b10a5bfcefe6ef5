//! Invalid input: each gets its named error variant, and nothing changes.

mod common;

use std::time::Duration;

use turnstile::{Error, LimitConfig, LimitInfo, LimitUpdate, Limiter};

fn info(limiter: &Limiter, name: &str) -> LimitInfo {
    limiter
        .limit(name)
        .unwrap_or_else(|| panic!("limit {name:?} should exist"))
}

fn held(limiter: &Limiter, name: &str) -> u32 {
    info(limiter, name).held_slots
}

fn names(limiter: &Limiter) -> Vec<String> {
    limiter.limits().into_iter().map(|i| i.name).collect()
}

const BAD_NAMES: &[&str] = &[
    "",
    "a\nb",
    "\t",
    "a\tb",
    "\n",
    "a\u{0}b",
    "a\u{7f}",
    "\r",
    " a",
    "a ",
    " ",
    "\u{a0}a",
    "a\u{3000}",
];

fn long_names() -> Vec<String> {
    vec![
        "x".repeat(256),
        "x".repeat(1000),
        "é".repeat(128), // 256 bytes, 128 chars
    ]
}

#[test]
fn create_with_an_invalid_name_is_invalid_name() {
    let limiter = Limiter::in_memory();
    for &bad in BAD_NAMES {
        let err = limiter.create_limit(bad, LimitConfig::new(1)).unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err:?}");
    }
    for bad in long_names() {
        let err = limiter.create_limit(&bad, LimitConfig::new(1)).unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err:?}");
    }
    assert!(limiter.limits().is_empty());
}

#[test]
fn invalid_name_message_gives_the_length() {
    let limiter = Limiter::in_memory();
    let err = limiter
        .create_limit(&"x".repeat(256), LimitConfig::new(1))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidName { .. }), "{err:?}");
    assert!(err.to_string().contains("256"), "{err}");
    let err = limiter
        .create_limit(&"é".repeat(128), LimitConfig::new(1))
        .unwrap_err();
    assert!(err.to_string().contains("256"), "{err}");
    let err = limiter
        .create_limit(&"y".repeat(300), LimitConfig::new(1))
        .unwrap_err();
    assert!(err.to_string().contains("300"), "{err}");
}

#[test]
fn a_255_byte_name_is_fine() {
    let limiter = Limiter::in_memory();
    let ascii = "x".repeat(255);
    let multi = format!("{}x", "é".repeat(127)); // 254 + 1 bytes
    assert_eq!(multi.len(), 255);
    for name in [&ascii, &multi] {
        let created = limiter.create_limit(name, LimitConfig::new(1)).unwrap();
        assert_eq!(&created.name, name);
        let guard = limiter.concurrency(name.as_str(), 1).acquire().unwrap();
        assert_eq!(held(&limiter, name), 1);
        drop(guard);
    }
    assert_eq!(limiter.limits().len(), 2);
    // One byte more is too long.
    let err = limiter
        .create_limit(&"x".repeat(256), LimitConfig::new(1))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidName { .. }), "{err:?}");
}

#[test]
fn acquiring_an_invalid_name_is_invalid_name_and_creates_or_takes_nothing() {
    let limiter = Limiter::in_memory();
    limiter.create_limit("ok", LimitConfig::new(5)).unwrap();
    let mut all: Vec<String> = BAD_NAMES.iter().map(|s| s.to_string()).collect();
    all.extend(long_names());
    for bad in &all {
        let err = limiter.concurrency(bad.as_str(), 1).acquire().unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err:?}");
        let err = limiter
            .concurrency(bad.as_str(), 1)
            .try_acquire()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err:?}");
        let err = limiter.rate_limit(bad.as_str(), 1).acquire().unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err:?}");
        let err = limiter
            .rate_limit(bad.as_str(), 1)
            .try_acquire()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err:?}");

        // Next to valid names, existing and missing: nothing taken, nothing
        // created.
        let err = limiter
            .concurrency(["ok", "fresh", bad.as_str()], 1)
            .acquire()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err:?}");
        let err = limiter
            .concurrency(vec![bad.as_str(), "ok"], 1)
            .try_acquire()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err:?}");
        assert_eq!(held(&limiter, "ok"), 0);
        assert_eq!(names(&limiter), ["ok"]);
    }
}

#[test]
fn invalid_decay_in_create_is_invalid_config_and_creates_nothing() {
    let limiter = Limiter::in_memory();
    for bad in [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -1.5,
        -f64::MIN_POSITIVE,
    ] {
        let err = limiter
            .create_limit("api", LimitConfig::new(10).slot_decay_per_second(bad))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{bad}: {err:?}");
        assert!(err.to_string().contains("api"), "{err}");
        assert!(limiter.limit("api").is_none());
    }
    assert!(limiter.limits().is_empty());
    // 0 and positive values are fine.
    limiter
        .create_limit("zero", LimitConfig::new(1).slot_decay_per_second(0.0))
        .unwrap();
    limiter
        .create_limit("fast", LimitConfig::new(1).slot_decay_per_second(1e9))
        .unwrap();
}

#[test]
fn invalid_config_message_names_the_limit_and_the_value() {
    let limiter = Limiter::in_memory();
    let err = limiter
        .create_limit("api", LimitConfig::new(10).slot_decay_per_second(-1.5))
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("api"), "{msg}");
    assert!(msg.contains("-1.5"), "{msg}");

    let err = limiter
        .create_limit(
            "rates",
            LimitConfig::new(10).slot_decay_per_second(f64::NAN),
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("rates"), "{msg}");
    assert!(msg.to_lowercase().contains("nan"), "{msg}");

    limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
    let err = limiter
        .update_limit("gpu", LimitUpdate::new().slot_decay_per_second(-2.75))
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("gpu"), "{msg}");
    assert!(msg.contains("-2.75"), "{msg}");

    let err = limiter
        .update_limit(
            "gpu",
            LimitUpdate::new().slot_decay_per_second(f64::INFINITY),
        )
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("inf"), "{err}");
}

#[test]
fn invalid_decay_in_update_is_invalid_config_and_changes_nothing() {
    let limiter = Limiter::in_memory();
    limiter
        .create_limit("api", LimitConfig::new(10).slot_decay_per_second(2.0))
        .unwrap();
    let guard = limiter.concurrency("api", 1).acquire().unwrap();
    let before = info(&limiter, "api");
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.5] {
        let err = limiter
            .update_limit("api", LimitUpdate::new().slot_decay_per_second(bad))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{bad}: {err:?}");
        // Valid changes in the same update are not applied either.
        let err = limiter
            .update_limit(
                "api",
                LimitUpdate::new()
                    .limit(3)
                    .active(false)
                    .slot_decay_per_second(bad),
            )
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{bad}: {err:?}");
        assert_eq!(limiter.limit("api"), Some(before.clone()));
    }
    drop(guard);
}

#[test]
fn occupy_zero_is_invalid_occupy() {
    let limiter = Limiter::in_memory();
    limiter
        .create_limit("a", LimitConfig::new(5).slot_decay_per_second(1.0))
        .unwrap();
    let err = limiter.concurrency("a", 0).acquire().unwrap_err();
    assert!(matches!(err, Error::InvalidOccupy { .. }), "{err:?}");
    let err = limiter.concurrency("a", 0).try_acquire().unwrap_err();
    assert!(matches!(err, Error::InvalidOccupy { .. }), "{err:?}");
    let err = limiter
        .concurrency(["a", "new"], 0)
        .timeout(Duration::from_secs(1))
        .acquire()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidOccupy { .. }), "{err:?}");
    let err = limiter.rate_limit("a", 0).acquire().unwrap_err();
    assert!(matches!(err, Error::InvalidOccupy { .. }), "{err:?}");
    let err = limiter.rate_limit("a", 0).try_acquire().unwrap_err();
    assert!(matches!(err, Error::InvalidOccupy { .. }), "{err:?}");
    let err = limiter.rate_limit(["a", "new"], 0).acquire().unwrap_err();
    assert!(matches!(err, Error::InvalidOccupy { .. }), "{err:?}");

    let now = info(&limiter, "a");
    assert_eq!(now.held_slots, 0);
    assert_eq!(now.active_slots, 0);
    assert_eq!(now.denied_slots, 0);
    // A missing name is not created by a refused call.
    assert!(limiter.limit("new").is_none());
}

#[test]
fn occupy_above_the_limit_fails_at_once() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("gpu", LimitConfig::new(7)).unwrap();
        let err = limiter.concurrency("gpu", 9).acquire().unwrap_err();
        assert!(matches!(err, Error::OccupyExceedsLimit { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("gpu"), "{msg}");
        assert!(msg.contains('7'), "{msg}");
        assert!(msg.contains('9'), "{msg}");
        assert!(!err.is_timeout());

        let err = limiter.concurrency("gpu", 8).try_acquire().unwrap_err();
        assert!(matches!(err, Error::OccupyExceedsLimit { .. }), "{err:?}");
        let err = limiter
            .concurrency("gpu", 8)
            .timeout(Duration::from_secs(60))
            .acquire()
            .unwrap_err();
        assert!(matches!(err, Error::OccupyExceedsLimit { .. }), "{err:?}");
        assert_eq!(info(&limiter, "gpu").held_slots, 0);
        assert_eq!(info(&limiter, "gpu").waiters, 0);

        // occupy == limit is fine.
        let guard = limiter.concurrency("gpu", 7).acquire().unwrap();
        assert_eq!(held(&limiter, "gpu"), 7);
        drop(guard);

        // Also for a rate limit.
        limiter
            .create_limit("api", LimitConfig::new(4).slot_decay_per_second(1.0))
            .unwrap();
        let err = limiter.rate_limit("api", 5).acquire().unwrap_err();
        assert!(matches!(err, Error::OccupyExceedsLimit { .. }), "{err:?}");
        let err = limiter.rate_limit("api", 5).try_acquire().unwrap_err();
        assert!(matches!(err, Error::OccupyExceedsLimit { .. }), "{err:?}");
        assert_eq!(info(&limiter, "api").active_slots, 0);
    });
}

#[test]
fn occupy_above_one_of_several_limits_takes_nothing_anywhere() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("a", LimitConfig::new(5)).unwrap();
        limiter.create_limit("small", LimitConfig::new(2)).unwrap();
        limiter.create_limit("c", LimitConfig::new(5)).unwrap();
        let err = limiter
            .concurrency(["a", "small", "c", "missing"], 3)
            .acquire()
            .unwrap_err();
        assert!(matches!(err, Error::OccupyExceedsLimit { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("small"), "{msg}");
        assert!(msg.contains('3') && msg.contains('2'), "{msg}");

        let err = limiter
            .concurrency(["c", "small", "a"], 3)
            .try_acquire()
            .unwrap_err();
        assert!(matches!(err, Error::OccupyExceedsLimit { .. }), "{err:?}");
        for name in ["a", "small", "c"] {
            let now = info(&limiter, name);
            assert_eq!(now.held_slots, 0, "{name}");
            assert_eq!(now.waiters, 0, "{name}");
        }
        assert!(limiter.limit("missing").is_none());
    });
}

#[test]
fn occupy_above_an_inactive_or_paused_limit_is_not_an_error() {
    let limiter = Limiter::in_memory();
    limiter
        .create_limit("off", LimitConfig::new(1).active(false))
        .unwrap();
    let guard = limiter.concurrency("off", 5).acquire().unwrap();
    assert_eq!(held(&limiter, "off"), 0);
    drop(guard);

    // limit == 0 pauses: a try is refused, not an error.
    limiter.create_limit("paused", LimitConfig::new(0)).unwrap();
    let got = limiter.concurrency("paused", 5).try_acquire().unwrap();
    assert!(got.is_none());
}

#[test]
fn rate_limit_without_decay_is_no_slot_decay() {
    let limiter = Limiter::in_memory();
    limiter
        .create_limit("nodecay", LimitConfig::new(5))
        .unwrap();
    limiter
        .create_limit("decay", LimitConfig::new(5).slot_decay_per_second(1.0))
        .unwrap();
    let err = limiter.rate_limit("nodecay", 1).acquire().unwrap_err();
    assert!(matches!(err, Error::NoSlotDecay { .. }), "{err:?}");
    assert!(err.to_string().contains("nodecay"), "{err}");
    let err = limiter.rate_limit("nodecay", 1).try_acquire().unwrap_err();
    assert!(matches!(err, Error::NoSlotDecay { .. }), "{err:?}");
    let err = limiter
        .rate_limit(["decay", "nodecay"], 1)
        .acquire()
        .unwrap_err();
    assert!(matches!(err, Error::NoSlotDecay { .. }), "{err:?}");
    let err = limiter
        .rate_limit(["nodecay", "decay"], 1)
        .try_acquire()
        .unwrap_err();
    assert!(matches!(err, Error::NoSlotDecay { .. }), "{err:?}");
    assert_eq!(info(&limiter, "decay").active_slots, 0);
    assert_eq!(info(&limiter, "nodecay").active_slots, 0);

    // An inactive limit without decay is passed through.
    limiter
        .update_limit("nodecay", LimitUpdate::new().active(false))
        .unwrap();
    limiter.rate_limit("nodecay", 1).acquire().unwrap();
    assert!(limiter.rate_limit("nodecay", 1).try_acquire().unwrap());
    // concurrency on a limit without decay is of course fine.
    limiter.create_limit("plain", LimitConfig::new(1)).unwrap();
    drop(limiter.concurrency("plain", 1).acquire().unwrap());
}

#[test]
fn strict_with_a_missing_name_is_not_found_and_changes_nothing() {
    common::watchdog(common::WATCHDOG, || {
        let limiter = Limiter::in_memory();
        limiter.create_limit("a", LimitConfig::new(1)).unwrap();
        limiter.create_limit("z", LimitConfig::new(1)).unwrap();

        let err = limiter
            .concurrency(["a", "m1", "m2", "z"], 1)
            .strict(true)
            .acquire()
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("m1"), "{err}");

        // strict wins over create_if_missing.
        let err = limiter
            .concurrency(["a", "m1", "z"], 1)
            .create_if_missing(true)
            .strict(true)
            .acquire()
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("m1"), "{err}");

        let err = limiter
            .concurrency("m2", 1)
            .strict(true)
            .create_if_missing(true)
            .try_acquire()
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("m2"), "{err}");

        // Even with the existing limits full, strict fails at once rather
        // than waiting.
        let full = limiter.concurrency(["a", "z"], 1).acquire().unwrap();
        let err = limiter
            .concurrency(["a", "m1"], 1)
            .strict(true)
            .acquire()
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
        drop(full);

        assert!(limiter.limit("m1").is_none());
        assert!(limiter.limit("m2").is_none());
        assert_eq!(names(&limiter), ["a", "z"]);
        for name in ["a", "z"] {
            let now = info(&limiter, name);
            assert_eq!(now.held_slots, 0, "{name}");
            assert_eq!(now.waiters, 0, "{name}");
        }

        // strict with every name present works as usual.
        let guard = limiter
            .concurrency(["a", "z"], 1)
            .strict(true)
            .acquire()
            .unwrap();
        assert_eq!(held(&limiter, "a"), 1);
        assert_eq!(held(&limiter, "z"), 1);
        drop(guard);
    });
}

#[test]
fn is_timeout_is_true_only_for_timeouts() {
    let limiter = Limiter::in_memory();
    limiter.create_limit("gpu", LimitConfig::new(1)).unwrap();
    let _held = limiter.concurrency("gpu", 1).acquire().unwrap();

    let err = limiter
        .concurrency("gpu", 1)
        .timeout(Duration::ZERO)
        .acquire()
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.is_timeout());
    assert!(err.to_string().contains("gpu"), "{err}");

    let err = limiter
        .concurrency("gpu", 1)
        .max_retries(0)
        .acquire()
        .unwrap_err();
    assert!(matches!(err, Error::RetriesExhausted { .. }), "{err:?}");
    assert!(!err.is_timeout());

    let err = limiter.concurrency("gpu", 2).acquire().unwrap_err();
    assert!(!err.is_timeout());
    let err = limiter.delete_limit("missing").unwrap_err();
    assert!(!err.is_timeout());
    let err = limiter.concurrency("gpu", 0).acquire().unwrap_err();
    assert!(!err.is_timeout());
    let err = limiter.create_limit("", LimitConfig::new(1)).unwrap_err();
    assert!(!err.is_timeout());
}

#[test]
fn error_is_a_std_error_that_can_cross_threads() {
    fn assert_error<E: std::error::Error + std::fmt::Debug + Send + Sync + 'static>(_: &E) {}
    let limiter = Limiter::in_memory();
    let err = limiter.delete_limit("missing").unwrap_err();
    assert_error(&err);
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(err);
    assert!(boxed.to_string().contains("missing"));
}

/// Errors compare by variant and figures, so callers can match them exactly.
#[test]
fn errors_compare_equal_by_variant_and_figures() {
    let limiter = Limiter::in_memory();
    limiter.create_limit("gpu", LimitConfig::new(2)).unwrap();
    assert_eq!(
        limiter.concurrency("gpu", 0).try_acquire().unwrap_err(),
        Error::InvalidOccupy { occupy: 0 }
    );
    assert_eq!(
        limiter.concurrency("gpu", 3).try_acquire().unwrap_err(),
        Error::OccupyExceedsLimit {
            name: "gpu".into(),
            occupy: 3,
            limit: 2
        }
    );
    assert_eq!(
        limiter
            .create_limit("gpu", LimitConfig::new(1))
            .unwrap_err(),
        Error::AlreadyExists { name: "gpu".into() }
    );
    assert_ne!(
        limiter.delete_limit("cpu").unwrap_err(),
        Error::NotFound { name: "gpu".into() }
    );
}
