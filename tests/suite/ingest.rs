//! `POST /v1/ingest/events` over real HTTP: the per-token rate limit (counted
//! in events, sliding, shared by API processes through Postgres), its
//! headers, truncation of oversized data, and which runs take events.
//!
//! Time is moved by shifting the token's buckets in `ingest_usage` back,
//! never by sleeping.

use reqwest::{Client, Response, StatusCode};
use runq_shared::db;
use runq_shared::{EventPage, IngestedEvents, Problem, RunId};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::http::Served;
use crate::support::{echo_run, token, TestApi, TestDb};

/// `acme`'s API over HTTP (`Served` under `Deref`) called with an `ingest`
/// token of `acme`, bound to `project`.
struct Fixture {
    served: Served,
    token_id: Uuid,
    project: Uuid,
}

impl std::ops::Deref for Fixture {
    type Target = Served;

    fn deref(&self) -> &Served {
        &self.served
    }
}

impl Fixture {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let tenant = db.tenant("acme").await;
        let project = project(&db, tenant, "sidecars").await;
        let (token, token_id) = ingest_token(&db, tenant, project).await;
        Fixture {
            served: Served::start(db, token),
            token_id,
            project,
        }
    }

    /// A run of `acme`'s project claimed by a (fake) worker: `running`,
    /// attempt 1.
    async fn running_run(&self) -> RunId {
        let tenant = self.db.tenant("acme").await;
        running_run(&self.db, tenant, Some(self.project)).await
    }
}

/// A `dev` project of `tenant` named `name`.
async fn project(db: &TestDb, tenant: Uuid, name: &str) -> Uuid {
    let mut tx = db.pool.begin().await.expect("begin");
    let project = runq_shared::CreateProject {
        name: name.to_owned(),
        environment: runq_shared::Environment::Dev,
        target_url: None,
    };
    let created = db::projects::create(&mut tx, tenant, &project)
        .await
        .expect("project");
    tx.commit().await.expect("commit");
    created.id
}

/// An `ingest` token of `tenant` bound to `project`, and its id.
async fn ingest_token(db: &TestDb, tenant: Uuid, project: Uuid) -> (String, Uuid) {
    let mut conn = db.pool.acquire().await.expect("connection");
    let issued = db::tokens::create(
        &mut conn,
        tenant,
        "sidecar",
        &[runq_shared::Scope::Ingest],
        Some(project),
    )
    .await
    .expect("ingest token");
    (issued.plaintext, issued.token.id)
}

impl Fixture {
    async fn send(&self, body: &Value) -> Response {
        send(&self.client, &self.api.base, &self.token, body).await
    }
}

/// A run of `tenant` (in `project`), claimed under a lease by a worker id
/// nobody runs.
async fn running_run(db: &TestDb, tenant: Uuid, project: Option<Uuid>) -> RunId {
    let queue = format!("ingest-{}", Uuid::now_v7().simple());
    let mut run = echo_run(json!({}));
    run.queue = queue.clone();
    run.project_id = project;
    let id = db.enqueue(tenant, vec![run]).await[0].id;
    let mut conn = db.pool.acquire().await.expect("connection");
    let claimed = db::runs::claim(&mut conn, Uuid::now_v7(), &[queue], 1, 3_600_000)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    id
}

async fn send(client: &Client, base: &str, token: &str, body: &Value) -> Response {
    client
        .post(format!("{base}/v1/ingest/events"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("send")
}

/// A batch of `n` `log` events for `run`, each saying which batch and index
/// it is.
fn batch(run: RunId, label: u32, n: usize) -> Value {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({ "kind": "log", "data": { "batch": label, "i": i } }))
        .collect();
    json!({ "run_id": run, "events": events })
}

/// The rate-limit headers of `response`: limit, remaining, reset, and
/// `Retry-After` if sent.
fn rate(response: &Response) -> (u32, u32, u32, Option<u32>) {
    let header = |name: &str| {
        response.headers().get(name).map(|v| {
            v.to_str()
                .expect("ascii")
                .parse::<u32>()
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        })
    };
    (
        header("x-ratelimit-limit").expect("X-RateLimit-Limit"),
        header("x-ratelimit-remaining").expect("X-RateLimit-Remaining"),
        header("x-ratelimit-reset").expect("X-RateLimit-Reset"),
        header("retry-after"),
    )
}

async fn accepted(response: Response) -> IngestedEvents {
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("ingest answer")
}

async fn problem(response: Response, status: StatusCode) -> Problem {
    assert_eq!(response.status(), status);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    response.json().await.expect("problem document")
}

/// Moves the rate-limit window forward by `seconds`: every counted bucket
/// becomes that much older.
async fn age_buckets(db: &TestDb, seconds: i64) {
    db.execute(&format!(
        "UPDATE ingest_usage SET second = second - {seconds}"
    ))
    .await;
}

/// 350 events in a minute from one token (batches of 100, 100, 90, 60):
/// exactly 300 are stored. Each 200 carries the limit and what remains; the
/// batch that crosses the limit is stored up to it (10 of 60, `rejected` 50,
/// `Retry-After`); the next batch gets a 429 problem with the headers.
/// `X-RateLimit-Reset` and `Retry-After` count from the oldest bucket in the
/// window (aged 30 s: 27–30 s left). Another token has its own budget. After the window slides past the
/// buckets (aged 61 s more) the token is accepted again with a full budget,
/// and the expired buckets are deleted.
#[tokio::test]
async fn rate_limit_takes_exactly_300_events_a_minute_then_slides() {
    let f = Fixture::new().await;
    let run = f.running_run().await;

    for (label, size, remaining) in [(1, 100, 200), (2, 100, 100), (3, 90, 10)] {
        let response = f.send(&batch(run, label, size)).await;
        let (limit, left, reset, retry_after) = rate(&response);
        assert_eq!((limit, left, retry_after), (300, remaining, None));
        assert!((55..=60).contains(&reset), "reset {reset}");
        let answer = accepted(response).await;
        assert_eq!((answer.accepted, answer.rejected), (size as u32, 0));
    }

    age_buckets(&f.db, 30).await;
    let response = f.send(&batch(run, 4, 60)).await;
    let (limit, left, reset, retry_after) = rate(&response);
    assert_eq!((limit, left), (300, 0));
    assert!((27..=30).contains(&reset), "reset {reset}");
    assert_eq!(retry_after, Some(reset));
    let answer = accepted(response).await;
    assert_eq!((answer.accepted, answer.rejected), (10, 50));

    let response = f.send(&batch(run, 5, 1)).await;
    let (limit, left, reset, retry_after) = rate(&response);
    assert_eq!((limit, left), (300, 0));
    assert!((27..=30).contains(&reset), "reset {reset}");
    assert_eq!(retry_after, Some(reset));
    let refused = problem(response, StatusCode::TOO_MANY_REQUESTS).await;
    assert!(
        refused.detail.contains("300 events per minute"),
        "{}",
        refused.detail
    );
    // The limit is the token's: another token of the tenant has its own.
    let (other_token, _) = ingest_token(&f.db, f.db.tenant("acme").await, f.project).await;
    let elsewhere = f.running_run().await;
    let response = send(
        &f.client,
        &f.api.base,
        &other_token,
        &batch(elsewhere, 5, 1),
    )
    .await;
    assert_eq!(rate(&response).1, 299);
    accepted(response).await;

    let stored: i64 =
        f.db.scalar(&format!(
            "SELECT count(*) FROM run_events WHERE run_id = '{run}'"
        ))
        .await;
    assert_eq!(stored, 300);
    // The partial batch kept its first 10 events, in order.
    let last: Value =
        f.db.scalar(&format!(
            "SELECT data FROM run_events WHERE run_id = '{run}' ORDER BY id DESC LIMIT 1"
        ))
        .await;
    assert_eq!(last, json!({ "batch": 4, "i": 9 }));

    age_buckets(&f.db, 61).await;
    let response = f.send(&batch(run, 6, 50)).await;
    let (_, left, reset, retry_after) = rate(&response);
    assert_eq!((left, retry_after), (250, None));
    assert!((59..=60).contains(&reset), "reset {reset}");
    assert_eq!(accepted(response).await.accepted, 50);
    // The token's buckets that left the window went with its request (the
    // other token's stay until it sends again).
    let expired: i64 =
        f.db.scalar(&format!(
            "SELECT count(*) FROM ingest_usage
             WHERE token_key = uuid_send('{}'::uuid)
               AND second < extract(epoch FROM now()) - 60",
            f.token_id
        ))
        .await;
    assert_eq!(expired, 0, "buckets out of the window are deleted");
    let kept: i64 = f
        .db
        .scalar("SELECT count(*) FROM ingest_usage WHERE second < extract(epoch FROM now()) - 60")
        .await;
    assert_eq!(kept, 1, "the other token's bucket");
}

/// Two API servers, each with its own pool (two processes' worth), share
/// one token's limit. Twelve batches of 50 sent at once, six to each, store
/// exactly 300 events in total, and the window counts exactly 300. Then,
/// after the window slid past them, 250 events through one server leave the
/// other exactly 50 of a batch of 100.
#[tokio::test]
async fn two_api_processes_share_one_rate_limit() {
    let f = Fixture::new().await;
    let run = f.running_run().await;
    let second = TestApi::start(f.db.new_pool(8), TestApi::config());
    let first = TestApi::start(f.db.new_pool(8), TestApi::config());
    let bases = [first.base.clone(), second.base.clone()];

    let mut sent = Vec::new();
    for label in 0..12 {
        let client = f.client.clone();
        let base = bases[label as usize % 2].clone();
        let token = f.token.clone();
        let body = batch(run, label, 50);
        sent.push(tokio::spawn(async move {
            send(&client, &base, &token, &body).await
        }));
    }
    let mut total = 0;
    for response in sent {
        let response = response.await.expect("request task");
        let (limit, _, _, _) = rate(&response);
        assert_eq!(limit, 300);
        match response.status() {
            StatusCode::OK => total += accepted(response).await.accepted,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(total, 300);
    let stored: i64 =
        f.db.scalar(&format!(
            "SELECT count(*) FROM run_events WHERE run_id = '{run}'"
        ))
        .await;
    assert_eq!(stored, 300);
    let counted: i64 =
        f.db.scalar("SELECT sum(events)::bigint FROM ingest_usage")
            .await;
    assert_eq!(counted, 300);

    age_buckets(&f.db, 61).await;
    for size in [100, 100, 50] {
        let response = send(&f.client, &bases[0], &f.token, &batch(run, 20, size)).await;
        assert_eq!(accepted(response).await.accepted, size as u32);
    }
    let response = send(&f.client, &bases[1], &f.token, &batch(run, 21, 100)).await;
    assert_eq!(rate(&response).1, 0);
    let answer = accepted(response).await;
    assert_eq!((answer.accepted, answer.rejected), (50, 50));
}

/// An event whose data is 100 KB is stored truncated within 64 KB as
/// `{"truncated": true, "original_bytes": n, "data": "<start of the JSON
/// text>"}` and flagged in `run_events.truncated` and in the events API;
/// the small event of the same batch is stored as sent, unflagged, with its
/// `occurred_at`, under the run's attempt and no step position.
#[tokio::test]
async fn oversized_event_data_is_stored_truncated_to_64_kb_and_flagged() {
    let f = Fixture::new().await;
    let run = f.running_run().await;
    let big = json!({ "blob": "x".repeat(100 * 1024) });
    let original = big.to_string();
    let response = f
        .send(&json!({ "run_id": run, "events": [
            { "kind": "dump", "data": big },
            { "kind": "log", "data": { "line": "ok" }, "occurred_at": "2026-12-01T10:00:00Z" },
        ] }))
        .await;
    let answer = accepted(response).await;
    assert_eq!(
        (answer.accepted, answer.rejected, answer.truncated),
        (2, 0, 1)
    );

    let (truncated, stored_bytes, data): (bool, i32, Value) = sqlx::query_as(
        "SELECT truncated, octet_length(data::text), data FROM run_events
         WHERE run_id = $1 AND kind = 'dump'",
    )
    .bind(run)
    .fetch_one(&f.db.pool)
    .await
    .expect("the dump event");
    assert!(truncated);
    assert!(
        (64 * 1024 - 200..=64 * 1024).contains(&stored_bytes),
        "{stored_bytes} bytes stored"
    );
    assert_eq!(data["truncated"], json!(true));
    assert_eq!(data["original_bytes"], json!(original.len()));
    let prefix = data["data"].as_str().expect("the prefix is a string");
    assert!(original.starts_with(prefix));

    // Reading a run's events takes the `runs` scope.
    let reader = token(&f.db, f.db.tenant("acme").await).await;
    let page: EventPage = f
        .client
        .get(format!("{}/v1/runs/{run}/events", f.api.base))
        .bearer_auth(&reader)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("events");
    assert_eq!(page.events.len(), 2);
    let (dump, log) = (&page.events[0], &page.events[1]);
    assert_eq!((dump.kind.as_str(), dump.truncated), ("dump", true));
    assert_eq!((log.kind.as_str(), log.truncated), ("log", false));
    assert_eq!(log.data, json!({ "line": "ok" }));
    assert_eq!(
        log.occurred_at.map(|t| t.to_rfc3339()),
        Some("2026-12-01T10:00:00+00:00".to_owned())
    );
    assert_eq!((log.attempt, log.position), (1, None));
}

/// Events land only on a running run of the caller's tenant, or within 60 s
/// after its attempt ended: a pending run and one finished 61 s ago get a
/// 409 saying why; one finished 10 s ago, and one whose attempt failed 5 s
/// ago and waits for its retry, take them; another tenant's run
/// and an unknown id get 404. A NUL in data, 101 events and a 256-byte kind
/// get 422 naming the field. None of the refused batches costs budget.
#[tokio::test]
async fn ingest_refuses_closed_foreign_and_bad_batches() {
    let f = Fixture::new().await;
    let acme = f.db.tenant("acme").await;
    let globex = f.db.tenant("globex").await;

    let mut in_project = echo_run(json!({}));
    in_project.project_id = Some(f.project);
    let pending = f.db.enqueue(acme, vec![in_project]).await[0].id;
    let closed = problem(f.send(&batch(pending, 0, 1)).await, StatusCode::CONFLICT).await;
    assert!(closed.detail.contains("is pending"), "{}", closed.detail);

    let finished = f.running_run().await;
    let finish = |id: RunId, ago: &str| {
        format!(
            "UPDATE runs SET status = 'succeeded', locked_by = NULL, lease_expires_at = NULL,
                 finished_at = now() - interval '{ago}' WHERE id = '{id}'"
        )
    };
    f.db.execute(&finish(finished, "10 seconds")).await;
    let answer = accepted(f.send(&batch(finished, 1, 2)).await).await;
    assert_eq!(answer.accepted, 2);
    f.db.execute(&finish(finished, "61 seconds")).await;
    let late = problem(f.send(&batch(finished, 2, 1)).await, StatusCode::CONFLICT).await;
    assert!(
        late.detail.contains("is succeeded") && late.detail.contains("61 s ago"),
        "{}",
        late.detail
    );
    assert!(late.detail.contains("60 s"), "{}", late.detail);
    // A run whose attempt 1 failed 5 s ago and waits for its retry still
    // takes events, under attempt 1.
    let retrying = f.running_run().await;
    f.db.execute(&format!(
        "UPDATE runs SET status = 'pending', locked_by = NULL, lease_expires_at = NULL,
             run_at = now() + interval '1 hour',
             errors = jsonb_build_array(jsonb_build_object(
                 'attempt', 1, 'at', now() - interval '5 seconds', 'reason', 'step_failed',
                 'message', 'boom'))
         WHERE id = '{retrying}'"
    ))
    .await;
    assert_eq!(
        accepted(f.send(&batch(retrying, 8, 1)).await)
            .await
            .accepted,
        1
    );
    let attempt: i32 =
        f.db.scalar(&format!(
            "SELECT attempt FROM run_events WHERE run_id = '{retrying}'"
        ))
        .await;
    assert_eq!(attempt, 1);

    let foreign = running_run(&f.db, globex, None).await;
    problem(f.send(&batch(foreign, 3, 1)).await, StatusCode::NOT_FOUND).await;
    problem(
        f.send(&batch(Uuid::now_v7(), 3, 1)).await,
        StatusCode::NOT_FOUND,
    )
    .await;

    let run = f.running_run().await;
    let mut nul = batch(run, 4, 5);
    nul["events"][3]["data"] = json!({ "x": "a\u{0}b" });
    let refused = problem(f.send(&nul).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(
        refused
            .detail
            .starts_with("events[3].data.x contains \\u0000"),
        "{}",
        refused.detail
    );
    let too_many = problem(
        f.send(&batch(run, 5, 101)).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(too_many.detail.contains("events"), "{}", too_many.detail);
    let mut long_kind = batch(run, 6, 1);
    long_kind["events"][0]["kind"] = json!("k".repeat(256));
    let refused = problem(f.send(&long_kind).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(
        refused.detail.starts_with("events[0].kind"),
        "{}",
        refused.detail
    );

    // Only the three events on runs in their grace window were counted.
    let response = f.send(&batch(run, 7, 1)).await;
    assert_eq!(rate(&response).1, 300 - 3 - 1);
    accepted(response).await;
    let events: i64 = f.db.scalar("SELECT count(*) FROM run_events").await;
    assert_eq!(events, 4);
}

/// Ingest takes an `ingest` token, and writes only to runs of the project
/// that token is bound to: a `runs`/`admin` token gets 403 naming the scope,
/// and a run of another project of the same tenant answers 404, like a run
/// of another tenant. Neither costs budget.
#[tokio::test]
async fn ingest_needs_an_ingest_token_bound_to_the_runs_project() {
    let f = Fixture::new().await;
    let acme = f.db.tenant("acme").await;
    let run = f.running_run().await;
    let runs_token = token(&f.db, acme).await;
    let refused = problem(
        send(&f.client, &f.api.base, &runs_token, &batch(run, 0, 1)).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert!(refused.detail.contains("ingest"), "{}", refused.detail);

    let other = project(&f.db, acme, "elsewhere").await;
    let elsewhere = running_run(&f.db, acme, Some(other)).await;
    problem(f.send(&batch(elsewhere, 1, 1)).await, StatusCode::NOT_FOUND).await;

    let response = f.send(&batch(run, 2, 1)).await;
    assert_eq!(rate(&response).1, 299, "only this batch was counted");
    accepted(response).await;
}
