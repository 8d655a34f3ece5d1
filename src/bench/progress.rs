//! Progress for people: one redrawn line per measurement on stderr, and
//! nothing at all when stderr is not a terminal (stdout carries only the
//! report line either way).

use std::fmt::Display;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// How often a bar is redrawn.
const REDRAW: Duration = Duration::from_millis(100);
/// Characters of the bar itself.
const WIDTH: u64 = 30;

/// Where progress goes: stderr if it is a terminal, else nowhere.
#[derive(Debug, Clone)]
pub struct Progress {
    enabled: bool,
}

impl Progress {
    /// Progress on stderr if stderr is a terminal.
    pub fn new() -> Self {
        Self {
            enabled: std::io::stderr().is_terminal(),
        }
    }

    /// Prints a line of its own.
    pub fn note(&self, message: impl Display) {
        if self.enabled {
            eprintln!("{message}");
        }
    }

    /// Prints a line of its own on stderr, terminal or not: for phases that
    /// run for minutes (the soak), whose running figures are worth a log.
    pub fn log(&self, message: impl Display) {
        eprintln!("{message}");
    }

    /// A bar counting up to `total`, redrawn until it is finished or dropped.
    pub fn bar(&self, label: impl Into<String>, total: u64) -> Bar {
        let state = Arc::new(BarState {
            label: label.into(),
            total,
            done: AtomicU64::new(0),
            started: Instant::now(),
        });
        let ticker = self.enabled.then(|| {
            let state = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(REDRAW);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    state.draw(false);
                }
            })
        });
        Bar { state, ticker }
    }
}

struct BarState {
    label: String,
    total: u64,
    done: AtomicU64,
    started: Instant,
}

impl BarState {
    fn draw(&self, last: bool) {
        let done = self.done.load(Ordering::Relaxed).min(self.total);
        let filled = (done * WIDTH).checked_div(self.total).unwrap_or(WIDTH);
        let elapsed = self.started.elapsed();
        let rate = match elapsed.as_secs_f64() {
            seconds if seconds > 0.0 => done as f64 / seconds,
            _ => 0.0,
        };
        let mut line = format!(
            "\r\x1b[2K{:<28} [{}{}] {done}/{} {rate:.0}/s {:.1}s",
            self.label,
            "#".repeat(filled as usize),
            " ".repeat((WIDTH - filled) as usize),
            self.total,
            elapsed.as_secs_f64(),
        );
        if last {
            line.push('\n');
        }
        let mut stderr = std::io::stderr().lock();
        // Progress is best effort: a closed stderr must not stop the benchmark.
        let _ = stderr.write_all(line.as_bytes());
        let _ = stderr.flush();
    }
}

/// A progress bar; see [`Progress::bar`].
pub struct Bar {
    state: Arc<BarState>,
    ticker: Option<JoinHandle<()>>,
}

impl Bar {
    /// Adds `count` to the done count. Cheap enough for every job.
    pub fn add(&self, count: u64) {
        self.state.done.fetch_add(count, Ordering::Relaxed);
    }

    /// A handle that counts into this bar from other tasks.
    pub fn counter(&self) -> Counter {
        Counter(self.state.clone())
    }

    /// Sets the done count.
    pub fn set(&self, done: u64) {
        self.state.done.store(done, Ordering::Relaxed);
    }

    /// Stops redrawing and leaves the final state on its own line.
    pub fn finish(mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
            self.state.draw(true);
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
            // Unfinished (an error is on its way): end the line so the error
            // message starts on a clean one.
            self.state.draw(true);
        }
    }
}

/// Counts into a [`Bar`] from any task; see [`Bar::counter`].
#[derive(Clone)]
pub struct Counter(Arc<BarState>);

impl Counter {
    /// Adds `count` to the bar's done count.
    pub fn add(&self, count: u64) {
        self.0.done.fetch_add(count, Ordering::Relaxed);
    }
}
