//! Cron schedules (`/v1/schedules`): a run template fired on a cron
//! expression in a time zone.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use poem_openapi::Object;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::*;

/// A schedule: a run template and when to fire it.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Its id.
    pub id: Uuid,
    /// Its name, unique within the tenant.
    pub name: String,
    /// Standard 5-field cron expression (minute hour day-of-month month
    /// day-of-week), evaluated in `timezone`.
    pub cron: String,
    /// IANA time zone (`UTC`, `Europe/Berlin`).
    pub timezone: String,
    /// The run each tick submits.
    pub run: CreateRun,
    /// Disabled schedules do not fire; enabling one fires from the next tick on.
    pub enabled: bool,
    /// When it fires next (null while disabled).
    pub next_fire_at: Option<DateTime<Utc>>,
    /// The tick it last fired for.
    pub last_fired_at: Option<DateTime<Utc>>,
    /// The run the last tick created.
    pub last_run_id: Option<RunId>,
    /// Why the last tick made no run (a quota, the production gate), if it did not.
    pub last_error: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was last changed.
    pub updated_at: DateTime<Utc>,
}

/// The body of `POST /v1/schedules`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedule {
    /// 1 to 255 bytes, unique within the tenant.
    #[oai(validator(min_length = 1, max_length = 255))]
    pub name: String,
    /// Standard 5-field cron expression (`*/5 * * * *`, `0 9 * * MON-FRI`),
    /// up to 255 bytes.
    #[oai(validator(min_length = 1, max_length = 255))]
    pub cron: String,
    /// IANA time zone the expression is read in; default `UTC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(
        skip_serializing_if_is_none,
        validator(min_length = 1, max_length = 64)
    )]
    pub timezone: Option<String>,
    /// The run each tick submits (as `POST /v1/runs` takes it, without
    /// `run_at`: the tick is its time).
    pub run: CreateRun,
    /// Whether it fires; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub enabled: Option<bool>,
}

/// The body of `PATCH /v1/schedules/{id}`: the fields to change.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct UpdateSchedule {
    /// A new name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(
        skip_serializing_if_is_none,
        validator(min_length = 1, max_length = 255)
    )]
    pub name: Option<String>,
    /// A new cron expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(
        skip_serializing_if_is_none,
        validator(min_length = 1, max_length = 255)
    )]
    pub cron: Option<String>,
    /// A new time zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(
        skip_serializing_if_is_none,
        validator(min_length = 1, max_length = 64)
    )]
    pub timezone: Option<String>,
    /// A new run template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub run: Option<CreateRun>,
    /// Turn it on or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub enabled: Option<bool>,
}

/// The answer of `GET /v1/schedules`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ScheduleList {
    /// The tenant's schedules, oldest first.
    pub schedules: Vec<Schedule>,
}

/// A cron expression with its time zone, parsed.
#[derive(Debug, Clone)]
pub struct CronSpec {
    cron: croner::Cron,
    timezone: chrono_tz::Tz,
}

impl CronSpec {
    /// Parses a standard 5-field expression and an IANA zone name.
    ///
    /// # Errors
    ///
    /// A message naming the field and the value at fault.
    pub fn parse(cron: &str, timezone: &str) -> Result<Self, String> {
        if cron.split_whitespace().count() != 5 {
            return Err(format!(
                "cron '{cron}' must have 5 fields (minute hour day-of-month month day-of-week)"
            ));
        }
        let parsed = croner::Cron::from_str(cron)
            .map_err(|err| format!("cron '{cron}' does not parse: {err}"))?;
        let timezone = chrono_tz::Tz::from_str(timezone).map_err(|_| {
            format!("timezone '{timezone}' is not an IANA time zone (such as UTC or Europe/Berlin)")
        })?;
        Ok(Self {
            cron: parsed,
            timezone,
        })
    }

    /// The first tick strictly after `after`.
    ///
    /// # Errors
    ///
    /// The expression never matches again (`0 0 30 2 *`).
    pub fn next_after(&self, after: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.timezone), false)
            .map(|tick| tick.with_timezone(&Utc))
            .map_err(|err| format!("cron '{}' has no next tick: {err}", self.cron.pattern))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn ticks_follow_the_time_zone() {
        let spec = CronSpec::parse("0 9 * * *", "Europe/Berlin").expect("parses");
        // 2026-12-01 is winter time in Berlin: 09:00 there is 08:00 UTC.
        let after = Utc
            .with_ymd_and_hms(2026, 12, 1, 7, 0, 0)
            .single()
            .expect("time");
        let next = spec.next_after(after).expect("next");
        assert_eq!(
            next,
            Utc.with_ymd_and_hms(2026, 12, 1, 8, 0, 0)
                .single()
                .expect("time")
        );
        // Strictly after: a tick is not its own next.
        let again = spec.next_after(next).expect("next");
        assert_eq!(
            again,
            Utc.with_ymd_and_hms(2026, 12, 2, 8, 0, 0)
                .single()
                .expect("time")
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_named() {
        for (cron, zone, names) in [
            ("* * * *", "UTC", "5 fields"),
            ("0 0 * * * *", "UTC", "5 fields"),
            ("61 * * * *", "UTC", "does not parse"),
            ("* * * * *", "Mars/Olympus", "Mars/Olympus"),
        ] {
            let err = CronSpec::parse(cron, zone).err().unwrap_or_default();
            assert!(err.contains(names), "{cron} {zone}: {err}");
        }
    }
}
