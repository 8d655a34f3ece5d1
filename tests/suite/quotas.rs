//! Quotas per tenant: the free plan's `runs_per_day` refused over HTTP with
//! the quota named and lifted by raising it, batches checked whole, two API
//! processes racing one tenant's limit, idempotent repeats not charged, the
//! `projects` cap, and the per-run event cap stopping a run.

use std::time::Duration;

use futures::future::join_all;
use reqwest::{Client, Response, StatusCode};
use runq_shared::db::{self, quotas};
use runq_shared::quotas::{Plan, Quota, QuotaReport, TenantQuotas};
use runq_shared::{DbError, NewRun, TenantId};
use runq_worker::Worker;
use serde_json::{json, Value};

use crate::support::handlers::{Executions, FailOnce, ManyEvents};
use crate::support::{echo_run, token, worker_config, RunningWorker, TestApi, TestDb};

async fn post_run(client: &Client, api: &TestApi, token: &str, key: Option<&str>) -> Response {
    let mut request = client
        .post(format!("{}/v1/runs", api.base))
        .bearer_auth(token)
        .json(&json!({ "steps": [{ "name": "e", "kind": "echo", "input": {} }] }));
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.expect("send")
}

async fn set_quotas(client: &Client, api: &TestApi, token: &str, body: Value) -> QuotaReport {
    let response = client
        .put(format!("{}/v1/quotas", api.base))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("report")
}

async fn set_override(db: &TestDb, tenant: TenantId, quota: Quota, limit: i64) {
    let mut conn = db.pool.acquire().await.expect("connection");
    let mut settings = quotas::get(&mut conn, tenant).await.expect("get");
    settings.overrides.set(quota, Some(limit));
    quotas::set(&mut conn, tenant, &settings)
        .await
        .expect("set");
}

/// A tenant on the default plan (`free`) gets five runs in 24 hours: the
/// sixth is refused with 429, a problem document naming `runs_per_day`, its
/// limit, the use and when enough frees up (also as extension members and
/// `Retry-After`/`X-RateLimit-*` headers), and no run is inserted. Raising
/// the quota with `PUT /v1/quotas` lets the sixth through, and `GET
/// /v1/quotas` reports the new limit and the use; the seventh is refused
/// again.
#[tokio::test]
async fn sixth_run_in_a_day_is_refused_until_the_quota_is_raised() {
    let db = TestDb::new().await;
    let tenant = db.default_plan_tenant("newcomer").await;
    let token = token(&db, tenant).await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let client = Client::new();

    for _ in 0..5 {
        let response = post_run(&client, &api, &token, None).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let response = post_run(&client, &api, &token, None).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let retry_after: i64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(
        (1..=24 * 3600).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    assert_eq!(response.headers()["x-ratelimit-limit"], "5");
    assert_eq!(response.headers()["x-ratelimit-remaining"], "0");
    let problem: Value = response.json().await.expect("problem");
    assert_eq!(problem["status"], 429);
    assert_eq!(problem["type"], "urn:runq:problem:quota-exceeded");
    let detail = problem["detail"].as_str().expect("detail");
    assert!(
        detail.contains("runs_per_day")
            && detail.contains("limit 5")
            && detail.contains("used 5")
            && detail.contains("frees up at"),
        "{detail}"
    );
    assert_eq!(problem["quota"], "runs_per_day");
    assert_eq!(problem["limit"], 5);
    assert_eq!(problem["used"], 5);
    assert!(problem["resets_at"].is_string(), "{problem}");
    assert_eq!(db.scalar::<i64>("SELECT count(*) FROM runs").await, 5);

    let report = set_quotas(
        &client,
        &api,
        &token,
        json!({ "plan": "free", "overrides": { "runs_per_day": 6 } }),
    )
    .await;
    let runs = report
        .quotas
        .iter()
        .find(|status| status.quota == Quota::RunsPerDay)
        .expect("runs_per_day listed");
    assert_eq!((runs.limit, runs.used), (Some(6), Some(5)));
    assert!(runs.resets_at.is_some());
    let projects = report
        .quotas
        .iter()
        .find(|status| status.quota == Quota::Projects)
        .expect("projects listed");
    assert_eq!((projects.limit, projects.used), (Some(2), Some(0)));

    let response = post_run(&client, &api, &token, None).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let response = post_run(&client, &api, &token, None).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(db.scalar::<i64>("SELECT count(*) FROM runs").await, 6);
}

/// A batch of six on a fresh free tenant is refused whole (429, nothing
/// inserted, nothing charged); a batch of five then fits exactly.
#[tokio::test]
async fn batch_past_the_quota_is_refused_whole() {
    let db = TestDb::new().await;
    let tenant = db.default_plan_tenant("newcomer").await;
    let token = token(&db, tenant).await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let client = Client::new();
    let batch = |n: usize| {
        json!({ "runs": (0..n)
            .map(|_| json!({ "steps": [{ "name": "e", "kind": "echo", "input": {} }] }))
            .collect::<Vec<_>>() })
    };
    let post = |body: Value| {
        client
            .post(format!("{}/v1/runs/batch", api.base))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };

    let response = post(batch(6)).await.expect("send");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let problem: Value = response.json().await.expect("problem");
    assert_eq!(
        (problem["used"].as_i64(), problem["limit"].as_i64()),
        (Some(0), Some(5))
    );
    assert_eq!(db.scalar::<i64>("SELECT count(*) FROM runs").await, 0);
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM tenant_usage").await,
        0
    );

    let response = post(batch(5)).await.expect("send");
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(db.scalar::<i64>("SELECT count(*) FROM runs").await, 5);
    assert_eq!(
        db.scalar::<i64>("SELECT sum(runs)::int8 FROM tenant_usage")
            .await,
        5
    );
}

/// Two API servers with pools of their own (two processes' worth of
/// connections) take 60 concurrent submissions of one free tenant whose
/// `runs_per_day` is 20: exactly 20 are accepted, the other 40 refused with
/// 429, and exactly 20 runs exist. The check and the charge serialise per
/// tenant, so they cannot together pass the limit.
#[tokio::test]
async fn two_api_servers_cannot_together_exceed_a_quota() {
    let db = TestDb::new().await;
    let tenant = db.default_plan_tenant("racer").await;
    set_override(&db, tenant, Quota::RunsPerDay, 20).await;
    let token = token(&db, tenant).await;
    let first = TestApi::start(db.new_pool(10), TestApi::config());
    let second = TestApi::start(db.new_pool(10), TestApi::config());
    let client = Client::new();

    let requests = (0..60).map(|i| {
        let api = if i % 2 == 0 { &first } else { &second };
        post_run(&client, api, &token, None)
    });
    let statuses: Vec<StatusCode> = join_all(requests)
        .await
        .into_iter()
        .map(|response| response.status())
        .collect();
    let created = statuses
        .iter()
        .filter(|status| **status == StatusCode::CREATED)
        .count();
    let refused = statuses
        .iter()
        .filter(|status| **status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((created, refused), (20, 40), "{statuses:?}");
    assert_eq!(db.scalar::<i64>("SELECT count(*) FROM runs").await, 20);
}

/// Repeating an idempotency key returns the existing run without charging
/// it, even once the tenant is at its limit: the quota counts runs inserted,
/// not requests.
#[tokio::test]
async fn idempotent_repeat_is_not_charged() {
    let db = TestDb::new().await;
    let tenant = db.default_plan_tenant("repeater").await;
    set_override(&db, tenant, Quota::RunsPerDay, 2).await;
    let keyed = || NewRun {
        idempotency_key: Some("order-42".to_owned()),
        ..NewRun::new(tenant, echo_run(json!({})).steps)
    };
    let mut conn = db.pool.acquire().await.expect("connection");
    let first = db::runs::enqueue(&mut conn, keyed()).await.expect("first");
    assert!(first.created);
    for _ in 0..5 {
        let again = db::runs::enqueue(&mut conn, keyed()).await.expect("repeat");
        assert!(!again.created);
        assert_eq!(again.run.id, first.run.id);
    }
    db::runs::enqueue(&mut conn, NewRun::new(tenant, echo_run(json!({})).steps))
        .await
        .expect("second run fits");
    // At the limit, a repeat still answers with the existing run.
    let again = db::runs::enqueue(&mut conn, keyed())
        .await
        .expect("repeat at the limit");
    assert_eq!(again.run.id, first.run.id);
    let refused = db::runs::enqueue(&mut conn, NewRun::new(tenant, echo_run(json!({})).steps))
        .await
        .expect_err("third run refused");
    assert!(
        matches!(
            refused,
            DbError::QuotaExceeded {
                quota: Quota::RunsPerDay,
                limit: 2,
                used: 2,
                ..
            }
        ),
        "{refused:?}"
    );
    assert_eq!(db.scalar::<i64>("SELECT count(*) FROM runs").await, 2);
}

/// The third project of a default-plan tenant is refused with the quota
/// `projects` named (limit 2, used 2); raising the override lets it through.
#[tokio::test]
async fn third_project_is_refused_until_the_quota_is_raised() {
    let db = TestDb::new().await;
    let tenant = db.default_plan_tenant("builder").await;
    let create = |name: &'static str| {
        let pool = db.pool.clone();
        async move {
            let mut tx = pool.begin().await.expect("begin");
            // Project creation checks the quota itself, under the tenant's lock.
            let project = runq_shared::CreateProject {
                name: name.to_owned(),
                environment: runq_shared::Environment::Dev,
                target_url: None,
            };
            db::projects::create(&mut tx, tenant, &project).await?;
            tx.commit().await.expect("commit");
            Ok::<(), DbError>(())
        }
    };
    create("one").await.expect("first project");
    create("two").await.expect("second project");
    let refused = create("three").await.expect_err("third project refused");
    assert!(
        matches!(
            refused,
            DbError::QuotaExceeded {
                quota: Quota::Projects,
                limit: 2,
                used: 2,
                resets_at: None,
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("quota projects exceeded"));
    set_override(&db, tenant, Quota::Projects, 3).await;
    create("three").await.expect("third project after raising");
    assert_eq!(db.scalar::<i64>("SELECT count(*) FROM projects").await, 3);
}

/// The per-run event cap stops a run as `stopped_quota` with reason
/// `event_cap`, keeping the events up to the cap: with an override of 5, a
/// second step's events that pass it stop the run after step 0 succeeded
/// (5 events kept), and events of an earlier attempt count (a run whose
/// first attempt recorded 3 is stopped on its second); on the free plan's 5,000, a step recording 5,001 events
/// is stopped with 5,000 kept, while one recording exactly 5,000 succeeds.
#[tokio::test]
async fn event_past_the_cap_stops_the_run() {
    let db = TestDb::new().await;
    let small = db.default_plan_tenant("small").await;
    set_override(&db, small, Quota::RunEvents, 5).await;
    let free = db.default_plan_tenant("free").await;
    let step = |count: u64| runq_shared::NewStep::new("e", "events", json!({ "count": count }));
    let capped = db
        .enqueue(
            small,
            vec![
                runq_shared::CreateRun::new(vec![step(3), step(3)]),
                // Attempt 1 records 3 events and fails at step 1; attempt 2
                // resumes there and its 3 more pass the cap of 5.
                runq_shared::CreateRun::new(vec![
                    step(3),
                    runq_shared::NewStep::new("flaky", "fail_once", json!({})),
                    step(3),
                ]),
            ],
        )
        .await;
    let runs = db
        .enqueue(
            free,
            vec![
                runq_shared::CreateRun::new(vec![step(5_001)]),
                runq_shared::CreateRun::new(vec![step(5_000)]),
            ],
        )
        .await;
    let worker = RunningWorker::start(
        Worker::new(db.new_pool(4), worker_config(3))
            .register(ManyEvents)
            .register(FailOnce {
                executions: Executions::default(),
            }),
    );
    db.wait_all_terminal(Duration::from_secs(20)).await;
    worker.stop().await;

    let outcome = |id: uuid::Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (String, Option<String>, i64)>(
                "SELECT r.status::text, r.error->>'reason',
                        (SELECT count(*) FROM run_events e WHERE e.run_id = r.id)
                 FROM runs r WHERE r.id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("run")
        }
    };
    assert_eq!(
        outcome(capped[0].id).await,
        ("stopped_quota".to_owned(), Some("event_cap".to_owned()), 5)
    );
    let first_step: String =
        sqlx::query_scalar("SELECT status::text FROM run_steps WHERE run_id = $1 AND position = 0")
            .bind(capped[0].id)
            .fetch_one(&db.pool)
            .await
            .expect("step");
    assert_eq!(first_step, "succeeded");
    assert_eq!(
        outcome(capped[1].id).await,
        ("stopped_quota".to_owned(), Some("event_cap".to_owned()), 5)
    );
    let attempt: i32 = sqlx::query_scalar("SELECT attempt FROM runs WHERE id = $1")
        .bind(capped[1].id)
        .fetch_one(&db.pool)
        .await
        .expect("attempt");
    assert_eq!(attempt, 2, "stopped on the second attempt");
    assert_eq!(
        outcome(runs[0].id).await,
        (
            "stopped_quota".to_owned(),
            Some("event_cap".to_owned()),
            5_000
        )
    );
    assert_eq!(
        outcome(runs[1].id).await,
        ("succeeded".to_owned(), None, 5_000)
    );
}

/// An `unlimited` tenant (as `runq dev` and `runq bench` make theirs) is
/// never counted: a batch past every free limit goes through and writes no
/// usage row, and `GET /v1/quotas` reports no limits.
#[tokio::test]
async fn unlimited_tenant_is_not_counted() {
    let db = TestDb::new().await;
    let tenant = db.tenant("bench").await;
    let token = token(&db, tenant).await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    db.enqueue(tenant, (0..50).map(|_| echo_run(json!({}))).collect())
        .await;
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM tenant_usage").await,
        0
    );
    let report: QuotaReport = Client::new()
        .get(format!("{}/v1/quotas", api.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("report");
    assert_eq!(report.plan, Plan::Unlimited);
    assert!(
        report.quotas.iter().all(|status| status.limit.is_none()),
        "{report:?}"
    );
    let mut conn = db.pool.acquire().await.expect("connection");
    assert_eq!(
        quotas::get(&mut conn, tenant).await.expect("get"),
        TenantQuotas::plan(Plan::Unlimited)
    );
}

/// An operator changes any tenant's quotas from the command line: `runq
/// tenant quota NAME --plan unlimited --set runs_per_day=100` stores both and
/// prints the resulting report; `--set runs_per_day=plan` removes the
/// override; an unknown tenant or quota fails naming it, changing nothing.
#[tokio::test]
async fn operator_sets_quotas_from_the_cli() {
    let db = TestDb::new().await;
    let tenant = db.default_plan_tenant("acme").await;
    let runq = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_runq"))
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "warn")
            .output()
            .expect("runq runs")
    };

    let out = runq(&[
        "tenant",
        "quota",
        "acme",
        "--plan",
        "unlimited",
        "--set",
        "runs_per_day=100",
    ]);
    assert!(out.status.success(), "{out:?}");
    let report: QuotaReport = serde_json::from_slice(&out.stdout).expect("report JSON");
    assert_eq!(report.plan, Plan::Unlimited);
    assert_eq!(report.overrides.runs_per_day, Some(100));
    let mut conn = db.pool.acquire().await.expect("connection");
    let stored = quotas::get(&mut conn, tenant).await.expect("get");
    assert_eq!(stored.limit(Quota::RunsPerDay), Some(100));
    assert_eq!(stored.limit(Quota::Projects), None);

    let out = runq(&["tenant", "quota", "acme", "--set", "runs_per_day=plan"]);
    assert!(out.status.success(), "{out:?}");
    let stored = quotas::get(&mut conn, tenant).await.expect("get");
    assert_eq!(stored, TenantQuotas::plan(Plan::Unlimited));

    let out = runq(&["tenant", "quota", "nobody", "--plan", "free"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tenant 'nobody' not found"));
    let out = runq(&["tenant", "quota", "acme", "--set", "runs=1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown quota 'runs'"));
    let stored = quotas::get(&mut conn, tenant).await.expect("get");
    assert_eq!(stored, TenantQuotas::plan(Plan::Unlimited));
}

/// `PUT /v1/quotas` refuses settings it cannot store with a 422 naming the
/// field (an unknown plan, a negative override, an unknown quota) and
/// changes nothing.
#[tokio::test]
async fn bad_quota_settings_are_refused_with_422() {
    let db = TestDb::new().await;
    let tenant = db.default_plan_tenant("acme").await;
    let token = token(&db, tenant).await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let client = Client::new();
    for (body, names) in [
        (json!({ "plan": "gold" }), "plan"),
        (
            json!({ "plan": "free", "overrides": { "runs_per_day": -1 } }),
            "overrides.runs_per_day",
        ),
        (
            json!({ "plan": "free", "overrides": { "runs": 1 } }),
            "runs",
        ),
    ] {
        let response = client
            .put(format!("{}/v1/quotas", api.base))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}"
        );
        let problem: Value = response.json().await.expect("problem");
        let detail = problem["detail"].as_str().expect("detail");
        assert!(detail.contains(names), "{body}: {detail}");
    }
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM tenant_quotas").await,
        0
    );
}

/// `stored_events` keeps a tenant's newest events: past the limit the
/// oldest roll off (a trimmer pass in every worker), never another
/// tenant's, and the quota report counts what is stored.
#[tokio::test]
async fn stored_events_keep_the_newest_and_roll_off_the_oldest() {
    let db = TestDb::new().await;
    let acme = db.default_plan_tenant("acme").await;
    let globex = db.tenant("globex").await;
    set_override(&db, acme, Quota::StoredEvents, 25).await;
    let record = |tenant: TenantId, n: i64| {
        let db = &db;
        async move {
            let run = db
                .enqueue(tenant, vec![echo_run(json!({}))])
                .await
                .remove(0);
            sqlx::query(
                "INSERT INTO run_events (run_id, tenant_id, attempt, kind, data)
                 SELECT $1, $2, 1, 'tick', jsonb_build_object('n', g)
                 FROM generate_series(1, $3) g",
            )
            .bind(run.id)
            .bind(tenant)
            .bind(n)
            .execute(&db.pool)
            .await
            .expect("events");
        }
    };
    let count = |tenant: TenantId| {
        let db = &db;
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM run_events WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_one(&db.pool)
                .await
                .expect("count")
        }
    };
    record(acme, 40).await;
    record(globex, 40).await;
    let newest: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM run_events WHERE tenant_id = $1 ORDER BY id DESC LIMIT 25",
    )
    .bind(acme)
    .fetch_all(&db.pool)
    .await
    .expect("newest");

    let trimmer = runq_worker::maintenance::EventTrimmer::new(db.pool.clone());
    assert_eq!(trimmer.run_once().await.expect("trim"), 15);
    let kept: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM run_events WHERE tenant_id = $1 ORDER BY id DESC")
            .bind(acme)
            .fetch_all(&db.pool)
            .await
            .expect("kept");
    assert_eq!(kept, newest, "the newest 25 are kept");
    assert_eq!(
        count(globex).await,
        40,
        "an unlimited tenant keeps everything"
    );
    let mut conn = db.pool.acquire().await.expect("connection");
    let report = quotas::report(&mut conn, acme).await.expect("report");
    let stored = report
        .quotas
        .iter()
        .find(|s| s.quota == Quota::StoredEvents)
        .expect("stored_events reported");
    assert_eq!((stored.limit, stored.used), (Some(25), Some(25)));
    assert_eq!(
        trimmer.run_once().await.expect("trim"),
        0,
        "nothing left to do"
    );

    // Workers trim on their own.
    record(acme, 10).await;
    let worker = RunningWorker::start(Worker::new(db.pool.clone(), worker_config(1)));
    db.wait_for(
        "a worker trims acme's events",
        Duration::from_secs(20),
        || async { count(acme).await == 25 },
    )
    .await;
    worker.stop().await;
}

/// `PATCH /v1/quotas` changes what it names and keeps the rest: a number
/// sets an override, `null` removes it, `plan` switches the plan; an
/// override out of range is a 422 that changes nothing; each change is
/// audited.
#[tokio::test]
async fn patch_changes_only_the_quotas_it_names() {
    let db = TestDb::new().await;
    let tenant = db.default_plan_tenant("acme").await;
    let token = token(&db, tenant).await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let client = Client::new();
    set_quotas(
        &client,
        &api,
        &token,
        json!({ "plan": "free", "overrides": { "runs_per_day": 100, "run_events": 20000 } }),
    )
    .await;
    let patch = |body: Value| {
        client
            .patch(format!("{}/v1/quotas", api.base))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let reply = patch(json!({ "stored_events": 10, "run_events": null }))
        .await
        .expect("send");
    assert_eq!(reply.status(), StatusCode::OK);
    let report: QuotaReport = reply.json().await.expect("report");
    assert_eq!(report.plan, Plan::Free);
    assert_eq!(report.overrides.runs_per_day, Some(100), "kept");
    assert_eq!(report.overrides.stored_events, Some(10), "set");
    assert_eq!(report.overrides.run_events, None, "removed");
    let limit = |report: &QuotaReport, quota: Quota| {
        report
            .quotas
            .iter()
            .find(|s| s.quota == quota)
            .and_then(|s| s.limit)
    };
    assert_eq!(
        limit(&report, Quota::RunEvents),
        Some(5_000),
        "the plan's number again"
    );

    let report: QuotaReport = patch(json!({ "plan": "unlimited" }))
        .await
        .expect("send")
        .json()
        .await
        .expect("report");
    assert_eq!(report.plan, Plan::Unlimited);
    assert_eq!(
        report.overrides.runs_per_day,
        Some(100),
        "overrides survive a plan change"
    );
    assert_eq!(limit(&report, Quota::Projects), None);

    for bad in [
        json!({ "projects": -1 }),
        json!({ "run_duration_minutes": 0 }),
        json!({ "nonsense": 1 }),
        json!({ "plan": "gold" }),
    ] {
        let reply = patch(bad.clone()).await.expect("send");
        assert_eq!(reply.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
    let mut conn = db.pool.acquire().await.expect("connection");
    let now = quotas::get(&mut conn, tenant).await.expect("get");
    assert_eq!(now.plan, Plan::Unlimited);
    assert_eq!(
        now.overrides.stored_events,
        Some(10),
        "refused patches changed nothing"
    );
    let audited: i64 = db
        .scalar("SELECT count(*) FROM audit_log WHERE action = 'quota.update'")
        .await;
    assert_eq!(audited, 3, "the PUT and two patches");
}
