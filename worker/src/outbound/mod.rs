//! Outbound HTTP policy: which addresses a worker's own requests (the `http`
//! step, webhook deliveries) may reach, and the client that enforces it.
//!
//! A URL a client submits must not turn a worker into a proxy into its own
//! network (server-side request forgery): loopback, private, link-local
//! (cloud metadata at 169.254.169.254 included), carrier-grade NAT,
//! unique-local, multicast, documentation and other non-public addresses are
//! refused unless the operator's allow-list ([`OutboundPolicy`], from
//! `RUNQ_OUTBOUND_ALLOW`) contains them. IPv6 forms that reach an IPv4
//! address (`::ffff:10.0.0.1`, 6to4 `2002::/16`, NAT64 `64:ff9b::/96`) are
//! judged by that IPv4 address.
//!
//! The check happens where the address is known, so a hostname cannot slip
//! through:
//!
//! - **Hostnames** are resolved by the client's own resolver, which drops
//!   forbidden addresses and fails the request when none is left. The
//!   connection goes to exactly the addresses that passed, so a DNS answer
//!   cannot change between the check and the connect (no rebinding window).
//! - **IP literals** never reach a resolver: [`check_url`] judges them, and
//!   callers run it on every URL before sending.
//! - **Redirects** are followed (at most [`MAX_REDIRECTS`]), each hop checked
//!   as above: a literal by the redirect policy, a hostname by the resolver.
//!   Following keeps the `http` step's behaviour for redirecting targets;
//!   every hop meets the same rules as the first request.
//! - **Proxies** are never used (`HTTP_PROXY` and friends are ignored): a
//!   proxy resolves names itself, out of the guard's sight.
//!
//! Reply bodies are read through [`read_capped`], which stops at a cap
//! instead of buffering whatever a server sends.

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::Url;

mod client;
mod ranges;

pub use client::{client, read_capped, resolve, BodyError};
use ranges::embedded_ipv4;
pub use ranges::{classify, ForbiddenRange};

/// Redirects a guarded client follows before it fails the request.
pub const MAX_REDIRECTS: usize = 10;

/// The loopback networks, `127.0.0.0/8` and `::1/128`: what a local setup
/// (`runq dev`, the test suite) allow-lists to reach servers on its own host.
pub const LOOPBACK: [IpNet; 2] = [
    IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
    IpNet::new_assert(IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
];

/// Which addresses outbound requests may reach: every public address, and
/// the non-public ones ([`classify`]) that an allow-list network contains.
///
/// The default allows no non-public address. Cloning is cheap.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    allow: Arc<[IpNet]>,
}

impl OutboundPolicy {
    /// A policy that also allows the addresses in `allow`.
    pub fn new(allow: impl IntoIterator<Item = IpNet>) -> Self {
        Self {
            allow: allow.into_iter().collect(),
        }
    }

    /// The allow-listed networks.
    pub fn allowed(&self) -> &[IpNet] {
        &self.allow
    }

    /// Whether requests may reach `address`.
    ///
    /// # Errors
    ///
    /// The range that forbids it, when it is not public and no allow-list
    /// network contains it (or, for a form that reaches an IPv4 address, that
    /// address).
    pub fn check(&self, address: IpAddr) -> Result<(), ForbiddenRange> {
        let Some(range) = classify(address) else {
            return Ok(());
        };
        let embedded = embedded_ipv4(address).map(IpAddr::V4);
        let listed =
            |net: &IpNet| net.contains(&address) || embedded.is_some_and(|v4| net.contains(&v4));
        if self.allow.iter().any(listed) {
            Ok(())
        } else {
            Err(range)
        }
    }
}
/// Why an outbound request was not made or could not be completed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboundError {
    /// The host is, or resolved only to, addresses the policy forbids.
    #[error(
        "refused address {address} for host '{host}': {range} (allow it with RUNQ_OUTBOUND_ALLOW)"
    )]
    Refused {
        /// The host as in the URL.
        host: String,
        /// The (first) forbidden address.
        address: IpAddr,
        /// Why it is forbidden.
        range: ForbiddenRange,
    },
    /// A redirect led somewhere the policy forbids.
    #[error("refused redirect to '{location}': {source}")]
    RefusedRedirect {
        /// Where the redirect pointed.
        location: String,
        /// Why it was refused.
        source: Box<OutboundError>,
    },
    /// The URL cannot be requested (not http or https, or no host).
    #[error("url '{url}' {problem}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// More than [`MAX_REDIRECTS`] redirects.
    #[error("more than {MAX_REDIRECTS} redirects, the last to '{location}'")]
    TooManyRedirects {
        /// Where the last redirect pointed.
        location: String,
    },
    /// The host's name could not be resolved.
    #[error("resolving host '{host}': {source}")]
    Resolve {
        /// The host.
        host: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The host's name resolved to no address at all.
    #[error("host '{host}' resolved to no address")]
    NoAddress {
        /// The host.
        host: String,
    },
    /// The HTTP client could not be built.
    #[error("building the outbound http client: {0}")]
    Client(#[source] reqwest::Error),
}

impl OutboundError {
    /// Whether the policy refused the request (as opposed to a failure that
    /// might not recur, such as a resolver error). Retrying a refused request
    /// cannot help until the allow-list changes.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Refused { .. } | Self::RefusedRedirect { .. } | Self::Url { .. }
        )
    }

    /// The outbound error behind `err` (a `reqwest::Error` from a guarded
    /// client, say), found by walking its chain of sources.
    pub fn find<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a OutboundError> {
        let mut current = Some(err);
        while let Some(err) = current {
            if let Some(outbound) = err.downcast_ref::<OutboundError>() {
                return Some(outbound);
            }
            current = err.source();
        }
        None
    }
}

/// Checks what can be judged of `url` before sending: its scheme, and its
/// host when that is an IP literal (which no resolver sees). A hostname
/// passes here; the guarded client's resolver judges its addresses.
///
/// Call it on every URL before sending it through [`client`].
///
/// # Errors
///
/// [`OutboundError::Url`] for a scheme other than http and https or a URL
/// without a host; [`OutboundError::Refused`] for a forbidden literal.
pub fn check_url(policy: &OutboundPolicy, url: &Url) -> Result<(), OutboundError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(OutboundError::Url {
            url: url.to_string(),
            problem: "must use http or https",
        });
    }
    let address = match url.host() {
        Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
        // The URL parser turns every IP spelling (`0x7f.1`, `2130706433`)
        // of an http(s) host into a literal; this only guards against a
        // parser that did not.
        Some(url::Host::Domain(name)) => match name.parse::<IpAddr>() {
            Ok(address) => address,
            Err(_) => return Ok(()),
        },
        None => {
            return Err(OutboundError::Url {
                url: url.to_string(),
                problem: "has no host",
            })
        }
    };
    policy
        .check(address)
        .map_err(|range| OutboundError::Refused {
            host: url.host_str().unwrap_or_default().to_owned(),
            address,
            range,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test addresses parse")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test networks parse")
    }

    /// An allow-list network makes the addresses it contains reachable, in
    /// any form, and nothing else.
    #[test]
    fn allow_list_overrides_only_what_it_contains() {
        let policy = OutboundPolicy::new(LOOPBACK);
        assert_eq!(policy.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(policy.check(ip("127.1.2.3")), Ok(()));
        assert_eq!(policy.check(ip("::1")), Ok(()));
        assert_eq!(policy.check(ip("::ffff:127.0.0.1")), Ok(()));
        assert_eq!(policy.check(ip("10.0.0.1")), Err(ForbiddenRange::Private));
        assert_eq!(
            policy.check(ip("169.254.169.254")),
            Err(ForbiddenRange::CloudMetadata)
        );
        assert_eq!(policy.check(ip("fe80::1")), Err(ForbiddenRange::LinkLocal));

        let policy = OutboundPolicy::new([net("10.1.0.0/16")]);
        assert_eq!(policy.check(ip("10.1.200.3")), Ok(()));
        assert_eq!(policy.check(ip("::ffff:10.1.0.9")), Ok(()));
        assert_eq!(policy.check(ip("10.2.0.1")), Err(ForbiddenRange::Private));
        assert_eq!(policy.check(ip("127.0.0.1")), Err(ForbiddenRange::Loopback));

        let nothing = OutboundPolicy::default();
        assert_eq!(nothing.check(ip("8.8.8.8")), Ok(()));
        assert_eq!(
            nothing.check(ip("127.0.0.1")),
            Err(ForbiddenRange::Loopback)
        );
    }

    /// IP literals are judged before any request, in every spelling the
    /// URL parser accepts; hostnames are left to the resolver.
    #[test]
    fn check_url_judges_literals_and_schemes() {
        let policy = OutboundPolicy::default();
        let check = |s: &str| check_url(&policy, &Url::parse(s).expect("test urls parse"));
        for refused in [
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/",
            "https://127.0.0.1:8443/x",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://[::1]:8080/",
            "http://[::ffff:10.0.0.1]/",
            "http://0.0.0.0/",
        ] {
            let err = check(refused).expect_err(refused);
            assert!(
                matches!(err, OutboundError::Refused { .. }) && err.is_refusal(),
                "{refused}: {err}"
            );
        }
        assert!(check("http://8.8.8.8/").is_ok());
        assert!(check("https://example.com/hook").is_ok());
        assert!(
            check("http://localhost:1/").is_ok(),
            "hostnames go to the resolver"
        );
        let err = check("ftp://example.com/").expect_err("not http");
        assert!(matches!(err, OutboundError::Url { .. }), "{err}");
    }

    /// The message names the address, the host, the reason and the option.
    #[test]
    fn refusal_message_says_why_and_how_to_allow() {
        let policy = OutboundPolicy::default();
        let url = Url::parse("http://10.0.0.1/").expect("url");
        let err = check_url(&policy, &url).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "refused address 10.0.0.1 for host '10.0.0.1': private network (RFC 1918) \
             (allow it with RUNQ_OUTBOUND_ALLOW)"
        );
    }
}
