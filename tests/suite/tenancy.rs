//! Tenants, scoped tokens, projects and the audit log (issue 8): a tenant
//! never reaches another tenant's rows, each token does what its scopes say
//! and nothing after its revocation, a token exists only as its digest, a
//! `prod` project refuses runs until three confirmations turn its override
//! on, and every such change lands in an append-only audit log.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use runq_shared::db;
use runq_shared::{Problem, Project, Scope, TenantId};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::{echo_run, token, wait_for, TestApi, TestDb};

/// A token of `tenant` with `scopes` (bound to `project` for ingest): its
/// plaintext and id.
async fn token_with(
    db: &TestDb,
    tenant: TenantId,
    scopes: &[Scope],
    project: Option<Uuid>,
) -> (String, Uuid) {
    let mut conn = db.pool.acquire().await.expect("connection");
    let issued = db::tokens::create(&mut conn, tenant, "test", scopes, project)
        .await
        .expect("token");
    (issued.plaintext, issued.token.id)
}

/// A project of `tenant`.
async fn project(db: &TestDb, tenant: TenantId, name: &str, environment: &str) -> Project {
    let mut conn = db.pool.acquire().await.expect("connection");
    let create = serde_json::from_value(json!({ "name": name, "environment": environment }))
        .expect("project body");
    db::projects::create(&mut conn, tenant, &create)
        .await
        .expect("project")
}

/// Sends `method path` with `body` (if any) as `token`; the status and the
/// body parsed as JSON (`null` when empty).
async fn call(
    api: &TestApi,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", api.base))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let bytes = response.bytes().await.expect("body");
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON body")
    };
    (status, value)
}

/// Every row of `tenant` in the tables a client can change, as one text:
/// equal before and after means nothing of the tenant changed.
async fn snapshot(db: &TestDb, tenant: TenantId) -> String {
    sqlx::query_scalar(
        "SELECT concat_ws('|',
            (SELECT string_agg(r::text, ',' ORDER BY r.id) FROM runs r WHERE tenant_id = $1),
            (SELECT string_agg(s::text, ',' ORDER BY s.run_id, s.position) FROM run_steps s
               JOIN runs r ON r.id = s.run_id WHERE r.tenant_id = $1),
            (SELECT string_agg(p::text, ',' ORDER BY p.id) FROM projects p WHERE tenant_id = $1),
            (SELECT string_agg(t::text, ',' ORDER BY t.id) FROM api_tokens t WHERE tenant_id = $1),
            (SELECT string_agg(a::text, ',' ORDER BY a.id) FROM audit_log a WHERE tenant_id = $1),
            (SELECT string_agg(o::text, ',' ORDER BY o.id) FROM outbox o WHERE tenant_id = $1))",
    )
    .bind(tenant)
    .fetch_one(&db.pool)
    .await
    .expect("snapshot")
}

fn all_confirmations() -> Value {
    json!({
        "not_customer_facing": true,
        "no_real_secrets": true,
        "accept_unsafe_agent_behavior": true,
    })
}

/// Tenant isolation: every endpoint that takes an id answers 404, as for an
/// id that never existed, when the id is another tenant's run, project or
/// token, and changes nothing of that tenant; lists show none of its rows,
/// and naming its project in a run or an ingest token is a 404 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_ids_answer_404_and_change_nothing() {
    let db = TestDb::new().await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let acme = db.tenant("acme").await;
    let globex = db.tenant("globex").await;
    let acme_project = project(&db, acme, "shop", "dev").await;
    let mut create = echo_run(json!({ "x": 1 }));
    create.project_id = Some(acme_project.id);
    let run = db.enqueue(acme, vec![create]).await.remove(0);
    let (_, acme_token) = token_with(&db, acme, &[Scope::Runs], None).await;
    let intruder = token(&db, globex).await;
    let before = snapshot(&db, acme).await;

    let run_id = run.id;
    let project_id = acme_project.id;
    let cases: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, format!("/v1/runs/{run_id}"), None),
        (Method::GET, format!("/v1/runs/{run_id}/events"), None),
        (Method::POST, format!("/v1/runs/{run_id}/cancel"), None),
        (Method::POST, format!("/v1/runs/{run_id}/retry"), None),
        (Method::GET, format!("/v1/projects/{project_id}"), None),
        (
            Method::PATCH,
            format!("/v1/projects/{project_id}"),
            Some(json!({ "name": "taken-over", "environment": "prod" })),
        ),
        (Method::DELETE, format!("/v1/projects/{project_id}"), None),
        (
            Method::POST,
            format!("/v1/projects/{project_id}/production-override"),
            Some(all_confirmations()),
        ),
        (
            Method::DELETE,
            format!("/v1/projects/{project_id}/production-override"),
            None,
        ),
        (Method::DELETE, format!("/v1/tokens/{acme_token}"), None),
        (
            Method::POST,
            "/v1/runs".to_owned(),
            Some(json!({ "project_id": project_id,
                         "steps": [{ "name": "a", "kind": "echo", "input": {} }] })),
        ),
        (
            Method::POST,
            "/v1/tokens".to_owned(),
            Some(json!({ "name": "spy", "scopes": ["ingest"], "project_id": project_id })),
        ),
    ];
    for (method, path, body) in cases {
        let (status, problem) = call(&api, &intruder, method.clone(), &path, body).await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{method} {path} as another tenant: {problem}"
        );
        let problem: Problem = serde_json::from_value(problem).expect("a problem document");
        assert_eq!(problem.status, 404);
    }
    for path in ["/v1/runs", "/v1/projects", "/v1/tokens", "/v1/audit"] {
        let (status, page) = call(&api, &intruder, Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let text = page.to_string();
        for id in [run_id, project_id, acme_token] {
            assert!(!text.contains(&id.to_string()), "{path} shows {id}: {text}");
        }
    }
    assert_eq!(snapshot(&db, acme).await, before, "acme's rows changed");
    let globex_rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM runs WHERE tenant_id = $1)
              + (SELECT count(*) FROM projects WHERE tenant_id = $1)
              + (SELECT count(*) FROM audit_log WHERE tenant_id = $1)",
    )
    .bind(globex)
    .fetch_one(&db.pool)
    .await
    .expect("count");
    assert_eq!(globex_rows, 0, "the intruder created rows of its own");
}

/// Scopes: a token without the scope an endpoint needs gets 403 with a
/// problem document naming that scope, for each scope; with it, 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_the_needed_scope_gets_403_naming_it() {
    let db = TestDb::new().await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let acme = db.tenant("acme").await;
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
    let db = TestDb::new().await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let acme = db.tenant("acme").await;
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
    let db = TestDb::new().await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let acme = db.tenant("acme").await;
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

/// The production safety gate: a run against a `prod` project is refused
/// with 403 saying why and how; two confirmations (or a `false` one) are a
/// 422 naming the missing ones and change nothing; all three turn the
/// override on, show who and when on the project, write the audit row with
/// the confirmations, and runs go through; turning it off is audited and
/// closes the gate again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prod_project_refuses_runs_until_three_confirmations_enable_it() {
    let db = TestDb::new().await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let acme = db.tenant("acme").await;
    let (admin, admin_id) = token_with(&db, acme, &[Scope::Admin, Scope::Runs], None).await;
    let (status, created) = call(
        &api,
        &admin,
        Method::POST,
        "/v1/projects",
        Some(json!({ "name": "shop", "environment": "prod", "target_url": "http://shop.test" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["production_override"], Value::Null);
    let run = json!({ "project_id": id, "steps": [{ "name": "a", "kind": "echo", "input": {} }] });
    let batch = json!({ "runs": [run.clone()] });

    let (status, problem) = call(&api, &admin, Method::POST, "/v1/runs", Some(run.clone())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{problem}");
    let detail = problem["detail"].as_str().expect("detail");
    assert!(
        detail.contains("prod") && detail.contains("production-override"),
        "the refusal says why and how: {detail}"
    );
    let (status, _) = call(
        &api,
        &admin,
        Method::POST,
        "/v1/runs/batch",
        Some(batch.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let path = format!("/v1/projects/{id}/production-override");
    for (body, missing) in [
        (
            json!({ "not_customer_facing": true, "no_real_secrets": true }),
            vec!["accept_unsafe_agent_behavior"],
        ),
        (
            json!({ "not_customer_facing": true, "no_real_secrets": false,
                    "accept_unsafe_agent_behavior": true }),
            vec!["no_real_secrets"],
        ),
        (
            json!({}),
            vec![
                "not_customer_facing",
                "no_real_secrets",
                "accept_unsafe_agent_behavior",
            ],
        ),
    ] {
        let (status, problem) = call(&api, &admin, Method::POST, &path, Some(body.clone())).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {problem}"
        );
        let detail = problem["detail"].as_str().expect("detail");
        for name in [
            "not_customer_facing",
            "no_real_secrets",
            "accept_unsafe_agent_behavior",
        ] {
            assert_eq!(
                detail.contains(name),
                missing.contains(&name),
                "{body}: {detail}"
            );
        }
    }
    let overrides: i64 = db
        .scalar("SELECT count(*) FROM audit_log WHERE action LIKE 'project.production_override%'")
        .await;
    assert_eq!(overrides, 0, "a refused confirmation wrote an audit row");
    let (status, _) = call(&api, &admin, Method::POST, "/v1/runs", Some(run.clone())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "the gate is still closed");

    let (status, enabled) =
        call(&api, &admin, Method::POST, &path, Some(all_confirmations())).await;
    assert_eq!(status, StatusCode::OK, "{enabled}");
    assert_eq!(
        enabled["production_override"]["enabled_by"],
        json!(admin_id)
    );
    assert!(enabled["production_override"]["enabled_at"].is_string());
    let (_, shown) = call(
        &api,
        &admin,
        Method::GET,
        &format!("/v1/projects/{id}"),
        None,
    )
    .await;
    assert_eq!(shown["production_override"], enabled["production_override"]);
    let (actor, details): (Option<Uuid>, Value) = sqlx::query_as(
        "SELECT actor_token_id, details FROM audit_log
         WHERE action = 'project.production_override.enable' AND target = $1",
    )
    .bind(format!("project:{id}"))
    .fetch_one(&db.pool)
    .await
    .expect("the enable is audited");
    assert_eq!(actor, Some(admin_id));
    assert_eq!(details["confirmations"], all_confirmations());

    let (status, accepted) = call(&api, &admin, Method::POST, "/v1/runs", Some(run.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{accepted}");
    let (status, _) = call(&api, &admin, Method::POST, "/v1/runs/batch", Some(batch)).await;
    assert_eq!(status, StatusCode::CREATED);

    let (status, disabled) = call(&api, &admin, Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(disabled["production_override"], Value::Null);
    let disables: i64 = db
        .scalar(
            "SELECT count(*) FROM audit_log WHERE action = 'project.production_override.disable'",
        )
        .await;
    assert_eq!(disables, 1);
    let (status, _) = call(&api, &admin, Method::POST, "/v1/runs", Some(run)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "disabling closes the gate");
}

/// Projects CRUD: create, list, get, patch (a taken name is a 409; a new
/// environment turns the override off), delete (audited; the project's runs
/// keep their rows without it). The audit log lists newest first, pages with
/// a cursor and filters by action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_crud_and_the_audit_log_listing() {
    let db = TestDb::new().await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let acme = db.tenant("acme").await;
    let admin = token(&db, acme).await;
    let mut ids = Vec::new();
    for name in ["one", "two"] {
        let (status, created) = call(
            &api,
            &admin,
            Method::POST,
            "/v1/projects",
            Some(json!({ "name": name, "environment": "staging" })),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        ids.push(created["id"].as_str().expect("id").to_owned());
    }
    let (status, _) = call(
        &api,
        &admin,
        Method::POST,
        "/v1/projects",
        Some(json!({ "name": "one", "environment": "dev" })),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "a taken name");
    let (status, _) = call(
        &api,
        &admin,
        Method::POST,
        "/v1/projects",
        Some(json!({ "name": "x", "environment": "moon" })),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "an unknown environment"
    );
    let (_, listed) = call(&api, &admin, Method::GET, "/v1/projects", None).await;
    assert_eq!(listed["projects"].as_array().map(Vec::len), Some(2));

    let one = format!("/v1/projects/{}", ids[0]);
    let (_, _) = call(
        &api,
        &admin,
        Method::POST,
        &format!("{one}/production-override"),
        Some(all_confirmations()),
    )
    .await;
    let (status, patched) = call(
        &api,
        &admin,
        Method::PATCH,
        &one,
        Some(json!({ "environment": "prod", "target_url": "http://one.test" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["environment"], "prod");
    assert_eq!(patched["name"], "one");
    assert_eq!(patched["target_url"], "http://one.test");
    assert_eq!(
        patched["production_override"],
        Value::Null,
        "confirmed for staging only"
    );
    let (status, _) = call(
        &api,
        &admin,
        Method::PATCH,
        &one,
        Some(json!({ "name": "two" })),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);

    let two: Uuid = ids[1].parse().expect("uuid");
    let mut create = echo_run(json!({}));
    create.project_id = Some(two);
    let run = db.enqueue(acme, vec![create]).await.remove(0);
    let (status, _) = call(
        &api,
        &admin,
        Method::DELETE,
        &format!("/v1/projects/{two}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(
        &api,
        &admin,
        Method::GET,
        &format!("/v1/projects/{two}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let kept: Option<Uuid> = sqlx::query_scalar("SELECT project_id FROM runs WHERE id = $1")
        .bind(run.id)
        .fetch_one(&db.pool)
        .await
        .expect("the run keeps its row");
    assert_eq!(kept, None);

    // project.create x2, override enable, project.delete: newest first.
    let (status, page) = call(&api, &admin, Method::GET, "/v1/audit?limit=2", None).await;
    assert_eq!(status, StatusCode::OK);
    let actions = |page: &Value| -> Vec<String> {
        page["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|entry| entry["action"].as_str().expect("action").to_owned())
            .collect()
    };
    assert_eq!(
        actions(&page),
        ["project.delete", "project.production_override.enable"]
    );
    let cursor = page["next_cursor"].as_i64().expect("a next page");
    let (_, rest) = call(
        &api,
        &admin,
        Method::GET,
        &format!("/v1/audit?limit=2&cursor={cursor}"),
        None,
    )
    .await;
    assert_eq!(actions(&rest), ["project.create", "project.create"]);
    let (_, deletes) = call(
        &api,
        &admin,
        Method::GET,
        "/v1/audit?action=project.delete",
        None,
    )
    .await;
    assert_eq!(actions(&deletes), ["project.delete"]);
    assert_eq!(
        deletes["entries"][0]["target"],
        json!(format!("project:{two}"))
    );
    assert_eq!(deletes["next_cursor"], Value::Null);
}

/// The audit log is append-only in the database itself: UPDATE, DELETE and
/// TRUNCATE are refused even for the superuser the suite connects as.
#[tokio::test]
async fn audit_log_refuses_update_delete_and_truncate() {
    let db = TestDb::new().await;
    let acme = db.tenant("acme").await;
    let mut conn = db.pool.acquire().await.expect("connection");
    let actor = db::audit::Actor::Operator("test".to_owned());
    db::audit::record(
        &mut conn,
        acme,
        &actor,
        "test.action",
        "tenant:acme",
        json!({ "a": 1 }),
    )
    .await
    .expect("append");
    for statement in [
        "UPDATE audit_log SET action = 'forged'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let err = sqlx::query(statement)
            .execute(&db.pool)
            .await
            .expect_err(statement);
        assert!(
            err.to_string().contains("append-only"),
            "{statement}: {err}"
        );
    }
    let kept: (i64, String) = sqlx::query_as("SELECT count(*), min(action) FROM audit_log")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(kept, (1, "test.action".to_owned()));
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

/// `project`: outputs the step envelope's `project`.
struct ShowProject;

#[async_trait::async_trait]
impl runq_worker::Handler for ShowProject {
    fn kind(&self) -> &str {
        "project"
    }

    async fn execute(
        &self,
        step: &runq_shared::StepInput,
        _events: &mut runq_worker::Events,
    ) -> Result<Value, runq_worker::StepError> {
        Ok(serde_json::to_value(&step.project).unwrap_or_default())
    }
}

/// A run's project reaches its steps: the envelope's `project` carries the
/// project's id, name, environment and `target_url`, and is null for a run
/// without a project.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_see_their_runs_project_and_target_url() {
    let db = TestDb::new().await;
    let acme = db.tenant("acme").await;
    let mut conn = db.pool.acquire().await.expect("connection");
    let create = serde_json::from_value(json!({
        "name": "shop", "environment": "staging", "target_url": "http://shop.test/api",
    }))
    .expect("project body");
    let shop = db::projects::create(&mut conn, acme, &create)
        .await
        .expect("project");
    drop(conn);
    let step = || runq_shared::NewStep::new("show", "project", json!({}));
    let mut with = runq_shared::CreateRun::new(vec![step()]);
    with.project_id = Some(shop.id);
    let without = runq_shared::CreateRun::new(vec![step()]);
    let runs = db.enqueue(acme, vec![with, without]).await;
    let worker = crate::support::RunningWorker::start(
        runq_worker::Worker::new(db.new_pool(4), crate::support::worker_config(2))
            .register(ShowProject),
    );
    db.wait_all_terminal(Duration::from_secs(20)).await;
    worker.stop().await;
    let outputs: Vec<(Uuid, Option<Value>)> =
        sqlx::query_as("SELECT id, result FROM runs WHERE status = 'succeeded' ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .expect("results");
    assert_eq!(
        outputs,
        [
            (
                runs[0].id,
                Some(json!({
                    "id": shop.id, "name": "shop", "environment": "staging",
                    "target_url": "http://shop.test/api",
                }))
            ),
            (runs[1].id, Some(Value::Null)),
        ]
    );
}
