//! A worker pool under two limits, measured from the outside.
//!
//! Worker threads drain a queue of jobs. Each job first calls a rate-limited
//! "api" (a token bucket: `rate_limit`), then computes on a "gpu" that only
//! two slots' worth of jobs may use at once (`concurrency`); every 5th job is
//! big and takes both slots. While the pool runs, a progress bar shows what
//! the limits are doing; at the end a table compares what each limit was
//! configured to allow with what the workers observed, and the last line says
//! whether every limit held (exit status 0) or not (exit status 1).
//!
//! ```sh
//! cargo run --release --example workers
//! cargo run --release --example workers -- --workers 2 --jobs 50
//! cargo run --release --example workers -- --db limits.db   # limits kept in a store
//! cargo run --release --example workers -- --help
//! ```

use std::env;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use turnstile::{Error, LimitConfig, LimitUpdate, Limiter};

// The numbers are chosen so that both limits bind and the default run takes
// about 8 s. A job holds the GPU for 40-80 ms (60 ms on average) and every
// 5th job holds both slots, so a job costs 1.2 slots x 60 ms = 72 slot-ms and
// the two slots finish at most ~28 jobs/s. The API lets 25 calls/s through
// after an initial burst of 5, a little below that: the API paces the pool
// (200 jobs take (200 - 5) / 25 = 7.8 s), while the GPU, busy ~90% of the
// time, still makes jobs queue for it, the big ones above all. Simulated work
// sleeps instead of spinning, so the run takes as long in a debug build and
// on two cores.
const GPU: &str = "gpu";
const GPU_SLOTS: u32 = 2;
const GPU_WORK_MS: RangeInclusive<u64> = 40..=80;
const API: &str = "api";
const API_BURST: u32 = 5;
const API_PER_SECOND: f64 = 25.0;

/// How often the monitor thread looks at the limiter.
const SAMPLE_EVERY: Duration = Duration::from_millis(1);

const USAGE: &str = "\
Usage: cargo run --release --example workers -- [OPTIONS]

A worker pool under a concurrency limit (\"gpu\") and a rate limit (\"api\");
prints what each limit allowed and what the workers observed.

Options:
  --workers N   worker threads (default 8)
  --jobs N      jobs in the queue (default 200)
  --db PATH     keep the limits in the SQLite store at PATH
  --help        print this help";

/// The command line.
struct Args {
    workers: usize,
    jobs: u64,
    db: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = match parse_args(env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(report) => report.print(),
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `Ok(None)` when help was asked for.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut parsed = Args {
        workers: 8,
        jobs: 200,
        db: None,
    };
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--workers" => parsed.workers = positive(&flag, &value()?)?,
            "--jobs" => parsed.jobs = positive(&flag, &value()?)?,
            "--db" => parsed.db = Some(value()?.into()),
            "-h" | "--help" => return Ok(None),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Some(parsed))
}

fn positive<T: std::str::FromStr + PartialOrd + From<u8>>(
    flag: &str,
    value: &str,
) -> Result<T, String> {
    match value.parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        _ => Err(format!(
            "{flag} takes a positive whole number, not {value:?}"
        )),
    }
}

/// Opens the limiter and sets up both limits.
fn open_limiter(db: Option<&PathBuf>) -> Result<Limiter, Error> {
    let limiter = match db {
        Some(path) => Limiter::open(path)?,
        None => Limiter::in_memory(),
    };
    let found = limiter.limits();
    ensure_limit(&limiter, GPU, GPU_SLOTS, 0.0)?;
    // A rate limit is a limit whose slots decay: its capacity is the burst.
    ensure_limit(&limiter, API, API_BURST, API_PER_SECOND)?;
    if let Some(path) = db {
        if found.is_empty() {
            println!("store {}: new, limits created", path.display());
        } else {
            // What an earlier run left: definitions, its counters, and the
            // api bucket drained by the wall-clock time since.
            println!(
                "store {}: reopened, found from an earlier run:",
                path.display()
            );
            for info in &found {
                println!(
                    "  {:<4} limit {}, {} slot(s) in use, {} denied so far",
                    info.name, info.limit, info.active_slots, info.denied_slots
                );
            }
        }
    }
    Ok(limiter)
}

/// Creates the limit, or, when a store already has it from an earlier run,
/// configures it as this run wants it.
fn ensure_limit(limiter: &Limiter, name: &str, limit: u32, decay: f64) -> Result<(), Error> {
    let config = LimitConfig::new(limit).slot_decay_per_second(decay);
    match limiter.create_limit(name, config) {
        Ok(_) => Ok(()),
        Err(Error::AlreadyExists { .. }) => {
            let update = LimitUpdate::new()
                .limit(limit)
                .active(true)
                .slot_decay_per_second(decay);
            limiter.update_limit(name, update).map(drop)
        }
        Err(err) => Err(err),
    }
}

/// Runs the pool to the end and gathers what was observed.
fn run(args: &Args) -> Result<Report, Error> {
    let limiter = open_limiter(args.db.as_ref())?;
    println!(
        "{} workers, {} jobs; {GPU}: {GPU_SLOTS} slots (every 5th job takes 2); \
         {API}: {API_PER_SECOND}/s, burst {API_BURST}",
        args.workers, args.jobs
    );
    let queue = fill_queue(args.jobs);
    let meter = GpuMeter::default();
    let bar = progress_bar(args.jobs);
    let done = AtomicBool::new(false);
    // A store keeps counting denials across runs; report this run's only.
    let denied_before = Denied::read(&limiter);
    let start = Instant::now();
    let (logs, peak_sampled) = thread::scope(|s| {
        let monitor = s.spawn(|| monitor(&limiter, &bar, &done));
        let workers: Vec<_> = (0..args.workers)
            .map(|_| s.spawn(|| worker(&limiter, &queue, &meter, &bar)))
            .collect();
        let logs: Vec<_> = workers.into_iter().map(join).collect();
        done.store(true, Ordering::Relaxed);
        (logs, join(monitor))
    });
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    let mut log = WorkerLog::default();
    for worker_log in logs {
        log.merge(worker_log?);
    }
    let denied = Denied::read(&limiter).since(&denied_before);
    Ok(Report::new(log, &meter, peak_sampled, denied, elapsed))
}

/// Job numbers 1..=jobs, all queued up front; workers stop when it is empty.
fn fill_queue(jobs: u64) -> Receiver<u64> {
    let (sender, receiver) = crossbeam_channel::unbounded();
    for job in 1..=jobs {
        sender.send(job).expect("the receiver is alive");
    }
    receiver
}

fn join<T>(handle: thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn progress_bar(jobs: u64) -> ProgressBar {
    // Drawn on stderr so that stdout keeps only the report; indicatif hides
    // the bar by itself when stderr is not a terminal (CI, a pipe).
    let bar = ProgressBar::with_draw_target(Some(jobs), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{elapsed:>3} [{wide_bar}] {pos}/{len} jobs  {msg}")
        .expect("the template is valid")
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// One worker: takes jobs off the queue until it is empty.
fn worker(
    limiter: &Limiter,
    queue: &Receiver<u64>,
    meter: &GpuMeter,
    bar: &ProgressBar,
) -> Result<WorkerLog, Error> {
    let mut log = WorkerLog::default();
    for job in queue.iter() {
        run_job(limiter, job, meter, &mut log)?;
        bar.inc(1);
    }
    Ok(log)
}

/// One job: an API call, then work on the GPU.
fn run_job(
    limiter: &Limiter,
    job: u64,
    meter: &GpuMeter,
    log: &mut WorkerLog,
) -> Result<(), Error> {
    let asked = Instant::now();
    limiter.rate_limit(API, 1).acquire()?;
    let called = Instant::now();
    log.api_waits.record(called - asked);
    log.api_calls.push(called);

    let occupy = gpu_slots(job);
    let asked = Instant::now();
    let guard = limiter.concurrency(GPU, occupy).acquire()?;
    log.gpu_waits.record(asked.elapsed());
    meter.enter(occupy);
    thread::sleep(gpu_work(job));
    meter.leave(occupy);
    drop(guard);
    Ok(())
}

/// Every 5th job is big and needs both GPU slots.
fn gpu_slots(job: u64) -> u32 {
    if job.is_multiple_of(5) {
        2
    } else {
        1
    }
}

/// How long a job computes: pseudo-random, but the same on every run (one
/// xorshift64 step on the scrambled job number).
fn gpu_work(job: u64) -> Duration {
    let mut x = job.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let span = GPU_WORK_MS.end() - GPU_WORK_MS.start() + 1;
    Duration::from_millis(GPU_WORK_MS.start() + x % span)
}

/// Counts GPU slots as the workers see them, independently of the limiter.
#[derive(Default)]
struct GpuMeter {
    in_use: AtomicU32,
    peak: AtomicU32,
}

impl GpuMeter {
    /// Called right after the acquisition and matched by `leave` right before
    /// the release, so the count never exceeds the slots really held: a peak
    /// above the limit can only mean the limit let too many in.
    fn enter(&self, slots: u32) {
        let now = self.in_use.fetch_add(slots, Ordering::SeqCst) + slots;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self, slots: u32) {
        self.in_use.fetch_sub(slots, Ordering::SeqCst);
    }

    fn peak(&self) -> u32 {
        self.peak.load(Ordering::SeqCst)
    }
}

/// Samples the limiter's own view until `done`, keeps the progress bar's
/// message current and returns the highest `held_slots` seen on the GPU.
fn monitor(limiter: &Limiter, bar: &ProgressBar, done: &AtomicBool) -> u32 {
    let mut peak = 0;
    let mut last_message = Instant::now();
    while !done.load(Ordering::Relaxed) {
        let (Some(gpu), Some(api)) = (limiter.limit(GPU), limiter.limit(API)) else {
            break; // deleted from outside (the admin CLI on a store): nothing to watch
        };
        peak = peak.max(gpu.held_slots);
        // The bar redraws at most 20 times a second; so does its message.
        if last_message.elapsed() >= Duration::from_millis(50) {
            bar.set_message(format!(
                "{GPU} {}/{} held, {} waiting; {API} {} waiting",
                gpu.held_slots, gpu.limit, gpu.waiters, api.waiters
            ));
            last_message = Instant::now();
        }
        thread::sleep(SAMPLE_EVERY);
    }
    peak
}

/// What one worker (and then all of them) observed.
#[derive(Default)]
struct WorkerLog {
    gpu_waits: Waits,
    api_waits: Waits,
    /// When each API call went out.
    api_calls: Vec<Instant>,
}

impl WorkerLog {
    fn merge(&mut self, other: WorkerLog) {
        self.gpu_waits.merge(&other.gpu_waits);
        self.api_waits.merge(&other.api_waits);
        self.api_calls.extend(other.api_calls);
    }
}

/// Time spent blocked in `acquire`.
#[derive(Default)]
struct Waits {
    count: u32,
    total: Duration,
    max: Duration,
}

impl Waits {
    fn record(&mut self, waited: Duration) {
        self.count += 1;
        self.total += waited;
        self.max = self.max.max(waited);
    }

    fn merge(&mut self, other: &Waits) {
        self.count += other.count;
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    fn mean(&self) -> Duration {
        self.total.checked_div(self.count).unwrap_or_default()
    }

    fn describe(&self) -> String {
        format!("mean {}, max {}", ms(self.mean()), ms(self.max))
    }
}

/// The busiest 1-second stretch of API calls.
struct Window {
    calls: usize,
    starts_after: Duration,
}

/// The most calls within any closed window of length `width`, from sorted
/// call times. A token bucket of capacity `b` refilled at `r`/s lets at most
/// `b + r * width` calls through in any such window.
fn busiest_window(calls: &[Instant], width: Duration) -> Window {
    let mut busiest = Window {
        calls: 0,
        starts_after: Duration::ZERO,
    };
    let mut first = 0;
    for (last, &at) in calls.iter().enumerate() {
        while at - calls[first] > width {
            first += 1;
        }
        if last - first + 1 > busiest.calls {
            busiest = Window {
                calls: last - first + 1,
                starts_after: calls[first] - calls[0],
            };
        }
    }
    busiest
}

/// The limiter's own count of slots denied at first try (`denied_slots`).
struct Denied {
    gpu: u64,
    api: u64,
}

impl Denied {
    fn read(limiter: &Limiter) -> Denied {
        let denied = |name| limiter.limit(name).map_or(0, |info| info.denied_slots);
        Denied {
            gpu: denied(GPU),
            api: denied(API),
        }
    }

    fn since(&self, before: &Denied) -> Denied {
        Denied {
            gpu: self.gpu.saturating_sub(before.gpu),
            api: self.api.saturating_sub(before.api),
        }
    }
}

/// Everything the run observed, and the verdict.
struct Report {
    jobs: usize,
    elapsed: Duration,
    gpu_peak_counted: u32,
    gpu_peak_sampled: u32,
    gpu_waits: Waits,
    gpu_denied: u64,
    api_waits: Waits,
    api_denied: u64,
    /// First to last API call.
    api_span: Duration,
    api_busiest: Window,
}

impl Report {
    fn new(
        mut log: WorkerLog,
        meter: &GpuMeter,
        peak: u32,
        denied: Denied,
        elapsed: Duration,
    ) -> Report {
        log.api_calls.sort_unstable();
        let api_span = match (log.api_calls.first(), log.api_calls.last()) {
            (Some(&first), Some(&last)) => last - first,
            _ => Duration::ZERO,
        };
        Report {
            jobs: log.api_calls.len(),
            elapsed,
            gpu_peak_counted: meter.peak(),
            gpu_peak_sampled: peak,
            gpu_denied: denied.gpu,
            gpu_waits: log.gpu_waits,
            api_denied: denied.api,
            api_waits: log.api_waits,
            api_span,
            api_busiest: busiest_window(&log.api_calls, Duration::from_secs(1)),
        }
    }

    /// The most calls the bucket can let through in one second: a full
    /// bucket plus a second's refill.
    fn api_calls_per_window() -> usize {
        API_BURST as usize + API_PER_SECOND as usize
    }

    fn violations(&self) -> Vec<String> {
        let mut found = Vec::new();
        for (peak, how) in [
            (self.gpu_peak_counted, "counted by the workers"),
            (self.gpu_peak_sampled, "sampled from the limiter"),
        ] {
            if peak > GPU_SLOTS {
                found.push(format!(
                    "{GPU}: {peak} slots held at once ({how}), limit {GPU_SLOTS}"
                ));
            }
        }
        // One call of slack: calls are timed when `acquire` returns, a
        // little after the limiter let them through.
        let allowed = Self::api_calls_per_window() + 1;
        let window = &self.api_busiest;
        if window.calls > allowed {
            found.push(format!(
                "{API}: {} calls within 1 s from +{:.3} s, at most {allowed} allowed",
                window.calls,
                window.starts_after.as_secs_f64(),
            ));
        }
        found
    }

    /// Prints the tables and the verdict; the exit status says the same.
    fn print(&self) -> ExitCode {
        println!(
            "{} jobs in {:.2} s\n",
            self.jobs,
            self.elapsed.as_secs_f64()
        );
        row("limit", "measure", "configured", "observed");
        self.print_gpu();
        self.print_api();
        println!();
        let violations = self.violations();
        if violations.is_empty() {
            println!("OK: every limit held");
            return ExitCode::SUCCESS;
        }
        for violation in violations {
            println!("VIOLATION: {violation}");
        }
        ExitCode::FAILURE
    }

    fn print_gpu(&self) {
        let limit = format!("<= {GPU_SLOTS}");
        row(
            GPU,
            "peak slots held, counted by workers",
            &limit,
            &self.gpu_peak_counted.to_string(),
        );
        row(
            GPU,
            "peak held_slots, sampled from limiter",
            &limit,
            &self.gpu_peak_sampled.to_string(),
        );
        row(GPU, "wait in acquire", "", &self.gpu_waits.describe());
        row(
            GPU,
            "slots denied at first try",
            "",
            &self.gpu_denied.to_string(),
        );
    }

    fn print_api(&self) {
        let rate = format!("{API_PER_SECOND}/s");
        let span = self.api_span.as_secs_f64();
        // Calls over the span include the burst, which rode on no refill:
        // the bucket allows `burst + rate * span` calls, so calls / span may
        // exceed the rate by burst / span while (calls - burst) / span may not.
        let achieved = (span > 0.0).then(|| self.jobs as f64 / span);
        let sustained =
            (span > 0.0).then(|| self.jobs.saturating_sub(API_BURST as usize) as f64 / span);
        let per_second = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{r:.1}/s"));
        row(
            API,
            "rate: calls / (last - first call)",
            &rate,
            &per_second(achieved),
        );
        row(
            API,
            &format!("rate after the burst of {API_BURST}"),
            &format!("<= {rate}"),
            &per_second(sustained),
        );
        row(
            API,
            "most calls in any 1 s window",
            &format!(
                "<= {API_BURST} + {API_PER_SECOND} = {}",
                Self::api_calls_per_window()
            ),
            &self.api_busiest.calls.to_string(),
        );
        row(API, "wait in acquire", "", &self.api_waits.describe());
        row(
            API,
            "slots denied at first try",
            "",
            &self.api_denied.to_string(),
        );
    }
}

fn row(limit: &str, measure: &str, configured: &str, observed: &str) {
    println!("{limit:<6} {measure:<38} {configured:<14} {observed}");
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}
