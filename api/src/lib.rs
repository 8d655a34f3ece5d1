//! runq-api: the REST API (poem + poem-openapi).
//!
//! Routes live under `/v1` behind bearer-token auth ([`auth`]); every error
//! becomes an `application/problem+json` document through [`error::ApiError`].
//! `/health`, `/ready`, `/metrics`, `/openapi.json` and `/docs` are
//! unauthenticated.
#![warn(missing_docs)]

pub mod audit;
pub mod auth;
pub mod body;
pub mod error;
pub mod ingest;
pub mod metrics;
mod params;
pub mod projects;
pub mod queues;
pub mod quotas;
pub mod runs;
pub mod schedules;
mod spec;
mod streams;
pub mod tokens;
pub mod webhooks;

use poem::listener::TcpListener;
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route, Server};
use poem_openapi::payload::PlainText;
use poem_openapi::{ApiResponse, OpenApi, OpenApiService};
use runq_shared::config::ApiConfig;
use sqlx::PgPool;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::audit::AuditApi;
use crate::error::ApiError;
use crate::ingest::IngestApi;
use crate::params::{Asked, Parameters};
use crate::projects::ProjectsApi;
use crate::queues::QueuesApi;
use crate::quotas::QuotasApi;
use crate::runs::RunsApi;
use crate::schedules::SchedulesApi;
use crate::streams::{Hub, StreamsApi};
use crate::tokens::TokensApi;
use crate::webhooks::WebhooksApi;

/// A future that resolves when the server should stop.
type Shutdown = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Answer of `GET /metrics`.
#[derive(ApiResponse)]
enum MetricsResponse {
    /// The figures, in the Prometheus text exposition format.
    #[oai(status = 200)]
    Metrics(PlainText<String>),
    /// The database could not be read.
    #[oai(status = 503)]
    Unavailable(PlainText<String>),
}

/// Answer of `GET /ready`.
#[derive(ApiResponse)]
enum ReadyResponse {
    /// The database answers and every migration is applied.
    #[oai(status = 200)]
    Ready(PlainText<String>),
    /// Not ready: the database is unreachable or migrations are missing.
    #[oai(status = 503)]
    NotReady(PlainText<String>),
}

struct HealthApi {
    pool: PgPool,
}

#[OpenApi]
impl HealthApi {
    /// Liveness: the process answers
    #[oai(path = "/health", method = "get", operation_id = "health")]
    async fn health(&self) -> PlainText<&'static str> {
        PlainText("ok")
    }

    /// Readiness: the database answers and migrations are applied
    #[oai(path = "/ready", method = "get", operation_id = "ready")]
    async fn ready(&self) -> ReadyResponse {
        match runq_shared::db::migrations_applied(&self.pool).await {
            Ok(true) => ReadyResponse::Ready(PlainText("ready".to_owned())),
            Ok(false) => ReadyResponse::NotReady(PlainText("migrations pending".to_owned())),
            Err(err) => ReadyResponse::NotReady(PlainText(format!("database unavailable: {err}"))),
        }
    }

    /// Metrics for Prometheus: the cluster's health
    ///
    /// `runq_oldest_transaction_age_seconds` (alert when it passes a few
    /// minutes: an open transaction stops vacuum from cleaning the queue),
    /// `runq_runs_dead_tuples`, `runq_runs_live_tuples` and
    /// `runq_live_workers`, read from Postgres at each scrape.
    #[oai(path = "/metrics", method = "get", operation_id = "metrics")]
    async fn metrics(&self) -> MetricsResponse {
        let gauges = async {
            let mut conn = self.pool.acquire().await?;
            runq_shared::db::workers::cluster_gauges(&mut conn).await
        };
        match gauges.await {
            Ok(gauges) => match crate::metrics::render(&gauges) {
                Ok(text) => MetricsResponse::Metrics(PlainText(text)),
                Err(err) => MetricsResponse::Unavailable(PlainText(format!("encoding: {err}"))),
            },
            Err(err) => {
                MetricsResponse::Unavailable(PlainText(format!("database unavailable: {err}")))
            }
        }
    }
}

/// Every group of endpoints.
type Apis = (
    RunsApi,
    StreamsApi,
    IngestApi,
    ProjectsApi,
    TokensApi,
    AuditApi,
    QuotasApi,
    WebhooksApi,
    SchedulesApi,
    QueuesApi,
    HealthApi,
);

/// The endpoints; event streams end when `closing` is cancelled.
fn service(
    pool: PgPool,
    config: &ApiConfig,
    closing: CancellationToken,
) -> OpenApiService<Apis, ()> {
    let runs = RunsApi {
        pool: pool.clone(),
        step_kinds: config.step_kinds.clone(),
    };
    let streams = StreamsApi {
        hub: std::sync::Arc::new(Hub::new(pool.clone(), config, closing)),
    };
    let ingest = IngestApi {
        pool: pool.clone(),
        max_events_per_minute: config.max_events_per_minute,
    };
    let projects = ProjectsApi { pool: pool.clone() };
    let tokens = TokensApi { pool: pool.clone() };
    let audit = AuditApi { pool: pool.clone() };
    let quotas = QuotasApi { pool: pool.clone() };
    let webhooks = WebhooksApi { pool: pool.clone() };
    let queues = QueuesApi { pool: pool.clone() };
    let schedules = SchedulesApi {
        pool: pool.clone(),
        step_kinds: config.step_kinds.clone(),
    };
    OpenApiService::new(
        (
            runs,
            streams,
            ingest,
            projects,
            tokens,
            audit,
            quotas,
            webhooks,
            schedules,
            queues,
            HealthApi { pool },
        ),
        "runq",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "A Postgres-native run queue. Submit runs (pipelines of steps); workers claim \
             them FIFO with FOR UPDATE SKIP LOCKED and execute them. Errors are \
             application/problem+json documents.",
    )
    .license("Apache-2.0")
}

/// The OpenAPI document the API serves at `/openapi.json`, as committed in
/// `openapi/openapi.json`.
pub fn spec() -> String {
    let config = ApiConfig {
        listen: String::new(),
        max_body_bytes: 0,
        step_kinds: Vec::new(),
        max_events_per_minute: 300,
        max_streams: 0,
        max_streams_per_tenant: 0,
        stream_keep_alive_seconds: 15,
    };
    // The pool is never used: building the document makes no connection, and
    // without lifetimes or minimum connections it spawns no maintenance task,
    // so this works outside a runtime.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_lifetime(None)
        .idle_timeout(None)
        .min_connections(0)
        .connect_lazy("postgres://localhost/spec")
        .expect("a constant URL parses");
    spec::finish(&service(pool, &config, CancellationToken::new()).spec())
}

/// The whole application: routes, docs, body limit and problem+json errors.
/// Its event streams never end by themselves; [`serve`] ends them when it
/// shuts down.
pub fn app(pool: PgPool, config: &ApiConfig) -> impl Endpoint {
    app_until(pool, config, CancellationToken::new())
}

/// [`app`], with event streams that end when `closing` is cancelled.
fn app_until(pool: PgPool, config: &ApiConfig, closing: CancellationToken) -> impl Endpoint {
    let api = service(pool.clone(), config, closing);
    let docs = api.swagger_ui();
    let document = spec::for_deployment(&spec::finish(&api.spec()), &config.step_kinds);
    let parameters = std::sync::Arc::new(Parameters::new(&document));
    let spec = poem::endpoint::make_sync(move |_| {
        poem::Response::builder()
            .content_type("application/json")
            .body(document.clone())
    });
    let max_body = config.max_body_bytes;
    Route::new()
        .nest("/", api)
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .data(pool)
        .around(move |endpoint, request| {
            let parameters = parameters.clone();
            async move {
                let asked = Asked {
                    method: request.method().clone(),
                    path: request.uri().path().to_owned(),
                    query: request.uri().query().map(str::to_owned),
                };
                limit_body(endpoint, request, max_body)
                    .await
                    .map_err(|err| match parameters.explain(&err, &asked) {
                        Some(explained) => explained.into(),
                        None => err,
                    })
            }
        })
        .catch_all_error(
            |err: poem::Error| async move { ApiError::from_poem(&err).into_response() },
        )
}

/// Refuses bodies over `max` bytes with 413 before a handler reads them:
/// declared ones by their `Content-Length`, chunked ones by reading at most
/// `max + 1` bytes.
async fn limit_body<E: Endpoint>(
    endpoint: std::sync::Arc<E>,
    mut request: Request,
    max: usize,
) -> poem::Result<Response> {
    let declared = request
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > max as u64 => return Err(ApiError::PayloadTooLarge(max).into()),
        Some(_) => {}
        None => {
            let mut body = Vec::new();
            request
                .take_body()
                .into_async_read()
                .take(max as u64 + 1)
                .read_to_end(&mut body)
                .await
                .map_err(|err| ApiError::BadRequest(format!("reading the body: {err}")))?;
            if body.len() > max {
                return Err(ApiError::PayloadTooLarge(max).into());
            }
            request.set_body(body);
        }
    }
    Ok(endpoint.call(request).await?.into_response())
}

/// Serves the API on `config.listen` until `shutdown` resolves.
///
/// # Errors
///
/// The address cannot be bound.
pub async fn serve(
    pool: PgPool,
    config: &ApiConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (app, shutdown) = closing_streams(pool, config, shutdown);
    Server::new(TcpListener::bind(config.listen.clone()))
        .run_with_graceful_shutdown(app, shutdown, None)
        .await
}

/// The app and a shutdown signal that also ends its event streams: they
/// never end by themselves, and a graceful shutdown waits for every open
/// response.
fn closing_streams(
    pool: PgPool,
    config: &ApiConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (impl Endpoint, Shutdown) {
    let closing = CancellationToken::new();
    let app = app_until(pool, config, closing.clone());
    let shutdown: Shutdown = Box::pin(async move {
        shutdown.await;
        closing.cancel();
    });
    (app, shutdown)
}

/// Serves the API on an already bound listener (tests and `runq dev` bind port 0).
///
/// # Errors
///
/// Accepting connections fails.
pub async fn serve_on(
    listener: std::net::TcpListener,
    pool: PgPool,
    config: &ApiConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let acceptor = poem::listener::TcpAcceptor::from_tokio(listener)?;
    let (app, shutdown) = closing_streams(pool, config, shutdown);
    Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(app, shutdown, None)
        .await
}
