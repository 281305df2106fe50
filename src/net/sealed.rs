//! Encryption of everything a node sends: a keyring, sealed datagrams, and TCP streams with
//! an authenticated handshake and per-connection keys.
//!
//! - **Datagrams**: `[0x53, version, key id (4), nonce (24), ciphertext + tag (16)]`, sealed
//!   with XChaCha20-Poly1305 under the primary key; the cluster label and the header are the
//!   associated data. Random 192-bit nonces do not repeat in practice. A receiver tries the
//!   key the id names, among all the keys of its ring.
//! - **Streams**: the client sends `[magic, key id, client random (32)]`, the server answers
//!   `[magic, server random (32), proof]`. Both derive per-connection keys with HKDF-SHA256
//!   from the shared key, both randoms and the label, one per direction; records are
//!   `[length (4), ciphertext + tag]` under ChaCha20-Poly1305 with a per-direction counter
//!   nonce, so nonces never repeat. The server proves it holds the key with its proof; the
//!   client does with its first record, a fixed proof of its own (nothing is served before
//!   that decrypts, and that record may be no larger than the proof: a peer that only knows
//!   a key id cannot get more than a few bytes buffered).
//! - The handshake magic, read as a frame length, is far above the frame limit, so a node
//!   tells a sealed stream from a plaintext one by its first four bytes. Plaintext streams are
//!   only good for control requests from loopback when encryption is on.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{ready, Context, Poll};

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305, XNonce};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::{Listener, Transport, UdpSocket};

/// Bytes of a key.
pub const KEY_LEN: usize = 32;
/// Bytes a sealed datagram adds to the plaintext.
pub const DATAGRAM_OVERHEAD: usize = 2 + 4 + 24 + 16;
/// Most keys a keyring holds.
pub const MAX_KEYS: usize = 16;
/// Largest plaintext of one stream record.
const MAX_RECORD: usize = 16 * 1024;
const DATAGRAM_MAGIC: u8 = 0x53;
const VERSION: u8 = 1;
/// Version of the stream handshake (2: the client's first record is its proof).
const STREAM_VERSION: u8 = 2;
/// Read as a big-endian frame length this is ~4.3 GB: never a plaintext frame.
const HANDSHAKE_MAGIC: [u8; 4] = [0xFF, b'G', b'S', STREAM_VERSION];
/// Sent instead of a server hello when the client's key is not in the ring.
const REFUSED_MAGIC: [u8; 4] = [0xFF, b'G', b'S', 0];
const PROOF: &[u8] = b"grapevine server proof";
const CLIENT_PROOF: &[u8] = b"grapevine client proof";
/// Bytes of a sealed record's tag.
const TAG_LEN: usize = 16;
/// Peers remembered for "logged once" refusals.
const MAX_WARNED: usize = 1024;

/// Errors of keys and keyrings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not base64, or not 32 bytes.
    #[error("a key is 32 bytes in base64 (44 characters); {0}")]
    Malformed(String),
    /// `use` or `remove` of a key the ring does not hold.
    #[error("the keyring does not hold that key")]
    Unknown,
    /// Removing the key everything is sealed with.
    #[error("refusing to remove the primary key; `use` another key first")]
    RemovePrimary,
    /// More than [`MAX_KEYS`] keys.
    #[error("a keyring holds at most {MAX_KEYS} keys")]
    Full,
}

/// A 256-bit shared key.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "Key(id {:08x})", self.id())
    }
}

impl Key {
    /// A new random key from the operating system's generator.
    pub fn generate() -> Result<Key, KeyError> {
        let mut bytes = [0u8; KEY_LEN];
        getrandom::getrandom(&mut bytes).map_err(|e| KeyError::Malformed(e.to_string()))?;
        Ok(Key(bytes))
    }

    /// Parses a base64 key.
    pub fn from_base64(text: &str) -> Result<Key, KeyError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| KeyError::Malformed(e.to_string()))?;
        let array: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| KeyError::Malformed(format!("got {} bytes", b.len())))?;
        Ok(Key(array))
    }

    /// The key in base64.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// A short public identifier (a hash of the key), sent with sealed data.
    pub fn id(&self) -> u32 {
        (crate::wire::stable_hash(&self.0) >> 32) as u32
    }
}

/// The keys of a node: the primary seals everything sent; all are tried on receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyring {
    /// `keys[0]` is the primary.
    keys: Vec<Key>,
}

impl Keyring {
    /// A ring holding only `primary`.
    pub fn new(primary: Key) -> Self {
        Keyring {
            keys: vec![primary],
        }
    }

    /// A ring from keys, the first one primary.
    pub fn from_keys(keys: Vec<Key>) -> Result<Self, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::Malformed("an empty keyring".into()));
        }
        if keys.len() > MAX_KEYS {
            return Err(KeyError::Full);
        }
        Ok(Keyring { keys })
    }

    /// The primary key.
    pub fn primary(&self) -> &Key {
        &self.keys[0]
    }

    /// Every key, primary first.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// Adds a key for receiving (idempotent).
    pub fn install(&mut self, key: Key) -> Result<(), KeyError> {
        if self.keys.contains(&key) {
            return Ok(());
        }
        if self.keys.len() >= MAX_KEYS {
            return Err(KeyError::Full);
        }
        self.keys.push(key);
        Ok(())
    }

    /// Makes an installed key the primary.
    pub fn use_key(&mut self, key: &Key) -> Result<(), KeyError> {
        let at = self
            .keys
            .iter()
            .position(|k| k == key)
            .ok_or(KeyError::Unknown)?;
        self.keys.swap(0, at);
        Ok(())
    }

    /// Removes a secondary key.
    pub fn remove(&mut self, key: &Key) -> Result<(), KeyError> {
        let at = self
            .keys
            .iter()
            .position(|k| k == key)
            .ok_or(KeyError::Unknown)?;
        if at == 0 {
            return Err(KeyError::RemovePrimary);
        }
        self.keys.remove(at);
        Ok(())
    }

    /// Reads a keyring file: a JSON array of base64 keys, the primary first.
    pub fn load(path: &std::path::Path) -> Result<Keyring, KeyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| KeyError::Malformed(format!("cannot read {}: {e}", path.display())))?;
        let keys: Vec<String> = serde_json::from_str(&text).map_err(|e| {
            KeyError::Malformed(format!(
                "{} is not a JSON array of base64 keys: {e}",
                path.display()
            ))
        })?;
        let keys = keys
            .iter()
            .map(|k| Key::from_base64(k))
            .collect::<Result<Vec<_>, _>>()?;
        Keyring::from_keys(keys)
    }

    /// Writes the keyring file (owner-only permissions where the platform has them).
    pub fn save(&self, path: &std::path::Path) -> io::Result<()> {
        let keys: Vec<String> = self.keys.iter().map(Key::to_base64).collect();
        let text = serde_json::to_string_pretty(&keys).map_err(io::Error::other)?;
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, text)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::rename(&temporary, path)
    }

    fn find(&self, id: u32) -> Option<&Key> {
        self.keys.iter().find(|k| k.id() == id)
    }
}

/// Why sealed data was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Plain data where sealed data was required.
    #[error("plaintext refused: this cluster is encrypted")]
    Plaintext,
    /// Sealed with a key this node does not hold.
    #[error("sealed with a key this node does not hold (key id {0:08x})")]
    UnknownKey(u32),
    /// The tag did not verify: wrong key, wrong cluster label, or tampering.
    #[error("authentication failed (wrong key or cluster label, or tampered data)")]
    Forged,
    /// Too short to be sealed data.
    #[error("truncated sealed data")]
    Truncated,
}

/// A node's encryption state, shared by its sockets.
#[derive(Debug)]
pub struct Security {
    keyring: RwLock<Keyring>,
    label: String,
    /// Where the keyring is saved after every change, if anywhere.
    file: Mutex<Option<std::path::PathBuf>>,
    warned: Mutex<BTreeSet<SocketAddr>>,
    /// Datagrams and handshakes refused.
    pub refused: AtomicU64,
}

impl Security {
    /// Encryption with `keyring`, bound to the cluster `label` (nodes with another label
    /// cannot read this cluster's traffic even with the same key).
    pub fn new(keyring: Keyring, label: impl Into<String>) -> Arc<Self> {
        Arc::new(Security {
            keyring: RwLock::new(keyring),
            label: label.into(),
            file: Mutex::new(None),
            warned: Mutex::new(BTreeSet::new()),
            refused: AtomicU64::new(0),
        })
    }

    /// A copy of the keyring.
    pub fn keyring(&self) -> Keyring {
        self.keyring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes the keyring (and saves it, when a file was given).
    pub fn update<R>(&self, change: impl FnOnce(&mut Keyring) -> R) -> R {
        let (result, ring) = {
            let mut ring = self.keyring.write().unwrap_or_else(|p| p.into_inner());
            (change(&mut ring), ring.clone())
        };
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(path) = file {
            if let Err(error) = ring.save(&path) {
                tracing::warn!(path = %path.display(), %error, "could not save the keyring");
            }
        }
        result
    }

    /// Saves the keyring to `path` after every change from now on.
    pub fn persist_to(&self, path: std::path::PathBuf) {
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = Some(path);
    }

    /// Counts a refusal and logs it the first time for this peer.
    fn refuse(&self, peer: SocketAddr, what: &str, error: &dyn std::fmt::Display) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if warned.len() < MAX_WARNED && warned.insert(peer) {
            tracing::warn!(%peer, %error, "refusing {what} (logged once per peer)");
        }
    }

    /// Seals a datagram under the primary key.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let key = self.keyring().primary().clone();
        let mut nonce = [0u8; 24];
        // The OS generator failing leaves a zero nonce; sealing still authenticates.
        let _ = getrandom::getrandom(&mut nonce);
        let mut header = Vec::with_capacity(DATAGRAM_OVERHEAD + plain.len());
        header.extend_from_slice(&[DATAGRAM_MAGIC, VERSION]);
        header.extend_from_slice(&key.id().to_be_bytes());
        header.extend_from_slice(&nonce);
        let aad = [self.label.as_bytes(), &header[..6]].concat();
        let cipher = XChaCha20Poly1305::new((&key.0).into());
        match cipher.encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plain,
                aad: &aad,
            },
        ) {
            Ok(sealed) => {
                header.extend_from_slice(&sealed);
                header
            }
            Err(_) => Vec::new(),
        }
    }

    /// Opens a sealed datagram.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.first() != Some(&DATAGRAM_MAGIC) || sealed.get(1) != Some(&VERSION) {
            return Err(SealError::Plaintext);
        }
        if sealed.len() < DATAGRAM_OVERHEAD {
            return Err(SealError::Truncated);
        }
        let id = u32::from_be_bytes([sealed[2], sealed[3], sealed[4], sealed[5]]);
        let keyring = self.keyring();
        let key = keyring.find(id).ok_or(SealError::UnknownKey(id))?;
        let aad = [self.label.as_bytes(), &sealed[..6]].concat();
        let cipher = XChaCha20Poly1305::new((&key.0).into());
        cipher
            .decrypt(
                XNonce::from_slice(&sealed[6..30]),
                Payload {
                    msg: &sealed[30..],
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Forged)
    }

    fn session_keys(&self, key: &Key, client: &[u8; 32], server: &[u8; 32]) -> (Cipher, Cipher) {
        let salt = [client.as_slice(), server.as_slice()].concat();
        let hkdf = hkdf::Hkdf::<sha2::Sha256>::new(Some(&salt), &key.0);
        let derive = |direction: &str| {
            let mut out = [0u8; 32];
            let info = format!("grapevine {direction} {}", self.label);
            // 32 bytes is far below HKDF-SHA256's output limit.
            let _ = hkdf.expand(info.as_bytes(), &mut out);
            Cipher {
                aead: ChaCha20Poly1305::new((&out).into()),
                counter: 0,
            }
        };
        (derive("client-to-server"), derive("server-to-client"))
    }

    /// The client side of the stream handshake.
    pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
    ) -> io::Result<SealedStream<S>> {
        let key = self.keyring().primary().clone();
        let mut client = [0u8; 32];
        getrandom::getrandom(&mut client).map_err(io::Error::other)?;
        let mut hello = HANDSHAKE_MAGIC.to_vec();
        hello.extend_from_slice(&key.id().to_be_bytes());
        hello.extend_from_slice(&client);
        stream.write_all(&hello).await?;
        let mut reply = [0u8; 4 + 32];
        stream.read_exact(&mut reply).await?;
        if reply[..4] == REFUSED_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the peer holds none of this node's keys (wrong key or cluster)",
            ));
        }
        if reply[..4] != HANDSHAKE_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the peer does not speak grapevine's encrypted protocol",
            ));
        }
        let mut server = [0u8; 32];
        server.copy_from_slice(&reply[4..]);
        let (mut send, mut receive) = self.session_keys(&key, &client, &server);
        let proof = read_record(&mut stream, PROOF.len() + TAG_LEN).await?;
        match receive.open(&proof) {
            Ok(plain) if plain == PROOF => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the peer does not hold this cluster's key",
                ))
            }
        }
        stream.write_all(&send.seal_record(CLIENT_PROOF)?).await?;
        Ok(SealedStream::new(stream, send, receive, Vec::new()))
    }

    /// The server side: a sealed stream, or the plaintext stream (its first bytes put back)
    /// for the caller to restrict.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        peer: SocketAddr,
    ) -> io::Result<Accepted<S>> {
        let mut magic = [0u8; 4];
        stream.read_exact(&mut magic).await?;
        if magic != HANDSHAKE_MAGIC {
            return Ok(Accepted::Plain(stream, magic.to_vec()));
        }
        let mut hello = [0u8; 4 + 32];
        stream.read_exact(&mut hello).await?;
        let id = u32::from_be_bytes([hello[0], hello[1], hello[2], hello[3]]);
        let Some(key) = self.keyring().find(id).cloned() else {
            let error = SealError::UnknownKey(id);
            self.refuse(peer, "a connection", &error);
            // Tell the client why, so that it can say so; this reveals nothing secret.
            let mut refusal = REFUSED_MAGIC.to_vec();
            refusal.extend_from_slice(&[0u8; 32]);
            let _ = stream.write_all(&refusal).await;
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, error));
        };
        let mut client = [0u8; 32];
        client.copy_from_slice(&hello[4..]);
        let mut server = [0u8; 32];
        getrandom::getrandom(&mut server).map_err(io::Error::other)?;
        let (mut receive, mut send) = self.session_keys(&key, &client, &server);
        let mut reply = HANDSHAKE_MAGIC.to_vec();
        reply.extend_from_slice(&server);
        reply.extend_from_slice(&send.seal_record(PROOF)?);
        stream.write_all(&reply).await?;
        // The client proves itself with its first record, no larger than its proof.
        let first = read_record(&mut stream, CLIENT_PROOF.len() + TAG_LEN).await?;
        match receive.open(&first) {
            Ok(plain) if plain == CLIENT_PROOF => Ok(Accepted::Sealed(SealedStream::new(
                stream,
                send,
                receive,
                Vec::new(),
            ))),
            Ok(_) => {
                self.refuse(peer, "a connection", &SealError::Forged);
                Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    SealError::Forged,
                ))
            }
            Err(error) => {
                self.refuse(peer, "a connection", &error);
                Err(io::Error::new(io::ErrorKind::PermissionDenied, error))
            }
        }
    }
}

/// What [`Security::accept`] found.
pub enum Accepted<S> {
    /// An authenticated, encrypted stream.
    Sealed(SealedStream<S>),
    /// A plaintext stream and the bytes already read from it.
    Plain(S, Vec<u8>),
}

struct Cipher {
    aead: ChaCha20Poly1305,
    counter: u64,
}

impl Cipher {
    fn nonce(&mut self) -> io::Result<[u8; 12]> {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&self.counter.to_le_bytes());
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| io::Error::other("record counter exhausted"))?;
        Ok(nonce)
    }

    /// `[length, ciphertext]` of one record.
    fn seal_record(&mut self, plain: &[u8]) -> io::Result<Vec<u8>> {
        let nonce = self.nonce()?;
        let sealed = self
            .aead
            .encrypt((&nonce).into(), plain)
            .map_err(|_| io::Error::other("sealing failed"))?;
        let mut record = (sealed.len() as u32).to_be_bytes().to_vec();
        record.extend_from_slice(&sealed);
        Ok(record)
    }

    fn open(&mut self, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let nonce = self.nonce().map_err(|_| SealError::Forged)?;
        self.aead
            .decrypt((&nonce).into(), sealed)
            .map_err(|_| SealError::Forged)
    }
}

/// Reads one handshake record of at most `max` bytes (checked before allocating).
async fn read_record<S: AsyncRead + Unpin>(stream: &mut S, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "record too large",
        ));
    }
    let mut record = vec![0u8; len];
    stream.read_exact(&mut record).await?;
    Ok(record)
}

/// An encrypted, authenticated stream.
pub struct SealedStream<S> {
    inner: S,
    send: Cipher,
    receive: Cipher,
    /// Decrypted bytes not yet read.
    plain: Vec<u8>,
    plain_at: usize,
    /// Raw bytes of a record being received.
    incoming: Vec<u8>,
    /// Sealed bytes not yet written.
    outgoing: Vec<u8>,
    outgoing_at: usize,
}

impl<S> SealedStream<S> {
    fn new(inner: S, send: Cipher, receive: Cipher, first: Vec<u8>) -> Self {
        SealedStream {
            inner,
            send,
            receive,
            plain: first,
            plain_at: 0,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            outgoing_at: 0,
        }
    }
}

impl<S: AsyncWrite + Unpin> SealedStream<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.outgoing_at < self.outgoing.len() {
            let written = ready!(
                Pin::new(&mut self.inner).poll_write(cx, &self.outgoing[self.outgoing_at..])
            )?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing_at += written;
        }
        self.outgoing.clear();
        self.outgoing_at = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SealedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.plain_at < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_at);
                buf.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                return Poll::Ready(Ok(()));
            }
            // A whole record buffered: decrypt it.
            if this.incoming.len() >= 4 {
                let len = u32::from_be_bytes([
                    this.incoming[0],
                    this.incoming[1],
                    this.incoming[2],
                    this.incoming[3],
                ]) as usize;
                if len > MAX_RECORD + 16 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "record too large",
                    )));
                }
                if this.incoming.len() >= 4 + len {
                    let plain = this
                        .receive
                        .open(&this.incoming[4..4 + len])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    this.incoming.drain(..4 + len);
                    this.plain = plain;
                    this.plain_at = 0;
                    continue;
                }
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // End of stream; a partial record at the end is an error.
                return Poll::Ready(if this.incoming.is_empty() {
                    Ok(())
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                });
            }
            this.incoming.extend_from_slice(read.filled());
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SealedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // Bound what is buffered: write out the previous records first.
        if this.outgoing.len() - this.outgoing_at >= MAX_RECORD {
            ready!(this.poll_drain(cx))?;
        }
        let n = buf.len().min(MAX_RECORD);
        let record = this.send.seal_record(&buf[..n])?;
        this.outgoing.extend_from_slice(&record);
        // Push what we can now; the rest goes on flush.
        if let Poll::Ready(Err(error)) = this.poll_drain(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A plaintext stream whose first bytes were already read (to look for the handshake).
pub struct Replayed<S> {
    inner: S,
    prefix: Vec<u8>,
    at: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replayed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replayed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream of an encrypted node: sealed, plaintext (control from loopback only), or just
/// accepted and not yet examined.
pub enum SecureStream<S> {
    /// Encrypted and authenticated.
    Sealed(Box<SealedStream<S>>),
    /// Plaintext.
    Plain(Replayed<S>),
    /// Accepted; the handshake has not run yet.
    Fresh(Option<S>),
}

macro_rules! delegate {
    ($self:ident, $cx:ident, $method:ident $(, $arg:expr)*) => {
        match &mut *$self {
            SecureStream::Sealed(s) => Pin::new(s.as_mut()).$method($cx $(, $arg)*),
            SecureStream::Plain(s) => Pin::new(s).$method($cx $(, $arg)*),
            SecureStream::Fresh(_) => Poll::Ready(Err(io::Error::other("handshake not done"))),
        }
    };
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for SecureStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, cx, poll_read, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for SecureStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, cx, poll_write, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, cx, poll_flush)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, cx, poll_shutdown)
    }
}

/// A transport whose datagrams and streams are sealed with a keyring.
#[derive(Clone)]
pub struct SecureTransport<T> {
    inner: T,
    security: Arc<Security>,
}

impl<T> SecureTransport<T> {
    /// Seals everything `inner` carries with `security`.
    pub fn new(inner: T, security: Arc<Security>) -> Self {
        SecureTransport { inner, security }
    }
}

/// A UDP socket that seals what it sends and drops (counts, logs once) what does not open.
pub struct SealedUdp<U> {
    inner: U,
    security: Arc<Security>,
}

impl<U: UdpSocket> UdpSocket for SealedUdp<U> {
    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> io::Result<usize> {
        let sealed = self.security.seal(buf);
        self.inner.send_to(&sealed, target).await?;
        Ok(buf.len())
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let mut raw = vec![0u8; buf.len() + DATAGRAM_OVERHEAD];
        loop {
            let (len, from) = self.inner.recv_from(&mut raw).await?;
            match self.security.open(&raw[..len]) {
                Ok(plain) if plain.len() <= buf.len() => {
                    buf[..plain.len()].copy_from_slice(&plain);
                    return Ok((plain.len(), from));
                }
                Ok(_) => self
                    .security
                    .refuse(from, "datagrams", &"oversized datagram"),
                Err(error) => self.security.refuse(from, "datagrams", &error),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A listener whose streams are examined by [`Transport::prepare_accepted`].
pub struct SecureListener<L> {
    inner: L,
}

impl<L: Listener> Listener for SecureListener<L> {
    type Stream = SecureStream<L::Stream>;
    async fn accept(&self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, peer) = self.inner.accept().await?;
        Ok((SecureStream::Fresh(Some(stream)), peer))
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl<T: Transport> Transport for SecureTransport<T> {
    type Udp = SealedUdp<T::Udp>;
    type Stream = SecureStream<T::Stream>;
    type Listener = SecureListener<T::Listener>;

    async fn bind_udp(&self, addr: SocketAddr) -> io::Result<Self::Udp> {
        Ok(SealedUdp {
            inner: self.inner.bind_udp(addr).await?,
            security: self.security.clone(),
        })
    }

    async fn bind_tcp(&self, addr: SocketAddr) -> io::Result<Self::Listener> {
        Ok(SecureListener {
            inner: self.inner.bind_tcp(addr).await?,
        })
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Stream> {
        let stream = self.inner.connect(addr).await?;
        let sealed = self.security.connect(stream).await?;
        Ok(SecureStream::Sealed(Box::new(sealed)))
    }

    async fn prepare_accepted(
        &self,
        stream: Self::Stream,
        peer: SocketAddr,
    ) -> io::Result<Self::Stream> {
        match stream {
            SecureStream::Fresh(Some(stream)) => {
                Ok(match self.security.accept(stream, peer).await? {
                    Accepted::Sealed(sealed) => SecureStream::Sealed(Box::new(sealed)),
                    Accepted::Plain(stream, prefix) => SecureStream::Plain(Replayed {
                        inner: stream,
                        prefix,
                        at: 0,
                    }),
                })
            }
            other => Ok(other),
        }
    }

    fn is_authenticated(stream: &Self::Stream) -> bool {
        matches!(stream, SecureStream::Sealed(_))
    }

    fn security(&self) -> Option<&Arc<Security>> {
        Some(&self.security)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn security(key: &Key, label: &str) -> Arc<Security> {
        Security::new(Keyring::new(key.clone()), label)
    }

    #[test]
    fn datagrams_open_only_with_the_key_and_label() {
        let key = Key::generate().unwrap();
        let a = security(&key, "prod");
        let sealed = a.seal(b"hello");
        assert_eq!(a.open(&sealed).unwrap(), b"hello");
        assert_ne!(sealed, a.seal(b"hello"), "fresh nonce each time");
        let other_label = security(&key, "staging");
        assert_eq!(other_label.open(&sealed), Err(SealError::Forged));
        let other_key = security(&Key::generate().unwrap(), "prod");
        assert!(matches!(
            other_key.open(&sealed),
            Err(SealError::UnknownKey(_))
        ));
        assert_eq!(a.open(b"plain"), Err(SealError::Plaintext));
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(a.open(&tampered), Err(SealError::Forged));
        assert_eq!(a.open(&sealed[..20]), Err(SealError::Truncated));
    }

    #[test]
    fn keyring_rotation_rules() {
        let (k1, k2) = (Key::generate().unwrap(), Key::generate().unwrap());
        let mut ring = Keyring::new(k1.clone());
        assert_eq!(ring.use_key(&k2), Err(KeyError::Unknown));
        ring.install(k2.clone()).unwrap();
        ring.use_key(&k2).unwrap();
        assert_eq!(ring.primary(), &k2);
        assert_eq!(ring.remove(&k2), Err(KeyError::RemovePrimary));
        ring.remove(&k1).unwrap();
        assert_eq!(ring.keys(), std::slice::from_ref(&k2));
        assert_eq!(Key::from_base64(&k2.to_base64()).unwrap(), k2);
        assert!(Key::from_base64("c2hvcnQ=").is_err());
        assert!(!format!("{k2:?}").contains(&k2.to_base64()));
    }

    #[tokio::test]
    async fn streams_handshake_and_carry_data_both_ways() {
        let key = Key::generate().unwrap();
        let server_side = security(&key, "prod");
        let client_side = security(&key, "prod");
        let (client, server) = tokio::io::duplex(1 << 16);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let accept = tokio::spawn(async move {
            match server_side.accept(server, peer).await.unwrap() {
                Accepted::Sealed(mut stream) => {
                    let mut buf = vec![0u8; 100_000];
                    stream.read_exact(&mut buf).await.unwrap();
                    stream.write_all(&buf).await.unwrap();
                    stream.flush().await.unwrap();
                    buf
                }
                Accepted::Plain(..) => panic!("should be sealed"),
            }
        });
        let mut stream = client_side.connect(client).await.unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        stream.write_all(&data).await.unwrap();
        stream.flush().await.unwrap();
        let mut back = vec![0u8; data.len()];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, data);
        assert_eq!(accept.await.unwrap(), data);
    }

    #[tokio::test]
    async fn a_wrong_key_is_refused_and_plaintext_recognised() {
        let server_side = security(&Key::generate().unwrap(), "prod");
        let client_side = security(&Key::generate().unwrap(), "prod");
        let (client, server) = tokio::io::duplex(1 << 16);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let accept =
            tokio::spawn(async move { server_side.accept(server, peer).await.map(|_| ()) });
        assert!(client_side.connect(client).await.is_err());
        assert!(accept.await.unwrap().is_err());

        let server_side = security(&Key::generate().unwrap(), "prod");
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client
            .write_all(&[0, 0, 0, 5, 1, 2, 3, 4, 5])
            .await
            .unwrap();
        match server_side.accept(server, peer).await.unwrap() {
            Accepted::Plain(_, prefix) => assert_eq!(prefix, [0, 0, 0, 5]),
            Accepted::Sealed(_) => panic!("plaintext taken for sealed"),
        }
    }

    #[tokio::test]
    async fn a_client_knowing_only_the_key_id_gets_no_large_record_read() {
        let key = Key::generate().unwrap();
        let server_side = security(&key, "prod");
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let accept =
            tokio::spawn(async move { server_side.accept(server, peer).await.map(|_| ()) });
        // A valid hello (the key id is public), then a 16 KiB "first record" it cannot seal.
        let mut hello = HANDSHAKE_MAGIC.to_vec();
        hello.extend_from_slice(&key.id().to_be_bytes());
        hello.extend_from_slice(&[7u8; 32]);
        client.write_all(&hello).await.unwrap();
        let mut reply = [0u8; 4 + 32];
        client.read_exact(&mut reply).await.unwrap();
        client
            .write_all(&((MAX_RECORD + TAG_LEN) as u32).to_be_bytes())
            .await
            .unwrap();
        let error = accept.await.unwrap().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    }
}
