//! Which addresses are not public: the ranges the outbound policy refuses
//! unless allow-listed, and the IPv6 forms that reach an IPv4 address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

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
pub(super) fn embedded_ipv4(address: IpAddr) -> Option<Ipv4Addr> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test addresses parse")
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
}
