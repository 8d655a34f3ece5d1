//! `GET /v1/runs/{id}/events` over real HTTP, on events real steps recorded:
//! what each event says, in which order, page by page, and to whom.

use std::time::Duration;

use reqwest::{Client, StatusCode};
use runq_shared::{Event, EventPage, Problem, Run};
use runq_worker::Worker;
use serde_json::json;

use crate::support::handlers::{Count, Executions, FailOnce};
use crate::support::target::Target;
use crate::support::{status_and_attempt, token, worker_config, RunningWorker, TestApi, TestDb};

/// A run of `http` → `fail_once` → `count` records an `http.response` event
/// on attempt 1 (step 0, checkpointed before the failure) and a `log` event
/// on attempt 2 (step 2, after the retry resumed at step 1). The events
/// endpoint returns them oldest first with their kind, position, attempt and
/// data; `limit=1` pages through them with `next_cursor` as `after`, ending
/// on an empty page without a cursor; another tenant gets 404.
#[tokio::test]
async fn run_events_are_listed_in_order_page_by_page() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let other = db.tenant("globex").await;
    let token = token(&db, tenant).await;
    let other_token = crate::support::token(&db, other).await;
    let mut config = TestApi::config();
    config.step_kinds = vec!["count".to_owned(), "fail_once".to_owned()];
    let api = TestApi::start(db.pool.clone(), config);
    let target = Target::start();
    let executions = Executions::default();
    let worker = RunningWorker::start(
        Worker::new(db.new_pool(4), worker_config(2))
            .register(Count {
                executions: executions.clone(),
                worker: "w1".to_owned(),
            })
            .register(FailOnce {
                executions: executions.clone(),
            }),
    );
    let client = Client::new();
    let get = |path: String, token: &str| {
        client
            .get(format!("{}{path}", api.base))
            .bearer_auth(token)
            .send()
    };

    let response = client
        .post(format!("{}/v1/runs", api.base))
        .bearer_auth(&token)
        .json(&json!({ "steps": [
            { "name": "call", "kind": "http", "input": { "url": target.url } },
            { "name": "flaky", "kind": "fail_once", "input": {} },
            { "name": "count", "kind": "count", "input": { "n": 1 } },
        ] }))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::CREATED);
    let run: Run = response.json().await.expect("run");
    db.wait_all_terminal(Duration::from_secs(20)).await;
    worker.stop().await;
    let (status, attempt) = status_and_attempt(&db, run.id).await;
    assert_eq!((status.as_str(), attempt), ("succeeded", 2));

    let mut events: Vec<Event> = Vec::new();
    let mut pages = 0;
    let mut path = format!("/v1/runs/{}/events?limit=1", run.id);
    loop {
        let response = get(path.clone(), &token).await.expect("send");
        assert_eq!(response.status(), StatusCode::OK);
        let page: EventPage = response.json().await.expect("page");
        pages += 1;
        assert!(page.events.len() <= 1, "limit=1 returns one event at most");
        match page.next_cursor {
            Some(cursor) => {
                assert_eq!(
                    Some(cursor),
                    page.events.last().map(|e| e.id),
                    "the cursor is the page's last event"
                );
                events.extend(page.events);
                path = format!("/v1/runs/{}/events?limit=1&after={cursor}", run.id);
            }
            None => {
                events.extend(page.events);
                break;
            }
        }
        assert!(pages <= 10, "pagination ends");
    }

    let summary: Vec<(&str, Option<i32>, i32)> = events
        .iter()
        .map(|e| (e.kind.as_str(), e.position, e.attempt))
        .collect();
    assert_eq!(
        summary,
        vec![("http.response", Some(0), 1), ("log", Some(2), 2)],
        "kinds, positions and attempts, oldest first"
    );
    assert!(events[0].id < events[1].id, "ids increase");
    assert!(events[0].created_at <= events[1].created_at);
    assert_eq!(
        events[0].data,
        json!({ "url": target.url, "status": 200,
                "body": { "attempt": 1, "position": 0 } })
    );
    assert_eq!(events[1].data, json!({ "worker": "w1" }));
    assert_eq!(pages, 3, "two full pages, then an empty last page");

    let all: EventPage = get(format!("/v1/runs/{}/events", run.id), &token)
        .await
        .expect("send")
        .json()
        .await
        .expect("page");
    assert_eq!(all.events, events, "one page holds the same events");
    assert_eq!(all.next_cursor, None);

    for path in [
        format!("/v1/runs/{}/events", run.id),
        format!("/v1/runs/{}/events?limit=1&after=0", run.id),
    ] {
        let response = get(path, &other_token).await.expect("send");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let problem: Problem = response.json().await.expect("a problem document");
        assert_eq!(problem.status, 404, "another tenant's run is not found");
    }
}
