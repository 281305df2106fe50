//! What a query name asks for: the names of the DNS interface, Consul's shapes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::Name;

/// A name under the domain, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup<'a> {
    /// The domain itself.
    Apex,
    /// `NAME.service`, `TAG.NAME.service`, `_NAME._TAG.service` (`_tcp`: no tag).
    Service {
        /// Service name as the query spelled it.
        name: &'a str,
        /// Tag the instances must carry.
        tag: Option<&'a str>,
    },
    /// `NODE.node`.
    Node(&'a str),
    /// `HEX.addr`: an address spelled in hex (8 digits for IPv4, 32 for IPv6), the target
    /// of SRV records whose instance has an address of its own.
    Addr(IpAddr),
}

/// What a query name is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Parsed<'a> {
    /// Outside the domain: refused (never an open resolver).
    Outside,
    /// Under the domain but of no known shape: NXDOMAIN.
    Unknown,
    /// A name to look up.
    Lookup(Lookup<'a>),
}

/// Reads `name` (a query name) against `domain`; `datacenter`, if set and lowercase, is an
/// optional label before the domain (`web.service.dc1.consul`), as Consul accepts.
pub(crate) fn parse<'a>(name: &'a Name, domain: &Name, datacenter: Option<&str>) -> Parsed<'a> {
    if !domain.zone_of(name) {
        return Parsed::Outside;
    }
    let own = usize::from(name.num_labels()) - usize::from(domain.num_labels());
    let mut labels: Vec<&[u8]> = name.iter().take(own).collect();
    if labels.is_empty() {
        return Parsed::Lookup(Lookup::Apex);
    }
    if let (Some(dc), [.., kind, last]) = (datacenter, labels.as_slice()) {
        if last.eq_ignore_ascii_case(dc.as_bytes()) && is_kind(kind) {
            labels.pop();
        }
    }
    let Ok(labels) = labels
        .iter()
        .map(|label| std::str::from_utf8(label))
        .collect::<Result<Vec<&str>, _>>()
    else {
        return Parsed::Unknown;
    };
    let lookup = match labels.as_slice() {
        [service, kind] if kind.eq_ignore_ascii_case("service") => Lookup::Service {
            name: service,
            tag: None,
        },
        [first, second, kind] if kind.eq_ignore_ascii_case("service") => {
            match (first.strip_prefix('_'), second.strip_prefix('_')) {
                // RFC 2782: `_NAME._PROTO`; `_tcp` asks for every instance, any other
                // second label is a tag (as Consul reads it).
                (Some(name), Some(tag)) => Lookup::Service {
                    name,
                    tag: (!tag.eq_ignore_ascii_case("tcp")).then_some(tag),
                },
                _ => Lookup::Service {
                    name: second,
                    tag: Some(first),
                },
            }
        }
        [node, kind] if kind.eq_ignore_ascii_case("node") => Lookup::Node(node),
        [hex, kind] if kind.eq_ignore_ascii_case("addr") => match parse_hex_addr(hex) {
            Some(addr) => Lookup::Addr(addr),
            None => return Parsed::Unknown,
        },
        _ => return Parsed::Unknown,
    };
    match lookup {
        Lookup::Service { name: "", .. } | Lookup::Node("") => Parsed::Unknown,
        lookup => Parsed::Lookup(lookup),
    }
}

fn is_kind(label: &[u8]) -> bool {
    ["service", "node", "addr"]
        .iter()
        .any(|kind| label.eq_ignore_ascii_case(kind.as_bytes()))
}

/// `7f000001` -> 127.0.0.1; 32 digits -> an IPv6 address.
fn parse_hex_addr(hex: &str) -> Option<IpAddr> {
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match hex.len() {
        8 => u32::from_str_radix(hex, 16)
            .ok()
            .map(|bits| IpAddr::V4(Ipv4Addr::from(bits))),
        32 => u128::from_str_radix(hex, 16)
            .ok()
            .map(|bits| IpAddr::V6(Ipv6Addr::from(bits))),
        _ => None,
    }
}

/// The `.addr` label of `addr`: its bits in lowercase hex.
pub(crate) fn hex_addr(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
    }
}

/// Whether `name` can be one DNS label of a host name we hand out (an SRV target).
pub(crate) fn is_plain_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    fn check(query: &str, dc: Option<&str>, expected: Parsed<'_>) {
        let domain = name("consul.");
        let query = name(query);
        assert_eq!(parse(&query, &domain, dc), expected, "{query}");
    }

    #[test]
    fn names_of_every_shape() {
        use Lookup::*;
        let service = |name, tag| Parsed::Lookup(Service { name, tag });
        check("web.service.consul.", None, service("web", None));
        check("WEB.Service.CONSUL.", None, service("WEB", None));
        check("v2.web.service.consul.", None, service("web", Some("v2")));
        check("_web._tcp.service.consul.", None, service("web", None));
        check("_web._TCP.service.consul.", None, service("web", None));
        check("_web._v2.service.consul.", None, service("web", Some("v2")));
        check("web.service.dc1.consul.", Some("dc1"), service("web", None));
        check("web.service.dc2.consul.", Some("dc1"), Parsed::Unknown);
        check("web.service.dc1.consul.", None, Parsed::Unknown);
        check("n1.node.consul.", None, Parsed::Lookup(Node("n1")));
        check(
            "n1.node.dc1.consul.",
            Some("dc1"),
            Parsed::Lookup(Node("n1")),
        );
        check(
            "7f000001.addr.consul.",
            None,
            Parsed::Lookup(Addr("127.0.0.1".parse().unwrap())),
        );
        check(
            "fd000000000000000000000000000001.addr.consul.",
            None,
            Parsed::Lookup(Addr("fd00::1".parse().unwrap())),
        );
        check("zz000001.addr.consul.", None, Parsed::Unknown);
        check("consul.", None, Parsed::Lookup(Apex));
        check("CONSUL.", None, Parsed::Lookup(Apex));
        check("a.b.c.service.consul.", None, Parsed::Unknown);
        check("web.consul.", None, Parsed::Unknown);
        check("x.y.node.consul.", None, Parsed::Unknown);
        check("example.com.", None, Parsed::Outside);
        check("consul.example.com.", None, Parsed::Outside);
        check("notconsul.", None, Parsed::Outside);
        check(".", None, Parsed::Outside);
    }

    #[test]
    fn hex_addresses_round_trip() {
        for addr in ["10.1.2.3", "255.255.255.255", "::1", "2001:db8::42"] {
            let addr: IpAddr = addr.parse().unwrap();
            assert_eq!(parse_hex_addr(&hex_addr(addr)), Some(addr));
        }
    }
}
