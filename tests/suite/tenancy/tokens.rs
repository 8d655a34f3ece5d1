//! Scoped tokens: scopes, revocation, uniform 401s, digests only.

use super::*;

/// Scopes: a token without the scope an endpoint needs gets 403 with a
/// problem document naming that scope, for each scope; with it, 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_the_needed_scope_gets_403_naming_it() {
    let (db, api, acme) = acme_with_api().await;
    let shop = project(&db, acme, "shop", "dev").await;
    let (admin, _) = token_with(&db, acme, &[Scope::Admin], None).await;
    let (runs, _) = token_with(&db, acme, &[Scope::Runs], None).await;
    let (ingest, _) = token_with(&db, acme, &[Scope::Ingest], Some(shop.id)).await;
    let run_body = json!({ "steps": [{ "name": "a", "kind": "echo", "input": {} }] });
    let refused: Vec<(&str, Method, &str, Option<Value>, &str)> = vec![
        (
            &admin,
            Method::POST,
            "/v1/runs",
            Some(run_body.clone()),
            "runs",
        ),
        (&admin, Method::GET, "/v1/runs", None, "runs"),
        (&runs, Method::GET, "/v1/tokens", None, "admin"),
        (&runs, Method::GET, "/v1/projects", None, "admin"),
        (&runs, Method::GET, "/v1/audit", None, "admin"),
        (
            &runs,
            Method::POST,
            "/v1/tokens",
            Some(json!({ "name": "x", "scopes": ["admin"] })),
            "admin",
        ),
        (&ingest, Method::GET, "/v1/runs", None, "runs"),
        (&ingest, Method::GET, "/v1/projects", None, "admin"),
    ];
    for (token, method, path, body, scope) in refused {
        let (status, problem) = call(&api, token, method.clone(), path, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {problem}");
        let problem: Problem = serde_json::from_value(problem).expect("a problem document");
        assert!(
            problem.detail.contains(&format!("scope '{scope}'")),
            "{method} {path}: {}",
            problem.detail
        );
    }
    for (token, path) in [(&admin, "/v1/tokens"), (&runs, "/v1/runs")] {
        let (status, _) = call(&api, token, Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    let (status, _) = call(&api, &runs, Method::POST, "/v1/runs", Some(run_body)).await;
    assert_eq!(status, StatusCode::CREATED);
}

/// Revocation takes effect on the next request: a token issued through the
/// API works, is revoked by an admin token and is refused at once with the
/// same 401 as a token that never existed; a token may revoke itself. Both
/// issue and revocation are in the audit log, naming the acting token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_fails_on_its_next_request() {
    let (db, api, acme) = acme_with_api().await;
    let (admin, admin_id) = token_with(&db, acme, &[Scope::Admin, Scope::Runs], None).await;
    let (status, created) = call(
        &api,
        &admin,
        Method::POST,
        "/v1/tokens",
        Some(json!({ "name": "ci", "scopes": ["runs"] })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let issued = created["token"].as_str().expect("plaintext").to_owned();
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["scopes"], json!(["runs"]));
    let (status, _) = call(&api, &issued, Method::GET, "/v1/runs", None).await;
    assert_eq!(status, StatusCode::OK);

    let (status, _) = call(
        &api,
        &admin,
        Method::DELETE,
        &format!("/v1/tokens/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, revoked) = call(&api, &issued, Method::GET, "/v1/runs", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (_, unknown) = call(&api, "runq_neverissued", Method::GET, "/v1/runs", None).await;
    assert_eq!(
        revoked, unknown,
        "a revoked and an unknown token answer alike"
    );

    let (status, listed) = call(&api, &admin, Method::GET, "/v1/tokens", None).await;
    assert_eq!(status, StatusCode::OK);
    let entry = listed["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .find(|token| token["id"] == json!(id))
        .expect("the revoked token is listed")
        .clone();
    assert!(entry["revoked_at"].is_string(), "{entry}");
    assert!(
        entry["last_used_at"].is_string(),
        "its use is recorded: {entry}"
    );
    assert!(
        !listed.to_string().contains(&issued),
        "the list shows a token"
    );

    // An ingest token must name a project of the tenant, and only it may.
    let shop = project(&db, acme, "shop", "dev").await;
    for (body, expected) in [
        (
            json!({ "name": "i", "scopes": ["ingest"] }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({ "name": "i", "scopes": ["runs"], "project_id": shop.id }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({ "name": "i", "scopes": [] }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({ "name": "i", "scopes": ["root"] }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({ "name": "i", "scopes": ["ingest"], "project_id": Uuid::now_v7() }),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({ "name": "i", "scopes": ["ingest"], "project_id": shop.id }),
            StatusCode::CREATED,
        ),
    ] {
        let (status, answer) =
            call(&api, &admin, Method::POST, "/v1/tokens", Some(body.clone())).await;
        assert_eq!(status, expected, "{body}: {answer}");
    }
    let ingest: (Uuid, Option<Uuid>) =
        sqlx::query_as("SELECT id, project_id FROM api_tokens WHERE 'ingest' = ANY (scopes)")
            .fetch_one(&db.pool)
            .await
            .expect("the ingest token");
    assert_eq!(ingest.1, Some(shop.id));

    // Revoking one's own token is allowed; the very next request fails.
    let (status, _) = call(
        &api,
        &admin,
        Method::DELETE,
        &format!("/v1/tokens/{admin_id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(&api, &admin, Method::GET, "/v1/tokens", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let audit: Vec<(String, String, Option<Uuid>)> = sqlx::query_as(
        "SELECT action, target, actor_token_id FROM audit_log WHERE tenant_id = $1 ORDER BY id",
    )
    .bind(acme)
    .fetch_all(&db.pool)
    .await
    .expect("audit");
    assert_eq!(
        audit,
        [
            (
                "token.create".to_owned(),
                format!("token:{id}"),
                Some(admin_id)
            ),
            (
                "token.revoke".to_owned(),
                format!("token:{id}"),
                Some(admin_id)
            ),
            (
                "token.create".to_owned(),
                format!("token:{}", ingest.0),
                Some(admin_id)
            ),
            (
                "token.revoke".to_owned(),
                format!("token:{admin_id}"),
                Some(admin_id)
            ),
        ]
    );
}

/// Median of `samples`.
fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// Timing does not reveal whether a token exists: a wrong token, a revoked
/// one and a malformed one get the same 401 (status, headers that matter,
/// body), and the median times of 50 requests each are within a factor of
/// three of each other (a loose bound: the point is that no path skips the
/// lookup, which would show as an order of magnitude).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_and_revoked_tokens_answer_the_same_401_in_comparable_time() {
    let (db, api, acme) = acme_with_api().await;
    let (revoked, revoked_id) = token_with(&db, acme, &[Scope::Runs], None).await;
    let mut conn = db.pool.acquire().await.expect("connection");
    db::tokens::revoke(&mut conn, Some(acme), revoked_id)
        .await
        .expect("revoke");
    drop(conn);
    let wrong = format!("runq_{}", "x".repeat(40));
    let malformed = "not a runq token at all".to_owned();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/runs", api.base);
    let mut answers = Vec::new();
    let mut times: [Vec<Duration>; 3] = Default::default();
    for round in 0..50 {
        for (which, token) in [&wrong, &revoked, &malformed].into_iter().enumerate() {
            let started = Instant::now();
            let response = client
                .get(&url)
                .bearer_auth(token)
                .send()
                .await
                .expect("request");
            let status = response.status();
            let headers = (
                response.headers().get("content-type").cloned(),
                response.headers().get("www-authenticate").cloned(),
            );
            let body = response.bytes().await.expect("body");
            times[which].push(started.elapsed());
            if round == 0 {
                answers.push((status, headers, body));
            }
        }
    }
    assert_eq!(answers[0].0, StatusCode::UNAUTHORIZED);
    assert_eq!(answers[0], answers[1], "wrong and revoked tokens differ");
    assert_eq!(answers[0], answers[2], "wrong and malformed tokens differ");
    let medians: Vec<Duration> = times.into_iter().map(median).collect();
    let fastest = *medians.iter().min().expect("three");
    let slowest = *medians.iter().max().expect("three");
    assert!(
        slowest < fastest * 3 + Duration::from_millis(2),
        "medians (wrong, revoked, malformed) differ too much: {medians:?}"
    );
}

/// Runs `runq <args>` against `database` as operator `alice`, for at most
/// 30 s: exit status, stdout, stderr.
async fn operator(database: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_runq"))
            .args(args)
            .env("DATABASE_URL", database)
            .env("USER", "alice")
            .env("RUST_LOG", "debug")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("runq {args:?} did not finish within 30 s"))
    .expect("run runq");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Admin bootstrap and token secrecy: `runq tenant create` and `runq token
/// create/revoke` work straight against the database and are audited as the
/// operator; a token is shown once (the CLI's stdout, the API's 201) and is
/// never written to a `runq api` process's debug log, never listed, and
/// stored only as its 32-byte SHA-256 digest (no column of any row holds
/// it). The CLI's revocation is refused by the API on the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_bootstrap_and_tokens_exist_only_as_digests() {
    let db = TestDb::new().await;
    let (code, tenant_id, _) = operator(
        &db.url,
        &["tenant", "create", "acme", "--plan", "unlimited"],
    )
    .await;
    assert_eq!(code, Some(0));
    let tenant: Uuid = tenant_id.trim().parse().expect("the tenant's id");
    let plan: String = sqlx::query_scalar("SELECT plan FROM tenant_quotas WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(&db.pool)
        .await
        .expect("plan");
    assert_eq!(plan, "unlimited");
    let (code, _, stderr) = operator(
        &db.url,
        &["token", "create", "--tenant", "nope", "--scope", "runs"],
    )
    .await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("runq tenant create nope"), "{stderr}");
    let (code, stdout, cli_log) = operator(
        &db.url,
        &[
            "token",
            "create",
            "--tenant",
            "acme",
            "--scope",
            "admin,runs",
            "--name",
            "boot",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{cli_log}");
    let boot = stdout.trim().to_owned();
    assert!(boot.starts_with("runq_"), "{stdout}");

    // A `runq api` process of its own, so its whole log can be read.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let log_path = std::env::temp_dir().join(format!("runq-tenancy-{}.log", Uuid::now_v7()));
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut api = tokio::process::Command::new(env!("CARGO_BIN_EXE_runq"))
        .arg("api")
        .env("DATABASE_URL", &db.url)
        .env("RUNQ_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUNQ_NO_MIGRATE", "1")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("runq api");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_for(
        "runq api to answer",
        Duration::from_secs(20),
        &mut || async { client.get(format!("{base}/health")).send().await.is_ok() },
    )
    .await;
    let created: Value = client
        .post(format!("{base}/v1/tokens"))
        .bearer_auth(&boot)
        .json(&json!({ "name": "ci", "scopes": ["runs"] }))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("created token");
    let issued = created["token"].as_str().expect("plaintext").to_owned();
    let issued_id = created["id"].as_str().expect("id").to_owned();
    let get = |token: &str| {
        client
            .get(format!("{base}/v1/runs"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(get(&issued).await.expect("get").status(), StatusCode::OK);
    let listed = client
        .get(format!("{base}/v1/tokens"))
        .bearer_auth(&boot)
        .send()
        .await
        .expect("list")
        .text()
        .await
        .expect("list body");
    assert!(listed.contains(&issued_id), "{listed}");
    let (code, revoked, _) = operator(&db.url, &["token", "revoke", &issued_id]).await;
    assert_eq!(code, Some(0), "{revoked}");
    assert_eq!(
        get(&issued).await.expect("get").status(),
        StatusCode::UNAUTHORIZED
    );
    api.start_kill().expect("stop runq api");
    api.wait().await.expect("runq api exits");
    let api_log = std::fs::read_to_string(&log_path).expect("the API's log");
    let _ = std::fs::remove_file(&log_path);
    assert!(
        api_log.contains("api listening"),
        "the log was captured: {api_log}"
    );

    for secret in [&boot, &issued] {
        assert!(!api_log.contains(secret.as_str()), "the API logged a token");
        assert!(!cli_log.contains(secret.as_str()), "the CLI logged a token");
        assert!(
            !listed.contains(secret.as_str()),
            "GET /v1/tokens shows a token"
        );
        let (digest, anywhere): (Vec<u8>, i64) = sqlx::query_as(
            "SELECT (SELECT token_hash FROM api_tokens WHERE token_hash = sha256($1::bytea)),
                    (SELECT count(*) FROM api_tokens t WHERE strpos(t::text, $2) > 0)
                  + (SELECT count(*) FROM audit_log a WHERE strpos(a::text, $2) > 0)",
        )
        .bind(secret.as_bytes())
        .bind(secret.as_str())
        .fetch_one(&db.pool)
        .await
        .expect("the token's row, by digest");
        assert_eq!(digest.len(), 32);
        assert_eq!(anywhere, 0, "a row holds the plaintext");
    }
    let audit: Vec<(String, String, Option<Uuid>)> = sqlx::query_as(
        "SELECT action, actor, actor_token_id FROM audit_log WHERE tenant_id = $1 ORDER BY id",
    )
    .bind(tenant)
    .fetch_all(&db.pool)
    .await
    .expect("audit");
    let boot_id: Uuid = sqlx::query_scalar("SELECT id FROM api_tokens WHERE name = 'boot'")
        .fetch_one(&db.pool)
        .await
        .expect("boot token");
    assert_eq!(
        audit,
        [
            (
                "tenant.create".to_owned(),
                "operator:alice".to_owned(),
                None
            ),
            // `--plan unlimited` is a quota change.
            ("quota.update".to_owned(), "operator:alice".to_owned(), None),
            ("token.create".to_owned(), "operator:alice".to_owned(), None),
            (
                "token.create".to_owned(),
                format!("token:{boot_id}"),
                Some(boot_id)
            ),
            ("token.revoke".to_owned(), "operator:alice".to_owned(), None),
        ]
    );
}
