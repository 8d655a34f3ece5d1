//! The guarded HTTP client: a resolver that drops forbidden addresses, a
//! redirect policy that judges every hop, and capped reply bodies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect::{Attempt, Policy};

use super::{check_url, OutboundError, OutboundPolicy, MAX_REDIRECTS};

/// Resolves `host` and keeps the addresses `policy` allows.
///
/// # Errors
///
/// [`OutboundError::Refused`] (naming the first forbidden address) when
/// every address is forbidden; resolver errors; no address at all.
pub async fn resolve(
    policy: &OutboundPolicy,
    host: &str,
) -> Result<Vec<SocketAddr>, OutboundError> {
    let found: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|source| OutboundError::Resolve {
            host: host.to_owned(),
            source,
        })?
        .collect();
    let mut refused = None;
    let allowed: Vec<SocketAddr> = found
        .into_iter()
        .filter(|addr| match policy.check(addr.ip()) {
            Ok(()) => true,
            Err(range) => {
                tracing::debug!(host, address = %addr.ip(), %range, "outbound address refused");
                refused.get_or_insert((addr.ip(), range));
                false
            }
        })
        .collect();
    match refused {
        Some((address, range)) if allowed.is_empty() => Err(OutboundError::Refused {
            host: host.to_owned(),
            address,
            range,
        }),
        _ if allowed.is_empty() => Err(OutboundError::NoAddress {
            host: host.to_owned(),
        }),
        _ => Ok(allowed),
    }
}

/// The resolver of a guarded client: [`resolve`].
struct GuardedResolver {
    policy: OutboundPolicy,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = resolve(&policy, &host).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The redirect policy of a guarded client: follows at most
/// [`MAX_REDIRECTS`] hops, each passing [`check_url`].
fn redirect(policy: &OutboundPolicy, attempt: Attempt<'_>) -> reqwest::redirect::Action {
    let location = attempt.url().to_string();
    if attempt.previous().len() > MAX_REDIRECTS {
        return attempt.error(OutboundError::TooManyRedirects { location });
    }
    match check_url(policy, attempt.url()) {
        Ok(()) => attempt.follow(),
        Err(source) => attempt.error(OutboundError::RefusedRedirect {
            location,
            source: Box::new(source),
        }),
    }
}

/// A client whose requests reach only what `policy` allows: hostnames are
/// resolved by a resolver that drops forbidden addresses, redirects are
/// checked hop by hop, proxies are not used. `timeout` bounds each whole
/// request (resolution included) unless the request sets its own.
///
/// IP-literal URLs bypass every resolver: run [`check_url`] on each URL
/// before sending it. A refusal comes back as a `reqwest::Error` whose
/// source chain holds the [`OutboundError`] ([`OutboundError::find`]).
///
/// # Errors
///
/// [`OutboundError::Client`] when the TLS backend cannot be set up.
pub fn client(
    policy: &OutboundPolicy,
    timeout: Duration,
) -> Result<reqwest::Client, OutboundError> {
    let redirects = policy.clone();
    reqwest::Client::builder()
        .user_agent(concat!("runq/", env!("CARGO_PKG_VERSION")))
        .timeout(timeout)
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver {
            policy: policy.clone(),
        }))
        .redirect(Policy::custom(move |attempt| redirect(&redirects, attempt)))
        .build()
        .map_err(OutboundError::Client)
}

/// Why a reply body was not read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body is larger than the cap; reading stopped there.
    #[error("the body has {size} bytes or more, over the cap of {cap}")]
    TooLarge {
        /// Bytes declared (`Content-Length`) or read when the cap was passed.
        size: u64,
        /// The cap.
        cap: usize,
    },
    /// The connection failed while reading.
    #[error("reading the body: {0}")]
    Read(#[source] reqwest::Error),
}

/// Reads `response`'s body, at most `cap` bytes: a declared length over the
/// cap is refused before reading, and an undeclared one stops at the first
/// chunk that passes it.
///
/// # Errors
///
/// [`BodyError::TooLarge`] past the cap; [`BodyError::Read`] when the
/// connection fails.
///
/// # Cancel safety
///
/// Dropping the future drops the response and its connection.
pub async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, BodyError> {
    if let Some(length) = response.content_length() {
        if length > cap as u64 {
            return Err(BodyError::TooLarge { size: length, cap });
        }
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Read)? {
        if bytes.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge {
                size: (bytes.len() + chunk.len()) as u64,
                cap,
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::{ForbiddenRange, LOOPBACK};

    /// `localhost` resolves, but only to loopback, so it is refused without
    /// the allow-list and passes with it.
    #[tokio::test]
    async fn resolver_refuses_names_that_resolve_to_forbidden_addresses() {
        let err = resolve(&OutboundPolicy::default(), "localhost")
            .await
            .expect_err("loopback refused");
        assert!(
            matches!(
                &err,
                OutboundError::Refused {
                    host,
                    range: ForbiddenRange::Loopback,
                    ..
                } if host == "localhost"
            ),
            "{err}"
        );
        let allowed = resolve(&OutboundPolicy::new(LOOPBACK), "localhost")
            .await
            .expect("loopback allowed");
        assert!(allowed.iter().all(|addr| addr.ip().is_loopback()));
    }

    /// A guarded client's refusal surfaces as an `OutboundError` in the
    /// `reqwest::Error`'s source chain, before any connection is made.
    #[tokio::test]
    async fn guarded_client_refuses_hostnames_before_connecting() {
        let policy = OutboundPolicy::default();
        let client = client(&policy, Duration::from_secs(5)).expect("client");
        let err = client
            .get("http://localhost:9/")
            .send()
            .await
            .expect_err("refused");
        let outbound = OutboundError::find(&err).expect("an outbound error in the chain");
        assert!(outbound.is_refusal(), "{outbound}");
        assert!(
            outbound.to_string().contains("host 'localhost'"),
            "{outbound}"
        );
    }
}
