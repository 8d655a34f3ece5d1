//! How many runs a worker claims ahead of its free slots: enough to cover
//! the time a claim takes at the rate this worker starts runs, never more
//! than `RUNQ_PREFETCH`.
//!
//! A fixed prefetch has to choose between two failures. Small, a worker
//! that runs short runs claims in small batches and spends its time (and
//! the database's) on claim statements: in back-to-back drains of no-op
//! runs at concurrency 50, prefetch 200 gave ~6.5k runs/s and 1,000 gave
//! ~9.2k. Large, a worker that runs slow runs holds hundreds of them under
//! its lease while other workers idle. So the buffer follows the start rate:
//! [`HORIZON`] worth of starts, measured over short windows, between a floor
//! (the slots, at least [`MIN_BUFFER`]) and the configured maximum. Starts
//! limited by a small buffer still grow it: while a claim takes less than
//! the horizon, each window's rate allows a larger buffer than the last.

use std::collections::VecDeque;
use std::time::Duration;

use runq_shared::protocol::ClaimedRun;
use tokio::time::Instant;

/// The time the buffer should last at the current start rate: a few claim
/// round trips under load (a 1,000-run claim takes ~20-30 ms on a busy
/// two-core database).
pub(crate) const HORIZON: Duration = Duration::from_millis(250);
/// The shortest window a rate is measured over.
const WINDOW: Duration = Duration::from_millis(100);
/// The smallest buffer target, so even a worker with few slots claims a few
/// runs per statement.
pub(crate) const MIN_BUFFER: usize = 16;

/// The prefetch target, from the start rate.
#[derive(Debug)]
pub(crate) struct Prefetch {
    max: usize,
    floor: usize,
    window_start: Instant,
    started_in_window: u64,
    /// Starts per second, smoothed; `None` until a window has closed.
    rate: Option<f64>,
}

impl Prefetch {
    /// A target between the floor, `max(concurrency, MIN_BUFFER)` capped at
    /// `max`, and `max`; it starts at the floor.
    pub(crate) fn new(concurrency: usize, max: usize, now: Instant) -> Self {
        Self {
            max,
            floor: concurrency.max(MIN_BUFFER).min(max),
            window_start: now,
            started_in_window: 0,
            rate: None,
        }
    }

    /// Counts one run started.
    pub(crate) fn started(&mut self) {
        self.started_in_window += 1;
    }

    /// Closes the window if it is old enough and returns the target: how
    /// many runs to hold beyond the slots.
    pub(crate) fn target(&mut self, now: Instant) -> usize {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= WINDOW {
            let rate = self.started_in_window as f64 / elapsed.as_secs_f64();
            // Half the weight on the window just closed: a drain that starts
            // or stops changes the target within a few windows.
            self.rate = Some(match self.rate {
                Some(previous) => (previous + rate) / 2.0,
                None => rate,
            });
            self.window_start = now;
            self.started_in_window = 0;
        }
        let wanted = self
            .rate
            .map_or(0.0, |rate| (rate * HORIZON.as_secs_f64()).ceil());
        (wanted as usize).clamp(self.floor, self.max)
    }
}

/// Claimed runs waiting for a slot, one FIFO line per queue, started in
/// turn across queues: a run of a quiet queue claimed behind a large batch
/// of a busy one starts at the next free slot instead of after the batch
/// (README, "Latency under load"). Within a queue, claim order is kept.
#[derive(Debug, Default)]
pub(crate) struct Buffer {
    lines: Vec<(String, VecDeque<ClaimedRun>)>,
    /// The line whose turn is next.
    next: usize,
    len: usize,
}

impl Buffer {
    /// Runs waiting.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Adds claimed runs at the back of their queues' lines.
    pub(crate) fn extend(&mut self, runs: impl IntoIterator<Item = ClaimedRun>) {
        for run in runs {
            self.len += 1;
            match self.lines.iter_mut().find(|(queue, _)| *queue == run.queue) {
                Some((_, line)) => line.push_back(run),
                None => self.lines.push((run.queue.clone(), VecDeque::from([run]))),
            }
        }
    }

    /// The next run to start: the head of the next non-empty line in turn.
    pub(crate) fn pop(&mut self) -> Option<ClaimedRun> {
        if self.len == 0 {
            return None;
        }
        // Empty lines are dropped as they are met, so the scan is short.
        self.lines.retain(|(_, line)| !line.is_empty());
        if self.next >= self.lines.len() {
            self.next = 0;
        }
        let run = self.lines.get_mut(self.next)?.1.pop_front()?;
        self.next += 1;
        self.len -= 1;
        Some(run)
    }

    /// Takes every waiting run out, line by line.
    pub(crate) fn drain(&mut self) -> Vec<ClaimedRun> {
        self.len = 0;
        self.next = 0;
        self.lines
            .drain(..)
            .flat_map(|(_, line)| line.into_iter())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `starts_per_window` starts in each of `windows` windows and
    /// returns the target after the last.
    fn after(
        prefetch: &mut Prefetch,
        start: Instant,
        windows: u32,
        starts_per_window: u64,
    ) -> usize {
        let mut target = 0;
        for window in 1..=windows {
            for _ in 0..starts_per_window {
                prefetch.started();
            }
            target = prefetch.target(start + WINDOW * window);
        }
        target
    }

    #[test]
    fn fast_starts_grow_the_buffer_to_the_maximum() {
        let start = Instant::now();
        let mut prefetch = Prefetch::new(50, 1_000, start);
        assert_eq!(prefetch.target(start), 50, "no rate yet: the floor");
        // 1,300 starts per 100 ms is 13k/s: 3,250 wanted, capped at 1,000.
        assert_eq!(after(&mut prefetch, start, 3, 1_300), 1_000);
    }

    #[test]
    fn slow_starts_keep_the_buffer_at_the_floor() {
        let start = Instant::now();
        let mut prefetch = Prefetch::new(50, 1_000, start);
        // 5 starts per 100 ms is 50/s: 13 wanted, below the floor of 50.
        assert_eq!(after(&mut prefetch, start, 10, 5), 50);
    }

    #[test]
    fn the_target_follows_the_rate_between_floor_and_maximum() {
        let start = Instant::now();
        let mut prefetch = Prefetch::new(10, 1_000, start);
        // 100 per 100 ms is 1,000/s: a quarter second of it is 250.
        assert_eq!(after(&mut prefetch, start, 12, 100), 250);
        // The drain stops: the target decays back to the floor (16).
        assert_eq!(after(&mut prefetch, start + WINDOW * 12, 12, 0), MIN_BUFFER);
    }

    #[test]
    fn the_maximum_wins_over_the_floor() {
        let start = Instant::now();
        // RUNQ_PREFETCH=0 turns prefetch off whatever the slots.
        let mut off = Prefetch::new(50, 0, start);
        assert_eq!(after(&mut off, start, 3, 1_000), 0);
        let mut small = Prefetch::new(1, 10, start);
        assert_eq!(small.target(start), 10);
    }

    fn claimed(queue: &str, token: i64) -> ClaimedRun {
        ClaimedRun {
            lease: runq_shared::protocol::Lease {
                id: uuid::Uuid::now_v7(),
                token,
                attempt: 1,
            },
            tenant_id: uuid::Uuid::now_v7(),
            queue: queue.to_owned(),
            max_attempts: 1,
            timeout_seconds: None,
            metadata: serde_json::Value::Null,
            started_at: chrono::Utc::now(),
            steps: Vec::new(),
            event_cap: None,
            duration_cap_seconds: None,
            events_recorded: 0,
            project: None,
        }
    }

    fn popped(buffer: &mut Buffer) -> Vec<(String, i64)> {
        std::iter::from_fn(|| buffer.pop())
            .map(|run| (run.queue, run.lease.token))
            .collect()
    }

    #[test]
    fn a_quiet_queues_run_starts_before_a_busy_queues_backlog() {
        let mut buffer = Buffer::default();
        buffer.extend((1..=4).map(|token| claimed("busy", token)));
        assert_eq!(buffer.pop().map(|run| run.lease.token), Some(1));
        buffer.extend([claimed("quiet", 10), claimed("busy", 5)]);
        assert_eq!(buffer.len(), 5);
        let order = popped(&mut buffer);
        // The quiet queue's run goes within the first two starts; each
        // queue keeps its claim order.
        let quiet_at = order.iter().position(|(queue, _)| queue == "quiet");
        assert!(quiet_at.is_some_and(|at| at <= 1), "{order:?}");
        let busy: Vec<i64> = order
            .iter()
            .filter(|(q, _)| q == "busy")
            .map(|(_, t)| *t)
            .collect();
        assert_eq!(busy, vec![2, 3, 4, 5]);
        assert_eq!(order.len(), 5);
        assert_eq!(buffer.len(), 0);
    }

    #[test]
    fn queues_take_turns_and_drain_hands_back_everything() {
        let mut buffer = Buffer::default();
        buffer.extend([
            claimed("a", 1),
            claimed("a", 2),
            claimed("b", 3),
            claimed("c", 4),
        ]);
        buffer.extend([claimed("b", 5)]);
        let first_three: Vec<String> = (0..3)
            .filter_map(|_| buffer.pop())
            .map(|r| r.queue)
            .collect();
        let mut sorted = first_three.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            vec!["a", "b", "c"],
            "one of each queue first: {first_three:?}"
        );
        let rest = buffer.drain();
        let mut tokens: Vec<i64> = rest.iter().map(|run| run.lease.token).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, vec![2, 5]);
        assert_eq!(buffer.len(), 0);
        assert!(buffer.pop().is_none());
    }
}
