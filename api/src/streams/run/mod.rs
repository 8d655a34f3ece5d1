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

use chrono::{DateTime, Utc};
use runq_shared::db::outbox::OutboxRow;
use runq_shared::db::runs::stream::{RunProgress, StepState};
use runq_shared::{
    EventType, RunStreamItem, StepProgress, StepProgressType, StepStatus, STEP_PROGRESS_VERSION,
};

#[cfg(doc)]
use runq_shared::db::runs;

mod position;
#[cfg(test)]
mod tests;

pub(crate) use position::{RunPosition, StepKey};

/// Events read per look; a run with more waiting is read again at once.
pub(crate) const EVENTS_PER_READ: usize = 200;

/// Probes of the event horizon kept at once (see [`RunFeed::apply`]).
const MAX_PROBES: usize = 64;
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
