//! Client subcommands: `enqueue`, `status`, `tail`. They speak to the REST API
//! with the same payload types the API serves.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use runq_shared::{CreateRun, EventPage, NewStep, Problem, Run, RunDetail};
use uuid::Uuid;

/// Where the API is and who we are.
#[derive(Args, Debug, Clone)]
pub struct ApiTarget {
    /// Base URL of the API.
    #[arg(long, env = "RUNQ_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Bearer token (`runq token` or `runq dev` prints one).
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
    /// A step as `kind` or `kind:<json input>`, repeatable, in order.
    /// Example: --step 'http:{"url":"http://127.0.0.1:9000/hook"}'
    #[arg(long = "step", required = true)]
    steps: Vec<String>,
}

/// `runq status` and `runq tail`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    target: ApiTarget,
    /// The run.
    id: Uuid,
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

/// Submits one run and prints it as JSON.
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
    let run: Run = answer(request.send().await.context("sending the run")?).await?;
    println!("{}", serde_json::to_string_pretty(&run)?);
    Ok(())
}

async fn fetch(
    client: &reqwest::Client,
    target: &ApiTarget,
    id: Uuid,
) -> anyhow::Result<RunDetail> {
    let url = format!("{}/v1/runs/{id}", target.url.trim_end_matches('/'));
    answer(
        client
            .get(url)
            .bearer_auth(&target.token)
            .send()
            .await
            .context("fetching the run")?,
    )
    .await
}

/// Prints a run with its steps.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let detail = fetch(&reqwest::Client::new(), &args.target, args.id).await?;
    println!("{}", serde_json::to_string_pretty(&detail)?);
    Ok(())
}

/// Prints a run's events as they arrive, one JSON line each, until the run
/// reaches a terminal status.
pub async fn tail(args: StatusArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let base = args.target.url.trim_end_matches('/').to_owned();
    let mut after = 0i64;
    loop {
        let finished = fetch(&client, &args.target, args.id)
            .await?
            .run
            .status
            .is_terminal();
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
            let detail = fetch(&client, &args.target, args.id).await?;
            println!("{}", serde_json::to_string(&detail.run)?);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
