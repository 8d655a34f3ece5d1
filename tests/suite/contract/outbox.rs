//! The outbox's side of invariant 6: every writer's row reads back as the
//! shared `OutboxEvent` (and as what webhooks and streams publish), through
//! the run's chain as through a scan, and rows written before the narrow
//! columns read back unchanged.

use runq_shared::db::runs;
use runq_shared::protocol::{Backoff, Completion, FailedStep, Outcome};
use runq_shared::{ErrorReason, OutboxEvent, RunError, RunEvent};
use runq_worker::maintenance::Rescuer;
use serde_json::{json, Value};

use super::agree;
use crate::support::{echo_run, TestDb};

/// Every path that writes an outbox row writes a payload that deserialises
/// (strictly) into `OutboxEvent`, whose `type` and `run.id` match the row;
/// and links it into its run's chain (migration 14), so reading a run's
/// rows along the chain finds exactly what a scan by run finds, from any
/// id on (a cancel and a retry in one transaction included).
#[tokio::test]
async fn outbox_payloads_of_every_path_deserialise_into_the_shared_type() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let runs = db
        .enqueue(
            tenant,
            (0..5)
                .map(|i| {
                    let mut run = echo_run(json!({ "i": i }));
                    // Run 2's failure uses its last attempt: `run.failed`.
                    run.max_attempts = if i == 2 { 1 } else { 3 };
                    run
                })
                .collect(),
        )
        .await;
    let worker = uuid::Uuid::now_v7();
    let backoff = Backoff {
        base_ms: 0.0,
        max_ms: 0.0,
    };
    let queues = vec!["default".to_owned()];
    let mut conn = db.pool.acquire().await.expect("connection");

    // Cancel one while pending, then retry it (cancelled, requeued).
    let mut tx = db.pool.begin().await.expect("begin");
    runs::cancel(&mut tx, tenant, runs[4].id)
        .await
        .expect("cancel");
    runs::retry(&mut tx, tenant, runs[4].id)
        .await
        .expect("retry");
    tx.commit().await.expect("commit");

    let claimed = runs::claim(&mut conn, worker, &queues, 5, 30_000)
        .await
        .expect("claim");
    let lease = |i: usize| claimed[i].lease;
    let failure = RunError::new(ErrorReason::StepFailed, "no", Some(0));
    let failed_step = || {
        Some(FailedStep {
            position: 0,
            started_at: chrono::Utc::now(),
        })
    };
    let completions = vec![
        Completion {
            lease: lease(0),
            outcome: Outcome::Succeeded {
                position: 0,
                output: json!({ "ok": true }),
                started_at: chrono::Utc::now(),
            },
        },
        Completion {
            lease: lease(1),
            outcome: Outcome::Failed {
                step: failed_step(),
                error: failure.clone(),
            },
        },
        Completion {
            lease: lease(2),
            outcome: Outcome::Failed {
                step: failed_step(),
                error: failure,
            },
        },
        Completion {
            lease: lease(3),
            outcome: Outcome::Stopped {
                error: RunError::new(ErrorReason::DurationCap, "cap", None),
            },
        },
    ];
    runs::complete_many(&mut conn, &completions, &[], backoff)
        .await
        .expect("complete");
    runs::release_many(&mut conn, &[lease(4)])
        .await
        .expect("release");
    // Rescue: claim again, expire, rescue (retrying).
    db.execute("UPDATE runs SET run_at = now()").await;
    runs::claim(&mut conn, worker, &queues, 5, 30_000)
        .await
        .expect("claim");
    db.execute(
        "UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE status = 'running'",
    )
    .await;
    Rescuer::new(db.pool.clone(), backoff, 60_000)
        .run_once()
        .await
        .expect("rescue");

    let rows: Vec<(i64, String, uuid::Uuid, Value)> = sqlx::query_as(
        "SELECT id, event_type, run_id, runq_outbox_event(o) FROM outbox o ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("outbox");
    let mut seen = std::collections::BTreeSet::new();
    for (id, event_type, run_id, payload) in rows {
        let event: OutboxEvent = serde_json::from_value(payload.clone())
            .unwrap_or_else(|e| panic!("{event_type} payload {payload} breaks the contract: {e}"));
        assert_eq!(event.event_type.as_str(), event_type);
        assert_eq!(event.run.id, run_id);
        assert_eq!(event.run.tenant_id, tenant);
        // What webhooks and streams send for this row: serde, the OpenAPI
        // schema and the row agree on it.
        let published = RunEvent::from_outbox(id, event.clone());
        assert_eq!(published.id, format!("evt_{id}"));
        assert_eq!(published.version, runq_shared::RUN_EVENT_VERSION);
        assert_eq!(published.run, event.run);
        agree(published);
        seen.insert(event_type);
    }
    let expected: std::collections::BTreeSet<String> = [
        "run.created",
        "run.started",
        "run.succeeded",
        "run.retrying",
        "run.failed",
        "run.stopped",
        "run.cancelled",
        "run.requeued",
        "run.released",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(seen, expected, "every event type was exercised");

    for run in &runs {
        let scanned: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM outbox WHERE run_id = $1 ORDER BY id")
                .bind(run.id)
                .fetch_all(&db.pool)
                .await
                .expect("scan");
        assert!(scanned.len() >= 3, "run {}: {scanned:?}", run.id);
        for after in std::iter::once(0).chain(scanned.iter().copied()) {
            let chained: Vec<i64> =
                runq_shared::db::outbox::for_run_after(&mut conn, run.id, after)
                    .await
                    .expect("chain")
                    .iter()
                    .map(|row| row.cursor.id)
                    .collect();
            let expected: Vec<i64> = scanned.iter().copied().filter(|id| *id > after).collect();
            assert_eq!(chained, expected, "run {} after {after}", run.id);
        }
    }
}

/// Narrow outbox rows (migration 20261201000011) read back as the same
/// event the old jsonb payload held, and a row written before the change
/// (its `payload` set, its narrow columns null) reads back as it was: the
/// upgrade is in place, and readers see one shape.
#[tokio::test]
async fn narrow_and_legacy_outbox_rows_read_back_as_the_same_event() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let run = db
        .enqueue(tenant, vec![echo_run(json!({}))])
        .await
        .remove(0);
    // The event the old statements built, from the same run row.
    let (narrow, legacy): (Value, Value) = sqlx::query_as(
        "SELECT runq_outbox_event(o),
                jsonb_build_object('type', 'run.created', 'occurred_at', o.created_at,
                    'run', jsonb_build_object('id', r.id, 'tenant_id', r.tenant_id,
                        'queue', r.queue, 'status', r.status, 'attempt', r.attempt,
                        'max_attempts', r.max_attempts, 'run_at', r.run_at,
                        'error', r.error, 'result', r.result))
         FROM outbox o JOIN runs r ON r.id = o.run_id WHERE o.run_id = $1",
    )
    .bind(run.id)
    .fetch_one(&db.pool)
    .await
    .expect("event");
    assert_eq!(narrow, legacy, "the narrow row builds the old payload");
    assert_eq!(narrow["run"]["status"], "pending");
    // A legacy row: payload only, written before migration 14 (no chain:
    // `chained` NULL, found by run through the legacy index).
    let written = json!({ "type": "run.created", "occurred_at": "2026-11-30T10:00:00Z",
        "run": { "id": run.id, "tenant_id": tenant, "queue": "old", "status": "pending",
                 "attempt": 0, "max_attempts": 3, "run_at": "2026-11-30T10:00:00Z",
                 "error": null, "result": null } });
    sqlx::query(
        "INSERT INTO outbox (tenant_id, run_id, event_type, payload, chained)
         VALUES ($1, $2, 'run.created', $3, NULL)",
    )
    .bind(tenant)
    .bind(run.id)
    .bind(&written)
    .execute(&db.pool)
    .await
    .expect("legacy row");
    let mut conn = db.pool.acquire().await.expect("connection");
    let rows = runq_shared::db::outbox::for_run_after(&mut conn, run.id, 0)
        .await
        .expect("read");
    assert_eq!(rows.len(), 2);
    let read: Value = serde_json::to_value(&rows[1].payload).expect("json");
    assert_eq!(read, written, "a legacy payload reads back unchanged");
    let event: OutboxEvent = serde_json::from_value(narrow).expect("contract");
    assert_eq!(event.run.id, run.id);
}
