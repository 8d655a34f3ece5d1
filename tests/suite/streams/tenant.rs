//! A tenant's stream: its own state changes, in order, resumable.

use super::*;

/// A tenant's stream carries every state change of its own runs, each
/// run's in order, and none of another tenant's, whose runs execute at the
/// same time; a client that drops the connection mid-way and resumes with
/// its last id misses and repeats nothing. Each `data` is the `RunEvent`
/// the outbox holds. Filters send only the types and queue asked for.
#[tokio::test]
async fn a_tenant_stream_carries_its_own_state_changes_and_resumes() {
    let f = Fixture::new().await;
    let url = f.tenant_stream("");
    let mut stream = Stream::connect(&f.client, &url, &f.token, None).await;
    let mut succeeded_only = Stream::connect(
        &f.client,
        &f.tenant_stream("?types=run.succeeded,run.failed&queue=emails"),
        &f.token,
        None,
    )
    .await;
    let mut other_stream = Stream::connect(&f.client, &url, &f.other_token, None).await;
    let worker = f.worker();
    let mut ours = Vec::new();
    for i in 0..6 {
        let queue = if i % 2 == 0 { "default" } else { "emails" };
        let body = json!({ "queue": queue, "steps": [
            { "name": "a", "kind": "count", "input": { "ms": 50 * i } },
            { "name": "b", "kind": "count", "input": {} },
        ] });
        ours.push(f.create(&f.token, body).await.id);
    }
    let mut theirs = Vec::new();
    for _ in 0..3 {
        let body = json!({ "steps": [{ "name": "a", "kind": "count", "input": {} }] });
        theirs.push(f.create(&f.other_token, body).await.id);
    }

    let mut messages = stream.take(5).await;
    drop(stream);
    let ours_set: BTreeSet<RunId> = ours.iter().copied().collect();
    let finished = |messages: &[Message]| {
        messages
            .iter()
            .filter(|m| m.event == "run.succeeded")
            .count()
    };
    let mut resumes = 0;
    while finished(&messages) < ours.len() {
        let last = messages.last().map(|m| m.id.clone());
        let mut resumed = Stream::connect(&f.client, &url, &f.token, last.as_deref()).await;
        messages.extend(resumed.take(4.min(3 * ours.len() - messages.len())).await);
        resumes += 1;
        assert!(resumes < 100, "every run's end arrives");
    }

    let mut seen_ids = BTreeSet::new();
    for message in &messages {
        let event: RunEvent = serde_json::from_value(message.data.clone())
            .unwrap_or_else(|e| panic!("{message:?} is no RunEvent: {e}"));
        assert_eq!(event.event_type.as_str(), message.event);
        assert!(
            ours_set.contains(&event.run.id),
            "only acme's runs: {message:?}"
        );
        assert!(seen_ids.insert(event.id.clone()), "{} repeated", event.id);
        let cursor: outbox::Cursor = message.id.parse().expect("the id is a cursor");
        assert_eq!(RunEvent::id_of(cursor.id), event.id);
    }
    let positions: Vec<outbox::Cursor> = messages
        .iter()
        .map(|m| m.id.parse().expect("cursor"))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "log order");
    for id in &ours {
        let streamed: Vec<RunEvent> = messages
            .iter()
            .filter_map(|m| serde_json::from_value::<RunEvent>(m.data.clone()).ok())
            .filter(|e| e.run.id == *id)
            .collect();
        assert_eq!(
            streamed,
            f.published(*id).await,
            "run {id}: every change, in order"
        );
    }

    // The filtered stream: acme's `emails` runs ending, nothing else.
    let emails: BTreeSet<RunId> = ours.iter().skip(1).step_by(2).copied().collect();
    let filtered = succeeded_only.take(emails.len()).await;
    let ended: BTreeSet<RunId> = filtered
        .iter()
        .map(|m| {
            assert_eq!(m.event, "run.succeeded");
            let event: RunEvent = serde_json::from_value(m.data.clone()).expect("RunEvent");
            assert_eq!(event.run.queue, "emails");
            event.run.id
        })
        .collect();
    assert_eq!(ended, emails);

    // globex's stream: its own runs only.
    let theirs_set: BTreeSet<RunId> = theirs.iter().copied().collect();
    let mut their_ends = BTreeSet::new();
    while their_ends.len() < theirs.len() {
        let message = other_stream
            .next()
            .await
            .expect("globex's stream stays open");
        let event: RunEvent = serde_json::from_value(message.data.clone()).expect("RunEvent");
        assert!(theirs_set.contains(&event.run.id), "only globex's runs");
        if message.event == "run.succeeded" {
            their_ends.insert(event.run.id);
        }
    }
    worker.stop().await;
}
