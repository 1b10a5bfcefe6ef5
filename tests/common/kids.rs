//! Child processes for the multi-process tests of shared limits: the test
//! binary re-executes itself (`--exact child`) with the role and the
//! database in environment variables; the child's `#[test] fn child()`
//! reads them with [`child_args`]. The parent reads the child's stdout line
//! by line and may write lines to its stdin.
#![allow(dead_code)]

use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use turnstile::Limiter;

pub const CHILD_ENV: &str = "TURNSTILE_PG_CHILD";
pub const URL_ENV: &str = "TURNSTILE_PG_CHILD_URL";
pub const NS_ENV: &str = "TURNSTILE_PG_CHILD_NS";
pub const ARG_ENV: &str = "TURNSTILE_PG_CHILD_ARG";

/// A limiter on namespace `ns` of `url` with lease `lease`.
pub fn connect(url: &str, ns: &str, lease: Duration) -> Limiter {
    Limiter::builder()
        .postgres(url)
        .namespace(ns)
        .lease(lease)
        .build()
        .expect("connect")
}

/// What a child was started with.
pub struct ChildArgs {
    pub role: String,
    pub url: String,
    pub ns: String,
    pub arg: String,
}

/// `Some` only in a child process. A child exits when its parent does (a
/// parent that failed leaves no child running).
pub fn child_args() -> Option<ChildArgs> {
    let role = std::env::var(CHILD_ENV).ok()?;
    let parent = std::os::unix::process::parent_id();
    thread::spawn(move || loop {
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(3);
        }
        thread::sleep(Duration::from_millis(200));
    });
    Some(ChildArgs {
        role,
        url: std::env::var(URL_ENV).expect("the child's database"),
        ns: std::env::var(NS_ENV).expect("the child's namespace"),
        arg: std::env::var(ARG_ENV).unwrap_or_default(),
    })
}

/// A line to the parent (flushed at once).
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A child process running `role`, its stdout read line by line.
pub struct Kid {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stdin: Option<ChildStdin>,
}

impl Kid {
    pub fn spawn(role: &str, url: &str, ns: &str, arg: &str) -> Kid {
        Kid::spawn_with(role, url, ns, arg, &[])
    }

    /// As [`Kid::spawn`], with extra environment variables (e.g.
    /// `LD_PRELOAD` and `FAKETIME` for a faked clock).
    pub fn spawn_with(role: &str, url: &str, ns: &str, arg: &str, env: &[(&str, &str)]) -> Kid {
        let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
        cmd.args(["--exact", "child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, role)
            .env(URL_ENV, url)
            .env(NS_ENV, ns)
            .env(ARG_ENV, arg)
            .envs(env.iter().copied());
        let (child, stdin, lines) = super::kid::start_piped(role, cmd);
        Kid {
            child,
            lines,
            stdin,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line with `prefix`, from it on, within `within`.
    pub fn expect(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                // The harness may have begun the line ("test child ... ").
                Ok(line) => {
                    if let Some(at) = line.find(prefix) {
                        return line[at..].to_string();
                    }
                }
                Err(e) => panic!(
                    "child {}: no {prefix:?} within {within:?} ({e})",
                    self.child.id()
                ),
            }
        }
    }

    /// Writes `line` to the child's stdin.
    pub fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the child's stdin");
        writeln!(stdin, "{line}").expect("write to the child");
        stdin.flush().expect("flush to the child");
    }

    pub fn signal(&self, sig: &str) {
        super::kid::signal(&self.child, sig);
    }

    /// Kills the child with SIGKILL and reaps it.
    pub fn kill_now(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    pub fn wait_ok(mut self) {
        self.stdin.take();
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "child failed: {status}");
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines from this process's stdin, read on a thread of their own.
pub fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`);
/// `None` once it has gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
