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

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::storage_err;
use crate::Error;

/// The sidecar's path: the store's with `-lock` appended.
pub fn lock_path(store: &Path) -> PathBuf {
    super::sidecar(store, "-lock")
}

/// Takes ownership of the store at `path`, or says who has it.
pub fn claim(path: &Path) -> Result<File, Error> {
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
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(Error::StoreInUse {
                path: path.display().to_string(),
                pid: read_pid(&mut file).unwrap_or(0),
            })
        }
        Err(TryLockError::Error(e)) => {
            return Err(storage_err(
                path,
                &format!("cannot lock {}", lock.display()),
                e,
            ))
        }
    }
    let pid = std::process::id().to_string();
    let written = file
        .set_len(0)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(pid.as_bytes()));
    written.map_err(|e| storage_err(path, &format!("cannot write {}", lock.display()), e))?;
    Ok(file)
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}
