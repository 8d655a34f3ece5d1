//! `queues`: fleet-wide settings of named queues (pause, concurrency and
//! rate limits), which the claim honours ([`super::runs::claim`]). A queue
//! without a row has none; clearing every setting deletes the row, so the
//! queue goes back to the plain claim.

use sqlx::PgConnection;

use super::DbError;
use crate::model::QueueSettings;

/// A change of a queue's settings: `None` keeps a field; for the limits,
/// `Some(None)` removes the limit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueChange {
    /// Pause (true) or resume (false).
    pub paused: Option<bool>,
    /// A new concurrency limit, or none.
    pub concurrency: Option<Option<i32>>,
    /// A new start rate per second, or none.
    pub rate_per_second: Option<Option<f64>>,
}

/// Applies `change` to queue `name`'s settings and returns them.
///
/// # Errors
///
/// [`DbError::Invalid`] for a limit that is not positive, else database
/// errors.
pub async fn set(
    conn: &mut PgConnection,
    name: &str,
    change: &QueueChange,
) -> Result<QueueSettings, DbError> {
    let invalid = |message: String| DbError::Invalid(crate::model::InvalidRun(message));
    if let Some(Some(limit)) = change.concurrency {
        if limit < 1 {
            return Err(invalid(format!(
                "concurrency must be at least 1, got {limit}"
            )));
        }
    }
    if let Some(Some(rate)) = change.rate_per_second {
        if !(rate > 0.0 && rate.is_finite()) {
            return Err(invalid(format!(
                "rate must be a positive number, got {rate}"
            )));
        }
    }
    let row = sqlx::query_as!(
        QueueSettings,
        r#"
        INSERT INTO queues AS q (name, paused, concurrency, rate_per_second)
        VALUES ($1, coalesce($2::bool, false), CASE WHEN $3::bool THEN $4::int4 END,
                CASE WHEN $5::bool THEN $6::float8 END)
        ON CONFLICT (name) DO UPDATE SET
            paused = coalesce($2, q.paused),
            concurrency = CASE WHEN $3 THEN $4 ELSE q.concurrency END,
            rate_per_second = CASE WHEN $5 THEN $6 ELSE q.rate_per_second END,
            updated_at = now()
        RETURNING name, paused, concurrency, rate_per_second
        "#,
        name,
        change.paused,
        change.concurrency.is_some(),
        change.concurrency.flatten(),
        change.rate_per_second.is_some(),
        change.rate_per_second.flatten(),
    )
    .fetch_one(&mut *conn)
    .await?;
    if !row.paused && row.concurrency.is_none() && row.rate_per_second.is_none() {
        sqlx::query!(
            "DELETE FROM queues WHERE name = $1 AND NOT paused AND concurrency IS NULL
                                  AND rate_per_second IS NULL",
            name
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(row)
}

/// Every queue with settings, by name.
///
/// # Errors
///
/// Database errors.
pub async fn list(conn: &mut PgConnection) -> Result<Vec<QueueSettings>, DbError> {
    Ok(sqlx::query_as!(
        QueueSettings,
        "SELECT name, paused, concurrency, rate_per_second FROM queues ORDER BY name"
    )
    .fetch_all(&mut *conn)
    .await?)
}
