//! Cron schedules: the API, each tick firing exactly once across several
//! workers and restarts, missed ticks firing once on recovery, refused
//! ticks recorded. Time is driven through the database: a test makes a
//! tick due by writing `next_fire_at`.

use std::time::Duration;

use nix::sys::signal::Signal;
use reqwest::StatusCode;
use runq_shared::db::schedules;
use runq_shared::quotas::Quota;
use runq_shared::{CreateSchedule, TenantId};
use runq_worker::maintenance::Scheduler;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::http::Served;
use crate::support::process::Proc;
use crate::support::{echo_run, token, TestDb};

async fn every_minute(db: &TestDb, tenant: TenantId, name: &str) -> Uuid {
    let mut conn = db.pool.acquire().await.expect("connection");
    schedules::create(
        &mut conn,
        tenant,
        &CreateSchedule {
            name: name.to_owned(),
            cron: "* * * * *".to_owned(),
            timezone: None,
            run: echo_run(json!({ "from": name })),
            enabled: None,
        },
    )
    .await
    .expect("schedule")
    .id
}

/// Makes a tick `minutes_ago` minutes back due now; returns the tick.
async fn make_due(db: &TestDb, id: Uuid, minutes_ago: i32) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar(
        "UPDATE schedules SET next_fire_at = date_trunc('minute', now())
                                             - make_interval(mins => $2)
         WHERE id = $1 RETURNING next_fire_at",
    )
    .bind(id)
    .bind(minutes_ago)
    .fetch_one(&db.pool)
    .await
    .expect("make due")
}

async fn runs_of(db: &TestDb, id: Uuid) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT idempotency_key FROM runs WHERE idempotency_key LIKE $1 ORDER BY idempotency_key",
    )
    .bind(format!("schedule:{id}:%"))
    .fetch_all(&db.pool)
    .await
    .expect("runs")
}

/// The API creates, lists, reads, changes and deletes schedules, states
/// the next tick, refuses what cannot fire with a 422 naming it, and hides
/// them from other tenants.
#[tokio::test]
async fn schedules_api_round_trip_and_refusals() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let bearer = token(&db, tenant).await;
    let served = Served::start(db, bearer);
    let echo = json!({ "steps": [{ "name": "e", "kind": "echo", "input": {} }] });
    for (body, names) in [
        (
            json!({ "name": "a", "cron": "* * * *", "run": echo }),
            "5 fields",
        ),
        (
            json!({ "name": "a", "cron": "61 * * * *", "run": echo }),
            "cron",
        ),
        (
            json!({ "name": "a", "cron": "* * * * *", "timezone": "Mars/Base", "run": echo }),
            "Mars/Base",
        ),
        (
            json!({ "name": "a", "cron": "* * * * *",
                    "run": { "run_at": "2030-01-01T00:00:00Z", "steps": echo["steps"] } }),
            "run_at",
        ),
        (
            json!({ "name": "a", "cron": "* * * * *", "run": { "steps": [] } }),
            "run.steps",
        ),
    ] {
        let reply = served.post("/v1/schedules", &body).await;
        assert_eq!(reply.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let problem: Value = reply.json().await.expect("problem");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(names), "{body}: {detail}");
    }
    let reply = served
        .post(
            "/v1/schedules",
            &json!({ "name": "nightly", "cron": "0 3 * * *", "timezone": "Europe/Berlin",
                     "run": echo }),
        )
        .await;
    assert_eq!(reply.status(), StatusCode::CREATED);
    let created: Value = reply.json().await.expect("schedule");
    let id = created["id"].as_str().expect("id").to_owned();
    let next: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(created["next_fire_at"].clone()).expect("next tick");
    // 03:00 in Berlin is 02:00 UTC in winter.
    assert_eq!(next.format("%H:%M").to_string(), "02:00");
    let again = served
        .post(
            "/v1/schedules",
            &json!({ "name": "nightly", "cron": "* * * * *", "run": echo }),
        )
        .await;
    assert_eq!(again.status(), StatusCode::CONFLICT);

    let patch = |body: Value| {
        served
            .client
            .patch(served.url(&format!("/v1/schedules/{id}")))
            .bearer_auth(&served.token)
            .json(&body)
            .send()
    };
    let off: Value = patch(json!({ "enabled": false }))
        .await
        .expect("send")
        .json()
        .await
        .expect("schedule");
    assert!(off["next_fire_at"].is_null(), "{off}");
    let every: Value = patch(json!({ "enabled": true, "cron": "*/5 * * * *", "timezone": "UTC" }))
        .await
        .expect("send")
        .json()
        .await
        .expect("schedule");
    let next: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(every["next_fire_at"].clone()).expect("next tick");
    assert_eq!(next.timestamp() % 300, 0, "a five-minute tick: {next}");
    let listed: Value = served
        .get("/v1/schedules")
        .await
        .json()
        .await
        .expect("list");
    assert_eq!(listed["schedules"].as_array().map(Vec::len), Some(1));

    let other = served.db.tenant("other").await;
    let other_token = token(&served.db, other).await;
    let peek = served
        .client
        .get(served.url(&format!("/v1/schedules/{id}")))
        .bearer_auth(other_token)
        .send()
        .await
        .expect("send");
    assert_eq!(peek.status(), StatusCode::NOT_FOUND);

    let gone = served
        .client
        .delete(served.url(&format!("/v1/schedules/{id}")))
        .bearer_auth(&served.token)
        .send()
        .await
        .expect("send");
    assert_eq!(gone.status(), StatusCode::NO_CONTENT);
    let read = served.get(&format!("/v1/schedules/{id}")).await;
    assert_eq!(read.status(), StatusCode::NOT_FOUND);
}

/// Three worker processes fire a schedule; one is restarted across each
/// tick. Every tick makes exactly one run.
#[tokio::test]
async fn each_tick_fires_exactly_once_across_workers_and_restarts() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let id = every_minute(&db, tenant, "minutely").await;
    let env = [("RUNQ_MAINTENANCE_MS", "20")];
    let mut workers = vec![
        Proc::worker(&db.url, &env),
        Proc::worker(&db.url, &env),
        Proc::worker(&db.url, &env),
    ];
    let mut ticks = Vec::new();
    for k in 1..=3 {
        // The restarted worker goes down as the tick comes due and a fresh
        // one starts while the others fire it.
        workers[0].signal(Signal::SIGTERM);
        let tick = make_due(&db, id, 10 * k).await;
        workers[0].wait_exit(Duration::from_secs(20)).await;
        workers[0] = Proc::worker(&db.url, &env);
        ticks.push(tick);
        let key = schedules::tick_key(id, tick);
        db.wait_for("the tick fires", Duration::from_secs(20), || async {
            runs_of(&db, id).await.contains(&key)
        })
        .await;
    }
    db.wait_all_terminal(Duration::from_secs(20)).await;
    for worker in &mut workers {
        worker.stop().await;
    }
    let mut expected: Vec<String> = ticks.iter().map(|t| schedules::tick_key(id, *t)).collect();
    expected.sort();
    assert_eq!(
        runs_of(&db, id).await,
        expected,
        "one run per tick, none twice"
    );
    let next: chrono::DateTime<chrono::Utc> = db
        .scalar(&format!(
            "SELECT next_fire_at FROM schedules WHERE id = '{id}'"
        ))
        .await;
    assert!(
        next > chrono::Utc::now() - chrono::Duration::seconds(5),
        "it goes on from now"
    );
}

/// Ten missed ticks (no worker ran) fire once on recovery, for the oldest,
/// and the schedule goes on from the next tick after now; a tick whose run
/// a quota refuses records why and moves on, costing the other schedules
/// fired in the same transaction nothing.
#[tokio::test]
async fn missed_ticks_fire_once_and_refused_ticks_say_why() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let id = every_minute(&db, tenant, "minutely").await;
    let oldest = make_due(&db, id, 10).await;
    let scheduler = Scheduler::new(db.pool.clone());
    let report = scheduler.run_once().await.expect("fire");
    assert_eq!((report.fired, report.failed), (1, 0));
    assert_eq!(runs_of(&db, id).await, [schedules::tick_key(id, oldest)]);
    let again = scheduler.run_once().await.expect("fire");
    assert_eq!((again.fired, again.failed), (0, 0), "nothing more is due");

    let capped = db.default_plan_tenant("capped").await;
    let mut conn = db.pool.acquire().await.expect("connection");
    let mut settings = runq_shared::db::quotas::get(&mut conn, capped)
        .await
        .expect("quotas");
    settings.overrides.set(Quota::RunsPerDay, Some(0));
    runq_shared::db::quotas::set(&mut conn, capped, &settings)
        .await
        .expect("set");
    let refused = every_minute(&db, capped, "refused").await;
    make_due(&db, refused, 1).await;
    // A good schedule due in the same pass fires anyway: the refused tick
    // rolls back to its own savepoint.
    let good_tick = make_due(&db, id, 2).await;
    let report = scheduler.run_once().await.expect("fire");
    assert_eq!((report.fired, report.failed), (1, 1));
    assert!(runs_of(&db, id)
        .await
        .contains(&schedules::tick_key(id, good_tick)));
    let schedule = schedules::get(&mut conn, capped, refused)
        .await
        .expect("schedule");
    let error = schedule.last_error.unwrap_or_default();
    assert!(error.contains("runs_per_day"), "{error}");
    assert!(schedule.next_fire_at > Some(chrono::Utc::now() - chrono::Duration::seconds(5)));
    assert!(runs_of(&db, refused).await.is_empty());
}
