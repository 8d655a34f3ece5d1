//! Wake-ups for the tenant streams: one `LISTEN runq_outbox` per API
//! process, shared by every stream through a counter each one watches. The
//! webhook relay in the workers notifies the channel whenever its cursor
//! moves, that is when new rows passed the visibility horizon, so streams
//! read soon after rows become readable instead of at their next poll.
//!
//! The listener is started by the first stream that subscribes and holds one
//! connection of its own (not one of the API pool's). Notifications lost
//! while it reconnects cost latency, not rows: every stream also polls.

use std::sync::OnceLock;

use runq_shared::db::outbox::OUTBOX_CHANNEL;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::backoff;

/// The process's wake-up counter and the listener task behind it.
pub(crate) struct Wakeups {
    pool: PgPool,
    counter: watch::Sender<u64>,
    listener: OnceLock<Listener>,
    closing: CancellationToken,
}

/// The listener task, aborted when the API is dropped.
struct Listener(JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Wakeups {
    /// Wake-ups from notifications on `pool`'s database, until `closing`.
    pub(crate) fn new(pool: PgPool, closing: CancellationToken) -> Self {
        Wakeups {
            pool,
            counter: watch::Sender::new(0),
            listener: OnceLock::new(),
            closing,
        }
    }

    /// A receiver that changes on every notification (and after every
    /// reconnect of the listener). Starts the listener on first use; call
    /// it inside the runtime.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.listener.get_or_init(|| {
            // One connection of its own, with the pool's settings: the
            // listener holds it for the life of the process.
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .connect_lazy_with(self.pool.connect_options().as_ref().clone());
            Listener(tokio::spawn(listen(
                pool,
                self.counter.clone(),
                self.closing.clone(),
            )))
        });
        self.counter.subscribe()
    }
}

/// Bumps `counter` on every notification of [`OUTBOX_CHANNEL`]; reconnects
/// with backoff on its own until `closing`.
async fn listen(pool: PgPool, counter: watch::Sender<u64>, closing: CancellationToken) {
    let wake = || counter.send_modify(|n| *n = n.wrapping_add(1));
    let mut failures = 0u32;
    loop {
        let connect = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(OUTBOX_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = closing.cancelled() => return,
            listener = connect => match listener {
                Ok(listener) => listener,
                Err(err) => {
                    failures += 1;
                    let delay = backoff(failures);
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64,
                        "stream listener could not connect");
                    tokio::select! {
                        _ = closing.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        failures = 0;
        // Rows may have become readable while nobody listened.
        wake();
        loop {
            let notification = tokio::select! {
                _ = closing.cancelled() => return,
                notification = listener.try_recv() => notification,
            };
            match notification {
                Ok(_) => wake(),
                Err(err) => {
                    tracing::warn!(error = %err, "stream listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}
