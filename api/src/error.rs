//! The API's one error type and its one conversion to `application/problem+json`.
//! Handlers return [`ApiError`]; they never build status codes.

use chrono::{DateTime, Utc};
use poem::error::ResponseError;
use poem::http::{header, HeaderValue, StatusCode};
use poem::{Body, IntoResponse, Response};
use poem_openapi::registry::{MetaMediaType, MetaResponse, MetaResponses, Registry};
use poem_openapi::types::Type;
use poem_openapi::ApiResponse;
use runq_shared::db::ingest::RateLimit;
use runq_shared::quotas::Quota;
use runq_shared::{DbError, Problem};

/// Seconds a client should wait before retrying when the database is away.
const RETRY_AFTER_SECONDS: &str = "1";
/// Seconds a client should wait before opening a stream again after 429.
const STREAMS_RETRY_AFTER_SECONDS: &str = "5";

/// Everything a request can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed: the body is not JSON, or a path, query or
    /// header parameter does not fit its schema.
    #[error("{0}")]
    BadRequest(String),
    /// No valid bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// The token is valid but may not do this: it lacks the scope the
    /// endpoint needs, or a safety gate (the production override) refuses.
    #[error("{0}")]
    Forbidden(String),
    /// The resource does not exist for this tenant.
    #[error("{0}")]
    NotFound(String),
    /// The resource is in a state that forbids the operation.
    #[error("{0}")]
    Conflict(String),
    /// The path exists but not with this method; the methods it has go in
    /// the `Allow` header (RFC 9110).
    #[error("{detail}")]
    MethodNotAllowed {
        /// What was asked and what is allowed.
        detail: String,
        /// The methods the path has, comma separated.
        allow: String,
    },
    /// The body is larger than the server accepts.
    #[error("request body exceeds {0} bytes")]
    PayloadTooLarge(usize),
    /// The body is JSON but does not fit its schema (a missing, unknown or
    /// mistyped field, a value out of range), or its values are refused.
    #[error("{0}")]
    Unprocessable(String),
    /// A tenant's quota refuses the request: 429 for a rate
    /// (`runs_per_day`), 403 for a hard cap.
    #[error("{detail}")]
    QuotaExceeded {
        /// The quota's name.
        quota: Quota,
        /// The tenant's limit.
        limit: i64,
        /// Current use.
        used: i64,
        /// When enough use frees up (rates only).
        resets_at: Option<DateTime<Utc>>,
        /// The message, naming all of the above.
        detail: String,
    },
    /// The token's ingest rate limit is used up; the response carries the
    /// `X-RateLimit-*` and `Retry-After` headers.
    #[error("this token's ingest limit of {} events per minute is used up; retry in {} s", .0.limit, .0.reset_seconds)]
    RateLimited(RateLimit),
    /// Too many event streams are open: the tenant's on this process, or
    /// the process's in all.
    #[error("{0}")]
    TooManyStreams(String),
    /// The database cannot be reached right now.
    #[error("the database is unavailable; retry shortly")]
    Unavailable,
    /// A bug or an unexpected database error; details are logged, not returned.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request", "Bad request"),
            ApiError::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Missing or invalid token",
            ),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict"),
            ApiError::MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
            ),
            ApiError::PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
            ),
            ApiError::Unprocessable(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-run",
                "Invalid request body",
            ),
            ApiError::QuotaExceeded { quota, .. } if quota.is_rate() => (
                StatusCode::TOO_MANY_REQUESTS,
                "quota-exceeded",
                "Quota exceeded",
            ),
            ApiError::QuotaExceeded { .. } => {
                (StatusCode::FORBIDDEN, "quota-exceeded", "Quota exceeded")
            }
            ApiError::RateLimited(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
            ),
            ApiError::TooManyStreams(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-streams",
                "Too many streams",
            ),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
            ),
        }
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        let (status, slug, title) = self.parts();
        Problem {
            problem_type: format!("urn:runq:problem:{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
        }
    }

    /// Maps a poem error (routing, body parsing, auth) to the API's error.
    pub fn from_poem(err: &poem::Error) -> Self {
        if let Some(api) = err.downcast_ref::<ApiError>() {
            return api.clone();
        }
        let detail = err.to_string();
        match err.status() {
            StatusCode::UNAUTHORIZED => ApiError::Unauthorized(
                "send 'Authorization: Bearer <token>' with a valid runq token".to_owned(),
            ),
            StatusCode::NOT_FOUND => ApiError::NotFound(detail),
            // The API's middleware answers 405s with the path's methods
            // (`Parameters::explain`); this is the fallback without them.
            StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed {
                detail,
                allow: String::new(),
            },
            StatusCode::UNPROCESSABLE_ENTITY => ApiError::Unprocessable(detail),
            status if status.is_client_error() => ApiError::BadRequest(detail),
            _ => {
                tracing::error!(error = %detail, "unhandled error");
                ApiError::Internal
            }
        }
    }
}

impl From<DbError> for ApiError {
    fn from(err: DbError) -> Self {
        match err {
            DbError::RunNotFound(_)
            | DbError::ProjectNotFound(_)
            | DbError::TokenNotFound(_)
            | DbError::TenantNotFound(_)
            | DbError::WebhookNotFound(_)
            | DbError::ScheduleNotFound(_)
            | DbError::DeliveryNotFound(_) => ApiError::NotFound(err.to_string()),
            DbError::TooManyWebhooks(_) => ApiError::Forbidden(err.to_string()),
            DbError::DeliveryInFlight(_) => ApiError::Conflict(err.to_string()),
            DbError::ProductionRefused { .. } => ApiError::Forbidden(err.to_string()),
            DbError::ProjectNameTaken(_)
            | DbError::ScheduleNameTaken(_)
            | DbError::WrongStatus { .. }
            | DbError::RunNotIngesting { .. } => ApiError::Conflict(err.to_string()),
            DbError::Invalid(invalid) => ApiError::Unprocessable(invalid.0),
            DbError::IdempotencyMismatch(_) => ApiError::Unprocessable(err.to_string()),
            DbError::QuotaExceeded {
                quota,
                limit,
                used,
                resets_at,
                ..
            } => ApiError::QuotaExceeded {
                quota,
                limit,
                used,
                resets_at,
                detail: err.to_string(),
            },
            err if err.is_unavailable() => {
                tracing::warn!(error = %err, "database unavailable");
                ApiError::Unavailable
            }
            err => {
                tracing::error!(error = %err, "database error");
                ApiError::Internal
            }
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        DbError::from(err).into()
    }
}

impl ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        self.parts().0
    }

    fn as_response(&self) -> Response {
        let problem = self.problem();
        let body = match self {
            ApiError::QuotaExceeded {
                quota,
                limit,
                used,
                resets_at,
                ..
            } => {
                // RFC 9457 extension members, so clients need not parse `detail`.
                let mut value = serde_json::to_value(&problem).unwrap_or_default();
                if let Some(members) = value.as_object_mut() {
                    members.insert("quota".to_owned(), quota.as_str().into());
                    members.insert("limit".to_owned(), (*limit).into());
                    members.insert("used".to_owned(), (*used).into());
                    members.insert(
                        "resets_at".to_owned(),
                        resets_at.map(|at| at.to_rfc3339()).into(),
                    );
                }
                serde_json::to_vec(&value).unwrap_or_default()
            }
            _ => serde_json::to_vec(&problem).unwrap_or_default(),
        };
        let mut response = Response::builder()
            .status(self.status())
            .header(header::CONTENT_TYPE, "application/problem+json")
            .body(Body::from(body));
        match self {
            ApiError::Unavailable => {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECONDS),
                );
            }
            ApiError::TooManyStreams(_) => {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(STREAMS_RETRY_AFTER_SECONDS),
                );
            }
            ApiError::Unauthorized(_) => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed { allow, .. } => {
                if let Ok(value) = HeaderValue::from_str(allow) {
                    response.headers_mut().insert(header::ALLOW, value);
                }
            }
            ApiError::QuotaExceeded {
                quota,
                limit,
                used,
                resets_at,
                ..
            } if quota.is_rate() => {
                let headers = response.headers_mut();
                headers.insert("x-ratelimit-limit", HeaderValue::from(*limit));
                headers.insert(
                    "x-ratelimit-remaining",
                    HeaderValue::from((limit - used).max(0)),
                );
                if let Some(at) = resets_at {
                    // Whole seconds, rounded up, so a client retrying on time
                    // is never early.
                    let wait = (*at - Utc::now()).num_milliseconds().max(0);
                    let seconds = ((wait + 999) / 1000).max(1);
                    headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                    // Seconds until the reset, as for ingest's limit and as
                    // the IETF RateLimit draft counts it.
                    headers.insert("x-ratelimit-reset", HeaderValue::from(seconds));
                }
            }
            ApiError::RateLimited(rate) => {
                let headers = response.headers_mut();
                for (name, value) in rate_limit_headers(rate) {
                    headers.insert(name, HeaderValue::from(value));
                }
                headers.insert(header::RETRY_AFTER, HeaderValue::from(rate.reset_seconds));
            }
            _ => {}
        }
        response
    }
}

/// The `X-RateLimit-*` headers describing `rate`: the limit per minute, what
/// is left of it now, and the seconds until the oldest events counted leave
/// the window.
pub(crate) fn rate_limit_headers(rate: &RateLimit) -> [(&'static str, u32); 3] {
    [
        ("x-ratelimit-limit", rate.limit),
        ("x-ratelimit-remaining", rate.remaining),
        ("x-ratelimit-reset", rate.reset_seconds),
    ]
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.as_response()
    }
}

/// Every status an endpoint may answer with a problem document.
const PROBLEM_STATUSES: [(u16, &str); 10] = [
    (
        400,
        "Malformed request: the body is not JSON (or not sent as `application/json`), \
         or a path, query or header parameter does not fit its schema; `detail` names \
         the parameter as in the URL",
    ),
    (
        401,
        "Missing, unknown or revoked bearer token (one answer for all three)",
    ),
    (
        403,
        "The token lacks the scope this endpoint needs (`detail` names it), the run \
         names a `prod` project whose production override is off, or a hard quota \
         refuses the request (`projects`: `detail` and the extension members `quota`, \
         `limit`, `used` and `resets_at` (null) say which and how far)",
    ),
    (404, "No such resource for this tenant"),
    (
        409,
        "The resource's state forbids the operation (the run's status, a project name \
         already taken)",
    ),
    (413, "The body is too large"),
    (
        422,
        "The body is JSON but does not fit its schema (a missing, unknown or mistyped \
         field, a value out of range) or its values are refused; `detail` names the \
         field by its path in the body, such as `steps[0].kind`",
    ),
    (
        429,
        "A rate refuses the request: the quota `runs_per_day` (the runs accepted in the \
         last 24 hours; `detail` and the extension members `quota`, `limit`, `used` and \
         `resets_at` say which and until when) or a token's ingest limit (events per \
         minute). `Retry-After` and `X-RateLimit-Reset` give the seconds until enough \
         frees up, `X-RateLimit-Limit` and `X-RateLimit-Remaining` the figures. On the \
         event streams: too many open, the tenant's on one API process \
         (`RUNQ_MAX_STREAMS_PER_TENANT`) or the process's (`RUNQ_MAX_STREAMS`), with \
         `Retry-After`",
    ),
    (
        503,
        "The database is unavailable; retry after `Retry-After` seconds",
    ),
    (500, "Internal error"),
];

impl ApiResponse for ApiError {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: PROBLEM_STATUSES
                .iter()
                .map(|(status, description)| MetaResponse {
                    description,
                    status: Some(*status),
                    status_range: None,
                    content: vec![MetaMediaType {
                        content_type: "application/problem+json",
                        schema: Problem::schema_ref(),
                    }],
                    headers: vec![],
                })
                .collect(),
        }
    }

    fn register(registry: &mut Registry) {
        Problem::register(registry);
    }
}
