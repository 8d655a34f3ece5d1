//! Settings of the `runq` subcommands, as clap-derived structs with an `env`
//! variable on every option. The binary only composes them.

use clap::Args;

/// Where the database is.
#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// Postgres connection URL. `runq dev` and `runq bench` find or start a
    /// server when it is not set.
    #[arg(long = "database-url", env = "DATABASE_URL")]
    pub url: Option<String>,
    /// Connections in this process's pool.
    #[arg(
        long = "db-max-connections",
        env = "RUNQ_DB_MAX_CONNECTIONS",
        default_value_t = 16
    )]
    pub max_connections: u32,
    /// Milliseconds a request waits for a pooled connection before it is
    /// refused with 503.
    #[arg(
        long = "db-acquire-timeout-ms",
        env = "RUNQ_DB_ACQUIRE_TIMEOUT_MS",
        default_value_t = 3000
    )]
    pub acquire_timeout_ms: u64,
}

/// The HTTP API.
#[derive(Args, Debug, Clone)]
pub struct ApiConfig {
    /// Address to listen on.
    #[arg(long, env = "RUNQ_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    #[arg(long, env = "RUNQ_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Step kinds accepted beside the built-in `http`, `sleep`, `echo` and `fail`
    /// (kinds your workers register), comma separated.
    #[arg(long, env = "RUNQ_STEP_KINDS", value_delimiter = ',')]
    pub step_kinds: Vec<String>,
    /// Events one token may send to `POST /v1/ingest/events` per sliding
    /// minute, counted across every API process sharing the database.
    #[arg(
        long,
        env = "MAX_EVENTS_PER_MINUTE",
        default_value_t = 300,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_events_per_minute: u32,
    /// Event streams (`GET /v1/runs/{id}/events/stream`, `GET
    /// /v1/events/stream`) this process serves at once; more get 429.
    #[arg(long, env = "RUNQ_MAX_STREAMS", default_value_t = 1_000)]
    pub max_streams: usize,
    /// Event streams one tenant may hold open on this process at once; more
    /// get 429.
    #[arg(long, env = "RUNQ_MAX_STREAMS_PER_TENANT", default_value_t = 50)]
    pub max_streams_per_tenant: usize,
    /// Seconds between the comment lines an event stream sends while it has
    /// nothing else to send, so proxies do not cut it as idle. The server
    /// notices a client that left only when writing to it, so a departed
    /// client's stream ends within two of these.
    #[arg(
        long,
        env = "RUNQ_STREAM_KEEP_ALIVE_SECONDS",
        default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub stream_keep_alive_seconds: u64,
}

/// A worker process.
#[derive(Args, Debug, Clone)]
pub struct WorkerConfig {
    /// Queues to claim from, comma separated.
    #[arg(
        long,
        env = "RUNQ_QUEUES",
        value_delimiter = ',',
        default_value = "default"
    )]
    pub queues: Vec<String>,
    /// Runs executed at once.
    #[arg(long, env = "RUNQ_CONCURRENCY", default_value_t = 10)]
    pub concurrency: usize,
    /// Most runs claimed ahead of free slots and held locally (under lease)
    /// so an idle slot never waits for a round trip. The worker holds what
    /// it starts in a quarter second, at least its slot count (and 16), at
    /// most this: short runs get large claims, slow ones do not keep runs
    /// from other workers. 0 turns prefetch off.
    #[arg(long, env = "RUNQ_PREFETCH", default_value_t = 1_000)]
    pub prefetch: usize,
    /// Milliseconds between polls when no notification arrives.
    #[arg(long, env = "RUNQ_POLL_INTERVAL_MS", default_value_t = 1000)]
    pub poll_interval_ms: u64,
    /// Milliseconds a claim lasts without a heartbeat.
    #[arg(long, env = "RUNQ_LEASE_MS", default_value_t = 30_000)]
    pub lease_ms: u64,
    /// Milliseconds between heartbeats (extends all held leases in one statement).
    #[arg(long, env = "RUNQ_HEARTBEAT_MS", default_value_t = 5_000)]
    pub heartbeat_ms: u64,
    /// Milliseconds in-flight runs get to finish after SIGTERM before they are
    /// handed back to pending.
    #[arg(long, env = "RUNQ_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// Retry delay after a first failed attempt, in milliseconds; doubles per attempt.
    #[arg(long, env = "RUNQ_RETRY_BASE_MS", default_value_t = 1_000)]
    pub retry_base_ms: u64,
    /// Longest retry delay, in milliseconds.
    #[arg(long, env = "RUNQ_RETRY_MAX_MS", default_value_t = 3_600_000)]
    pub retry_max_ms: u64,
    /// Milliseconds between maintenance passes (lease rescue, stale workers).
    #[arg(long, env = "RUNQ_MAINTENANCE_MS", default_value_t = 1_000)]
    pub maintenance_ms: u64,
    /// Longest a run may take, in minutes; a run's own `timeout_seconds` is
    /// capped by it. A run past it is stopped (`stopped_quota`, reason
    /// `duration_cap`). Fractions are allowed.
    #[arg(long, env = "MAX_RUN_DURATION_MINUTES", default_value_t = 15.0)]
    pub max_run_duration_minutes: f64,
    /// Most bytes a step's output (and, separately, its events together, and
    /// an `http` step's reply body) may take; past it the step fails with
    /// reason `output_too_large`.
    #[arg(long, env = "RUNQ_MAX_OUTPUT_BYTES", default_value_t = 1024 * 1024)]
    pub max_output_bytes: usize,
    /// Most outcomes written by one completer transaction.
    #[arg(long, env = "RUNQ_COMPLETE_BATCH", default_value_t = 1_000)]
    pub complete_batch: usize,
    /// Hours a succeeded run is kept after it finished, with its steps and
    /// events (capped by the tenant's `retention_days` quota).
    #[arg(long, env = "RUNQ_RETAIN_SUCCEEDED_HOURS", default_value_t = 1.0)]
    pub retain_succeeded_hours: f64,
    /// Hours a failed, stopped or cancelled run is kept after it finished
    /// (capped by the tenant's `retention_days` quota).
    #[arg(long, env = "RUNQ_RETAIN_FAILED_HOURS", default_value_t = 24.0)]
    pub retain_failed_hours: f64,
    /// Milliseconds between passes of the pruner, which deletes finished runs
    /// past retention (with their steps and events) in batches of 500.
    #[arg(long, env = "RUNQ_PRUNE_MS", default_value_t = 10_000)]
    pub prune_ms: u64,
    /// Seconds after which a transaction open anywhere on the cluster is
    /// reported (WARN, every 30 s): it stops vacuum and holds back webhooks
    /// and streams. 0 turns the watch off.
    #[arg(long, env = "RUNQ_LONG_TRANSACTION_SECONDS", default_value_t = 300.0)]
    pub long_transaction_seconds: f64,
    /// The outbox relay and webhook deliveries.
    #[command(flatten)]
    pub relay: RelayConfig,
    /// Internal networks that `http` steps (and webhook deliveries) may
    /// reach, as CIDRs (`10.1.0.0/16`, `::1/128`; a bare address stands for
    /// itself), comma separated. Loopback, private, link-local (cloud
    /// metadata included) and other non-public addresses are refused unless
    /// listed here. Empty: none is reachable (`runq dev` allows loopback
    /// when this is empty).
    // The fully qualified `Vec` makes clap parse the whole value in one go,
    // so an empty value is an empty list rather than an invalid entry.
    #[arg(
        long,
        env = "RUNQ_OUTBOUND_ALLOW",
        default_value = "",
        hide_default_value = true,
        value_parser = parse_networks
    )]
    pub outbound_allow: ::std::vec::Vec<ipnet::IpNet>,
}

/// The outbox relay every worker runs: it fans new outbox rows out into
/// webhook deliveries and sends them. Relays on many workers cooperate.
#[derive(Args, Debug, Clone)]
pub struct RelayConfig {
    /// Whether this worker relays the outbox (`false` leaves it to others).
    #[arg(
        long = "relay",
        env = "RUNQ_RELAY",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub enabled: bool,
    /// Milliseconds between relay passes when nothing is due.
    #[arg(long, env = "RUNQ_RELAY_POLL_MS", default_value_t = 100)]
    pub relay_poll_ms: u64,
    /// Webhook deliveries this worker sends at once.
    #[arg(long, env = "RUNQ_RELAY_CONCURRENCY", default_value_t = 16)]
    pub relay_concurrency: usize,
    /// Deliveries of one subscription in flight at once across all relays,
    /// so a receiver that hangs holds only this many senders.
    #[arg(long, env = "RUNQ_WEBHOOK_IN_FLIGHT", default_value_t = 4)]
    pub webhook_in_flight: i64,
    /// Milliseconds a delivery attempt may take (connect, send, reply).
    #[arg(long, env = "RUNQ_WEBHOOK_TIMEOUT_MS", default_value_t = 10_000)]
    pub webhook_timeout_ms: u64,
    /// Attempts of a delivery before it is dead.
    #[arg(long, env = "RUNQ_WEBHOOK_MAX_ATTEMPTS", default_value_t = 10)]
    pub webhook_max_attempts: i32,
    /// Delay after a first failed attempt, in milliseconds; doubles per attempt.
    #[arg(long, env = "RUNQ_WEBHOOK_RETRY_BASE_MS", default_value_t = 5_000)]
    pub webhook_retry_base_ms: u64,
    /// Longest delay between attempts, in milliseconds.
    #[arg(long, env = "RUNQ_WEBHOOK_RETRY_MAX_MS", default_value_t = 3_600_000)]
    pub webhook_retry_max_ms: u64,
    /// Hours outbox rows are kept once the relay has passed them (streams
    /// can resume with `Last-Event-ID` within this window).
    #[arg(long, env = "RUNQ_OUTBOX_RETENTION_HOURS", default_value_t = 24.0)]
    pub outbox_retention_hours: f64,
    /// Hours delivered and dead deliveries stay visible through the API.
    #[arg(long, env = "RUNQ_DELIVERY_RETENTION_HOURS", default_value_t = 168.0)]
    pub delivery_retention_hours: f64,
    /// Milliseconds between passes that prune the outbox and finished
    /// deliveries past their retention.
    #[arg(long, env = "RUNQ_OUTBOX_PRUNE_MS", default_value_t = 60_000)]
    pub outbox_prune_ms: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            relay_poll_ms: 100,
            relay_concurrency: 16,
            webhook_in_flight: 4,
            webhook_timeout_ms: 10_000,
            webhook_max_attempts: 10,
            webhook_retry_base_ms: 5_000,
            webhook_retry_max_ms: 3_600_000,
            outbox_retention_hours: 24.0,
            delivery_retention_hours: 168.0,
            outbox_prune_ms: 60_000,
        }
    }
}

/// Parses a comma-separated list of networks (the allow-list): each entry
/// a CIDR network, or a bare address meaning that address alone (`/32` or
/// `/128`). Blank entries are skipped, so an empty value is an empty list.
///
/// # Errors
///
/// An entry is neither; the message names it.
pub fn parse_networks(list: &str) -> Result<Vec<ipnet::IpNet>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .parse::<ipnet::IpNet>()
                .map(|net| net.trunc())
                .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    format!("'{entry}' is not a CIDR network (such as 10.0.0.0/8 or ::1/128)")
                })
        })
        .collect()
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            queues: vec!["default".to_owned()],
            concurrency: 10,
            prefetch: 1_000,
            poll_interval_ms: 1000,
            lease_ms: 30_000,
            heartbeat_ms: 5_000,
            shutdown_grace_ms: 10_000,
            retry_base_ms: 1_000,
            retry_max_ms: 3_600_000,
            maintenance_ms: 1_000,
            complete_batch: 1_000,
            max_run_duration_minutes: 15.0,
            max_output_bytes: 1024 * 1024,
            retain_succeeded_hours: 1.0,
            retain_failed_hours: 24.0,
            prune_ms: 10_000,
            long_transaction_seconds: 300.0,
            relay: RelayConfig::default(),
            outbound_allow: Vec::new(),
        }
    }
}

/// Quota settings of a process that checks quotas (`api`, `worker`, `dev`).
#[derive(Args, Debug, Clone)]
pub struct QuotaArgs {
    /// Plan of tenants whose quotas no admin has set: `free` (the free tier's
    /// limits) or `unlimited`.
    #[arg(
        long,
        env = "RUNQ_DEFAULT_PLAN",
        value_enum,
        default_value_t = crate::quotas::Plan::Free
    )]
    pub default_plan: crate::quotas::Plan,
}

impl QuotaArgs {
    /// Makes these settings the process's (see
    /// [`crate::quotas::set_default_plan`]).
    pub fn apply(&self) {
        crate::quotas::set_default_plan(self.default_plan);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allow-list entries are CIDRs or bare addresses, comma separated;
    /// blank entries are skipped and anything else is refused with a
    /// message naming it.
    #[test]
    fn outbound_allow_parses_as_a_list_of_networks() {
        let list = |s: &str| {
            parse_networks(s).map(|nets| nets.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        assert_eq!(
            list("127.0.0.0/8, ::1/128"),
            Ok(vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()])
        );
        assert_eq!(list("10.1.2.3"), Ok(vec!["10.1.2.3/32".to_owned()]));
        assert_eq!(list("10.1.2.3/16"), Ok(vec!["10.1.0.0/16".to_owned()]));
        assert_eq!(list("fd00::1,"), Ok(vec!["fd00::1/128".to_owned()]));
        assert_eq!(list(""), Ok(vec![]));
        assert_eq!(list(" , "), Ok(vec![]));
        let refused = list("10.0.0.0/8,10.0.0.0/33").expect_err("prefix too long");
        assert!(refused.contains("'10.0.0.0/33'"), "{refused}");
        assert!(list("localhost").is_err());
    }
}
