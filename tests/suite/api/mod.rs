//! The REST API over real HTTP: every endpoint's happy path, and the ugly
//! inputs, each answered with a problem+json 4xx that changes nothing.

use reqwest::{Client, Response, StatusCode};
use runq_shared::{CreatedRuns, EventPage, Problem, Run, RunDetail, RunPage, RunStatus};
use serde_json::{json, Value};

use crate::support::http::Served;
use crate::support::{outbox_types, token, TestApi, TestDb};

mod bad_input;
mod runs;
mod service;
mod spec;

/// `acme`'s API over HTTP (`Served` under `Deref`), plus a token of a
/// second tenant, `globex`.
struct Fixture {
    served: Served,
    other_token: String,
}

impl std::ops::Deref for Fixture {
    type Target = Served;

    fn deref(&self) -> &Served {
        &self.served
    }
}

impl Fixture {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let tenant = db.tenant("acme").await;
        let other = db.tenant("globex").await;
        let token = token(&db, tenant).await;
        let other_token = token_for(&db, other).await;
        Fixture {
            served: Served::start(db, token),
            other_token,
        }
    }

    /// Creates a run of `run_body()` and returns it.
    async fn create_run(&self) -> Run {
        self.post("/v1/runs", &run_body())
            .await
            .json()
            .await
            .expect("run")
    }

    async fn runs_in_db(&self) -> i64 {
        self.db.scalar("SELECT count(*) FROM runs").await
    }
}

async fn token_for(db: &TestDb, tenant: uuid::Uuid) -> String {
    token(db, tenant).await
}

fn run_body() -> Value {
    json!({ "steps": [{ "name": "hello", "kind": "echo", "input": { "greeting": "hi" } }] })
}

/// Asserts `response` is a problem+json document with `status`, and returns it.
async fn problem(response: Response, status: StatusCode) -> Problem {
    assert_eq!(response.status(), status);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let problem: Problem = response.json().await.expect("a problem document");
    assert_eq!(problem.status, status.as_u16());
    assert!(problem.problem_type.starts_with("urn:runq:problem:"));
    assert!(!problem.detail.is_empty());
    assert_client_words(&problem.detail);
    problem
}

/// `detail` names fields and parameters as the client wrote them, never by
/// poem-openapi's internal names (`list_NewStep`, `integer_int16`, `param0`)
/// or Rust's types.
fn assert_client_words(detail: &str) {
    for internal in [
        "list_",
        "integer_",
        "string_",
        "optional_",
        "param0",
        "i16",
        "i32",
        "i64",
        "u32",
        "struct ",
        "parse request payload",
    ] {
        assert!(
            !detail.contains(internal),
            "detail '{detail}' leaks the internal name '{internal}'"
        );
    }
}
