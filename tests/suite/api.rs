//! The REST API over real HTTP: every endpoint's happy path, and the ugly
//! inputs, each answered with a problem+json 4xx that changes nothing.

use reqwest::{Client, Response, StatusCode};
use runq_shared::{CreatedRuns, EventPage, Problem, Run, RunDetail, RunPage, RunStatus};
use serde_json::{json, Value};

use crate::support::{token, TestApi, TestDb};

struct Fixture {
    db: TestDb,
    api: TestApi,
    client: Client,
    token: String,
    other_token: String,
}

impl Fixture {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let tenant = db.tenant("acme").await;
        let other = db.tenant("globex").await;
        let token = token(&db, tenant).await;
        let other_token = token_for(&db, other).await;
        let api = TestApi::start(db.pool.clone(), TestApi::config());
        Fixture {
            db,
            api,
            client: Client::new(),
            token,
            other_token,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api.base)
    }

    async fn post(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .expect("send")
    }

    async fn get(&self, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("send")
    }

    async fn runs_in_db(&self) -> i64 {
        self.db.scalar("SELECT count(*) FROM runs").await
    }
}

async fn token_for(db: &TestDb, tenant: uuid::Uuid) -> String {
    token(db, tenant).await
}

fn run_body() -> Value {
    json!({ "steps": [{ "name": "hello", "kind": "echo", "input": { "greeting": "hi" } }] })
}

/// Asserts `response` is a problem+json document with `status`, and returns it.
async fn problem(response: Response, status: StatusCode) -> Problem {
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
    assert!(problem.problem_type.starts_with("urn:runq:problem:"));
    assert!(!problem.detail.is_empty());
    assert_client_words(&problem.detail);
    problem
}

/// `detail` names fields and parameters as the client wrote them, never by
/// poem-openapi's internal names (`list_NewStep`, `integer_int16`, `param0`)
/// or Rust's types.
fn assert_client_words(detail: &str) {
    for internal in [
        "list_",
        "integer_",
        "string_",
        "optional_",
        "param0",
        "i16",
        "i32",
        "i64",
        "u32",
        "struct ",
        "parse request payload",
    ] {
        assert!(
            !detail.contains(internal),
            "detail '{detail}' leaks the internal name '{internal}'"
        );
    }
}

/// Submit, fetch, list, read events, cancel and retry, through HTTP.
#[tokio::test]
async fn run_endpoints_happy_path() {
    let f = Fixture::new().await;

    let response = f.post("/v1/runs", &json!({
        "queue": "emails", "priority": 3, "max_attempts": 5,
        "metadata": { "customer": "ünï 🚀" },
        "steps": [{ "name": "a", "kind": "echo", "input": { "x": 1 } },
                  { "name": "b", "kind": "http", "input": { "url": "http://127.0.0.1:9/x" } }]
    })).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let run: Run = response.json().await.expect("run");
    assert_eq!(
        (run.queue.as_str(), run.priority, run.max_attempts),
        ("emails", 3, 5)
    );
    assert_eq!(run.status, RunStatus::Pending);
    assert_eq!(run.metadata, json!({ "customer": "ünï 🚀" }));

    let detail: RunDetail = f
        .get(&format!("/v1/runs/{}", run.id))
        .await
        .json()
        .await
        .expect("detail");
    assert_eq!(detail.run.id, run.id);
    assert_eq!(detail.steps.len(), 2);
    assert_eq!(detail.steps[1].kind, "http");

    let page: RunPage = f
        .get("/v1/runs?queue=emails&status=pending")
        .await
        .json()
        .await
        .expect("page");
    assert_eq!(
        page.runs.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![run.id]
    );
    let none: RunPage = f
        .get("/v1/runs?queue=other")
        .await
        .json()
        .await
        .expect("page");
    assert!(none.runs.is_empty());

    let events: EventPage = f
        .get(&format!("/v1/runs/{}/events", run.id))
        .await
        .json()
        .await
        .expect("events");
    assert!(events.events.is_empty());

    let response = f
        .post(&format!("/v1/runs/{}/cancel", run.id), &json!({}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let cancelled: Run = response.json().await.expect("run");
    assert_eq!(cancelled.status, RunStatus::Cancelled);

    let retried: Run = f
        .post(&format!("/v1/runs/{}/retry", run.id), &json!({}))
        .await
        .json()
        .await
        .expect("run");
    assert_eq!((retried.status, retried.attempt), (RunStatus::Pending, 0));
    let outbox: Vec<String> =
        sqlx::query_scalar("SELECT event_type FROM outbox WHERE run_id = $1 ORDER BY id")
            .bind(run.id)
            .fetch_all(&f.db.pool)
            .await
            .expect("outbox");
    assert_eq!(outbox, vec!["run.created", "run.cancelled", "run.requeued"]);
}

/// Cursor pagination walks every run once, newest first.
#[tokio::test]
async fn list_paginates_newest_first() {
    let f = Fixture::new().await;
    let mut created = Vec::new();
    for _ in 0..7 {
        let run: Run = f
            .post("/v1/runs", &run_body())
            .await
            .json()
            .await
            .expect("run");
        created.push(run.id);
    }
    let mut seen = Vec::new();
    let mut path = "/v1/runs?limit=3".to_owned();
    loop {
        let page: RunPage = f.get(&path).await.json().await.expect("page");
        seen.extend(page.runs.iter().map(|r| r.id));
        match page.next_cursor {
            Some(cursor) => path = format!("/v1/runs?limit=3&cursor={cursor}"),
            None => break,
        }
    }
    created.reverse();
    assert_eq!(seen, created);
}

/// The batch endpoint inserts all runs in one go, in order.
#[tokio::test]
async fn batch_creates_all_runs_in_order() {
    let f = Fixture::new().await;
    let runs: Vec<Value> = (0..250)
        .map(|i| json!({ "steps": [{ "name": "e", "kind": "echo", "input": { "i": i } }] }))
        .collect();

    let response = f.post("/v1/runs/batch", &json!({ "runs": runs })).await;

    assert_eq!(response.status(), StatusCode::CREATED);
    let created: CreatedRuns = response.json().await.expect("runs");
    assert_eq!(created.runs.len(), 250);
    let mut ids: Vec<_> = created.runs.iter().map(|r| r.id).collect();
    let in_order = ids.clone();
    ids.sort();
    assert_eq!(ids, in_order, "ids are time-ordered in request order");
    assert_eq!(f.runs_in_db().await, 250);
    let created_rows: i64 =
        f.db.scalar("SELECT count(*) FROM outbox WHERE event_type = 'run.created'")
            .await;
    assert_eq!(created_rows, 250);
}

/// A batch with one bad run, or too many runs, inserts nothing.
#[tokio::test]
async fn batch_with_a_bad_run_inserts_nothing() {
    let f = Fixture::new().await;
    let mut runs: Vec<Value> = (0..10).map(|_| run_body()).collect();
    runs[6] = json!({ "steps": [{ "name": "x", "kind": "nope" }] });
    let p = problem(
        f.post("/v1/runs/batch", &json!({ "runs": runs })).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(p.detail.contains("runs[6]"), "{}", p.detail);

    let too_many: Vec<Value> = (0..1001).map(|_| run_body()).collect();
    let p = problem(
        f.post("/v1/runs/batch", &json!({ "runs": too_many })).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(p.detail.contains("1001"), "{}", p.detail);
    problem(
        f.post("/v1/runs/batch", &json!({ "runs": [] })).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let mut runs: Vec<Value> = (0..5).map(|_| run_body()).collect();
    runs[3] = json!({ "steps": [] });
    let p = problem(
        f.post("/v1/runs/batch", &json!({ "runs": runs })).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(
        p.detail
            .starts_with("runs[3].steps must hold 1 to 64 steps"),
        "{}",
        p.detail
    );
    runs[3] = json!({ "steps": [{ "name": "x" }] });
    let p = problem(
        f.post("/v1/runs/batch", &json!({ "runs": runs })).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(p.detail, "runs[3].steps[0].kind is required");
    assert_eq!(f.runs_in_db().await, 0);
}

/// The same Idempotency-Key returns the same run (200); another tenant's
/// identical key makes its own run.
#[tokio::test]
async fn idempotent_create_returns_the_same_run() {
    let f = Fixture::new().await;
    let send = |token: String| {
        let client = f.client.clone();
        let url = f.url("/v1/runs");
        async move {
            client
                .post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", "order-42'; DROP TABLE runs; --")
                .json(&run_body())
                .send()
                .await
                .expect("send")
        }
    };
    let first = send(f.token.clone()).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Run = first.json().await.expect("run");
    let second = send(f.token.clone()).await;
    assert_eq!(second.status(), StatusCode::OK);
    let second: Run = second.json().await.expect("run");
    assert_eq!(second.id, first.id);
    assert_eq!(
        second.idempotency_key.as_deref(),
        Some("order-42'; DROP TABLE runs; --")
    );

    let other = send(f.other_token.clone()).await;
    assert_eq!(other.status(), StatusCode::CREATED);
    let other: Run = other.json().await.expect("run");
    assert_ne!(other.id, first.id);
    assert_eq!(f.runs_in_db().await, 2);
}

/// Concurrent requests with one key make one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_idempotent_creates_make_one_run() {
    let f = Fixture::new().await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let request = f
            .client
            .post(f.url("/v1/runs"))
            .bearer_auth(&f.token)
            .header("Idempotency-Key", "same")
            .json(&run_body());
        tasks.push(tokio::spawn(
            async move { request.send().await.expect("send") },
        ));
    }
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for task in tasks {
        let response = task.await.expect("task");
        if response.status() == StatusCode::CREATED {
            created += 1;
        }
        let run: Run = response.json().await.expect("run");
        ids.insert(run.id);
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
    assert_eq!(f.runs_in_db().await, 1);
}

/// Malformed, unknown, oversized and out-of-range bodies each get the right
/// 4xx problem, and nothing is inserted.
#[tokio::test]
async fn bad_run_bodies_get_problems_and_change_nothing() {
    let f = Fixture::new().await;
    let raw = |body: &'static str| {
        f.client
            .post(f.url("/v1/runs"))
            .bearer_auth(&f.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // Not JSON at all: 400.
    for (body, mentions) in [
        ("{\"steps\": [", "not JSON"),
        ("", "empty"),
        ("   ", "empty"),
        ("steps=1", "not JSON"),
        ("{\"steps\": []} trailing", "not JSON"),
        ("{\"priority\": \"x\", \"steps\": [", "not JSON"),
    ] {
        let p = problem(raw(body).await.expect("send"), StatusCode::BAD_REQUEST).await;
        assert!(
            p.detail.contains(mentions),
            "{body:?}: detail '{}' should mention '{mentions}'",
            p.detail
        );
    }
    let step = json!({ "name": "x", "kind": "echo" });
    // JSON that does not fit the schema, or values the server refuses: 422,
    // naming the field by its path in the body.
    let cases = [
        (
            json!([]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body must be an object, got an array",
        ),
        (
            json!(null),
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body must be an object, got null",
        ),
        (
            json!("x"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body must be an object",
        ),
        (
            json!({}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "steps is required",
        ),
        (
            json!({ "steps": [] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "steps must hold 1 to 64 steps, got 0",
        ),
        (
            json!({ "steps": (0..65).map(|i| json!({ "name": format!("s{i}"), "kind": "echo" })).collect::<Vec<_>>() }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "got 65",
        ),
        (
            json!({ "steps": [{ "name": "x" }] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "steps[0].kind is required",
        ),
        (
            json!({ "steps": [step, { "name": "x", "kind": 5 }] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "steps[1].kind must be a string",
        ),
        (
            json!({ "steps": [["x", "echo"]] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "steps[0] must be an object, got an array",
        ),
        (
            json!({ "steps": [{ "name": "x", "kind": "teleport" }] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "teleport",
        ),
        (
            json!({ "metadata": { "blob": "x".repeat(70_000) }, "steps": [step] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "more than 65536",
        ),
        (
            json!({ "queue": "", "steps": [step] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "queue",
        ),
        (
            json!({ "queue": "q".repeat(65), "steps": [step] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "64 characters",
        ),
        (
            json!({ "queue": "ü".repeat(65), "steps": [step] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "64 characters",
        ),
        (
            json!({ "queue": null, "steps": [step] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "queue must be a string of 1 to 64 characters, got null",
        ),
        (
            json!({ "max_attempts": 0, "steps": [step] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "max_attempts",
        ),
        (
            json!({ "max_attempts": 1e40, "steps": [step] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "max_attempts must be an integer from 1 to 100",
        ),
        (
            json!({ "metadata": [1, 2], "steps": [step] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "metadata",
        ),
        (
            json!({ "steps": [{ "name": "", "kind": "echo" }] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "name",
        ),
        (
            json!({ "priority": "high", "steps": [step] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "priority must be an integer from -32768 to 32767, got string \"high\"",
        ),
        (
            json!({ "priority": 99999, "steps": [step] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "priority must be an integer from -32768 to 32767, got integer 99999",
        ),
        (
            json!({ "priority": 18446744073709551615u64, "steps": [step] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "priority must be an integer from -32768 to 32767",
        ),
        (
            json!({ "run_at": "yesterday", "steps": [step] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "run_at must be an RFC 3339 date-time",
        ),
        (
            json!({ "project_id": "nope", "steps": [step] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "project_id must be a UUID",
        ),
        (
            json!({ "steps": "echo" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "steps must be an array of 1 to 64 items, got string \"echo\"",
        ),
        (
            json!({ "steps": [step], "colour": "red" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "colour is not a known field",
        ),
        (
            json!({ "steps": [{ "name": "x", "kind": "echo", "extra": 1 }] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "steps[0].extra is not a known field",
        ),
        (
            json!({ "project_id": uuid::Uuid::now_v7(), "steps": [step] }),
            StatusCode::NOT_FOUND,
            "project",
        ),
    ];
    for (body, status, mentions) in cases {
        let p = problem(f.post("/v1/runs", &body).await, status).await;
        assert!(
            p.detail.contains(mentions),
            "{body}: detail '{}' should mention '{mentions}'",
            p.detail
        );
    }
    let huge = format!(
        "{{\"steps\": [{{\"name\": \"x\", \"kind\": \"echo\", \"input\": \"{}\"}}]}}",
        "x".repeat(10 * 1024 * 1024)
    );
    let response = f
        .client
        .post(f.url("/v1/runs"))
        .bearer_auth(&f.token)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("send");
    problem(response, StatusCode::PAYLOAD_TOO_LARGE).await;
    let key = f
        .client
        .post(f.url("/v1/runs"))
        .bearer_auth(&f.token)
        .header("Idempotency-Key", "k".repeat(300))
        .json(&run_body())
        .send()
        .await
        .expect("send");
    problem(key, StatusCode::BAD_REQUEST).await;
    // A key poem cannot read as text must not be silently dropped.
    let unreadable = f
        .client
        .post(f.url("/v1/runs"))
        .bearer_auth(&f.token)
        .header(
            "Idempotency-Key",
            reqwest::header::HeaderValue::from_bytes("clé-ü".as_bytes()).expect("obs-text"),
        )
        .json(&run_body())
        .send()
        .await
        .expect("send");
    let p = problem(unreadable, StatusCode::BAD_REQUEST).await;
    assert_eq!(p.detail, "header Idempotency-Key must be printable ASCII");
    assert_eq!(f.runs_in_db().await, 0, "no bad body inserted anything");
}

/// Missing, malformed and unknown tokens get 401; a valid token of another
/// tenant sees 404 for runs it does not own, and cannot change them.
#[tokio::test]
async fn auth_is_required_and_tenants_are_isolated() {
    let f = Fixture::new().await;
    let run: Run = f
        .post("/v1/runs", &run_body())
        .await
        .json()
        .await
        .expect("run");

    let no_token = f
        .client
        .post(f.url("/v1/runs"))
        .json(&run_body())
        .send()
        .await
        .expect("send");
    problem(no_token, StatusCode::UNAUTHORIZED).await;
    let garbage = f
        .client
        .get(f.url("/v1/runs"))
        .header("authorization", "Bearer \u{1F680}x")
        .send()
        .await
        .expect("send");
    problem(garbage, StatusCode::UNAUTHORIZED).await;
    let unknown = f
        .client
        .get(f.url("/v1/runs"))
        .bearer_auth("runq_not_a_token")
        .send()
        .await
        .expect("send");
    problem(unknown, StatusCode::UNAUTHORIZED).await;
    let basic = f
        .client
        .get(f.url("/v1/runs"))
        .basic_auth("u", Some("p"))
        .send()
        .await
        .expect("send");
    problem(basic, StatusCode::UNAUTHORIZED).await;

    let foreign = |method: reqwest::Method, path: String| {
        f.client
            .request(method, f.url(&path))
            .bearer_auth(&f.other_token)
            .send()
    };
    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/runs/{}", run.id)),
        (reqwest::Method::GET, format!("/v1/runs/{}/events", run.id)),
        (reqwest::Method::POST, format!("/v1/runs/{}/cancel", run.id)),
        (reqwest::Method::POST, format!("/v1/runs/{}/retry", run.id)),
    ] {
        problem(
            foreign(method, path).await.expect("send"),
            StatusCode::NOT_FOUND,
        )
        .await;
    }
    let listed: RunPage = foreign(reqwest::Method::GET, "/v1/runs".into())
        .await
        .expect("send")
        .json()
        .await
        .expect("page");
    assert!(
        listed.runs.is_empty(),
        "another tenant's runs are invisible"
    );
    let status: String =
        f.db.scalar(&format!(
            "SELECT status::text FROM runs WHERE id = '{}'",
            run.id
        ))
        .await;
    assert_eq!(status, "pending", "the foreign cancel changed nothing");
}

/// Bad paths, ids, query values and state transitions get problems too.
#[tokio::test]
async fn bad_paths_queries_and_transitions_get_problems() {
    let f = Fixture::new().await;
    let run: Run = f
        .post("/v1/runs", &run_body())
        .await
        .json()
        .await
        .expect("run");

    // Each names the parameter as in the URL and what the spec expects.
    let bad_parameters = [
        (
            "/v1/runs/not-a-uuid".to_owned(),
            "path parameter id must be a UUID, got 'not-a-uuid'",
        ),
        (
            "/v1/runs/not%20a%20uuid/events".to_owned(),
            "path parameter id must be a UUID, got 'not a uuid'",
        ),
        (
            "/v1/runs?status=exploded".to_owned(),
            "query parameter status must be one of 'pending', 'running', 'succeeded', \
             'failed', 'stopped_quota', 'cancelled', got 'exploded'",
        ),
        (
            "/v1/runs?limit=abc".to_owned(),
            "query parameter limit must be an integer from 1 to 500, got 'abc'",
        ),
        (
            "/v1/runs?limit=0".to_owned(),
            "query parameter limit must be an integer from 1 to 500, got '0'",
        ),
        (
            "/v1/runs?limit=100000".to_owned(),
            "query parameter limit must be an integer from 1 to 500, got '100000'",
        ),
        (
            "/v1/runs?cursor=x".to_owned(),
            "query parameter cursor must be a UUID, got 'x'",
        ),
        (
            format!("/v1/runs/{}/events?after=%C3%BC", run.id),
            "query parameter after must be an integer, got 'ü'",
        ),
    ];
    for (path, detail) in bad_parameters {
        let p = problem(f.get(&path).await, StatusCode::BAD_REQUEST).await;
        assert_eq!(p.detail, detail, "{path}");
    }
    let p = problem(
        f.post("/v1/runs/x/cancel", &json!({})).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(p.detail, "path parameter id must be a UUID, got 'x'");
    problem(
        f.get(&format!("/v1/runs/{}", uuid::Uuid::now_v7())).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(f.get("/v1/nowhere").await, StatusCode::NOT_FOUND).await;
    let wrong_method = f
        .client
        .delete(f.url("/v1/runs"))
        .bearer_auth(&f.token)
        .send()
        .await
        .expect("send");
    // RFC 9110: a 405 lists the methods the path has.
    let allow = |response: &reqwest::Response| {
        response
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(allow(&wrong_method).as_deref(), Some("GET, POST"));
    problem(wrong_method, StatusCode::METHOD_NOT_ALLOWED).await;
    for (method, path, allowed) in [
        ("TRACE", "/health".to_owned(), "GET"),
        ("PUT", format!("/v1/runs/{}/cancel", run.id), "POST"),
        ("DELETE", format!("/v1/runs/{}", run.id), "GET"),
    ] {
        let response = f
            .client
            .request(method.parse().expect("method"), f.url(&path))
            .bearer_auth(&f.token)
            .send()
            .await
            .expect("send");
        assert_eq!(
            allow(&response).as_deref(),
            Some(allowed),
            "{method} {path}"
        );
        let p = problem(response, StatusCode::METHOD_NOT_ALLOWED).await;
        assert!(p.detail.contains(allowed), "{}", p.detail);
    }
    let p = problem(
        f.post(&format!("/v1/runs/{}/retry", run.id), &json!({}))
            .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(p.detail.contains("pending"), "{}", p.detail);
    f.db.execute(&format!(
        "UPDATE runs SET status = 'succeeded' WHERE id = '{}'",
        run.id
    ))
    .await;
    problem(
        f.post(&format!("/v1/runs/{}/cancel", run.id), &json!({}))
            .await,
        StatusCode::CONFLICT,
    )
    .await;
}

/// Health, readiness, the spec and the offline docs page.
#[tokio::test]
async fn health_ready_spec_and_docs_are_served() {
    let f = Fixture::new().await;
    assert_eq!(
        f.client
            .get(f.url("/health"))
            .send()
            .await
            .expect("send")
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        f.client
            .get(f.url("/ready"))
            .send()
            .await
            .expect("send")
            .status(),
        StatusCode::OK
    );
    let spec: Value = f
        .client
        .get(f.url("/openapi.json"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("spec");
    // The committed document, with `kind` narrowed to this deployment's kinds.
    let mut committed: Value = serde_json::from_str(&runq_api::spec()).expect("spec parses");
    committed["components"]["schemas"]["NewStep"]["properties"]["kind"]["enum"] =
        json!(["http", "sleep", "echo", "fail", "double"]);
    assert_eq!(spec, committed);
    let docs = f.client.get(f.url("/docs")).send().await.expect("send");
    assert_eq!(docs.status(), StatusCode::OK);
    let html = docs.text().await.expect("html");
    assert!(html.contains("swagger"), "docs page is the swagger UI");
    assert!(
        !html.contains("cdn") && !html.contains("unpkg"),
        "docs load nothing from a CDN"
    );

    f.db.execute("DELETE FROM _sqlx_migrations").await;
    assert_eq!(
        f.client
            .get(f.url("/ready"))
            .send()
            .await
            .expect("send")
            .status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready while migrations are missing"
    );
}

/// The dead-letter list and the bulk retry: `?status=failed` lists failed
/// runs; `POST /v1/runs/retry` revives a filtered set, oldest first, and only
/// the caller's.
#[tokio::test]
async fn dead_letters_are_listed_and_revived_in_bulk() {
    let f = Fixture::new().await;
    let mut ids = Vec::new();
    for queue in ["a", "a", "a", "b"] {
        let body = json!({ "queue": queue, "steps": [{ "name": "x", "kind": "echo" }] });
        let run: Run = f.post("/v1/runs", &body).await.json().await.expect("run");
        ids.push(run.id);
    }
    let foreign: Run = f
        .client
        .post(f.url("/v1/runs"))
        .bearer_auth(&f.other_token)
        .json(&json!({ "queue": "a", "steps": [{ "name": "x", "kind": "echo" }] }))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("run");
    f.db.execute("UPDATE runs SET status = 'failed', attempt = 3, finished_at = now()")
        .await;

    let dead: RunPage = f
        .get("/v1/runs?status=failed")
        .await
        .json()
        .await
        .expect("page");
    assert_eq!(dead.runs.len(), 4, "only this tenant's dead letters");

    let response = f
        .post("/v1/runs/retry", &json!({ "queue": "a", "limit": 2 }))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let retried: runq_shared::RetriedRuns = response.json().await.expect("retried");
    assert_eq!(
        retried.ids,
        ids[..2].to_vec(),
        "oldest first, at most limit"
    );
    let again: runq_shared::RetriedRuns = f
        .post("/v1/runs/retry", &json!({}))
        .await
        .json()
        .await
        .expect("retried");
    assert_eq!(
        again.ids,
        vec![ids[2], ids[3]],
        "the rest of this tenant's failed runs"
    );
    let still: String =
        f.db.scalar(&format!(
            "SELECT status::text FROM runs WHERE id = '{}'",
            foreign.id
        ))
        .await;
    assert_eq!(still, "failed", "another tenant's run is untouched");
    let requeued: i64 =
        f.db.scalar("SELECT count(*) FROM outbox WHERE event_type = 'run.requeued'")
            .await;
    assert_eq!(requeued, 4);
    problem(
        f.post("/v1/runs/retry", &json!({ "status": "running" }))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    problem(
        f.post("/v1/runs/retry", &json!({ "limit": 0 })).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
}

/// With every pooled connection taken, a request waits at most the pool's
/// acquire timeout, then gets a 503 problem with Retry-After, and inserts
/// nothing; once a connection is free again the same request succeeds.
#[tokio::test]
async fn exhausted_pool_answers_503_quickly_and_inserts_nothing() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let token = token(&db, tenant).await;
    let pool =
        runq_shared::db::pool(&db.url, 1, std::time::Duration::from_millis(300)).expect("pool");
    let api = TestApi::start(pool.clone(), TestApi::config());
    let client = Client::new();
    let create = || {
        client
            .post(format!("{}/v1/runs", api.base))
            .bearer_auth(&token)
            .json(&run_body())
            .send()
    };

    let held = pool.acquire().await.expect("the only connection");
    let asked = std::time::Instant::now();
    let response = create().await.expect("send");
    let waited = asked.elapsed();
    assert!(
        response.headers().contains_key("retry-after"),
        "503 carries Retry-After"
    );
    problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(
        waited < std::time::Duration::from_secs(3),
        "answered after {waited:?}, not held until a connection frees up"
    );
    let runs: i64 = db.scalar("SELECT count(*) FROM runs").await;
    assert_eq!(runs, 0, "the refused request inserted nothing");

    drop(held);
    let response = create().await.expect("send");
    assert_eq!(response.status(), StatusCode::CREATED);
    let runs: i64 = db.scalar("SELECT count(*) FROM runs").await;
    assert_eq!(runs, 1);
}

/// One request a bound is probed with.
enum Probe {
    Post(&'static str, Value),
    Get(String),
    Keyed(String),
}

/// Every bound the spec states on a request is the server's: a value at each
/// bound is accepted and one step past it is refused (422 in a body, 400 in
/// a parameter), so what a generated client checks before sending is exactly
/// what the server checks.
#[tokio::test]
async fn spec_bounds_are_the_server_bounds() {
    let f = Fixture::new().await;
    let long_kind = "k".repeat(runq_shared::MAX_NAME_LEN);
    let mut config = TestApi::config();
    // Kinds at both length bounds are registered, so only length can refuse.
    config.step_kinds.extend(["k".to_owned(), long_kind]);
    let api = TestApi::start(f.db.pool.clone(), config);
    let run: Run = f
        .post("/v1/runs", &run_body())
        .await
        .json()
        .await
        .expect("run");
    let spec: Value = serde_json::from_str(&runq_api::spec()).expect("spec parses");
    let schema =
        |name: &str, field: &str| spec["components"]["schemas"][name]["properties"][field].clone();
    let parameter = |path: &str, method: &str, name: &str| {
        spec["paths"][path][method]["parameters"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .map(|p| p["schema"].clone())
            .unwrap_or_else(|| panic!("{method} {path} has a parameter {name}"))
    };
    let step = json!({ "name": "x", "kind": "echo" });
    let run_with = |field: &'static str| {
        let step = step.clone();
        move |value: Value| {
            let mut body = json!({ "steps": [step.clone()] });
            body[field] = value;
            Probe::Post("/v1/runs", body)
        }
    };
    let step_with = |field: &'static str| {
        let step = step.clone();
        move |value: Value| {
            let mut step = step.clone();
            step[field] = value;
            Probe::Post("/v1/runs", json!({ "steps": [step] }))
        }
    };
    let text = |n: i64| json!("q".repeat(usize::try_from(n).unwrap_or(0)));
    let kinds = |n: i64| json!("k".repeat(usize::try_from(n).unwrap_or(0)));
    let many = |item: Value, n: i64| json!(vec![item; usize::try_from(n).unwrap_or(0)]);
    type Make<'a> = Box<dyn Fn(i64) -> Probe + 'a>;
    let cases: Vec<(&str, Value, Make<'_>)> = vec![
        (
            "priority",
            schema("CreateRun", "priority"),
            Box::new(move |n| run_with("priority")(json!(n))),
        ),
        (
            "max_attempts",
            schema("CreateRun", "max_attempts"),
            Box::new(move |n| run_with("max_attempts")(json!(n))),
        ),
        (
            "timeout_seconds",
            schema("CreateRun", "timeout_seconds"),
            Box::new(move |n| run_with("timeout_seconds")(json!(n))),
        ),
        (
            "queue",
            schema("CreateRun", "queue"),
            Box::new(move |n| run_with("queue")(text(n))),
        ),
        ("steps", schema("CreateRun", "steps"), {
            let step = step.clone();
            Box::new(move |n| Probe::Post("/v1/runs", json!({ "steps": many(step.clone(), n) })))
        }),
        (
            "steps[0].name",
            schema("NewStep", "name"),
            Box::new(move |n| step_with("name")(text(n))),
        ),
        (
            "steps[0].kind",
            schema("NewStep", "kind"),
            Box::new(move |n| step_with("kind")(kinds(n))),
        ),
        (
            "steps[0].timeout_seconds",
            schema("NewStep", "timeout_seconds"),
            Box::new(move |n| step_with("timeout_seconds")(json!(n))),
        ),
        (
            "runs",
            schema("CreateRuns", "runs"),
            Box::new(move |n| {
                Probe::Post("/v1/runs/batch", json!({ "runs": many(run_body(), n) }))
            }),
        ),
        (
            "limit",
            schema("RetryRuns", "limit"),
            Box::new(|n| Probe::Post("/v1/runs/retry", json!({ "limit": n }))),
        ),
        (
            "?limit",
            parameter("/v1/runs", "get", "limit"),
            Box::new(|n| Probe::Get(format!("/v1/runs?limit={n}"))),
        ),
        (
            "events ?limit",
            parameter("/v1/runs/{id}/events", "get", "limit"),
            {
                let id = run.id;
                Box::new(move |n| Probe::Get(format!("/v1/runs/{id}/events?limit={n}")))
            },
        ),
        (
            "Idempotency-Key",
            parameter("/v1/runs", "post", "Idempotency-Key"),
            Box::new(|n| Probe::Keyed("i".repeat(usize::try_from(n).unwrap_or(0)))),
        ),
    ];
    let client = Client::new();
    for (what, schema, make) in cases {
        let number = |key: &str| schema[key].as_f64().map(|v| v as i64);
        let (low, high) = match schema["type"].as_str() {
            Some("integer") => (number("minimum"), number("maximum")),
            Some("string") => (number("minLength"), number("maxLength")),
            Some("array") => (number("minItems"), number("maxItems")),
            other => panic!("{what}: unexpected type {other:?}"),
        };
        assert!(
            low.is_some() || high.is_some(),
            "{what}: the spec states no bound"
        );
        let mut probes = Vec::new();
        if let Some(low) = low {
            probes.extend([(low, true), (low - 1, false)]);
        }
        if let Some(high) = high {
            probes.extend([(high, true), (high + 1, false)]);
        }
        for (value, accepted) in probes {
            let request = match make(value) {
                Probe::Post(path, body) => client.post(format!("{}{path}", api.base)).json(&body),
                Probe::Get(path) => client.get(format!("{}{path}", api.base)),
                Probe::Keyed(key) => client
                    .post(format!("{}/v1/runs", api.base))
                    .header("Idempotency-Key", key)
                    .json(&run_body()),
            };
            let response = request.bearer_auth(&f.token).send().await.expect("send");
            let status = response.status();
            if accepted {
                assert!(
                    status.is_success(),
                    "{what} = {value} is within the spec and refused: {status} {}",
                    response.text().await.unwrap_or_default()
                );
            } else {
                let expected =
                    if what.starts_with('?') || what.contains(" ?") || what == "Idempotency-Key" {
                        StatusCode::BAD_REQUEST
                    } else {
                        StatusCode::UNPROCESSABLE_ENTITY
                    };
                let p = problem(response, expected).await;
                let field = what.trim_start_matches("events ").trim_start_matches('?');
                assert!(
                    p.detail.contains(field),
                    "{what} = {value}: detail '{}' names the field",
                    p.detail
                );
            }
        }
    }
}
