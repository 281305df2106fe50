//! Transport abstraction: UDP datagrams for gossip, TCP streams for sync, RPC and control.
//!
//! The node code is generic over [`Transport`], so the very same code runs on real tokio
//! sockets ([`TokioTransport`]) and, in simulations, on a deterministic network. A trait with
//! associated types (rather than a `cfg` swap of types) survives Cargo feature unification.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};

pub mod faulty;
pub mod sealed;
mod tokio_impl;
#[cfg(feature = "sim")]
pub mod turmoil_net;

pub use tokio_impl::TokioTransport;

/// A bound UDP socket.
pub trait UdpSocket: Send + Sync + 'static {
    /// Sends one datagram to `target`.
    fn send_to(
        &self,
        buf: &[u8],
        target: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send;
    /// Receives one datagram; returns its length and sender.
    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send;
    /// The address the socket is bound to.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// A bound TCP listener.
pub trait Listener: Send + Sync + 'static {
    /// The stream type accepted connections produce.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Waits for the next inbound connection.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
    /// The address the listener is bound to.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// A network: binds sockets and opens connections.
pub trait Transport: Clone + Send + Sync + 'static {
    /// UDP socket type.
    type Udp: UdpSocket;
    /// TCP stream type (both accepted and connected).
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// TCP listener type.
    type Listener: Listener<Stream = Self::Stream>;

    /// Binds a UDP socket.
    fn bind_udp(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Udp>> + Send;
    /// Binds a TCP listener.
    fn bind_tcp(&self, addr: SocketAddr)
        -> impl Future<Output = io::Result<Self::Listener>> + Send;
    /// Opens a TCP connection.
    fn connect(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;

    /// Readies an accepted stream (e.g. runs an encryption handshake); called in the
    /// connection's own task, under a timeout, never in the accept loop.
    fn prepare_accepted(
        &self,
        stream: Self::Stream,
        peer: SocketAddr,
    ) -> impl Future<Output = io::Result<Self::Stream>> + Send {
        let _ = peer;
        async move { Ok(stream) }
    }

    /// Whether the peer of `stream` proved it holds the cluster's key.
    fn is_authenticated(stream: &Self::Stream) -> bool {
        let _ = stream;
        false
    }

    /// The encryption state, when the transport seals traffic.
    fn security(&self) -> Option<&std::sync::Arc<sealed::Security>> {
        None
    }
}
