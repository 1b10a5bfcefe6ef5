//! A child process driven by lines: commands written to its stdin, its
//! stdout read line by line on a thread of its own, so the parent can wait
//! for a line within a deadline or look at what was said so far. Killed
//! on drop.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub struct Kid {
    pub name: String,
    child: Child,
    stdin: RefCell<Option<ChildStdin>>,
    lines: mpsc::Receiver<String>,
    /// Lines read and not yet taken by `expect`.
    backlog: RefCell<VecDeque<String>>,
}

impl Kid {
    /// Starts `cmd` with stdin and stdout piped (stderr inherited).
    pub fn spawn(name: &str, cmd: Command) -> Kid {
        let (child, stdin, lines) = start_piped(name, cmd);
        Kid {
            name: name.to_string(),
            child,
            stdin: RefCell::new(stdin),
            lines,
            backlog: RefCell::new(VecDeque::new()),
        }
    }

    /// Writes one command line to the child.
    pub fn send(&self, line: &str) {
        let mut stdin = self.stdin.borrow_mut();
        let pipe = stdin.as_mut().expect("stdin open");
        writeln!(pipe, "{line}")
            .and_then(|()| pipe.flush())
            .unwrap_or_else(|e| panic!("{}: cannot send {line:?}: {e}", self.name));
    }

    /// Takes the first line (said before or within `within`) containing
    /// `needle`, from `needle` on (the test harness may have begun the
    /// line); panics, naming the child, if none comes.
    pub fn expect(&self, needle: &str, within: Duration) -> String {
        if let Some(line) = self.take(needle) {
            return line;
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(at) = line.find(needle) {
                        return line[at..].to_string();
                    }
                    self.backlog.borrow_mut().push_back(line);
                }
                Err(e) => panic!(
                    "{}: no {needle:?} within {within:?} ({e}); said meanwhile: {:?}",
                    self.name,
                    self.backlog.borrow()
                ),
            }
        }
    }

    /// How many lines said so far (and not taken) contain `needle`, without
    /// waiting.
    pub fn count(&self, needle: &str) -> usize {
        self.drain();
        self.backlog
            .borrow()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The lines said so far and not taken, without waiting.
    pub fn said(&self) -> Vec<String> {
        self.drain();
        self.backlog.borrow().iter().cloned().collect()
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends signal `sig` (`KILL`, `STOP`, `CONT`, ...) to the child.
    pub fn signal(&self, sig: &str) {
        signal(&self.child, sig);
    }

    /// Waits for it to exit (after a signal, say).
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }

    /// Closes its stdin and waits for it to exit successfully.
    pub fn wait_ok(mut self) {
        self.stdin.borrow_mut().take();
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "{} failed: {status}", self.name);
    }

    fn drain(&self) {
        let mut backlog = self.backlog.borrow_mut();
        while let Ok(line) = self.lines.try_recv() {
            backlog.push_back(line);
        }
    }

    fn take(&self, needle: &str) -> Option<String> {
        self.drain();
        let mut backlog = self.backlog.borrow_mut();
        let i = backlog.iter().position(|l| l.contains(needle))?;
        let line = backlog.remove(i).expect("found");
        let at = line.find(needle).expect("found");
        Some(line[at..].to_string())
    }
}

/// Starts `cmd` with stdin and stdout piped (stderr inherited): the child,
/// its stdin, and its stdout's lines as a thread of its own reads them.
pub fn start_piped(
    name: &str,
    mut cmd: Command,
) -> (Child, Option<ChildStdin>, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let stdout = child.stdout.take().expect("piped");
    let stdin = child.stdin.take();
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, stdin, lines)
}

/// Sends signal `sig` (`KILL`, `STOP`, `CONT`, ...) to `child`.
pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {}", child.id());
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
