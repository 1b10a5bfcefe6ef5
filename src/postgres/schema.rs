//! A namespace (one PostgreSQL schema holding a set of limits): its name,
//! checked before it reaches any SQL, its lock key, and its tables and
//! functions, created and migrated forward on first connection.

use super::conn::Client;

use crate::Error;

/// The namespace's schema version this build writes and reads.
pub(crate) const VERSION: i32 = 4;

/// Version 1: tables, and the functions that acquire, release, grant and
/// reap in one round trip each.
const V1: &str = include_str!("schema_v1.sql");

/// Version 2, over version 1: pumps that pass over waiters with no room
/// (linear in the queue, not quadratic).
const V2: &str = include_str!("schema_v2.sql");

/// Version 3, over version 2: a request given up after its reply was lost
/// takes nothing, even if it reaches the server later.
const V3: &str = include_str!("schema_v3.sql");

/// Version 4, over version 3: a rate-limit grant is charged from when it is
/// made, never from before (which let bursts over the bucket through).
const V4: &str = include_str!("schema_v4.sql");

/// The steps from version 1 to [`VERSION`], in order: the script of
/// version `n + 2` at index `n`.
const STEPS: [&str; VERSION as usize - 1] = [V2, V3, V4];

/// A validated namespace.
#[derive(Debug, Clone)]
pub(crate) struct Namespace {
    pub name: String,
    /// The name as a quoted SQL identifier (safe to splice: validated).
    pub quoted: String,
    /// The first half of every advisory lock key of the namespace: a
    /// positive 31-bit hash of its name. Two namespaces of one database
    /// whose names hash alike (about one pair in 2^31) would share their
    /// lock and channel, and their clients' locks would collide (a client
    /// of the second waits for the first's lock of the same id and
    /// `connect` fails after 10 s): never data, but pick another name then.
    pub key: i32,
}

impl Namespace {
    /// A plain identifier, `[A-Za-z_][A-Za-z0-9_]{0,62}`, not starting with
    /// `pg_` (PostgreSQL's own): else [`Error::InvalidConfig`].
    pub fn new(name: &str) -> Result<Namespace, Error> {
        let bad = |reason: String| Error::InvalidConfig {
            name: name.to_string(),
            reason: format!("namespace: {reason}"),
        };
        let mut chars = name.chars();
        match chars.next() {
            None => return Err(bad("it is empty".into())),
            Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
                return Err(bad(format!(
                    "it must start with a letter or '_', not {c:?}"
                )))
            }
            _ => {}
        }
        if let Some(c) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
            return Err(bad(format!(
                "only letters, digits and '_' are allowed, not {c:?}"
            )));
        }
        if name.len() > 63 {
            return Err(bad(format!("{} bytes, at most 63", name.len())));
        }
        if name.starts_with("pg_") {
            return Err(bad("names starting with pg_ are PostgreSQL's".into()));
        }
        // FNV-1a, folded to a positive i32 other than 0.
        let mut hash: u32 = 0x811c_9dc5;
        for b in name.bytes() {
            hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        let key = ((hash & 0x7fff_ffff) | 1) as i32;
        Ok(Namespace {
            name: name.to_string(),
            quoted: format!("\"{name}\""),
            key,
        })
    }

    /// `sql` with the namespace's identifier and key in place.
    pub fn sql(&self, sql: &str) -> String {
        sql.replace("__NS__", &self.quoted)
            .replace("__KEY__", &self.key.to_string())
    }

    /// The channel its grants and wake-ups are notified on.
    pub fn channel(&self) -> String {
        format!("turnstile_{}", self.key)
    }
}

/// What to do with a namespace that does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    Create,
    /// Say that it is missing (the CLI's verbs other than `create`).
    Refuse,
}

/// Creates the namespace's tables and functions if it has none, migrates an
/// older version forward, and refuses a schema that is not a turnstile
/// namespace or is newer than this build (leaving it untouched). One
/// transaction, under the namespace's lock, so that concurrent first
/// connections do it once.
pub(crate) fn migrate(
    client: &mut Client,
    ns: &Namespace,
    missing: Missing,
) -> Result<(), MigrateError> {
    client.batch_execute("BEGIN")?;
    let result = migrate_in(client, ns, missing);
    match &result {
        Ok(()) => client.batch_execute("COMMIT")?,
        // A broken connection is not given back to the pool.
        Err(_) => {
            let _ = client.batch_execute("ROLLBACK");
        }
    }
    result
}

/// [`migrate`]'s work, inside its transaction.
fn migrate_in(tx: &mut Client, ns: &Namespace, missing: Missing) -> Result<(), MigrateError> {
    tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&ns.key])?;
    let exists = tx
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&ns.name])?
        .is_some();
    if !exists {
        if missing == Missing::Refuse {
            return Err(MigrateError::Refused(format!(
                "namespace {:?} does not exist (only `create` makes one)",
                ns.name
            )));
        }
        tx.batch_execute(
            &ns.sql("CREATE SCHEMA __NS__; CREATE TABLE __NS__.meta (version integer NOT NULL); "),
        )?;
        tx.batch_execute(&ns.sql(V1))?;
        for step in STEPS {
            tx.batch_execute(&ns.sql(step))?;
        }
        tx.execute(&ns.sql("INSERT INTO __NS__.meta VALUES ($1)"), &[&VERSION])?;
        return Ok(());
    }
    let has_meta = tx
        .query_opt(
            "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'meta'",
            &[&ns.name],
        )?
        .is_some();
    let version: Option<i32> = if has_meta {
        tx.query_opt(&ns.sql("SELECT version FROM __NS__.meta"), &[])?
            .map(|row| row.get(0))
    } else {
        None
    };
    match version {
        Some(VERSION) => Ok(()),
        Some(v) if v > VERSION => Err(MigrateError::Refused(format!(
            "namespace {:?} has schema version {v}, newer than this build's {VERSION}",
            ns.name
        ))),
        // Older versions move forward one step at a time.
        Some(v) if v >= 1 => {
            for step in &STEPS[v as usize - 1..] {
                tx.batch_execute(&ns.sql(step))?;
            }
            tx.execute(&ns.sql("UPDATE __NS__.meta SET version = $1"), &[&VERSION])?;
            Ok(())
        }
        Some(v) => Err(MigrateError::Refused(format!(
            "namespace {:?} has unknown schema version {v}",
            ns.name
        ))),
        None => Err(MigrateError::Refused(format!(
            "schema {:?} exists but is not a turnstile namespace; left untouched",
            ns.name
        ))),
    }
}

/// Why a namespace could not be used.
#[derive(Debug)]
pub(crate) enum MigrateError {
    Db(tokio_postgres::Error),
    Refused(String),
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Db(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_plain_identifiers() {
        for good in ["turnstile", "team_a", "_x", "Team", &"a".repeat(63)] {
            assert!(Namespace::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a; drop table x",
            "\"x\"",
            "1abc",
            "pg_x",
            "a-b",
            "é",
            &"a".repeat(64),
        ] {
            let err = Namespace::new(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidConfig { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn keys_are_positive_and_case_sensitive() {
        let a = Namespace::new("Team").unwrap();
        let b = Namespace::new("team").unwrap();
        assert!(a.key > 0 && b.key > 0);
        assert_ne!(a.key, b.key);
        assert_eq!(a.sql("__NS__.x __KEY__"), format!("\"Team\".x {}", a.key));
    }
}
