//! What the soak phase prints: one sample every few percent of progress
//! (claim latency, table, index and dead-row sizes) and a summary that says
//! whether they stayed flat.

use std::collections::BTreeMap;

use runq_devtools::soak_db::TableStats;
use serde::Serialize;

/// Size and vacuum state of one table at one sample.
#[derive(Serialize, Debug, Clone)]
pub struct TableSample {
    /// Heap, TOAST and indexes, in bytes.
    pub total_bytes: i64,
    /// The heap alone, in bytes.
    pub heap_bytes: i64,
    /// Live rows (statistics collector).
    pub live: i64,
    /// Dead rows not yet vacuumed.
    pub dead: i64,
    /// Autovacuum passes so far.
    pub autovacuums: i64,
    /// Autoanalyze passes so far.
    pub autoanalyzes: i64,
}

impl From<&TableStats> for TableSample {
    fn from(stats: &TableStats) -> Self {
        Self {
            total_bytes: stats.total_bytes,
            heap_bytes: stats.heap_bytes,
            live: stats.live_tuples,
            dead: stats.dead_tuples,
            autovacuums: stats.autovacuum_count,
            autoanalyzes: stats.autoanalyze_count,
        }
    }
}

/// One look at the database during the soak.
#[derive(Serialize, Debug, Clone)]
pub struct Sample {
    /// Seconds since the worker was started.
    pub t_s: f64,
    /// Runs finished (enqueued minus pending minus running).
    pub processed: u64,
    /// Runs enqueued so far.
    pub enqueued: u64,
    /// Runs waiting to be claimed.
    pub pending: i64,
    /// Runs claimed and not finished.
    pub running: i64,
    /// Runs finished per second since the previous sample.
    pub runs_per_s: u64,
    /// Median time of the real claim statement (`db::runs::claim` of up to
    /// `claim_limit` runs, rolled back), in milliseconds.
    pub claim_ms: f64,
    /// Runs the last probe claim found (fewer than the limit once the
    /// backlog runs dry: such samples are left out of the summary).
    pub claim_rows: usize,
    /// Every hot table, by name.
    pub tables: BTreeMap<String, TableSample>,
    /// Every index of `runs`, by name, in bytes.
    pub runs_indexes: BTreeMap<String, i64>,
}

/// A figure at the first sample, its largest and its last value.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct Span {
    /// At the first sample (the backlog queued, the worker not yet started).
    pub start: i64,
    /// The largest of any sample.
    pub peak: i64,
    /// At the last sample (everything processed and pruned).
    pub end: i64,
}

/// Whether the soak stayed flat: what it ran ([`Context`]) and what it saw.
#[derive(Serialize, Debug, Clone)]
pub struct Summary {
    /// What the soak ran, as given to [`summarise`].
    #[serde(flatten)]
    pub context: Context,
    /// Mean `claim_ms` of the full-claim samples in the first quarter of
    /// the runs (by `processed`).
    pub claim_ms_first_quartile: Option<f64>,
    /// The same over the last quarter.
    pub claim_ms_last_quartile: Option<f64>,
    /// Last over first: about 1 when claims did not slow down with churn.
    pub claim_ratio: Option<f64>,
    /// Total bytes of each hot table, and of each index of `runs` (keyed
    /// `runs/<index>`).
    pub bytes: BTreeMap<String, Span>,
    /// Dead rows of each hot table.
    pub dead_tuples: BTreeMap<String, Span>,
    /// Autovacuum passes over each hot table during the soak.
    pub autovacuums: BTreeMap<String, i64>,
}

/// What the summary is computed from besides the samples.
#[derive(Serialize, Debug, Clone)]
pub struct Context {
    /// Runs pushed through.
    pub jobs: u64,
    /// From the worker's start until every run was finished.
    pub ms: u64,
    /// `jobs` over `ms`.
    pub jobs_per_s: u64,
    /// Worker slots.
    pub concurrency: usize,
    /// Pending runs the enqueuer kept queued.
    pub backlog: u64,
    /// Runs each probe claim asks for.
    pub claim_limit: i64,
    /// Environment the soak gave the worker (retention, prune intervals).
    pub worker_env: Vec<String>,
    /// The server's autovacuum settings the figures were measured under.
    pub server: Vec<String>,
    /// Storage parameters of each hot table (`reloptions`).
    pub reloptions: BTreeMap<String, Vec<String>>,
}

/// Summarises `samples` (in time order, at least one).
pub fn summarise(samples: &[Sample], context: Context) -> Summary {
    let n = context.jobs.max(1) as f64;
    let full = |s: &&Sample| s.claim_rows as i64 >= context.claim_limit;
    let first = mean(
        samples
            .iter()
            .filter(full)
            .filter(|s| (s.processed as f64) <= n / 4.0)
            .map(|s| s.claim_ms),
    );
    let last = mean(
        samples
            .iter()
            .filter(full)
            .filter(|s| (s.processed as f64) >= n * 3.0 / 4.0)
            .map(|s| s.claim_ms),
    );
    let claim_ratio = match (first, last) {
        (Some(first), Some(last)) if first > 0.0 => Some(round3(last / first)),
        _ => None,
    };

    let mut bytes = BTreeMap::new();
    let mut dead_tuples = BTreeMap::new();
    let mut autovacuums = BTreeMap::new();
    if let Some(head) = samples.first() {
        for name in head.tables.keys() {
            let table = |s: &Sample| s.tables.get(name).cloned();
            if let Some(span) = span(samples, |s| table(s).map(|t| t.total_bytes)) {
                bytes.insert(name.clone(), span);
            }
            if let Some(span) = span(samples, |s| table(s).map(|t| t.dead)) {
                dead_tuples.insert(name.clone(), span);
            }
            if let Some(span) = span(samples, |s| table(s).map(|t| t.autovacuums)) {
                autovacuums.insert(name.clone(), span.end - span.start);
            }
        }
        let mut indexes: Vec<&String> =
            samples.iter().flat_map(|s| s.runs_indexes.keys()).collect();
        indexes.sort();
        indexes.dedup();
        for index in indexes {
            if let Some(span) = span(samples, |s| s.runs_indexes.get(index).copied()) {
                bytes.insert(format!("runs/{index}"), span);
            }
        }
    }
    Summary {
        context,
        claim_ms_first_quartile: first.map(round3),
        claim_ms_last_quartile: last.map(round3),
        claim_ratio,
        bytes,
        dead_tuples,
        autovacuums,
    }
}

/// Start, peak and end of `value` over the samples that have it (an index
/// created or dropped mid-soak counts from where it exists).
fn span(samples: &[Sample], value: impl Fn(&Sample) -> Option<i64>) -> Option<Span> {
    let values: Vec<i64> = samples.iter().filter_map(value).collect();
    Some(Span {
        start: *values.first()?,
        peak: values.iter().copied().max()?,
        end: *values.last()?,
    })
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, count) = values.fold((0.0, 0u32), |(sum, count), v| (sum + v, count + 1));
    (count > 0).then(|| sum / f64::from(count))
}

/// `value` to three decimals, for a readable report.
pub fn round3(value: f64) -> f64 {
    (value * 1_000.0).round() / 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(processed: u64, claim_ms: f64, runs_bytes: i64, claim_rows: usize) -> Sample {
        let mut tables = BTreeMap::new();
        tables.insert(
            "runs".to_owned(),
            TableSample {
                total_bytes: runs_bytes,
                heap_bytes: runs_bytes / 2,
                live: 0,
                dead: runs_bytes / 10,
                autovacuums: (processed / 10) as i64,
                autoanalyzes: 0,
            },
        );
        Sample {
            t_s: processed as f64,
            processed,
            enqueued: processed,
            pending: 0,
            running: 0,
            runs_per_s: 0,
            claim_ms,
            claim_rows,
            tables,
            runs_indexes: BTreeMap::from([("runs_pkey".to_owned(), runs_bytes / 4)]),
        }
    }

    fn context() -> Context {
        Context {
            jobs: 100,
            ms: 1,
            jobs_per_s: 1,
            concurrency: 1,
            backlog: 10,
            claim_limit: 50,
            worker_env: Vec::new(),
            server: Vec::new(),
            reloptions: BTreeMap::new(),
        }
    }

    #[test]
    fn quartiles_spans_and_vacuum_counts() {
        let samples = [
            sample(0, 1.0, 100, 50),
            sample(20, 3.0, 400, 50),
            sample(50, 9.0, 300, 50),
            sample(80, 4.0, 200, 50),
            // A partial claim (the backlog ran dry) is not a claim latency.
            sample(100, 100.0, 120, 3),
        ];
        let summary = summarise(&samples, context());
        assert_eq!(summary.claim_ms_first_quartile, Some(2.0));
        assert_eq!(summary.claim_ms_last_quartile, Some(4.0));
        assert_eq!(summary.claim_ratio, Some(2.0));
        let runs = summary.bytes.get("runs").copied();
        assert_eq!(
            runs,
            Some(Span {
                start: 100,
                peak: 400,
                end: 120
            })
        );
        assert_eq!(
            summary.bytes.get("runs/runs_pkey").map(|s| s.peak),
            Some(100)
        );
        assert_eq!(summary.autovacuums.get("runs"), Some(&10));
    }
}
