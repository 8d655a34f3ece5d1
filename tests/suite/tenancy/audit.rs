//! Project CRUD and the append-only audit log.

use super::*;

/// Projects CRUD: create, list, get, patch (a taken name is a 409; a new
/// environment turns the override off), delete (audited; the project's runs
/// keep their rows without it). The audit log lists newest first, pages with
/// a cursor and filters by action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_crud_and_the_audit_log_listing() {
    let (db, api, acme) = acme_with_api().await;
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
