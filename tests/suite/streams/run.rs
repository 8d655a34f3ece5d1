//! A run's stream: mid-run connections, resuming, retried runs.

use super::*;

/// A client that connects after step 0 of a three-step run finished gets
/// the run's life so far, then the rest live: the remaining steps' starts
/// and finishes, their events, and `run.succeeded`, after which the server
/// closes the stream. Each step's finish carries its status, attempt and
/// times; every `data` is the shared type and matches the database.
#[tokio::test]
async fn a_client_connecting_mid_run_sees_the_rest_and_the_close() {
    let f = Fixture::new().await;
    let worker = f.worker();
    let run = f.counting_run(&f.token, &[100, 1_000, 1_000]).await;
    f.wait_step(run.id, 0, "succeeded").await;
    assert_eq!(f.status(run.id).await, "running", "connected mid-run");

    let mut stream = Stream::connect(&f.client, &f.run_stream(run.id), &f.token, None).await;
    let messages = stream.rest().await;
    assert_eq!(
        f.status(run.id).await,
        "succeeded",
        "the stream closed at the end"
    );
    assert_eq!(
        names(&messages),
        [
            "run.created",
            "run.started",
            "step.started:0",
            "event",
            "step.finished:0",
            "step.started:1",
            "event",
            "step.finished:1",
            "step.started:2",
            "event",
            "step.finished:2",
            "run.succeeded",
        ]
    );
    for message in messages.iter().filter(|m| m.event == "step.finished") {
        let step: StepProgress = serde_json::from_value(message.data.clone()).expect("step");
        assert_eq!((step.status, step.attempt), (StepStatus::Succeeded, 1));
        assert!(step.finished_at.is_some_and(|at| at >= step.started_at));
        assert_eq!(step.kind, "count");
    }
    check_run_contract(&f, run.id, &messages).await;
    worker.stop().await;
}

/// A client that drops its connection every three messages and reconnects
/// with the last id it got receives exactly what an uninterrupted client
/// receives, through to the close: nothing missed, nothing repeated, while
/// a sidecar reports events for the run concurrently with the run's own
/// checkpoints. Every event the run holds is among them. A reconnect after
/// the end answers 204, and a reconnect from any id of the finished run
/// yields exactly the messages after it.
#[tokio::test]
async fn reconnecting_with_last_event_id_misses_nothing() {
    let f = Fixture::new().await;
    let worker = f.worker();
    let run = f.counting_run(&f.token, &[400, 400, 2_000]).await;
    let url = f.run_stream(run.id);
    let mut whole = Stream::connect(&f.client, &url, &f.token, None).await;

    // The sidecar reports small batches until step 1 has finished (step 2
    // takes two seconds more), so its last event commits well before the run
    // ends: every event the run holds then belongs in its stream.
    let sidecar = {
        let client = f.client.clone();
        let ingest = f.url("/v1/ingest/events");
        let token = f.ingest_token.clone();
        let pool = f.db.pool.clone();
        let id = run.id;
        tokio::spawn(async move {
            let mut sent = 0;
            loop {
                let step_1: String = sqlx::query_scalar(
                    "SELECT status::text FROM run_steps WHERE run_id = $1 AND position = 1",
                )
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("step 1");
                if step_1 == "succeeded" {
                    break;
                }
                let body = json!({ "run_id": id, "events": [
                    { "kind": "sidecar", "data": { "n": sent } },
                    { "kind": "sidecar", "data": { "n": sent + 1 } },
                ] });
                let response = client
                    .post(&ingest)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    .expect("send");
                // 409 until the run is claimed.
                if response.status() == StatusCode::OK {
                    sent += 2;
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            sent
        })
    };

    let mut pieces: Vec<Message> = Vec::new();
    let mut last: Option<String> = None;
    let mut reconnects = 0;
    loop {
        let response = sse::open(&f.client, &url, &f.token, last.as_deref()).await;
        // The last message taken was the run's end: nothing more comes.
        if response.status() == StatusCode::NO_CONTENT {
            break;
        }
        assert_eq!(response.status(), StatusCode::OK);
        let mut stream = Stream::of(response);
        let mut ended = false;
        for _ in 0..3 {
            match stream.next().await {
                Some(message) => {
                    last = Some(message.id.clone());
                    pieces.push(message);
                }
                None => {
                    ended = true;
                    break;
                }
            }
        }
        if ended {
            break;
        }
        reconnects += 1;
        assert!(reconnects < 10_000, "the stream ends");
    }
    let sent = sidecar.await.expect("sidecar");
    let uninterrupted = whole.rest().await;
    assert!(sent > 0, "the sidecar reported events while the run ran");
    assert_eq!(f.status(run.id).await, "succeeded");

    check_run_contract(&f, run.id, &uninterrupted).await;
    check_run_contract(&f, run.id, &pieces).await;
    let identities =
        |messages: &[Message]| -> Vec<String> { messages.iter().map(identity).collect() };
    let mut in_pieces = identities(&pieces);
    let mut in_whole = identities(&uninterrupted);
    let distinct: BTreeSet<&String> = in_pieces.iter().collect();
    assert_eq!(distinct.len(), in_pieces.len(), "nothing repeated");
    in_pieces.sort();
    in_whole.sort();
    assert_eq!(in_pieces, in_whole, "nothing missed");
    let ingested = f
        .events(run.id)
        .await
        .iter()
        .filter(|e| e.kind == "sidecar")
        .count();
    assert_eq!(
        ingested, sent as usize,
        "every ingested event is in the run"
    );

    // At the end: nothing more, and EventSource is told not to come back.
    let end = last.expect("messages were sent");
    let response = sse::open(&f.client, &url, &f.token, Some(&end)).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    // A replay of the finished run holds the same; resumed from any of its
    // ids, it yields exactly the messages after that one.
    let replay = Stream::connect(&f.client, &url, &f.token, None)
        .await
        .rest()
        .await;
    let mut in_replay = identities(&replay);
    in_replay.sort();
    assert_eq!(in_replay, in_whole);
    for cut in [0, 3, replay.len() / 2, replay.len() - 2] {
        let id = &replay[cut].id;
        let rest = Stream::connect(&f.client, &url, &f.token, Some(id))
            .await
            .rest()
            .await;
        assert_eq!(rest, replay[cut + 1..], "resuming after message {cut}");
    }
    worker.stop().await;
}

/// A run that fails once and is retried streams both attempts: each
/// attempt's `run.started` and the first unfinished step starting under it,
/// the retry, and the end; state changes and events match the database.
#[tokio::test]
async fn a_retried_run_streams_both_attempts() {
    let f = Fixture::new().await;
    let run = f
        .create(
            &f.token,
            json!({ "steps": [
                { "name": "a", "kind": "count", "input": {} },
                { "name": "b", "kind": "fail_once", "input": {} },
                { "name": "c", "kind": "count", "input": {} },
            ] }),
        )
        .await;
    let mut stream = Stream::connect(&f.client, &f.run_stream(run.id), &f.token, None).await;
    let worker = f.worker();
    let messages = stream.rest().await;
    let states: Vec<String> = names(&messages)
        .into_iter()
        .filter(|n| n.starts_with("run."))
        .collect();
    assert_eq!(
        states,
        [
            "run.created",
            "run.started",
            "run.retrying",
            "run.started",
            "run.succeeded"
        ]
    );
    let steps: Vec<(String, i32, i32)> = messages
        .iter()
        .filter(|m| m.event.starts_with("step."))
        .map(|m| {
            let step: StepProgress = serde_json::from_value(m.data.clone()).expect("step");
            (m.event.clone(), step.position, step.attempt)
        })
        .collect();
    // Attempt 2 resumes at step 1 (step 0 is checkpointed).
    let second: Vec<(String, i32, i32)> = steps.iter().filter(|s| s.2 == 2).cloned().collect();
    assert_eq!(
        second,
        [
            ("step.started".to_owned(), 1, 2),
            ("step.finished".to_owned(), 1, 2),
            ("step.started".to_owned(), 2, 2),
            ("step.finished".to_owned(), 2, 2),
        ]
    );
    assert_eq!(steps[0], ("step.started".to_owned(), 0, 1));
    check_run_contract(&f, run.id, &messages).await;
    worker.stop().await;
}
