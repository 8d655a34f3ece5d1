//! Handing pending runs to a worker: the claim of DESIGN.md, one statement per
//! batch, each claimed run under a new lease token with its `run.started` row.

use sqlx::types::Json;
use sqlx::{Connection, PgConnection};

use crate::db::DbError;
use crate::model::WorkerId;
use crate::protocol::{ClaimedRun, ClaimedStep, Lease};
use crate::quotas::{default_plan, Plan, Quota, QuotaOverrides, TenantQuotas};
use crate::tenancy::StepProject;

/// Claims up to `limit` pending runs of `queues` for `worker`, higher
/// priorities first, tenants of one priority taken in turn and each
/// tenant's runs FIFO (DESIGN.md, Claim; docs/adr/0006), with a lease of `lease_ms`, writing a
/// `run.started` outbox row for each, honouring the queues' settings
/// (`queues` table): a paused queue gives nothing, and a queue with a
/// concurrency or rate limit is claimed under its settings row's lock, no
/// more than its free slots and tokens allow. Queues without settings are
/// claimed in one statement, one commit; a probe of `queues` by primary key
/// comes first.
///
/// No pending run carries a cancel request (a check constraint; every path
/// out of `running` turns a requested cancel into `cancelled`), so a claim
/// never hands out a run a client cancelled.
///
/// Each claimed run carries its tenant's per-run caps (`run_events`,
/// `run_duration_minutes`), read by primary key from `tenant_quotas`, and,
/// where an event cap may apply, the events its earlier attempts recorded.
///
/// # Errors
///
/// Database errors.
pub async fn claim(
    conn: &mut PgConnection,
    worker: WorkerId,
    queues: &[String],
    limit: i64,
    lease_ms: i64,
) -> Result<Vec<ClaimedRun>, DbError> {
    Ok(claim_limited_aware(conn, worker, queues, limit, lease_ms)
        .await?
        .runs)
}

/// What [`claim_limited_aware`] claimed.
#[derive(Debug)]
pub struct Claimed {
    /// The runs, as [`claim`] returns them.
    pub runs: Vec<ClaimedRun>,
    /// A queue's concurrency or rate limit, not its backlog, cut the claim
    /// short: the queue may well have more to give once a slot frees or a
    /// token refills, so a worker should not wait for a notification.
    pub limited: bool,
}

/// [`claim`], also saying whether a queue's limit cut the claim short.
///
/// # Errors
///
/// Database errors.
pub async fn claim_limited_aware(
    conn: &mut PgConnection,
    worker: WorkerId,
    queues: &[String],
    limit: i64,
    lease_ms: i64,
) -> Result<Claimed, DbError> {
    let settings = sqlx::query!(
        r#"SELECT name, paused, (concurrency IS NOT NULL OR rate_per_second IS NOT NULL)
                  AS "limited!"
           FROM queues WHERE name = ANY($1)"#,
        queues,
    )
    .fetch_all(&mut *conn)
    .await?;
    if settings.is_empty() {
        return Ok(Claimed {
            runs: claim_from(conn, worker, queues, limit, lease_ms).await?,
            limited: false,
        });
    }
    let mut limited = false;
    let free: Vec<String> = queues
        .iter()
        .filter(|queue| !settings.iter().any(|s| &s.name == *queue))
        .cloned()
        .collect();
    let mut claimed = if free.is_empty() {
        Vec::new()
    } else {
        claim_from(conn, worker, &free, limit, lease_ms).await?
    };
    for queue in settings.iter().filter(|s| !s.paused) {
        let want = limit - claimed.len() as i64;
        if want <= 0 {
            break;
        }
        let more = if queue.limited {
            let (more, cut) = claim_limited(conn, worker, &queue.name, want, lease_ms).await?;
            limited |= cut;
            more
        } else {
            claim_from(
                conn,
                worker,
                std::slice::from_ref(&queue.name),
                want,
                lease_ms,
            )
            .await?
        };
        claimed.extend(more);
    }
    Ok(Claimed {
        runs: claimed,
        limited,
    })
}

/// Claims up to `want` runs of the limited queue `queue` under its settings
/// row's lock: no more than its concurrency leaves free (runs `running` in
/// it across the fleet, prefetched ones included) and its rate bucket holds
/// (refilled at `rate_per_second`, at most one second's worth), in one
/// transaction with the claim. Also says whether the limit, not the
/// backlog, cut the claim short (the claim filled all the room the limit
/// left, and that room was less than `want`).
async fn claim_limited(
    conn: &mut PgConnection,
    worker: WorkerId,
    queue: &str,
    want: i64,
    lease_ms: i64,
) -> Result<(Vec<ClaimedRun>, bool), DbError> {
    let mut tx = conn.begin().await?;
    let Some(row) = sqlx::query!(
        r#"SELECT paused, concurrency, rate_per_second, tokens,
                  extract(epoch FROM clock_timestamp() - refilled_at)::float8 AS "elapsed!"
           FROM queues WHERE name = $1 FOR UPDATE"#,
        queue,
    )
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok((Vec::new(), false));
    };
    // Counted by a statement after the lock: its snapshot sees every claim
    // committed by the worker that held the lock before (a count in the
    // locking statement would see the table as it was before the wait).
    let running = match row.concurrency {
        Some(_) => Some(
            sqlx::query_scalar!(
                r#"SELECT count(*) AS "count!" FROM runs WHERE status = 'running' AND queue = $1"#,
                queue,
            )
            .fetch_one(&mut *tx)
            .await?,
        ),
        None => None,
    };
    if row.paused {
        return Ok((Vec::new(), false));
    }
    let mut room = want;
    if let (Some(concurrency), Some(running)) = (row.concurrency, running) {
        room = room.min(i64::from(concurrency) - running);
    }
    let mut tokens = row.tokens;
    if let Some(rate) = row.rate_per_second {
        tokens = (tokens + row.elapsed.max(0.0) * rate).min(rate.max(1.0));
        room = room.min(tokens.floor() as i64);
    }
    let claimed = if room > 0 {
        claim_from(&mut tx, worker, &[queue.to_owned()], room, lease_ms).await?
    } else {
        Vec::new()
    };
    if row.rate_per_second.is_some() {
        sqlx::query!(
            "UPDATE queues SET tokens = $2, refilled_at = clock_timestamp() WHERE name = $1",
            queue,
            tokens - claimed.len() as f64,
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    let cut = room < want && claimed.len() as i64 >= room.max(0);
    Ok((claimed, cut))
}

/// The most (priority, tenant) groups one claim considers in a queue. Past
/// it, the groups after the first `MAX_GROUPS` in (priority, tenant id)
/// order wait for a later claim; the batch itself serves at most `limit`
/// groups, so this only bounds the walk.
const MAX_GROUPS: i32 = 128;

/// The claim statement itself, on `queues` without settings: round robin
/// between the tenants of a queue within a priority (README, "Fairness
/// between tenants"), FIFO within a tenant, higher priorities first, and
/// never a run waiting behind its sequence key.
async fn claim_from(
    conn: &mut PgConnection,
    worker: WorkerId,
    queues: &[String],
    limit: i64,
    lease_ms: i64,
) -> Result<Vec<ClaimedRun>, DbError> {
    let rows = sqlx::query!(
        r#"
        WITH RECURSIVE groups (queue, priority, tenant_id, head_run_at, depth) AS (
            -- The (priority, tenant) groups with claimable runs in each queue,
            -- highest priority first: a loose scan of the pending index, one
            -- probe per group however long each group's backlog is. A group's
            -- first entry has its earliest `run_at`.
            SELECT q.queue, g.priority, g.tenant_id, g.run_at, 1
            FROM unnest($1::text[]) AS q(queue)
            CROSS JOIN LATERAL (
                SELECT priority, tenant_id, run_at FROM runs
                WHERE status = 'pending' AND NOT sequence_waiting AND queue = q.queue
                ORDER BY priority DESC, tenant_id, run_at, id LIMIT 1
            ) g
            UNION ALL
            SELECT g.queue, n.priority, n.tenant_id, n.run_at, g.depth + 1
            FROM groups g
            CROSS JOIN LATERAL (
                (SELECT priority, tenant_id, run_at FROM runs
                 WHERE status = 'pending' AND NOT sequence_waiting AND queue = g.queue
                   AND priority = g.priority AND tenant_id > g.tenant_id
                 ORDER BY priority DESC, tenant_id, run_at, id LIMIT 1)
                UNION ALL
                (SELECT priority, tenant_id, run_at FROM runs
                 WHERE status = 'pending' AND NOT sequence_waiting AND queue = g.queue
                   AND priority < g.priority
                 ORDER BY priority DESC, tenant_id, run_at, id LIMIT 1)
                LIMIT 1
            ) n
            WHERE g.depth < $6
        ), due AS (
            SELECT queue, priority, tenant_id FROM groups WHERE head_run_at <= now()
        ), shares AS (
            -- A lone group (one tenant, one priority: the common case) is
            -- given the whole batch, with nothing counted or sorted.
            SELECT queue, priority, tenant_id, $2 AS take FROM due
            WHERE (SELECT count(*) FROM due) = 1
            UNION ALL
            -- Round robin within a priority: every group's first run, then
            -- every group's second, and so on; higher priorities first. What
            -- each group can give is counted up to the batch. Groups tied in
            -- a turn are drawn at random, so when more groups compete than
            -- the batch holds, none is always last.
            SELECT queue, priority, tenant_id, count(*) AS take FROM (
                SELECT d.queue, d.priority, d.tenant_id
                FROM due d
                CROSS JOIN LATERAL generate_series(1, (
                    SELECT count(*) FROM (
                        SELECT 1 FROM runs r
                        WHERE r.status = 'pending' AND NOT r.sequence_waiting
                          AND r.queue = d.queue AND r.priority = d.priority
                          AND r.tenant_id = d.tenant_id AND r.run_at <= now()
                        ORDER BY r.run_at, r.id
                        LIMIT $2) c)) AS turn
                WHERE (SELECT count(*) FROM due) > 1
                ORDER BY d.priority DESC, turn, random()
                LIMIT $2
            ) t
            GROUP BY queue, priority, tenant_id
        ), next AS (
            -- Each group's share from its head, FIFO (invariant 4 within a
            -- tenant), skipping rows another claim holds.
            SELECT n.id FROM shares s
            CROSS JOIN LATERAL (
                SELECT id FROM runs
                WHERE status = 'pending' AND NOT sequence_waiting AND queue = s.queue
                  AND priority = s.priority AND tenant_id = s.tenant_id AND run_at <= now()
                ORDER BY run_at, id
                LIMIT s.take
                FOR UPDATE SKIP LOCKED
            ) n
        ), claimed AS (
            UPDATE runs r
            SET status = 'running', attempt = r.attempt + 1, lease_token = r.lease_token + 1,
                locked_by = $3, started_at = now(),
                lease_expires_at = now() + $4 * interval '1 millisecond',
                prev_event_txid = r.last_event_txid, last_event_txid = pg_current_xact_id()
            -- Through the primary key. Joined as `FROM next`, the CTE may be
            -- hashed against a scan of all runs; the rescuer and bulk retry
            -- update their locked rows the same way.
            WHERE r.id = ANY(ARRAY(SELECT id FROM next))
            RETURNING r.*
        ), started AS (
            INSERT INTO outbox (tenant_id, run_id, event_type, queue, status, attempt, max_attempts,
                                run_at, error, result, prev_txid)
            SELECT tenant_id, id, 'run.started', claimed.queue, claimed.status, claimed.attempt, claimed.max_attempts,
                   claimed.run_at, claimed.error, claimed.result, claimed.prev_event_txid
            FROM claimed
        )
        SELECT c.id AS "id!", c.lease_token AS "lease_token!", c.tenant_id AS "tenant_id!",
               c.queue AS "queue!", c.attempt AS "attempt!", c.max_attempts AS "max_attempts!",
               c.timeout_seconds, c.metadata AS "metadata!", c.started_at AS "started_at!",
               -- json, not jsonb: it is only sent to the worker, and building
               -- binary jsonb for every claimed run cost a tenth of the claim.
               (SELECT json_agg(json_build_object(
                    'position', s.position, 'name', s.name, 'kind', s.kind, 'input', s.input,
                    'timeout_seconds', s.timeout_seconds, 'status', s.status,
                    'output', s.output) ORDER BY s.position)
                FROM run_steps s WHERE s.run_id = c.id) AS "steps!: Json<Vec<ClaimedStep>>",
               -- One primary-key probe, only for runs that name a project.
               CASE WHEN c.project_id IS NOT NULL THEN
                   (SELECT json_build_object('id', p.id, 'name', p.name,
                        'environment', p.environment, 'target_url', p.target_url)
                    FROM projects p WHERE p.id = c.project_id)
               END AS "project: Json<StepProject>",
               q.plan AS "plan?", q.overrides AS "overrides?: Json<QuotaOverrides>",
               -- Events of earlier attempts count against the run's event cap;
               -- counted only where a cap may apply, so unlimited tenants'
               -- claims do not probe run_events at all.
               CASE WHEN coalesce(q.plan, $5) <> 'unlimited' OR q.overrides ? 'run_events'
                    THEN (SELECT count(*) FROM run_events e WHERE e.run_id = c.id)
               END AS events_recorded
        FROM claimed c
        -- By primary key: one probe per claimed run, none for tenants without a row.
        LEFT JOIN tenant_quotas q ON q.tenant_id = c.tenant_id
        ORDER BY c.priority DESC, c.run_at, c.id
        "#,
        queues,
        limit,
        worker,
        lease_ms as f64,
        default_plan().as_str(),
        MAX_GROUPS,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let quotas = match (row.plan.as_deref().and_then(Plan::parse), row.overrides) {
                (Some(plan), Some(overrides)) => TenantQuotas {
                    plan,
                    overrides: overrides.0,
                },
                _ => TenantQuotas::plan(default_plan()),
            };
            ClaimedRun {
                lease: Lease {
                    id: row.id,
                    token: row.lease_token,
                    attempt: row.attempt,
                },
                tenant_id: row.tenant_id,
                queue: row.queue,
                max_attempts: row.max_attempts,
                timeout_seconds: row.timeout_seconds,
                metadata: row.metadata,
                started_at: row.started_at,
                steps: row.steps.0,
                event_cap: quotas.limit(Quota::RunEvents),
                duration_cap_seconds: quotas
                    .limit(Quota::RunDurationMinutes)
                    .map(|minutes| minutes.saturating_mul(60)),
                events_recorded: row.events_recorded.unwrap_or(0),
                project: row.project.map(|project| project.0),
            }
        })
        .collect())
}
