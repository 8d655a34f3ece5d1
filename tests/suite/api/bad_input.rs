//! Ugly bodies, paths, queries and transitions: each a problem+json 4xx that changes nothing.

use super::*;

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

/// Bad paths, ids, query values and state transitions get problems too.
#[tokio::test]
async fn bad_paths_queries_and_transitions_get_problems() {
    let f = Fixture::new().await;
    let run: Run = f.create_run().await;

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

/// Sequence keys: unicode and SQL metacharacters are kept verbatim; an
/// empty, over-long or control-character key is a 422 naming the field, and
/// a batch holding one inserts nothing.
#[tokio::test]
async fn sequence_keys_ugly_but_valid_are_kept_bad_ones_refused() {
    let f = Fixture::new().await;
    for key in [
        "'; DROP TABLE runs; --",
        "ключ/🔑",
        "a\u{00a0}b",
        &"k".repeat(255),
    ] {
        let mut body = run_body();
        body["sequence_key"] = json!(key);
        let response = f.post("/v1/runs", &body).await;
        assert_eq!(response.status(), StatusCode::CREATED, "key {key:?}");
        let run: Run = response.json().await.expect("run");
        assert_eq!(run.sequence_key.as_deref(), Some(key));
        assert!(run.sequence_waiting, "a keyed run starts out waiting");
    }
    let before = f.runs_in_db().await;
    for key in [
        String::new(),
        "k".repeat(256),
        "tab\there".to_owned(),
        "nul\0".to_owned(),
    ] {
        let mut body = run_body();
        body["sequence_key"] = json!(key);
        let p = problem(
            f.post("/v1/runs", &body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert!(p.detail.contains("sequence_key"), "{key:?}: {}", p.detail);
        let mut runs: Vec<Value> = (0..5).map(|_| run_body()).collect();
        runs[2]["sequence_key"] = json!(key);
        let p = problem(
            f.post("/v1/runs/batch", &json!({ "runs": runs })).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert!(p.detail.contains("runs[2]"), "{key:?}: {}", p.detail);
    }
    assert_eq!(f.runs_in_db().await, before, "nothing was inserted");
}
