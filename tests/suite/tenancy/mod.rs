//! Tenants, scoped tokens, projects and the audit log (issue 8): a tenant
//! never reaches another tenant's rows, each token does what its scopes say
//! and nothing after its revocation, a token exists only as its digest, a
//! `prod` project refuses runs until three confirmations turn its override
//! on, and every such change lands in an append-only audit log.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use runq_shared::db;
use runq_shared::{Problem, Project, Scope, TenantId};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::{echo_run, token, wait_for, TestApi, TestDb};

mod audit;
mod isolation;
mod projects;
mod tokens;

/// A fresh database with tenant `acme` and the API served on it.
async fn acme_with_api() -> (TestDb, TestApi, TenantId) {
    let db = TestDb::new().await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let acme = db.tenant("acme").await;
    (db, api, acme)
}

/// A token of `tenant` with `scopes` (bound to `project` for ingest): its
/// plaintext and id.
async fn token_with(
    db: &TestDb,
    tenant: TenantId,
    scopes: &[Scope],
    project: Option<Uuid>,
) -> (String, Uuid) {
    let mut conn = db.pool.acquire().await.expect("connection");
    let issued = db::tokens::create(&mut conn, tenant, "test", scopes, project)
        .await
        .expect("token");
    (issued.plaintext, issued.token.id)
}

/// A project of `tenant`.
async fn project(db: &TestDb, tenant: TenantId, name: &str, environment: &str) -> Project {
    let mut conn = db.pool.acquire().await.expect("connection");
    let create = serde_json::from_value(json!({ "name": name, "environment": environment }))
        .expect("project body");
    db::projects::create(&mut conn, tenant, &create)
        .await
        .expect("project")
}

/// Sends `method path` with `body` (if any) as `token`; the status and the
/// body parsed as JSON (`null` when empty).
async fn call(
    api: &TestApi,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", api.base))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let bytes = response.bytes().await.expect("body");
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON body")
    };
    (status, value)
}

fn all_confirmations() -> Value {
    json!({
        "not_customer_facing": true,
        "no_real_secrets": true,
        "accept_unsafe_agent_behavior": true,
    })
}

/// `project`: outputs the step envelope's `project`.
struct ShowProject;

#[async_trait::async_trait]
impl runq_worker::Handler for ShowProject {
    fn kind(&self) -> &str {
        "project"
    }

    async fn execute(
        &self,
        step: &runq_shared::StepInput,
        _events: &mut runq_worker::Events,
    ) -> Result<Value, runq_worker::StepError> {
        Ok(serde_json::to_value(&step.project).unwrap_or_default())
    }
}
