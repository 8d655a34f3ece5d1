//! Authentication, the service endpoints (health, ready, spec, docs) and an exhausted pool.

use super::*;

/// Missing, malformed and unknown tokens get 401; a valid token of another
/// tenant sees 404 for runs it does not own, and cannot change them.
#[tokio::test]
async fn auth_is_required_and_tenants_are_isolated() {
    let f = Fixture::new().await;
    let run: Run = f.create_run().await;

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
