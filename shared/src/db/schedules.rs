//! `schedules`: cron schedules, and firing the due ones. Client queries are
//! scoped to one tenant: another tenant's schedule answers
//! [`DbError::ScheduleNotFound`].

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use super::DbError;
use crate::model::{
    CreateRun, CreateSchedule, CronSpec, InvalidRun, NewRun, RunId, Schedule, TenantId,
    UpdateSchedule,
};

/// Zone of a schedule that names none.
pub const DEFAULT_TIMEZONE: &str = "UTC";

struct Row {
    id: Uuid,
    name: String,
    cron: String,
    timezone: String,
    template: Json<CreateRun>,
    enabled: bool,
    next_fire_at: DateTime<Utc>,
    last_fired_at: Option<DateTime<Utc>>,
    last_run_id: Option<RunId>,
    last_error: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<Row> for Schedule {
    fn from(row: Row) -> Self {
        Schedule {
            id: row.id,
            name: row.name,
            cron: row.cron,
            timezone: row.timezone,
            run: row.template.0,
            enabled: row.enabled,
            next_fire_at: row.enabled.then_some(row.next_fire_at),
            last_fired_at: row.last_fired_at,
            last_run_id: row.last_run_id,
            last_error: row.last_error,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// `query_as!` into a schedule [`Row`]: `prefix <every column> suffix`.
macro_rules! query_schedules {
    ($prefix:tt, $suffix:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            Row,
            $prefix
                + r#" id, name, cron, timezone, template AS "template: Json<CreateRun>", enabled,
                      next_fire_at, last_fired_at, last_run_id, last_error, created_at,
                      updated_at "#
                + $suffix
            $(, $arg)*
        )
    };
}

fn name_taken(err: sqlx::Error, name: &str) -> DbError {
    match &err {
        sqlx::Error::Database(db) if db.constraint() == Some("schedules_tenant_id_name_key") => {
            DbError::ScheduleNameTaken(name.to_owned())
        }
        _ => DbError::Sqlx(err),
    }
}

fn invalid(message: String) -> DbError {
    DbError::Invalid(InvalidRun(message))
}

/// The database clock: ticks are computed from it, so every worker agrees.
async fn now(conn: &mut PgConnection) -> Result<DateTime<Utc>, DbError> {
    Ok(sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(&mut *conn)
        .await?)
}

/// Creates a schedule of `tenant`, first firing at the next tick.
///
/// # Errors
///
/// [`DbError::Invalid`] for a cron expression or zone that does not parse
/// or never fires, [`DbError::ScheduleNameTaken`], else database errors.
pub async fn create(
    conn: &mut PgConnection,
    tenant: TenantId,
    schedule: &CreateSchedule,
) -> Result<Schedule, DbError> {
    let timezone = schedule.timezone.as_deref().unwrap_or(DEFAULT_TIMEZONE);
    let spec = CronSpec::parse(&schedule.cron, timezone).map_err(invalid)?;
    let next = spec.next_after(now(conn).await?).map_err(invalid)?;
    let row = query_schedules!(
        "INSERT INTO schedules (id, tenant_id, name, cron, timezone, template, enabled,
                                next_fire_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         RETURNING",
        "",
        Uuid::now_v7(),
        tenant,
        schedule.name,
        schedule.cron,
        timezone,
        Json(&schedule.run) as _,
        schedule.enabled.unwrap_or(true),
        next,
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|err| name_taken(err, &schedule.name))?;
    Ok(row.into())
}

/// `tenant`'s schedules, oldest first.
///
/// # Errors
///
/// Database errors.
pub async fn list(conn: &mut PgConnection, tenant: TenantId) -> Result<Vec<Schedule>, DbError> {
    let rows = query_schedules!(
        "SELECT",
        "FROM schedules WHERE tenant_id = $1 ORDER BY id",
        tenant
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(Schedule::from).collect())
}

/// Schedule `id` of `tenant`.
///
/// # Errors
///
/// [`DbError::ScheduleNotFound`], else database errors.
pub async fn get(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> Result<Schedule, DbError> {
    let row = query_schedules!(
        "SELECT",
        "FROM schedules WHERE tenant_id = $1 AND id = $2",
        tenant,
        id
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(DbError::ScheduleNotFound(id))?;
    Ok(row.into())
}

/// Changes the fields `change` gives. A new expression or zone, or turning
/// the schedule on, moves its next tick to the first one from now.
///
/// # Errors
///
/// As [`create`], and [`DbError::ScheduleNotFound`].
pub async fn update(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    change: &UpdateSchedule,
) -> Result<Schedule, DbError> {
    let mut tx = conn.begin().await?;
    let current = query_schedules!(
        "SELECT",
        "FROM schedules WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
        tenant,
        id
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(DbError::ScheduleNotFound(id))?;
    let cron = change.cron.as_deref().unwrap_or(&current.cron);
    let timezone = change.timezone.as_deref().unwrap_or(&current.timezone);
    let enabled = change.enabled.unwrap_or(current.enabled);
    let retimed =
        change.cron.is_some() || change.timezone.is_some() || (enabled && !current.enabled);
    let spec = CronSpec::parse(cron, timezone).map_err(invalid)?;
    let next = if retimed {
        spec.next_after(now(&mut tx).await?).map_err(invalid)?
    } else {
        current.next_fire_at
    };
    let name = change.name.as_deref().unwrap_or(&current.name);
    let template = change.run.as_ref().unwrap_or(&current.template.0);
    let row = query_schedules!(
        "UPDATE schedules SET name = $3, cron = $4, timezone = $5, template = $6, enabled = $7,
                              next_fire_at = $8, updated_at = now()
         WHERE tenant_id = $1 AND id = $2
         RETURNING",
        "",
        tenant,
        id,
        name,
        cron,
        timezone,
        Json(template) as _,
        enabled,
        next,
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(|err| name_taken(err, name))?;
    tx.commit().await?;
    Ok(row.into())
}

/// Deletes schedule `id` of `tenant` (the runs it made stay).
///
/// # Errors
///
/// [`DbError::ScheduleNotFound`], else database errors.
pub async fn delete(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> Result<(), DbError> {
    let done = sqlx::query!(
        "DELETE FROM schedules WHERE tenant_id = $1 AND id = $2",
        tenant,
        id
    )
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Err(DbError::ScheduleNotFound(id));
    }
    Ok(())
}

/// What one firing pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FireReport {
    /// Ticks that made a run.
    pub fired: u64,
    /// Ticks that made none (the reason is the schedule's `last_error`).
    pub failed: u64,
}

/// The idempotency key of `schedule`'s run for `tick`.
pub fn tick_key(schedule: Uuid, tick: DateTime<Utc>) -> String {
    format!("schedule:{schedule}:{}", tick.to_rfc3339())
}

/// Fires up to `limit` due schedules in one transaction: for each, the run
/// of its due tick (idempotency key [`tick_key`], so a tick never makes two
/// runs) and its next tick, the first after now. Ticks missed while no
/// worker ran are not made up one by one: the schedule fires once, for the
/// oldest missed tick, and goes on from now. A tick whose run is refused (a
/// quota, the production gate) records why in `last_error` and moves on.
/// Schedules another worker is firing are skipped.
///
/// # Errors
///
/// Database errors.
pub async fn fire_due(conn: &mut PgConnection, limit: i64) -> Result<FireReport, DbError> {
    let mut tx = conn.begin().await?;
    let due = sqlx::query!(
        r#"SELECT id, tenant_id, cron, timezone, template AS "template: Json<CreateRun>",
                  next_fire_at
           FROM schedules WHERE enabled AND next_fire_at <= now()
           ORDER BY next_fire_at LIMIT $1
           FOR UPDATE SKIP LOCKED"#,
        limit
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut report = FireReport::default();
    if due.is_empty() {
        return Ok(report);
    }
    let now = now(&mut tx).await?;
    for schedule in due {
        let tick = schedule.next_fire_at;
        let mut run = schedule.template.0;
        run.run_at = None;
        let new = NewRun {
            tenant_id: schedule.tenant_id,
            idempotency_key: Some(tick_key(schedule.id, tick)),
            run,
        };
        // A savepoint: a refused run rolls back alone.
        let mut attempt = tx.begin().await?;
        let outcome = super::runs::enqueue(&mut attempt, new).await;
        let (run_id, error) = match outcome {
            Ok(enqueued) => {
                attempt.commit().await?;
                report.fired += 1;
                (Some(enqueued.run.id), None)
            }
            Err(err) if !err.is_unavailable() => {
                attempt.rollback().await?;
                report.failed += 1;
                tracing::warn!(schedule.id = %schedule.id, error = %err, "a schedule's tick made no run");
                (None, Some(err.to_string()))
            }
            Err(err) => return Err(err),
        };
        let next = CronSpec::parse(&schedule.cron, &schedule.timezone)
            .and_then(|spec| spec.next_after(now.max(tick)));
        let (enabled, next, error) = match next {
            Ok(next) => (true, next, error),
            // Stored expressions parsed when they were written; one that no
            // longer does (or never fires again) turns the schedule off.
            Err(why) => (false, tick, Some(why)),
        };
        sqlx::query!(
            "UPDATE schedules SET next_fire_at = $2, enabled = $3, last_fired_at = $4,
                                  last_run_id = coalesce($5, last_run_id), last_error = $6
             WHERE id = $1",
            schedule.id,
            next,
            enabled,
            tick,
            run_id,
            error,
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(report)
}
