//! Fencing: a worker that lost a run (stale owner, earlier attempt, cancel) writes nothing.

use super::*;

/// Invariant 1 (fencing): a worker whose lease expired and was taken over
/// cannot overwrite the new owner's result, nor checkpoint a step.
#[tokio::test]
async fn stale_worker_cannot_overwrite_new_owner() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let run = db
        .enqueue(
            tenant,
            vec![CreateRun::new(vec![
                NewStep::new("one", "echo", json!({})),
                NewStep::new("two", "echo", json!({})),
            ])],
        )
        .await
        .remove(0);
    let backoff = NO_BACKOFF;
    let (stale, fresh) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let mut conn = db.pool.acquire().await.expect("connection");
    let first = claim_one(&mut conn, stale).await;

    // The stale worker stalls past its lease; the rescuer hands the run on.
    let report = expire_leases_and_rescue(&db).await;
    assert_eq!(report.retried, 1);
    db.execute("UPDATE runs SET run_at = now()").await;
    let second = claim_one(&mut conn, fresh).await;
    assert_eq!(second.lease.attempt, 2);

    let stale_lease = first.lease;
    let checkpoint = Checkpoint {
        lease: stale_lease,
        position: 0,
        output: json!({ "from": "stale" }),
        started_at: chrono::Utc::now(),
    };
    let refused = runs::checkpoint_many(&mut conn, &[checkpoint], &[])
        .await
        .expect("checkpoint");
    assert_eq!(refused, vec![CheckpointResult::LeaseLost]);
    let finish = |lease, who: &str| Completion {
        lease,
        outcome: Outcome::Succeeded {
            position: 1,
            output: json!({ "from": who }),
            started_at: chrono::Utc::now(),
        },
    };
    let written = runs::complete_many(&mut conn, &[finish(stale_lease, "stale")], &[], backoff)
        .await
        .expect("complete");
    assert!(written.is_empty(), "the stale completion is refused");
    let written = runs::complete_many(&mut conn, &[finish(second.lease, "fresh")], &[], backoff)
        .await
        .expect("complete");
    assert_eq!(written, vec![run.id]);
    drop(conn);

    let (run, steps) = detail(&db, run.id).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.result, Some(json!({ "from": "fresh" })));
    assert_eq!(steps[0].output, None, "the stale checkpoint wrote nothing");
    let terminal = event_types(&db, run.id)
        .await
        .into_iter()
        .filter(|t| *t == EventType::Succeeded)
        .count();
    assert_eq!(terminal, 1, "one terminal outbox row, the new owner's");
}

/// Invariant 1 (a fence that never repeats): a retry resets `attempt` to 0,
/// so after a client's retry the same worker's new claim has the same
/// `(locked_by, attempt)` as its claim of the run's earlier life. A write
/// still in flight from that earlier life must not land in the new one.
#[tokio::test]
async fn write_from_a_runs_earlier_life_is_refused_after_a_retry() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let mut one_attempt = echo_run(json!({}));
    one_attempt.max_attempts = 1;
    let run = db.enqueue(tenant, vec![one_attempt]).await.remove(0);
    let backoff = NO_BACKOFF;
    let worker = uuid::Uuid::now_v7();
    let mut conn = db.pool.acquire().await.expect("connection");
    let earlier = claim_one(&mut conn, worker).await;
    // The worker stalls; its lease expires and the run fails (one attempt).
    let report = expire_leases_and_rescue(&db).await;
    assert_eq!(report.failed, 1);
    let mut tx = db.pool.begin().await.expect("begin");
    runs::retry(&mut tx, tenant, run.id).await.expect("retry");
    tx.commit().await.expect("commit");
    let later = claim_one(&mut conn, worker).await;
    assert_eq!(
        later.lease.attempt, earlier.lease.attempt,
        "the user-visible attempt repeats after a retry"
    );
    assert!(
        later.lease.token > earlier.lease.token,
        "the fence does not"
    );

    let late = Completion {
        lease: earlier.lease,
        outcome: Outcome::Succeeded {
            position: 0,
            output: json!({ "from": "earlier life" }),
            started_at: chrono::Utc::now(),
        },
    };
    let written = runs::complete_many(&mut conn, &[late], &[], backoff)
        .await
        .expect("complete");
    assert!(written.is_empty(), "the earlier life's write is refused");
    let checkpoint = Checkpoint {
        lease: earlier.lease,
        position: 0,
        output: json!({ "from": "earlier life" }),
        started_at: chrono::Utc::now(),
    };
    let refused = runs::checkpoint_many(&mut conn, &[checkpoint], &[])
        .await
        .expect("checkpoint");
    assert_eq!(refused, vec![CheckpointResult::LeaseLost]);
    let held = runs::extend_leases(&mut conn, &[earlier.lease], 30_000)
        .await
        .expect("heartbeat");
    assert!(held.is_empty(), "nor can it extend the new life's lease");
    drop(conn);

    let (run, _) = detail(&db, run.id).await;
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.result, None);
    assert_eq!(
        run.errors.len(),
        1,
        "the earlier life's expiry is in the history"
    );
    assert_eq!(run.errors[0].reason, runq_shared::ErrorReason::LeaseExpired);
    assert_eq!(run.errors[0].worker_id, Some(worker));
}

/// A cancel request wins over every way out of `running` that would put the
/// run back in the queue: a failed attempt with attempts left and a
/// shutting-down worker's hand-back both end it `cancelled` (with their
/// outbox row), and no pending run can carry a cancel request, so a claim
/// never hands one out.
#[tokio::test]
async fn cancel_request_wins_over_retry_and_hand_back() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let runs = db
        .enqueue(tenant, vec![echo_run(json!({})), echo_run(json!({}))])
        .await;
    let backoff = NO_BACKOFF;
    let mut conn = db.pool.acquire().await.expect("connection");
    let claimed = runs::claim(
        &mut conn,
        uuid::Uuid::now_v7(),
        &["default".to_owned()],
        2,
        30_000,
    )
    .await
    .expect("claim");
    let mut tx = db.pool.begin().await.expect("begin");
    for run in &runs {
        runs::cancel(&mut tx, tenant, run.id).await.expect("cancel");
    }
    tx.commit().await.expect("commit");
    let (failing, releasing) = match claimed[0].id() == runs[0].id {
        true => (claimed[0].lease, claimed[1].lease),
        false => (claimed[1].lease, claimed[0].lease),
    };
    let failed = Completion {
        lease: failing,
        outcome: Outcome::Failed {
            step: None,
            error: runq_shared::RunError::new(runq_shared::ErrorReason::StepFailed, "no", None),
        },
    };
    runs::complete_many(&mut conn, &[failed], &[], backoff)
        .await
        .expect("complete");
    runs::release_many(&mut conn, &[releasing])
        .await
        .expect("release");
    let pending_with_request = sqlx::query(
        "UPDATE runs SET status = 'pending', locked_by = NULL, lease_expires_at = NULL,
         cancel_requested = true WHERE id = $1",
    )
    .bind(runs[0].id)
    .execute(&mut *conn)
    .await;
    assert!(
        pending_with_request.is_err(),
        "a pending run cannot carry a cancel request"
    );
    drop(conn);

    for (run, attempt) in [(&runs[0], 1), (&runs[1], 1)] {
        let (run, _) = detail(&db, run.id).await;
        assert_eq!((run.status, run.attempt), (RunStatus::Cancelled, attempt));
        assert_eq!(
            event_types(&db, run.id).await,
            vec![EventType::Created, EventType::Started, EventType::Cancelled]
        );
    }
    check_invariants(&db).await;
}
