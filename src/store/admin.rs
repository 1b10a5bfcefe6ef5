//! [`Admin`]: reads and edits a store from outside its owner (the CLI).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::schema::{self, Definition, Found, SlotRow};
use super::{drained, owner, storage_err, unix_now, Change, Db};
use crate::config::validate_name;
use crate::{Error, LimitConfig, LimitInfo, LimitUpdate};

/// A handle on a store for administration, also while its owner runs in
/// another process.
///
/// Definitions are changed in transactions that touch only the fields named;
/// a running owner picks the change up within its `flush_interval` and applies
/// it as if `update_limit` (etc.) had been called in its process. Occupancy is
/// read as the owner last wrote it; only the owner writes it.
///
/// ```
/// use turnstile::{Admin, Limiter, LimitConfig, LimitUpdate};
/// # let dir = std::env::temp_dir().join(format!("turnstile-admin-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("limits.db");
/// # let _ = std::fs::remove_file(&path);
/// let limiter = Limiter::open(&path)?;                // the owner
/// let mut admin = Admin::open(&path)?;             // e.g. in another process
/// admin.create_limit("gpu", LimitConfig::new(2))?;
/// admin.update_limit("gpu", LimitUpdate::new().limit(4))?;
/// assert_eq!(admin.limit("gpu")?.unwrap().limit, 4);
/// # drop(limiter);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), turnstile::Error>(())
/// ```
pub struct Admin {
    db: Db,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("path", &self.db.path)
            .finish()
    }
}

impl Admin {
    /// Opens an existing store; never creates one.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] if there is no file, or it is not a turnstile store
    /// (left untouched), or is newer than this build.
    pub fn open(path: impl AsRef<Path>) -> Result<Admin, Error> {
        Admin::connect(path.as_ref(), false)
    }

    /// Opens the store at `path`, creating an empty one if there is no file.
    ///
    /// # Errors
    ///
    /// As [`Admin::open`], for a file that exists.
    pub fn open_or_create(path: impl AsRef<Path>) -> Result<Admin, Error> {
        Admin::connect(path.as_ref(), true)
    }

    fn connect(path: &Path, create: bool) -> Result<Admin, Error> {
        let missing = |what: &str| Error::Storage {
            path: path.display().to_string(),
            message: what.to_string(),
            source: None,
        };
        match schema::sniff(path)? {
            None if !create => return Err(missing("no store here (only `create` makes one)")),
            Some(0) if !create => return Err(missing("not a turnstile store: an empty file")),
            Some(len) if len > 0 => {
                schema::inspect(&super::open_for_reading(path)?, path)?;
            }
            _ => {}
        }
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = Connection::open_with_flags(path, flags)
            .map_err(|e| storage_err(path, "cannot open the database", e))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| storage_err(path, "cannot set a busy timeout", e))?;
        let mut db = Db {
            path: path.to_path_buf(),
            conn,
            data_version: 0,
            spare: Vec::new(),
        };
        let found = schema::inspect(&db.conn, path)?;
        if found
            != (Found::Store {
                version: schema::VERSION,
            })
        {
            // New, or older: made current in one transaction (an owner would
            // do the same on open).
            if found == Found::Nothing {
                let _: String = db
                    .conn
                    .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
                    .map_err(|e| storage_err(path, "cannot switch to WAL", e))?;
            }
            let tx = db
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| storage_err(path, "cannot begin a transaction", e))?;
            // Judged again under the write lock: someone may have beaten us.
            match schema::inspect(&tx, path)? {
                Found::Nothing => schema::create(&tx),
                Found::Store { version } if version < schema::VERSION => {
                    schema::migrate(&tx, version)
                }
                Found::Store { .. } => Ok(()),
            }
            .and_then(|_| tx.commit())
            .map_err(|e| storage_err(path, "cannot prepare the store", e))?;
        }
        Ok(Admin { db })
    }

    /// The store's path.
    pub fn path(&self) -> &Path {
        &self.db.path
    }

    /// The process id of the live owner, if a limiter owns the store now.
    pub fn owner(&self) -> Option<u32> {
        let lock: PathBuf = owner::lock_path(&self.db.path);
        let mut file: File = OpenOptions::new().read(true).write(true).open(lock).ok()?;
        match file.try_lock() {
            Ok(()) => None,
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                file.read_to_string(&mut text).ok()?;
                Some(text.trim().parse().unwrap_or(0))
            }
            Err(TryLockError::Error(_)) => None,
        }
    }

    /// Creates a limit.
    ///
    /// # Errors
    ///
    /// As [`Limiter::create_limit`](crate::Limiter::create_limit), plus
    /// [`Error::Storage`].
    pub fn create_limit(&mut self, name: &str, config: LimitConfig) -> Result<LimitInfo, Error> {
        validate_name(name)?;
        config.validate(name)?;
        self.db.commit(name, &Change::Create(config))?;
        self.expect(name)
    }

    /// Changes the fields of a limit that `update` sets.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`], [`Error::InvalidConfig`], [`Error::Storage`].
    pub fn update_limit(&mut self, name: &str, update: LimitUpdate) -> Result<LimitInfo, Error> {
        update.validate(name)?;
        self.db.commit(name, &Change::Update(update))?;
        self.expect(name)
    }

    /// Deletes a limit.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`], [`Error::Storage`].
    pub fn delete_limit(&mut self, name: &str) -> Result<(), Error> {
        self.expect(name)?;
        self.db.commit(name, &Change::Delete).map(|_| ())
    }

    /// Drops a limit's decaying slots and zeroes its `denied_slots`.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`], [`Error::Storage`].
    pub fn reset_limit(&mut self, name: &str) -> Result<LimitInfo, Error> {
        self.db.commit(name, &Change::Reset)?;
        self.expect(name)
    }

    /// One limit, with its occupancy as the owner last wrote it.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`].
    pub fn limit(&self, name: &str) -> Result<Option<LimitInfo>, Error> {
        Ok(self.all(Some(name))?.pop())
    }

    /// Every limit, sorted by name.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`].
    pub fn limits(&self) -> Result<Vec<LimitInfo>, Error> {
        self.all(None)
    }

    fn expect(&self, name: &str) -> Result<LimitInfo, Error> {
        self.limit(name)?.ok_or_else(|| Error::NotFound {
            name: name.to_string(),
        })
    }

    fn all(&self, only: Option<&str>) -> Result<Vec<LimitInfo>, Error> {
        let rows = match only {
            None => schema::load(&self.db.conn),
            Some(name) => load_one(&self.db.conn, name),
        }
        .map_err(|e| storage_err(&self.db.path, "cannot read limits", e))?;
        let now = unix_now();
        Ok(rows
            .into_iter()
            .map(|(name, def, slots)| info(name, &def, slots.as_ref(), now))
            .collect())
    }
}

fn load_one(
    conn: &Connection,
    name: &str,
) -> rusqlite::Result<Vec<(String, Definition, Option<SlotRow>)>> {
    let exists: Option<i64> = conn
        .query_row("SELECT 1 FROM limits WHERE name = ?1", [name], |r| r.get(0))
        .optional()?;
    if exists.is_none() {
        return Ok(Vec::new());
    }
    // Small stores are the rule; one indexed look-up would be faster, but
    // this keeps one reading of rows.
    Ok(schema::load(conn)?
        .into_iter()
        .filter(|(n, _, _)| n == name)
        .collect())
}

fn info(name: String, def: &Definition, slots: Option<&SlotRow>, now: f64) -> LimitInfo {
    let empty = SlotRow {
        held_slots: 0,
        decaying_slots: 0.0,
        decaying_at: now,
        denied_slots: 0,
        avg_slot_occupancy_seconds: 2.0,
        waiters: 0,
    };
    let row = slots.unwrap_or(&empty);
    let decaying = drained(
        row.decaying_slots,
        row.decaying_at,
        def.slot_decay_per_second,
        now,
    );
    let held = row.held_slots.min(u64::from(u32::MAX)) as u32;
    LimitInfo {
        name,
        limit: def.limit,
        active: def.active,
        slot_decay_per_second: def.slot_decay_per_second,
        active_slots: held.saturating_add((decaying - 1e-9).max(0.0).ceil() as u32),
        held_slots: held,
        denied_slots: row.denied_slots,
        waiters: row.waiters as usize,
        avg_slot_occupancy_seconds: row.avg_slot_occupancy_seconds,
    }
}
