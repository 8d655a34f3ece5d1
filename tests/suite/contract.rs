//! Invariant 6 (one contract): every payload that crosses a process boundary
//! is one shared type whose serde form, OpenAPI form and database form agree.

use poem_openapi::types::{ParseFromJSON, ToJSON};
use runq_shared::db::runs;
use runq_shared::protocol::{Backoff, Completion, FailedStep, Outcome};
use runq_shared::{
    CreateRun, ErrorReason, EventType, NewStep, OutboxEvent, Problem, Run, RunDetail, RunError,
    RunEvent, RunSnapshot, RunStatus, Step, StepInput, StepStatus,
};
use runq_worker::maintenance::Rescuer;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::support::{echo_run, TestDb};

/// The committed spec is what the code generates (`just openapi` rewrites it).
#[test]
fn committed_openapi_matches_generated() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .expect("openapi/openapi.json exists");
    let committed: Value = serde_json::from_str(&committed).expect("committed spec parses");
    let generated: Value = serde_json::from_str(&runq_api::spec()).expect("generated spec parses");
    assert!(
        committed == generated,
        "openapi/openapi.json is stale: run `just openapi`"
    );
}

/// The spec describes every payload: the API bodies, problem documents on
/// errors, the outbox event (a component schema, as OpenAPI 3.0 has no
/// webhooks) and the step envelope.
#[test]
fn spec_describes_every_payload() {
    let spec: Value = serde_json::from_str(&runq_api::spec()).expect("spec parses");
    let schemas = spec["components"]["schemas"].as_object().expect("schemas");
    for name in [
        "CreateRun",
        "CreateRuns",
        "Run",
        "RunDetail",
        "Step",
        "Event",
        "IngestEvents",
        "IngestedEvents",
        "Problem",
        "OutboxEvent",
        "RunEvent",
        "Webhook",
        "CreatedWebhook",
        "Delivery",
        "DeliveryPage",
        "RunSnapshot",
        "StepInput",
        "RunEvent",
        "StepProgress",
    ] {
        assert!(schemas.contains_key(name), "schema {name} is missing");
    }
    let create = &spec["paths"]["/v1/runs"]["post"]["responses"];
    assert!(create["422"]["content"]["application/problem+json"].is_object());
    assert_eq!(spec["openapi"], "3.0.0");
    assert!(
        spec.get("webhooks").is_none(),
        "webhooks are OpenAPI 3.1 only"
    );
    let outbox = schemas["OutboxEvent"]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(
        outbox.contains("relays deliver"),
        "OutboxEvent says it is what relays deliver: {outbox}"
    );
}

/// The spec says a body refuses unknown fields exactly where serde does:
/// `additionalProperties: false` marks the request body types and the
/// objects inside them, and each of those is `deny_unknown_fields`.
#[test]
fn closed_schemas_are_the_types_that_refuse_unknown_fields() {
    fn refuses<T: DeserializeOwned>() -> bool {
        serde_json::from_value::<T>(json!({ "surely_not_a_field": 1 }))
            .err()
            .is_some_and(|e| e.to_string().contains("unknown field"))
    }
    let spec: Value = serde_json::from_str(&runq_api::spec()).expect("spec parses");
    let schemas = spec["components"]["schemas"].as_object().expect("schemas");
    let closed: Vec<&str> = schemas
        .iter()
        .filter(|(_, schema)| schema["additionalProperties"] == json!(false))
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(
        closed,
        [
            "CreateProject",
            "CreateRun",
            "CreateRuns",
            "CreateSchedule",
            "CreateToken",
            "CreateWebhook",
            "EnableProductionOverride",
            "IngestEvent",
            "IngestEvents",
            "NewStep",
            "QuotaOverrides",
            "QuotaPatch",
            "RetryRuns",
            "TenantQuotas",
            "UpdateProject",
            "UpdateSchedule",
            "UpdateWebhook"
        ]
    );
    for (name, refused) in [
        ("CreateProject", refuses::<runq_shared::CreateProject>()),
        ("CreateToken", refuses::<runq_shared::CreateToken>()),
        (
            "EnableProductionOverride",
            refuses::<runq_shared::EnableProductionOverride>(),
        ),
        ("UpdateProject", refuses::<runq_shared::UpdateProject>()),
        ("CreateWebhook", refuses::<runq_shared::CreateWebhook>()),
        ("CreateSchedule", refuses::<runq_shared::CreateSchedule>()),
        ("UpdateSchedule", refuses::<runq_shared::UpdateSchedule>()),
        ("UpdateWebhook", refuses::<runq_shared::UpdateWebhook>()),
        ("CreateRun", refuses::<CreateRun>()),
        ("CreateRuns", refuses::<runq_shared::CreateRuns>()),
        ("IngestEvent", refuses::<runq_shared::IngestEvent>()),
        ("IngestEvents", refuses::<runq_shared::IngestEvents>()),
        ("NewStep", refuses::<NewStep>()),
        ("RetryRuns", refuses::<runq_shared::RetryRuns>()),
        (
            "QuotaOverrides",
            refuses::<runq_shared::quotas::QuotaOverrides>(),
        ),
        ("QuotaPatch", refuses::<runq_shared::quotas::QuotaPatch>()),
        (
            "TenantQuotas",
            refuses::<runq_shared::quotas::TenantQuotas>(),
        ),
    ] {
        assert!(
            refused,
            "{name} is closed in the spec but serde takes unknown fields"
        );
    }
}

fn agree<T: Serialize + DeserializeOwned + ToJSON + ParseFromJSON + PartialEq + std::fmt::Debug>(
    value: T,
) {
    let by_serde = serde_json::to_value(&value).expect("serde serialises");
    let by_openapi = value.to_json().expect("poem-openapi serialises");
    assert_eq!(
        canonical(by_serde.clone()),
        canonical(by_openapi.clone()),
        "serde and OpenAPI forms differ"
    );
    let back: T = serde_json::from_value(by_openapi.clone()).expect("serde reads the OpenAPI form");
    assert_eq!(back, value);
    let parsed = T::parse_from_json(Some(by_serde))
        .unwrap_or_else(|e| panic!("OpenAPI reads the serde form: {}", e.into_message()));
    assert_eq!(parsed, value);
}

/// `value` with every RFC 3339 timestamp rewritten one way: serde writes UTC
/// as `Z`, poem-openapi and Postgres as `+00:00`, and both mean the same instant.
fn canonical(value: Value) -> Value {
    match value {
        Value::String(s) => match chrono::DateTime::parse_from_rfc3339(&s) {
            Ok(t) => Value::String(t.with_timezone(&chrono::Utc).to_rfc3339()),
            Err(_) => Value::String(s),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k, canonical(v))).collect())
        }
        other => other,
    }
}

fn sample_run() -> Run {
    let now = chrono::Utc::now();
    Run {
        id: uuid::Uuid::now_v7(),
        tenant_id: uuid::Uuid::now_v7(),
        project_id: None,
        queue: "q".into(),
        priority: -3,
        status: RunStatus::StoppedQuota,
        run_at: now,
        attempt: 2,
        max_attempts: 3,
        timeout_seconds: Some(30),
        metadata: json!({ "ünï": [1, null] }),
        idempotency_key: Some("k".into()),
        sequence_key: Some("account/ü-1".into()),
        sequence_waiting: false,
        cancel_requested: true,
        result: None,
        error: Some(json!({ "reason": "duration_cap", "message": "m" })),
        errors: vec![runq_shared::AttemptError {
            attempt: 1,
            at: now,
            reason: ErrorReason::LeaseExpired,
            message: "the lease expired".into(),
            position: None,
            worker_id: Some(uuid::Uuid::now_v7()),
        }],
        created_at: now,
        started_at: Some(now),
        finished_at: None,
    }
}

/// serde and poem-openapi write and read the same JSON for every payload type.
#[test]
fn serde_and_openapi_forms_agree() {
    let now = chrono::Utc::now();
    agree(sample_run());
    agree(RunDetail {
        run: sample_run(),
        steps: vec![Step {
            position: 0,
            name: "n".into(),
            kind: "echo".into(),
            input: json!({}),
            timeout_seconds: None,
            status: StepStatus::Failed,
            attempt: 1,
            output: None,
            error: Some(json!({ "message": "x" })),
            started_at: Some(now),
            finished_at: Some(now),
        }],
    });
    let mut create = CreateRun::new(vec![NewStep::new(
        "a",
        "http",
        json!({ "url": "http://x" }),
    )]);
    create.metadata = Some(json!({ "k": "v" }));
    create.run_at = Some(now);
    agree(create);
    agree(Problem {
        problem_type: "urn:runq:problem:x".into(),
        title: "t".into(),
        status: 422,
        detail: "d".into(),
    });
    agree(OutboxEvent {
        event_type: EventType::Retrying,
        occurred_at: now,
        run: RunSnapshot {
            id: uuid::Uuid::now_v7(),
            tenant_id: uuid::Uuid::now_v7(),
            queue: "q".into(),
            status: RunStatus::Pending,
            attempt: 1,
            max_attempts: 3,
            run_at: now,
            error: Some(RunError {
                reason: ErrorReason::StepFailed,
                message: "m".into(),
                position: Some(1),
            }),
            result: None,
        },
    });
    let change = runq_shared::RunEvent {
        id: "evt_7".into(),
        version: runq_shared::RUN_EVENT_VERSION,
        event_type: EventType::Succeeded,
        occurred_at: now,
        run: RunSnapshot {
            id: uuid::Uuid::now_v7(),
            tenant_id: uuid::Uuid::now_v7(),
            queue: "q".into(),
            status: RunStatus::Succeeded,
            attempt: 1,
            max_attempts: 3,
            run_at: now,
            error: None,
            result: Some(json!({ "ok": true })),
        },
    };
    agree(change.clone());
    // A run stream's item is one of three types, told apart by their fields
    // the same way by serde (untagged) and poem-openapi (the union).
    agree(runq_shared::RunStreamItem::StateChange(change));
    for (progress_type, status, finished_at, error) in [
        (
            runq_shared::StepProgressType::Started,
            StepStatus::Pending,
            None,
            None,
        ),
        (
            runq_shared::StepProgressType::Finished,
            StepStatus::Failed,
            Some(now),
            Some(json!({ "reason": "step_failed", "message": "no" })),
        ),
    ] {
        let progress = runq_shared::StepProgress {
            version: runq_shared::STEP_PROGRESS_VERSION,
            progress_type,
            position: 1,
            name: "b".into(),
            kind: "http".into(),
            attempt: 2,
            status,
            started_at: now,
            finished_at,
            error,
        };
        agree(progress.clone());
        agree(runq_shared::RunStreamItem::Step(progress));
    }
    agree(runq_shared::RunStreamItem::Event(runq_shared::Event {
        id: 9,
        attempt: 1,
        position: Some(0),
        kind: "http.response".into(),
        data: json!({ "status": 200 }),
        truncated: false,
        occurred_at: None,
        created_at: now,
    }));
    agree(runq_shared::IngestEvents {
        run_id: uuid::Uuid::now_v7(),
        events: vec![
            runq_shared::IngestEvent {
                kind: "log".into(),
                data: json!({ "line": "x" }),
                occurred_at: Some(now),
            },
            runq_shared::IngestEvent {
                kind: "metric".into(),
                data: json!(null),
                occurred_at: None,
            },
        ],
    });
    agree(runq_shared::IngestedEvents {
        accepted: 10,
        rejected: 5,
        truncated: 1,
    });
    agree(runq_shared::Event {
        id: 7,
        attempt: 1,
        position: None,
        kind: "log".into(),
        data: json!({ "truncated": true, "original_bytes": 70000, "data": "{" }),
        truncated: true,
        occurred_at: Some(now),
        created_at: now,
    });
    agree(StepInput {
        id: uuid::Uuid::now_v7(),
        attempt: 1,
        position: 0,
        name: "s".into(),
        input: json!({ "url": "http://x" }),
        prev: Value::Null,
        results: vec![],
        metadata: json!({}),
        project: Some(runq_shared::StepProject {
            id: uuid::Uuid::now_v7(),
            name: "shop".into(),
            environment: runq_shared::Environment::Staging,
            target_url: Some("http://shop.test".into()),
        }),
    });
    let id = uuid::Uuid::now_v7();
    agree(runq_shared::Project {
        id,
        name: "shop".into(),
        environment: runq_shared::Environment::Prod,
        target_url: Some("http://shop".into()),
        production_override: Some(runq_shared::ProductionOverride {
            enabled_by: Some(id),
            enabled_at: now,
        }),
        created_at: now,
    });
    agree(runq_shared::CreatedToken {
        token: "runq_x".into(),
        id,
        name: "ci".into(),
        scopes: vec![runq_shared::Scope::Ingest],
        project_id: Some(id),
        created_at: now,
    });
    agree(runq_shared::EnableProductionOverride {
        not_customer_facing: Some(true),
        no_real_secrets: Some(false),
        accept_unsafe_agent_behavior: None,
    });
    agree(runq_shared::AuditEntry {
        id: 7,
        actor: format!("token:{id}"),
        actor_token_id: Some(id),
        action: "token.create".into(),
        target: format!("token:{id}"),
        details: json!({ "scopes": ["admin"] }),
        created_at: now,
    });
}

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
