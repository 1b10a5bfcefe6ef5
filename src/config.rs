//! Value types: what a limit is configured as, how to change it, and what it
//! reports. Validation of names and configuration lives here too.

use crate::Error;

/// The configuration of a new limit: its capacity, whether it is active and
/// how fast its rate-limit slots drain.
///
/// ```
/// use turnstile::LimitConfig;
/// let api = LimitConfig::new(10).slot_decay_per_second(5.0);
/// let later = LimitConfig::new(4).active(false);
/// # let _ = (api, later);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LimitConfig {
    pub(crate) limit: u32,
    pub(crate) active: bool,
    pub(crate) slot_decay_per_second: f64,
}

impl LimitConfig {
    /// An active limit of `limit` slots with no decay. `limit == 0` pauses
    /// the limit: acquisitions wait until it is raised.
    pub fn new(limit: u32) -> Self {
        LimitConfig {
            limit,
            active: true,
            slot_decay_per_second: 0.0,
        }
    }

    /// Whether the limit is enforced. Inactive limits let every acquisition
    /// through and hold nothing.
    pub fn active(mut self, active: bool) -> Self {
        self.active = active;
        self
    }

    /// How many slots taken by `rate_limit` drain per second (a token bucket's
    /// refill rate). Must be finite and `>= 0`; 0 means no decay.
    pub fn slot_decay_per_second(mut self, rate: f64) -> Self {
        self.slot_decay_per_second = rate;
        self
    }

    pub(crate) fn validate(&self, name: &str) -> Result<(), Error> {
        validate_decay(name, self.slot_decay_per_second)
    }

    /// Checks `name` and this configuration as `create_limit` would, without
    /// touching any limiter or store: the same [`Error::InvalidName`] or
    /// [`Error::InvalidConfig`].
    ///
    /// ```
    /// use turnstile::LimitConfig;
    /// assert!(LimitConfig::new(2).check("gpu").is_ok());
    /// assert!(LimitConfig::new(2).check("").is_err());
    /// assert!(LimitConfig::new(2).slot_decay_per_second(f64::NAN).check("api").is_err());
    /// ```
    pub fn check(&self, name: &str) -> Result<(), Error> {
        validate_name(name)?;
        self.validate(name)
    }
}

/// A change to a limit; fields left unset are kept.
///
/// ```
/// use turnstile::LimitUpdate;
/// let raise = LimitUpdate::new().limit(4).active(true);
/// # let _ = raise;
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LimitUpdate {
    pub(crate) limit: Option<u32>,
    pub(crate) active: Option<bool>,
    pub(crate) slot_decay_per_second: Option<f64>,
}

impl LimitUpdate {
    /// An update that changes nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the capacity.
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Activates or deactivates the limit.
    pub fn active(mut self, active: bool) -> Self {
        self.active = Some(active);
        self
    }

    /// Sets the decay rate (finite, `>= 0`).
    pub fn slot_decay_per_second(mut self, rate: f64) -> Self {
        self.slot_decay_per_second = Some(rate);
        self
    }

    pub(crate) fn validate(&self, name: &str) -> Result<(), Error> {
        match self.slot_decay_per_second {
            Some(rate) => validate_decay(name, rate),
            None => Ok(()),
        }
    }
}

/// A snapshot of one limit, as `Limiter::limit` and `Limiter::limits` give it.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitInfo {
    /// The limit's name.
    pub name: String,
    /// Capacity in slots.
    pub limit: u32,
    /// Inactive limits let every acquisition through and hold nothing.
    pub active: bool,
    /// How many rate-limit slots drain per second (0 = no decay).
    pub slot_decay_per_second: f64,
    /// Held plus decaying slots, decaying rounded up.
    pub active_slots: u32,
    /// Slots held by live guards.
    pub held_slots: u32,
    /// Slots asked for and denied at the first attempt, summed.
    pub denied_slots: u64,
    /// Acquisitions now blocked on this limit.
    pub waiters: usize,
    /// Prefect's moving average of how long one slot is held, in seconds.
    pub avg_slot_occupancy_seconds: f64,
}

/// The longest name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Checks a limit name: 1 to 255 bytes, no control characters, no leading
/// or trailing white space.
pub(crate) fn validate_name(name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        "it is empty".to_string()
    } else if name.len() > MAX_NAME_LEN {
        format!("it is {} bytes long, more than {MAX_NAME_LEN}", name.len())
    } else if let Some(c) = name.chars().find(|c| c.is_control()) {
        format!("it contains the control character {c:?}")
    } else if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
        "it starts or ends with white space".to_string()
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: display_name(name),
        reason,
    })
}

/// A name cut to a readable length for error messages.
fn display_name(name: &str) -> String {
    const SHOWN: usize = 64;
    if name.len() <= SHOWN {
        return name.to_string();
    }
    let mut end = SHOWN;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &name[..end])
}

fn validate_decay(name: &str, rate: f64) -> Result<(), Error> {
    if rate.is_finite() && rate >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            name: name.to_string(),
            reason: format!("slot_decay_per_second must be finite and >= 0, got {rate}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("gpu").is_ok());
        assert!(validate_name("a b").is_ok());
        assert!(validate_name("'; DROP TABLE limits; --").is_ok());
        assert!(validate_name(&"x".repeat(255)).is_ok());
        for bad in ["", " a", "a ", "a\nb", "\t", "a\u{7f}"] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
        let err = validate_name(&"é".repeat(128)).unwrap_err();
        assert!(err.to_string().contains("256 bytes"), "{err}");
    }

    #[test]
    fn decay() {
        assert!(validate_decay("a", 0.0).is_ok());
        assert!(validate_decay("a", 1e9).is_ok());
        for bad in [f64::NAN, f64::INFINITY, -1.0, f64::NEG_INFINITY] {
            let err = validate_decay("a", bad).unwrap_err();
            assert!(err.to_string().contains(&bad.to_string()), "{err}");
        }
    }
}
