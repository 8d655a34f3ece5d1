//! `POST /v1/ingest/events`: events sidecars report for a run, counted
//! against a per-token rate limit that every API process shares (the window
//! lives in Postgres, see `runq_shared::db::ingest`).

use poem::http::{header, HeaderValue};
use poem::{IntoResponse, Response};
use poem_openapi::payload::{Json, Payload};
use poem_openapi::registry::{MetaHeader, MetaMediaType, MetaResponse, MetaResponses, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiResponse, OpenApi, Tags};
use runq_shared::db::ingest::{self, IngestBatch, RateLimit};
use runq_shared::{IngestEvents, IngestedEvents, Problem, Scope, INGEST_GRACE_SECONDS};
use sqlx::PgPool;

use crate::auth::TenantAuth;
use crate::body::ApiJson;
use crate::error::{rate_limit_headers, ApiError};

#[derive(Tags)]
enum Tag {
    /// Ingest: events sidecars report for running runs.
    Ingest,
}

/// Answer of `POST /v1/ingest/events` when at least one event was stored:
/// the counts, and the token's rate limit in headers. Written by hand, not
/// derived, so the spec spells the headers as they are sent
/// (poem-openapi's derive upper-cases them).
pub struct IngestResponse {
    body: IngestedEvents,
    rate: RateLimit,
}

/// The headers every ingest answer carries (200 and 429). `Retry-After`
/// is required on a 429 and sent on a 200 only when events were rejected.
fn rate_limit_meta(retry_after_required: bool) -> Vec<MetaHeader> {
    let header = |name: &str, description: &str, required: bool| MetaHeader {
        name: name.to_owned(),
        description: Some(description.to_owned()),
        required,
        deprecated: false,
        schema: u32::schema_ref(),
    };
    vec![
        header(
            "X-RateLimit-Limit",
            "Events this token may send per sliding minute (`MAX_EVENTS_PER_MINUTE`)",
            true,
        ),
        header(
            "X-RateLimit-Remaining",
            "Events it may still send now",
            true,
        ),
        header(
            "X-RateLimit-Reset",
            "Seconds until the oldest events counted in the window leave it and \
             `X-RateLimit-Remaining` grows; 0 when the window counts none",
            true,
        ),
        header(
            "Retry-After",
            "Seconds until the limit frees room again (on a 200: sent only when \
             `rejected` > 0)",
            retry_after_required,
        ),
    ]
}

impl IntoResponse for IngestResponse {
    fn into_response(self) -> Response {
        let retry_after = self.body.rejected > 0;
        let mut response = Json(self.body).into_response();
        let headers = response.headers_mut();
        for (name, value) in rate_limit_headers(&self.rate) {
            headers.insert(name, HeaderValue::from(value));
        }
        if retry_after {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(self.rate.reset_seconds),
            );
        }
        response
    }
}

impl ApiResponse for IngestResponse {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "The first `accepted` events of the batch were stored, in order. \
                              `rejected` > 0: the rate limit cut the batch; send the last \
                              `rejected` events again after `Retry-After` seconds",
                status: Some(200),
                status_range: None,
                content: vec![MetaMediaType {
                    content_type: <Json<IngestedEvents> as Payload>::CONTENT_TYPE,
                    schema: <Json<IngestedEvents> as Payload>::schema_ref(),
                }],
                headers: rate_limit_meta(false),
            }],
        }
    }

    fn register(registry: &mut Registry) {
        IngestedEvents::register(registry);
    }
}

/// The errors of `POST /v1/ingest/events`: [`ApiError`]'s, plus the 429 of
/// the rate limit with its headers, which only this endpoint answers.
#[derive(Debug)]
pub struct IngestError(ApiError);

impl<E: Into<ApiError>> From<E> for IngestError {
    fn from(err: E) -> Self {
        IngestError(err.into())
    }
}

impl From<IngestError> for poem::Error {
    /// The inner [`ApiError`] itself, so the app's error handler finds it
    /// and renders it like every other problem.
    fn from(err: IngestError) -> Self {
        err.0.into()
    }
}

impl ApiResponse for IngestError {
    fn meta() -> MetaResponses {
        let mut meta = ApiError::meta();
        meta.responses.push(MetaResponse {
            description: "The token's rate limit is used up: no event of the batch was stored",
            status: Some(429),
            status_range: None,
            content: vec![MetaMediaType {
                content_type: "application/problem+json",
                schema: Problem::schema_ref(),
            }],
            headers: rate_limit_meta(true),
        });
        meta
    }

    fn register(registry: &mut Registry) {
        ApiError::register(registry);
    }
}

/// The ingest endpoint.
pub struct IngestApi {
    pub(crate) pool: PgPool,
    /// Events one token may send per sliding minute (`MAX_EVENTS_PER_MINUTE`).
    pub(crate) max_events_per_minute: u32,
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Ingest")]
impl IngestApi {
    /// Report events for a run
    ///
    /// Stores 1 to 100 events for a run that is running, or whose latest
    /// attempt ended at most 60 s ago (else 409), under the run's current
    /// attempt. Each token may send `MAX_EVENTS_PER_MINUTE` events (default
    /// 300) per sliding minute, counted in events across every API process:
    /// a batch that crosses the limit is stored up to it (200, `rejected` >
    /// 0, `Retry-After`), one that finds none left gets 429. Every answer
    /// of both carries `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
    /// `X-RateLimit-Reset`. An event whose `data` exceeds 64 KB as compact
    /// JSON is stored as `{"truncated": true, "original_bytes": n, "data":
    /// "<the start of its JSON text>"}`, within 64 KB, and flagged
    /// `truncated`.
    #[oai(
        path = "/ingest/events",
        method = "post",
        operation_id = "ingest_events"
    )]
    async fn ingest(
        &self,
        auth: TenantAuth,
        body: ApiJson<IngestEvents>,
    ) -> Result<IngestResponse, IngestError> {
        let caller = auth.0;
        caller.require(Scope::Ingest)?;
        let batch = body.0;
        batch.validate().map_err(|e| ApiError::Unprocessable(e.0))?;
        // The rate limit is the token's: its id keys the window.
        let token_key = caller.token_id.as_bytes().to_vec();
        let mut tx = self.pool.begin().await.map_err(ApiError::from)?;
        let ingested = ingest::ingest(
            &mut tx,
            IngestBatch {
                tenant: caller.tenant_id,
                // An ingest token writes only to its own project's runs;
                // another project's run answers 404, like another tenant's.
                project: caller.project_id,
                token_key: &token_key,
                run_id: batch.run_id,
                events: &batch.events,
                limit: self.max_events_per_minute,
                grace_seconds: INGEST_GRACE_SECONDS,
            },
        )
        .await?;
        tx.commit().await.map_err(ApiError::from)?;
        if ingested.accepted == 0 {
            return Err(ApiError::RateLimited(ingested.rate).into());
        }
        Ok(IngestResponse {
            body: IngestedEvents {
                accepted: ingested.accepted,
                rejected: ingested.rejected,
                truncated: ingested.truncated,
            },
            rate: ingested.rate,
        })
    }
}
