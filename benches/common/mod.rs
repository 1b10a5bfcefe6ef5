//! Shared by the bench binaries: the criterion configuration, the floor
//! semaphore (parking_lot `Mutex` + `Condvar`), and the summary table read
//! back from criterion's `estimates.json` files after the groups ran.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use criterion::Criterion;
use parking_lot::{Condvar, Mutex};

// ---------------------------------------------------------------------------
// Criterion
// ---------------------------------------------------------------------------

/// Where criterion writes its results, set explicitly so that the summary
/// reads from the same place: `$CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`,
/// else `<the target dir this bench binary was built into>/criterion`.
pub fn output_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    // target/<profile>/deps/<bench>-<hash>
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.join("criterion")))
        .unwrap_or_else(|| PathBuf::from("target/criterion"))
}

/// Short settings, so that `cargo bench` stays well under ten minutes; the
/// command line (`--measurement-time` ...) still overrides them.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1000))
        .output_directory(&output_dir())
        .configure_from_args()
}

/// What the command line asks of this binary, as far as the one-off
/// measurements and the summary care.
pub struct Cli {
    /// Benchmarking for real (`cargo bench`), not `--test` / `--list` /
    /// `--profile-time` / `cargo test --benches`.
    pub measure: bool,
    filters: Vec<String>,
}

impl Cli {
    pub fn parse() -> Cli {
        // Criterion's options that take a value.
        const WITH_VALUE: &[&str] = &[
            "-c",
            "--color",
            "-s",
            "--save-baseline",
            "-b",
            "--baseline",
            "--baseline-lenient",
            "--load-baseline",
            "--sample-size",
            "--warm-up-time",
            "--measurement-time",
            "--nresamples",
            "--noise-threshold",
            "--confidence-level",
            "--significance-level",
            "--profile-time",
            "--format",
            "--output-format",
            "--plotting-backend",
        ];
        let args: Vec<String> = std::env::args().skip(1).collect();
        let has = |flag: &str| {
            args.iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        };
        let measure = has("--bench") && !has("--test") && !has("--list") && !has("--profile-time");
        let mut filters = Vec::new();
        let mut skip_next = false;
        for arg in &args {
            if std::mem::take(&mut skip_next) {
                continue;
            }
            if arg.starts_with('-') {
                skip_next = WITH_VALUE.contains(&arg.as_str());
                continue;
            }
            filters.push(arg.clone());
        }
        Cli { measure, filters }
    }

    /// Whether the one-off measurement `name` should run (criterion's filter
    /// is a regex; here a plain substring is enough).
    pub fn wants(&self, name: &str) -> bool {
        self.measure
            && (self.filters.is_empty() || self.filters.iter().any(|f| name.contains(f.as_str())))
    }
}

// ---------------------------------------------------------------------------
// The floor: a counting semaphore on parking_lot's Mutex + Condvar
// ---------------------------------------------------------------------------

/// The plainest semaphore: a counter under a mutex, a condvar to sleep on.
/// Not fair (a releaser may re-take before the woken thread runs).
pub struct CondvarSemaphore {
    permits: Mutex<u32>,
    freed: Condvar,
}

/// A permit of [`CondvarSemaphore`]; gives it back on drop.
pub struct CondvarPermit<'a>(&'a CondvarSemaphore);

impl CondvarSemaphore {
    pub fn new(permits: u32) -> Self {
        CondvarSemaphore {
            permits: Mutex::new(permits),
            freed: Condvar::new(),
        }
    }

    pub fn try_acquire(&self) -> Option<CondvarPermit<'_>> {
        let mut permits = self.permits.lock();
        if *permits == 0 {
            return None;
        }
        *permits -= 1;
        Some(CondvarPermit(self))
    }

    pub fn acquire(&self) -> CondvarPermit<'_> {
        let mut permits = self.permits.lock();
        while *permits == 0 {
            self.freed.wait(&mut permits);
        }
        *permits -= 1;
        CondvarPermit(self)
    }
}

impl Drop for CondvarPermit<'_> {
    fn drop(&mut self) {
        *self.0.permits.lock() += 1;
        self.0.freed.notify_one();
    }
}

// ---------------------------------------------------------------------------
// Small statistics
// ---------------------------------------------------------------------------

pub fn median(values: &mut [f64]) -> f64 {
    assert!(!values.is_empty());
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The `p`-th percentile (0..=100), nearest rank.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    assert!(!values.is_empty());
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

// ---------------------------------------------------------------------------
// Reading criterion's results back
// ---------------------------------------------------------------------------

/// Criterion's results of this run.
pub struct Results {
    dir: PathBuf,
    since: SystemTime,
}

impl Results {
    /// Results written from `since` on (older files are a previous run's).
    pub fn since(since: SystemTime) -> Results {
        Results {
            dir: output_dir(),
            since,
        }
    }

    /// The median time of one iteration of `group/id`, in ns, if it ran in
    /// this run. `id` is as criterion prints it (`function` or
    /// `function/parameter`).
    pub fn median_ns(&self, group: &str, id: &str) -> Option<f64> {
        let mut path = self.dir.join(safe(group));
        for part in id.split('/') {
            path.push(safe(part));
        }
        let path = path.join("new").join("estimates.json");
        let fresh = std::fs::metadata(&path).and_then(|m| m.modified()).ok()? >= self.since;
        if !fresh {
            return None;
        }
        point_estimate(&std::fs::read_to_string(&path).ok()?, "median")
    }
}

/// As criterion's `make_filename_safe`, for the names used here.
fn safe(s: &str) -> String {
    s.replace(['?', '"', '/', '\\', '*', '<', '>', ':', '|', '^'], "_")
}

/// `"<stat>":{ ... "point_estimate":X ...}` out of criterion's estimates.json.
fn point_estimate(json: &str, stat: &str) -> Option<f64> {
    let rest = &json[json.find(&format!("\"{stat}\""))?..];
    let rest = &rest[rest.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = rest.find([',', '}'])?;
    rest[..end].trim().parse().ok()
}

// ---------------------------------------------------------------------------
// The summary table
// ---------------------------------------------------------------------------

/// How a ratio is judged.
#[derive(Clone, Copy)]
pub enum Target {
    /// `ours / reference <= x`.
    AtMost(f64),
    /// `ours / reference >= x` (throughput).
    AtLeast(f64),
    /// `ours <= x` ns, whatever the reference.
    OursAtMost(f64),
    /// Shown for comparison only.
    None,
}

pub struct Row {
    pub case: String,
    pub ours: String,
    pub peer: String,
    pub ratio: Option<f64>,
    pub target: Target,
    /// The value `Target::OursAtMost` judges (ns).
    pub ours_value: Option<f64>,
}

#[derive(Default)]
pub struct Table {
    rows: Vec<Row>,
}

/// `12.3 ns`, `4.56 µs`, `1.23 ms`, `2.012 s`.
pub fn fmt_ns(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.1} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.3} s", ns / 1e9)
    }
}

/// `12.3 M/s`, `456 k/s`.
pub fn fmt_rate(per_sec: f64) -> String {
    if per_sec >= 1e6 {
        format!("{:.2} M/s", per_sec / 1e6)
    } else if per_sec >= 1e3 {
        format!("{:.1} k/s", per_sec / 1e3)
    } else {
        format!("{per_sec:.1} /s")
    }
}

/// `12`, `0.98`, `1234567`.
pub fn fmt_count(n: f64) -> String {
    if n.fract() == 0.0 {
        format!("{n:.0}")
    } else {
        format!("{n:.2}")
    }
}

impl Table {
    /// A row comparing two plain quantities (counts), `ours / peer` against
    /// `target`.
    pub fn counts(
        &mut self,
        case: &str,
        ours: (&str, Option<f64>),
        peer: (&str, Option<f64>),
        target: Target,
    ) {
        let ratio = ours.1.zip(peer.1).map(|(a, b)| a / b);
        self.rows.push(Row {
            case: case.to_string(),
            ours: show(ours.0, ours.1.map(fmt_count)),
            peer: show(peer.0, peer.1.map(fmt_count)),
            ratio,
            target,
            ours_value: ours.1,
        });
    }

    /// A row comparing two times (ns), `ours / peer` against `target`.
    pub fn times(
        &mut self,
        case: &str,
        ours: (&str, Option<f64>),
        peer: (&str, Option<f64>),
        target: Target,
    ) {
        let ratio = ours.1.zip(peer.1).map(|(a, b)| a / b);
        self.rows.push(Row {
            case: case.to_string(),
            ours: show(ours.0, ours.1.map(fmt_ns)),
            peer: show(peer.0, peer.1.map(fmt_ns)),
            ratio,
            target,
            ours_value: ours.1,
        });
    }

    /// A row comparing two throughputs (ops/s), `ours / peer` against `target`.
    pub fn rates(
        &mut self,
        case: &str,
        ours: (&str, Option<f64>),
        peer: (&str, Option<f64>),
        target: Target,
    ) {
        let ratio = ours.1.zip(peer.1).map(|(a, b)| a / b);
        self.rows.push(Row {
            case: case.to_string(),
            ours: show(ours.0, ours.1.map(fmt_rate)),
            peer: show(peer.0, peer.1.map(fmt_rate)),
            ratio,
            target,
            ours_value: ours.1,
        });
    }

    pub fn render(&self, title: &str) -> String {
        let head = ["case", "turnstile", "reference", "ratio", "target", "met?"];
        let cells: Vec<[String; 6]> = self
            .rows
            .iter()
            .map(|r| {
                let (target, met) = match (r.target, r.ratio) {
                    (Target::AtMost(x), Some(q)) => (format!("≤ {x:.2}×"), yes_no(q <= x)),
                    (Target::AtLeast(x), Some(q)) => (format!("≥ {x:.2}×"), yes_no(q >= x)),
                    (Target::AtMost(x), None) => (format!("≤ {x:.2}×"), "n/a".into()),
                    (Target::AtLeast(x), None) => (format!("≥ {x:.2}×"), "n/a".into()),
                    (Target::OursAtMost(x), _) => (
                        format!("≤ {}", fmt_ns(x)),
                        r.ours_value.map_or("n/a".into(), |v| yes_no(v <= x)),
                    ),
                    (Target::None, _) => ("—".into(), "—".into()),
                };
                [
                    r.case.clone(),
                    r.ours.clone(),
                    r.peer.clone(),
                    r.ratio.map_or("n/a".into(), |q| format!("{q:.2}×")),
                    target,
                    met,
                ]
            })
            .collect();
        let mut widths = head.map(|h| h.chars().count());
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cols: [&str; 6]| {
            let mut s = String::from("|");
            for (c, w) in cols.iter().zip(widths) {
                let pad = w - c.chars().count();
                let _ = write!(s, " {c}{} |", " ".repeat(pad));
            }
            s
        };
        let mut out = format!("\n## {title}\n\n");
        out += &line(head);
        out.push('\n');
        out += &line(widths.map(|w| "-".repeat(w)).each_ref().map(String::as_str));
        out.push('\n');
        for row in &cells {
            out += &line(row.each_ref().map(String::as_str));
            out.push('\n');
        }
        out
    }
}

fn show(label: &str, value: Option<String>) -> String {
    let value = value.unwrap_or_else(|| "n/a".into());
    if label.is_empty() {
        value
    } else {
        format!("{label} {value}")
    }
}

fn yes_no(ok: bool) -> String {
    if ok { "yes" } else { "NO" }.into()
}

/// Where a table is also written, beside criterion's results.
pub fn save(name: &str, text: &str) -> Option<PathBuf> {
    let path = output_dir().join(format!("turnstile-summary-{name}.md"));
    std::fs::create_dir_all(path.parent()?).ok()?;
    std::fs::write(&path, text).ok()?;
    Some(path)
}
