//! One live limiter owns a store at a time.
//!
//! The owner holds an exclusive OS lock (`flock`, through std's
//! `File::try_lock`) on a sidecar file, `<store>-lock`, for its whole life, and
//! writes its process id there for others' error messages. The OS drops the
//! lock when the process ends, however it ends, so a crashed owner's store
//! opens again at once; a pid alone would prove nothing (pids are reused).
//!
//! The lock is on a sidecar rather than on the database because SQLite's own
//! locks are POSIX record locks, which a process loses on *every* descriptor
//! of the file as soon as it closes *any* descriptor of it.
//!
//! A `flock` belongs to the open file, which a child process shares from
//! `fork` until its `exec` closes it. So a store just given up by this
//! process can still look locked, for that moment, when another of its
//! threads has just spawned a process: while no limiter of this process owns
//! the store, a lock that names this process is waited out briefly.

use std::collections::HashSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::storage_err;
use crate::Error;

/// The sidecar's path: the store's with `-lock` appended.
pub fn lock_path(store: &Path) -> PathBuf {
    super::sidecar(store, "-lock")
}

/// Lock files owned by limiters of this process.
static OWNED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// How long a lock that names this process, but no limiter of it, is waited
/// for: a fork's copy lives until the child's `exec`.
const FORK_GRACE: Duration = Duration::from_secs(2);

fn owned(key: &Path) -> bool {
    let owned = OWNED.lock().unwrap_or_else(|e| e.into_inner());
    owned.as_ref().is_some_and(|set| set.contains(key))
}

/// Ownership of a store: the locked sidecar, registered as owned by this
/// process until dropped.
#[derive(Debug)]
pub struct Ownership {
    key: PathBuf,
    _file: File,
}

impl Drop for Ownership {
    fn drop(&mut self) {
        let mut owned = OWNED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = owned.as_mut() {
            set.remove(&self.key);
        }
        // The file closes after this, releasing the lock.
    }
}

/// Takes ownership of the store at `path`, or says who has it.
pub fn claim(path: &Path) -> Result<Ownership, Error> {
    let lock = lock_path(path);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .map_err(|e| {
            storage_err(
                path,
                &format!("cannot open the lock file {}", lock.display()),
                e,
            )
        })?;
    let key = std::fs::canonicalize(&lock).unwrap_or_else(|_| lock.clone());
    let since = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) => {
                let me = std::process::id();
                let pid = read_pid(&mut file).unwrap_or(0);
                if pid == me && !owned(&key) && since.elapsed() < FORK_GRACE {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                return Err(Error::StoreInUse {
                    path: path.display().to_string(),
                    pid,
                });
            }
            Err(TryLockError::Error(e)) => {
                return Err(storage_err(
                    path,
                    &format!("cannot lock {}", lock.display()),
                    e,
                ))
            }
        }
    }
    let pid = std::process::id().to_string();
    let written = file
        .set_len(0)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(pid.as_bytes()));
    written.map_err(|e| storage_err(path, &format!("cannot write {}", lock.display()), e))?;
    OWNED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(key.clone());
    Ok(Ownership { key, _file: file })
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}
