//! A fault-injecting transport for tests: partitions and dropped links over any transport.
//!
//! Every node of a test cluster gets a [`FaultyTransport`] sharing one [`Faults`]. A link is
//! cut in both directions by cutting it at the sending side: datagrams to a cut peer are
//! dropped, datagrams from it are ignored, and connections to it fail.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::{Listener, Transport, UdpSocket};

/// The faults in force, shared by every node of a test cluster.
#[derive(Debug, Default)]
pub struct Faults {
    /// Cut links, stored with the smaller address first.
    cut: Mutex<BTreeSet<(SocketAddr, SocketAddr)>>,
}

impl Faults {
    /// A fresh set of faults (nothing cut).
    pub fn new() -> Arc<Self> {
        Arc::new(Faults::default())
    }

    fn key(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
        if a <= b {
            (a, b)
        } else {
            (b, a)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<(SocketAddr, SocketAddr)>> {
        self.cut
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Cuts every link between a node of `left` and a node of `right`.
    pub fn partition(&self, left: &[SocketAddr], right: &[SocketAddr]) {
        let mut cut = self.lock();
        for a in left {
            for b in right {
                cut.insert(Self::key(*a, *b));
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.lock().clear();
    }

    /// Whether the link between `a` and `b` is cut.
    pub fn is_cut(&self, a: SocketAddr, b: SocketAddr) -> bool {
        self.lock().contains(&Self::key(a, b))
    }
}

/// Wraps a transport so that the links cut in [`Faults`] carry nothing.
#[derive(Debug, Clone)]
pub struct FaultyTransport<T> {
    inner: T,
    faults: Arc<Faults>,
    /// The node's own address, known once its UDP socket is bound.
    local: Arc<Mutex<Option<SocketAddr>>>,
}

impl<T> FaultyTransport<T> {
    /// Wraps `inner`; one wrapper per node.
    pub fn new(inner: T, faults: Arc<Faults>) -> Self {
        FaultyTransport {
            inner,
            faults,
            local: Arc::new(Mutex::new(None)),
        }
    }
}

/// A UDP socket whose cut links drop datagrams.
#[derive(Debug)]
pub struct FaultyUdp<U> {
    inner: U,
    local: SocketAddr,
    faults: Arc<Faults>,
}

impl<U: UdpSocket> UdpSocket for FaultyUdp<U> {
    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> io::Result<usize> {
        if self.faults.is_cut(self.local, target) {
            return Ok(buf.len());
        }
        self.inner.send_to(buf, target).await
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            let (len, from) = self.inner.recv_from(buf).await?;
            if !self.faults.is_cut(self.local, from) {
                return Ok((len, from));
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl<T: Transport> Transport for FaultyTransport<T> {
    type Udp = FaultyUdp<T::Udp>;
    type Stream = T::Stream;
    type Listener = T::Listener;

    async fn bind_udp(&self, addr: SocketAddr) -> io::Result<Self::Udp> {
        let inner = self.inner.bind_udp(addr).await?;
        let local = inner.local_addr()?;
        *self.local.lock().unwrap_or_else(|p| p.into_inner()) = Some(local);
        Ok(FaultyUdp {
            inner,
            local,
            faults: self.faults.clone(),
        })
    }

    async fn bind_tcp(&self, addr: SocketAddr) -> io::Result<Self::Listener> {
        let listener = self.inner.bind_tcp(addr).await?;
        debug_assert!(listener.local_addr().is_ok());
        Ok(listener)
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Stream> {
        let local = *self.local.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(local) = local {
            if self.faults.is_cut(local, addr) {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "link cut by fault injection",
                ));
            }
        }
        self.inner.connect(addr).await
    }
}
