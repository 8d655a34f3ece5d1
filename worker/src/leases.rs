//! The runs a worker holds: claimed (executing or prefetched) and not yet
//! written off by the completer. The heartbeat extends exactly these leases;
//! the tokens let the heartbeat and the cancel listener stop a run's executor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use runq_shared::db::runs::Lease;
use runq_shared::RunId;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Signals to one held run's executor.
#[derive(Debug, Clone, Default)]
pub(crate) struct Signals {
    /// A client cancelled the run.
    pub(crate) cancel: CancellationToken,
    /// The lease was taken away; drop the run without writing anything.
    pub(crate) lost: CancellationToken,
}

#[derive(Debug, Clone)]
struct Held {
    attempt: i32,
    signals: Signals,
}

/// Shared registry of held runs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Leases {
    held: Arc<Mutex<HashMap<RunId, Held>>>,
    /// Signalled when a run is forgotten, so the claim loop sees the room.
    freed: Arc<Notify>,
}

impl Leases {
    fn map(&self) -> MutexGuard<'_, HashMap<RunId, Held>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every critical section is a single insert, remove or read).
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a claimed run and returns its signals.
    pub(crate) fn insert(&self, lease: Lease) -> Signals {
        let signals = Signals::default();
        self.map().insert(
            lease.id,
            Held {
                attempt: lease.attempt,
                signals: signals.clone(),
            },
        );
        signals
    }

    /// Forgets `lease` (its outcome is written, or it was released or lost).
    pub(crate) fn remove(&self, lease: Lease) {
        let mut map = self.map();
        if map
            .get(&lease.id)
            .is_some_and(|held| held.attempt == lease.attempt)
        {
            map.remove(&lease.id);
            drop(map);
            self.freed.notify_one();
        }
    }

    /// Resolves once a run was forgotten since the last call.
    pub(crate) async fn freed(&self) {
        self.freed.notified().await;
    }

    /// How many runs are held.
    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }

    /// Every held lease.
    pub(crate) fn all(&self) -> Vec<Lease> {
        self.map()
            .iter()
            .map(|(id, held)| Lease {
                id: *id,
                attempt: held.attempt,
            })
            .collect()
    }

    /// The signals of run `id`, if held.
    pub(crate) fn signals(&self, id: RunId) -> Option<Signals> {
        self.map().get(&id).map(|held| held.signals.clone())
    }
}
