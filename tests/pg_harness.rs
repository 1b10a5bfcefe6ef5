//! The PostgreSQL test harness (tests/common/pg.rs) checked on its own:
//! clusters start, answer, restart, stop, clean up after themselves, and a
//! machine without PostgreSQL skips loudly (or fails under CI).
//!
//! Each test that starts a server takes 1-3 s; all run in plain `cargo test`.

mod common;

use common::pg::{self, Cluster};
use common::TempDir;
use std::ffi::OsStr;
use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

#[test]
fn a_cluster_starts_and_answers() {
    let t = Instant::now();
    let Some(pg) = pg::cluster_or_skip("a_cluster_starts_and_answers") else {
        return;
    };
    let started = t.elapsed();
    assert_eq!(pg.psql("select 1").unwrap(), "1");
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port())
    );
    assert!(pg.data_dir().join("PG_VERSION").is_file());
    assert!(pg.pg_bin().join("postgres").is_file());
    assert!(pg
        .socket_dir()
        .join(format!(".s.PGSQL.{}", pg.port()))
        .exists());
    // The defaults the module docs promise.
    assert_eq!(pg.psql("show fsync").unwrap(), "on");
    assert_eq!(pg.psql("show max_connections").unwrap(), "200");
    assert_eq!(pg.psql("show listen_addresses").unwrap(), "127.0.0.1");
    assert_eq!(pg.psql("show server_encoding").unwrap(), "UTF8");
    // Several rows, several columns.
    assert_eq!(
        pg.psql("select g, g * 2 from generate_series(1, 3) g")
            .unwrap(),
        "1|2\n2|4\n3|6"
    );
    assert!(
        pg.log().contains("database system is ready"),
        "{}",
        pg.log()
    );
    let t = Instant::now();
    drop(pg);
    eprintln!(
        "initdb + start {started:?}, stop + remove {:?}",
        t.elapsed()
    );
}

#[test]
fn psql_reports_errors() {
    let Some(pg) = pg::cluster_or_skip("psql_reports_errors") else {
        return;
    };
    let err = pg.psql("select * from no_such_table").unwrap_err();
    assert!(err.contains("no_such_table"), "{err}");
    // One call is one transaction (psql -c): an error undoes all of it.
    pg.psql("create table t (x int)").unwrap();
    assert!(pg
        .psql("insert into t values (1); select 1/0; insert into t values (2)")
        .is_err());
    assert_eq!(pg.psql("select count(*) from t").unwrap(), "0");
}

#[test]
fn two_clusters_side_by_side() {
    let (Some(a), Some(b)) = (
        pg::cluster_or_skip("two_clusters_side_by_side"),
        pg::cluster_or_skip("two_clusters_side_by_side"),
    ) else {
        return;
    };
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    a.psql("create table only_in_a (x int)").unwrap();
    assert_eq!(
        a.psql("select count(*) from pg_tables where tablename = 'only_in_a'")
            .unwrap(),
        "1"
    );
    assert_eq!(
        b.psql("select count(*) from pg_tables where tablename = 'only_in_a'")
            .unwrap(),
        "0"
    );
    drop(a);
    assert_eq!(b.psql("select 1").unwrap(), "1", "dropping a stopped b");
}

#[test]
fn restarts_leave_it_answering_with_its_data() {
    let Some(pg) = pg::cluster_or_skip("restarts_leave_it_answering_with_its_data") else {
        return;
    };
    let started_at = || pg.psql("select pg_postmaster_start_time()").unwrap();
    pg.psql("create table t (x int); insert into t values (1)")
        .unwrap();
    let port = pg.port();

    let before = started_at();
    pg.restart("fast").unwrap();
    assert_ne!(started_at(), before, "no restart happened");
    assert_eq!(pg.psql("select x from t").unwrap(), "1");
    assert_eq!(pg.port(), port);

    pg.psql("insert into t values (2)").unwrap();
    let before = started_at();
    // A crash: committed rows come back by WAL replay.
    pg.restart("immediate").unwrap();
    assert_ne!(started_at(), before, "no restart happened");
    assert_eq!(pg.psql("select sum(x) from t").unwrap(), "3");
    assert!(
        pg.log().contains("database system was interrupted"),
        "{}",
        pg.log()
    );

    assert!(pg.restart("sideways").is_err());
}

#[test]
fn stop_then_start_again() {
    let Some(pg) = pg::cluster_or_skip("stop_then_start_again") else {
        return;
    };
    pg.stop("fast").unwrap();
    assert!(pg.psql("select 1").is_err(), "answers while stopped");
    assert!(TcpStream::connect(("127.0.0.1", pg.port())).is_err());
    pg.start_again().unwrap();
    assert_eq!(pg.psql("select 1").unwrap(), "1");
}

#[test]
fn start_with_extra_settings() {
    let Some(pg) = pg::cluster_or_skip_with(
        "start_with_extra_settings",
        &[("fsync", "off"), ("cluster_name", "it's a 'test'")],
    ) else {
        return;
    };
    assert_eq!(pg.psql("show fsync").unwrap(), "off");
    assert_eq!(pg.psql("show cluster_name").unwrap(), "it's a 'test'");
    // Settings live in the configuration, so they survive a restart.
    pg.restart("fast").unwrap();
    assert_eq!(pg.psql("show fsync").unwrap(), "off");
}

#[test]
fn drop_stops_the_server_and_removes_the_directory() {
    let Some(pg) = pg::cluster_or_skip("drop_stops_the_server_and_removes_the_directory") else {
        return;
    };
    let root = pg.socket_dir().to_path_buf();
    let data = pg.data_dir().to_path_buf();
    let port = pg.port();
    assert!(data.is_dir());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    drop(pg);
    assert!(!data.exists(), "{} left behind", data.display());
    assert!(!root.exists(), "{} left behind", root.display());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening on {port}"
    );
}

#[test]
fn a_failed_start_cleans_up_and_says_why() {
    let Some(probe) = pg::cluster_or_skip("a_failed_start_cleans_up_and_says_why") else {
        return;
    };
    drop(probe);
    // A setting the server rejects: initdb succeeds, the start fails.
    let err = match Cluster::start_with(&[("no_such_setting", "1")]) {
        Ok(_) => panic!("started with a bogus setting"),
        Err(e) => e,
    };
    assert!(err.contains("no_such_setting"), "the log is not in: {err}");
    // The error names the data directory (pg_ctl -D ...); it is gone.
    let data = err
        .split_whitespace()
        .find(|w| w.contains("turnstile-pgcluster-"))
        .unwrap_or_else(|| panic!("no directory in: {err}"));
    let root = Path::new(data).parent().unwrap();
    assert!(!root.exists(), "{} left behind", root.display());
}

// ---- finding the binaries (no server needed) ----

fn fake_bin(dir: &Path, tools: &[&str]) {
    fs::create_dir_all(dir).unwrap();
    for tool in tools {
        fs::write(dir.join(tool), "").unwrap();
    }
}

const SERVER_TOOLS: &[&str] = &["initdb", "pg_ctl", "postgres", "psql"];

#[test]
fn a_bogus_pg_bin_env_is_an_error_not_a_fallback() {
    let tmp = TempDir::new("pgbin");
    fake_bin(&tmp.path("versions/15/bin"), SERVER_TOOLS);
    let err = pg::find_pg_bin(
        Some(OsStr::new("/nonexistent/pg/bin")),
        &tmp.path("versions"),
        None,
    )
    .unwrap_err();
    assert!(
        err.contains("TURNSTILE_PG_BIN=/nonexistent/pg/bin"),
        "{err}"
    );

    fake_bin(&tmp.path("mine"), SERVER_TOOLS);
    assert_eq!(
        pg::find_pg_bin(
            Some(tmp.path("mine").as_os_str()),
            &tmp.path("versions"),
            None
        )
        .unwrap(),
        tmp.path("mine")
    );
    // Set but empty counts as unset.
    assert_eq!(
        pg::find_pg_bin(Some(OsStr::new("")), &tmp.path("versions"), None).unwrap(),
        tmp.path("versions/15/bin")
    );
}

#[test]
fn the_highest_complete_version_wins() {
    let tmp = TempDir::new("pgbin");
    let root = tmp.path("versions");
    fake_bin(&root.join("9.6/bin"), SERVER_TOOLS);
    fake_bin(&root.join("15/bin"), SERVER_TOOLS);
    fake_bin(&root.join("13/bin"), SERVER_TOOLS);
    fake_bin(&root.join("17/bin"), &["psql"]); // client only
    fake_bin(&root.join("common/bin"), SERVER_TOOLS); // not a version
    assert_eq!(
        pg::find_pg_bin(None, &root, None).unwrap(),
        root.join("15/bin")
    );
}

#[test]
fn path_is_the_last_resort() {
    let tmp = TempDir::new("pgbin");
    fake_bin(&tmp.path("usr/bin"), SERVER_TOOLS);
    let path = std::env::join_paths([tmp.path("empty"), tmp.path("usr/bin")]).unwrap();
    assert_eq!(
        pg::find_pg_bin(None, &tmp.path("none"), Some(&path)).unwrap(),
        tmp.path("usr/bin")
    );
    let err = pg::find_pg_bin(None, &tmp.path("none"), Some(OsStr::new(""))).unwrap_err();
    assert!(err.contains("no PostgreSQL binaries"), "{err}");
}

// ---- the skip path, in a child process (the environment is per process) ----

const CHILD: &str = "TURNSTILE_PG_HARNESS_CHILD";

/// Runs this test binary's `skip_path_child` with no usable PostgreSQL.
fn run_child(ci: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "skip_path_child",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD, "1")
    .env("TURNSTILE_PG_BIN", "/nonexistent/pg/bin")
    .env_remove("CI");
    if let Some(ci) = ci {
        cmd.env("CI", ci);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
#[ignore = "helper: run in a child process by the skip_* tests"]
fn skip_path_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    assert!(pg::cluster_or_skip("skip_path_child").is_none());
}

#[test]
fn without_postgres_a_test_says_skipped() {
    let (ok, text) = run_child(None);
    assert!(ok, "{text}");
    assert!(
        text.contains("SKIPPED skip_path_child: TURNSTILE_PG_BIN=/nonexistent/pg/bin"),
        "{text}"
    );
    // An empty CI is not CI.
    let (ok, text) = run_child(Some(""));
    assert!(ok && text.contains("SKIPPED skip_path_child"), "{text}");
}

#[test]
fn without_postgres_under_ci_a_test_fails() {
    let (ok, text) = run_child(Some("true"));
    assert!(!ok, "passed under CI without PostgreSQL: {text}");
    assert!(text.contains("CI is set"), "{text}");
    assert!(!text.contains("SKIPPED"), "{text}");
}
