//! The production transport: tokio's sockets.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

use super::{Listener, Transport, UdpSocket};

/// Real sockets through tokio.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioTransport;

impl UdpSocket for tokio::net::UdpSocket {
    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> io::Result<usize> {
        tokio::net::UdpSocket::send_to(self, buf, target).await
    }
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        tokio::net::UdpSocket::recv_from(self, buf).await
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::UdpSocket::local_addr(self)
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        // Small request/response exchanges: latency matters more than batching.
        stream.set_nodelay(true)?;
        Ok((stream, peer))
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }
}

impl Transport for TokioTransport {
    type Udp = tokio::net::UdpSocket;
    type Stream = TcpStream;
    type Listener = TcpListener;

    async fn bind_udp(&self, addr: SocketAddr) -> io::Result<Self::Udp> {
        tokio::net::UdpSocket::bind(addr).await
    }
    async fn bind_tcp(&self, addr: SocketAddr) -> io::Result<Self::Listener> {
        TcpListener::bind(addr).await
    }
    async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Stream> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}
