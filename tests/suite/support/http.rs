//! The API over real HTTP for one test: a database, the API served on it, a
//! client and a bearer token. Test modules wrap it in a fixture of their own
//! that adds what they need (a second tenant's token, an ingest project).

use reqwest::{Client, Response};
use runq_shared::config::ApiConfig;
use serde_json::Value;

use super::{TestApi, TestDb};

/// A database, the API on a free port, a client, and the token it sends.
pub struct Served {
    pub db: TestDb,
    pub api: TestApi,
    pub client: Client,
    /// Sent as the bearer token by `post` and `get`.
    pub token: String,
}

impl Served {
    /// Serves the API (default config) on `db`, calling it with `token`.
    pub fn start(db: TestDb, token: String) -> Self {
        Self::start_with(db, token, TestApi::config())
    }

    /// Serves the API with `config` on `db`, calling it with `token`.
    pub fn start_with(db: TestDb, token: String, config: ApiConfig) -> Self {
        let api = TestApi::start(db.pool.clone(), config);
        Served {
            db,
            api,
            client: Client::new(),
            token,
        }
    }

    /// The absolute URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api.base)
    }

    /// `POST path` with `body` as JSON, under the token.
    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .expect("send")
    }

    /// `GET path` under the token.
    pub async fn get(&self, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("send")
    }
}
