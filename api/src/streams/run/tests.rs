//! The feed's merge, resume and horizon logic, on rows made by hand.

use chrono::Duration;
use runq_shared::db::outbox::Cursor;
use runq_shared::db::runs::stream::Horizon;
use runq_shared::{Event, OutboxEvent, RunSnapshot, RunStatus};
use serde_json::json;

use super::*;

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap_or_default()
        + Duration::milliseconds(ms)
}

fn change(id: i64, event_type: EventType, ms: i64, attempt: i32) -> OutboxRow {
    let run = uuid::Uuid::nil();
    OutboxRow {
        cursor: Cursor { txid: id, id },
        run_id: run,
        event_type: event_type.as_str().to_owned(),
        payload: OutboxEvent {
            event_type,
            occurred_at: at(ms),
            run: RunSnapshot {
                id: run,
                tenant_id: run,
                queue: "default".to_owned(),
                status: RunStatus::Running,
                attempt,
                max_attempts: 3,
                run_at: at(0),
                error: None,
                result: None,
            },
        },
    }
}

fn event(id: i64, ms: i64) -> Event {
    Event {
        id,
        attempt: 1,
        position: Some(0),
        kind: "log".to_owned(),
        data: json!({ "n": id }),
        truncated: false,
        occurred_at: None,
        created_at: at(ms),
    }
}

fn step(position: i32, status: StepStatus, finished_ms: Option<i64>) -> StepState {
    StepState {
        position,
        name: format!("s{position}"),
        kind: "sleep".to_owned(),
        status,
        attempt: if finished_ms.is_some() { 1 } else { 0 },
        started_at: finished_ms.map(|ms| at(ms - 5)),
        finished_at: finished_ms.map(at),
        error: None,
    }
}

fn progress(
    horizon: (i64, i64),
    state_changes: Vec<OutboxRow>,
    events: Vec<Event>,
    steps: Vec<StepState>,
    status: RunStatus,
) -> RunProgress {
    RunProgress {
        horizon: Horizon {
            xmin: horizon.0,
            xmax: horizon.1,
        },
        max_event_id: events.iter().map(|e| e.id).max().unwrap_or(0),
        status,
        state_changes,
        events,
        steps,
    }
}

fn names(batch: &Batch) -> Vec<String> {
    batch
        .items
        .iter()
        .map(|(_, item)| match item {
            RunStreamItem::Step(p) => format!("{}:{}", p.progress_type.as_str(), p.position),
            RunStreamItem::Event(e) => format!("event:{}", e.id),
            other => other.event_name().to_owned(),
        })
        .collect()
}

/// A finished three-step run read at once by a new client: its whole
/// life in order, then the close.
#[test]
fn a_finished_run_replays_in_order_and_closes() {
    let mut feed = RunFeed::new(RunPosition::default());
    let read = progress(
        (10, 10),
        vec![
            change(1, EventType::Created, 0, 0),
            change(2, EventType::Started, 10, 1),
            change(3, EventType::Succeeded, 40, 1),
        ],
        vec![event(1, 20), event(2, 30), event(3, 40)],
        vec![
            step(0, StepStatus::Succeeded, Some(20)),
            step(1, StepStatus::Succeeded, Some(30)),
            step(2, StepStatus::Succeeded, Some(40)),
        ],
        RunStatus::Succeeded,
    );
    let batch = feed.apply(read);
    assert_eq!(
        names(&batch),
        [
            "run.created",
            "run.started",
            "step.started:0",
            "event:1",
            "step.finished:0",
            "step.started:1",
            "event:2",
            "step.finished:1",
            "step.started:2",
            "event:3",
            "step.finished:2",
            "run.succeeded",
        ]
    );
    assert!(batch.closed);
    let ids: Vec<&str> = batch.items.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.first(), Some(&"1.0.0.0"));
    assert_eq!(ids.last(), Some(&"3.3.2.6"));
}

/// Resuming from any id of a finished run's replay sends exactly the
/// items after it.
#[test]
fn resuming_from_any_id_sends_exactly_the_rest() {
    let read = || {
        progress(
            (10, 10),
            vec![
                change(1, EventType::Created, 0, 0),
                change(2, EventType::Started, 10, 1),
                change(3, EventType::Retrying, 25, 1),
                change(4, EventType::Started, 30, 2),
                change(5, EventType::Succeeded, 50, 2),
            ],
            vec![event(1, 20), event(2, 25), event(3, 40), event(4, 50)],
            vec![
                step(0, StepStatus::Succeeded, Some(20)),
                step(1, StepStatus::Succeeded, Some(40)),
                step(2, StepStatus::Succeeded, Some(50)),
            ],
            RunStatus::Succeeded,
        )
    };
    let full = RunFeed::new(RunPosition::default()).apply(read());
    assert!(full.closed);
    for cut in 0..full.items.len() {
        let (id, _) = &full.items[cut];
        let position: RunPosition = id.parse().expect("an id parses");
        assert_eq!(&position.to_string(), id);
        let rest = RunFeed::new(position).apply(read());
        assert_eq!(
            rest.items,
            full.items[cut + 1..],
            "resuming after item {cut} ({id})"
        );
        assert!(rest.closed);
    }
}

/// An event the first snapshot saw waits until no transaction that was
/// running then can still add a lower id; the step finish written with
/// it waits for it.
#[test]
fn events_wait_for_the_horizon_and_items_wait_for_events() {
    let mut feed = RunFeed::new(RunPosition::default());
    let changes = || {
        vec![
            change(1, EventType::Created, 0, 0),
            change(2, EventType::Started, 10, 1),
        ]
    };
    let steps = || {
        vec![
            step(0, StepStatus::Succeeded, Some(20)),
            step(1, StepStatus::Pending, None),
        ]
    };
    // Transaction 7 was running: event 2 may still be followed by a
    // lower id committing late, and everything seen with it waits.
    let first = feed.apply(progress(
        (7, 9),
        changes(),
        vec![event(2, 20)],
        steps(),
        RunStatus::Running,
    ));
    assert!(first.items.is_empty(), "{:?}", names(&first));
    // Event 1 committed late; transaction 8 is running, but every one
    // running at the first look has ended.
    let second = feed.apply(progress(
        (9, 11),
        changes(),
        vec![event(1, 19), event(2, 20)],
        steps(),
        RunStatus::Running,
    ));
    assert_eq!(
        names(&second),
        [
            "run.created",
            "run.started",
            "step.started:0",
            "event:1",
            "event:2",
            "step.finished:0",
            "step.started:1"
        ]
    );
    assert!(!second.closed);
}
