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
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect::{Attempt, Policy};
use reqwest::Url;

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

/// Why an address is not public. The `Display` form is what error messages
/// show (`private network (RFC 1918)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForbiddenRange {
    /// `0.0.0.0/8`, `::/128`: "this host", which reaches the local machine.
    Unspecified,
    /// `127.0.0.0/8`, `::1/128`.
    Loopback,
    /// `10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`.
    Private,
    /// `100.64.0.0/10`, carrier-grade NAT (some clouds' metadata, such as
    /// 100.100.100.200, live here).
    SharedAddressSpace,
    /// `169.254.169.254`, the cloud instance metadata service.
    CloudMetadata,
    /// `169.254.0.0/16`, `fe80::/10`.
    LinkLocal,
    /// `192.0.0.0/24`, IETF protocol assignments.
    ProtocolAssignments,
    /// `192.0.2.0/24`, `198.51.100.0/24`, `203.0.113.0/24`, `2001:db8::/32`,
    /// `3fff::/20`.
    Documentation,
    /// `198.18.0.0/15`, `2001:2::/48`.
    Benchmarking,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// `240.0.0.0/4` and `192.88.99.0/24` (the retired 6to4 relay anycast).
    Reserved,
    /// `fc00::/7` (AWS's IPv6 metadata address `fd00:ec2::254` is one).
    UniqueLocal,
    /// `fec0::/10`, the retired site-local range.
    SiteLocal,
    /// `::/96` (but `::` and `::1`), the retired IPv4-compatible form.
    Ipv4Compatible,
    /// `64:ff9b:1::/48`, NAT64 for local use.
    LocalNat64,
    /// `2001::/32`, Teredo tunnels, whose far end cannot be judged.
    Teredo,
    /// `100::/64`, discard-only.
    DiscardOnly,
}

impl fmt::Display for ForbiddenRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unspecified => "unspecified address",
            Self::Loopback => "loopback",
            Self::Private => "private network (RFC 1918)",
            Self::SharedAddressSpace => "shared address space (carrier-grade NAT)",
            Self::CloudMetadata => "cloud metadata service (link-local)",
            Self::LinkLocal => "link-local",
            Self::ProtocolAssignments => "IETF protocol assignments",
            Self::Documentation => "documentation range",
            Self::Benchmarking => "benchmarking range",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved range",
            Self::UniqueLocal => "unique-local network",
            Self::SiteLocal => "site-local network",
            Self::Ipv4Compatible => "IPv4-compatible IPv6 (deprecated)",
            Self::LocalNat64 => "local-use NAT64",
            Self::Teredo => "Teredo tunnel",
            Self::DiscardOnly => "discard-only range",
        })
    }
}

/// Non-public IPv4 ranges, most specific first (the first match names it).
const V4_RANGES: &[(Ipv4Net, ForbiddenRange)] = &[
    (v4(169, 254, 169, 254, 32), ForbiddenRange::CloudMetadata),
    (v4(255, 255, 255, 255, 32), ForbiddenRange::Broadcast),
    (v4(0, 0, 0, 0, 8), ForbiddenRange::Unspecified),
    (v4(10, 0, 0, 0, 8), ForbiddenRange::Private),
    (v4(100, 64, 0, 0, 10), ForbiddenRange::SharedAddressSpace),
    (v4(127, 0, 0, 0, 8), ForbiddenRange::Loopback),
    (v4(169, 254, 0, 0, 16), ForbiddenRange::LinkLocal),
    (v4(172, 16, 0, 0, 12), ForbiddenRange::Private),
    (v4(192, 0, 0, 0, 24), ForbiddenRange::ProtocolAssignments),
    (v4(192, 0, 2, 0, 24), ForbiddenRange::Documentation),
    (v4(192, 88, 99, 0, 24), ForbiddenRange::Reserved),
    (v4(192, 168, 0, 0, 16), ForbiddenRange::Private),
    (v4(198, 18, 0, 0, 15), ForbiddenRange::Benchmarking),
    (v4(198, 51, 100, 0, 24), ForbiddenRange::Documentation),
    (v4(203, 0, 113, 0, 24), ForbiddenRange::Documentation),
    (v4(224, 0, 0, 0, 4), ForbiddenRange::Multicast),
    (v4(240, 0, 0, 0, 4), ForbiddenRange::Reserved),
];

/// Non-public IPv6 ranges judged as themselves, most specific first. The
/// forms that reach an IPv4 address are handled by [`embedded_ipv4`] first.
const V6_RANGES: &[(Ipv6Net, ForbiddenRange)] = &[
    (
        v6([0, 0, 0, 0, 0, 0, 0, 0], 128),
        ForbiddenRange::Unspecified,
    ),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), ForbiddenRange::Loopback),
    (
        v6([0, 0, 0, 0, 0, 0, 0, 0], 96),
        ForbiddenRange::Ipv4Compatible,
    ),
    (
        v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
        ForbiddenRange::LocalNat64,
    ),
    (
        v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64),
        ForbiddenRange::DiscardOnly,
    ),
    (
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32),
        ForbiddenRange::Teredo,
    ),
    (
        v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48),
        ForbiddenRange::Benchmarking,
    ),
    (
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
        ForbiddenRange::Documentation,
    ),
    (
        v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20),
        ForbiddenRange::Documentation,
    ),
    (
        v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        ForbiddenRange::UniqueLocal,
    ),
    (
        v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
        ForbiddenRange::LinkLocal,
    ),
    (
        v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
        ForbiddenRange::SiteLocal,
    ),
    (
        v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
        ForbiddenRange::Multicast,
    ),
];

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

const fn v6(segments: [u16; 8], prefix: u8) -> Ipv6Net {
    let [a, b, c, d, e, f, g, h] = segments;
    Ipv6Net::new_assert(Ipv6Addr::new(a, b, c, d, e, f, g, h), prefix)
}

/// The IPv4 address an IPv6 address reaches, for the forms that carry one:
/// IPv4-mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::a.b.c.d` and 6to4
/// `2002:aabb:ccdd::/48`.
fn embedded_ipv4(address: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = address else {
        return None;
    };
    let s = v6.segments();
    let low = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(low(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(low(hi, lo)),
        [0x2002, hi, lo, ..] => Some(low(hi, lo)),
        _ => None,
    }
}

/// The non-public range `address` is in, or `None` for a public address.
/// The allow-list is not consulted (see [`OutboundPolicy::check`]).
pub fn classify(address: IpAddr) -> Option<ForbiddenRange> {
    if let Some(v4) = embedded_ipv4(address) {
        return classify(IpAddr::V4(v4));
    }
    match address {
        IpAddr::V4(v4) => V4_RANGES
            .iter()
            .find(|(net, _)| net.contains(&v4))
            .map(|(_, range)| *range),
        IpAddr::V6(v6) => V6_RANGES
            .iter()
            .find(|(net, _)| net.contains(&v6))
            .map(|(_, range)| *range),
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

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test addresses parse")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test networks parse")
    }

    /// Every non-public IPv4 range is named; public addresses pass.
    #[test]
    fn classifies_ipv4() {
        use ForbiddenRange::*;
        let cases = [
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("10.0.0.1", Some(Private)),
            ("10.255.255.255", Some(Private)),
            ("100.64.0.1", Some(SharedAddressSpace)),
            ("100.100.100.200", Some(SharedAddressSpace)),
            ("100.128.0.1", None),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.0.9", Some(Loopback)),
            ("169.254.169.254", Some(CloudMetadata)),
            ("169.254.170.2", Some(LinkLocal)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.32.0.1", None),
            ("192.0.0.8", Some(ProtocolAssignments)),
            ("192.0.2.10", Some(Documentation)),
            ("192.88.99.1", Some(Reserved)),
            ("192.168.1.1", Some(Private)),
            ("198.18.0.1", Some(Benchmarking)),
            ("198.19.255.255", Some(Benchmarking)),
            ("198.51.100.7", Some(Documentation)),
            ("203.0.113.9", Some(Documentation)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("240.0.0.1", Some(Reserved)),
            ("255.255.255.255", Some(Broadcast)),
            ("1.1.1.1", None),
            ("8.8.8.8", None),
            ("93.184.216.34", None),
            ("11.0.0.1", None),
            ("192.169.0.1", None),
        ];
        for (address, range) in cases {
            assert_eq!(classify(ip(address)), range, "{address}");
        }
    }

    /// Native IPv6 ranges are named; public addresses pass.
    #[test]
    fn classifies_ipv6() {
        use ForbiddenRange::*;
        let cases = [
            ("::", Some(Unspecified)),
            ("::1", Some(Loopback)),
            ("::10.0.0.1", Some(Ipv4Compatible)),
            ("::8.8.8.8", Some(Ipv4Compatible)),
            ("64:ff9b:1::1", Some(LocalNat64)),
            ("100::1", Some(DiscardOnly)),
            ("2001::1", Some(Teredo)),
            ("2001:2::1", Some(Benchmarking)),
            ("2001:db8::1", Some(Documentation)),
            ("3fff::1", Some(Documentation)),
            ("fc00::1", Some(UniqueLocal)),
            ("fd00:ec2::254", Some(UniqueLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("fec0::1", Some(SiteLocal)),
            ("ff02::1", Some(Multicast)),
            ("2606:4700:4700::1111", None),
            ("2a00:1450:4001::200e", None),
        ];
        for (address, range) in cases {
            assert_eq!(classify(ip(address)), range, "{address}");
        }
    }

    /// IPv4-mapped, NAT64 and 6to4 addresses are judged by the IPv4
    /// address they reach.
    #[test]
    fn judges_ipv6_forms_of_ipv4_by_the_ipv4_address() {
        use ForbiddenRange::*;
        let cases = [
            ("::ffff:10.0.0.1", Some(Private)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:169.254.169.254", Some(CloudMetadata)),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::10.0.0.1", Some(Private)),
            ("64:ff9b::a9fe:a9fe", Some(CloudMetadata)),
            ("64:ff9b::8.8.8.8", None),
            ("2002:0a00:0001::1", Some(Private)),
            ("2002:7f00:0001::", Some(Loopback)),
            ("2002:a9fe:a9fe:1::5", Some(CloudMetadata)),
            ("2002:0808:0808::1", None),
        ];
        for (address, range) in cases {
            assert_eq!(classify(ip(address)), range, "{address}");
        }
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
