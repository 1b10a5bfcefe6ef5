//! The boundary the public face talks to for managing limits. The
//! in-process engine (with or without its SQLite store) and shared limits
//! on PostgreSQL each implement it; [`Limiter`](crate::Limiter) picks one
//! once, in `Limiter::manage`, and every management method goes through it.
//! Acquisitions choose their engine once, at the builder's entry, so that
//! the in-process hot path keeps static dispatch.

use crate::config::{LimitConfig, LimitInfo, LimitUpdate};
use crate::Error;

/// Creating, changing, removing and reading limits, and making state
/// durable: the same meaning on every engine.
pub(crate) trait Manage {
    fn create(&self, name: &str, config: &LimitConfig) -> Result<LimitInfo, Error>;
    fn update(&self, name: &str, update: &LimitUpdate) -> Result<LimitInfo, Error>;
    fn delete(&self, name: &str) -> Result<(), Error>;
    fn reset(&self, name: &str) -> Result<LimitInfo, Error>;
    fn info(&self, name: &str) -> Result<Option<LimitInfo>, Error>;
    fn infos(&self) -> Result<Vec<LimitInfo>, Error>;
    fn flush(&self) -> Result<(), Error>;
}
