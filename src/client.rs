//! Client subcommands: `enqueue`, `status`, `tail`. They speak to the REST API
//! with the same payload types the API serves.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use runq_shared::{CreateRun, EventPage, NewStep, Problem, Run};
use serde_json::Value;
use uuid::Uuid;

/// Where the API is and who we are.
#[derive(Args, Debug, Clone)]
pub struct ApiTarget {
    /// Base URL of the API.
    #[arg(long, env = "RUNQ_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Bearer token (`runq token create` or `runq dev` prints one).
    #[arg(long, env = "RUNQ_TOKEN")]
    pub token: String,
}

/// `runq enqueue`.
#[derive(Args, Debug)]
pub struct EnqueueArgs {
    #[command(flatten)]
    target: ApiTarget,
    /// Queue.
    #[arg(long, default_value = "default")]
    queue: String,
    /// Priority (higher first).
    #[arg(long, default_value_t = 0)]
    priority: i16,
    /// Attempts before the run fails.
    #[arg(long, default_value_t = 3)]
    max_attempts: i32,
    /// Idempotency key.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Print the created run as JSON instead of its id alone.
    #[arg(long)]
    json: bool,
    /// A step as `kind` or `kind:<json input>`, repeatable, in order.
    /// Example: --step 'echo:{"greeting":"hi"}' --step 'sleep:{"ms":500}'
    #[arg(long = "step", required = true)]
    steps: Vec<String>,
}

/// What the exit status of `runq status` and `runq tail` says about the run.
pub const EXIT_CODES: &str = "\
Exit status:
  0  the run succeeded (status: or is still pending or running)
  1  runq could not answer (API unreachable, run not found, bad token)
  2  bad command line
  3  the run failed (its attempts are used up)
  4  the run was cancelled
  5  the run was stopped by its duration cap (stopped_quota)";

/// `runq status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    target: ApiTarget,
    /// Print the run with its steps as the API returns it (JSON) instead of
    /// a summary.
    #[arg(long)]
    json: bool,
    /// The run.
    id: Uuid,
}

/// `runq tail`.
#[derive(Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    target: ApiTarget,
    /// The run.
    id: Uuid,
}

/// The exit status for a run in `status` (a status name as the API spells
/// it); see [`EXIT_CODES`].
fn exit_code(status: &str) -> ExitCode {
    match status {
        "failed" => ExitCode::from(3),
        "cancelled" => ExitCode::from(4),
        "stopped_quota" => ExitCode::from(5),
        _ => ExitCode::SUCCESS,
    }
}

fn parse_step(position: usize, spec: &str) -> anyhow::Result<NewStep> {
    let (kind, input) = match spec.split_once(':') {
        Some((kind, json)) => (
            kind,
            serde_json::from_str(json)
                .with_context(|| format!("step {position}: input '{json}' is not JSON"))?,
        ),
        None => (spec, serde_json::Value::Object(Default::default())),
    };
    Ok(NewStep::new(format!("{kind}-{position}"), kind, input))
}

async fn answer<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> anyhow::Result<T> {
    let status = response.status();
    let body = response.bytes().await.context("reading the reply")?;
    if status.is_success() {
        return serde_json::from_slice(&body).context("decoding the reply");
    }
    match serde_json::from_slice::<Problem>(&body) {
        Ok(problem) => bail!("{} {}: {}", problem.status, problem.title, problem.detail),
        Err(_) => bail!("{status}: {}", String::from_utf8_lossy(&body)),
    }
}

/// Submits one run and prints its id (or, with `--json`, the run).
pub async fn enqueue(args: EnqueueArgs) -> anyhow::Result<()> {
    let steps = args
        .steps
        .iter()
        .enumerate()
        .map(|(position, spec)| parse_step(position, spec))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut body = CreateRun::new(steps);
    body.queue = args.queue;
    body.priority = args.priority;
    body.max_attempts = args.max_attempts;
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/runs", args.target.url.trim_end_matches('/')))
        .bearer_auth(&args.target.token)
        .json(&body);
    if let Some(key) = &args.idempotency_key {
        request = request.header("Idempotency-Key", key);
    }
    let run: Run = answer(
        request
            .send()
            .await
            .with_context(|| format!("sending the run to {}", args.target.url))?,
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&run)?);
    } else {
        println!("{}", run.id);
    }
    Ok(())
}

/// The run with its steps, as JSON: read loosely so that fields this client
/// does not know (added to the API later) are still shown by `--json`.
async fn fetch(client: &reqwest::Client, target: &ApiTarget, id: Uuid) -> anyhow::Result<Value> {
    let url = format!("{}/v1/runs/{id}", target.url.trim_end_matches('/'));
    answer(
        client
            .get(url)
            .bearer_auth(&target.token)
            .send()
            .await
            .with_context(|| format!("fetching run {id} from {}", target.url))?,
    )
    .await
}

fn status_of(detail: &Value) -> anyhow::Result<&str> {
    detail
        .get("status")
        .and_then(Value::as_str)
        .context("the API's run has no status")
}

/// Prints a run with its steps and its failed attempts; the exit status says
/// how it ended (see [`EXIT_CODES`]).
pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let detail = fetch(&reqwest::Client::new(), &args.target, args.id).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&detail)?);
    } else {
        print!("{}", summary(&detail));
    }
    Ok(exit_code(status_of(&detail)?))
}

/// Prints a run's events as they arrive, one JSON line each, until the run
/// reaches a terminal status, then the run as a last JSON line; the run's
/// summary (with its failed attempts) goes to stderr. The exit status says
/// how it ended (see [`EXIT_CODES`]).
pub async fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::new();
    let base = args.target.url.trim_end_matches('/').to_owned();
    let mut after = 0i64;
    loop {
        let detail = fetch(&client, &args.target, args.id).await?;
        let finished = matches!(
            status_of(&detail)?,
            "succeeded" | "failed" | "cancelled" | "stopped_quota"
        );
        loop {
            let url = format!("{base}/v1/runs/{}/events?after={after}&limit=500", args.id);
            let page: EventPage = answer(
                client
                    .get(url)
                    .bearer_auth(&args.target.token)
                    .send()
                    .await
                    .context("fetching events")?,
            )
            .await?;
            for event in &page.events {
                println!("{}", serde_json::to_string(event)?);
                after = event.id;
            }
            if page.next_cursor.is_none() {
                break;
            }
        }
        if finished {
            let mut run = detail.clone();
            if let Some(object) = run.as_object_mut() {
                object.remove("steps");
            }
            println!("{}", serde_json::to_string(&run)?);
            eprint!("{}", summary(&detail));
            return Ok(exit_code(status_of(&detail)?));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A JSON value as a short string: strings bare, anything else as JSON.
fn show(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

/// One failed attempt (an element of the run's `errors`, or its `error`).
fn attempt_line(error: &Value) -> String {
    let mut line = String::from("  ");
    if let Some(attempt) = error.get("attempt") {
        line.push_str(&format!("attempt {} ", show(Some(attempt))));
    }
    if let Some(at) = error.get("at") {
        line.push_str(&format!("at {} ", show(Some(at))));
    }
    if let Some(position) = error.get("position").filter(|p| !p.is_null()) {
        line.push_str(&format!("step {} ", show(Some(position))));
    }
    line.push_str(&format!(
        "{}: {}",
        show(error.get("reason")),
        show(error.get("message"))
    ));
    if let Some(worker) = error.get("worker_id").filter(|w| !w.is_null()) {
        line.push_str(&format!(" (worker {})", show(Some(worker))));
    }
    line.push('\n');
    line
}

/// A run with its steps, for people: status and attempts, each step, the
/// result, and every failed attempt (the API's `errors`, oldest first; its
/// `error`, the latest, when it has no `errors`).
fn summary(detail: &Value) -> String {
    let field = |name: &str| show(detail.get(name));
    let mut out = format!(
        "run {}  {}  attempt {} of {}  queue {}\n",
        field("id"),
        field("status"),
        field("attempt"),
        field("max_attempts"),
        field("queue"),
    );
    for (label, name) in [
        ("created ", "created_at"),
        ("started ", "started_at"),
        ("finished", "finished_at"),
    ] {
        if detail.get(name).is_some_and(|v| !v.is_null()) {
            out.push_str(&format!("  {label}  {}\n", field(name)));
        }
    }
    if let Some(steps) = detail.get("steps").and_then(Value::as_array) {
        out.push_str("steps\n");
        for step in steps {
            let get = |name: &str| show(step.get(name));
            out.push_str(&format!(
                "  {} {} ({})  {}  attempt {}\n",
                get("position"),
                get("name"),
                get("kind"),
                get("status"),
                get("attempt"),
            ));
        }
    }
    if detail.get("result").is_some_and(|v| !v.is_null()) {
        out.push_str(&format!("result  {}\n", field("result")));
    }
    match detail.get("errors").and_then(Value::as_array) {
        Some(errors) if !errors.is_empty() => {
            out.push_str("failed attempts (oldest first)\n");
            for error in errors {
                out.push_str(&attempt_line(error));
            }
        }
        Some(_) => {}
        None => {
            if let Some(error) = detail.get("error").filter(|e| !e.is_null()) {
                out.push_str("latest error\n");
                out.push_str(&attempt_line(error));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every failed attempt in `errors` is listed, oldest first, with its
    /// attempt, time, step, reason, message and worker.
    #[test]
    fn summary_lists_every_failed_attempt_from_errors() {
        let detail = json!({
            "id": "r1", "status": "failed", "attempt": 2, "max_attempts": 2, "queue": "default",
            "error": {"reason": "step_failed", "message": "second", "position": 0},
            "errors": [
                {"attempt": 1, "at": "2026-01-01T00:00:00Z", "reason": "step_failed",
                 "message": "first", "worker_id": "w1", "position": 0},
                {"attempt": 2, "at": "2026-01-01T00:00:01Z", "reason": "lease_expired",
                 "message": "second", "worker_id": "w2", "position": null},
            ],
            "steps": [{"position": 0, "name": "fetch", "kind": "http", "status": "failed", "attempt": 2}],
        });
        let text = summary(&detail);
        assert!(
            text.starts_with("run r1  failed  attempt 2 of 2  queue default\n"),
            "{text}"
        );
        assert!(
            text.contains("  0 fetch (http)  failed  attempt 2\n"),
            "{text}"
        );
        let first = text
            .find("  attempt 1 at 2026-01-01T00:00:00Z step 0 step_failed: first (worker w1)\n")
            .expect(&text);
        let second = text
            .find("  attempt 2 at 2026-01-01T00:00:01Z lease_expired: second (worker w2)\n")
            .expect(&text);
        assert!(first < second, "oldest first: {text}");
        assert!(!text.contains("latest error"), "{text}");
    }

    /// Without `errors` (an API older than the field), the run's latest
    /// `error` is shown.
    #[test]
    fn summary_falls_back_to_the_latest_error() {
        let detail = json!({
            "id": "r1", "status": "failed", "attempt": 1, "max_attempts": 1, "queue": "q",
            "error": {"reason": "step_failed", "message": "boom", "position": 1},
            "steps": [],
        });
        let text = summary(&detail);
        assert!(
            text.contains("latest error\n  step 1 step_failed: boom\n"),
            "{text}"
        );
    }

    /// Terminal statuses other than succeeded map to distinct non-zero exit
    /// codes; succeeded and unfinished runs to 0.
    #[test]
    fn exit_codes_distinguish_how_a_run_ended() {
        for (status, code) in [
            ("succeeded", ExitCode::SUCCESS),
            ("pending", ExitCode::SUCCESS),
            ("running", ExitCode::SUCCESS),
            ("failed", ExitCode::from(3)),
            ("cancelled", ExitCode::from(4)),
            ("stopped_quota", ExitCode::from(5)),
        ] {
            assert_eq!(exit_code(status), code, "{status}");
        }
    }
}
