//! The live event streams over real HTTP (Server-Sent Events read by a
//! real client): `GET /v1/runs/{id}/events/stream` and `GET
//! /v1/events/stream`. What a client sees when it connects mid-run, that
//! resuming with `Last-Event-ID` misses and repeats nothing (with a sidecar
//! writing events concurrently with the run's own), that tenants see only
//! their own runs, that every `data` is the shared type (invariant 6), and
//! that streams survive a database blip, free their slot when the client
//! leaves and end when the API shuts down.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::{Client, StatusCode};
use runq_shared::config::ApiConfig;
use runq_shared::db::{self, outbox};
use runq_shared::{Event, Problem, Run, RunEvent, RunId, Scope, StepProgress, StepStatus};
use runq_worker::Worker;
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

mod run;
mod service;
mod tenant;

use crate::support::handlers::{Count, Executions, FailOnce};
use crate::support::http::Served;
use crate::support::sse::{self, Message, Stream};
use crate::support::{token, wait_for_value, worker_config, RunningWorker, TestApi, TestDb};

/// How long a test waits for a state it expects.
const LIMIT: Duration = Duration::from_secs(30);

/// `acme`'s API over HTTP (`Served` under `Deref`) with the `count` and
/// `fail_once` step kinds, a token of a second tenant, `globex`, and a
/// project of `acme` with an `ingest` token bound to it.
struct Fixture {
    served: Served,
    other_token: String,
    project: Uuid,
    ingest_token: String,
    executions: Executions,
}

impl std::ops::Deref for Fixture {
    type Target = Served;

    fn deref(&self) -> &Served {
        &self.served
    }
}

impl Fixture {
    async fn new() -> Self {
        Self::with(TestApi::config()).await
    }

    async fn with(mut config: ApiConfig) -> Self {
        config.step_kinds = vec!["count".to_owned(), "fail_once".to_owned()];
        let db = TestDb::new().await;
        let tenant = db.tenant("acme").await;
        let other = db.tenant("globex").await;
        let acme_token = token(&db, tenant).await;
        let other_token = token(&db, other).await;
        let (project, ingest_token) = ingest_project(&db, tenant).await;
        Fixture {
            served: Served::start_with(db, acme_token, config),
            other_token,
            project,
            ingest_token,
            executions: Executions::default(),
        }
    }

    /// A worker of the queues `default` and `emails` with `count` and
    /// `fail_once`, on a pool of its own.
    fn worker(&self) -> RunningWorker {
        let mut config = worker_config(4);
        config.queues = vec!["default".to_owned(), "emails".to_owned()];
        RunningWorker::start(
            Worker::new(self.db.new_pool(4), config)
                .register(Count {
                    executions: self.executions.clone(),
                    worker: "w".to_owned(),
                })
                .register(FailOnce {
                    executions: self.executions.clone(),
                }),
        )
    }

    /// Creates a run of `count` steps sleeping `ms` each, in the project,
    /// with `token`.
    async fn counting_run(&self, token: &str, ms: &[u64]) -> Run {
        let steps: Vec<Value> = ms
            .iter()
            .enumerate()
            .map(|(i, ms)| json!({ "name": format!("s{i}"), "kind": "count", "input": { "ms": ms } }))
            .collect();
        self.create(token, json!({ "steps": steps, "project_id": self.project }))
            .await
    }

    async fn create(&self, token: &str, body: Value) -> Run {
        let response = self
            .client
            .post(self.url("/v1/runs"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.expect("run")
    }

    fn run_stream(&self, id: RunId) -> String {
        self.url(&format!("/v1/runs/{id}/events/stream"))
    }

    fn tenant_stream(&self, query: &str) -> String {
        self.url(&format!("/v1/events/stream{query}"))
    }

    /// Waits until step `position` of run `id` has `status`.
    async fn wait_step(&self, id: RunId, position: i32, status: &str) {
        wait_for_value(
            &format!("step {position} of run {id} to be {status}"),
            LIMIT,
            || async {
                let now: String = sqlx::query_scalar(
                    "SELECT status::text FROM run_steps WHERE run_id = $1 AND position = $2",
                )
                .bind(id)
                .bind(position)
                .fetch_one(&self.db.pool)
                .await
                .expect("step");
                (now == status).then_some(())
            },
        )
        .await;
    }

    async fn status(&self, id: RunId) -> String {
        sqlx::query_scalar("SELECT status::text FROM runs WHERE id = $1")
            .bind(id)
            .fetch_one(&self.db.pool)
            .await
            .expect("run")
    }

    /// What the outbox holds for run `id`, as published.
    async fn published(&self, id: RunId) -> Vec<RunEvent> {
        let mut conn = self.db.pool.acquire().await.expect("connection");
        outbox::for_run(&mut conn, id)
            .await
            .expect("outbox")
            .iter()
            .map(outbox::OutboxRow::published)
            .collect()
    }

    /// Every event of run `id`, oldest first.
    async fn events(&self, id: RunId) -> Vec<Event> {
        let mut conn = self.db.pool.acquire().await.expect("connection");
        let tenant = self.db.tenant("acme").await;
        db::events::list(&mut conn, tenant, id, 0, 10_000)
            .await
            .expect("events")
    }
}

/// A `dev` project of `tenant` and an `ingest` token bound to it.
async fn ingest_project(db: &TestDb, tenant: Uuid) -> (Uuid, String) {
    let mut tx = db.pool.begin().await.expect("begin");
    let project = db::projects::create(
        &mut tx,
        tenant,
        &runq_shared::CreateProject {
            name: "sidecars".to_owned(),
            environment: runq_shared::Environment::Dev,
            target_url: None,
        },
    )
    .await
    .expect("project");
    tx.commit().await.expect("commit");
    let mut conn = db.pool.acquire().await.expect("connection");
    let issued = db::tokens::create(
        &mut conn,
        tenant,
        "sidecar",
        &[Scope::Ingest],
        Some(project.id),
    )
    .await
    .expect("ingest token");
    (project.id, issued.plaintext)
}

/// What a message is, for comparing sequences: its event name, and the
/// step's position for step progress.
fn name(message: &Message) -> String {
    match message.event.as_str() {
        "step.started" | "step.finished" => {
            format!("{}:{}", message.event, message.data["position"])
        }
        other => other.to_owned(),
    }
}

fn names(messages: &[Message]) -> Vec<String> {
    messages.iter().map(name).collect()
}

/// What a message says, independent of where it sits in the stream (its
/// SSE id is a position, which depends on what came before): the state
/// change's id, the event's id, or the step progress's type, position and
/// attempt.
fn identity(message: &Message) -> String {
    match message.event.as_str() {
        "step.started" | "step.finished" => format!(
            "{}:{}:{}",
            message.event, message.data["position"], message.data["attempt"]
        ),
        "event" => format!("event:{}", message.data["id"]),
        _ => format!("state:{}", message.data["id"]),
    }
}

/// Checks the contract of a run stream's messages against the database:
/// every state change's `data` is a `RunEvent` (strictly), named by its
/// type, and together they are what `outbox::for_run` holds for the run, in
/// order; every event's `data` is an `Event`, together the run's events in
/// order; every step message is a `StepProgress` named by its type. Ids
/// are positions, `<n>.<n>.<n>.<n>`, and none repeats.
async fn check_run_contract(f: &Fixture, run: RunId, messages: &[Message]) {
    let mut changes = Vec::new();
    let mut events = Vec::new();
    for message in messages {
        match message.event.as_str() {
            "event" => events.push(
                serde_json::from_value::<Event>(message.data.clone())
                    .unwrap_or_else(|e| panic!("{message:?} is no Event: {e}")),
            ),
            "step.started" | "step.finished" => {
                let progress: StepProgress = serde_json::from_value(message.data.clone())
                    .unwrap_or_else(|e| panic!("{message:?} is no StepProgress: {e}"));
                assert_eq!(progress.progress_type.as_str(), message.event);
                assert_eq!(progress.version, 1);
            }
            other => {
                let change: RunEvent = serde_json::from_value(message.data.clone())
                    .unwrap_or_else(|e| panic!("{message:?} is no RunEvent: {e}"));
                assert_eq!(change.event_type.as_str(), other, "event name is the type");
                assert_eq!(change.run.id, run);
                changes.push(change);
            }
        }
        let parts: Vec<&str> = message.id.split('.').collect();
        assert!(
            parts.len() == 4 && parts.iter().all(|p| p.parse::<u64>().is_ok()),
            "id {} is a position",
            message.id
        );
    }
    assert_eq!(
        changes,
        f.published(run).await,
        "state changes are the outbox's"
    );
    assert_eq!(events, f.events(run).await, "events are the run's");
    let ids: BTreeSet<&str> = messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len(), messages.len(), "no id repeats");
}
