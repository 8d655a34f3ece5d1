//! Tenant isolation: another tenant's ids answer 404, steps see their own run's project.

use super::*;

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
            (SELECT string_agg(o::text, ',' ORDER BY o.id) FROM outbox o WHERE tenant_id = $1),
            (SELECT string_agg(w::text, ',' ORDER BY w.id) FROM webhooks w WHERE tenant_id = $1),
            (SELECT string_agg(s::text, ',' ORDER BY s.id) FROM schedules s WHERE tenant_id = $1),
            (SELECT string_agg(d::text, ',' ORDER BY d.id) FROM webhook_deliveries d
               WHERE tenant_id = $1))",
    )
    .bind(tenant)
    .fetch_one(&db.pool)
    .await
    .expect("snapshot")
}

/// Tenant isolation: every endpoint that takes an id answers 404, as for an
/// id that never existed, when the id is another tenant's run, project or
/// token, and changes nothing of that tenant; lists show none of its rows,
/// and naming its project in a run or an ingest token is a 404 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_ids_answer_404_and_change_nothing() {
    let (db, api, acme) = acme_with_api().await;
    let globex = db.tenant("globex").await;
    let acme_project = project(&db, acme, "shop", "dev").await;
    let mut create = echo_run(json!({ "x": 1 }));
    create.project_id = Some(acme_project.id);
    let run = db.enqueue(acme, vec![create]).await.remove(0);
    let (_, acme_token) = token_with(&db, acme, &[Scope::Runs], None).await;
    let intruder = token(&db, globex).await;
    let (webhook, _) =
        crate::webhooks::subscribe(&db, acme, "https://hooks.example.com/acme", &[]).await;
    // The fan-out reads only below the visibility horizon: transactions of
    // other tests may hold it back for a moment.
    let delivery: i64 = crate::support::wait_for_value(
        "the run's events fanned out",
        Duration::from_secs(10),
        || async {
            let mut tx = db.pool.begin().await.expect("begin");
            db::webhooks::relay::fan_out(&mut tx, 100, 3)
                .await
                .expect("fan out");
            tx.commit().await.expect("commit");
            db.scalar::<Option<i64>>("SELECT min(id) FROM webhook_deliveries")
                .await
        },
    )
    .await;
    let webhook_id = webhook.id;
    let mut conn = db.pool.acquire().await.expect("connection");
    let schedule_id = db::schedules::create(
        &mut conn,
        acme,
        &runq_shared::CreateSchedule {
            name: "nightly".to_owned(),
            cron: "0 3 * * *".to_owned(),
            timezone: None,
            run: echo_run(json!({})),
            enabled: None,
        },
    )
    .await
    .expect("schedule")
    .id;
    drop(conn);
    let before = snapshot(&db, acme).await;

    let run_id = run.id;
    let project_id = acme_project.id;
    let cases: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, format!("/v1/runs/{run_id}"), None),
        (Method::GET, format!("/v1/runs/{run_id}/events"), None),
        (
            Method::GET,
            format!("/v1/runs/{run_id}/events/stream"),
            None,
        ),
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
        (Method::GET, format!("/v1/schedules/{schedule_id}"), None),
        (
            Method::PATCH,
            format!("/v1/schedules/{schedule_id}"),
            Some(json!({ "enabled": false })),
        ),
        (Method::DELETE, format!("/v1/schedules/{schedule_id}"), None),
        (Method::GET, format!("/v1/webhooks/{webhook_id}"), None),
        (
            Method::PATCH,
            format!("/v1/webhooks/{webhook_id}"),
            Some(json!({ "url": "https://evil.example.com/steal" })),
        ),
        (Method::DELETE, format!("/v1/webhooks/{webhook_id}"), None),
        (
            Method::GET,
            format!("/v1/webhooks/{webhook_id}/deliveries"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/webhooks/{webhook_id}/deliveries/{delivery}/redeliver"),
            None,
        ),
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
    for path in [
        "/v1/runs",
        "/v1/projects",
        "/v1/tokens",
        "/v1/audit",
        "/v1/webhooks",
        "/v1/schedules",
    ] {
        let (status, page) = call(&api, &intruder, Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let text = page.to_string();
        for id in [run_id, project_id, acme_token, webhook_id, schedule_id] {
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
