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

/// A client that connects after step 0 of a three-step run finished gets
/// the run's life so far, then the rest live: the remaining steps' starts
/// and finishes, their events, and `run.succeeded`, after which the server
/// closes the stream. Each step's finish carries its status, attempt and
/// times; every `data` is the shared type and matches the database.
#[tokio::test]
async fn a_client_connecting_mid_run_sees_the_rest_and_the_close() {
    let f = Fixture::new().await;
    let worker = f.worker();
    let run = f.counting_run(&f.token, &[100, 1_000, 1_000]).await;
    f.wait_step(run.id, 0, "succeeded").await;
    assert_eq!(f.status(run.id).await, "running", "connected mid-run");

    let mut stream = Stream::connect(&f.client, &f.run_stream(run.id), &f.token, None).await;
    let messages = stream.rest().await;
    assert_eq!(
        f.status(run.id).await,
        "succeeded",
        "the stream closed at the end"
    );
    assert_eq!(
        names(&messages),
        [
            "run.created",
            "run.started",
            "step.started:0",
            "event",
            "step.finished:0",
            "step.started:1",
            "event",
            "step.finished:1",
            "step.started:2",
            "event",
            "step.finished:2",
            "run.succeeded",
        ]
    );
    for message in messages.iter().filter(|m| m.event == "step.finished") {
        let step: StepProgress = serde_json::from_value(message.data.clone()).expect("step");
        assert_eq!((step.status, step.attempt), (StepStatus::Succeeded, 1));
        assert!(step.finished_at.is_some_and(|at| at >= step.started_at));
        assert_eq!(step.kind, "count");
    }
    check_run_contract(&f, run.id, &messages).await;
    worker.stop().await;
}

/// A client that drops its connection every three messages and reconnects
/// with the last id it got receives exactly what an uninterrupted client
/// receives, through to the close: nothing missed, nothing repeated, while
/// a sidecar reports events for the run concurrently with the run's own
/// checkpoints. Every event the run holds is among them. A reconnect after
/// the end answers 204, and a reconnect from any id of the finished run
/// yields exactly the messages after it.
#[tokio::test]
async fn reconnecting_with_last_event_id_misses_nothing() {
    let f = Fixture::new().await;
    let worker = f.worker();
    let run = f.counting_run(&f.token, &[400, 400, 2_000]).await;
    let url = f.run_stream(run.id);
    let mut whole = Stream::connect(&f.client, &url, &f.token, None).await;

    // The sidecar reports small batches until step 1 has finished (step 2
    // takes two seconds more), so its last event commits well before the run
    // ends: every event the run holds then belongs in its stream.
    let sidecar = {
        let client = f.client.clone();
        let ingest = f.url("/v1/ingest/events");
        let token = f.ingest_token.clone();
        let pool = f.db.pool.clone();
        let id = run.id;
        tokio::spawn(async move {
            let mut sent = 0;
            loop {
                let step_1: String = sqlx::query_scalar(
                    "SELECT status::text FROM run_steps WHERE run_id = $1 AND position = 1",
                )
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("step 1");
                if step_1 == "succeeded" {
                    break;
                }
                let body = json!({ "run_id": id, "events": [
                    { "kind": "sidecar", "data": { "n": sent } },
                    { "kind": "sidecar", "data": { "n": sent + 1 } },
                ] });
                let response = client
                    .post(&ingest)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    .expect("send");
                // 409 until the run is claimed.
                if response.status() == StatusCode::OK {
                    sent += 2;
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            sent
        })
    };

    let mut pieces: Vec<Message> = Vec::new();
    let mut last: Option<String> = None;
    let mut reconnects = 0;
    loop {
        let response = sse::open(&f.client, &url, &f.token, last.as_deref()).await;
        // The last message taken was the run's end: nothing more comes.
        if response.status() == StatusCode::NO_CONTENT {
            break;
        }
        assert_eq!(response.status(), StatusCode::OK);
        let mut stream = Stream::of(response);
        let mut ended = false;
        for _ in 0..3 {
            match stream.next().await {
                Some(message) => {
                    last = Some(message.id.clone());
                    pieces.push(message);
                }
                None => {
                    ended = true;
                    break;
                }
            }
        }
        if ended {
            break;
        }
        reconnects += 1;
        assert!(reconnects < 10_000, "the stream ends");
    }
    let sent = sidecar.await.expect("sidecar");
    let uninterrupted = whole.rest().await;
    assert!(sent > 0, "the sidecar reported events while the run ran");
    assert_eq!(f.status(run.id).await, "succeeded");

    check_run_contract(&f, run.id, &uninterrupted).await;
    check_run_contract(&f, run.id, &pieces).await;
    let identities =
        |messages: &[Message]| -> Vec<String> { messages.iter().map(identity).collect() };
    let mut in_pieces = identities(&pieces);
    let mut in_whole = identities(&uninterrupted);
    let distinct: BTreeSet<&String> = in_pieces.iter().collect();
    assert_eq!(distinct.len(), in_pieces.len(), "nothing repeated");
    in_pieces.sort();
    in_whole.sort();
    assert_eq!(in_pieces, in_whole, "nothing missed");
    let ingested = f
        .events(run.id)
        .await
        .iter()
        .filter(|e| e.kind == "sidecar")
        .count();
    assert_eq!(
        ingested, sent as usize,
        "every ingested event is in the run"
    );

    // At the end: nothing more, and EventSource is told not to come back.
    let end = last.expect("messages were sent");
    let response = sse::open(&f.client, &url, &f.token, Some(&end)).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    // A replay of the finished run holds the same; resumed from any of its
    // ids, it yields exactly the messages after that one.
    let replay = Stream::connect(&f.client, &url, &f.token, None)
        .await
        .rest()
        .await;
    let mut in_replay = identities(&replay);
    in_replay.sort();
    assert_eq!(in_replay, in_whole);
    for cut in [0, 3, replay.len() / 2, replay.len() - 2] {
        let id = &replay[cut].id;
        let rest = Stream::connect(&f.client, &url, &f.token, Some(id))
            .await
            .rest()
            .await;
        assert_eq!(rest, replay[cut + 1..], "resuming after message {cut}");
    }
    worker.stop().await;
}

/// A run that fails once and is retried streams both attempts: each
/// attempt's `run.started` and the first unfinished step starting under it,
/// the retry, and the end; state changes and events match the database.
#[tokio::test]
async fn a_retried_run_streams_both_attempts() {
    let f = Fixture::new().await;
    let run = f
        .create(
            &f.token,
            json!({ "steps": [
                { "name": "a", "kind": "count", "input": {} },
                { "name": "b", "kind": "fail_once", "input": {} },
                { "name": "c", "kind": "count", "input": {} },
            ] }),
        )
        .await;
    let mut stream = Stream::connect(&f.client, &f.run_stream(run.id), &f.token, None).await;
    let worker = f.worker();
    let messages = stream.rest().await;
    let states: Vec<String> = names(&messages)
        .into_iter()
        .filter(|n| n.starts_with("run."))
        .collect();
    assert_eq!(
        states,
        [
            "run.created",
            "run.started",
            "run.retrying",
            "run.started",
            "run.succeeded"
        ]
    );
    let steps: Vec<(String, i32, i32)> = messages
        .iter()
        .filter(|m| m.event.starts_with("step."))
        .map(|m| {
            let step: StepProgress = serde_json::from_value(m.data.clone()).expect("step");
            (m.event.clone(), step.position, step.attempt)
        })
        .collect();
    // Attempt 2 resumes at step 1 (step 0 is checkpointed).
    let second: Vec<(String, i32, i32)> = steps.iter().filter(|s| s.2 == 2).cloned().collect();
    assert_eq!(
        second,
        [
            ("step.started".to_owned(), 1, 2),
            ("step.finished".to_owned(), 1, 2),
            ("step.started".to_owned(), 2, 2),
            ("step.finished".to_owned(), 2, 2),
        ]
    );
    assert_eq!(steps[0], ("step.started".to_owned(), 0, 1));
    check_run_contract(&f, run.id, &messages).await;
    worker.stop().await;
}

/// A tenant's stream carries every state change of its own runs, each
/// run's in order, and none of another tenant's, whose runs execute at the
/// same time; a client that drops the connection mid-way and resumes with
/// its last id misses and repeats nothing. Each `data` is the `RunEvent`
/// the outbox holds. Filters send only the types and queue asked for.
#[tokio::test]
async fn a_tenant_stream_carries_its_own_state_changes_and_resumes() {
    let f = Fixture::new().await;
    let url = f.tenant_stream("");
    let mut stream = Stream::connect(&f.client, &url, &f.token, None).await;
    let mut succeeded_only = Stream::connect(
        &f.client,
        &f.tenant_stream("?types=run.succeeded,run.failed&queue=emails"),
        &f.token,
        None,
    )
    .await;
    let mut other_stream = Stream::connect(&f.client, &url, &f.other_token, None).await;
    let worker = f.worker();
    let mut ours = Vec::new();
    for i in 0..6 {
        let queue = if i % 2 == 0 { "default" } else { "emails" };
        let body = json!({ "queue": queue, "steps": [
            { "name": "a", "kind": "count", "input": { "ms": 50 * i } },
            { "name": "b", "kind": "count", "input": {} },
        ] });
        ours.push(f.create(&f.token, body).await.id);
    }
    let mut theirs = Vec::new();
    for _ in 0..3 {
        let body = json!({ "steps": [{ "name": "a", "kind": "count", "input": {} }] });
        theirs.push(f.create(&f.other_token, body).await.id);
    }

    let mut messages = stream.take(5).await;
    drop(stream);
    let ours_set: BTreeSet<RunId> = ours.iter().copied().collect();
    let finished = |messages: &[Message]| {
        messages
            .iter()
            .filter(|m| m.event == "run.succeeded")
            .count()
    };
    let mut resumes = 0;
    while finished(&messages) < ours.len() {
        let last = messages.last().map(|m| m.id.clone());
        let mut resumed = Stream::connect(&f.client, &url, &f.token, last.as_deref()).await;
        messages.extend(resumed.take(4.min(3 * ours.len() - messages.len())).await);
        resumes += 1;
        assert!(resumes < 100, "every run's end arrives");
    }

    let mut seen_ids = BTreeSet::new();
    for message in &messages {
        let event: RunEvent = serde_json::from_value(message.data.clone())
            .unwrap_or_else(|e| panic!("{message:?} is no RunEvent: {e}"));
        assert_eq!(event.event_type.as_str(), message.event);
        assert!(
            ours_set.contains(&event.run.id),
            "only acme's runs: {message:?}"
        );
        assert!(seen_ids.insert(event.id.clone()), "{} repeated", event.id);
        let cursor: outbox::Cursor = message.id.parse().expect("the id is a cursor");
        assert_eq!(RunEvent::id_of(cursor.id), event.id);
    }
    let positions: Vec<outbox::Cursor> = messages
        .iter()
        .map(|m| m.id.parse().expect("cursor"))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "log order");
    for id in &ours {
        let streamed: Vec<RunEvent> = messages
            .iter()
            .filter_map(|m| serde_json::from_value::<RunEvent>(m.data.clone()).ok())
            .filter(|e| e.run.id == *id)
            .collect();
        assert_eq!(
            streamed,
            f.published(*id).await,
            "run {id}: every change, in order"
        );
    }

    // The filtered stream: acme's `emails` runs ending, nothing else.
    let emails: BTreeSet<RunId> = ours.iter().skip(1).step_by(2).copied().collect();
    let filtered = succeeded_only.take(emails.len()).await;
    let ended: BTreeSet<RunId> = filtered
        .iter()
        .map(|m| {
            assert_eq!(m.event, "run.succeeded");
            let event: RunEvent = serde_json::from_value(m.data.clone()).expect("RunEvent");
            assert_eq!(event.run.queue, "emails");
            event.run.id
        })
        .collect();
    assert_eq!(ended, emails);

    // globex's stream: its own runs only.
    let theirs_set: BTreeSet<RunId> = theirs.iter().copied().collect();
    let mut their_ends = BTreeSet::new();
    while their_ends.len() < theirs.len() {
        let message = other_stream
            .next()
            .await
            .expect("globex's stream stays open");
        let event: RunEvent = serde_json::from_value(message.data.clone()).expect("RunEvent");
        assert!(theirs_set.contains(&event.run.id), "only globex's runs");
        if message.event == "run.succeeded" {
            their_ends.insert(event.run.id);
        }
    }
    worker.stop().await;
}

/// A tenant can never stream another tenant's run: its id answers 404, as
/// an unknown one does, before any stream starts. A token without the
/// `runs` scope gets 403 on both streams, and a `Last-Event-ID` that is not
/// an id the stream sends gets 400; each as problem+json.
#[tokio::test]
async fn streams_refuse_other_tenants_wrong_scopes_and_bad_ids() {
    let f = Fixture::new().await;
    let run = f.counting_run(&f.token, &[0]).await;
    let admin = {
        let mut conn = f.db.pool.acquire().await.expect("connection");
        let tenant = f.db.tenant("acme").await;
        db::tokens::create(&mut conn, tenant, "admin", &[Scope::Admin], None)
            .await
            .expect("admin token")
            .plaintext
    };
    let expect = |response: reqwest::Response, status: StatusCode| async move {
        assert_eq!(response.status(), status);
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(content_type, "application/problem+json");
        let problem: Problem = response.json().await.expect("a problem document");
        assert_eq!(problem.status, status.as_u16());
        problem
    };
    let client = Client::new();
    let theirs = sse::open(&client, &f.run_stream(run.id), &f.other_token, None).await;
    expect(theirs, StatusCode::NOT_FOUND).await;
    let resumed = sse::open(
        &client,
        &f.run_stream(run.id),
        &f.other_token,
        Some("1.0.0.0"),
    )
    .await;
    expect(resumed, StatusCode::NOT_FOUND).await;
    let unknown = sse::open(&client, &f.run_stream(Uuid::now_v7()), &f.token, None).await;
    expect(unknown, StatusCode::NOT_FOUND).await;
    for url in [f.run_stream(run.id), f.tenant_stream("")] {
        let problem = expect(
            sse::open(&client, &url, &admin, None).await,
            StatusCode::FORBIDDEN,
        )
        .await;
        assert!(problem.detail.contains("'runs'"), "{}", problem.detail);
    }
    for (url, bad) in [
        (f.run_stream(run.id), "abc"),
        (f.run_stream(run.id), "1-2"),
        (f.tenant_stream(""), "1.0.0.0"),
        (f.tenant_stream(""), "x-1"),
    ] {
        let problem = expect(
            sse::open(&client, &url, &f.token, Some(bad)).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert!(
            problem.detail.contains("Last-Event-ID"),
            "{}",
            problem.detail
        );
    }
}

/// Streams outlive a database blip: every connection of the API's pool is
/// terminated twice while a run executes, and a run stream and a tenant
/// stream that were open carry on, after backing off, with nothing missed
/// or repeated.
#[tokio::test]
async fn streams_survive_a_database_blip() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let acme = token(&db, tenant).await;
    let (project, ingest_token) = ingest_project(&db, tenant).await;
    // The API gets a pool of its own, named, so its connections alone can
    // be cut.
    let options: PgConnectOptions = db.url.parse().expect("url");
    let api_pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options.application_name("runq-streams-blip"));
    let mut config = TestApi::config();
    config.step_kinds = vec!["count".to_owned(), "fail_once".to_owned()];
    let served = Served {
        api: TestApi::start(api_pool, config),
        client: Client::new(),
        token: acme,
        db,
    };
    let f = Fixture {
        served,
        other_token: String::new(),
        project,
        ingest_token,
        executions: Executions::default(),
    };
    let mut tenant_stream = Stream::connect(&f.client, &f.tenant_stream(""), &f.token, None).await;
    let run = f.counting_run(&f.token, &[300, 800, 800]).await;
    let mut stream = Stream::connect(&f.client, &f.run_stream(run.id), &f.token, None).await;
    let worker = f.worker();
    let cut = || async {
        let cut: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = 'runq-streams-blip'",
        )
        .fetch_one(&f.db.pool)
        .await
        .expect("terminate");
        cut
    };
    let mut messages = stream.take(3).await;
    assert!(cut().await > 0, "the API's connections were cut");
    messages.extend(stream.take(3).await);
    cut().await;
    messages.extend(stream.rest().await);
    assert_eq!(f.status(run.id).await, "succeeded");
    check_run_contract(&f, run.id, &messages).await;
    let replay = Stream::connect(&f.client, &f.run_stream(run.id), &f.token, None)
        .await
        .rest()
        .await;
    assert_eq!(
        messages.iter().map(identity).collect::<Vec<_>>(),
        replay.iter().map(identity).collect::<Vec<_>>(),
        "the interrupted stream and a replay agree"
    );

    let mut changes = Vec::new();
    while changes.last().map(|m: &Message| m.event.as_str()) != Some("run.succeeded") {
        changes.push(
            tenant_stream
                .next()
                .await
                .expect("the tenant stream stays open"),
        );
    }
    let streamed: Vec<RunEvent> = changes
        .iter()
        .map(|m| serde_json::from_value(m.data.clone()).expect("RunEvent"))
        .collect();
    assert_eq!(streamed, f.published(run.id).await);
    worker.stop().await;
}

/// Each tenant may hold `max_streams_per_tenant` streams open on a process;
/// one more gets 429 with `Retry-After` while other tenants are unaffected,
/// and a client that leaves frees its slot: the server drops its stream,
/// and the stream's permit with it, once a keep-alive write finds the
/// connection closed (it has no earlier signal; here within two seconds).
#[tokio::test]
async fn a_client_that_leaves_frees_its_stream_slot() {
    let mut config = TestApi::config();
    config.max_streams_per_tenant = 2;
    config.stream_keep_alive_seconds = 1;
    let f = Fixture::with(config).await;
    let run = f.counting_run(&f.token, &[0]).await;
    let first = raw_stream(&f.api.base, "/v1/events/stream", &f.token).await;
    let _second = Stream::connect(&f.client, &f.run_stream(run.id), &f.token, None).await;
    let refused = sse::open(&f.client, &f.tenant_stream(""), &f.token, None).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    let problem: Problem = refused.json().await.expect("problem");
    assert!(
        problem.detail.contains("RUNQ_MAX_STREAMS_PER_TENANT"),
        "{}",
        problem.detail
    );
    let _theirs = Stream::connect(&f.client, &f.tenant_stream(""), &f.other_token, None).await;

    drop(first);
    let reopened = wait_for_value("the slot of the closed stream to free", LIMIT, || async {
        let response = sse::open(&f.client, &f.tenant_stream(""), &f.token, None).await;
        (response.status() == StatusCode::OK).then_some(response)
    })
    .await;
    drop(reopened);
}

/// A graceful shutdown of the API ends its open streams (which never end by
/// themselves) instead of waiting for them: the server stops, and clients
/// see their streams close.
#[tokio::test]
async fn api_shutdown_ends_open_streams() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let acme = token(&db, tenant).await;
    let run = db
        .enqueue(tenant, vec![crate::support::echo_run(json!({}))])
        .await[0]
        .id;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let stop = CancellationToken::new();
    let server = tokio::spawn({
        let pool = db.pool.clone();
        let shutdown = stop.clone().cancelled_owned();
        async move { runq_api::serve_on(listener, pool, &TestApi::config(), shutdown).await }
    });
    let client = Client::new();
    let mut tenant_stream =
        Stream::connect(&client, &format!("{base}/v1/events/stream"), &acme, None).await;
    // No worker: the run stays pending and its stream open.
    let mut run_stream = Stream::connect(
        &client,
        &format!("{base}/v1/runs/{run}/events/stream"),
        &acme,
        None,
    )
    .await;
    assert_eq!(run_stream.take(1).await[0].event, "run.created");

    stop.cancel();
    let stopped = tokio::time::timeout(LIMIT, server)
        .await
        .expect("the server stops despite open streams");
    stopped.expect("server task").expect("serve");
    // Each ends (`rest` returns); the tenant's may first carry the run's
    // creation, if it committed as the stream started.
    assert_eq!(run_stream.rest().await, []);
    let creation = tenant_stream.rest().await;
    assert!(creation.len() <= 1, "{creation:?}");
}

/// Opens `path` with a hand-written HTTP/1.1 request on a socket of its own
/// and returns the socket once the answer's head says 200: dropping it
/// closes the connection at once, as a browser closing a tab does (reqwest
/// keeps a dropped response's connection open until it next reads on it).
async fn raw_stream(base: &str, path: &str, token: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\n\
         Accept: text/event-stream\r\n\r\n"
    );
    socket
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buffer = [0u8; 1024];
        let read = tokio::time::timeout(LIMIT, socket.read(&mut buffer))
            .await
            .expect("the answer's head arrives")
            .expect("read");
        assert!(read > 0, "the server answered");
        head.extend_from_slice(&buffer[..read]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    socket
}
