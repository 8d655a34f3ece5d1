//! Invariant 6 (one contract): every payload that crosses a process boundary
//! is one shared type whose serde form, OpenAPI form and database form agree.

use poem_openapi::types::{ParseFromJSON, ToJSON};
use runq_shared::{
    CreateRun, ErrorReason, EventType, NewStep, OutboxEvent, Problem, Run, RunDetail, RunError,
    RunSnapshot, RunStatus, Step, StepInput, StepStatus,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

mod outbox;

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
