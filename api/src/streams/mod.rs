//! Live event streams over Server-Sent Events: `GET /v1/runs/{id}/events/stream`
//! (one run: state changes, step progress and events, closing when the run
//! ends) and `GET /v1/events/stream` (every state change of the tenant's
//! runs). Both are fed from Postgres alone, so the API and the workers may
//! run on different hosts, and both resume from `Last-Event-ID`.
//!
//! A stream is a future polled by the response body, not a task: when the
//! client goes away the body, the stream and its permit are dropped. The
//! server notices a closed connection only when it writes to it (hyper
//! has no other signal), so a stream whose client left ends at the latest
//! at the second keep-alive comment after it left. Each
//! look at the database borrows a pool connection for one statement or two
//! and returns it; no stream holds a connection while it waits. Streams
//! wait on a timer, the tenant streams also on the process's one listener
//! ([`wake`]). A database that cannot be reached is retried with backoff
//! while the client stays connected; when the API shuts down, every stream
//! ends so the server can stop.

mod run;
mod tenant;
mod wake;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use poem::web::sse::Event as SseEvent;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::EventStream;
use poem_openapi::registry::{MetaSchemaRef, Registry};
use poem_openapi::types::{ToJSON, Type};
use poem_openapi::{ApiResponse, OpenApi, Tags};
use runq_shared::config::ApiConfig;
use runq_shared::db::outbox::{self, Cursor};
use runq_shared::db::runs::{self, stream::progress};
use runq_shared::db::DbError;
use runq_shared::{EventType, RunEvent, RunId, RunStreamItem, Scope, TenantId};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::run::{RunFeed, RunPosition, EVENTS_PER_READ};
use self::tenant::{TenantFeed, TenantFilter};
use self::wake::Wakeups;
use crate::auth::TenantAuth;
use crate::error::ApiError;

/// How often a run's stream looks at the run.
const RUN_POLL: Duration = Duration::from_millis(250);
/// How often a tenant's stream looks at the log without a wake-up.
const TENANT_POLL: Duration = Duration::from_millis(500);

/// Delay before the next look after `failures` failed ones in a row: 200 ms
/// doubling up to 5 s.
pub(crate) fn backoff(failures: u32) -> Duration {
    Duration::from_millis((100u64 << failures.clamp(1, 6)).min(5_000))
}

#[derive(Tags)]
enum Tag {
    /// Streams: live Server-Sent Events of runs and state changes.
    Streams,
}

/// What every stream of this process shares: the pool, the wake-ups, the
/// limits, and the signal that the API is shutting down.
pub(crate) struct Hub {
    pool: PgPool,
    wakeups: Wakeups,
    limits: Arc<Limits>,
    /// How often a comment line goes out on a stream with nothing to send,
    /// so proxies do not take it for dead; also how soon a stream whose
    /// client left is noticed (at the second write after it left).
    keep_alive: Duration,
    closing: CancellationToken,
}

impl Hub {
    /// Streams on `pool`, limited and kept alive as `config` says, that end
    /// when `closing` is cancelled.
    pub(crate) fn new(pool: PgPool, config: &ApiConfig, closing: CancellationToken) -> Self {
        Hub {
            wakeups: Wakeups::new(pool.clone(), closing.clone()),
            pool,
            limits: Arc::new(Limits {
                max: config.max_streams,
                per_tenant: config.max_streams_per_tenant,
                open: Mutex::default(),
            }),
            keep_alive: Duration::from_secs(config.stream_keep_alive_seconds.max(1)),
            closing,
        }
    }
}

/// How many streams are open, in all and per tenant, against the limits.
struct Limits {
    max: usize,
    per_tenant: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_tenant: HashMap<TenantId, usize>,
}

/// One open stream, counted until dropped with it.
struct StreamPermit {
    limits: Arc<Limits>,
    tenant: TenantId,
}

impl Limits {
    fn acquire(self: &Arc<Self>, tenant: TenantId) -> Result<StreamPermit, ApiError> {
        // Nothing panics while the lock is held, so a poisoned one is whole.
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.total >= self.max {
            return Err(ApiError::TooManyStreams(format!(
                "this API process serves {} event streams, its limit (RUNQ_MAX_STREAMS); \
                 retry shortly, or through another API process",
                self.max
            )));
        }
        let count = open.by_tenant.entry(tenant).or_default();
        if *count >= self.per_tenant {
            return Err(ApiError::TooManyStreams(format!(
                "this tenant has {} event streams open on this API process, its limit \
                 (RUNQ_MAX_STREAMS_PER_TENANT); close one first",
                self.per_tenant
            )));
        }
        *count += 1;
        open.total += 1;
        Ok(StreamPermit {
            limits: Arc::clone(self),
            tenant,
        })
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self
            .limits
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.by_tenant.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.by_tenant.remove(&self.tenant);
            }
        }
    }
}

/// One SSE message: its id, its event name and its data, a `T` sent as one
/// line of JSON. The spec describes the stream's items by `T`'s schema.
pub struct Sse<T> {
    id: String,
    event: &'static str,
    data: T,
}

impl<T: Type> Type for Sse<T> {
    const IS_REQUIRED: bool = true;
    type RawValueType = T::RawValueType;
    type RawElementValueType = T::RawElementValueType;

    fn name() -> std::borrow::Cow<'static, str> {
        T::name()
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        self.data.as_raw_value()
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        self.data.raw_element_iter()
    }
}

impl<T: ToJSON> ToJSON for Sse<T> {
    fn to_json(&self) -> Option<serde_json::Value> {
        self.data.to_json()
    }
}

impl<T: Serialize + ToJSON> Sse<T> {
    /// The message as poem writes it. `data` is serde's JSON, the form the
    /// webhook bodies take (one line: JSON escapes newlines in strings).
    fn into_event(self) -> SseEvent {
        let data = serde_json::to_string(&self.data).unwrap_or_else(|_| self.data.to_json_string());
        SseEvent::message(data).id(self.id).event_type(self.event)
    }
}

/// The messages of a run's stream.
type RunMessages = BoxStream<'static, Sse<RunStreamItem>>;
/// The messages of a tenant's stream.
type TenantMessages = BoxStream<'static, Sse<RunEvent>>;

/// Answer of `GET /v1/runs/{id}/events/stream`.
#[derive(ApiResponse)]
pub enum RunStreamResponse {
    /// The run's stream (`text/event-stream`): every message has an `id`,
    /// an `event` name (`run.*`, `step.started`, `step.finished` or
    /// `event`) and one `data` line, the JSON of a `RunEvent`, a
    /// `StepProgress` or an `Event`; comment lines (`:`) keep it alive. It
    /// closes after the state change that ends the run.
    #[oai(status = 200)]
    Stream(EventStream<RunMessages>),
    /// `Last-Event-ID` is at or after the run's end: nothing more will come.
    /// EventSource stops reconnecting on a 204.
    #[oai(status = 204)]
    Ended,
}

/// Answer of `GET /v1/events/stream`.
#[derive(ApiResponse)]
pub enum TenantStreamResponse {
    /// The tenant's stream (`text/event-stream`): every message has an `id`,
    /// an `event` name (the state change's type, `run.succeeded`, ...) and
    /// one `data` line, the JSON of a `RunEvent`; comment lines (`:`) keep
    /// it alive. It does not end by itself.
    #[oai(status = 200)]
    Stream(EventStream<TenantMessages>),
}

/// The event stream endpoints.
pub struct StreamsApi {
    pub(crate) hub: Arc<Hub>,
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Streams")]
impl StreamsApi {
    /// Follow a run live (Server-Sent Events)
    ///
    /// Streams the run as `text/event-stream`: its whole life so far (or
    /// what followed `Last-Event-ID`), then what happens next, and closes
    /// after the state change that ends the run (`run.succeeded`,
    /// `run.failed`, `run.cancelled` or `run.stopped`) unless a later one
    /// exists. Each message has an `event` name, an `id` and one JSON `data`
    /// line:
    ///
    /// - `run.created`, `run.started`, `run.succeeded`, ... (every state
    ///   change type): `data` is a `RunEvent`, exactly the body webhooks
    ///   deliver;
    /// - `step.started`, `step.finished`: `data` is a `StepProgress` (a
    ///   step's start is derived: see the schema);
    /// - `event`: `data` is an `Event`, as `GET /v1/runs/{id}/events`
    ///   lists it.
    ///
    /// Messages come in the order things happened: every event recorded
    /// before a step finished or a state change is sent before it. The `id`
    /// is an opaque position (`<n>.<n>.<n>.<n>`); reconnecting with it as
    /// `Last-Event-ID` (EventSource does so by itself) resumes with nothing
    /// missed and nothing repeated. A `Last-Event-ID` at the run's end
    /// answers 204, which stops EventSource from reconnecting. Events a
    /// sidecar reports after the run ended are not streamed; list them.
    ///
    /// Latency is about a quarter of a second: the run is looked at every
    /// 250 ms, and an event waits until no transaction that could still
    /// commit an earlier one is running. A comment line (`:`) goes out every
    /// `RUNQ_STREAM_KEEP_ALIVE_SECONDS` (default 15) while nothing happens.
    /// Another tenant's run, like an unknown id, is 404. A tenant may hold
    /// `RUNQ_MAX_STREAMS_PER_TENANT` (default 50) streams open on one API
    /// process, which serves `RUNQ_MAX_STREAMS` (default 1,000) in all;
    /// more get 429.
    #[oai(
        path = "/runs/:id/events/stream",
        method = "get",
        operation_id = "stream_run_events"
    )]
    async fn run_stream(
        &self,
        auth: TenantAuth,
        id: Path<Uuid>,
        /// The `id` of the last message received: the stream resumes right
        /// after it. Absent: from the run's creation.
        #[oai(
            name = "Last-Event-ID",
            validator(pattern = r"^[0-9]{1,18}\.[0-9]{1,18}\.[0-9]{1,18}\.[0-9]{1,3}$")
        )]
        last_event_id: Header<Option<String>>,
    ) -> Result<RunStreamResponse, ApiError> {
        let caller = auth.0;
        caller.require(Scope::Runs)?;
        let resumed: Option<RunPosition> = resume_from(&last_event_id)?;
        let mut conn = self.hub.pool.acquire().await?;
        let run = runs::get(&mut conn, caller.tenant_id, id.0).await?;
        if let Some(position) = resumed {
            let later = outbox::for_run_after(&mut conn, run.id, position.state_change).await?;
            if run.status.is_terminal() && later.is_empty() {
                return Ok(RunStreamResponse::Ended);
            }
        }
        drop(conn);
        let permit = self.hub.limits.acquire(caller.tenant_id)?;
        let feed = RunFeed::new(resumed.unwrap_or_default());
        let messages = run_messages(
            Arc::clone(&self.hub),
            caller.tenant_id,
            run.id,
            feed,
            permit,
        );
        Ok(RunStreamResponse::Stream(
            EventStream::new(messages)
                .keep_alive(self.hub.keep_alive)
                .to_event(Sse::into_event),
        ))
    }

    /// Follow the tenant's state changes live (Server-Sent Events)
    ///
    /// Streams every state change of the tenant's runs as
    /// `text/event-stream`, in the order of the outbox log (each run's in
    /// the order they happened), without end. Each message's `event` is the
    /// change's type (`run.created`, `run.succeeded`, ...), its `data` one
    /// JSON line, a `RunEvent`, exactly the body webhooks deliver, and its
    /// `id` the change's position in the log (`<txid>-<id>`). Without
    /// `Last-Event-ID` the stream starts now (changes committed while the
    /// request arrived may be included); with one it resumes right after
    /// it, with nothing missed and nothing repeated (EventSource reconnects
    /// with it by itself), as long as the log still holds that position.
    ///
    /// `types` (comma separated) and `queue` filter what is sent; a resumed
    /// stream should pass the same filters. A change is readable once every
    /// transaction older than it has ended, so latency is that, plus up to
    /// 500 ms (less when workers' relays notify). A comment line (`:`) goes
    /// out every `RUNQ_STREAM_KEEP_ALIVE_SECONDS` (default 15) while nothing
    /// happens. Limits as for a run's stream:
    /// `RUNQ_MAX_STREAMS_PER_TENANT` per tenant and process, 429 beyond.
    #[oai(
        path = "/events/stream",
        method = "get",
        operation_id = "stream_events"
    )]
    async fn tenant_stream(
        &self,
        auth: TenantAuth,
        /// The `id` of the last message received: the stream resumes right
        /// after it. Absent: from now on.
        #[oai(
            name = "Last-Event-ID",
            validator(pattern = r"^[0-9]{1,18}-[0-9]{1,18}$")
        )]
        last_event_id: Header<Option<String>>,
        /// Only these state change types, comma separated
        /// (`types=run.succeeded,run.failed`); absent: every type.
        #[oai(explode = false, default)]
        types: Query<Vec<EventType>>,
        /// Only runs of this queue.
        queue: Query<Option<String>>,
    ) -> Result<TenantStreamResponse, ApiError> {
        let caller = auth.0;
        caller.require(Scope::Runs)?;
        let resumed: Option<Cursor> = resume_from(&last_event_id)?;
        let start = match resumed {
            Some(cursor) => cursor,
            None => {
                let mut conn = self.hub.pool.acquire().await?;
                outbox::head(&mut conn).await?
            }
        };
        let permit = self.hub.limits.acquire(caller.tenant_id)?;
        let filter = TenantFilter {
            types: types.0.into_iter().collect(),
            queue: queue.0,
        };
        let feed = TenantFeed::new(caller.tenant_id, filter, start);
        let messages = tenant_messages(Arc::clone(&self.hub), feed, permit);
        Ok(TenantStreamResponse::Stream(
            EventStream::new(messages)
                .keep_alive(self.hub.keep_alive)
                .to_event(Sse::into_event),
        ))
    }
}

/// What a failed look means for the stream: wait this long and look again,
/// or end it.
fn after_failure(err: &DbError, failures: &mut u32, stream: &'static str) -> Option<Duration> {
    if err.is_unavailable() {
        *failures += 1;
        let delay = backoff(*failures);
        tracing::warn!(error = %err, stream, retry_in_ms = delay.as_millis() as u64,
            "event stream cannot reach the database; retrying");
        Some(delay)
    } else {
        // A broken contract or a bug: the client reconnects with its
        // Last-Event-ID and finds it again rather than a silent gap.
        tracing::error!(error = %err, stream, "event stream failed; closing it");
        None
    }
}

/// The state a run's stream carries between looks.
struct RunStreamState {
    hub: Arc<Hub>,
    tenant: TenantId,
    run: RunId,
    feed: RunFeed,
    failures: u32,
    /// Wait this long before the next look (after a batch was sent).
    pause: Option<Duration>,
    _permit: StreamPermit,
}

/// The messages of run `run`'s stream from `feed`'s position: a look every
/// [`RUN_POLL`] (at once while events are waiting), until the run ends, the
/// run is gone, the API shuts down or the client leaves.
fn run_messages(
    hub: Arc<Hub>,
    tenant: TenantId,
    run: RunId,
    feed: RunFeed,
    permit: StreamPermit,
) -> RunMessages {
    let state = RunStreamState {
        hub,
        tenant,
        run,
        feed,
        failures: 0,
        pause: None,
        _permit: permit,
    };
    stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        loop {
            if let Some(pause) = state.pause.take() {
                tokio::select! {
                    _ = state.hub.closing.cancelled() => return None,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            if state.hub.closing.is_cancelled() {
                return None;
            }
            let look = async {
                let mut conn = state.hub.pool.acquire().await?;
                progress(
                    &mut conn,
                    state.tenant,
                    state.run,
                    state.feed.state_changes_after(),
                    state.feed.events_after(),
                    EVENTS_PER_READ as i64,
                )
                .await
            };
            let delay = match look.await {
                Ok(Some(read)) => {
                    state.failures = 0;
                    let batch = state.feed.apply(read);
                    if !batch.items.is_empty() || batch.closed {
                        let messages: Vec<Sse<RunStreamItem>> = batch
                            .items
                            .into_iter()
                            .map(|(id, item)| Sse {
                                id,
                                event: item.event_name(),
                                data: item,
                            })
                            .collect();
                        state.pause = (!batch.more).then_some(RUN_POLL);
                        let next = (!batch.closed).then_some(state);
                        return Some((stream::iter(messages), next));
                    }
                    if batch.more {
                        continue;
                    }
                    RUN_POLL
                }
                // Deleted meanwhile: nothing more will come.
                Ok(None) => return None,
                Err(err) => after_failure(&err, &mut state.failures, "run")?,
            };
            state.pause = Some(delay);
        }
    })
    .flatten()
    .boxed()
}

/// The state a tenant's stream carries between looks.
struct TenantStreamState {
    hub: Arc<Hub>,
    feed: TenantFeed,
    wake: tokio::sync::watch::Receiver<u64>,
    failures: u32,
    /// Wait up to this long (or for a wake-up) before the next look.
    pause: Option<Duration>,
    _permit: StreamPermit,
}

/// The messages of a tenant's stream from `feed`'s cursor: a look on every
/// wake-up and every [`TENANT_POLL`], until the API shuts down or the
/// client leaves.
fn tenant_messages(hub: Arc<Hub>, feed: TenantFeed, permit: StreamPermit) -> TenantMessages {
    let wake = hub.wakeups.subscribe();
    let state = TenantStreamState {
        hub,
        feed,
        wake,
        failures: 0,
        pause: None,
        _permit: permit,
    };
    stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        loop {
            if let Some(pause) = state.pause.take() {
                // A failed look waits out its backoff; otherwise a wake-up
                // ends the wait early.
                let waking = state.failures == 0;
                tokio::select! {
                    _ = state.hub.closing.cancelled() => return None,
                    changed = state.wake.changed(), if waking => {
                        // The listener is gone (the API is being dropped).
                        if changed.is_err() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            if state.hub.closing.is_cancelled() {
                return None;
            }
            // Wake-ups that arrive during the look are kept for the wait.
            state.wake.borrow_and_update();
            let look = async {
                let mut conn = state.hub.pool.acquire().await?;
                state.feed.look(&mut conn).await
            };
            let delay = match look.await {
                Ok(batch) => {
                    state.failures = 0;
                    if !batch.items.is_empty() {
                        let messages: Vec<Sse<RunEvent>> = batch
                            .items
                            .into_iter()
                            .map(|(id, event)| Sse {
                                id,
                                event: event.event_type.as_str(),
                                data: event,
                            })
                            .collect();
                        state.pause = (!batch.more).then_some(TENANT_POLL);
                        return Some((stream::iter(messages), Some(state)));
                    }
                    if batch.more {
                        continue;
                    }
                    TENANT_POLL
                }
                Err(err) => after_failure(&err, &mut state.failures, "tenant")?,
            };
            state.pause = Some(delay);
        }
    })
    .flatten()
    .boxed()
}

/// The position a `Last-Event-ID` header names, if one was sent; a header
/// that does not parse is a 400 naming it.
fn resume_from<T>(header: &Header<Option<String>>) -> Result<Option<T>, ApiError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    header
        .0
        .as_deref()
        .map(str::parse::<T>)
        .transpose()
        .map_err(|err| ApiError::BadRequest(format!("header Last-Event-ID: {err}")))
}
