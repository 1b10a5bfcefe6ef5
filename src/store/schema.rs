//! The store's schema, how a file is recognised as a turnstile store, and
//! the migrations that bring an older store forward.
//!
//! A store is identified by `PRAGMA application_id` and versioned by
//! `PRAGMA user_version`. Every check happens before anything is written, so a
//! file that is not a turnstile store (or is newer than this build) is left
//! byte-for-byte as it was.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use rusqlite::{Connection, Transaction};

use super::storage_err;
use crate::{Error, LimitUpdate};

/// `application_id` of every turnstile store: "trns".
pub const APPLICATION_ID: i32 = 0x7472_6e73;

/// The schema version this build writes.
pub const VERSION: i32 = 3;

/// Version 1: definitions and write-behind slot state.
pub const SCHEMA_V1: &str = r#"
CREATE TABLE limits (
    name                  TEXT PRIMARY KEY NOT NULL,
    "limit"               INTEGER NOT NULL CHECK ("limit" >= 0 AND "limit" <= 4294967295),
    active                INTEGER NOT NULL CHECK (active IN (0, 1)),
    slot_decay_per_second REAL NOT NULL CHECK (slot_decay_per_second >= 0)
) WITHOUT ROWID;
CREATE TABLE slot_state (
    name                       TEXT PRIMARY KEY NOT NULL REFERENCES limits(name) ON DELETE CASCADE,
    held_slots                 INTEGER NOT NULL DEFAULT 0,
    decaying_slots             REAL NOT NULL DEFAULT 0,
    decaying_at                REAL NOT NULL DEFAULT 0,
    denied_slots               INTEGER NOT NULL DEFAULT 0,
    avg_slot_occupancy_seconds REAL NOT NULL DEFAULT 2.0,
    waiters                    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"#;

/// Version 2: a revision per definition (so the owner notices edits made by
/// other processes), a reset counter, and the owner's process id.
const MIGRATE_V1_TO_V2: &str = r#"
ALTER TABLE limits ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
ALTER TABLE limits ADD COLUMN reset_count INTEGER NOT NULL DEFAULT 0;
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value
) WITHOUT ROWID;
"#;

/// Version 3: an incarnation per definition, unique in the store's life, so
/// that an owner tells a limit that another process deleted and created
/// again (between two of its looks) from an updated one: the new limit must
/// not inherit the old one's held slots.
const MIGRATE_V2_TO_V3: &str = r#"
ALTER TABLE limits ADD COLUMN incarnation INTEGER NOT NULL DEFAULT 0;
"#;

/// What a path holds, judged without writing to it.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// No file, or an empty one: a new store goes there.
    Nothing,
    /// A turnstile store of this version or an older one.
    Store { version: i32 },
}

/// The 16 bytes every SQLite database starts with.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Reads a file's first bytes to tell SQLite from anything else, before
/// SQLite is let near it.
pub fn sniff(path: &Path) -> Result<Option<u64>, Error> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(storage_err(path, "cannot open the file", e)),
    };
    let len = file
        .metadata()
        .map_err(|e| storage_err(path, "cannot read the file's metadata", e))?
        .len();
    if len == 0 {
        return Ok(Some(0));
    }
    let mut magic = [0u8; 16];
    let read = file
        .read(&mut magic)
        .map_err(|e| storage_err(path, "cannot read the file", e))?;
    if read < magic.len() || &magic != SQLITE_MAGIC {
        return Err(Error::Storage {
            path: path.display().to_string(),
            message: format!("not a turnstile store: not an SQLite database ({len} bytes)"),
            source: None,
        });
    }
    Ok(Some(len))
}

/// Judges an open SQLite database by reading only.
pub fn inspect(conn: &Connection, path: &Path) -> Result<Found, Error> {
    let err = |e| storage_err(path, "cannot read the database", e);
    let app_id: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(err)?;
    let version: i32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(err)?;
    let objects: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(err)?;
    let foreign = |what: String| Error::Storage {
        path: path.display().to_string(),
        message: format!("not a turnstile store: {what}"),
        source: None,
    };
    if app_id == 0 && version == 0 && objects == 0 {
        return Ok(Found::Nothing);
    }
    if app_id != APPLICATION_ID {
        return Err(foreign(format!(
            "an SQLite database of another application (application_id {app_id}, {objects} schema objects)"
        )));
    }
    if version > VERSION {
        return Err(Error::Storage {
            path: path.display().to_string(),
            message: format!(
                "store version {version} is newer than this turnstile supports ({VERSION}); upgrade turnstile"
            ),
            source: None,
        });
    }
    if version < 1 {
        return Err(foreign(format!(
            "turnstile application id but version {version}"
        )));
    }
    check_tables(conn, path, version)?;
    Ok(Found::Store { version })
}

/// The tables of a store of `version`: each with its columns and its
/// primary key (the first column listed).
fn tables(version: i32) -> Vec<(&'static str, Vec<&'static str>)> {
    let mut limits = vec!["name", "limit", "active", "slot_decay_per_second"];
    if version >= 2 {
        limits.extend(["revision", "reset_count"]);
    }
    if version >= 3 {
        limits.push("incarnation");
    }
    let slot_state = vec![
        "name",
        "held_slots",
        "decaying_slots",
        "decaying_at",
        "denied_slots",
        "avg_slot_occupancy_seconds",
        "waiters",
    ];
    let mut tables = vec![("limits", limits), ("slot_state", slot_state)];
    if version >= 2 {
        tables.push(("meta", vec!["key", "value"]));
    }
    tables
}

/// Checks that a store's tables have the columns and primary keys that
/// writing to it needs, by reading only.
///
/// Another tool can rebuild a table without its constraints (`CREATE TABLE
/// .. AS SELECT`, as a hand edit may): every read still works, but the
/// write-behind's upsert needs the primary key, so such a store used to open
/// and then fail at every sweep and `flush()`, its slot state never saved.
/// It is refused here instead, before anything is written.
fn check_tables(conn: &Connection, path: &Path, version: i32) -> Result<(), Error> {
    let damaged = |what: String| Error::Storage {
        path: path.display().to_string(),
        message: format!("damaged store: {what}; it was left as it was"),
        source: None,
    };
    let mut stmt = conn
        .prepare("SELECT name, pk FROM pragma_table_info(?1)")
        .map_err(|e| storage_err(path, "cannot read the schema", e))?;
    for (table, columns) in tables(version) {
        let found: Vec<(String, i64)> = stmt
            .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| storage_err(path, "cannot read the schema", e))?;
        if found.is_empty() {
            return Err(damaged(format!("table {table:?} is missing")));
        }
        if let Some(column) = columns
            .iter()
            .find(|c| !found.iter().any(|(name, _)| name == *c))
        {
            return Err(damaged(format!("table {table:?} has no column {column:?}")));
        }
        let key: Vec<&str> = found
            .iter()
            .filter(|(_, pk)| *pk > 0)
            .map(|(name, _)| name.as_str())
            .collect();
        if key != columns[..1] {
            return Err(damaged(format!(
                "table {table:?} lacks its primary key on {:?} (rebuilt by another tool?)",
                columns[0]
            )));
        }
    }
    // With foreign keys on, every write to slot_state resolves its reference
    // to limits: a reference to another table or column (a flipped bit in
    // the schema's text) fails them all.
    let references: Vec<(String, Option<String>)> = conn
        .prepare(r#"SELECT "table", "to" FROM pragma_foreign_key_list('slot_state')"#)
        .and_then(|mut stmt| {
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
        .map_err(|e| storage_err(path, "cannot read the schema", e))?;
    for (table, to) in references {
        let to_name = to
            .as_deref()
            .is_none_or(|to| to.eq_ignore_ascii_case("name"));
        if !table.eq_ignore_ascii_case("limits") || !to_name {
            return Err(damaged(format!(
                "table \"slot_state\" refers to {table:?}({}) instead of \"limits\"(\"name\")",
                to.map(|to| format!("{to:?}")).unwrap_or_default()
            )));
        }
    }
    Ok(())
}

/// Runs SQLite's `quick_check` (the structure of every page and table, in
/// one pass over the file: a few percent of what reading the rows costs);
/// an error names the first problem it found.
///
/// Damage that the rows read at open do not cross (a page of the tables'
/// b-trees that only a write visits, say) would otherwise pass `open` and
/// fail every write-behind sweep and `flush()` after it.
pub fn quick_check(conn: &Connection, path: &Path) -> Result<(), Error> {
    let problems: Vec<String> = conn
        .prepare("PRAGMA quick_check(3)")
        .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| storage_err(path, "damaged store: quick_check cannot read it", e))?;
    match problems.first() {
        Some(ok) if problems.len() == 1 && ok == "ok" => Ok(()),
        _ => Err(Error::Storage {
            path: path.display().to_string(),
            message: super::one_line(&format!(
                "damaged store: SQLite's quick_check reports {}; it was left as it was",
                problems.join("; ")
            )),
            source: None,
        }),
    }
}

/// Creates the current schema in an empty database, in one transaction.
pub fn create(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(SCHEMA_V1)?;
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    migrate(tx, 1)
}

/// Brings a store of `from` forward to [`VERSION`], inside the caller's
/// transaction (so a failed migration leaves the old store as it was).
pub fn migrate(tx: &Transaction<'_>, from: i32) -> rusqlite::Result<()> {
    if from < 2 {
        tx.execute_batch(MIGRATE_V1_TO_V2)?;
    }
    if from < 3 {
        tx.execute_batch(MIGRATE_V2_TO_V3)?;
    }
    tx.pragma_update(None, "user_version", VERSION)?;
    Ok(())
}

/// A limit's definition as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub limit: u32,
    pub active: bool,
    pub slot_decay_per_second: f64,
    pub reset_count: i64,
    /// Which creation of the name this is (see [`insert_definition`]).
    pub incarnation: i64,
}

/// A limit's slot state as the owner last wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotRow {
    pub held_slots: u64,
    pub decaying_slots: f64,
    /// Unix time, in seconds, that `decaying_slots` was measured at.
    pub decaying_at: f64,
    pub denied_slots: u64,
    pub avg_slot_occupancy_seconds: f64,
    pub waiters: u64,
}

/// Every definition, with its slot state if any, sorted by name.
pub fn load(conn: &Connection) -> rusqlite::Result<Vec<(String, Definition, Option<SlotRow>)>> {
    let mut stmt = conn.prepare(
        r#"SELECT l.name, l."limit", l.active, l.slot_decay_per_second, l.reset_count,
                  l.incarnation, s.held_slots, s.decaying_slots, s.decaying_at, s.denied_slots,
                  s.avg_slot_occupancy_seconds, s.waiters
           FROM limits l LEFT JOIN slot_state s ON s.name = l.name
           ORDER BY l.name"#,
    )?;
    let rows = stmt.query_map([], |r| {
        let name: String = r.get(0)?;
        let def = Definition {
            limit: r.get(1)?,
            active: r.get(2)?,
            slot_decay_per_second: r.get(3)?,
            reset_count: r.get(4)?,
            incarnation: r.get(5)?,
        };
        // NULL: no slot row joined (the column is NOT NULL).
        let slots = match slot_value::<Option<i64>>(r, 6, &name)? {
            None => None,
            Some(held) => Some(SlotRow {
                held_slots: held.max(0) as u64,
                decaying_slots: slot_value(r, 7, &name)?,
                decaying_at: slot_value(r, 8, &name)?,
                denied_slots: slot_value::<i64>(r, 9, &name)?.max(0) as u64,
                avg_slot_occupancy_seconds: slot_value(r, 10, &name)?,
                waiters: slot_value::<i64>(r, 11, &name)?.max(0) as u64,
            }),
        };
        Ok((name, def, slots))
    })?;
    rows.collect()
}

/// Column `idx` of a slot row; a value of the wrong type (a hand edit) is an
/// error that names the limit, the column and the repair.
fn slot_value<T: rusqlite::types::FromSql>(
    r: &rusqlite::Row<'_>,
    idx: usize,
    name: &str,
) -> rusqlite::Result<T> {
    r.get(idx).map_err(|e| match e {
        rusqlite::Error::InvalidColumnType(i, column, ty) => {
            rusqlite::Error::FromSqlConversionFailure(
                i,
                ty,
                format!(
                    "limit {name:?}: slot_state.{column} holds {ty}, not a number \
                     (`turnstile reset {name}` rewrites its slot state)"
                )
                .into(),
            )
        }
        e => e,
    })
}

/// Every definition, keyed by name (what the owner compares against to see
/// what other processes changed).
pub fn definitions(conn: &Connection) -> rusqlite::Result<Vec<(String, Definition)>> {
    let mut stmt = conn.prepare_cached(
        r#"SELECT name, "limit", active, slot_decay_per_second, reset_count, incarnation
           FROM limits"#,
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get(0)?,
            Definition {
                limit: r.get(1)?,
                active: r.get(2)?,
                slot_decay_per_second: r.get(3)?,
                reset_count: r.get(4)?,
                incarnation: r.get(5)?,
            },
        ))
    })?;
    rows.collect()
}

/// Inserts a definition under a fresh incarnation (the definition's own is
/// ignored), which it returns: a counter in `meta` that only goes up, so a
/// name deleted and created again never gets its old incarnation back.
pub fn insert_definition(tx: &Connection, name: &str, def: &Definition) -> rusqlite::Result<i64> {
    let incarnation: i64 = tx.query_row(
        "INSERT INTO meta (key, value) VALUES ('incarnations', 1)
         ON CONFLICT (key) DO UPDATE SET value = value + 1
         RETURNING value",
        [],
        |r| r.get(0),
    )?;
    tx.execute(
        r#"INSERT INTO limits (name, "limit", active, slot_decay_per_second, reset_count, revision,
                               incarnation)
           VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6)"#,
        rusqlite::params![
            name,
            def.limit,
            def.active,
            def.slot_decay_per_second,
            def.reset_count,
            incarnation
        ],
    )?;
    tx.execute(
        "INSERT OR REPLACE INTO slot_state (name, decaying_at) VALUES (?1, ?2)",
        rusqlite::params![name, super::unix_now()],
    )?;
    Ok(incarnation)
}

/// Changes the fields of a definition that `update` sets, and only those,
/// so that concurrent edits of other fields (by the CLI) are not undone.
/// Returns the number of rows changed (0: no such limit).
pub fn update_definition(
    tx: &Connection,
    name: &str,
    update: &LimitUpdate,
) -> rusqlite::Result<usize> {
    tx.execute(
        r#"UPDATE limits SET "limit" = coalesce(?2, "limit"), active = coalesce(?3, active),
                             slot_decay_per_second = coalesce(?4, slot_decay_per_second),
                             revision = revision + 1
           WHERE name = ?1"#,
        rusqlite::params![
            name,
            update.limit,
            update.active,
            update.slot_decay_per_second
        ],
    )
}

pub fn delete_definition(tx: &Connection, name: &str) -> rusqlite::Result<usize> {
    tx.execute("DELETE FROM slot_state WHERE name = ?1", [name])?;
    tx.execute("DELETE FROM limits WHERE name = ?1", [name])
}

/// Records a reset: the count goes up (so a running owner notices) and the
/// stored decaying and denied slots are zeroed. Returns the rows changed.
pub fn reset_definition(tx: &Connection, name: &str) -> rusqlite::Result<usize> {
    let changed = tx.execute(
        "UPDATE limits SET reset_count = reset_count + 1, revision = revision + 1 WHERE name = ?1",
        [name],
    )?;
    // Also rewrites any value of its slot row that a hand edit made
    // unreadable (text where a number belongs).
    tx.execute(
        r#"UPDATE slot_state SET decaying_slots = 0, decaying_at = 0, denied_slots = 0,
               held_slots = CASE typeof(held_slots) WHEN 'integer' THEN held_slots ELSE 0 END,
               waiters = CASE typeof(waiters) WHEN 'integer' THEN waiters ELSE 0 END,
               avg_slot_occupancy_seconds = CASE WHEN typeof(avg_slot_occupancy_seconds)
                   IN ('real', 'integer') THEN avg_slot_occupancy_seconds ELSE 2.0 END
           WHERE name = ?1"#,
        [name],
    )?;
    Ok(changed)
}

/// Writes one limit's slot state, if the limit is still defined.
pub fn save_slots(tx: &Connection, name: &str, row: &SlotRow) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        r#"INSERT INTO slot_state (name, held_slots, decaying_slots, decaying_at, denied_slots,
                                   avg_slot_occupancy_seconds, waiters)
           SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 WHERE EXISTS (SELECT 1 FROM limits WHERE name = ?1)
           ON CONFLICT (name) DO UPDATE SET
               held_slots = excluded.held_slots, decaying_slots = excluded.decaying_slots,
               decaying_at = excluded.decaying_at, denied_slots = excluded.denied_slots,
               avg_slot_occupancy_seconds = excluded.avg_slot_occupancy_seconds,
               waiters = excluded.waiters"#,
    )?;
    stmt.execute(rusqlite::params![
        name,
        row.held_slots.min(i64::MAX as u64) as i64,
        row.decaying_slots,
        row.decaying_at,
        row.denied_slots.min(i64::MAX as u64) as i64,
        row.avg_slot_occupancy_seconds,
        row.waiters.min(i64::MAX as u64) as i64,
    ])?;
    Ok(())
}

pub fn set_owner_pid(tx: &Connection, pid: Option<u32>) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('owner_pid', ?1)",
        [pid],
    )?;
    Ok(())
}
