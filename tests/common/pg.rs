//! A throwaway PostgreSQL server per test: `initdb` into a fresh temporary
//! directory, started on a free loopback port, stopped and removed on drop.
//! Standard library only; the server binaries come from the machine.
//!
//! ```ignore
//! mod common;
//! use common::pg;
//!
//! #[test]
//! fn something_with_postgres() {
//!     let Some(pg) = pg::cluster_or_skip("something_with_postgres") else {
//!         return; // printed "SKIPPED something_with_postgres: <why>"
//!     };
//!     assert_eq!(pg.psql("select 1").unwrap(), "1");
//!     let url = pg.url(); // postgres://postgres@127.0.0.1:PORT/postgres
//! }
//! ```
//!
//! # Finding the binaries
//! `TURNSTILE_PG_BIN` (a directory holding `initdb`, `pg_ctl`, `postgres`,
//! `psql`) if set, and then only it; else the highest version under
//! `/usr/lib/postgresql/*/bin` (where Debian puts them); else `pg_ctl` and
//! `initdb` on `PATH`.
//!
//! # Skipped, never passed silently
//! Without PostgreSQL, [`cluster_or_skip`] prints `SKIPPED <test>: <why>` to
//! stderr and returns `None`; the test then returns early, so cargo counts it
//! as passed although it checked nothing: the stderr line (shown with
//! `--nocapture`) is the only trace. When the environment variable `CI` is
//! set (non-empty) it panics instead, so CI cannot go green without having
//! run them.
//!
//! # Root
//! `initdb` and `postgres` refuse to run as root. Run as root, the harness
//! runs them as the `postgres` system user (`runuser -u postgres --`, else
//! `su postgres -s /bin/sh -c`) in a directory that user owns (mode 0700).
//!
//! # Settings
//! fsync stays on (benchmarks measure real commits); `max_connections=200`;
//! the Unix socket goes to the cluster's temporary directory; the server log
//! to `server.log` in the data directory ([`Cluster::log`]). Extra settings:
//! [`Cluster::start_with`]. Every cluster has its own directory and port, so
//! tests running in parallel never share a server.
//!
//! A test process killed before its clusters drop leaves them running; the
//! next [`Cluster::start`] on the machine stops and removes those whose
//! process is gone.
#![allow(dead_code)]

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{SystemTime, UNIX_EPOCH};

/// The environment variable naming the directory of the server binaries.
pub const PG_BIN_ENV: &str = "TURNSTILE_PG_BIN";

/// Where Debian installs each major version: `<root>/<version>/bin`.
pub const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// Directory names under `std::env::temp_dir()` start with this; the rest is
/// `<pid>-<counter>-<nanos>`.
const DIR_PREFIX: &str = "turnstile-pgcluster-";

/// A file in each cluster directory saying it is ours (for the stale sweep).
const MARKER: &str = "turnstile-cluster";

/// How many ports to try when the one picked is taken before the server
/// binds it.
const PORT_ATTEMPTS: usize = 5;

/// The server binaries' directory, as the module docs describe.
pub fn pg_bin() -> Result<PathBuf, String> {
    find_pg_bin(
        std::env::var_os(PG_BIN_ENV).as_deref(),
        Path::new(DEBIAN_ROOT),
        std::env::var_os("PATH").as_deref(),
    )
}

/// The search behind [`pg_bin`], its inputs passed in (for testing):
/// `env_dir` the value of `TURNSTILE_PG_BIN`, `versions_root` where to look
/// for `<version>/bin`, `path` the value of `PATH`.
///
/// An `env_dir` that is set but unusable is an error, not a reason to look
/// elsewhere: whoever set it meant that one.
pub fn find_pg_bin(
    env_dir: Option<&OsStr>,
    versions_root: &Path,
    path: Option<&OsStr>,
) -> Result<PathBuf, String> {
    if let Some(dir) = env_dir.filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_server_binaries(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "{PG_BIN_ENV}={} does not hold initdb, pg_ctl and postgres",
                dir.display()
            ))
        };
    }

    let mut versions: Vec<(Vec<u64>, PathBuf)> = fs::read_dir(versions_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<Vec<u64>>>()?;
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }

    for dir in std::env::split_paths(path.unwrap_or_default()) {
        if !dir.join("pg_ctl").is_file() || !dir.join("initdb").is_file() {
            continue;
        }
        // /usr/local/bin/pg_ctl may be a symlink into the real directory,
        // the one that also holds `postgres` and `psql`.
        if let Some(real) = fs::canonicalize(dir.join("pg_ctl"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
        {
            if has_server_binaries(&real) {
                return Ok(real);
            }
        }
        return Ok(dir);
    }

    Err(format!(
        "no PostgreSQL binaries: {PG_BIN_ENV} is not set, no {}/*/bin/initdb, \
         no pg_ctl and initdb on PATH",
        versions_root.display()
    ))
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

/// One cluster for the whole test binary (each test takes a namespace of
/// its own), stopped once the process exits; `None` (skipped, or a panic
/// under CI) as [`cluster_or_skip`].
pub fn shared_cluster_or_skip(test: &str) -> Option<&'static Cluster> {
    static SHARED: std::sync::OnceLock<Result<Cluster, String>> = std::sync::OnceLock::new();
    let started = SHARED.get_or_init(|| {
        let cluster = Cluster::start()?;
        cluster.stop_when_this_process_exits()?;
        Ok(cluster)
    });
    match started {
        Ok(cluster) => Some(cluster),
        Err(why) => {
            skip_or_fail(test, why);
            None
        }
    }
}

/// A cluster for `test`, or `None` after printing `SKIPPED <test>: <why>`
/// when PostgreSQL is missing or does not start. Panics instead of skipping
/// when `CI` is set (non-empty).
pub fn cluster_or_skip(test: &str) -> Option<Cluster> {
    cluster_or_skip_with(test, &[])
}

/// Skips `test` (printing why), or panics under CI.
fn skip_or_fail(test: &str, why: &str) {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!(
            "{test}: needs PostgreSQL and CI is set, so it may not be skipped: {why}\n\
             (install PostgreSQL, or point {PG_BIN_ENV} at its bin directory)"
        );
    }
    eprintln!("SKIPPED {test}: {why} (this test checked nothing)");
}

/// [`cluster_or_skip`] with extra settings, as [`Cluster::start_with`].
pub fn cluster_or_skip_with(test: &str, settings: &[(&str, &str)]) -> Option<Cluster> {
    cluster_or_skip_wrapped(test, settings, &[])
}

/// [`cluster_or_skip_with`] under a command prefix, as
/// [`Cluster::start_wrapped`].
pub fn cluster_or_skip_wrapped(
    test: &str,
    settings: &[(&str, &str)],
    wrap: &[&str],
) -> Option<Cluster> {
    match Cluster::start_wrapped(settings, wrap) {
        Ok(cluster) => Some(cluster),
        Err(why) => {
            skip_or_fail(test, &why);
            None
        }
    }
}

/// A PostgreSQL server of its own: a temporary directory holding the data
/// directory, the Unix socket and the log, a loopback port, user `postgres`
/// with trust authentication. Dropping it stops the server (`-m immediate`)
/// and removes the directory.
pub struct Cluster {
    bin: PathBuf,
    /// Holds `data/`, the socket and the marker; removed on drop.
    root: PathBuf,
    data: PathBuf,
    port: u16,
    /// Run the server tools as `postgres` (we are root).
    as_postgres: bool,
    /// A command prefix for every server tool and `psql`, e.g.
    /// `ip netns exec NS` (empty: none).
    wrap: Vec<String>,
}

impl Cluster {
    /// `initdb` and start a cluster with the default settings.
    pub fn start() -> Result<Cluster, String> {
        Cluster::start_with(&[])
    }

    /// `initdb` and start a cluster with extra settings, e.g.
    /// `&[("fsync", "off")]`, written to the cluster's configuration (so
    /// they hold across restarts).
    pub fn start_with(settings: &[(&str, &str)]) -> Result<Cluster, String> {
        Cluster::start_wrapped(settings, &[])
    }

    /// [`Cluster::start_with`], every server tool (and [`Cluster::psql`])
    /// run under the command prefix `wrap`: `&["ip", "netns", "exec", NS]`
    /// puts the server in network namespace NS, where `127.0.0.1` is that
    /// namespace's loopback (add its other addresses with a
    /// `listen_addresses` setting). The prefix must keep working until the
    /// cluster is dropped.
    pub fn start_wrapped(settings: &[(&str, &str)], wrap: &[&str]) -> Result<Cluster, String> {
        let bin = pg_bin()?;
        let as_postgres = running_as_root();
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| sweep_stale(&bin, as_postgres));

        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let root = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
        // From here on, dropping `cluster` cleans up whatever was made.
        let mut cluster = Cluster {
            data: root.join("data"),
            root,
            bin,
            port: 0,
            as_postgres,
            wrap: wrap.iter().map(|w| w.to_string()).collect(),
        };
        fs::write(cluster.root.join(MARKER), "a turnstile test cluster\n")
            .map_err(|e| format!("write the marker: {e}"))?;
        fs::set_permissions(&cluster.root, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod {}: {e}", cluster.root.display()))?;
        if as_postgres {
            chown_to_postgres(&cluster.root)?;
        }

        let data = cluster.data.to_string_lossy().into_owned();
        cluster.pg_tool(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-instructions",
            ],
        )?;

        let mut conf = String::from("# written by tests/common/pg.rs\n");
        conf += "listen_addresses = '127.0.0.1'\n";
        conf += &format!(
            "unix_socket_directories = '{}'\n",
            quote_conf(&cluster.root.to_string_lossy())
        );
        conf += "max_connections = 200\n";
        conf += "logging_collector = off\n";
        for (name, value) in settings {
            conf += &format!("{name} = '{}'\n", quote_conf(value));
        }
        append(&cluster.data.join("postgresql.conf"), &format!("\n{conf}"))?;

        // The port goes on the command line (pg_ctl keeps it in
        // postmaster.opts for restarts), so that a retry needs no rewrite.
        let mut last_err = String::new();
        for _ in 0..PORT_ATTEMPTS {
            cluster.port = free_port()?;
            let log_before = cluster.log().len();
            match cluster.pg_ctl(&["start"]) {
                Ok(()) => return Ok(cluster),
                Err(e) => {
                    let new_log = cluster.log().get(log_before..).unwrap_or("").to_owned();
                    last_err = e;
                    if !(new_log.contains("could not bind")
                        || new_log.contains("Address already in use")
                        || new_log.contains("could not create any TCP/IP sockets"))
                    {
                        return Err(last_err);
                    }
                }
            }
        }
        Err(format!(
            "no free port after {PORT_ATTEMPTS} tries; last: {last_err}"
        ))
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres` (trust: no password).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The directory holding the Unix socket (and the data directory).
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The directory of the server binaries in use.
    pub fn pg_bin(&self) -> &Path {
        &self.bin
    }

    /// `pg_ctl restart -m MODE -w`; `mode` is `smart`, `fast` or `immediate`
    /// (the last is a crash: the server recovers from WAL as it starts).
    pub fn restart(&self, mode: &str) -> Result<(), String> {
        check_mode(mode)?;
        self.pg_ctl(&["restart", "-m", mode])
    }

    /// `pg_ctl stop -m MODE -w`.
    pub fn stop(&self, mode: &str) -> Result<(), String> {
        check_mode(mode)?;
        self.pg_ctl(&["stop", "-m", mode])
    }

    /// Starts the server again after [`stop`](Self::stop), on the same port.
    pub fn start_again(&self) -> Result<(), String> {
        self.pg_ctl(&["start"])
    }

    /// The server log so far (empty if none), for failure messages.
    pub fn log(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Runs `sql` with `psql` as user `postgres` over TCP and returns its
    /// output, unaligned and tuples only (`select 1` gives `"1"`; rows are
    /// lines, columns separated by `|`), trailing newline trimmed. Several
    /// statements in one call run as one transaction (`psql -c`): an error
    /// rolls all of them back and is returned with psql's stderr.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        let psql = self.bin.join("psql");
        let psql = if psql.is_file() {
            psql
        } else {
            PathBuf::from("psql")
        };
        let port = self.port.to_string();
        let mut cmd = Command::new(&psql);
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-c", sql])
            .env("PGCONNECT_TIMEOUT", "10");
        clear_pg_env(&mut cmd);
        let out = wrapped(cmd, &self.wrap)
            .output()
            .map_err(|e| format!("run {}: {e}", psql.display()))?;
        if out.status.success() {
            let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
            while s.ends_with('\n') {
                s.pop();
            }
            Ok(s)
        } else {
            Err(format!(
                "psql -c {sql:?}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Stops the server and removes its directory once this process has
    /// exited, however it exits: for a cluster kept in a `static` for a
    /// whole test binary (whose `Drop` never runs). A detached shell waits
    /// for this process to end, then does what `Drop` would.
    pub fn stop_when_this_process_exits(&self) -> Result<(), String> {
        let data = self.data.to_string_lossy().into_owned();
        let pg_ctl = self.bin.join("pg_ctl").to_string_lossy().into_owned();
        let stop = [
            pg_ctl.as_str(),
            "stop",
            "-m",
            "immediate",
            "-w",
            "-D",
            &data,
        ]
        .map(quote_sh)
        .join(" ");
        let stop = if self.as_postgres {
            match find_runuser() {
                Some(runuser) => format!(
                    "{} -u postgres -- {stop}",
                    quote_sh(&runuser.to_string_lossy())
                ),
                None => format!("su postgres -s /bin/sh -c {}", quote_sh(&stop)),
            }
        } else {
            stop
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; {stop} >/dev/null 2>&1; rm -rf {root}",
            pid = std::process::id(),
            root = quote_sh(&self.root.to_string_lossy()),
        );
        Command::new("sh")
            .args(["-c", &script])
            .current_dir(&self.root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(drop)
            .map_err(|e| format!("cannot start the cluster's watcher: {e}"))
    }

    fn log_path(&self) -> PathBuf {
        self.data.join("server.log")
    }

    /// `pg_ctl <args> -w -D data -l log` (the port on the command line).
    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let data = self.data.to_string_lossy().into_owned();
        let log = self.log_path().to_string_lossy().into_owned();
        let opts = format!("-p {}", self.port);
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-w", "-t", "60", "-D", &data, "-l", &log, "-o", &opts]);
        self.pg_tool("pg_ctl", &all).map_err(|e| {
            format!(
                "{e}\n--- server log (last lines) ---\n{}",
                tail(&self.log(), 30)
            )
        })
    }

    /// Runs a server tool from the bin directory, as `postgres` when we are
    /// root; `Err` with its output unless it succeeds.
    fn pg_tool(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let program = self.bin.join(tool);
        let program = program.to_string_lossy();
        let out = run_tool(&program, args, self.as_postgres, &self.root, &self.wrap)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool} {}: {}\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = self.pg_ctl(&["stop", "-m", "immediate"]);
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn check_mode(mode: &str) -> Result<(), String> {
    match mode {
        "smart" | "fast" | "immediate" => Ok(()),
        _ => Err(format!(
            "shutdown mode {mode:?}: expected smart, fast or immediate"
        )),
    }
}

/// Runs `program args` in `cwd`, as user `postgres` if `as_postgres`,
/// under the command prefix `wrap`.
fn run_tool(
    program: &str,
    args: &[&str],
    as_postgres: bool,
    cwd: &Path,
    wrap: &[String],
) -> Result<Output, String> {
    let mut cmd = if !as_postgres {
        let mut cmd = Command::new(program);
        cmd.args(args);
        cmd
    } else if let Some(runuser) = find_runuser() {
        let mut cmd = Command::new(runuser);
        cmd.args(["-u", "postgres", "--", program]).args(args);
        cmd
    } else {
        let line = std::iter::once(program)
            .chain(args.iter().copied())
            .map(quote_sh)
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = Command::new("su");
        cmd.args(["postgres", "-s", "/bin/sh", "-c", &line]);
        cmd
    };
    // A cwd the postgres user can enter (ours may be root's 0700 home).
    cmd.current_dir(cwd);
    clear_pg_env(&mut cmd);
    wrapped(cmd, wrap)
        .output()
        .map_err(|e| format!("run {program}: {e}"))
}

/// `cmd` run under the command prefix `wrap` (itself if `wrap` is empty),
/// with its directory and environment.
fn wrapped(cmd: Command, wrap: &[String]) -> Command {
    let Some((first, rest)) = wrap.split_first() else {
        return cmd;
    };
    let mut outer = Command::new(first);
    outer.args(rest).arg(cmd.get_program()).args(cmd.get_args());
    if let Some(dir) = cmd.get_current_dir() {
        outer.current_dir(dir);
    }
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => outer.env(key, v),
            None => outer.env_remove(key),
        };
    }
    outer
}

/// Variables that would steer the tools to another server or data directory.
fn clear_pg_env(cmd: &mut Command) {
    for var in [
        "PGDATA",
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGOPTIONS",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGPASSFILE",
        "PGSSLMODE",
    ] {
        cmd.env_remove(var);
    }
}

fn find_runuser() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join("runuser"))
        .find(|p| p.is_file())
}

/// Whether the effective user id is 0 (from /proc/self/status, else `id -u`).
fn running_as_root() -> bool {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            // Uid: real effective saved filesystem
            return line.split_whitespace().nth(2) == Some("0");
        }
    }
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn chown_to_postgres(dir: &Path) -> Result<(), String> {
    let out = Command::new("chown")
        .arg("-R")
        .arg("postgres:")
        .arg(dir)
        .output()
        .map_err(|e| format!("run chown: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "running as root, so the server must run as user postgres, but \
             chown -R postgres: {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A loopback port nobody listens on now, not handed out before by this
/// process. Another process may still take it before the server binds it:
/// the caller retries.
fn free_port() -> Result<u16, String> {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..20 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("bind 127.0.0.1:0: {e}"))?
            .port();
        if given.insert(port) {
            return Ok(port);
        }
    }
    Err("no fresh free port".into())
}

/// Stops and removes clusters left by test processes that no longer exist
/// (killed before their drop ran). Best effort.
fn sweep_stale(bin: &Path, as_postgres: bool) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let root = entry.path();
        if Path::new(&format!("/proc/{pid}")).exists() || !root.join(MARKER).is_file() {
            continue;
        }
        let data = root.join("data");
        if data.join("postmaster.pid").exists() {
            let pg_ctl = bin.join("pg_ctl");
            let data = data.to_string_lossy().into_owned();
            let _ = run_tool(
                &pg_ctl.to_string_lossy(),
                &["stop", "-m", "immediate", "-w", "-D", &data],
                as_postgres,
                &root,
                &[],
            );
        }
        let _ = fs::remove_dir_all(&root);
    }
}

fn append(path: &Path, text: &str) -> Result<(), String> {
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("append to {}: {e}", path.display()))
}

/// A value for inside single quotes in postgresql.conf.
fn quote_conf(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "''")
}

/// One word for `sh -c`.
fn quote_sh(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
