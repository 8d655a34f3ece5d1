//! Fairness between tenants (README, "Fairness between tenants"): within a
//! queue and priority, claims take tenants in turn, each tenant's runs FIFO;
//! a higher priority still goes first.

use std::collections::HashMap;
use std::time::Duration;

use runq_shared::{CreateRun, NewStep, TenantId};
use runq_worker::Worker;
use serde_json::json;

use crate::support::process::Proc;
use crate::support::{echo_run, worker_config, TestDb};

/// The ids one claim of up to `limit` gives a fresh worker, in claim order.
async fn claim_ids(db: &TestDb, limit: usize) -> Vec<uuid::Uuid> {
    Worker::new(db.new_pool(2), worker_config(limit))
        .claim(limit)
        .await
        .expect("claim")
        .iter()
        .map(|run| run.id())
        .collect()
}

async fn tenant_of(db: &TestDb, ids: &[uuid::Uuid]) -> HashMap<uuid::Uuid, TenantId> {
    sqlx::query_as("SELECT id, tenant_id FROM runs WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(&db.pool)
        .await
        .expect("tenants")
        .into_iter()
        .collect()
}

/// One claim of 10 over a tenant with 100 runs, one with 3 and one with 1
/// gives the small tenants all theirs and the big one the rest, each
/// tenant's oldest first; a higher priority still wins over the turn.
#[tokio::test]
async fn a_claim_takes_tenants_in_turn_within_a_priority() {
    let db = TestDb::new().await;
    let (big, small, single) = (
        db.tenant("big").await,
        db.tenant("small").await,
        db.tenant("single").await,
    );
    let big_runs = db
        .enqueue(big, (0..100).map(|i| echo_run(json!({ "i": i }))).collect())
        .await;
    let small_runs = db
        .enqueue(small, (0..3).map(|i| echo_run(json!({ "i": i }))).collect())
        .await;
    let single_run = db.enqueue(single, vec![echo_run(json!({}))]).await;
    let claimed = claim_ids(&db, 10).await;
    assert_eq!(claimed.len(), 10);
    let owners = tenant_of(&db, &claimed).await;
    let of = |tenant: TenantId| -> Vec<uuid::Uuid> {
        let mut ids: Vec<_> = claimed
            .iter()
            .copied()
            .filter(|id| owners.get(id) == Some(&tenant))
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(
        of(small),
        small_runs.iter().map(|r| r.id).collect::<Vec<_>>()
    );
    assert_eq!(of(single), vec![single_run[0].id]);
    assert_eq!(
        of(big),
        big_runs[..6].iter().map(|r| r.id).collect::<Vec<_>>(),
        "the big tenant's six oldest"
    );

    // Priority before turns: five urgent runs of the big tenant go before
    // the small tenant's ordinary ones.
    let db = TestDb::new().await;
    let (big, small) = (db.tenant("big").await, db.tenant("small").await);
    let urgent = db
        .enqueue(
            big,
            (0..5)
                .map(|i| {
                    let mut run = echo_run(json!({ "i": i }));
                    run.priority = 5;
                    run
                })
                .collect(),
        )
        .await;
    let ordinary = db
        .enqueue(small, (0..5).map(|i| echo_run(json!({ "i": i }))).collect())
        .await;
    let claimed = claim_ids(&db, 6).await;
    let mut expected: Vec<_> = urgent.iter().map(|r| r.id).collect();
    expected.push(ordinary[0].id);
    assert_eq!(
        claimed, expected,
        "the priority-5 runs, then one ordinary run"
    );
}

/// A tenant whose only runs are delayed takes no turn, and a tenant's
/// delayed runs do not hide its due ones.
#[tokio::test]
async fn delayed_runs_take_no_turn() {
    let db = TestDb::new().await;
    let (early, late) = (db.tenant("early").await, db.tenant("late").await);
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let delayed = |i: i32| {
        let mut run = echo_run(json!({ "i": i }));
        run.run_at = Some(later);
        run
    };
    db.enqueue(late, (0..3).map(delayed).collect()).await;
    let mut mixed: Vec<CreateRun> = (0..2).map(delayed).collect();
    mixed.push(echo_run(json!({ "due": true })));
    let mixed = db.enqueue(early, mixed).await;
    let claimed = claim_ids(&db, 10).await;
    assert_eq!(claimed, vec![mixed[2].id], "only the one due run");
}

/// Tenant A enqueues 2,000 runs, then tenant B enqueues 10, and two worker
/// processes drain the queue: all of B's runs start before half of A's
/// backlog has started. (A FIFO claim would start B's after all of A's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_tenant_is_not_starved_by_a_large_backlog() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("a").await, db.tenant("b").await);
    let sleep = |i: i32| {
        let mut run = CreateRun::new(vec![NewStep::new("s", "sleep", json!({ "ms": 5 }))]);
        run.metadata = Some(json!({ "i": i }));
        run
    };
    for chunk in 0..2 {
        db.enqueue(a, (0..1_000).map(|i| sleep(chunk * 1_000 + i)).collect())
            .await;
    }
    db.enqueue(b, (0..10).map(sleep).collect()).await;
    let env = [("RUNQ_CONCURRENCY", "8")];
    let mut workers: Vec<Proc> = (0..2).map(|_| Proc::worker(&db.url, &env)).collect();
    db.wait_all_terminal(Duration::from_secs(120)).await;
    for worker in &mut workers {
        worker.stop().await;
    }
    let (b_started, b_last): (i64, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT count(started_at), max(started_at) FROM runs WHERE tenant_id = $1")
            .bind(b)
            .fetch_one(&db.pool)
            .await
            .expect("b");
    assert_eq!(b_started, 10, "all of B's runs ran");
    let a_before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM runs WHERE tenant_id = $1 AND started_at < $2")
            .bind(a)
            .bind(b_last)
            .fetch_one(&db.pool)
            .await
            .expect("a");
    assert!(
        a_before < 1_000,
        "{a_before} of A's 2,000 runs started before B's last"
    );
    assert_eq!(db.count_status("succeeded").await, 2_010);
}
