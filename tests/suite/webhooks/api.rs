//! The webhook API under bad input: every refusal is a problem document
//! and changes nothing.

use reqwest::StatusCode;
use runq_shared::Problem;
use serde_json::{json, Value};

use crate::support::http::Served;
use crate::support::{token, TestDb};

/// Malformed, oversized, hostile and out-of-spec bodies are refused with a
/// 4xx problem naming what to fix, and create nothing; SQL metacharacters
/// and unicode in free text are stored as sent; a token without the
/// `admin` scope is refused.
#[tokio::test]
async fn bad_webhook_bodies_get_problems_and_change_nothing() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let bearer = token(&db, tenant).await;
    let served = Served::start(db, bearer);
    let send = |body: String| {
        served
            .client
            .post(served.url("/v1/webhooks"))
            .bearer_auth(&served.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let url = "https://hooks.example.com/runq";
    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "an empty body",
            String::new(),
            StatusCode::BAD_REQUEST,
            "empty",
        ),
        (
            "not JSON",
            "{url:".to_owned(),
            StatusCode::BAD_REQUEST,
            "JSON",
        ),
        (
            "an empty url",
            json!({ "url": "" }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "url",
        ),
        (
            "a url over 2,048 bytes",
            json!({ "url": format!("https://a.example/{}", "x".repeat(2048)) }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "url",
        ),
        (
            "an ftp url",
            json!({ "url": "ftp://files.example/x" }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "url",
        ),
        (
            "a space in the host",
            json!({ "url": "http://exa mple.com/" }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "url",
        ),
        (
            "a port past 65535",
            json!({ "url": "http://example.com:70000/" }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "url",
        ),
        (
            "an unknown topic",
            json!({ "url": url, "topics": ["run.exploded"] }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "topics",
        ),
        (
            "a repeated topic",
            json!({ "url": url, "topics": ["run.failed", "run.failed"] }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "topics",
        ),
        (
            "NUL in the description",
            json!({ "url": url, "description": "a\u{0}b" }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "description",
        ),
        (
            "a description over 255 bytes",
            json!({ "url": url, "description": "d".repeat(256) }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "description",
        ),
        (
            "an unknown field",
            json!({ "url": url, "secret": "mine" }).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "secret",
        ),
    ];
    let mut wrong = Vec::new();
    for (what, body, status, names) in &cases {
        let reply = send(body.clone()).await.expect("send");
        let got = reply.status();
        let content_type = reply
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let problem: Option<Problem> = reply.json().await.ok();
        let named = problem.as_ref().is_some_and(|p| p.detail.contains(names));
        if got != *status || content_type != "application/problem+json" || !named {
            wrong.push(format!("{what}: {got} {content_type} {problem:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "refusals gone wrong:\n{}",
        wrong.join("\n")
    );
    let stored: i64 = served.db.scalar("SELECT count(*) FROM webhooks").await;
    assert_eq!(stored, 0, "a refused body created a subscription");

    // Free text is stored as sent.
    let hostile = "'; DROP TABLE webhooks; -- ünïcødé 🚀";
    let reply = send(json!({ "url": url, "description": hostile }).to_string())
        .await
        .expect("send");
    assert_eq!(reply.status(), StatusCode::CREATED);
    let created: Value = reply.json().await.expect("created");
    assert_eq!(created["webhook"]["description"], hostile);
    let id = created["webhook"]["id"].as_str().expect("id").to_owned();
    let read: Value = served
        .get(&format!("/v1/webhooks/{id}"))
        .await
        .json()
        .await
        .expect("read back");
    assert_eq!(read["description"], hostile);
    assert!(read.get("secret").is_none(), "the secret is shown once");

    // NUL in a project's name, which no type-specific check covers.
    let reply = served
        .post(
            "/v1/projects",
            &json!({ "name": "a\u{0}b", "environment": "dev" }),
        )
        .await;
    assert_eq!(reply.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // A `runs`-only token may not manage webhooks.
    let mut conn = served.db.pool.acquire().await.expect("connection");
    let runs_only = runq_shared::db::tokens::create(
        &mut conn,
        tenant,
        "runs",
        &[runq_shared::Scope::Runs],
        None,
    )
    .await
    .expect("token")
    .plaintext;
    let reply = served
        .client
        .post(served.url("/v1/webhooks"))
        .bearer_auth(runs_only)
        .json(&json!({ "url": url }))
        .send()
        .await
        .expect("send");
    assert_eq!(reply.status(), StatusCode::FORBIDDEN);
}
