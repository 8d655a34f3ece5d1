//! The payloads of a tenant's settings: API tokens and their scopes, projects
//! with their production override, and the audit log. Like [`crate::model`],
//! each is one serde type also described in the OpenAPI spec.

use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// What a token may do. A request needs the scope its endpoint names.
#[derive(
    Enum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "snake_case")]
#[oai(rename_all = "snake_case")]
pub enum Scope {
    /// Tenant settings: tokens, projects, the production override, quotas,
    /// the audit log.
    Admin,
    /// Submit, list, inspect, cancel and retry runs.
    Runs,
    /// A sidecar's event ingest, bound to one project.
    Ingest,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 3] = [Scope::Admin, Scope::Runs, Scope::Ingest];

    /// The scope as stored and as written in payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Runs => "runs",
            Scope::Ingest => "ingest",
        }
    }

    /// The scope named `name`, if any.
    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == name)
    }
}

/// Where a project lives. Runs against `prod` need the production override.
#[derive(Enum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
#[oai(rename_all = "snake_case")]
pub enum Environment {
    /// Development.
    Dev,
    /// Staging.
    Staging,
    /// Production: runs are refused unless the production override is on.
    Prod,
}

impl Environment {
    /// The environment as stored and as written in payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Dev => "dev",
            Environment::Staging => "staging",
            Environment::Prod => "prod",
        }
    }

    /// The environment named `name`, if any.
    pub fn parse(name: &str) -> Option<Environment> {
        [Environment::Dev, Environment::Staging, Environment::Prod]
            .into_iter()
            .find(|env| env.as_str() == name)
    }
}

/// The body of `POST /v1/tokens`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// A label, 1 to 255 bytes.
    #[oai(validator(min_length = 1, max_length = 255))]
    pub name: String,
    /// What the token may do: at least one scope.
    #[oai(validator(min_items = 1, max_items = 3))]
    pub scopes: Vec<Scope>,
    /// The project an `ingest` token is bound to (required with `ingest`,
    /// refused without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub project_id: Option<Uuid>,
}

/// An API token as the API lists it: never its plaintext or its hash.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Token {
    /// The token's id (what `DELETE /v1/tokens/{id}` and the audit log name).
    pub id: Uuid,
    /// Its label.
    pub name: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// The project an `ingest` token is bound to.
    pub project_id: Option<Uuid>,
    /// When it was issued.
    pub created_at: DateTime<Utc>,
    /// When it was revoked; it is refused from the next request on.
    pub revoked_at: Option<DateTime<Utc>>,
    /// When it last authenticated a request (to the minute).
    pub last_used_at: Option<DateTime<Utc>>,
}

/// The answer of `POST /v1/tokens`: the token and, this once, its plaintext.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CreatedToken {
    /// The plaintext bearer token. runq stores only its SHA-256 digest and
    /// cannot show it again.
    pub token: String,
    /// The token's id.
    pub id: Uuid,
    /// Its label.
    pub name: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// The project an `ingest` token is bound to.
    pub project_id: Option<Uuid>,
    /// When it was issued.
    pub created_at: DateTime<Utc>,
}

/// The answer of `GET /v1/tokens`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TokenList {
    /// The tenant's tokens, revoked ones included, oldest first.
    pub tokens: Vec<Token>,
}

/// Who turned a project's production override on, and when.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProductionOverride {
    /// The token that enabled it (null if that token was since deleted with
    /// its project binding).
    pub enabled_by: Option<Uuid>,
    /// When.
    pub enabled_at: DateTime<Utc>,
}

/// A project: a target under test.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Project {
    /// Its id.
    pub id: Uuid,
    /// Its name, unique within the tenant.
    pub name: String,
    /// `dev`, `staging` or `prod`.
    pub environment: Environment,
    /// The target's URL, handed to every step of the project's runs.
    pub target_url: Option<String>,
    /// On a `prod` project, whether runs are let through: null when off,
    /// else who enabled it and when.
    pub production_override: Option<ProductionOverride>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// The project of a run as its steps see it (`StepInput.project`): where
/// the target is.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StepProject {
    /// The project's id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// `dev`, `staging` or `prod`.
    pub environment: Environment,
    /// The target's URL.
    pub target_url: Option<String>,
}

/// The body of `POST /v1/projects`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    /// 1 to 255 bytes, unique within the tenant.
    #[oai(validator(min_length = 1, max_length = 255))]
    pub name: String,
    /// `dev`, `staging` or `prod`.
    pub environment: Environment,
    /// The target's URL, handed to steps (up to 2,048 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none, validator(max_length = 2048))]
    pub target_url: Option<String>,
}

/// The body of `PATCH /v1/projects/{id}`: the fields to change.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct UpdateProject {
    /// A new name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(
        skip_serializing_if_is_none,
        validator(min_length = 1, max_length = 255)
    )]
    pub name: Option<String>,
    /// A new environment. Moving a project to `prod` leaves its override off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub environment: Option<Environment>,
    /// A new target URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none, validator(max_length = 2048))]
    pub target_url: Option<String>,
}

/// The answer of `GET /v1/projects`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProjectList {
    /// The tenant's projects, oldest first.
    pub projects: Vec<Project>,
}

/// The body of `POST /v1/projects/{id}/production-override`: all three
/// confirmations, each an explicit `true`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct EnableProductionOverride {
    /// "This is NOT customer-facing production traffic."
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub not_customer_facing: Option<bool>,
    /// "No real customer secrets or sensitive data exist here."
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub no_real_secrets: Option<bool>,
    /// "I accept that adversarial prompts MAY trigger unsafe agent behavior."
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub accept_unsafe_agent_behavior: Option<bool>,
}

impl EnableProductionOverride {
    /// The confirmations not given as an explicit `true`, by field name.
    pub fn missing(&self) -> Vec<&'static str> {
        [
            ("not_customer_facing", self.not_customer_facing),
            ("no_real_secrets", self.no_real_secrets),
            (
                "accept_unsafe_agent_behavior",
                self.accept_unsafe_agent_behavior,
            ),
        ]
        .into_iter()
        .filter(|(_, given)| *given != Some(true))
        .map(|(name, _)| name)
        .collect()
    }
}

/// One entry of the audit log.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// Increasing id; pass the last one of a page as `cursor`.
    pub id: i64,
    /// Who: `token:<id>` for an API token, `operator:<user>` for the CLI.
    pub actor: String,
    /// The acting token, when a token acted.
    pub actor_token_id: Option<Uuid>,
    /// What: `token.create`, `token.revoke`, `project.delete`,
    /// `project.production_override.enable`, ...
    pub action: String,
    /// On what: `token:<id>`, `project:<id>`, ...
    pub target: String,
    /// The action's particulars (the confirmations given, a token's scopes).
    pub details: Value,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// A page of `GET /v1/audit`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AuditPage {
    /// Entries, newest first.
    pub entries: Vec<AuditEntry>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<i64>,
}
