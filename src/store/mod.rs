//! The SQLite store: limit definitions committed before each change returns,
//! slot state written behind by one thread, one owner per file.
//!
//! * [`schema`]: tables, recognising a store, migrations.
//! * [`owner`]: the OS lock that makes one live limiter the owner.
//! * [`writer`]: the write-behind thread, which also picks up definitions
//!   that other processes (the CLI) committed.

pub(crate) mod admin;
pub(crate) mod owner;
pub(crate) mod schema;
pub(crate) mod writer;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::config::{LimitConfig, LimitUpdate};
use crate::registry::{Limit, Stored};
use crate::state::Engine;
use crate::sync::Mutex;
use crate::waiters::Wakes;
use crate::Error;
use schema::{Definition, Found, SlotRow};

/// Wall-clock seconds since the Unix epoch, as stored with decaying slots.
pub(crate) fn unix_now() -> f64 {
    unix_seconds(SystemTime::now())
}

/// Seconds from the Unix epoch to `t`, negative before it: a clock set before
/// 1970 neither panics nor collapses every instant to 0, so decay measured
/// across a restart stays right while it stays wrong.
fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_secs_f64(),
        Err(before) => -before.duration().as_secs_f64(),
    }
}

pub(crate) fn storage_err(
    path: &Path,
    message: &str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::Storage {
        path: path.display().to_string(),
        message: one_line(&format!("{message}: {source}")),
        source: Some(Box::new(source)),
    }
}

/// `text` as one printable line: SQLite quotes a damaged file's schema in
/// its messages, line breaks, control characters and all, and the CLI
/// promises a one-line error. Runs of white space become one space; other
/// control characters are escaped.
pub(crate) fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.trim().chars() {
        if c.is_whitespace() {
            space = true;
            continue;
        }
        if std::mem::take(&mut space) {
            out.push(' ');
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A change to one limit's definition, as the store records it.
#[derive(Debug, Clone)]
pub(crate) enum Change {
    Create(LimitConfig),
    Update(LimitUpdate),
    Delete,
    Reset,
}

impl Change {
    /// Records a change this owner committed (with the incarnation
    /// [`Db::commit`] returned) in the limit it was applied to, as the base
    /// for detecting the next edit of another process.
    pub fn record(&self, limit: &mut Limit, incarnation: i64) {
        match self {
            Change::Create(_) => {
                limit.stored = Stored {
                    incarnation: incarnation as u32,
                    resets: 0,
                }
            }
            Change::Reset => limit.stored.resets = limit.stored.resets.wrapping_add(1),
            Change::Update(_) | Change::Delete => {}
        }
    }
}

/// The owner's connection and what it knows the file holds.
pub(crate) struct Db {
    pub path: PathBuf,
    pub conn: Connection,
    /// `PRAGMA data_version` when memory was last brought up to date with
    /// the file's definitions.
    pub data_version: i64,
    /// The registry's list of unsaved limits from the sweep before last,
    /// swapped back in at each sweep so that neither side reallocates it
    /// (the acquisition after a sweep must not allocate).
    pub spare: Vec<u32>,
}

impl Db {
    fn err(&self, message: &str, e: rusqlite::Error) -> Error {
        storage_err(&self.path, message, e)
    }

    /// Commits one definition change and returns the row's incarnation (for
    /// a creation; 0 otherwise). The caller then applies the change to memory
    /// and records it with [`Change::record`], so that memory holds what this
    /// owner wrote (not the row read back, which may hold another process's
    /// edit: `pull` must still see that one).
    pub fn commit(&mut self, name: &str, change: &Change) -> Result<i64, Error> {
        let path = self.path.clone();
        let failed = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation)
                if matches!(change, Change::Create(_)) =>
            {
                Error::AlreadyExists {
                    name: name.to_string(),
                }
            }
            _ => storage_err(&path, &format!("cannot save limit {name:?}"), e),
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(failed)?;
        let mut incarnation = 0;
        let changed = match change {
            Change::Create(config) => {
                schema::insert_definition(&tx, name, &definition(config, 0, 0)).map(|i| {
                    incarnation = i;
                    1
                })
            }
            Change::Update(update) => schema::update_definition(&tx, name, update),
            Change::Delete => schema::delete_definition(&tx, name).map(|_| 1),
            Change::Reset => schema::reset_definition(&tx, name),
        }
        .map_err(failed)?;
        if changed == 0 {
            // Another process deleted it; our next pull deletes it here too.
            return Err(Error::NotFound {
                name: name.to_string(),
            });
        }
        tx.commit().map_err(failed)?;
        Ok(incarnation)
    }

    /// Applies definitions committed by other processes since the last look.
    /// The caller delivers `wakes` once it has let go of this store's lock
    /// too: a waker may run its task, which may need the store.
    pub fn pull(&mut self, state: &Engine, wakes: &mut Wakes) -> Result<(), Error> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.err("cannot read data_version", e))?;
        if version == self.data_version {
            return Ok(());
        }
        let rows =
            schema::definitions(&self.conn).map_err(|e| self.err("cannot read limits", e))?;
        self.data_version = version;
        let now = Instant::now();
        {
            let mut state = state.lock();
            for (name, def) in &rows {
                let old = state
                    .reg
                    .by_name(name)
                    .map(|(_, l)| (definition_of(l), l.stored));
                let row = (config_of(def), stored_of(def));
                if old.as_ref() == Some(&row) {
                    continue;
                }
                // Deleted and created again since the last look: a new limit,
                // which must not inherit the old one's slots.
                let reborn = old
                    .as_ref()
                    .is_some_and(|(_, s)| s.incarnation != row.1.incarnation);
                if reborn {
                    let _ = state.delete(name, now, wakes);
                }
                let update = LimitUpdate::new()
                    .limit(def.limit)
                    .active(def.active)
                    .slot_decay_per_second(def.slot_decay_per_second);
                // Values the CLI validated; a hand edit that is invalid is
                // skipped rather than trusted (and tried again at the next
                // change of the file).
                let applied = if state.reg.lookup(name).is_none() {
                    state.create(name, &row.0, now).map(|_| ())
                } else {
                    state.update(name, &update, now, wakes).map(|_| ())
                };
                if applied.is_ok()
                    && !reborn
                    && old.as_ref().is_some_and(|(_, s)| s.resets != row.1.resets)
                {
                    let _ = state.reset(name, now, wakes);
                }
                if let Some(limit) = state.reg.by_name_mut(name) {
                    limit.stored = row.1;
                }
            }
            // Deleted by another process.
            let in_file: HashSet<&str> = rows.iter().map(|(name, _)| name.as_str()).collect();
            let gone: Vec<Arc<str>> = state
                .reg
                .iter()
                .filter(|(_, l)| !in_file.contains(&*l.name))
                .map(|(_, l)| l.name.clone())
                .collect();
            for name in gone {
                let _ = state.delete(&name, now, wakes);
            }
        }
        Ok(())
    }

    /// Writes the slot state of every limit changed since the last sweep, in
    /// one transaction.
    pub fn save(&mut self, state: &Engine) -> Result<usize, Error> {
        let rows: Vec<(Arc<str>, SlotRow)> = {
            let mut state = state.lock();
            state.reg.take_unsaved(&mut self.spare);
            if self.spare.is_empty() {
                return Ok(0);
            }
            let now = Instant::now();
            let at = unix_now();
            self.spare
                .iter()
                .filter_map(|&idx| Some((idx, state.reg.get(idx)?)))
                .map(|(idx, l)| {
                    let row = SlotRow {
                        held_slots: l.slots.held(),
                        decaying_slots: l.slots.decaying(now),
                        decaying_at: at,
                        denied_slots: l.denied,
                        avg_slot_occupancy_seconds: state.reg.cell(idx).avg(),
                        waiters: l.queue.len() as u64,
                    };
                    (l.name.clone(), row)
                })
                .collect()
        };
        let written = (|| {
            let tx = self.conn.transaction()?;
            for (name, row) in &rows {
                schema::save_slots(&tx, name, row)?;
            }
            tx.commit()
        })();
        match written {
            Ok(()) => Ok(rows.len()),
            Err(e) => {
                // Not lost: they go out with the next sweep.
                let mut state = state.lock();
                for (name, _) in &rows {
                    if let Some(idx) = state.reg.lookup(name) {
                        state.reg.touch(idx);
                    }
                }
                Err(self.err("cannot save slot state", e))
            }
        }
    }
}

fn definition(config: &LimitConfig, reset_count: i64, incarnation: i64) -> Definition {
    Definition {
        limit: config.limit,
        active: config.active,
        slot_decay_per_second: config.slot_decay_per_second,
        reset_count,
        incarnation,
    }
}

/// A definition read from the file must be one the CLI could have written.
fn check_row(path: &Path, name: &str, def: &Definition) -> Result<(), Error> {
    if crate::config::validate_name(name).is_err() || config_of(def).validate(name).is_err() {
        return Err(Error::Storage {
            path: path.display().to_string(),
            message: format!("limit {name:?} in the store is invalid: {def:?}"),
            source: None,
        });
    }
    Ok(())
}

/// A name found twice: the primary key forbids it, so the file is damaged (a
/// page copied over another does it) or its schema was edited.
fn appears_twice(path: &Path, name: &str) -> Error {
    Error::Storage {
        path: path.display().to_string(),
        message: format!("limit {name:?} appears twice in the store: it is damaged"),
        source: None,
    }
}

/// A row's counters, as a limit in memory records them.
fn stored_of(def: &Definition) -> Stored {
    // Truncated on purpose (see `Stored`).
    Stored {
        incarnation: def.incarnation as u32,
        resets: def.reset_count as u32,
    }
}

/// A limit's configuration in memory, to compare with a row's.
fn definition_of(limit: &Limit) -> LimitConfig {
    LimitConfig::new(limit.slots.limit)
        .active(limit.active)
        .slot_decay_per_second(limit.slots.rate())
}

fn config_of(def: &Definition) -> LimitConfig {
    LimitConfig::new(def.limit)
        .active(def.active)
        .slot_decay_per_second(def.slot_decay_per_second)
}

/// What the limiter and the writer thread share.
pub(crate) struct Persist {
    pub db: Mutex<Db>,
    pub state: Arc<Engine>,
}

/// An open store, owned by one limiter (and all its clones).
pub(crate) struct Store {
    pub persist: Arc<Persist>,
    to_writer: Sender<writer::Msg>,
    writer: Option<JoinHandle<()>>,
    /// Held for the owner's life; the OS drops it if the process dies.
    _owner: owner::Ownership,
}

impl Store {
    /// Opens (or creates) the store at `path` for `state`, which must be empty.
    pub fn open(path: &Path, flush_interval: Duration, state: Arc<Engine>) -> Result<Store, Error> {
        // Judge the file, rows included, before anything is created beside
        // it or written to it.
        if schema::sniff(path)?.is_some_and(|len| len > 0) {
            let reading = open_for_reading(path)?;
            if let Found::Store { version } = schema::inspect(&reading, path)? {
                schema::quick_check(&reading, path)?;
                if version == schema::VERSION {
                    let rows = schema::load(&reading)
                        .map_err(|e| storage_err(path, "cannot read limits", e))?;
                    let mut seen = HashSet::with_capacity(rows.len());
                    for (name, def, _) in &rows {
                        check_row(path, name, def)?;
                        if !seen.insert(name.as_str()) {
                            return Err(appears_twice(path, name));
                        }
                    }
                }
            }
        }
        let owner = owner::claim(path)?;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| storage_err(path, "cannot open the database", e))?;
        // Under the lock now: judge again, in case it changed meanwhile.
        let found = schema::inspect(&conn, path)?;
        let mut db = Db {
            path: path.to_path_buf(),
            conn,
            data_version: 0,
            spare: Vec::with_capacity(64),
        };
        db.prepare(found)?;
        db.restore(&state)?;

        let persist = Arc::new(Persist {
            db: Mutex::new(db),
            state,
        });
        let (to_writer, writer) = writer::spawn(persist.clone(), flush_interval)
            .map_err(|e| storage_err(path, "cannot start the writer thread", e))?;
        Ok(Store {
            persist,
            to_writer,
            writer: Some(writer),
            _owner: owner,
        })
    }

    /// Blocks until everything so far is written.
    pub fn flush(&self) -> Result<(), Error> {
        let (ack, done) = crossbeam_channel::bounded(1);
        let gone = || Error::Storage {
            path: self.persist.db.lock().path.display().to_string(),
            message: "the writer thread has stopped".into(),
            source: None,
        };
        self.to_writer
            .send(writer::Msg::Flush(ack))
            .map_err(|_| gone())?;
        done.recv().map_err(|_| gone())?
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.to_writer.send(writer::Msg::Stop);
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Db {
    /// Makes the file a current store: creates the schema or migrates, in one
    /// transaction, and records this process as the owner. Only called once
    /// [`schema::inspect`] accepted the file.
    fn prepare(&mut self, found: Found) -> Result<(), Error> {
        let path = self.path.clone();
        let err = |what: &str, e| storage_err(&path, what, e);
        self.conn
            .busy_timeout(Duration::from_secs(5))
            .map_err(|e| err("cannot set a busy timeout", e))?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| err("cannot switch to WAL", e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Storage {
                path: path.display().to_string(),
                message: format!("cannot switch to WAL (journal mode stays {mode})"),
                source: None,
            });
        }
        // Survives a crash of the process; a power cut may lose the last
        // commits.
        self.conn
            .execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(|e| err("cannot configure the connection", e))?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| err("cannot begin a transaction", e))?;
        match found {
            Found::Nothing => {
                schema::create(&tx).map_err(|e| err("cannot create the schema", e))?
            }
            Found::Store { version } if version < schema::VERSION => schema::migrate(&tx, version)
                .map_err(|e| err(&format!("cannot migrate from version {version}"), e))?,
            Found::Store { .. } => {}
        }
        // Slots held by guards of a process that ended are free again.
        tx.execute("UPDATE slot_state SET held_slots = 0, waiters = 0", [])
            .map_err(|e| err("cannot free the previous owner's slots", e))?;
        schema::set_owner_pid(&tx, Some(std::process::id()))
            .map_err(|e| err("cannot record the owner", e))?;
        tx.commit().map_err(|e| err("cannot commit", e))?;
        self.data_version = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| err("cannot read data_version", e))?;
        Ok(())
    }

    /// Loads every limit into `state`, decaying slots drained by the wall
    /// time that passed since they were written.
    fn restore(&mut self, state: &Engine) -> Result<(), Error> {
        let rows = schema::load(&self.conn).map_err(|e| self.err("cannot read limits", e))?;
        let now = Instant::now();
        let wall = unix_now();
        let mut state = state.lock();
        for (name, def, slots) in rows {
            check_row(&self.path, &name, &def)?;
            let config = config_of(&def);
            if state.reg.lookup(&name).is_some() {
                // Checked before anything was written too; this one is
                // for a file changed since.
                return Err(appears_twice(&self.path, &name));
            }
            let idx = state.reg.insert(&name, &config, now);
            if let Some(row) = slots {
                if row.avg_slot_occupancy_seconds.is_finite()
                    && row.avg_slot_occupancy_seconds >= 0.0
                {
                    let uid = state.reg.id_of(idx).expect("inserted").uid;
                    state
                        .reg
                        .cell(idx)
                        .set_avg(uid, row.avg_slot_occupancy_seconds);
                }
                let limit = state.reg.get_mut(idx).expect("inserted");
                limit.denied = row.denied_slots;
                limit.slots.restore_decaying(
                    drained(
                        row.decaying_slots,
                        row.decaying_at,
                        def.slot_decay_per_second,
                        wall,
                    ),
                    now,
                );
            }
            state.reg.get_mut(idx).expect("inserted").stored = stored_of(&def);
        }
        Ok(())
    }
}

/// A connection that only reads, to judge a file before anything is written
/// to it or beside it.
///
/// Without a `-wal` file beside it, the file alone holds the whole database,
/// so it is opened `immutable`: SQLite then takes no locks and creates no
/// `-wal` or `-shm` sidecar, even for a foreign database in WAL mode. With
/// a `-wal` file present its contents matter, so the connection opens
/// normally, only reads, and does not checkpoint that WAL when it closes.
pub(crate) fn open_for_reading(path: &Path) -> Result<Connection, Error> {
    if !sidecar(path, "-wal").exists() {
        let uri = format!("file:{}?immutable=1", uri_path(path));
        return Connection::open_with_flags(
            uri,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| storage_err(path, "cannot open the database for reading", e));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| storage_err(path, "cannot open the database", e))?;
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )
    .and_then(|_| conn.pragma_update(None, "query_only", true))
    .map_err(|e| storage_err(path, "cannot open the database for reading", e))?;
    Ok(conn)
}

/// `path` with `suffix` appended to its file name (`x.db` → `x.db-wal`).
pub(crate) fn sidecar(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// `path` as the path part of an SQLite `file:` URI: every byte but
/// unreserved characters and `/` percent-encoded, so that `?`, `#` and `%`
/// in a file name are not taken for URI syntax.
fn uri_path(path: &Path) -> String {
    let bytes = path.as_os_str().as_encoded_bytes();
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decaying slots left of `slots` measured at Unix time `at`, at `now`.
///
/// A clock that went backwards (a timestamp in the future, `+inf` included)
/// or a timestamp that is not a number drains nothing: a restart is no way
/// around a rate limit. A timestamp in the far past (`-inf` included) drains
/// everything, as any timestamp old enough does. Slot counts that are not
/// finite and positive count as nothing left.
pub(crate) fn drained(slots: f64, at: f64, rate: f64, now: f64) -> f64 {
    if !slots.is_finite() || slots <= 0.0 {
        return 0.0;
    }
    let elapsed = now - at;
    // Written so that NaN (in `elapsed` or `rate`) drains nothing.
    if !(elapsed > 0.0 && rate > 0.0) {
        return slots;
    }
    (slots - rate * elapsed).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::{drained, storage_err};
    use crate::Error;

    #[test]
    fn a_clock_before_the_epoch_is_negative_seconds_not_a_panic() {
        use super::unix_seconds;
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(unix_seconds(UNIX_EPOCH), 0.0);
        assert_eq!(unix_seconds(UNIX_EPOCH + Duration::from_millis(1500)), 1.5);
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_millis(1500)), -1.5);
        // 1901, as a dead RTC battery may report; and the far past.
        let y1901 = UNIX_EPOCH - Duration::from_secs(2_177_452_800);
        assert_eq!(unix_seconds(y1901), -2_177_452_800.0);
        let far = UNIX_EPOCH - Duration::from_secs(u64::from(u32::MAX) * 100);
        assert!(unix_seconds(far) < -4e11);
        // Time measured across a restart with such a clock is still right.
        let saved = unix_seconds(y1901);
        let later = unix_seconds(y1901 + Duration::from_secs(3));
        assert_eq!(drained(10.0, saved, 2.0, later), 4.0);
    }

    #[test]
    fn storage_errors_are_one_printable_line() {
        // As SQLite reports a damaged schema: the SQL text, line breaks and
        // all, and whatever bytes the damage put there.
        let source = std::io::Error::other(
            "malformed database schema (t) - unrecognized token: \"`(\n    a  INTEGER,\r\n\tb\x1b[2J\0\"",
        );
        let err = storage_err(std::path::Path::new("x.db"), "cannot read", source);
        let Error::Storage {
            message, source, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(
            message,
            "cannot read: malformed database schema (t) - unrecognized token: \"`( a INTEGER, b\\u{1b}[2J\\u{0}\""
        );
        assert!(!err.to_string().contains(|c: char| c.is_control()));
        assert!(source.is_some(), "the original error stays available");
    }

    #[test]
    fn drained_by_wall_time() {
        assert_eq!(drained(10.0, 100.0, 2.0, 103.0), 4.0);
        assert_eq!(
            drained(10.0, 100.0, 2.0, 1e9),
            0.0,
            "far forward drains all"
        );
        assert_eq!(
            drained(10.0, 100.0, 2.0, 50.0),
            10.0,
            "backwards drains nothing"
        );
        assert_eq!(drained(10.0, f64::NAN, 2.0, 50.0), 10.0);
        assert_eq!(drained(f64::NAN, 100.0, 2.0, 103.0), 0.0);
        assert_eq!(
            drained(10.0, f64::INFINITY, 2.0, 50.0),
            10.0,
            "+inf: backwards"
        );
        assert_eq!(
            drained(10.0, f64::NEG_INFINITY, 2.0, 50.0),
            0.0,
            "-inf: far past"
        );
        assert_eq!(drained(10.0, -f64::MAX, 2.0, 50.0), 0.0);
        assert_eq!(
            drained(10.0, f64::NEG_INFINITY, 0.0, 50.0),
            10.0,
            "no decay"
        );
        assert_eq!(drained(10.0, 100.0, f64::NAN, 103.0), 10.0);
        assert_eq!(drained(f64::INFINITY, 100.0, 2.0, 103.0), 0.0);
        assert_eq!(drained(-3.0, 100.0, 2.0, 103.0), 0.0);
        // Before the epoch on both sides: still exact.
        assert_eq!(drained(10.0, -100.0, 2.0, -97.0), 4.0);
        assert_eq!(
            drained(10.0, 100.0, 0.0, 1e9),
            10.0,
            "no decay, no draining"
        );
    }
}
