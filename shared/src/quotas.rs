//! Quotas per tenant: the plans and their numbers (the one definition of
//! them), per-tenant overrides, and the payloads of `/v1/quotas`.
//!
//! A tenant is on a [`Plan`] (`free` or `unlimited`) and may override any
//! single number of it; [`TenantQuotas::limit`] gives the effective limit of
//! a [`Quota`] (`None`: no limit). A tenant without stored settings is on the
//! process's default plan ([`default_plan`], `RUNQ_DEFAULT_PLAN`). The SQL
//! that stores settings and enforces limits is in [`crate::db::quotas`].

use std::sync::atomic::{AtomicU8, Ordering};

use chrono::{DateTime, Utc};
use poem_openapi::types::MaybeUndefined;
use poem_openapi::{Enum, Object};
use serde::{Deserialize, Serialize};

/// A named set of limits.
#[derive(
    Enum, clap::ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash,
)]
#[serde(rename_all = "snake_case")]
#[oai(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Plan {
    /// The seed system's free tier: see [`Plan::limit`].
    Free,
    /// No limit on anything (runq's own `dev` and `bench` tenants).
    Unlimited,
}

impl Plan {
    /// The plan as stored in `tenant_quotas.plan`.
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Unlimited => "unlimited",
        }
    }

    /// The plan stored as `text`, if it is one.
    pub fn parse(text: &str) -> Option<Plan> {
        match text {
            "free" => Some(Plan::Free),
            "unlimited" => Some(Plan::Unlimited),
            _ => None,
        }
    }

    /// The plan's limit on `quota`; `None` is no limit. The one place the
    /// numbers of each plan are written (README, "Quotas and plans").
    pub fn limit(self, quota: Quota) -> Option<i64> {
        match self {
            Plan::Unlimited => None,
            Plan::Free => Some(match quota {
                Quota::Projects => 2,
                Quota::RunsPerDay => 5,
                Quota::RetentionDays => 7,
                Quota::StoredEvents => 50_000,
                Quota::RunDurationMinutes => 15,
                Quota::RunEvents => 5_000,
            }),
        }
    }
}

/// Each limit a plan sets, by the name the API and errors use.
#[derive(Enum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
#[oai(rename_all = "snake_case")]
pub enum Quota {
    /// Projects a tenant may have (hard cap: 403).
    Projects,
    /// Runs accepted in the last 24 hours, counted per hour (rate: 429).
    RunsPerDay,
    /// Days finished runs are kept (for the pruner; not enforced yet).
    RetentionDays,
    /// Events a tenant may keep stored (not enforced yet).
    StoredEvents,
    /// Minutes one run may execute; past it the run is `stopped_quota`
    /// with reason `duration_cap`.
    RunDurationMinutes,
    /// Events one run may record over all its attempts; past it the run is
    /// `stopped_quota` with reason `event_cap`.
    RunEvents,
}

impl Quota {
    /// Every quota, in the order `GET /v1/quotas` lists them.
    pub const ALL: [Quota; 6] = [
        Quota::Projects,
        Quota::RunsPerDay,
        Quota::RetentionDays,
        Quota::StoredEvents,
        Quota::RunDurationMinutes,
        Quota::RunEvents,
    ];

    /// The quota's name in the API, in errors and in `tenant_quotas.overrides`.
    pub fn as_str(self) -> &'static str {
        match self {
            Quota::Projects => "projects",
            Quota::RunsPerDay => "runs_per_day",
            Quota::RetentionDays => "retention_days",
            Quota::StoredEvents => "stored_events",
            Quota::RunDurationMinutes => "run_duration_minutes",
            Quota::RunEvents => "run_events",
        }
    }

    /// The quota named `name`, if there is one.
    pub fn parse(name: &str) -> Option<Quota> {
        Quota::ALL.into_iter().find(|quota| quota.as_str() == name)
    }

    /// Whether going over it is a rate (429, retry later) rather than a hard
    /// cap (403, change something first).
    pub fn is_rate(self) -> bool {
        self == Quota::RunsPerDay
    }
}

/// Per-tenant replacements of single numbers of the tenant's plan. An absent
/// (or `null`) field keeps the plan's number.
#[derive(Object, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct QuotaOverrides {
    /// Projects the tenant may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    #[oai(validator(minimum(value = "0")))]
    pub projects: Option<i64>,
    /// Runs accepted in the last 24 hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    #[oai(validator(minimum(value = "0")))]
    pub runs_per_day: Option<i64>,
    /// Days finished runs are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    #[oai(validator(minimum(value = "0")))]
    pub retention_days: Option<i64>,
    /// Events the tenant may keep stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    #[oai(validator(minimum(value = "0")))]
    pub stored_events: Option<i64>,
    /// Minutes one run may execute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    #[oai(validator(minimum(value = "1")))]
    pub run_duration_minutes: Option<i64>,
    /// Events one run may record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    #[oai(validator(minimum(value = "0")))]
    pub run_events: Option<i64>,
}

impl QuotaOverrides {
    /// The override of `quota`, if any.
    pub fn get(&self, quota: Quota) -> Option<i64> {
        match quota {
            Quota::Projects => self.projects,
            Quota::RunsPerDay => self.runs_per_day,
            Quota::RetentionDays => self.retention_days,
            Quota::StoredEvents => self.stored_events,
            Quota::RunDurationMinutes => self.run_duration_minutes,
            Quota::RunEvents => self.run_events,
        }
    }

    /// Overrides `quota` with `limit` (`None` removes the override).
    pub fn set(&mut self, quota: Quota, limit: Option<i64>) {
        let slot = match quota {
            Quota::Projects => &mut self.projects,
            Quota::RunsPerDay => &mut self.runs_per_day,
            Quota::RetentionDays => &mut self.retention_days,
            Quota::StoredEvents => &mut self.stored_events,
            Quota::RunDurationMinutes => &mut self.run_duration_minutes,
            Quota::RunEvents => &mut self.run_events,
        };
        *slot = limit;
    }

    /// The first override out of range, named, as the API's 422 says it.
    ///
    /// # Errors
    ///
    /// A negative number, or a `run_duration_minutes` below 1.
    pub fn validate(&self) -> Result<(), String> {
        for quota in Quota::ALL {
            let least = if quota == Quota::RunDurationMinutes {
                1
            } else {
                0
            };
            if let Some(value) = self.get(quota) {
                if value < least {
                    return Err(format!(
                        "overrides.{} must be at least {least}, got {value}",
                        quota.as_str()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Reads one override as an operator writes it: `runs_per_day=100` sets
/// one, `runs_per_day=plan` removes it (the plan's number applies again).
///
/// # Errors
///
/// An unknown quota name, a missing `=`, or a value that is neither `plan`
/// nor a whole number in range, each named.
pub fn parse_setting(text: &str) -> Result<(Quota, Option<i64>), String> {
    let Some((name, value)) = text.split_once('=') else {
        return Err(format!(
            "override '{text}' must be QUOTA=NUMBER or QUOTA=plan"
        ));
    };
    let names = || {
        Quota::ALL
            .iter()
            .map(|quota| quota.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let quota = Quota::parse(name.trim())
        .ok_or_else(|| format!("unknown quota '{name}'; quotas are {}", names()))?;
    let value = value.trim();
    if value == "plan" {
        return Ok((quota, None));
    }
    let limit = value.parse::<i64>().map_err(|_| {
        format!("override of {name} must be a whole number or 'plan', got '{value}'")
    })?;
    let mut overrides = QuotaOverrides::default();
    overrides.set(quota, Some(limit));
    overrides.validate()?;
    Ok((quota, Some(limit)))
}

/// The body of `PATCH /v1/quotas`: what to change, keeping the rest. A
/// number sets an override, `null` removes it (the plan's number applies
/// again), an absent field keeps it.
#[derive(Object, Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct QuotaPatch {
    /// A new plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub plan: Option<Plan>,
    /// Projects the tenant may have (at least 0).
    #[serde(default, skip_serializing_if = "MaybeUndefined::is_undefined")]
    #[oai(skip_serializing_if = "MaybeUndefined::is_undefined")]
    #[oai(validator(minimum(value = "0")))]
    pub projects: MaybeUndefined<i64>,
    /// Runs accepted in the last 24 hours (at least 0).
    #[serde(default, skip_serializing_if = "MaybeUndefined::is_undefined")]
    #[oai(skip_serializing_if = "MaybeUndefined::is_undefined")]
    #[oai(validator(minimum(value = "0")))]
    pub runs_per_day: MaybeUndefined<i64>,
    /// Days finished runs are kept (at least 0).
    #[serde(default, skip_serializing_if = "MaybeUndefined::is_undefined")]
    #[oai(skip_serializing_if = "MaybeUndefined::is_undefined")]
    #[oai(validator(minimum(value = "0")))]
    pub retention_days: MaybeUndefined<i64>,
    /// Events the tenant may keep stored (at least 0).
    #[serde(default, skip_serializing_if = "MaybeUndefined::is_undefined")]
    #[oai(skip_serializing_if = "MaybeUndefined::is_undefined")]
    #[oai(validator(minimum(value = "0")))]
    pub stored_events: MaybeUndefined<i64>,
    /// Minutes one run may execute (at least 1).
    #[serde(default, skip_serializing_if = "MaybeUndefined::is_undefined")]
    #[oai(skip_serializing_if = "MaybeUndefined::is_undefined")]
    #[oai(validator(minimum(value = "1")))]
    pub run_duration_minutes: MaybeUndefined<i64>,
    /// Events one run may record (at least 0).
    #[serde(default, skip_serializing_if = "MaybeUndefined::is_undefined")]
    #[oai(skip_serializing_if = "MaybeUndefined::is_undefined")]
    #[oai(validator(minimum(value = "0")))]
    pub run_events: MaybeUndefined<i64>,
}

impl QuotaPatch {
    /// `quotas` with this patch applied.
    ///
    /// # Errors
    ///
    /// An override out of range, named as [`QuotaOverrides::validate`] names it.
    pub fn apply(&self, quotas: &TenantQuotas) -> Result<TenantQuotas, String> {
        let mut next = quotas.clone();
        if let Some(plan) = self.plan {
            next.plan = plan;
        }
        for (quota, change) in [
            (Quota::Projects, &self.projects),
            (Quota::RunsPerDay, &self.runs_per_day),
            (Quota::RetentionDays, &self.retention_days),
            (Quota::StoredEvents, &self.stored_events),
            (Quota::RunDurationMinutes, &self.run_duration_minutes),
            (Quota::RunEvents, &self.run_events),
        ] {
            match change {
                MaybeUndefined::Undefined => {}
                MaybeUndefined::Null => next.overrides.set(quota, None),
                MaybeUndefined::Value(limit) => next.overrides.set(quota, Some(*limit)),
            }
        }
        next.overrides.validate()?;
        Ok(next)
    }
}

/// A tenant's quota settings: its plan and overrides. Also the body of
/// `PUT /v1/quotas`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct TenantQuotas {
    /// The plan whose numbers apply where no override is set.
    pub plan: Plan,
    /// Single numbers replacing the plan's (replaced whole by `PUT`).
    #[oai(default)]
    #[serde(default)]
    pub overrides: QuotaOverrides,
}

impl TenantQuotas {
    /// `plan` without overrides.
    pub fn plan(plan: Plan) -> Self {
        Self {
            plan,
            overrides: QuotaOverrides::default(),
        }
    }

    /// The effective limit of `quota`: the override, else the plan's.
    /// `None` is no limit.
    pub fn limit(&self, quota: Quota) -> Option<i64> {
        self.overrides.get(quota).or_else(|| self.plan.limit(quota))
    }
}

/// One quota of a tenant as `GET /v1/quotas` reports it.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct QuotaStatus {
    /// Which quota.
    pub quota: Quota,
    /// The effective limit; `null` is no limit.
    pub limit: Option<i64>,
    /// Current use, where the server counts it: projects, runs accepted in
    /// the last 24 hours (counted only while the tenant has a
    /// `runs_per_day` limit) and events stored. `null` for per-run limits
    /// and retention.
    pub used: Option<i64>,
    /// When current use next drops (`runs_per_day`: when the oldest counted
    /// hour leaves the window).
    pub resets_at: Option<DateTime<Utc>>,
}

/// The answer of `GET /v1/quotas` and `PUT /v1/quotas`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct QuotaReport {
    /// The tenant's plan.
    pub plan: Plan,
    /// Its overrides of single numbers.
    pub overrides: QuotaOverrides,
    /// Every quota with its effective limit and current use.
    pub quotas: Vec<QuotaStatus>,
}

/// The plan of tenants without stored settings, for this process.
static DEFAULT_PLAN: AtomicU8 = AtomicU8::new(0);

/// Sets the plan of tenants without stored settings for this process (the
/// `runq` binary sets it from `RUNQ_DEFAULT_PLAN` at start). Until called it
/// is [`Plan::Free`].
pub fn set_default_plan(plan: Plan) {
    DEFAULT_PLAN.store(
        match plan {
            Plan::Free => 0,
            Plan::Unlimited => 1,
        },
        Ordering::Relaxed,
    );
}

/// The plan of tenants without stored settings (see [`set_default_plan`]).
pub fn default_plan() -> Plan {
    match DEFAULT_PLAN.load(Ordering::Relaxed) {
        0 => Plan::Free,
        _ => Plan::Unlimited,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_single_numbers_of_the_plan() {
        let mut quotas = TenantQuotas::plan(Plan::Free);
        assert_eq!(quotas.limit(Quota::RunsPerDay), Some(5));
        quotas.overrides.set(Quota::RunsPerDay, Some(100));
        assert_eq!(quotas.limit(Quota::RunsPerDay), Some(100));
        assert_eq!(quotas.limit(Quota::Projects), Some(2));
        let mut unlimited = TenantQuotas::plan(Plan::Unlimited);
        assert_eq!(unlimited.limit(Quota::RunEvents), None);
        unlimited.overrides.set(Quota::RunEvents, Some(5));
        assert_eq!(unlimited.limit(Quota::RunEvents), Some(5));
    }

    #[test]
    fn operator_settings_parse_or_name_the_mistake() {
        assert_eq!(
            parse_setting("runs_per_day=100"),
            Ok((Quota::RunsPerDay, Some(100)))
        );
        assert_eq!(parse_setting("projects=plan"), Ok((Quota::Projects, None)));
        assert!(parse_setting("runs=1")
            .expect_err("unknown")
            .contains("unknown quota 'runs'"));
        assert!(parse_setting("projects=-1")
            .expect_err("negative")
            .contains("at least 0, got -1"));
        assert!(parse_setting("projects").is_err());
    }

    #[test]
    fn quota_names_round_trip() {
        for quota in Quota::ALL {
            assert_eq!(Quota::parse(quota.as_str()), Some(quota));
            assert_eq!(
                serde_json::to_value(quota).expect("serialises"),
                serde_json::Value::String(quota.as_str().to_owned())
            );
        }
    }
}
