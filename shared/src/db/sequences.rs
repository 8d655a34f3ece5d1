//! Sequence keys (README, "Sequence keys"; docs/adr/0006): runs of a tenant
//! with the same `sequence_key` run one at a time, in enqueue order.
//!
//! A keyed run enters `sequence_waiting` when it is inserted, and so does a
//! cancelled keyed run put back to pending; both, and every run that lets go
//! of its key (succeeds or is cancelled), write a `sequence_wakeups` row in
//! their own transaction (triggers of migration 20261201000009). The
//! promoter here alone takes runs out of waiting: under the key's advisory
//! lock, it lets the oldest waiting run of a key go when the key has no
//! holder (a keyed run not waiting and pending, running, failed or stopped).
//! A unique index allows one holder per key whatever happens.

use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::db::DbError;

/// The channel a wakeup notifies, so promoters need not wait for their poll.
pub const SEQUENCE_CHANNEL: &str = "runq_sequence";

/// What one promotion pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PromoteReport {
    /// Wakeups taken (and deleted).
    pub woken: u64,
    /// Runs let go: out of waiting, claimable.
    pub promoted: u64,
    /// Keys whose promotion the database refused, with its reason: their
    /// wakeup is dropped so it cannot hold back the others, and their runs
    /// stay waiting until the key is woken again (a cancel, a retry, a new
    /// run of the key).
    pub refused: Vec<Refusal>,
}

/// A key whose promotion the database refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The key's tenant.
    pub tenant_id: Uuid,
    /// The key.
    pub sequence_key: String,
    /// What the database said.
    pub reason: String,
}

struct Wakeup {
    id: i64,
    tenant_id: Uuid,
    sequence_key: String,
}

/// Takes up to `batch` wakeups no other promoter holds and, for each key
/// they name that has no holder, lets its oldest waiting run go, in one
/// transaction; notifies `runq_pending` when a run was let go. Wakeups are
/// deleted with the promotion, so a pass that fails on the connection leaves
/// them for the next. When the database refuses the batch's write, each
/// wakeup is promoted in a transaction of its own, so one key's refusal
/// (reported in [`PromoteReport::refused`]) costs no other key anything
/// (DESIGN.md, invariant 7).
///
/// # Errors
///
/// Database errors other than a refused write.
pub async fn promote(conn: &mut PgConnection, batch: i64) -> Result<PromoteReport, DbError> {
    let mut tx = conn.begin().await?;
    let taken = take(&mut tx, batch).await?;
    if taken.is_empty() {
        tx.commit().await?;
        return Ok(PromoteReport::default());
    }
    match let_go(&mut tx, &taken).await {
        Ok(promoted) => {
            tx.commit().await?;
            Ok(PromoteReport {
                woken: taken.len() as u64,
                promoted,
                refused: Vec::new(),
            })
        }
        Err(DbError::Sqlx(sqlx::Error::Database(_))) => {
            tx.rollback().await?;
            promote_each(conn, taken.len()).await
        }
        Err(err) => Err(err),
    }
}

/// Up to `count` wakeups, one transaction each; a refused one is dropped
/// and reported.
async fn promote_each(conn: &mut PgConnection, count: usize) -> Result<PromoteReport, DbError> {
    let mut report = PromoteReport::default();
    for _ in 0..count {
        let mut tx = conn.begin().await?;
        let taken = take(&mut tx, 1).await?;
        let Some(wakeup) = taken.first() else {
            tx.commit().await?;
            break;
        };
        report.woken += 1;
        match let_go(&mut tx, &taken).await {
            Ok(promoted) => {
                tx.commit().await?;
                report.promoted += promoted;
            }
            Err(DbError::Sqlx(sqlx::Error::Database(reason))) => {
                tx.rollback().await?;
                sqlx::query!("DELETE FROM sequence_wakeups WHERE id = $1", wakeup.id)
                    .execute(&mut *conn)
                    .await?;
                report.refused.push(Refusal {
                    tenant_id: wakeup.tenant_id,
                    sequence_key: wakeup.sequence_key.clone(),
                    reason: reason.message().to_owned(),
                });
            }
            Err(err) => return Err(err),
        }
    }
    Ok(report)
}

/// Deletes and returns up to `batch` of the oldest wakeups no other
/// promoter holds.
async fn take(conn: &mut PgConnection, batch: i64) -> Result<Vec<Wakeup>, DbError> {
    Ok(sqlx::query_as!(
        Wakeup,
        r#"
        DELETE FROM sequence_wakeups
        WHERE id IN (SELECT id FROM sequence_wakeups ORDER BY id LIMIT $1
                     FOR UPDATE SKIP LOCKED)
        RETURNING id, tenant_id, sequence_key
        "#,
        batch,
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Under the keys' locks, lets the oldest waiting run of each key without a
/// holder go; returns how many went.
async fn let_go(conn: &mut PgConnection, taken: &[Wakeup]) -> Result<u64, DbError> {
    let mut pairs: Vec<(Uuid, &str)> = taken
        .iter()
        .map(|wakeup| (wakeup.tenant_id, wakeup.sequence_key.as_str()))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    let tenants: Vec<Uuid> = pairs.iter().map(|(tenant, _)| *tenant).collect();
    let names: Vec<String> = pairs.iter().map(|(_, key)| (*key).to_owned()).collect();
    // Locks first, in one statement; the promotion is the next statement,
    // so its snapshot sees everything a promoter before us committed.
    sqlx::query!("SELECT runq_sequence_lock($1, $2)", &tenants, &names)
        .execute(&mut *conn)
        .await?;
    let promoted = sqlx::query_scalar!(
        r#"
        WITH keys AS (
            SELECT * FROM unnest($1::uuid[], $2::text[]) AS k(tenant_id, sequence_key)
        ), next AS (
            SELECT (SELECT w.id FROM runs w
                    WHERE w.tenant_id = k.tenant_id AND w.sequence_key = k.sequence_key
                      AND w.sequence_waiting AND w.status = 'pending'
                    ORDER BY w.id LIMIT 1) AS id
            FROM keys k
            WHERE NOT EXISTS (
                SELECT 1 FROM runs h
                WHERE h.tenant_id = k.tenant_id AND h.sequence_key = k.sequence_key
                  AND NOT h.sequence_waiting
                  AND h.status IN ('pending', 'running', 'failed', 'stopped_quota'))
        ), promoted AS (
            UPDATE runs r SET sequence_waiting = false
            WHERE r.id = ANY(ARRAY(SELECT id FROM next WHERE id IS NOT NULL))
              AND r.sequence_waiting AND r.status = 'pending'
            RETURNING 1
        ), counted AS (
            SELECT count(*) AS promoted FROM promoted
        )
        SELECT c.promoted AS "promoted!"
        FROM counted c
        LEFT JOIN LATERAL (SELECT pg_notify('runq_pending', '') WHERE c.promoted > 0) n ON true
        "#,
        &tenants,
        &names,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(promoted as u64)
}
