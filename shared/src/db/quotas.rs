//! `tenant_quotas` and `tenant_usage`: each tenant's plan and overrides, the
//! hourly counters of runs accepted, and the checks that refuse work past a
//! limit.
//!
//! Checks are made once per call and tenant, never per run, and serialise
//! per tenant (not globally) on a transaction-scoped advisory lock keyed by
//! the tenant id: two API processes checking the same tenant take turns, so
//! together they cannot pass a limit. The use is read by a statement after
//! the lock is taken, so it sees every charge committed before (READ
//! COMMITTED takes a new snapshot per statement). Tenants without a
//! `runs_per_day` limit (the `unlimited` plan) take no lock and write nothing.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use sqlx::types::Json;
use sqlx::PgConnection;

use super::DbError;
use crate::model::TenantId;
use crate::quotas::{
    default_plan, Plan, Quota, QuotaOverrides, QuotaReport, QuotaStatus, TenantQuotas,
};

/// First key of the per-tenant advisory lock (the second is a hash of the
/// tenant id). Two-key advisory locks never conflict with the one-key locks
/// of the rescuer.
const QUOTA_LOCK_SPACE: i32 = 0x7275_6e71; // "runq"

/// Hours in the rolling window of `runs_per_day`.
const WINDOW_HOURS: i64 = 24;

/// The stored settings of `tenants` (those without a row are absent).
async fn stored(
    conn: &mut PgConnection,
    tenants: &[TenantId],
) -> Result<HashMap<TenantId, TenantQuotas>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT tenant_id, plan, overrides AS "overrides: Json<QuotaOverrides>"
           FROM tenant_quotas WHERE tenant_id = ANY($1)"#,
        tenants,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let quotas = TenantQuotas {
                plan: Plan::parse(&row.plan).unwrap_or_else(default_plan),
                overrides: row.overrides.0,
            };
            (row.tenant_id, quotas)
        })
        .collect())
}

/// The quota settings of `tenant`: stored ones, else the default plan.
///
/// # Errors
///
/// Database errors.
pub async fn get(conn: &mut PgConnection, tenant: TenantId) -> Result<TenantQuotas, DbError> {
    Ok(stored(conn, &[tenant])
        .await?
        .remove(&tenant)
        .unwrap_or_else(|| TenantQuotas::plan(default_plan())))
}

/// Stores `quotas` as `tenant`'s settings (replacing plan and overrides) and
/// returns the settings they replace. Not audited: tooling (`runq dev`,
/// `runq bench`, tests) uses it; a client's or an operator's change goes
/// through [`change`].
///
/// # Errors
///
/// Database errors (a tenant that does not exist violates a foreign key).
pub async fn set(
    conn: &mut PgConnection,
    tenant: TenantId,
    quotas: &TenantQuotas,
) -> Result<TenantQuotas, DbError> {
    let before = get(conn, tenant).await?;
    sqlx::query!(
        r#"INSERT INTO tenant_quotas (tenant_id, plan, overrides) VALUES ($1, $2, $3)
           ON CONFLICT (tenant_id) DO UPDATE
           SET plan = EXCLUDED.plan, overrides = EXCLUDED.overrides, updated_at = now()"#,
        tenant,
        quotas.plan.as_str(),
        Json(&quotas.overrides) as _,
    )
    .execute(&mut *conn)
    .await?;
    Ok(before)
}

/// Stores `quotas` as `tenant`'s settings, as [`set`] does, and records the
/// change in the audit log (`quota.update`, with the settings before and
/// after) in the same transaction: the path for a client's or an
/// operator's change.
///
/// # Errors
///
/// Database errors.
pub async fn change(
    conn: &mut PgConnection,
    tenant: TenantId,
    quotas: &TenantQuotas,
    actor: &crate::db::audit::Actor,
) -> Result<TenantQuotas, DbError> {
    let before = set(conn, tenant, quotas).await?;
    crate::db::audit::record(
        conn,
        tenant,
        actor,
        crate::db::audit::QUOTA_UPDATE,
        &format!("tenant:{tenant}"),
        serde_json::json!({ "before": before, "after": quotas }),
    )
    .await?;
    Ok(before)
}

/// Applies `patch` to `tenant`'s settings under the tenant's quota lock (so
/// two patches of different numbers both hold) and records the change as
/// [`change`] does. Returns the settings before. Run it in a transaction.
///
/// # Errors
///
/// [`DbError::Invalid`] for an override out of range, else database errors.
pub async fn patch(
    conn: &mut PgConnection,
    tenant: TenantId,
    patch: &crate::quotas::QuotaPatch,
    actor: &crate::db::audit::Actor,
) -> Result<TenantQuotas, DbError> {
    lock(conn, tenant).await?;
    let current = get(conn, tenant).await?;
    let next = patch
        .apply(&current)
        .map_err(|message| DbError::Invalid(crate::model::InvalidRun(message)))?;
    change(conn, tenant, &next, actor).await
}

/// Takes `tenant`'s quota lock until the transaction ends. Outside a
/// transaction it is released at once and protects nothing.
async fn lock(conn: &mut PgConnection, tenant: TenantId) -> Result<(), DbError> {
    sqlx::query!(
        "SELECT pg_advisory_xact_lock($1, hashtext($2::text))",
        QUOTA_LOCK_SPACE,
        tenant.to_string(),
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Runs accepted per counted hour of `tenants`' rolling window, oldest first.
async fn runs_window(
    conn: &mut PgConnection,
    tenants: &[TenantId],
) -> Result<HashMap<TenantId, Vec<(DateTime<Utc>, i64)>>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT tenant_id, window_start, runs FROM tenant_usage
           WHERE tenant_id = ANY($1)
             AND window_start > date_trunc('hour', now()) - $2 * interval '1 hour'
           ORDER BY tenant_id, window_start"#,
        tenants,
        WINDOW_HOURS as f64,
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut window: HashMap<TenantId, Vec<(DateTime<Utc>, i64)>> = HashMap::new();
    for row in rows {
        window
            .entry(row.tenant_id)
            .or_default()
            .push((row.window_start, row.runs));
    }
    Ok(window)
}

/// When enough of `window`'s oldest hours leave it for `excess` more runs to
/// fit; `None` when they never would (the request alone exceeds the limit).
fn frees_at(window: &[(DateTime<Utc>, i64)], excess: i64) -> Option<DateTime<Utc>> {
    let mut freed = 0;
    for (hour, runs) in window {
        freed += runs;
        if freed >= excess {
            return Some(*hour + Duration::hours(WINDOW_HOURS));
        }
    }
    None
}

/// The `runs_per_day` limits of those of `tenants` that have one.
///
/// # Errors
///
/// Database errors.
pub(crate) async fn run_limits(
    conn: &mut PgConnection,
    tenants: &[TenantId],
) -> Result<Vec<(TenantId, i64)>, DbError> {
    let stored = stored(conn, tenants).await?;
    let fallback = TenantQuotas::plan(default_plan());
    let mut limits: Vec<(TenantId, i64)> = tenants
        .iter()
        .filter_map(|tenant| {
            let quotas = stored.get(tenant).unwrap_or(&fallback);
            Some((*tenant, quotas.limit(Quota::RunsPerDay)?))
        })
        .collect();
    // Locks are taken in this order, so two batches of the same tenants
    // cannot deadlock.
    limits.sort_unstable();
    limits.dedup();
    Ok(limits)
}

/// Every tenant with a finite limit of `quota`, and the limit: the tenants
/// the event trimmer (`stored_events`) and the pruner (`retention_days`)
/// look at.
///
/// # Errors
///
/// Database errors.
pub async fn finite_limits(
    conn: &mut PgConnection,
    quota: Quota,
) -> Result<Vec<(TenantId, i64)>, DbError> {
    let tenants: Vec<TenantId> = sqlx::query_scalar!("SELECT id FROM tenants ORDER BY id")
        .fetch_all(&mut *conn)
        .await?;
    let stored = stored(conn, &tenants).await?;
    let fallback = TenantQuotas::plan(default_plan());
    Ok(tenants
        .into_iter()
        .filter_map(|tenant| {
            let quotas = stored.get(&tenant).unwrap_or(&fallback);
            Some((tenant, quotas.limit(quota)?))
        })
        .collect())
}

/// The run counter of limited tenants inside one enqueue: taken by
/// [`RunCharge::lock`] before the runs are inserted, settled by
/// [`RunCharge::charge`] with what was inserted.
pub(crate) struct RunCharge {
    limits: Vec<(TenantId, i64)>,
    windows: HashMap<TenantId, Vec<(DateTime<Utc>, i64)>>,
}

impl RunCharge {
    /// Locks each tenant of `limits` (see [`run_limits`]) and reads its use.
    /// `conn` must be in a transaction that ends after [`RunCharge::charge`].
    pub(crate) async fn lock(
        conn: &mut PgConnection,
        limits: Vec<(TenantId, i64)>,
    ) -> Result<Self, DbError> {
        for (tenant, _) in &limits {
            lock(conn, *tenant).await?;
        }
        let tenants: Vec<TenantId> = limits.iter().map(|(tenant, _)| *tenant).collect();
        let windows = runs_window(conn, &tenants).await?;
        Ok(Self { limits, windows })
    }

    /// Refuses if a tenant's `adding` runs would pass its limit.
    pub(crate) fn check(&self, adding: &HashMap<TenantId, i64>) -> Result<(), DbError> {
        for (tenant, limit) in &self.limits {
            let add = adding.get(tenant).copied().unwrap_or(0);
            let window = self.windows.get(tenant).map(Vec::as_slice).unwrap_or(&[]);
            let used: i64 = window.iter().map(|(_, runs)| runs).sum();
            if add > 0 && used + add > *limit {
                let excess = used + add - limit;
                return Err(DbError::QuotaExceeded {
                    quota: Quota::RunsPerDay,
                    limit: *limit,
                    used,
                    requested: add,
                    resets_at: if add > *limit {
                        None
                    } else {
                        frees_at(window, excess)
                    },
                });
            }
        }
        Ok(())
    }

    /// Checks `added` (runs inserted per tenant) and counts it in the
    /// current hour, deleting the tenants' hours that left the window.
    pub(crate) async fn charge(
        self,
        conn: &mut PgConnection,
        added: &HashMap<TenantId, i64>,
    ) -> Result<(), DbError> {
        self.check(added)?;
        let (tenants, counts): (Vec<TenantId>, Vec<i64>) = self
            .limits
            .iter()
            .map(|(tenant, _)| (*tenant, added.get(tenant).copied().unwrap_or(0)))
            .filter(|(_, count)| *count > 0)
            .unzip();
        if tenants.is_empty() {
            return Ok(());
        }
        sqlx::query!(
            r#"
            WITH expired AS (
                DELETE FROM tenant_usage
                WHERE tenant_id = ANY($1)
                  AND window_start <= date_trunc('hour', now()) - $3 * interval '1 hour'
            )
            INSERT INTO tenant_usage (tenant_id, window_start, runs)
            SELECT tenant_id, date_trunc('hour', now()), runs
            FROM unnest($1::uuid[], $2::int8[]) AS t(tenant_id, runs)
            ON CONFLICT (tenant_id, window_start)
            DO UPDATE SET runs = tenant_usage.runs + EXCLUDED.runs
            "#,
            &tenants,
            &counts,
            WINDOW_HOURS as f64,
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// Refuses a new project of `tenant` past its `projects` quota. Call it in
/// the transaction that inserts the project, before the insert: it holds the
/// tenant's quota lock until that transaction ends, so concurrent creations
/// take turns.
///
/// # Errors
///
/// [`DbError::QuotaExceeded`] naming `projects`, else database errors.
pub async fn check_projects(conn: &mut PgConnection, tenant: TenantId) -> Result<(), DbError> {
    let Some(limit) = get(conn, tenant).await?.limit(Quota::Projects) else {
        return Ok(());
    };
    lock(conn, tenant).await?;
    let used = count_projects(conn, tenant).await?;
    if used + 1 > limit {
        return Err(DbError::QuotaExceeded {
            quota: Quota::Projects,
            limit,
            used,
            requested: 1,
            resets_at: None,
        });
    }
    Ok(())
}

async fn count_projects(conn: &mut PgConnection, tenant: TenantId) -> Result<i64, DbError> {
    Ok(sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM projects WHERE tenant_id = $1"#,
        tenant
    )
    .fetch_one(&mut *conn)
    .await?)
}

/// `tenant`'s settings, effective limits and current use: `GET /v1/quotas`.
///
/// # Errors
///
/// Database errors.
pub async fn report(conn: &mut PgConnection, tenant: TenantId) -> Result<QuotaReport, DbError> {
    let quotas = get(conn, tenant).await?;
    let projects = count_projects(conn, tenant).await?;
    let events = sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM run_events WHERE tenant_id = $1"#,
        tenant
    )
    .fetch_one(&mut *conn)
    .await?;
    let window = runs_window(conn, &[tenant])
        .await?
        .remove(&tenant)
        .unwrap_or_default();
    let runs: i64 = window.iter().map(|(_, runs)| runs).sum();
    let statuses = Quota::ALL
        .into_iter()
        .map(|quota| {
            let limit = quotas.limit(quota);
            let (used, resets_at) = match quota {
                Quota::Projects => (Some(projects), None),
                Quota::StoredEvents => (Some(events), None),
                Quota::RunsPerDay if limit.is_some() => (Some(runs), frees_at(&window, 1)),
                _ => (None, None),
            };
            QuotaStatus {
                quota,
                limit,
                used,
                resets_at,
            }
        })
        .collect();
    Ok(QuotaReport {
        plan: quotas.plan,
        overrides: quotas.overrides,
        quotas: statuses,
    })
}
