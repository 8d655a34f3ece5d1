//! Runs through the API: create, read, list, batch, idempotency and dead letters.

use super::*;

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
    let outbox = outbox_types(&f.db, run.id).await;
    assert_eq!(outbox, vec!["run.created", "run.cancelled", "run.requeued"]);
}

/// Cursor pagination walks every run once, newest first.
#[tokio::test]
async fn list_paginates_newest_first() {
    let f = Fixture::new().await;
    let mut created = Vec::new();
    for _ in 0..7 {
        let run: Run = f.create_run().await;
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
