//! Clock skew (issue 11 item 5): processes whose clocks disagree share rate
//! limits on PostgreSQL at the server's pace, and share a concurrency limit
//! without over-admission.
//!
//! Five children, four under Debian's `libfaketime` (`LD_PRELOAD`): wall
//! clocks 3 hours ahead, 2 days behind, running twice as fast and at half
//! speed, beside a true one; leases of 3 s. Each child proves that it sees
//! the faked time: it prints its wall clock against the server's at the
//! start, and at the end its wall clock's and its `Instant`'s elapsed time
//! against the server's. Only the wall clock is faked
//! (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as on a host whose clock is wrong:
//! libfaketime's fake monotonic clock disagrees with the kernel's, which
//! Rust's `thread::park_timeout` hands an absolute `CLOCK_MONOTONIC`
//! deadline (a raw `futex` call libfaketime does not see), so under a faked
//! monotonic clock every timed park of std sleeps wrong (3 hours too long at
//! `+3h`; at `x2` longer by the process's age) and the children stall.
//!
//! Every rate-limit grant is recorded by a trigger on the namespace's
//! `limits` table, inside the granting transaction, with the instant the
//! server charged it from (`decaying_at`) and the server's clock
//! (`clock_timestamp()`) when it was made. Over every interval between two
//! grants of a limit the test checks that the slots *charged* in it are at
//! most `limit + rate × d`, and that the slots *made* in it are at most
//! `limit + rate × (d + b)`, `b` being how long before it was made the
//! interval's latest grant was charged from: the time a transaction takes
//! between deciding and writing (milliseconds), never more than 50 ms. (A
//! grant used to be charged from its waiter's decay instant when the
//! waiter's own look came after it: up to 161 ms here, and 5 slots made
//! within 3.4 ms on a limit of 3 at 30/s; schema version 4 charges every
//! grant from when it is made.) It prints the worst ratios, that gap and the
//! pace (slots per second / rate). Holds of the concurrency limit are
//! recorded by the children (server clock, after the grant and before the
//! release, as in `shared_processes.rs`'s oracle; one thread per child
//! takes nothing else, so that it is contended) and replayed: never more
//! than the limit; the trigger also checks the server's own held count.
//! Every slot the server charged is one a child took.
//!
//! Needs `libfaketime` (`apt-get install libfaketime`; `.ci/run` installs
//! it). Without it, or without PostgreSQL, the test says `SKIPPED`; under
//! `CI` it fails. `TURNSTILE_PG_CLOCK_PER_THREAD` sets the acquisitions of
//! each child thread (default 40).

#![cfg(feature = "postgres")]

mod common;

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::thread;
use std::time::{Duration, Instant};

use common::kids::{child_args, ChildArgs, Kid};
use common::pg::shared_cluster_or_skip;
use common::{unix_now, watchdog, Rng, WATCHDOG};
use turnstile::{Event, LimitConfig, Limiter};

const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The rate limits: name, limit, slots per second.
const RATES: [(&str, u32, f64); 2] = [("r1", 3, 30.0), ("r2", 2, 12.0)];
/// The concurrency limit and its capacity.
const HOLD: (&str, u32) = ("c", 2);
/// Threads of mixed traffic per child (and one more that takes only the
/// concurrency limit).
const THREADS: usize = 2;
/// Slack for the server's microsecond timestamps and float arithmetic, in
/// slots.
const EPS: f64 = 1e-3;

/// A child's clock: what `FAKETIME` says, and what the child must see.
struct Fake {
    faketime: Option<&'static str>,
    /// Its wall clock minus the server's at the start, in seconds.
    offset: f64,
    /// Its seconds per real second.
    speed: f64,
}

const fn fake(faketime: Option<&'static str>, offset: f64, speed: f64) -> Fake {
    Fake {
        faketime,
        offset,
        speed,
    }
}

fn seconds(db: &mut postgres::Client) -> f64 {
    db.query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .unwrap()
        .get(0)
}

/// The children's side.
#[test]
fn child() {
    let Some(role) = child_args() else {
        return; // only ever run as a child
    };
    match role.role.as_str() {
        "pace" => pace_child(&role),
        other => panic!("unknown child role {other}"),
    }
}

/// `arg`: acquisitions per thread and the lease in milliseconds, `N,MS`.
/// Prints `CLOCK <own wall clock - server's>`, `READY`, then `DONE <own
/// elapsed> <server's elapsed> r1=.. r2=.. c=.. lost=.. timeouts=..`.
fn pace_child(role: &ChildArgs) {
    let mut args = role.arg.split(',').map(|a| a.parse::<u64>().unwrap());
    let (per, lease_ms) = (args.next().unwrap(), args.next().unwrap());
    let lost_events = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = lost_events.clone();
    let l = Limiter::builder()
        .postgres(role.url.as_str())
        .namespace(role.ns.as_str())
        .lease(Duration::from_millis(lease_ms))
        .on_event(move |e| {
            if let Event::LeaseLost { .. } = e {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    let mut db = postgres::Client::connect(&role.url, postgres::NoTls).unwrap();
    let server0 = seconds(&mut db);
    println!("CLOCK {:.3}", unix_now() - server0);
    println!("READY");
    let (own0, wall0) = (Instant::now(), unix_now());
    let server0 = seconds(&mut db);
    let ns = role.ns.clone();
    let threads: Vec<_> = (0..=THREADS)
        .map(|i| {
            let (l, url, ns) = (l.clone(), role.url.clone(), ns.clone());
            thread::spawn(move || traffic(&l, &url, &ns, per, i as u64))
        })
        .collect();
    let mut total = [0u64; 6];
    for t in threads {
        for (sum, n) in total.iter_mut().zip(t.join().unwrap()) {
            *sum += n;
        }
    }
    l.flush().unwrap();
    let own = own0.elapsed().as_secs_f64();
    let wall = unix_now() - wall0;
    let server = seconds(&mut db) - server0;
    println!(
        "DONE {wall:.3} {own:.3} {server:.3} r1={} r2={} c={} lost={} timeouts={} storage={} lease_lost_events={}",
        total[0],
        total[1],
        total[2],
        total[3],
        total[4],
        total[5],
        lost_events.load(std::sync::atomic::Ordering::SeqCst)
    );
}

/// One child thread: `per` acquisitions of every kind on r1, r2 and c;
/// returns slots taken on r1 and r2, holds of c, holds found lost,
/// timeouts, and tries refused for want of a registration (after a lost
/// lease).
fn traffic(l: &Limiter, url: &str, ns: &str, per: u64, salt: u64) -> [u64; 6] {
    let mut rng = Rng::new(u64::from(std::process::id()) * 31 + salt);
    let mut db = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let record = db
        .prepare(&format!(
            "INSERT INTO log_{ns}.holds VALUES ($1, $2, clock_timestamp(), $3, $4)"
        ))
        .unwrap();
    let mut n = [0u64; 6];
    let timeout = Duration::from_secs(60);
    for _ in 0..per {
        // The last thread takes only c, so that it is contended.
        let kind = if salt == THREADS as u64 {
            9
        } else {
            rng.below(10)
        };
        let (names, occupy): (&[&str], u32) = match kind {
            0..=2 => (&["r1"], 1 + rng.below(2) as u32),
            3 | 4 => (&["r2"], 1),
            5 => (&["r1", "r2"], 1),
            6 => {
                // A try: it takes or refuses at once.
                let name = if rng.chance(50) { "r1" } else { "r2" };
                match l.rate_limit(name, 1).try_acquire() {
                    Ok(true) => n[usize::from(name == "r2")] += 1,
                    Ok(false) => {}
                    // Between a lost lease and the next registration.
                    Err(turnstile::Error::Storage { .. }) => n[5] += 1,
                    Err(e) => panic!("{e}"),
                }
                continue;
            }
            7 => {
                // Async, to completion.
                let fut = l.rate_limit("r1", 1).timeout(timeout).into_future();
                match futures::executor::block_on(fut) {
                    Ok(()) => n[0] += 1,
                    Err(e) if e.is_timeout() => n[4] += 1,
                    Err(e) => panic!("{e}"),
                }
                continue;
            }
            _ => {
                // A hold of c, recorded inside its real interval.
                match l.concurrency(HOLD.0, 1).timeout(timeout).acquire() {
                    Ok(g) => {
                        let id = (i64::from(std::process::id()) << 32)
                            + (salt << 24) as i64
                            + n[2] as i64;
                        db.execute(&record, &[&HOLD.0, &1i32, &false, &id]).unwrap();
                        thread::sleep(Duration::from_micros(1000 + rng.below(9000)));
                        let lost = g.is_lost();
                        db.execute(&record, &[&HOLD.0, &-1i32, &lost, &id]).unwrap();
                        n[3] += u64::from(lost);
                        n[2] += 1;
                    }
                    Err(e) if e.is_timeout() => n[4] += 1,
                    Err(e) => panic!("{e}"),
                }
                continue;
            }
        };
        match l.rate_limit(names, occupy).timeout(timeout).acquire() {
            Ok(()) => {
                for name in names {
                    n[usize::from(*name == "r2")] += u64::from(occupy);
                }
            }
            Err(e) if e.is_timeout() => n[4] += 1,
            Err(e) => panic!("{e}"),
        }
    }
    n
}

/// The worst interval of one limit's grants `(instant, slots)`, sorted by
/// instant: `(slots in it, limit + rate × d, d)` of the interval with the
/// highest ratio of the two.
fn worst_interval(grants: &[(f64, f64)], limit: u32, rate: f64) -> (f64, f64, f64) {
    let mut worst = (0.0, 1.0, 0.0);
    for i in 0..grants.len() {
        let mut slots = 0.0;
        for j in i..grants.len() {
            slots += grants[j].1;
            let d = grants[j].0 - grants[i].0;
            let bound = f64::from(limit) + rate * d;
            if slots / bound > worst.0 / worst.1 {
                worst = (slots, bound, d);
            }
        }
    }
    worst
}

/// Runs one case: children with the clocks `fakes`, on a namespace of its
/// own; checks and prints everything the module docs say.
/// `may_lose`: leases may be lost; then what was lost is reported, and the
/// replay of holds leaves out the holds found lost.
fn case(test: &str, ns: &str, fakes: &[Fake], lease: Duration, may_lose: bool) {
    if !std::path::Path::new(FAKETIME_LIB).is_file() {
        let why = format!("{FAKETIME_LIB} is missing (apt-get install libfaketime)");
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            panic!("{test}: CI is set, so it may not be skipped: {why}");
        }
        eprintln!("SKIPPED {test}: {why} (this test checked nothing)");
        return;
    }
    let Some(cluster) = shared_cluster_or_skip(test) else {
        return;
    };
    let url = cluster.url();
    let l = Limiter::builder()
        .postgres(url.as_str())
        .namespace(ns)
        .build()
        .unwrap();
    for (name, limit, rate) in RATES {
        l.create_limit(name, LimitConfig::new(limit).slot_decay_per_second(rate))
            .unwrap();
    }
    l.create_limit(HOLD.0, LimitConfig::new(HOLD.1)).unwrap();
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    // Every rate grant, as the server charges it: the trigger sees the
    // decaying slots rise by the grant's occupy at `decaying_at`.
    db.batch_execute(&format!(
        "CREATE SCHEMA log_{ns};
         CREATE TABLE log_{ns}.rate (name text, occupy float8, charged timestamptz, made timestamptz);
         CREATE TABLE log_{ns}.holds (name text, delta int, at timestamptz, lost boolean, hold bigint);
         CREATE TABLE log_{ns}.over (name text, held bigint, cap int, at timestamptz);
         CREATE FUNCTION log_{ns}.on_limit() RETURNS trigger LANGUAGE plpgsql AS $$
         DECLARE took float8 := NEW.decaying - {ns}.decaying_now(OLD, NEW.decaying_at);
         BEGIN
             IF NEW.active AND NEW.held > NEW.cap THEN
                 INSERT INTO log_{ns}.over VALUES (NEW.name, NEW.held, NEW.cap, clock_timestamp());
             END IF;
             IF took > 0.5 THEN
                 INSERT INTO log_{ns}.rate VALUES (NEW.name, took, NEW.decaying_at, clock_timestamp());
             END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER log_rate AFTER UPDATE ON {ns}.limits
             FOR EACH ROW EXECUTE FUNCTION log_{ns}.on_limit();"
    ))
    .unwrap();

    let per: u64 = std::env::var("TURNSTILE_PG_CLOCK_PER_THREAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let arg = format!("{per},{}", lease.as_millis());
    let kids: Vec<Kid> = fakes
        .iter()
        .map(|f| match f.faketime {
            None => Kid::spawn("pace", &url, ns, &arg),
            Some(spec) => Kid::spawn_with(
                "pace",
                &url,
                ns,
                &arg,
                &[
                    ("LD_PRELOAD", FAKETIME_LIB),
                    ("FAKETIME", spec),
                    ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
                ],
            ),
        })
        .collect();
    for (kid, f) in kids.iter().zip(fakes) {
        let line = kid.expect("CLOCK", Duration::from_secs(60));
        let offset: f64 = line[6..].parse().unwrap();
        println!(
            "child {} FAKETIME={:?}: wall clock {offset:+.1} s from the server's",
            kid.pid(),
            f.faketime.unwrap_or("")
        );
        assert!(
            (offset - f.offset).abs() < 120.0,
            "FAKETIME={:?}: the child's clock is {offset:+.1} s from the server's, \
             not {:+.0} s: the fake did not take",
            f.faketime,
            f.offset
        );
        kid.expect("READY", Duration::from_secs(60));
    }
    let start = Instant::now();
    let mut reported = [0u64; 3];
    for (kid, f) in kids.into_iter().zip(fakes) {
        let line = kid.expect("DONE", Duration::from_secs(600));
        let mut words = line.split(' ').skip(1);
        let wall: f64 = words.next().unwrap().parse().unwrap();
        let own: f64 = words.next().unwrap().parse().unwrap();
        let server: f64 = words.next().unwrap().parse().unwrap();
        let counts: BTreeMap<&str, u64> = words
            .map(|w| {
                let (k, v) = w.split_once('=').unwrap();
                (k, v.parse().unwrap())
            })
            .collect();
        let (speed, mono) = (wall / server, own / server);
        println!(
            "child FAKETIME={:?}: {wall:.2} s of its wall clock and {own:.2} s of its Instant \
             in {server:.2} s of the server's (speeds {speed:.2}, {mono:.2}); {counts:?}",
            f.faketime.unwrap_or("")
        );
        assert!(
            (speed / f.speed - 1.0).abs() < 0.25,
            "FAKETIME={:?}: the child's wall clock ran at {speed:.2}, not {}",
            f.faketime,
            f.speed
        );
        assert!((mono - 1.0).abs() < 0.25, "its Instant ran at {mono:.2}");
        if !may_lose {
            assert_eq!(counts["lost"], 0, "a hold was lost: {line}");
            assert_eq!(counts["lease_lost_events"], 0, "a lease was lost: {line}");
            assert_eq!(counts["storage"], 0, "a try met no registration: {line}");
        }
        assert_eq!(counts["timeouts"], 0, "an acquisition timed out: {line}");
        reported[0] += counts["r1"];
        reported[1] += counts["r2"];
        reported[2] += counts["c"];
        kid.wait_ok();
    }
    let wall = start.elapsed();

    for (i, (name, limit, rate)) in RATES.into_iter().enumerate() {
        let rows = db
            .query(
                &format!(
                    "SELECT extract(epoch FROM charged)::float8, extract(epoch FROM made)::float8, \
                            occupy FROM log_{ns}.rate WHERE name = $1 ORDER BY made"
                ),
                &[&name],
            )
            .unwrap();
        let mut charged: Vec<(f64, f64)> = rows.iter().map(|r| (r.get(0), r.get(2))).collect();
        let made: Vec<(f64, f64)> = rows.iter().map(|r| (r.get(1), r.get(2))).collect();
        charged.sort_by(|a, b| a.0.total_cmp(&b.0));
        let slots: f64 = charged.iter().map(|g| g.1).sum();
        assert_eq!(
            slots.round() as u64,
            reported[i],
            "{name}: the server charged {slots} slots, the children took {}",
            reported[i]
        );
        let backdated = rows
            .iter()
            .map(|r| r.get::<_, f64>(1) - r.get::<_, f64>(0))
            .fold(0.0, f64::max);
        // Every grant is charged from when it is made (the two instants are
        // read a statement apart): a grant charged from before, from its
        // decay instant, was credited with time the bucket sat empty.
        assert!(
            backdated < 0.05,
            "{name}: a grant was charged {:.1} ms before it was made",
            backdated * 1000.0
        );
        let (worst, bound, d) = worst_interval(&charged, limit, rate);
        let (worst_made, bound_made, d_made) = worst_interval(&made, limit, rate);
        // On the instants the grants were made: a grant charged from before
        // it was made (its waiter looked after its decay instant) lets the
        // grants after it come that much sooner, so the bound is widened by
        // rate × the most any grant of the interval was backdated.
        for i in 0..rows.len() {
            let (mut slots, mut back) = (0.0, 0.0f64);
            for row in &rows[i..] {
                let (charged_at, made_at, occupy): (f64, f64, f64) =
                    (row.get(0), row.get(1), row.get(2));
                slots += occupy;
                back = back.max(made_at - charged_at);
                let d = made_at - rows[i].get::<_, f64>(1);
                let bound = f64::from(limit) + rate * (d + back);
                assert!(
                    slots <= bound + EPS,
                    "{name}: {slots} slots made within {d:.6} s, grants backdated at most \
                     {back:.6} s: more than limit {limit} + {rate}/s × (d + backdating) = {bound}"
                );
            }
        }
        let span = charged.last().unwrap().0 - charged[0].0;
        let pace = (slots - f64::from(limit)) / span / rate;
        println!(
            "{name} (limit {limit}, {rate}/s): {} grants, {slots} slots in {span:.2} s, pace {pace:.3} × rate; \
             worst interval as charged: {worst} slots in {d:.4} s against {bound:.3} \
             (ratio {:.4}); as made: {worst_made} in {d_made:.4} s against {bound_made:.3} \
             (ratio {:.4}); grants charged up to {:.1} ms before they were made",
            rows.len(),
            worst / bound,
            worst_made / bound_made,
            backdated * 1000.0
        );
        assert!(
            worst <= bound + EPS,
            "{name}: {worst} slots charged within {d:.6} s: more than limit {limit} + {rate}/s × d = {bound}"
        );
    }

    // The concurrency limit, replayed on the server's clock: at equal
    // instants a grant counts before a release (the recorded intervals lie
    // inside the real ones, so that is sound).
    let rows = db
        .query(
            &format!(
                "SELECT delta, hold, hold IN (SELECT hold FROM log_{ns}.holds WHERE lost) \
                   FROM log_{ns}.holds ORDER BY at, delta DESC"
            ),
            &[],
        )
        .unwrap();
    assert_eq!(rows.len() as u64, 2 * reported[2]);
    let (mut now, mut peak, mut now_all, mut peak_all) = (0i64, 0i64, 0i64, 0i64);
    let mut lost_holds = 0;
    for row in &rows {
        let delta = i64::from(row.get::<_, i32>(0));
        now_all += delta;
        peak_all = peak_all.max(now_all);
        if row.get::<_, bool>(2) {
            lost_holds += usize::from(delta > 0);
            continue;
        }
        now += delta;
        peak = peak.max(now);
        assert!(
            now <= i64::from(HOLD.1),
            "{}: {now} held at once, limit {}",
            HOLD.0,
            HOLD.1
        );
    }
    println!(
        "{}: {} holds by {} processes, at most {peak} at once (limit {}); {lost_holds} holds \
         found lost, with them at most {peak_all} at once; case took {wall:?}",
        HOLD.0,
        reported[2],
        fakes.len(),
        HOLD.1
    );
    // The server's own count never passed the limit (nobody lowers it).
    let over = db
        .query(&format!("SELECT name, held, cap FROM log_{ns}.over"), &[])
        .unwrap();
    if let Some(row) = over.first() {
        panic!(
            "{}: the server held {} slots, limit {} ({} such changes)",
            row.get::<_, String>(0),
            row.get::<_, i64>(1),
            row.get::<_, i32>(2),
            over.len()
        );
    }
    for name in ["r1", "r2", HOLD.0] {
        let info = l.limit(name).unwrap();
        assert_eq!((info.held_slots, info.waiters), (0, 0), "{info:?}");
    }
}

/// Wall clocks 3 hours ahead, 2 days behind, running twice as fast and
/// at half speed, beside a true one; leases of 3 s (renewed every second).
#[test]
fn skewed_clocks_keep_the_pace() {
    watchdog(WATCHDOG * 20, || {
        case(
            "skewed_clocks_keep_the_pace",
            "clock_skew",
            &[
                fake(None, 0.0, 1.0),
                fake(Some("+3h"), 3.0 * 3600.0, 1.0),
                fake(Some("-2d"), -2.0 * 86400.0, 1.0),
                fake(Some("+0 x2"), 0.0, 2.0),
                fake(Some("+0 x0.5"), 0.0, 0.5),
            ],
            Duration::from_secs(3),
            false,
        );
    });
}
