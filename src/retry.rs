//! What a failure means for whoever meets it, and waiting before trying again.
//!
//! Every module error answers one question, [`Classify::class`]: is it the user's to fix
//! ([`ErrorClass::Usage`], exit 2), may the same attempt succeed later ([`ErrorClass::Transient`]:
//! retried with backoff by long-running tasks, exit 1 from a one-shot command), or will it fail
//! again until something outside changes ([`ErrorClass::Permanent`], exit 1)? Wrapping errors
//! derive their class from what they wrap, so an error keeps its class however deep it travels:
//! the exit code (`crate::Error::exit_code`) and every retry loop ask the same question.
//!
//! This module is the bottom of the crate: it imports nothing of ours.

use std::time::Duration;

/// The one classification of failures (ARCHITECTURE.md has the table of every error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Arguments, configuration or the source's set-up: the message says what to change.
    Usage,
    /// The environment may heal by itself (a restarting server, a network blip, a full disk):
    /// a daemon retries with backoff; a one-shot command reports it (exit 1).
    Transient,
    /// Retrying the same thing meets the same failure (a damaged object, a missing slot).
    Permanent,
}

impl ErrorClass {
    /// The process exit code of README.md: 2 for usage, 1 for any operational failure.
    #[must_use]
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorClass::Usage => 2,
            ErrorClass::Transient | ErrorClass::Permanent => 1,
        }
    }

    #[must_use]
    pub fn is_transient(self) -> bool {
        self == ErrorClass::Transient
    }
}

/// Implemented by every module error of the crate.
pub trait Classify {
    fn class(&self) -> ErrorClass;
}

/// Exponential backoff between `min` and `max`, doubling after each failure; [`reset`] after
/// a success. One shape for every retry loop of the daemon.
///
/// [`reset`]: Backoff::reset
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    failures: u32,
}

impl Backoff {
    #[must_use]
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
            failures: 0,
        }
    }

    /// The wait before the next attempt, and doubles the one after it.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Whether a failure happened since the last [`Backoff::reset`].
    #[must_use]
    pub fn is_retrying(&self) -> bool {
        self.failures > 0
    }

    pub fn reset(&mut self) {
        self.next = self.min;
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_bound_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        assert!(!b.is_retrying());
        let delays: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
        assert!(b.is_retrying());
        b.reset();
        assert!(!b.is_retrying());
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn exit_codes_follow_the_class() {
        assert_eq!(ErrorClass::Usage.exit_code(), 2);
        assert_eq!(ErrorClass::Transient.exit_code(), 1);
        assert_eq!(ErrorClass::Permanent.exit_code(), 1);
    }
}
