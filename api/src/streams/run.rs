//! A run's stream: its state changes, events and step progress merged into
//! one ordered feed, resumable from an SSE id.
//!
//! Each look at the run ([`runs::stream::progress`]) reads its outbox rows,
//! events and steps in one snapshot. [`RunFeed::apply`] turns what is new
//! since the client's [`RunPosition`] into items:
//!
//! - State changes and events are walked by id, each with its own cursor.
//!   Event ids are only passed once they are final (see the module doc of
//!   [`runs::stream`]): every state change or step item waits until the
//!   events that were visible when it was first seen are final and sent, so
//!   an item never overtakes the events that came before it.
//! - Step progress is derived from the steps' rows and the run's
//!   `run.started` rows (the attempts, called epochs here): each item has a
//!   key `(epoch, 2 * position + phase + 1)` that only grows along the run's
//!   life, so it is a cursor too.
//! - Within what may be sent, items go out in the order they happened
//!   (timestamps from the database clock; within one transaction: events,
//!   then the step's finish, then the next step's start, then the state
//!   change that ends an attempt), each source keeping its own order.
//! - The stream closes after the state change that ends the run
//!   (`run.succeeded`, `run.failed`, `run.cancelled`, `run.stopped`) when no
//!   later one exists; everything that came before it is sent first.
//!
//! The SSE id of an item is the position after it, so `Last-Event-ID`
//! resumes with nothing missed and nothing repeated.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use runq_shared::db::outbox::OutboxRow;
use runq_shared::db::runs::stream::{RunProgress, StepState};
use runq_shared::{
    EventType, RunStreamItem, StepProgress, StepProgressType, StepStatus, STEP_PROGRESS_VERSION,
};

#[cfg(doc)]
use runq_shared::db::runs;

/// Events read per look; a run with more waiting is read again at once.
pub(crate) const EVENTS_PER_READ: usize = 200;

/// Probes of the event horizon kept at once (see [`RunFeed::apply`]).
const MAX_PROBES: usize = 64;

/// Where a client is in a run's stream: the last state change (outbox id),
/// event (event id) and step progress it was sent. Its text form,
/// `<state change>.<event>.<epoch>.<step>`, is the SSE id of every item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RunPosition {
    /// The outbox id of the last state change sent (0: none).
    pub(crate) state_change: i64,
    /// The id of the last event sent (0: none).
    pub(crate) event: i64,
    /// The key of the last step progress sent.
    pub(crate) step: StepKey,
}

/// The place of a step progress item in a run's life: the outbox id of the
/// `run.started` of its attempt, then `2 * position + 1` for a start and
/// `2 * position + 2` for a finish. `(0, 0)` is before every item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub(crate) struct StepKey {
    /// The outbox id of the attempt's `run.started`.
    pub(crate) epoch: i64,
    /// `2 * position + 1` (started) or `+ 2` (finished).
    pub(crate) seq: i32,
}

impl fmt::Display for RunPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            self.state_change, self.event, self.step.epoch, self.step.seq
        )
    }
}

/// A `Last-Event-ID` that is no position of a run's stream.
#[derive(Debug, thiserror::Error)]
#[error(
    "header Last-Event-ID must be an id this stream sent ('<n>.<n>.<n>.<n>', four numbers), got '{0}'"
)]
pub(crate) struct BadPosition(String);

impl FromStr for RunPosition {
    type Err = BadPosition;

    /// Accepts exactly what the spec's pattern for `Last-Event-ID` does
    /// (`^[0-9]{1,18}\.[0-9]{1,18}\.[0-9]{1,18}\.[0-9]{1,3}$`): digits
    /// only, so each part fits its integer.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadPosition(text.chars().take(80).collect());
        let parts: Vec<&str> = text.split('.').collect();
        let [state_change, event, epoch, seq] = parts.as_slice() else {
            return Err(bad());
        };
        let number = |part: &str, digits: usize| -> Result<i64, BadPosition> {
            if part.is_empty() || part.len() > digits || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            part.parse().map_err(|_| bad())
        };
        Ok(RunPosition {
            state_change: number(state_change, 18)?,
            event: number(event, 18)?,
            step: StepKey {
                epoch: number(epoch, 18)?,
                seq: i32::try_from(number(seq, 3)?).map_err(|_| bad())?,
            },
        })
    }
}

/// What one [`RunFeed::apply`] produced.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Items to send, each with its SSE id.
    pub(crate) items: Vec<(String, RunStreamItem)>,
    /// The run ended: the stream closes after these items.
    pub(crate) closed: bool,
    /// More events were waiting than one look reads: look again at once.
    pub(crate) more: bool,
}

/// A state change or step item held until the events before it are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ItemKey {
    StateChange(i64),
    Step(StepKey),
}

/// The highest event id of a snapshot, and the snapshot's `xmax`: once a
/// later snapshot's `xmin` reaches `xmax`, every event up to `max_event_id`
/// is visible and no more can appear below it.
#[derive(Debug, Clone, Copy)]
struct Probe {
    xmax: i64,
    max_event_id: i64,
}

/// The stream of one run for one client.
#[derive(Debug)]
pub(crate) struct RunFeed {
    position: RunPosition,
    /// Every event id up to this one that will ever exist is visible now.
    settled: i64,
    probes: VecDeque<Probe>,
    /// For items seen but not sent: the highest event id visible when each
    /// was first seen. It is sent only after every event up to it.
    bounds: HashMap<ItemKey, i64>,
}

/// Ranks order items of one transaction (equal timestamps).
const RANK_OPENING: u8 = 0;
const RANK_EVENT: u8 = 1;
const RANK_STEP_FINISHED: u8 = 2;
const RANK_STEP_STARTED: u8 = 3;
const RANK_CLOSING: u8 = 4;

#[derive(Debug)]
struct Candidate {
    at: DateTime<Utc>,
    rank: u8,
    key: Option<ItemKey>,
    /// The state change that ends the run: sent last, then the stream closes.
    last: bool,
    emit: Emit,
    item: RunStreamItem,
}

#[derive(Debug, Clone, Copy)]
enum Emit {
    StateChange(i64),
    Event(i64),
    Step(StepKey),
}

fn is_terminal(event_type: EventType) -> bool {
    matches!(
        event_type,
        EventType::Succeeded | EventType::Failed | EventType::Cancelled | EventType::Stopped
    )
}

fn is_opening(event_type: EventType) -> bool {
    matches!(
        event_type,
        EventType::Created | EventType::Started | EventType::Requeued
    )
}

impl RunFeed {
    /// A feed that sends what comes after `position`.
    pub(crate) fn new(position: RunPosition) -> Self {
        RunFeed {
            position,
            settled: position.event,
            probes: VecDeque::new(),
            bounds: HashMap::new(),
        }
    }

    /// The outbox ids the next look must read above: those after the last
    /// state change sent, and the `run.started` of the attempt of the last
    /// step item sent, which step progress is derived from.
    pub(crate) fn state_changes_after(&self) -> i64 {
        match self.position.step.epoch {
            0 => 0,
            epoch => self.position.state_change.min(epoch - 1),
        }
    }

    /// The event ids the next look must read above.
    pub(crate) fn events_after(&self) -> i64 {
        self.position.event
    }

    /// Turns one look at the run (read with [`Self::state_changes_after`],
    /// [`Self::events_after`] and at most [`EVENTS_PER_READ`] events) into
    /// the items to send.
    pub(crate) fn apply(&mut self, progress: RunProgress) -> Batch {
        let mut batch = Batch::default();
        self.probe(&progress);
        let limited = progress.events.len() >= EVENTS_PER_READ;
        let bound = match progress.events.last() {
            Some(last) if limited => self.settled.min(last.id),
            _ => self.settled,
        };
        batch.more = limited;

        let newest = progress.state_changes.last();
        let ended = newest.is_some_and(|row| is_terminal(row.payload.event_type));
        let mut changes: VecDeque<Candidate> = progress
            .state_changes
            .iter()
            .filter(|row| row.cursor.id > self.position.state_change)
            .map(|row| {
                let event = row.published();
                let last = ended && newest.is_some_and(|n| n.cursor.id == row.cursor.id);
                Candidate {
                    at: event.occurred_at,
                    rank: if is_opening(event.event_type) {
                        RANK_OPENING
                    } else {
                        RANK_CLOSING
                    },
                    key: Some(ItemKey::StateChange(row.cursor.id)),
                    last,
                    emit: Emit::StateChange(row.cursor.id),
                    item: RunStreamItem::StateChange(event),
                }
            })
            .collect();
        let mut steps: VecDeque<Candidate> = step_items(&progress.state_changes, &progress.steps)
            .into_iter()
            .filter(|c| matches!(c.emit, Emit::Step(key) if key > self.position.step))
            .collect();
        let mut events: VecDeque<Candidate> = progress
            .events
            .into_iter()
            .filter(|e| e.id > self.position.event && e.id <= bound)
            .map(|event| Candidate {
                at: event.created_at,
                rank: RANK_EVENT,
                key: None,
                last: false,
                emit: Emit::Event(event.id),
                item: RunStreamItem::Event(event),
            })
            .collect();
        for candidate in changes.iter().chain(steps.iter()) {
            if let Some(key) = candidate.key {
                self.bounds.entry(key).or_insert(progress.max_event_id);
            }
        }

        loop {
            let heads = [changes.front(), steps.front(), events.front()];
            let earliest = heads
                .iter()
                .enumerate()
                .filter_map(|(source, head)| Some((source, (*head)?)))
                .filter(|(_, head)| !head.last)
                .min_by_key(|(source, head)| (head.at, head.rank, *source))
                .map(|(source, _)| source);
            // The run's last state change goes once nothing else is left.
            let source = match earliest {
                Some(source) => source,
                None if changes.front().is_some() => 0,
                None => break,
            };
            let queue = match source {
                0 => &mut changes,
                1 => &mut steps,
                _ => &mut events,
            };
            let held = queue
                .front()
                .and_then(|head| head.key)
                .and_then(|key| self.bounds.get(&key))
                .is_some_and(|needs| *needs > bound);
            if held {
                break;
            }
            let Some(candidate) = queue.pop_front() else {
                break;
            };
            match candidate.emit {
                Emit::StateChange(id) => self.position.state_change = id,
                Emit::Event(id) => self.position.event = id,
                Emit::Step(key) => self.position.step = key,
            }
            batch
                .items
                .push((self.position.to_string(), candidate.item));
            if candidate.last {
                batch.closed = true;
                break;
            }
        }

        // The end was already sent (a client resuming after it), or the
        // run is over and its state changes have left the outbox (pruned:
        // the read holds none, not even the attempt step items derive
        // from): once every event is sent, nothing more can come.
        let sent_end = ended && newest.is_some_and(|n| n.cursor.id <= self.position.state_change);
        let history_gone = newest.is_none()
            && progress.status.is_terminal()
            && !limited
            && steps.is_empty()
            && events.is_empty()
            && bound >= progress.max_event_id;
        if sent_end || history_gone {
            batch.closed = true;
        }
        let position = self.position;
        self.bounds.retain(|key, _| match key {
            ItemKey::StateChange(id) => *id > position.state_change,
            ItemKey::Step(step) => *step > position.step,
        });
        batch
    }

    /// Records the snapshot's highest event id as a probe, and settles every
    /// probe whose snapshot has no transaction left running.
    fn probe(&mut self, progress: &RunProgress) {
        let newer = self
            .probes
            .back()
            .is_none_or(|p| p.max_event_id < progress.max_event_id);
        if progress.max_event_id > self.settled && newer && self.probes.len() < MAX_PROBES {
            self.probes.push_back(Probe {
                xmax: progress.horizon.xmax,
                max_event_id: progress.max_event_id,
            });
        }
        while let Some(probe) = self.probes.front().copied() {
            if probe.xmax > progress.horizon.xmin {
                break;
            }
            self.settled = self.settled.max(probe.max_event_id);
            self.probes.pop_front();
        }
    }
}

/// The step progress of every attempt in `state_changes` (each `run.started`
/// opens one), derived from the steps' rows: the first step not finished
/// before the attempt starts with it, and each step that finished during the
/// attempt is followed by its finish and, if it succeeded and is not the
/// last, by the next step's start. Steps finished in an earlier attempt and
/// run again since keep only their latest finish (their rows are
/// overwritten), so an earlier attempt's list ends at such a step's start.
fn step_items(state_changes: &[OutboxRow], steps: &[StepState]) -> Vec<Candidate> {
    let epochs: Vec<(i64, DateTime<Utc>, i32)> = state_changes
        .iter()
        .filter(|row| row.payload.event_type == EventType::Started)
        .map(|row| {
            (
                row.cursor.id,
                row.payload.occurred_at,
                row.payload.run.attempt,
            )
        })
        .collect();
    let mut items = Vec::new();
    for (index, &(epoch, began, attempt)) in epochs.iter().enumerate() {
        let ends = epochs.get(index + 1).map(|next| next.1);
        let finished_within = |step: &StepState| {
            step.status != StepStatus::Pending
                && step
                    .finished_at
                    .is_some_and(|at| at >= began && ends.is_none_or(|end| at < end))
        };
        let done_before = |step: &StepState| {
            step.status == StepStatus::Succeeded && step.finished_at.is_some_and(|at| at < began)
        };
        let Some(mut index) = steps.iter().position(|step| !done_before(step)) else {
            continue;
        };
        let mut started_at = began;
        while let Some(step) = steps.get(index) {
            let started = StepKey {
                epoch,
                seq: 2 * step.position + 1,
            };
            items.push(Candidate {
                at: started_at,
                rank: RANK_STEP_STARTED,
                key: Some(ItemKey::Step(started)),
                last: false,
                emit: Emit::Step(started),
                item: RunStreamItem::Step(StepProgress {
                    version: STEP_PROGRESS_VERSION,
                    progress_type: StepProgressType::Started,
                    position: step.position,
                    name: step.name.clone(),
                    kind: step.kind.clone(),
                    attempt,
                    status: StepStatus::Pending,
                    started_at,
                    finished_at: None,
                    error: None,
                }),
            });
            let Some(finished_at) = step.finished_at.filter(|_| finished_within(step)) else {
                break;
            };
            let finished = StepKey {
                epoch,
                seq: 2 * step.position + 2,
            };
            items.push(Candidate {
                at: finished_at,
                rank: RANK_STEP_FINISHED,
                key: Some(ItemKey::Step(finished)),
                last: false,
                emit: Emit::Step(finished),
                item: RunStreamItem::Step(StepProgress {
                    version: STEP_PROGRESS_VERSION,
                    progress_type: StepProgressType::Finished,
                    position: step.position,
                    name: step.name.clone(),
                    kind: step.kind.clone(),
                    attempt: step.attempt,
                    status: step.status,
                    started_at: step.started_at.unwrap_or(started_at),
                    finished_at: Some(finished_at),
                    error: step.error.clone(),
                }),
            });
            if step.status != StepStatus::Succeeded {
                break;
            }
            started_at = finished_at;
            index += 1;
        }
    }
    items
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn positions_parse_only_as_the_pattern_says() {
        for good in ["0.0.0.0", "12.340.12.7", "999999999999999999.1.1.999"] {
            let position: RunPosition = good.parse().expect(good);
            assert_eq!(position.to_string(), good);
        }
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4.5",
            "a.b.c.d",
            "-1.0.0.0",
            "1.0.0.1000",
            "1234567890123456789.0.0.0",
            "1-2",
            " 1.2.3.4",
        ] {
            assert!(bad.parse::<RunPosition>().is_err(), "{bad:?} parses");
        }
    }
}
