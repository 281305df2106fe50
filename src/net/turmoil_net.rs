//! The simulated transport: turmoil's deterministic UDP and TCP (feature `sim`).
//!
//! [`TurmoilTransport`] runs the very same node code as [`super::TokioTransport`] on
//! [turmoil](https://docs.rs/turmoil/0.7.2)'s simulated network, where latency, loss,
//! partitions, held links, crashes and restarts are all seeded and reproducible.
//!
//! # Using it
//!
//! Every method must be called from inside a turmoil host (or client) of a running
//! simulation; outside one, turmoil panics. A host has one IP address, resolved by name with
//! [`turmoil::lookup`]. turmoil only lets sockets bind the unspecified address (`0.0.0.0`) or
//! loopback, so bind a node on `0.0.0.0:<port>` and advertise the host's address:
//!
//! ```ignore
//! let ip = turmoil::lookup("node-0");
//! let node = Node::builder("node-0")
//!     .bind("0.0.0.0:7946".parse()?)
//!     .advertise(SocketAddr::new(ip, 7946))
//!     .generation(1)                 // the default reads the system clock
//!     .rng_seed(seed)                // the default is derived from the generation
//!     .wall_clock(|| {               // the default reads the system clock
//!         turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64)
//!     })
//!     .start_on(TurmoilTransport)
//!     .await?;
//! ```
//!
//! For a run to be reproducible, give the simulation a seed (`Builder::rng_seed`) and a fixed
//! `Builder::epoch`, and give every node an explicit generation, RNG seed and a wall clock
//! derived from simulated time, as above: the defaults of all three read the system clock.
//!
//! # Differences from real sockets
//!
//! * Binding port 0 takes a port from turmoil's ephemeral range; binding the same port for UDP
//!   and TCP always succeeds on a fresh host.
//! * `set_nodelay` does nothing in turmoil: segments are delivered whole, after the link's
//!   simulated latency.
//! * A connection to a crashed or partitioned host is refused at once (the SYN is dropped),
//!   rather than timing out.
//! * turmoil's `fail_rate` breaks a link for one message at a time and drops what is in flight
//!   on it; TCP segments are not retransmitted, so a lossy link stalls a TCP exchange until
//!   the node's own timeout ends it.

use std::io;
use std::net::SocketAddr;

use turmoil::net::{TcpListener, TcpStream};

use super::{Listener, Transport, UdpSocket};

/// turmoil's simulated sockets. Zero-sized: the simulated network is found through the
/// turmoil host the calling task runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct TurmoilTransport;

impl UdpSocket for turmoil::net::UdpSocket {
    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> io::Result<usize> {
        turmoil::net::UdpSocket::send_to(self, buf, target).await
    }
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        turmoil::net::UdpSocket::recv_from(self, buf).await
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        turmoil::net::UdpSocket::local_addr(self)
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        TcpListener::accept(self).await
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }
}

impl Transport for TurmoilTransport {
    type Udp = turmoil::net::UdpSocket;
    type Stream = TcpStream;
    type Listener = TcpListener;

    async fn bind_udp(&self, addr: SocketAddr) -> io::Result<Self::Udp> {
        turmoil::net::UdpSocket::bind(addr).await
    }
    async fn bind_tcp(&self, addr: SocketAddr) -> io::Result<Self::Listener> {
        TcpListener::bind(addr).await
    }
    async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Stream> {
        TcpStream::connect(addr).await
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, UNIX_EPOCH};

    use super::TurmoilTransport;
    use crate::membership::{MemberStatus, Profile};
    use crate::node::Node;

    const PORT: u16 = 7946;
    const NAMES: [&str; 3] = ["node-0", "node-1", "node-2"];
    /// 2023-11-14T22:13:20Z: a fixed epoch, so that wall clocks do not read the system's.
    const EPOCH_S: u64 = 1_700_000_000;

    /// What the outer loop sees of each node: the statuses of the members it lists.
    type Seen = Arc<Mutex<Vec<Vec<(String, MemberStatus)>>>>;

    /// Runs three nodes on turmoil hosts until every one of them sees all three alive, and
    /// returns the simulated milliseconds that took with each node's member list.
    fn converge(seed: u64) -> (u128, Vec<Vec<(String, MemberStatus)>>) {
        let mut sim = turmoil::Builder::new()
            .simulation_duration(Duration::from_secs(60))
            .tick_duration(Duration::from_millis(1))
            .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_S))
            .rng_seed(seed)
            .build();
        let seen: Seen = Arc::new(Mutex::new(vec![Vec::new(); NAMES.len()]));
        for (index, name) in NAMES.iter().enumerate() {
            let seen = seen.clone();
            sim.host(*name, move || {
                let seen = seen.clone();
                async move {
                    let advertise = SocketAddr::new(turmoil::lookup(NAMES[index]), PORT);
                    let seed_addr = SocketAddr::new(turmoil::lookup(NAMES[0]), PORT);
                    let node = Node::builder(NAMES[index])
                        .bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT))
                        .advertise(advertise)
                        .seeds((index > 0).then_some(seed_addr))
                        .profile(Profile::Local)
                        .generation(1)
                        .rng_seed(seed ^ index as u64)
                        .wall_clock(|| {
                            turmoil::since_epoch().map_or(EPOCH_S * 1000, |d| d.as_millis() as u64)
                        })
                        .start_on(TurmoilTransport)
                        .await?;
                    loop {
                        let members = node
                            .members()
                            .into_iter()
                            .map(|m| (m.name, m.status))
                            .collect();
                        seen.lock().unwrap()[index] = members;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            });
        }
        let all_alive = |seen: &[Vec<(String, MemberStatus)>]| {
            seen.iter().all(|members| {
                members.len() == NAMES.len()
                    && members.iter().all(|(_, s)| *s == MemberStatus::Alive)
            })
        };
        loop {
            sim.step().expect("simulation step");
            let snapshot = seen.lock().unwrap().clone();
            if all_alive(&snapshot) {
                return (sim.elapsed().as_millis(), snapshot);
            }
            assert!(
                sim.elapsed() < Duration::from_secs(30),
                "no convergence after 30 simulated seconds: {snapshot:?}"
            );
        }
    }

    #[test]
    fn turmoil_three_nodes_converge_deterministically() {
        let (elapsed_ms, members) = converge(7);
        assert!(elapsed_ms < 10_000, "converged only after {elapsed_ms} ms");
        for list in &members {
            let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, NAMES);
        }
        // Same seed, same history.
        assert_eq!(converge(7).0, elapsed_ms);
    }
}
