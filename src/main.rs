//! `runq`: the one binary. Subcommands compose the crates; no logic of their
//! own beyond wiring, signals and printing.

mod bench;
mod client;

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use runq_shared::config::{ApiConfig, DatabaseArgs, QuotaArgs, WorkerConfig};
use runq_shared::db;
use runq_shared::quotas::{Plan, TenantQuotas};
use runq_worker::Worker;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "runq", version, about = "A Postgres-native run queue")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the REST API.
    Api {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        api: ApiConfig,
        #[command(flatten)]
        quotas: QuotaArgs,
        /// Do not apply pending migrations at start.
        #[arg(long, env = "RUNQ_NO_MIGRATE", value_parser = clap::builder::BoolishValueParser::new())]
        no_migrate: bool,
    },
    /// Claim and execute runs until SIGTERM, SIGINT or SIGHUP.
    Worker {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        worker: WorkerConfig,
        #[command(flatten)]
        quotas: QuotaArgs,
        /// Do not apply pending migrations at start.
        #[arg(long, env = "RUNQ_NO_MIGRATE", value_parser = clap::builder::BoolishValueParser::new())]
        no_migrate: bool,
    },
    /// API and a worker in one process, on a database found without
    /// configuration; prints a token and the docs URL. A throwaway cluster it
    /// started is stopped on SIGINT, SIGTERM or SIGHUP (closing the terminal).
    Dev {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        throwaway: runq_devtools::postgres::ThrowawayArgs,
        #[command(flatten)]
        api: ApiConfig,
        #[command(flatten)]
        worker: WorkerConfig,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
    /// Apply pending migrations and exit.
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Create tenants and set their quotas, directly in the database (for
    /// an operator); audited as `operator:<user>`.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Issue and revoke API tokens, directly in the database (for an
    /// operator); audited as `operator:<user>`.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Pause, resume and limit queues fleet-wide, directly in the database
    /// (for an operator).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Submit a run through the API.
    Enqueue(client::EnqueueArgs),
    /// Show a run, its steps and its failed attempts; the exit status says
    /// how the run ended.
    #[command(after_help = client::EXIT_CODES)]
    Status(client::StatusArgs),
    /// Follow a run's events until it finishes; the exit status says how it
    /// ended.
    #[command(after_help = client::EXIT_CODES)]
    Tail(client::TailArgs),
    /// Print the OpenAPI document (as committed in openapi/openapi.json).
    Openapi,
    /// The load tool: enqueue, drain and latency figures as one JSON line.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create tenant NAME (or set the plan of an existing one) and print its
    /// id.
    Create {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The tenant's name.
        name: String,
        /// The plan its quotas follow (a new tenant without one gets
        /// `RUNQ_DEFAULT_PLAN`).
        #[arg(long, value_enum)]
        plan: Option<Plan>,
    },
    /// Show a tenant's quotas, or change its plan and overrides; prints the
    /// quotas as they then stand, as JSON (`GET /v1/quotas`'s document).
    Quota {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The tenant's name.
        name: String,
        /// Put the tenant on this plan.
        #[arg(long, value_enum)]
        plan: Option<Plan>,
        /// Override one quota: `runs_per_day=100`, or `runs_per_day=plan` to
        /// go back to the plan's number. Repeatable.
        #[arg(long = "set", value_name = "QUOTA=VALUE", value_parser = runq_shared::quotas::parse_setting)]
        set: Vec<(runq_shared::quotas::Quota, Option<i64>)>,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Change queue NAME's settings and print them as JSON. Workers honour
    /// them from their next claim.
    Set {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The queue's name.
        name: String,
        /// Stop claims from it (running runs finish).
        #[arg(long, conflicts_with = "resume")]
        pause: bool,
        /// Let workers claim from it again.
        #[arg(long)]
        resume: bool,
        /// Most runs of the queue running at once across the fleet, or `none`.
        #[arg(long, value_parser = parse_limit::<i32>)]
        concurrency: Option<Option<i32>>,
        /// Most runs of the queue started per second across the fleet, or `none`.
        #[arg(long, value_parser = parse_limit::<f64>)]
        rate: Option<Option<f64>>,
    },
    /// Print every queue with settings as JSON.
    List {
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

/// `none` or a number.
fn parse_limit<T: std::str::FromStr>(text: &str) -> Result<Option<T>, String> {
    if text == "none" {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| format!("'{text}' is neither a number nor 'none'"))
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue a token and print it; it is shown this once (only its digest
    /// is stored).
    Create {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The tenant's name (`runq tenant create` makes one).
        #[arg(long, env = "RUNQ_TENANT")]
        tenant: String,
        /// What the token may do: admin, runs, ingest (comma separated).
        #[arg(long, value_delimiter = ',', required = true, value_parser = parse_scope)]
        scope: Vec<runq_shared::Scope>,
        /// The project an ingest token is bound to.
        #[arg(long)]
        project: Option<uuid::Uuid>,
        /// A label for the token.
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// Revoke token ID (its id, as `GET /v1/tokens` lists it): refused from
    /// the next request on.
    Revoke {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The token's id.
        id: uuid::Uuid,
    },
}

fn parse_scope(name: &str) -> Result<runq_shared::Scope, String> {
    runq_shared::Scope::parse(name)
        .ok_or_else(|| format!("unknown scope '{name}'; expected admin, runs or ingest"))
}

/// Who the audit log names for an operator's CLI action.
fn operator() -> db::audit::Actor {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned());
    db::audit::Actor::Operator(user)
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("runq: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("runq: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the command; the exit status is 0 unless the command reports
/// otherwise (`status` and `tail` report how the run ended).
async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Api {
            database,
            api,
            quotas,
            no_migrate,
        } => {
            quotas.apply();
            let pool = connect(&database, !no_migrate).await?;
            tracing::info!(listen = %api.listen, "api listening");
            runq_api::serve(pool, &api, shutdown_signal()?.cancelled_owned())
                .await
                .with_context(|| format!("serving on {}", api.listen))?;
        }
        Command::Worker {
            database,
            worker,
            quotas,
            no_migrate,
        } => {
            quotas.apply();
            let pool = connect(&database, !no_migrate).await?;
            Worker::new(pool, worker).run(shutdown_signal()?).await?;
        }
        Command::Dev {
            database,
            throwaway,
            api,
            worker,
            quotas,
        } => {
            quotas.apply();
            dev(database, throwaway, api, worker).await?
        }
        Command::Migrate { database } => {
            let Some(url) = database.url.as_deref() else {
                bail!("no database: set DATABASE_URL or pass --database-url");
            };
            create_database_for(url).await?;
            open_pool(url, &database, true).await?;
            println!("migrations applied");
        }
        Command::Tenant { command } => tenant_command(command).await?,
        Command::Token { command } => token_command(command).await?,
        Command::Queue { command } => queue_command(command).await?,
        Command::Enqueue(args) => client::enqueue(args).await?,
        Command::Status(args) => return client::status(args).await,
        Command::Tail(args) => return client::tail(args).await,
        Command::Openapi => println!("{}", runq_api::spec()),
        Command::Bench(args) => bench::run(args).await?,
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `runq tenant ...`: straight against the database, audited.
async fn tenant_command(command: TenantCommand) -> anyhow::Result<()> {
    match command {
        TenantCommand::Create {
            database,
            name,
            plan,
        } => {
            let pool = connect(&database, true).await?;
            let mut tx = pool.begin().await?;
            let (id, created) = db::tenants::create(&mut tx, &name).await?;
            db::audit::record(
                &mut tx,
                id,
                &operator(),
                db::audit::TENANT_CREATE,
                &format!("tenant:{id}"),
                serde_json::json!({ "name": name, "created": created }),
            )
            .await?;
            if let Some(plan) = plan {
                let mut quotas = db::quotas::get(&mut tx, id).await?;
                quotas.plan = plan;
                db::quotas::change(&mut tx, id, &quotas, &operator()).await?;
            }
            tx.commit().await?;
            println!("{id}");
        }
        TenantCommand::Quota {
            database,
            name,
            plan,
            set,
        } => {
            let pool = connect(&database, true).await?;
            let mut tx = pool.begin().await?;
            let tenant = db::tenants::find(&mut tx, &name).await?;
            if plan.is_some() || !set.is_empty() {
                let mut settings = db::quotas::get(&mut tx, tenant).await?;
                if let Some(plan) = plan {
                    settings.plan = plan;
                }
                for (quota, limit) in set {
                    settings.overrides.set(quota, limit);
                }
                db::quotas::change(&mut tx, tenant, &settings, &operator()).await?;
            }
            let report = db::quotas::report(&mut tx, tenant).await?;
            tx.commit().await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}

/// `runq queue ...`: straight against the database.
async fn queue_command(command: QueueCommand) -> anyhow::Result<()> {
    match command {
        QueueCommand::Set {
            database,
            name,
            pause,
            resume,
            concurrency,
            rate,
        } => {
            let pool = connect(&database, true).await?;
            let mut conn = pool.acquire().await?;
            let change = db::queues::QueueChange {
                paused: (pause || resume).then_some(pause),
                concurrency,
                rate_per_second: rate,
            };
            let settings = db::queues::set(&mut conn, &name, &change).await?;
            println!("{}", serde_json::to_string_pretty(&settings)?);
        }
        QueueCommand::List { database } => {
            let pool = connect(&database, true).await?;
            let mut conn = pool.acquire().await?;
            let queues = db::queues::list(&mut conn).await?;
            println!("{}", serde_json::to_string_pretty(&queues)?);
        }
    }
    Ok(())
}

/// `runq token ...`: straight against the database, audited.
async fn token_command(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            database,
            tenant,
            scope,
            project,
            name,
        } => {
            let pool = connect(&database, true).await?;
            let mut tx = pool.begin().await?;
            let tenant_id = db::tenants::find(&mut tx, &tenant)
                .await
                .with_context(|| format!("create it with `runq tenant create {tenant}`"))?;
            let issued = db::tokens::create(&mut tx, tenant_id, &name, &scope, project).await?;
            let token = &issued.token;
            db::audit::record(
                &mut tx,
                tenant_id,
                &operator(),
                db::audit::TOKEN_CREATE,
                &format!("token:{}", token.id),
                serde_json::json!({
                    "name": token.name, "scopes": token.scopes, "project_id": token.project_id,
                }),
            )
            .await?;
            tx.commit().await?;
            eprintln!(
                "token {} (shown once; runq stores only its digest):",
                token.id
            );
            println!("{}", issued.plaintext);
        }
        TokenCommand::Revoke { database, id } => {
            let pool = connect(&database, true).await?;
            let mut tx = pool.begin().await?;
            let (tenant_id, revoked) = db::tokens::revoke(&mut tx, None, id).await?;
            if revoked {
                db::audit::record(
                    &mut tx,
                    tenant_id,
                    &operator(),
                    db::audit::TOKEN_REVOKE,
                    &format!("token:{id}"),
                    serde_json::json!({}),
                )
                .await?;
            }
            tx.commit().await?;
            println!(
                "token {id} {}",
                if revoked {
                    "revoked"
                } else {
                    "was already revoked"
                }
            );
        }
    }
    Ok(())
}

/// Opens the pool for `database` and, if asked, applies migrations.
async fn connect(database: &DatabaseArgs, migrate: bool) -> anyhow::Result<PgPool> {
    let Some(url) = database.url.as_deref() else {
        bail!("no database: set DATABASE_URL or pass --database-url");
    };
    open_pool(url, database, migrate).await
}

async fn open_pool(url: &str, database: &DatabaseArgs, migrate: bool) -> anyhow::Result<PgPool> {
    let pool = db::pool(
        url,
        database.max_connections,
        Duration::from_millis(database.acquire_timeout_ms),
    )
    .context("parsing the database URL")?;
    if migrate {
        db::migrate(&pool).await.context("applying migrations")?;
    }
    Ok(pool)
}

/// Creates the database `url` names, through the same server's `postgres`
/// database, unless it exists.
async fn create_database_for(url: &str) -> anyhow::Result<()> {
    let mut admin = url::Url::parse(url).context("parsing the database URL")?;
    let name = admin.path().trim_start_matches('/').to_owned();
    if name.is_empty() {
        return Ok(());
    }
    admin.set_path("/postgres");
    runq_devtools::postgres::create_database(admin.as_str(), &name)
        .await
        .with_context(|| format!("creating database '{name}'"))?;
    Ok(())
}

/// A token cancelled on the first SIGTERM, SIGINT or SIGHUP. SIGHUP (the
/// terminal closed) must not kill the process outright: `runq dev` would
/// leave its throwaway cluster running.
///
/// The handlers are installed before this returns, so a signal arriving
/// any time after the call is caught, not acted on by its default action.
fn shutdown_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut hangup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
            _ = hangup.recv() => "SIGHUP",
        };
        tracing::info!(signal = name, "shutdown requested");
        cancel.cancel();
    });
    Ok(token)
}

async fn dev(
    database: DatabaseArgs,
    throwaway: runq_devtools::postgres::ThrowawayArgs,
    api: ApiConfig,
    mut worker: WorkerConfig,
) -> anyhow::Result<()> {
    // A local setup calls local servers: unless told otherwise, `http` steps
    // may reach loopback (never other internal addresses).
    if worker.outbound_allow.is_empty() {
        worker.outbound_allow = runq_worker::outbound::LOOPBACK.to_vec();
    }
    // Before the cluster starts, so a signal during start-up still ends with
    // the cluster stopped (when `picked` is dropped).
    let shutdown = shutdown_signal()?;
    let picked =
        runq_devtools::postgres::pick_database(database.url.as_deref(), "runq", &throwaway)
            .await
            .context("finding a database")?;
    if let Some(data_dir) = picked.throwaway_data_dir() {
        tracing::info!(data_dir = %data_dir.display(), "throwaway cluster started");
    }
    if shutdown.is_cancelled() {
        return Ok(());
    }
    let pool = open_pool(&picked.url, &database, true).await?;
    let mut conn = pool.acquire().await?;
    let tenant = db::tenants::ensure(&mut conn, "dev").await?;
    // A newcomer's first hundred runs must not meet the free tier's limits.
    db::quotas::set(&mut conn, tenant, &TenantQuotas::plan(Plan::Unlimited)).await?;
    let token = db::tenants::create_token(&mut conn, tenant, "dev").await?;
    drop(conn);
    let listener = std::net::TcpListener::bind(&api.listen)
        .with_context(|| format!("binding {}", api.listen))?;
    let address = listener.local_addr()?;
    // Every line after "paste" is a shell command that works as printed
    // (the suite runs them), so a newcomer can copy the block whole.
    println!("runq dev is up");
    println!("  database  {} ({})", redact(&picked.url), picked.source);
    println!("  api       http://{address}/v1");
    println!("  docs      http://{address}/docs");
    println!(
        "  outbound  internal addresses allowed: {} (RUNQ_OUTBOUND_ALLOW)",
        worker
            .outbound_allow
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!("paste into another shell, in this repository:");
    println!("export RUNQ_URL=http://{address}");
    println!("export RUNQ_TOKEN={token}");
    println!("{DEV_EXAMPLE}");
    println!();
    let worker_task = tokio::spawn(Worker::new(pool.clone(), worker).run(shutdown.clone()));
    let served = runq_api::serve_on(listener, pool, &api, shutdown.clone().cancelled_owned()).await;
    shutdown.cancel();
    let worker_result = worker_task.await.context("worker task")?;
    served.context("serving the API")?;
    worker_result?;
    drop(picked);
    Ok(())
}

/// What `runq dev` suggests running once `RUNQ_URL` and `RUNQ_TOKEN` are
/// set: a run that needs nothing but runq, followed to its end.
const DEV_EXAMPLE: &str = "\
ID=$(cargo run -q -- enqueue --step 'echo:{\"greeting\":\"hi\"}' --step 'sleep:{\"ms\":500}')
cargo run -q -- tail $ID";

/// The URL without its password, for printing.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}
