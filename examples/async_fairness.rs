//! Do async tasks that loop on acquisitions that always fit starve each
//! other? 4 tasks on a 2-worker tokio runtime loop on a limit of 4 with zero
//! hold; each task's acquisitions are counted in 50 ms windows, and a
//! window's fairness is its smallest count over its largest (1 is even, 0
//! means a task got nothing). tokio's `Semaphore` runs beside it, for scale.
//!
//! ```text
//! cargo run --release --example async_fairness [-- WINDOWS]
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use turnstile::{LimitConfig, Limiter};

const TASKS: usize = 4;
const WINDOW: Duration = Duration::from_millis(50);

/// Runs `TASKS` tasks looping on `acquire_once` for `windows` windows and
/// returns each window's fairness and the total acquisitions per second.
fn measure<F, Fut>(windows: usize, acquire_once: F) -> (Vec<f64>, f64)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..TASKS).map(|_| AtomicU64::new(0)).collect());
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let (stop, counts, acquire_once) = (stop.clone(), counts.clone(), acquire_once.clone());
            rt.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    acquire_once().await;
                    counts[i].fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let snapshot = || -> Vec<u64> { counts.iter().map(|c| c.load(Ordering::Relaxed)).collect() };
    // One window to let every worker start.
    std::thread::sleep(WINDOW);
    let first = snapshot();
    let mut last = first.clone();
    let mut fairness = Vec::with_capacity(windows);
    for _ in 0..windows {
        std::thread::sleep(WINDOW);
        let now = snapshot();
        let got: Vec<u64> = now.iter().zip(&last).map(|(a, b)| a - b).collect();
        let (min, max) = (got.iter().min().unwrap(), got.iter().max().unwrap());
        fairness.push(if *max == 0 {
            1.0
        } else {
            *min as f64 / *max as f64
        });
        last = now;
    }
    let total: u64 = last.iter().zip(&first).map(|(a, b)| a - b).sum();
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for task in tasks {
            task.await.unwrap();
        }
    });
    let rate = total as f64 / (WINDOW.as_secs_f64() * windows as f64);
    (fairness, rate)
}

fn report(what: &str, (mut fairness, rate): (Vec<f64>, f64)) {
    fairness.sort_by(f64::total_cmp);
    let median = fairness[fairness.len() / 2];
    let worst = fairness[0];
    let starved = fairness.iter().filter(|f| **f == 0.0).count();
    println!(
        "{what:<28} fairness median {median:.2}, worst {worst:.2}, \
         windows with a task starved {starved}/{}, {:.2} M acquisitions/s",
        fairness.len(),
        rate / 1e6
    );
}

fn main() {
    let windows: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("a number of windows"))
        .unwrap_or(20);
    println!(
        "{TASKS} tasks, 2 tokio workers, limit {TASKS}, zero hold, {windows} windows of {} ms",
        WINDOW.as_millis()
    );

    let limiter = Limiter::in_memory();
    limiter.create_limit("x", LimitConfig::new(4)).unwrap();
    report(
        "turnstile .await",
        measure(windows, move || {
            let limiter = limiter.clone();
            async move {
                drop(limiter.concurrency("x", 1).await.unwrap());
            }
        }),
    );

    let sem = Arc::new(Semaphore::new(4));
    report(
        "tokio Semaphore acquire()",
        measure(windows, move || {
            let sem = sem.clone();
            async move {
                drop(sem.acquire().await.unwrap());
            }
        }),
    );
}
