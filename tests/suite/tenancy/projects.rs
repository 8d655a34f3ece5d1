//! `prod` projects refuse runs until three confirmations enable them.

use super::*;

/// The production safety gate: a run against a `prod` project is refused
/// with 403 saying why and how; two confirmations (or a `false` one) are a
/// 422 naming the missing ones and change nothing; all three turn the
/// override on, show who and when on the project, write the audit row with
/// the confirmations, and runs go through; turning it off is audited and
/// closes the gate again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prod_project_refuses_runs_until_three_confirmations_enable_it() {
    let (db, api, acme) = acme_with_api().await;
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
