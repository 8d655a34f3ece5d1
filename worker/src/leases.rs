//! The runs a worker holds: claimed (executing or prefetched) and not yet
//! written off by the completer. The heartbeat extends exactly these leases;
//! the signals let the heartbeat, the cancel listener and the lease guard stop
//! a run's executor.
//!
//! Each held run carries a local deadline on this process's monotonic clock:
//! the instant its lease was last known good (the claim or the last heartbeat
//! that extended it was *sent*, which is no later than the database's
//! `now()` that set `lease_expires_at`) plus the lease length. The lease guard
//! ([`Leases::expire_overdue`]) drops a run a safety margin before that
//! deadline, so a worker cut off from Postgres stops acting on a run before
//! the rescuer could hand it to someone else (DESIGN.md, invariant 1).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use runq_shared::protocol::Lease;
use runq_shared::RunId;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Signals to one held run's executor.
#[derive(Debug, Clone, Default)]
pub(crate) struct Signals {
    /// A client cancelled the run.
    pub(crate) cancel: CancellationToken,
    /// The lease was taken away or may be about to expire; drop the run
    /// without writing anything.
    pub(crate) lost: CancellationToken,
}

#[derive(Debug, Clone)]
struct Held {
    lease: Lease,
    /// When the lease may expire, by this process's clock.
    deadline: Instant,
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
        // (every critical section is a single insert, remove, read or a loop
        // of independent field writes).
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a claimed run whose lease may expire at `deadline`.
    pub(crate) fn insert(&self, lease: Lease, deadline: Instant) -> Signals {
        let signals = Signals::default();
        self.map().insert(
            lease.id,
            Held {
                lease,
                deadline,
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
            .is_some_and(|held| held.lease.token == lease.token)
        {
            map.remove(&lease.id);
            drop(map);
            self.freed.notify_one();
        }
    }

    /// Drops `lease` as lost: its executor stops without writing anything.
    pub(crate) fn lose(&self, lease: Lease) {
        if let Some(signals) = self.signals(lease) {
            signals.lost.cancel();
        }
        self.remove(lease);
    }

    /// Moves the deadline of every lease in `extended` to `deadline`.
    pub(crate) fn renew(&self, extended: &[Lease], deadline: Instant) {
        let mut map = self.map();
        for lease in extended {
            if let Some(held) = map.get_mut(&lease.id) {
                if held.lease.token == lease.token && held.deadline < deadline {
                    held.deadline = deadline;
                }
            }
        }
    }

    /// The earliest local deadline of any held run.
    pub(crate) fn earliest_deadline(&self) -> Option<Instant> {
        self.map().values().map(|held| held.deadline).min()
    }

    /// Drops every run whose deadline is before `horizon` (now plus the
    /// safety margin) and returns them.
    pub(crate) fn expire_overdue(&self, horizon: Instant) -> Vec<Lease> {
        let overdue: Vec<Lease> = self
            .map()
            .values()
            .filter(|held| held.deadline <= horizon)
            .map(|held| held.lease)
            .collect();
        for lease in &overdue {
            self.lose(*lease);
        }
        overdue
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
        self.map().values().map(|held| held.lease).collect()
    }

    /// The signals of `lease`, if it is still held.
    pub(crate) fn signals(&self, lease: Lease) -> Option<Signals> {
        self.map()
            .get(&lease.id)
            .filter(|held| held.lease.token == lease.token)
            .map(|held| held.signals.clone())
    }

    /// The signals of run `id` under whatever lease is held (the cancel
    /// listener knows only the id).
    pub(crate) fn signals_of(&self, id: RunId) -> Option<Signals> {
        self.map().get(&id).map(|held| held.signals.clone())
    }
}
