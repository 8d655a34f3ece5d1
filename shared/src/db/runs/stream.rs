//! What a run's live event stream reads: the run's state changes (its
//! outbox rows), its events and its steps, in one statement so all three
//! come from one snapshot, with that snapshot's transaction horizon.
//!
//! # Why the horizon
//!
//! A run's outbox rows are written by transactions that hold the run's row
//! lock from before the insert until commit, so their ids follow commit
//! order and a reader can walk them by id ([`super::super::outbox::for_run`]).
//! Its events cannot be walked that way: a sidecar's ingest takes no lock on
//! the run, so an ingested event with a lower id can commit after a step's
//! event with a higher one. The stream therefore only passes event ids it
//! knows are complete: the highest id a snapshot saw is final once every
//! transaction that was running at that snapshot has ended, that is once a
//! later snapshot's `xmin` reaches the first one's `xmax`. Every writer of
//! `run_events` has its transaction id before it draws an event id (each
//! locks or updates a row first), so no writer can hide from that check; a
//! writer that draws an id after the snapshot draws a higher one.

use serde::Deserialize;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::outbox::{Cursor, OutboxRow};
use crate::db::DbError;
use crate::model::{Event, OutboxEvent, RunId, RunStatus, StepStatus, TenantId};

/// The transaction horizon of the snapshot a [`RunProgress`] was read in
/// (`pg_snapshot_xmin` and `pg_snapshot_xmax` as 64-bit transaction ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizon {
    /// Every transaction with a lower id had ended.
    pub xmin: i64,
    /// Every transaction with this id or a higher one had not started (or
    /// had no id yet).
    pub xmax: i64,
}

/// A step as a run's stream sees it: where it is, without input or output.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StepState {
    /// Zero-based index in the pipeline.
    pub position: i32,
    /// Name given at creation.
    pub name: String,
    /// Handler kind.
    pub kind: String,
    /// Current status.
    pub status: StepStatus,
    /// The run attempt that last finished it (0: never ran).
    pub attempt: i32,
    /// When it last started (the worker's clock), once it finished.
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When it last finished (the database's clock).
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Why it failed.
    pub error: Option<Value>,
}

/// One look at a run, every part of it from the same snapshot.
#[derive(Debug, Clone)]
pub struct RunProgress {
    /// The snapshot's horizon.
    pub horizon: Horizon,
    /// The run's status in the snapshot.
    pub status: RunStatus,
    /// The highest event id of the run in the snapshot (0: none).
    pub max_event_id: i64,
    /// The run's outbox rows above the id asked for, oldest first.
    pub state_changes: Vec<OutboxRow>,
    /// The run's events above the id asked for, oldest first, at most the
    /// limit asked for.
    pub events: Vec<Event>,
    /// Every step of the run, in pipeline order.
    pub steps: Vec<StepState>,
}

#[derive(Debug, Deserialize)]
struct StateChangeRow {
    txid: i64,
    id: i64,
    run_id: Uuid,
    event_type: String,
    payload: OutboxEvent,
}

/// Run `id` of `tenant` as its stream reads it: outbox rows with ids above
/// `after_state_change`, up to `event_limit` events with ids above
/// `after_event`, every step, and the snapshot's horizon. `None` when
/// `tenant` has no such run (or it was pruned).
///
/// # Errors
///
/// Database errors, or a row that does not deserialise into its shared type
/// (a broken contract).
pub async fn progress(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: RunId,
    after_state_change: i64,
    after_event: i64,
    event_limit: i64,
) -> Result<Option<RunProgress>, DbError> {
    // One statement: its subqueries share the statement's snapshot, which
    // `pg_current_snapshot()` describes. Each part is index range scans: the
    // outbox rows along the run's chain (`runq_run_outbox`, one range of the
    // outbox's primary key per state change not yet seen), then
    // `run_events_run_idx` and the steps' primary key.
    let row = sqlx::query!(
        r#"
        SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS "xmin!",
               pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS "xmax!",
               r.status AS "status: RunStatus",
               coalesce((SELECT max(e.id) FROM run_events e WHERE e.run_id = r.id), 0)
                   AS "max_event_id!",
               (SELECT coalesce(jsonb_agg(jsonb_build_object(
                           'txid', o.txid::text::bigint, 'id', o.id, 'run_id', o.run_id,
                           'event_type', o.event_type, 'payload', runq_outbox_event(o)) ORDER BY o.id),
                       '[]'::jsonb)
                FROM runq_run_outbox(r.id, r.last_event_txid, $3) o)
                   AS "state_changes!: Json<Vec<StateChangeRow>>",
               (SELECT coalesce(jsonb_agg(to_jsonb(e) ORDER BY e.id), '[]'::jsonb)
                FROM (SELECT id, attempt, position, kind, data, truncated, occurred_at,
                             created_at
                      FROM run_events WHERE run_id = r.id AND id > $4
                      ORDER BY id LIMIT $5) e)
                   AS "events!: Json<Vec<Event>>",
               (SELECT coalesce(jsonb_agg(jsonb_build_object(
                           'position', s.position, 'name', s.name, 'kind', s.kind,
                           'status', s.status, 'attempt', s.attempt,
                           'started_at', s.started_at, 'finished_at', s.finished_at,
                           'error', s.error) ORDER BY s.position),
                       '[]'::jsonb)
                FROM run_steps s WHERE s.run_id = r.id)
                   AS "steps!: Json<Vec<StepState>>"
        FROM runs r
        WHERE r.id = $1 AND r.tenant_id = $2
        "#,
        id,
        tenant,
        after_state_change,
        after_event,
        event_limit,
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|row| RunProgress {
        horizon: Horizon {
            xmin: row.xmin,
            xmax: row.xmax,
        },
        status: row.status,
        max_event_id: row.max_event_id,
        state_changes: row
            .state_changes
            .0
            .into_iter()
            .map(|change| OutboxRow {
                cursor: Cursor {
                    txid: change.txid,
                    id: change.id,
                },
                run_id: change.run_id,
                event_type: change.event_type,
                payload: change.payload,
            })
            .collect(),
        events: row.events.0,
        steps: row.steps.0,
    }))
}
