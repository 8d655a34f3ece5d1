//! A tenant's stream: every state change of the tenant's runs, read from the
//! outbox log by cursor below the visibility horizon (the log's order, see
//! [`outbox`]), optionally filtered by type and queue.

use std::collections::HashSet;

use runq_shared::db::outbox::{self, Cursor};
use runq_shared::db::DbError;
use runq_shared::{EventType, RunEvent, TenantId};
use sqlx::PgConnection;

/// Rows read per look; a tenant with more waiting is read again at once.
const ROWS_PER_READ: i64 = 500;

/// Which state changes a client asked for.
#[derive(Debug, Clone, Default)]
pub(crate) struct TenantFilter {
    /// Only these types (empty: every type).
    pub(crate) types: HashSet<EventType>,
    /// Only runs of this queue.
    pub(crate) queue: Option<String>,
}

impl TenantFilter {
    fn admits(&self, event: &RunEvent) -> bool {
        (self.types.is_empty() || self.types.contains(&event.event_type))
            && self.queue.as_ref().is_none_or(|q| *q == event.run.queue)
    }
}

/// What one look produced.
#[derive(Debug, Default)]
pub(crate) struct TenantBatch {
    /// State changes to send, each with its SSE id (its cursor).
    pub(crate) items: Vec<(String, RunEvent)>,
    /// More rows were waiting than one look reads: look again at once.
    pub(crate) more: bool,
}

/// The stream of one tenant for one client.
#[derive(Debug)]
pub(crate) struct TenantFeed {
    tenant: TenantId,
    filter: TenantFilter,
    /// Every row of the log up to here was looked at (sent or filtered out).
    cursor: Cursor,
}

impl TenantFeed {
    /// A feed of what comes after `cursor`.
    pub(crate) fn new(tenant: TenantId, filter: TenantFilter, cursor: Cursor) -> Self {
        TenantFeed {
            tenant,
            filter,
            cursor,
        }
    }

    /// Reads what is new since the last look.
    ///
    /// # Errors
    ///
    /// Database errors; the cursor moves only with a complete look, so the
    /// next one repeats it.
    pub(crate) async fn look(&mut self, conn: &mut PgConnection) -> Result<TenantBatch, DbError> {
        // The head first: a read after it that comes back short has seen
        // every row of the tenant up to the head (those all ended before the
        // head's horizon), so the cursor may jump there past other tenants'
        // rows, and an idle tenant's look does not rescan them every time.
        let head = outbox::head(conn).await?;
        let rows = outbox::read_after(conn, self.cursor, Some(self.tenant), ROWS_PER_READ).await?;
        let more = rows.len() as i64 >= ROWS_PER_READ;
        let mut batch = TenantBatch {
            items: Vec::with_capacity(rows.len()),
            more,
        };
        for row in rows {
            self.cursor = row.cursor;
            let event = row.published();
            if self.filter.admits(&event) {
                batch.items.push((row.cursor.to_string(), event));
            }
        }
        if !more && head > self.cursor {
            self.cursor = head;
        }
        Ok(batch)
    }
}
