//! PLACEHOLDER until the outbound branch lands: replaced by the real policy.
#![allow(missing_docs)]
use std::time::Duration;

#[derive(Debug, Default, Clone)]
pub struct OutboundPolicy;

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("{0}")]
    Client(String),
}

pub fn client(_policy: &OutboundPolicy, timeout: Duration) -> Result<reqwest::Client, OutboundError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| OutboundError::Client(e.to_string()))
}

pub fn check_url(_policy: &OutboundPolicy, url: &str) -> Result<reqwest::Url, OutboundError> {
    reqwest::Url::parse(url).map_err(|e| OutboundError::Client(e.to_string()))
}
