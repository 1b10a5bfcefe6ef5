//! What an `.await` that fits at once costs next to the blocking
//! `acquire()` and tokio's `acquire().await`, measured robustly on a busy
//! machine: batches of 2,000 acquire + release, the three forms
//! interleaved, 300 rounds; the minimum, 10th percentile and median batch of
//! each, and their ratios. (`cargo bench --bench acquire -- uncontended`
//! gives criterion's figures; on shared cores its groups, run one after the
//! other, can see different loads.)
//!
//! ```text
//! cargo run --release --example async_overhead
//! ```

use std::hint::black_box;
use std::time::Instant;

use futures::executor::block_on;
use tokio::sync::Semaphore;
use turnstile::{LimitConfig, Limiter};

const BATCH: u32 = 2_000;
const ROUNDS: usize = 300;

#[derive(Clone, Copy)]
enum Form {
    Blocking,
    Async,
    Tokio,
}

/// One batch of `BATCH` acquisitions and releases, in ns per acquisition.
fn batch(form: Form, limiter: &Limiter, sem: &Semaphore) -> f64 {
    block_on(async {
        let start = Instant::now();
        for _ in 0..BATCH {
            match form {
                Form::Blocking => {
                    let guard = limiter.concurrency(black_box("a"), 1).acquire().unwrap();
                    black_box(guard.release());
                }
                Form::Async => {
                    let guard = limiter.concurrency(black_box("a"), 1).await.unwrap();
                    black_box(guard.release());
                }
                Form::Tokio => {
                    let permit = sem.acquire().await.unwrap();
                    drop(black_box(permit));
                }
            }
        }
        start.elapsed().as_nanos() as f64 / f64::from(BATCH)
    })
}

fn main() {
    let limiter = Limiter::in_memory();
    limiter.create_limit("a", LimitConfig::new(1)).unwrap();
    let sem = Semaphore::new(1);
    let forms = [
        ("blocking", Form::Blocking),
        ("async", Form::Async),
        ("tokio", Form::Tokio),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(ROUNDS); forms.len()];
    for _ in 0..ROUNDS {
        for (i, (_, form)) in forms.iter().enumerate() {
            times[i].push(batch(*form, &limiter, &sem));
        }
    }
    for t in &mut times {
        t.sort_by(f64::total_cmp);
    }
    let at = |i: usize, q: usize| times[i][q * (ROUNDS - 1) / 100];
    for (i, (name, _)) in forms.iter().enumerate() {
        println!(
            "{name:>9}: min {:.1} ns, p10 {:.1} ns, median {:.1} ns",
            at(i, 0),
            at(i, 10),
            at(i, 50)
        );
    }
    for (what, i, j) in [("async / blocking", 1, 0), ("async / tokio", 1, 2)] {
        println!(
            "{what}: min {:.2}×, p10 {:.2}×, median {:.2}×",
            at(i, 0) / at(j, 0),
            at(i, 10) / at(j, 10),
            at(i, 50) / at(j, 50)
        );
    }
}
