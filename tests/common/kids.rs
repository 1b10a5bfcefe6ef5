//! Child processes for the multi-process tests: the test binary re-executes
//! itself running only its `child` test, which reads its role and its
//! arguments from the environment (see [`Role::from_env`]). A child's stdout
//! is read line by line on a thread of its own, so the parent can wait for a
//! line with a deadline ([`Kid::expect`]).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub const CHILD_ENV: &str = "TURNSTILE_PG_CHILD";
pub const URL_ENV: &str = "TURNSTILE_PG_CHILD_URL";
pub const NS_ENV: &str = "TURNSTILE_PG_CHILD_NS";
pub const ARG_ENV: &str = "TURNSTILE_PG_CHILD_ARG";

/// What a child was started to do.
pub struct Role {
    pub role: String,
    pub url: String,
    pub ns: String,
    pub arg: String,
}

impl Role {
    /// The role this process was started with; `None` in the parent (where
    /// the `child` test then does nothing). A child exits when its parent
    /// does (a parent that failed leaves no child running).
    pub fn from_env() -> Option<Role> {
        let role = std::env::var(CHILD_ENV).ok()?;
        let parent = std::os::unix::process::parent_id();
        thread::spawn(move || loop {
            if std::os::unix::process::parent_id() != parent {
                std::process::exit(3);
            }
            thread::sleep(Duration::from_millis(200));
        });
        Some(Role {
            role,
            url: std::env::var(URL_ENV).expect("a child is given a URL"),
            ns: std::env::var(NS_ENV).expect("a child is given a namespace"),
            arg: std::env::var(ARG_ENV).unwrap_or_default(),
        })
    }
}

/// A child process running a role, its stdout read line by line; killed
/// (if still running) when dropped.
pub struct Kid {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Kid {
    pub fn spawn(role: &str, url: &str, ns: &str, arg: &str) -> Kid {
        Kid::spawn_with(role, url, ns, arg, &[])
    }

    /// As [`spawn`](Self::spawn), with extra environment variables (e.g.
    /// `LD_PRELOAD` and `FAKETIME` for a faked clock).
    pub fn spawn_with(role: &str, url: &str, ns: &str, arg: &str, env: &[(&str, &str)]) -> Kid {
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", "child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, role)
            .env(URL_ENV, url)
            .env(NS_ENV, ns)
            .env(ARG_ENV, arg)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn child");
        let stdout: ChildStdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Kid { child, lines }
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
                    self.pid()
                ),
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig}");
    }

    pub fn wait_ok(mut self) {
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

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`);
/// `None` once it has gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
