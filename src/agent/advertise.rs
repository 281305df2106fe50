//! The address an agent bound to `0.0.0.0` advertises when none is given: the local address
//! the kernel would send from, as Consul does with its default private address. In a
//! container that is the container's (or pod's) address, so `--advertise` is optional there.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

/// Stands for "the default route" when there is no seed to aim at (TEST-NET-1, RFC 5737;
/// connecting a UDP socket sends nothing).
const DEFAULT_ROUTE_V4: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 9);
/// The IPv6 documentation prefix (RFC 3849), for the same purpose.
const DEFAULT_ROUTE_V6: SocketAddr = SocketAddr::new(
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    9,
);

/// The address to advertise for an agent bound to `bind` (an unspecified IP): the source
/// address of the route towards `towards` (a seed), or of the default route. The port is
/// `bind`'s. Errors when the only route is loopback while `towards` is not, since other hosts
/// could not reach that.
pub fn detect(bind: SocketAddr, towards: Option<SocketAddr>) -> io::Result<SocketAddr> {
    let target = towards.unwrap_or(if bind.is_ipv4() {
        DEFAULT_ROUTE_V4
    } else {
        DEFAULT_ROUTE_V6
    });
    let local: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)?;
    // UDP connect only picks a route and a source address; nothing is sent.
    socket.connect(target)?;
    let ip = socket.local_addr()?.ip();
    if ip.is_unspecified() || (ip.is_loopback() && !target.ip().is_loopback()) {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("no address of this host routes to {target}"),
        ));
    }
    Ok(SocketAddr::new(ip, bind.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_seed_is_reached_from_loopback_with_the_bound_port() {
        let bind: SocketAddr = "0.0.0.0:7946".parse().unwrap();
        let seed: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let advertised = detect(bind, Some(seed)).unwrap();
        assert_eq!(advertised, "127.0.0.1:7946".parse().unwrap());
    }

    #[test]
    fn without_a_route_there_is_an_error_or_a_usable_address() {
        // Machines without a default route (sandboxes) refuse; others give a real address.
        match detect("0.0.0.0:7946".parse().unwrap(), None) {
            Ok(addr) => {
                assert!(!addr.ip().is_unspecified() && !addr.ip().is_loopback());
                assert_eq!(addr.port(), 7946);
            }
            Err(error) => assert!(
                error.kind() == io::ErrorKind::AddrNotAvailable || error.raw_os_error().is_some(),
                "{error}"
            ),
        }
    }
}
