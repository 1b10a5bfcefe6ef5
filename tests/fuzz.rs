//! Fuzzing of everything that parses outside input: limit names, limit
//! configurations, the `turnstile` CLI's arguments, and store files.
//!
//! `cargo fuzz` needs a nightly toolchain and the `cargo-fuzz` tool, which CI
//! does not have, so this is a proptest-driven fuzzer that runs under plain
//! `cargo test`: each target draws inputs from seeds (`tests/fuzz-seeds/`)
//! and their mutations, plus random inputs, and checks the contract's promises
//! about them — never a panic (also on the limiter's own threads), never a
//! hang (a watchdog per case), errors of the documented kind.
//!
//! By default each target runs a modest number of cases. To run long:
//!
//! ```sh
//! TURNSTILE_FUZZ_CASES=20000 cargo test --release --test fuzz -- --nocapture
//! ```
//!
//! sets every target's case count (the name and config targets try a batch
//! of inputs per case); each target prints what it tried. Failing cases are
//! saved to `proptest-regressions/fuzz-<target>.txt` and re-run first next
//! time.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{FileFailurePersistence, TestCaseError, TestRunner};
use rusqlite::Connection;
use turnstile::{Admin, Error, LimitConfig, LimitInfo, LimitUpdate, Limiter};

const BIN: &str = env!("CARGO_BIN_EXE_turnstile");
const NAME_SEEDS: &str = include_str!("fuzz-seeds/names.txt");
const ARGV_SEEDS: &str = include_str!("fuzz-seeds/argv.txt");
const SQL_SEEDS: &str = include_str!("fuzz-seeds/store-edits.sql");

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// Cases per target: `TURNSTILE_FUZZ_CASES`, or the target's default.
fn cases(default: u32) -> u32 {
    std::env::var("TURNSTILE_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn config(default_cases: u32, regressions: &'static str) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default_cases),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(regressions))),
        // Shrinking a store case opens many stores: keep it bounded.
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

/// Runs one fuzz target: `cases` inputs from `strategy` (after the saved
/// regressions, `proptest-regressions/fuzz-<target>.txt`), each through
/// `body` under the watchdog; then prints what the target tried.
fn fuzz_target<S>(
    target: &'static str,
    default_cases: u32,
    tally: &'static OnceLock<Tally>,
    strategy: S,
    body: fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Send + 'static,
{
    let regressions: &'static str =
        Box::leak(format!("proptest-regressions/fuzz-{target}.txt").into_boxed_str());
    let mut runner = TestRunner::new(config(default_cases, regressions));
    let result = runner.run(&strategy, |input| guarded(move || body(input)));
    tally.get_or_init(Tally::default).print(target);
    if let Err(e) = result {
        panic!("fuzz {target}: {e}");
    }
}

/// Panics on the limiter's own threads (the writer, the timer), which no
/// `join` would report.
static BACKGROUND_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn watch_background_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = thread::current();
            let name = thread.name().unwrap_or("");
            if name.starts_with("turnstile") {
                BACKGROUND_PANICS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(format!("{name}: {info}"));
            }
            default(info);
        }));
    });
}

fn assert_no_background_panic() -> Result<(), TestCaseError> {
    let panics = BACKGROUND_PANICS.lock().unwrap_or_else(|e| e.into_inner());
    prop_assert!(
        panics.is_empty(),
        "a turnstile thread panicked: {:?}",
        *panics
    );
    Ok(())
}

/// Runs a case's body under the watchdog: a hang fails the case.
fn guarded(
    body: impl FnOnce() -> Result<(), TestCaseError> + Send + 'static,
) -> Result<(), TestCaseError> {
    watch_background_panics();
    common::watchdog(Duration::from_secs(60), body)?;
    assert_no_background_panic()
}

/// A unique directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // In memory where the system offers it: the store cases sync often,
        // and only their contents matter.
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() && fs::metadata(shm).is_ok_and(|m| !m.permissions().readonly()) {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "turnstile-fuzz-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
        ));
        fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// What a target tried, printed at the end of a run (`--nocapture`).
#[derive(Default)]
struct Tally(Mutex<std::collections::BTreeMap<String, u64>>);

impl Tally {
    fn add(&self, what: impl Into<String>, n: u64) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(what.into())
            .or_default() += n;
    }

    fn print(&self, target: &str) {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let figures: Vec<String> = map.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        eprintln!("fuzz {target}: {}", figures.join(", "));
    }
}

/// Undoes the escapes of the seed files: `\n \t \r \0 \\ \u{...} \xNN`.
fn unescape(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('r') => out.push(b'\r'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                out.push(u8::from_str_radix(&hex, 16).expect("\\xNN in a seed"));
            }
            Some('u') => {
                assert_eq!(chars.next(), Some('{'), "\\u{{...}} in a seed");
                let hex: String = chars.by_ref().take_while(|&c| c != '}').collect();
                let c = char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap();
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
            other => panic!("unknown escape \\{other:?} in a seed"),
        }
    }
    out
}

fn seed_lines(text: &'static str, comment: &'static str) -> impl Iterator<Item = &'static str> {
    text.lines()
        .filter(move |l| !l.is_empty() && !l.starts_with(comment))
}

// ---------------------------------------------------------------------------
// 1. Names
// ---------------------------------------------------------------------------

/// The contract's rule, written out independently of the crate.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.chars().any(char::is_control)
        && !name.starts_with(char::is_whitespace)
        && !name.ends_with(char::is_whitespace)
}

fn name_seeds() -> Vec<String> {
    seed_lines(NAME_SEEDS, "#")
        .map(|l| String::from_utf8(unescape(l)).expect("UTF-8 name seed"))
        .collect()
}

/// Characters that sit on the edges of the rule.
const EDGE_CHARS: &[char] = &[
    ' ',
    '\t',
    '\n',
    '\r',
    '\0',
    '\u{7f}',
    '\u{85}',
    '\u{9f}',
    '\u{a0}',
    '\u{2003}',
    '\u{2028}',
    '\u{3000}',
    '\u{200b}',
    '\u{feff}',
    '\u{1f680}',
    '\u{e9}',
    '\u{301}',
    '\'',
    '"',
    ';',
    '%',
    '_',
    '\\',
    '/',
    'x',
];

#[derive(Debug, Clone)]
enum NameEdit {
    Insert(Index, char),
    Remove(Index),
    /// Repeats the name until it is about this many bytes long.
    Grow(usize),
    Prefix(char),
    Suffix(char),
    Upper,
}

fn edge_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => prop::sample::select(EDGE_CHARS),
        1 => any::<char>(),
    ]
}

fn name_edit() -> impl Strategy<Value = NameEdit> {
    prop_oneof![
        3 => (any::<Index>(), edge_char()).prop_map(|(i, c)| NameEdit::Insert(i, c)),
        2 => any::<Index>().prop_map(NameEdit::Remove),
        1 => (250usize..260).prop_map(NameEdit::Grow),
        1 => edge_char().prop_map(NameEdit::Prefix),
        1 => edge_char().prop_map(NameEdit::Suffix),
        1 => Just(NameEdit::Upper),
    ]
}

fn apply_name_edit(name: &mut String, edit: &NameEdit) {
    let boundaries: Vec<usize> = name
        .char_indices()
        .map(|(i, _)| i)
        .chain([name.len()])
        .collect();
    match *edit {
        NameEdit::Insert(at, c) => name.insert(*at.get(&boundaries), c),
        NameEdit::Remove(at) if !name.is_empty() => {
            let start = *at.get(&boundaries[..boundaries.len() - 1]);
            name.remove(start);
        }
        NameEdit::Remove(_) => {}
        NameEdit::Grow(len) if !name.is_empty() => {
            let unit = name.clone();
            while name.len() < len {
                name.push_str(&unit);
            }
            let mut cut = len.min(name.len());
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            name.truncate(cut);
        }
        NameEdit::Grow(_) => {}
        NameEdit::Prefix(c) => name.insert(0, c),
        NameEdit::Suffix(c) => name.push(c),
        NameEdit::Upper => *name = name.to_uppercase(),
    }
}

fn name_input() -> impl Strategy<Value = String> {
    let seeds = name_seeds();
    prop_oneof![
        2 => prop::sample::select(seeds.clone()),
        6 => (prop::sample::select(seeds), prop::collection::vec(name_edit(), 1..4)).prop_map(
            |(mut name, edits)| {
                for edit in &edits {
                    apply_name_edit(&mut name, edit);
                }
                name
            }
        ),
        2 => any::<String>(),
        2 => prop::collection::vec(any::<char>(), 0..40).prop_map(String::from_iter),
        1 => (prop::sample::select(EDGE_CHARS), 60usize..140)
            .prop_map(|(c, n)| std::iter::repeat_n(c, n).collect()),
    ]
}

fn one_line(err: &Error) -> Result<String, TestCaseError> {
    let text = err.to_string();
    prop_assert!(
        !text.is_empty() && !text.contains(['\n', '\r']),
        "an error message should be one line: {:?}",
        text
    );
    Ok(text)
}

static NAMES_TALLY: OnceLock<Tally> = OnceLock::new();

/// Every name is accepted exactly when the contract's rule says so, by
/// `create_limit`, `LimitConfig::check` and acquisitions alike; accepted
/// names are stored and found exactly, rejected ones create nothing.
fn fuzz_names(batch: Vec<String>) -> Result<(), TestCaseError> {
    let tally = NAMES_TALLY.get_or_init(Tally::default);
    let limiter = Limiter::in_memory();
    let mut created = BTreeSet::new();
    for name in &batch {
        let valid = valid_name(name);
        tally.add(if valid { "valid" } else { "invalid" }, 1);
        prop_assert_eq!(
            LimitConfig::new(2).check(name).is_ok(),
            valid,
            "check({:?})",
            name
        );
        let got = limiter.create_limit(name, LimitConfig::new(2));
        match got {
            Ok(info) => {
                prop_assert!(valid, "{:?} was accepted", name);
                prop_assert!(created.insert(name.clone()), "{:?} created twice", name);
                prop_assert_eq!(&info.name, name);
            }
            Err(Error::AlreadyExists { name: n }) => {
                prop_assert!(valid && created.contains(name), "{:?}: AlreadyExists", name);
                prop_assert_eq!(&n, name);
            }
            Err(e @ Error::InvalidName { .. }) => {
                prop_assert!(!valid, "{:?} was rejected: {}", name, e);
                let text = one_line(&e)?;
                prop_assert!(
                    text.len() < 600,
                    "the message quotes a long name whole: {}",
                    text
                );
            }
            Err(e) => return Err(TestCaseError::fail(format!("create {name:?}: {e}"))),
        }
        // Acquisitions judge names the same way.
        if valid {
            let guard = limiter.concurrency(name.as_str(), 1).try_acquire();
            let guard = guard.map_err(|e| TestCaseError::fail(format!("{name:?}: {e}")))?;
            prop_assert!(guard.is_some(), "{:?} has room", name);
            prop_assert_eq!(limiter.limit(name).map(|i| i.held_slots), Some(1));
            drop(guard);
            prop_assert_eq!(limiter.limit(name).map(|i| i.held_slots), Some(0));
        } else {
            for strict in [false, true] {
                let got = limiter
                    .concurrency(vec![name.as_str(), "fuzz-other"], 1)
                    .strict(strict)
                    .try_acquire();
                let ok = match &got {
                    Err(Error::InvalidName { .. }) => true,
                    Err(Error::NotFound { name: n }) => strict && n == name,
                    _ => false,
                };
                prop_assert!(ok, "acquiring {:?} (strict {}): {:?}", name, strict, got);
                prop_assert!(limiter.limit("fuzz-other").is_none(), "nothing is created");
            }
            let got = limiter.rate_limit(name.as_str(), 1).try_acquire();
            prop_assert!(
                matches!(got, Err(Error::InvalidName { .. })),
                "rate_limit {:?}: {:?}",
                name,
                got
            );
        }
    }
    let listed: Vec<String> = limiter.limits().into_iter().map(|i| i.name).collect();
    let want: Vec<String> = created.iter().cloned().collect();
    prop_assert_eq!(
        listed,
        want,
        "limits() lists exactly the accepted names, sorted"
    );
    for name in &created {
        limiter
            .delete_limit(name)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    prop_assert!(limiter.limits().is_empty());
    tally.add("batches", 1);
    Ok(())
}

#[test]
fn fuzz_limit_names() {
    let batch = prop::collection::vec(name_input(), 1..16);
    fuzz_target("names", 256, &NAMES_TALLY, batch, fuzz_names);
}

// ---------------------------------------------------------------------------
// 2. Configurations
// ---------------------------------------------------------------------------

fn any_rate() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => prop::sample::select(vec![
            0.0,
            -0.0,
            f64::NAN,
            -f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
            5e-324,
            -5e-324,
            f64::MAX,
            f64::MIN,
            f64::EPSILON,
            1e-300,
            1e300,
            -1.0,
            1.0,
            1e9,
            1e15,
        ]),
        2 => any::<f64>(),
        2 => any::<u64>().prop_map(f64::from_bits),
        2 => 0.0..1e6f64,
    ]
}

fn any_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => prop::sample::select(vec![0u32, 1, 2, u32::MAX, u32::MAX - 1, 1 << 31]),
        3 => 0u32..10,
        1 => any::<u32>(),
    ]
}

#[derive(Debug, Clone)]
struct ConfigCase {
    limit: u32,
    active: bool,
    rate: f64,
    steps: Vec<ConfigStep>,
}

#[derive(Debug, Clone)]
enum ConfigStep {
    Concurrency(u32),
    RateLimit(u32),
    /// A blocking rate limit with a short timeout: `Ok` or `Timeout`.
    RateLimitWait(u32),
    Update(Option<u32>, Option<bool>, Option<f64>),
    Reset,
}

fn config_case() -> impl Strategy<Value = ConfigCase> {
    let step = prop_oneof![
        3 => any_u32().prop_map(ConfigStep::Concurrency),
        3 => any_u32().prop_map(ConfigStep::RateLimit),
        1 => any_u32().prop_map(ConfigStep::RateLimitWait),
        2 => (
            prop::option::of(any_u32()),
            prop::option::of(any::<bool>()),
            prop::option::of(any_rate())
        )
            .prop_map(|(l, a, r)| ConfigStep::Update(l, a, r)),
        1 => Just(ConfigStep::Reset),
    ];
    (
        any_u32(),
        prop::bool::weighted(0.8),
        any_rate(),
        prop::collection::vec(step, 0..8),
    )
        .prop_map(|(limit, active, rate, steps)| ConfigCase {
            limit,
            active,
            rate,
            steps,
        })
}

fn valid_rate(rate: f64) -> bool {
    rate.is_finite() && rate >= 0.0
}

fn definition(info: &LimitInfo) -> (u32, bool, f64) {
    (info.limit, info.active, info.slot_decay_per_second)
}

static CONFIGS_TALLY: OnceLock<Tally> = OnceLock::new();

/// Extreme configurations are accepted exactly when the decay is finite and
/// `>= 0`; acquisitions on them fail with the documented errors only, and
/// a successful one never leaves more slots taken than the limit.
fn fuzz_configs(batch: Vec<ConfigCase>) -> Result<(), TestCaseError> {
    let tally = CONFIGS_TALLY.get_or_init(Tally::default);
    let limiter = Limiter::in_memory();
    let mut guards = Vec::new();
    let fail = |what: String| TestCaseError::fail(what);
    for (i, case) in batch.iter().enumerate() {
        let name = format!("cfg-{i}");
        let config = LimitConfig::new(case.limit)
            .active(case.active)
            .slot_decay_per_second(case.rate);
        prop_assert_eq!(config.check(&name).is_ok(), valid_rate(case.rate));
        match limiter.create_limit(&name, config) {
            Ok(info) => {
                prop_assert!(valid_rate(case.rate), "rate {} accepted", case.rate);
                prop_assert_eq!(definition(&info), (case.limit, case.active, case.rate));
                prop_assert_eq!((info.held_slots, info.active_slots), (0, 0));
                tally.add("configs accepted", 1);
            }
            Err(e @ Error::InvalidConfig { .. }) => {
                prop_assert!(!valid_rate(case.rate), "rate {} rejected: {}", case.rate, e);
                let text = one_line(&e)?;
                prop_assert!(text.contains(&name) && text.contains(&case.rate.to_string()));
                prop_assert!(limiter.limit(&name).is_none());
                tally.add("configs rejected", 1);
                continue;
            }
            Err(e) => return Err(fail(format!("create {case:?}: {e}"))),
        }
        for step in &case.steps {
            let before = limiter.limit(&name).expect("exists");
            let (limit, active, rate) = definition(&before);
            // The errors an acquisition of `occupy` may give; `None`: none.
            let refusal = |occupy: u32, rate_limit: bool| -> Option<Vec<&'static str>> {
                if occupy == 0 {
                    return Some(vec!["InvalidOccupy"]);
                }
                if !active {
                    return None;
                }
                let mut kinds = Vec::new();
                if limit > 0 && occupy > limit {
                    kinds.push("OccupyExceedsLimit");
                }
                if rate_limit && rate <= 0.0 {
                    kinds.push("NoSlotDecay");
                }
                (!kinds.is_empty()).then_some(kinds)
            };
            let check_err = |e: &Error, kinds: &[&str]| -> Result<(), TestCaseError> {
                let kind = match e {
                    Error::InvalidOccupy { .. } => "InvalidOccupy",
                    Error::OccupyExceedsLimit { .. } => "OccupyExceedsLimit",
                    Error::NoSlotDecay { .. } => "NoSlotDecay",
                    Error::Timeout { .. } => "Timeout",
                    _ => "other",
                };
                prop_assert!(
                    kinds.contains(&kind),
                    "{:?}: {} (allowed {:?})",
                    step,
                    e,
                    kinds
                );
                one_line(e)?;
                Ok(())
            };
            let within = |what: &str| -> Result<(), TestCaseError> {
                let info = limiter.limit(&name).expect("exists");
                prop_assert!(
                    !info.active || info.active_slots <= info.limit,
                    "after {}: {:?}",
                    what,
                    info
                );
                Ok(())
            };
            match *step {
                ConfigStep::Concurrency(occupy) => {
                    let got = limiter.concurrency(name.as_str(), occupy).try_acquire();
                    match (refusal(occupy, false), got) {
                        (None, Ok(Some(guard))) => {
                            within("a concurrency acquisition")?;
                            guards.push(guard);
                            tally.add("acquisitions admitted", 1);
                        }
                        (None, Ok(None)) => {
                            prop_assert!(active, "an inactive limit refused");
                            tally.add("acquisitions refused", 1);
                        }
                        (Some(kinds), Err(e)) => {
                            check_err(&e, &kinds)?;
                            tally.add("acquisition errors", 1);
                        }
                        (want, got) => {
                            return Err(fail(format!(
                                "{step:?} on {before:?}: {want:?} vs {got:?}"
                            )))
                        }
                    }
                }
                ConfigStep::RateLimit(occupy) => {
                    let got = limiter.rate_limit(name.as_str(), occupy).try_acquire();
                    match (refusal(occupy, true), got) {
                        (None, Ok(taken)) => {
                            prop_assert!(taken || active, "an inactive limit refused");
                            if taken {
                                within("a rate limit")?;
                            }
                            tally.add(
                                if taken {
                                    "rate limits taken"
                                } else {
                                    "rate limits refused"
                                },
                                1,
                            );
                        }
                        (Some(kinds), Err(e)) => {
                            check_err(&e, &kinds)?;
                            tally.add("acquisition errors", 1);
                        }
                        (want, got) => {
                            return Err(fail(format!(
                                "{step:?} on {before:?}: {want:?} vs {got:?}"
                            )))
                        }
                    }
                }
                ConfigStep::RateLimitWait(occupy) => {
                    let got = limiter
                        .rate_limit(name.as_str(), occupy)
                        .timeout(Duration::from_millis(2))
                        .acquire();
                    let kinds = refusal(occupy, true).unwrap_or_else(|| vec!["Timeout"]);
                    match got {
                        Ok(()) => within("a waiting rate limit")?,
                        Err(e) => check_err(&e, &kinds)?,
                    }
                    tally.add("waiting rate limits", 1);
                }
                ConfigStep::Update(new_limit, new_active, new_rate) => {
                    let mut update = LimitUpdate::new();
                    if let Some(l) = new_limit {
                        update = update.limit(l);
                    }
                    if let Some(a) = new_active {
                        update = update.active(a);
                    }
                    if let Some(r) = new_rate {
                        update = update.slot_decay_per_second(r);
                    }
                    let valid = new_rate.is_none_or(valid_rate);
                    match limiter.update_limit(&name, update) {
                        Ok(info) => {
                            prop_assert!(valid, "update {:?} accepted", step);
                            let want = (
                                new_limit.unwrap_or(limit),
                                new_active.unwrap_or(active),
                                new_rate.unwrap_or(rate),
                            );
                            prop_assert_eq!(definition(&info), want);
                            tally.add("updates accepted", 1);
                        }
                        Err(e @ Error::InvalidConfig { .. }) => {
                            prop_assert!(!valid, "update {:?} rejected: {}", step, e);
                            one_line(&e)?;
                            let after = limiter.limit(&name).expect("exists");
                            prop_assert_eq!(definition(&after), (limit, active, rate));
                            tally.add("updates rejected", 1);
                        }
                        Err(e) => return Err(fail(format!("{step:?}: {e}"))),
                    }
                }
                ConfigStep::Reset => {
                    let info = limiter
                        .reset_limit(&name)
                        .map_err(|e| fail(format!("reset: {e}")))?;
                    prop_assert_eq!(info.denied_slots, 0);
                    prop_assert_eq!(info.active_slots, info.held_slots, "decaying slots dropped");
                }
            }
        }
    }
    drop(guards);
    for info in limiter.limits() {
        prop_assert_eq!(info.held_slots, 0, "{:?}", info);
    }
    tally.add("batches", 1);
    Ok(())
}

#[test]
fn fuzz_limit_configs() {
    let batch = prop::collection::vec(config_case(), 1..6);
    fuzz_target("configs", 256, &CONFIGS_TALLY, batch, fuzz_configs);
}

static ROUND_TRIP_TALLY: OnceLock<Tally> = OnceLock::new();

/// Names and configurations accepted by a store-backed limiter come back
/// exactly after a restart, and read the same through `Admin`.
fn round_trip(batch: Vec<(String, u32, bool, f64)>) -> Result<(), TestCaseError> {
    let tally = ROUND_TRIP_TALLY.get_or_init(Tally::default);
    let scratch = Scratch::new("round-trip");
    let db = scratch.path("limits.db");
    let fail = |e: Error| TestCaseError::fail(e.to_string());
    let mut want = std::collections::BTreeMap::new();
    {
        let limiter = Limiter::open(&db).map_err(fail)?;
        for (name, limit, active, rate) in &batch {
            let config = LimitConfig::new(*limit)
                .active(*active)
                .slot_decay_per_second(*rate);
            let got = limiter.create_limit(name, config);
            let expect_ok = valid_name(name) && valid_rate(*rate) && !want.contains_key(name);
            prop_assert_eq!(got.is_ok(), expect_ok, "create {:?}: {:?}", name, got);
            if expect_ok {
                want.insert(name.clone(), (*limit, *active, *rate));
                tally.add("limits stored", 1);
            } else {
                tally.add("limits rejected", 1);
            }
        }
        limiter.flush().map_err(fail)?;
    }
    let limiter = Limiter::open(&db).map_err(fail)?;
    let got: Vec<(String, (u32, bool, f64))> = limiter
        .limits()
        .iter()
        .map(|i| (i.name.clone(), definition(i)))
        .collect();
    let want: Vec<(String, (u32, bool, f64))> = want.into_iter().collect();
    prop_assert_eq!(&got, &want, "definitions after a restart");
    drop(limiter);
    let admin = Admin::open(&db).map_err(fail)?;
    let seen: Vec<(String, (u32, bool, f64))> = admin
        .limits()
        .map_err(fail)?
        .iter()
        .map(|i| (i.name.clone(), definition(i)))
        .collect();
    prop_assert_eq!(&seen, &want, "definitions through Admin");
    tally.add("stores", 1);
    Ok(())
}

#[test]
fn fuzz_names_and_configs_through_a_store() {
    let batch = prop::collection::vec((name_input(), any_u32(), any::<bool>(), any_rate()), 1..10);
    fuzz_target("round-trips", 24, &ROUND_TRIP_TALLY, batch, round_trip);
}

// ---------------------------------------------------------------------------
// 3. CLI arguments
// ---------------------------------------------------------------------------

/// Tokens the CLI knows, and values at the edges of what it accepts.
const VOCABULARY: &[&str] = &[
    "create",
    "ls",
    "inspect",
    "update",
    "enable",
    "disable",
    "reset",
    "delete",
    "watch",
    "help",
    "gpu",
    "api",
    "off",
    "--limit",
    "--slot-decay-per-second",
    "--disable",
    "--enable",
    "-o",
    "--output",
    "json",
    "table",
    "--yes",
    "-y",
    "--interval",
    "--help",
    "-h",
    "--version",
    "-V",
    "--",
    "-",
    "0",
    "1",
    "2",
    "-1",
    "4294967295",
    "4294967296",
    "1e3",
    "0.5",
    "NaN",
    "inf",
    "-inf",
    "1e400",
    "1e-300",
    "0x10",
    "",
    " ",
    "--limit=3",
    "--limit=-3",
    "-o=json",
];

fn argv_seeds() -> Vec<Vec<OsString>> {
    seed_lines(ARGV_SEEDS, "#")
        .map(|line| {
            line.split('\t')
                .map(|t| OsString::from_vec(unescape(t)))
                .collect()
        })
        .collect()
}

fn token() -> impl Strategy<Value = OsString> {
    prop_oneof![
        8 => prop::sample::select(VOCABULARY).prop_map(OsString::from),
        2 => name_input().prop_map(OsString::from),
        1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(OsString::from_vec),
        1 => any::<i64>().prop_map(|n| OsString::from(n.to_string())),
        1 => any_rate().prop_map(|r| OsString::from(r.to_string())),
    ]
}

#[derive(Debug, Clone)]
enum TokenEdit {
    Insert(Index, OsString),
    Remove(Index),
    Replace(Index, OsString),
    Swap(Index, Index),
}

fn argv_input() -> impl Strategy<Value = Vec<OsString>> {
    let edit = prop_oneof![
        (any::<Index>(), token()).prop_map(|(i, t)| TokenEdit::Insert(i, t)),
        any::<Index>().prop_map(TokenEdit::Remove),
        (any::<Index>(), token()).prop_map(|(i, t)| TokenEdit::Replace(i, t)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, j)| TokenEdit::Swap(i, j)),
    ];
    prop_oneof![
        3 => prop::sample::select(argv_seeds()),
        5 => (prop::sample::select(argv_seeds()), prop::collection::vec(edit, 1..4)).prop_map(
            |(mut argv, edits)| {
                for edit in edits {
                    let n = argv.len();
                    match edit {
                        TokenEdit::Insert(i, t) => argv.insert(i.index(n + 1), t),
                        TokenEdit::Remove(i) if n > 0 => {
                            argv.remove(i.index(n));
                        }
                        TokenEdit::Replace(i, t) if n > 0 => argv[i.index(n)] = t,
                        TokenEdit::Swap(i, j) if n > 0 => argv.swap(i.index(n), j.index(n)),
                        _ => {}
                    }
                }
                argv
            }
        ),
        2 => prop::collection::vec(token(), 0..7),
    ]
    .prop_map(|argv| {
        // The store is the harness's to choose (a random `--db` could write
        // anywhere); no OS passes a NUL byte in an argument.
        argv.into_iter()
            .filter(|t| !t.as_encoded_bytes().starts_with(b"--db"))
            .map(|t| {
                let bytes = t.into_vec().into_iter().filter(|&b| b != 0).collect();
                OsString::from_vec(bytes)
            })
            .collect()
    })
}

/// Where the store comes from in one CLI case.
#[derive(Debug, Clone, Copy)]
enum DbChoice {
    /// `--db` naming the scratch store.
    Flag,
    /// `TURNSTILE_DB` naming it.
    Env,
    /// `--db` naming a file that does not exist.
    Missing,
    /// `--db` naming a text file.
    NotAStore,
    /// `--db` naming a directory.
    Directory,
    /// Neither.
    None,
}

static CLI_TALLY: OnceLock<Tally> = OnceLock::new();

/// One shared scratch store for the CLI cases (they may edit it freely).
fn cli_scratch() -> &'static (Scratch, Mutex<()>) {
    static SCRATCH: OnceLock<(Scratch, Mutex<()>)> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let scratch = Scratch::new("cli");
        let limiter = Limiter::open(scratch.path("limits.db")).expect("a store");
        limiter.create_limit("gpu", LimitConfig::new(2)).unwrap();
        limiter
            .create_limit("api", LimitConfig::new(10).slot_decay_per_second(5.0))
            .unwrap();
        limiter
            .create_limit("off", LimitConfig::new(1).active(false))
            .unwrap();
        drop(limiter);
        fs::write(scratch.path("notes.txt"), "not a store\n").unwrap();
        fs::create_dir_all(scratch.path("a-dir")).unwrap();
        (scratch, Mutex::new(()))
    })
}

/// Runs the binary on `argv`: it must end by itself (or, for `watch`, draw
/// and keep drawing) with status 0, 1 or 2, never by a signal, and an error
/// must be one line on stderr.
fn fuzz_cli(argv: Vec<OsString>, db: DbChoice) -> Result<(), TestCaseError> {
    let tally = CLI_TALLY.get_or_init(Tally::default);
    let (scratch, lock) = cli_scratch();
    // Cases run one at a time: they share the store.
    let _one = lock.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new(BIN);
    cmd.current_dir(&scratch.0)
        .env_remove("TURNSTILE_DB")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let store = scratch.path("limits.db");
    match db {
        DbChoice::Flag => {
            cmd.arg("--db").arg(&store);
        }
        DbChoice::Env => {
            cmd.env("TURNSTILE_DB", &store);
        }
        DbChoice::Missing => {
            cmd.arg("--db").arg(scratch.path("missing.db"));
        }
        DbChoice::NotAStore => {
            cmd.arg("--db").arg(scratch.path("notes.txt"));
        }
        DbChoice::Directory => {
            cmd.arg("--db").arg(scratch.path("a-dir"));
        }
        DbChoice::None => {}
    }
    cmd.args(&argv);
    let mut child = cmd.spawn().expect("start turnstile");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let into = seen.clone();
        let reader = thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                into.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        (seen, reader)
    };
    let (stdout, out_reader) = drain(Box::new(child.stdout.take().unwrap()));
    let (stderr, err_reader) = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for turnstile") {
            break Some(status);
        }
        // `watch` draws until interrupted: once it has drawn, it works.
        if stdout.lock().unwrap().starts_with(b"\x1b[2J") {
            break None;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TestCaseError::fail(format!(
                "turnstile {argv:?} ({db:?}) hangs"
            )));
        }
        thread::sleep(Duration::from_millis(2));
    };
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let _ = (out_reader.join(), err_reader.join());
        tally.add("watch drawing", 1);
        return Ok(());
    };
    let _ = (out_reader.join(), err_reader.join());
    let stderr = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
    prop_assert!(
        status.signal().is_none(),
        "turnstile {:?} ({:?}) was killed by signal {:?}; stderr {:?}",
        argv,
        db,
        status.signal(),
        stderr
    );
    let code = status.code().expect("an exit code");
    prop_assert!(
        matches!(code, 0..=2),
        "turnstile {:?} ({:?}) exited with {}: {:?}",
        argv,
        db,
        code,
        stderr
    );
    if code != 0 {
        let line = stderr.strip_suffix('\n').unwrap_or(&stderr);
        prop_assert!(
            !line.trim().is_empty() && !line.contains('\n'),
            "turnstile {:?} ({:?}) failed with {} but not with one line: {:?}",
            argv,
            db,
            code,
            stderr
        );
    }
    tally.add(format!("exit {code}"), 1);
    Ok(())
}

fn db_choice() -> impl Strategy<Value = DbChoice> {
    prop_oneof![
        12 => Just(DbChoice::Flag),
        2 => Just(DbChoice::Env),
        1 => Just(DbChoice::Missing),
        1 => Just(DbChoice::NotAStore),
        1 => Just(DbChoice::Directory),
        1 => Just(DbChoice::None),
    ]
}

#[test]
fn fuzz_cli_arguments() {
    let input = (argv_input(), db_choice());
    fuzz_target("cli", 48, &CLI_TALLY, input, |(argv, db)| {
        fuzz_cli(argv, db)
    });
    // Whatever the cases did to it, the store they shared is still a store.
    let (scratch, _) = cli_scratch();
    Limiter::open(scratch.path("limits.db")).expect("still a store");
    // The scratch lives in a static, which is never dropped.
    let _ = fs::remove_dir_all(&scratch.0);
}

// ---------------------------------------------------------------------------
// 4. Store files
// ---------------------------------------------------------------------------

/// The stores that mutations start from.
struct Bases {
    /// A current store with a few dozen limits, decaying slots, denied
    /// counts and held slots (as a crashed owner leaves them).
    current: Vec<u8>,
    /// A version 1 store, which `open` migrates.
    v1: Vec<u8>,
    /// Names of the limits in `current`.
    names: Vec<String>,
}

/// Schema version 1, as an old turnstile wrote it.
const SCHEMA_V1: &str = r#"
CREATE TABLE limits (
    name                  TEXT PRIMARY KEY NOT NULL,
    "limit"               INTEGER NOT NULL CHECK ("limit" >= 0 AND "limit" <= 4294967295),
    active                INTEGER NOT NULL CHECK (active IN (0, 1)),
    slot_decay_per_second REAL NOT NULL CHECK (slot_decay_per_second >= 0)
) WITHOUT ROWID;
CREATE TABLE slot_state (
    name                       TEXT PRIMARY KEY NOT NULL REFERENCES limits(name) ON DELETE CASCADE,
    held_slots                 INTEGER NOT NULL DEFAULT 0,
    decaying_slots             REAL NOT NULL DEFAULT 0,
    decaying_at                REAL NOT NULL DEFAULT 0,
    denied_slots               INTEGER NOT NULL DEFAULT 0,
    avg_slot_occupancy_seconds REAL NOT NULL DEFAULT 2.0,
    waiters                    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
PRAGMA application_id = 1953656435;
PRAGMA user_version = 1;
INSERT INTO limits VALUES ('gpu', 2, 1, 0), ('api', 10, 1, 5.0), ('off', 1, 0, 0);
INSERT INTO slot_state VALUES ('api', 0, 4.5, 1700000000.0, 3, 2.0, 0);
"#;

fn bases() -> &'static Bases {
    static BASES: OnceLock<Bases> = OnceLock::new();
    BASES.get_or_init(|| {
        let scratch = Scratch::new("bases");
        let db = scratch.path("current.db");
        let mut names = vec![
            "gpu".to_string(),
            "api".to_string(),
            "off".to_string(),
            "paused".to_string(),
            "'; DROP TABLE limits; --".to_string(),
            "\u{e9}t\u{e9} \u{1f680}".to_string(),
        ];
        {
            let limiter = Limiter::open(&db).expect("a store");
            let create = |name: &str, config| limiter.create_limit(name, config).unwrap();
            create(&names[0], LimitConfig::new(2));
            create(&names[1], LimitConfig::new(10).slot_decay_per_second(5.0));
            create(&names[2], LimitConfig::new(1).active(false));
            create(&names[3], LimitConfig::new(0));
            create(&names[4], LimitConfig::new(3).slot_decay_per_second(0.5));
            create(&names[5], LimitConfig::new(7));
            // Enough rows that the tables span several pages.
            for i in 0..120 {
                let name = format!("fill-{i:03}-{}", "x".repeat(i % 40));
                create(
                    &name,
                    LimitConfig::new(i as u32 % 9).slot_decay_per_second(0.25),
                );
                names.push(name);
            }
            assert!(limiter.rate_limit("api", 6).try_acquire().unwrap());
            assert!(!limiter.rate_limit("api", 6).try_acquire().unwrap());
            limiter.flush().unwrap();
        }
        // Slots held and waiters queued, as a crashed owner leaves them.
        Connection::open(&db)
            .unwrap()
            .execute_batch(
                "UPDATE slot_state SET held_slots = 1, waiters = 2 \
                 WHERE name IN ('gpu', 'fill-008-xxxxxxxx')",
            )
            .unwrap();
        let current = fs::read(&db).unwrap();
        let v1_path = scratch.path("v1.db");
        Connection::open(&v1_path)
            .unwrap()
            .execute_batch(SCHEMA_V1)
            .unwrap();
        let v1 = fs::read(&v1_path).unwrap();
        Bases { current, v1, names }
    })
}

/// Random SQL values for the edits.
fn sql_value() -> impl Strategy<Value = String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(1.7e9);
    prop_oneof![
        4 => prop::sample::select(vec![
            "NULL".to_string(),
            "0".into(),
            "1".into(),
            "2".into(),
            "-1".into(),
            "4294967295".into(),
            "4294967296".into(),
            "9223372036854775807".into(),
            "-9223372036854775808".into(),
            "1.5".into(),
            "-0.5".into(),
            "9e999".into(),
            "-9e999".into(),
            "1e308".into(),
            "5e-324".into(),
            "''".into(),
            "'text'".into(),
            "'NaN'".into(),
            "'1e3'".into(),
            "x'00ff'".into(),
            "x''".into(),
            "'gpu'".into(),
            "' padded '".into(),
            "char(0)".into(),
            "zeroblob(300)".into(),
            format!("{}", now + 1e9),
            format!("{}", now - 1e9),
            format!("{now}"),
            "-1e18".into(),
            "1e18".into(),
        ]),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>()
            .prop_filter("SQLite has no NaN literal", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
    ]
}

fn sql_edits() -> Vec<&'static str> {
    seed_lines(SQL_SEEDS, "--").collect()
}

#[derive(Debug, Clone)]
enum StoreEdit {
    /// An edit from `store-edits.sql` with its placeholders filled.
    Sql(String),
    /// Flips these bits.
    FlipBits(Vec<(Index, u8)>),
    /// Sets these bytes.
    SetBytes(Vec<(Index, u8)>),
    /// Cuts the file at a point.
    Truncate(Index),
    /// Overwrites one page with a pattern.
    Page(Index, PageFill),
    /// Sets a 4-byte header field (user_version at 60, application_id at
    /// 68, page counts, freelist, schema cookie, format...).
    Header(usize, u32),
    /// Appends bytes.
    Append(Vec<u8>),
    /// Puts a `-wal` file of junk beside the store.
    WalJunk(Vec<u8>),
    /// Puts junk in the `-lock` file (the owner's pid).
    LockJunk(Vec<u8>),
}

#[derive(Debug, Clone)]
enum PageFill {
    Zeros,
    Ones,
    Random(Vec<u8>),
    CopyOf(Index),
}

/// Offsets of the 4-byte fields of the SQLite header (and the 2-byte page
/// size at 16, the 1-byte fields at 18 to 23).
const HEADER_FIELDS: &[usize] = &[
    16, 18, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 92, 96,
];

fn store_edit() -> impl Strategy<Value = StoreEdit> {
    let sql = (
        prop::sample::select(sql_edits()),
        prop::collection::vec(sql_value(), 6),
        any::<Index>(),
    )
        .prop_map(|(edit, values, which)| {
            let names = &bases().names;
            let name = format!("'{}'", which.get(names).replace('\'', "''"));
            let mut out = edit.replace("{name}", &name);
            for v in values {
                out = out.replacen("{v}", &v, 1);
            }
            StoreEdit::Sql(out)
        });
    let bytes = || prop::collection::vec((any::<Index>(), any::<u8>()), 1..16);
    prop_oneof![
        6 => sql,
        3 => bytes().prop_map(StoreEdit::FlipBits),
        2 => bytes().prop_map(StoreEdit::SetBytes),
        1 => any::<Index>().prop_map(StoreEdit::Truncate),
        2 => (any::<Index>(), prop_oneof![
            Just(PageFill::Zeros),
            Just(PageFill::Ones),
            prop::collection::vec(any::<u8>(), 1..64).prop_map(PageFill::Random),
            any::<Index>().prop_map(PageFill::CopyOf),
        ])
            .prop_map(|(i, f)| StoreEdit::Page(i, f)),
        3 => (
            prop::sample::select(HEADER_FIELDS),
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(2),
                Just(3),
                Just(u32::MAX),
                Just(0x7472_6e73),
                Just(0x8000_0000),
                any::<u32>(),
            ],
        )
            .prop_map(|(at, v)| StoreEdit::Header(at, v)),
        1 => prop::collection::vec(any::<u8>(), 1..5000).prop_map(StoreEdit::Append),
        1 => prop::collection::vec(any::<u8>(), 0..5000).prop_map(StoreEdit::WalJunk),
        1 => prop::collection::vec(any::<u8>(), 0..32).prop_map(StoreEdit::LockJunk),
    ]
}

/// Rebuilds both tables without any constraint, as another tool could.
const LOOSEN: &str = r#"
PRAGMA foreign_keys = OFF;
CREATE TABLE loose_limits AS SELECT * FROM limits;
DROP TABLE limits;
ALTER TABLE loose_limits RENAME TO limits;
CREATE TABLE loose_slots AS SELECT * FROM slot_state;
DROP TABLE slot_state;
ALTER TABLE loose_slots RENAME TO slot_state;
"#;

/// Applies `edits` to the store at `path`; returns how many SQL edits
/// SQLite accepted.
fn apply_store_edits(path: &Path, edits: &[StoreEdit]) -> u64 {
    let mut accepted = 0;
    for edit in edits {
        let mut bytes = fs::read(path).unwrap_or_default();
        let page_size = match bytes.get(16..18) {
            Some(&[a, b]) => match u16::from_be_bytes([a, b]) {
                1 => 65536,
                n if n >= 512 && n.is_power_of_two() => usize::from(n),
                _ => 4096,
            },
            _ => 4096,
        };
        let pages = bytes.len().div_ceil(page_size).max(1);
        match edit {
            StoreEdit::Sql(sql) => {
                // A file the edits break may refuse them: skip.
                let Ok(conn) = Connection::open(path) else {
                    continue;
                };
                let _ = conn.busy_timeout(Duration::from_millis(100));
                let sql = if sql == "LOOSEN" {
                    LOOSEN
                } else {
                    sql.as_str()
                };
                if conn.execute_batch(sql).is_ok() {
                    accepted += 1;
                }
                drop(conn);
                continue;
            }
            StoreEdit::FlipBits(flips) if !bytes.is_empty() => {
                for (at, bit) in flips {
                    let i = at.index(bytes.len());
                    bytes[i] ^= 1 << (bit % 8);
                }
            }
            StoreEdit::SetBytes(sets) if !bytes.is_empty() => {
                for (at, v) in sets {
                    let i = at.index(bytes.len());
                    bytes[i] = *v;
                }
            }
            StoreEdit::Truncate(at) => {
                let len = at.index(bytes.len() + 1);
                bytes.truncate(len);
            }
            StoreEdit::Page(at, fill) => {
                let start = at.index(pages) * page_size;
                let end = (start + page_size).min(bytes.len());
                let source: Vec<u8> = match fill {
                    PageFill::CopyOf(other) => {
                        let s = other.index(pages) * page_size;
                        bytes[s.min(bytes.len())..(s + page_size).min(bytes.len())].to_vec()
                    }
                    _ => Vec::new(),
                };
                for (k, i) in (start..end).enumerate() {
                    bytes[i] = match fill {
                        PageFill::Zeros => 0,
                        PageFill::Ones => 0xff,
                        PageFill::Random(pattern) => pattern[k % pattern.len()],
                        PageFill::CopyOf(_) => source.get(k).copied().unwrap_or(0),
                    };
                }
            }
            StoreEdit::Header(at, v) => {
                let width = match at {
                    16 => 2,
                    18 | 20 => 1,
                    _ => 4,
                };
                if bytes.len() >= at + width {
                    let be = v.to_be_bytes();
                    bytes[*at..at + width].copy_from_slice(&be[4 - width..]);
                }
            }
            StoreEdit::Append(more) => bytes.extend_from_slice(more),
            StoreEdit::WalJunk(junk) => {
                let _ = fs::write(sidecar(path, "-wal"), junk);
                continue;
            }
            StoreEdit::LockJunk(junk) => {
                let _ = fs::write(sidecar(path, "-lock"), junk);
                continue;
            }
            _ => continue,
        }
        fs::write(path, &bytes).unwrap();
    }
    accepted
}

static STORE_TALLY: OnceLock<Tally> = OnceLock::new();

/// A mutated store: `Limiter::open` returns an error, or a limiter that works
/// (acquire and release on its limits and on a new one, then `flush()`);
/// never a panic, never a hang. A file rejected as "not a turnstile store"
/// or as damaged is untouched.
fn fuzz_store(v1: bool, edits: Vec<StoreEdit>) -> Result<(), TestCaseError> {
    let tally = STORE_TALLY.get_or_init(Tally::default);
    let scratch = Scratch::new("store");
    let db = scratch.path("limits.db");
    let base = if v1 { &bases().v1 } else { &bases().current };
    fs::write(&db, base).unwrap();
    let accepted = apply_store_edits(&db, &edits);
    tally.add("SQL edits applied", accepted);
    tally.add("mutations", edits.len() as u64);
    let before = fs::read(&db).unwrap_or_default();
    let limiter = match Limiter::open(&db) {
        Err(e) => {
            let text = one_line(&e)?;
            prop_assert!(
                matches!(e, Error::Storage { .. }),
                "open failed with something else than Storage: {}",
                text
            );
            if [
                "not a turnstile store",
                "newer than",
                "damaged store",
                "appears twice",
            ]
            .iter()
            .any(|refused| text.contains(refused))
            {
                let after = fs::read(&db).unwrap_or_default();
                prop_assert!(after == before, "a rejected file was changed: {}", text);
                tally.add("rejected untouched", 1);
            }
            if text.contains("quick_check") {
                tally.add("open: damaged (quick_check)", 1);
            } else if text.contains("damaged store") {
                tally.add("open: damaged (tables)", 1);
            }
            tally.add("open: error", 1);
            return Ok(());
        }
        Ok(limiter) => limiter,
    };
    tally.add("open: ok", 1);
    let infos = limiter.limits();
    for info in &infos {
        prop_assert!(
            valid_name(&info.name),
            "an invalid name came back: {:?}",
            info
        );
        prop_assert!(valid_rate(info.slot_decay_per_second), "{:?}", info);
        prop_assert_eq!(
            (info.held_slots, info.waiters),
            (0, 0),
            "the previous owner's slots are free: {:?}",
            info
        );
    }
    // Every restored limit that has room lends a slot and takes it back.
    for info in infos.iter().take(12) {
        if info.active && info.limit > 0 && info.active_slots < info.limit {
            let guard = limiter
                .concurrency(info.name.as_str(), 1)
                .try_acquire()
                .map_err(|e| TestCaseError::fail(format!("{info:?}: {e}")))?;
            prop_assert!(guard.is_some(), "{:?} has room", info);
            prop_assert_eq!(limiter.limit(&info.name).unwrap().held_slots, 1);
            drop(guard);
            prop_assert_eq!(limiter.limit(&info.name).unwrap().held_slots, 0);
            tally.add("restored limits acquired", 1);
        }
        let _ = limiter.rate_limit(info.name.as_str(), 1).try_acquire();
    }
    // A new limit works, or the store refuses the write with Storage.
    match limiter.create_limit("fuzz-new", LimitConfig::new(3).slot_decay_per_second(1.0)) {
        Ok(_) => {
            let guard = limiter.concurrency("fuzz-new", 2).try_acquire();
            let guard = guard.map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(guard.is_some());
            prop_assert!(limiter.rate_limit("fuzz-new", 1).try_acquire().unwrap());
            prop_assert_eq!(limiter.limit("fuzz-new").unwrap().active_slots, 3);
            drop(guard);
            prop_assert_eq!(limiter.limit("fuzz-new").unwrap().held_slots, 0);
            tally.add("new limit works", 1);
        }
        Err(Error::Storage { .. } | Error::AlreadyExists { .. }) => {
            tally.add("new limit: storage error", 1)
        }
        Err(e) => return Err(TestCaseError::fail(format!("create on an open store: {e}"))),
    }
    if let Some(first) = infos.first() {
        let _ = limiter.update_limit(&first.name, LimitUpdate::new().limit(first.limit + 1));
        let _ = limiter.reset_limit(&first.name);
    }
    if let Some(last) = infos.last() {
        let _ = limiter.delete_limit(&last.name);
    }
    // A store that opened takes its slot state too: damage that only the
    // writes would meet is refused at open (it used to fail every flush).
    if let Err(e) = limiter.flush() {
        return Err(TestCaseError::fail(format!(
            "the store opened but fails at flush: {}",
            one_line(&e)?
        )));
    }
    tally.add("flush ok", 1);
    drop(limiter);
    // Whatever the limiter left behind opens again, or is refused.
    match Limiter::open(&db) {
        Ok(_) => tally.add("reopen ok", 1),
        Err(e) => {
            let text = one_line(&e)?;
            if std::env::var_os("TURNSTILE_FUZZ_VERBOSE").is_some() {
                eprintln!("reopen: {text}");
            }
            tally.add("reopen: error", 1)
        }
    }
    Ok(())
}

#[test]
fn fuzz_store_files() {
    let input = (
        prop::bool::weighted(0.2),
        prop::collection::vec(store_edit(), 1..5),
    );
    fuzz_target("stores", 160, &STORE_TALLY, input, |(v1, edits)| {
        fuzz_store(v1, edits)
    });
}

/// Found by `fuzz_store_files`: a page copied over another one duplicates
/// rows, and a limit that appeared twice tripped an assertion in
/// `Limiter::open` (and in release builds became two limits of one name).
/// Duplicates made here by dropping the primary key are now refused for the
/// missing key (see the test below), before the rows are read; either way
/// the error says the store is damaged, and the file is untouched.
#[test]
fn duplicate_names_in_a_damaged_store_are_a_storage_error() {
    common::watchdog(common::WATCHDOG, || {
        let scratch = Scratch::new("duplicates");
        let db = scratch.path("limits.db");
        {
            let limiter = Limiter::open(&db).unwrap();
            limiter.create_limit("gpu", LimitConfig::new(2)).unwrap();
        }
        let conn = Connection::open(&db).unwrap();
        conn.execute_batch(LOOSEN).unwrap();
        conn.execute_batch("INSERT INTO limits SELECT * FROM limits")
            .unwrap();
        drop(conn);
        let before = fs::read(&db).unwrap();
        match Limiter::open(&db) {
            Err(e @ Error::Storage { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("\"gpu\" appears twice") || text.contains("damaged store"),
                    "{e}"
                )
            }
            other => panic!("expected a Storage error, got {other:?}"),
        }
        assert!(fs::read(&db).unwrap() == before, "the file changed");
    });
}

/// Found by `fuzz_store_files` (about 2% of its stores, every one rebuilt by
/// `LOOSEN`, alone or with other edits): tables rebuilt without their primary
/// keys read fine, so `Limiter::open` accepted the store, but the
/// write-behind's upsert needs the key. Every sweep then failed and every
/// `flush()` returned `Error::Storage` ("cannot save slot state: ON CONFLICT
/// clause does not match any PRIMARY KEY or UNIQUE constraint"): slot state
/// (decaying slots, denied counts, occupancy) was never saved, so a restart
/// dropped the rate limits' slots, and the rows it inserted meanwhile left
/// NULLs that made the next `open` fail. Now `open` refuses the store, naming
/// the table, and leaves the file and its sidecars as they were.
#[test]
fn a_store_rebuilt_without_its_keys_fails_at_open_not_at_flush() {
    common::watchdog(common::WATCHDOG, || {
        let scratch = Scratch::new("loosened");
        let db = scratch.path("limits.db");
        {
            let limiter = Limiter::open(&db).unwrap();
            limiter.create_limit("gpu", LimitConfig::new(2)).unwrap();
            limiter
                .create_limit("api", LimitConfig::new(10).slot_decay_per_second(0.001))
                .unwrap();
            assert!(limiter.rate_limit("api", 6).try_acquire().unwrap());
        }
        Connection::open(&db)
            .unwrap()
            .execute_batch(LOOSEN)
            .unwrap();
        let sidecars = |db: &Path| {
            ["-wal", "-shm", "-journal", "-lock"]
                .map(|s| fs::read(sidecar(db, s)).ok())
                .to_vec()
        };
        let (before, sidecars_before) = (fs::read(&db).unwrap(), sidecars(&db));
        for attempt in 0..2 {
            match Limiter::open(&db) {
                Err(e @ Error::Storage { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains(&db.display().to_string()), "{text}");
                    assert!(
                        text.contains("damaged store")
                            && text.contains("lacks its primary key on \"name\""),
                        "{text}"
                    );
                }
                Err(e) => panic!("expected a Storage error, got {e}"),
                Ok(limiter) => {
                    let _ = limiter.rate_limit("api", 1).try_acquire();
                    panic!(
                        "attempt {attempt}: opened; flush then says {:?}",
                        limiter.flush()
                    )
                }
            }
            assert!(fs::read(&db).unwrap() == before, "the file changed");
            assert!(sidecars(&db) == sidecars_before, "a sidecar changed");
        }
        // The CLI, which shares the check, refuses it as well.
        let out = Command::new(BIN)
            .arg("--db")
            .arg(&db)
            .arg("ls")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("damaged store"), "{stderr}");
        assert!(fs::read(&db).unwrap() == before, "the CLI changed the file");
    });
}

/// Found by `fuzz_store_files` (4 stores in 20,000): a flipped bit in
/// `slot_state`'s schema text made its foreign key refer to a column or a
/// table that is not `limits(name)`. Reads went on working, but with
/// foreign keys on every write to `slot_state` failed ("foreign key
/// mismatch", "no such table: main.limitp"), so the store opened and then
/// failed every `flush()`. Now `open` refuses it, untouched.
#[test]
fn a_store_whose_slot_state_refers_elsewhere_fails_at_open() {
    common::watchdog(common::WATCHDOG, || {
        for (to, expected) in [("limits(namf)", "\"namf\""), ("limitp(name)", "\"limitp\"")] {
            let scratch = Scratch::new("references");
            let db = scratch.path("limits.db");
            {
                let limiter = Limiter::open(&db).unwrap();
                limiter
                    .create_limit("api", LimitConfig::new(10).slot_decay_per_second(1.0))
                    .unwrap();
            }
            {
                // As the flipped bit does: the schema's text, edited in place.
                let conn = Connection::open(&db).unwrap();
                conn.execute_batch("PRAGMA writable_schema = ON").unwrap();
                let changed = conn
                    .execute(
                        "UPDATE sqlite_master SET sql = replace(sql, 'limits(name)', ?1) \
                         WHERE name = 'slot_state'",
                        [to],
                    )
                    .unwrap();
                assert_eq!(changed, 1);
            }
            let before = fs::read(&db).unwrap();
            match Limiter::open(&db) {
                Err(e @ Error::Storage { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains("damaged store"), "{text}");
                    assert!(text.contains(expected), "{to}: {text}");
                }
                Err(e) => panic!("{to}: expected a Storage error, got {e}"),
                Ok(limiter) => {
                    let _ = limiter.rate_limit("api", 1).try_acquire();
                    panic!("{to}: opened; flush then says {:?}", limiter.flush())
                }
            }
            assert!(fs::read(&db).unwrap() == before, "{to}: the file changed");
        }
    });
}
