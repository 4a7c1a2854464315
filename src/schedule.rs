//! Cron schedules (5 fields, UTC) for periodic jobs, on top of the `croner` parser.

use std::str::FromStr;

use chrono::{TimeZone, Utc};

/// Why a schedule does not parse.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// Not five fields.
    #[error("expected 5 fields, got {0}")]
    Fields(usize),
    /// A field the parser refuses.
    #[error("{0}")]
    Cron(#[from] croner::errors::CronError),
}

/// A parsed 5-field cron schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: croner::Cron,
}

impl Schedule {
    /// Parses `minute hour day-of-month month day-of-week`.
    pub fn parse(text: &str) -> Result<Self, ScheduleError> {
        let fields = text.split_whitespace().count();
        if fields != 5 {
            return Err(ScheduleError::Fields(fields));
        }
        Ok(Self {
            cron: croner::Cron::from_str(text)?,
        })
    }

    /// The first time strictly after `after_ms` (unix ms) that matches, in unix ms.
    #[must_use]
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        let t = Utc
            .timestamp_millis_opt(i64::try_from(after_ms).ok()?)
            .single()?;
        let next = self.cron.find_next_occurrence(&t, false).ok()?;
        u64::try_from(next.timestamp_millis()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_five_fields_and_finds_the_next_run() {
        let s = Schedule::parse("0 2 * * *").unwrap();
        // 2024-01-01T00:00:00Z → 2024-01-01T02:00:00Z
        assert_eq!(s.next_after(1_704_067_200_000), Some(1_704_074_400_000));
        assert_eq!(s.next_after(1_704_074_400_000), Some(1_704_160_800_000));
        assert!(Schedule::parse("0 2 * *").is_err());
        assert!(Schedule::parse("0 0 2 * * *").is_err());
        assert!(Schedule::parse("61 2 * * *").is_err());
    }
}
