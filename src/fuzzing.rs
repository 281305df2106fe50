//! Entry points for fuzz targets (`fuzz/`): every decoder and merge of untrusted input,
//! reachable from outside the crate. Each must return (an error is fine) and never panic,
//! hang or allocate without bound, whatever the bytes.

use std::net::SocketAddr;
use std::time::Instant;

use crate::membership::{Membership, NodeId, Profile};
use crate::state::catalog::{Catalog, Delta, SyncPayload};
use crate::state::config::{ConfigStore, Entry};
use crate::sync::{SyncDigest, SyncPush, SyncPushReply, SyncReply};
use crate::wire;

/// A datagram as a node receives it: envelope, foca packet or leave notice.
pub fn datagram(bytes: &[u8]) {
    let addr: SocketAddr = ([127, 0, 0, 1], 7946).into();
    let id = NodeId {
        name: "fuzz".into(),
        addr,
        generation: 1,
    };
    let mut membership = Membership::new(id, Profile::Lan, 1, Instant::now());
    let _ = membership.handle_datagram(bytes, Instant::now());
    let _ = membership.drain_outbox().count();
}

/// A sealed datagram opened with a fixed key.
pub fn sealed_datagram(bytes: &[u8]) {
    let key = crate::net::sealed::Key::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
    if let Ok(key) = key {
        let security =
            crate::net::sealed::Security::new(crate::net::sealed::Keyring::new(key), "fuzz");
        let _ = security.open(bytes);
    }
}

/// A TCP frame as the node's server decodes it (any request kind).
pub fn tcp_request(bytes: &[u8]) {
    let _ = crate::node::decode_request_for_fuzzing(bytes);
}

/// An RPC frame.
pub fn rpc_frame(bytes: &[u8]) {
    let _ = crate::rpc::decode_for_fuzzing(bytes);
}

/// Anti-entropy messages, decoded and then merged into fresh state.
pub fn sync_messages(bytes: &[u8]) {
    let mut catalog = Catalog::new("fuzz", 1);
    if let Ok(payload) = wire::decode_frame::<SyncPayload>(bytes) {
        let _ = catalog.apply_sync(payload);
    }
    if let Ok(delta) = wire::decode_frame::<Delta>(bytes) {
        let _ = catalog.apply_delta(delta);
    }
    let _ = wire::decode_frame::<SyncDigest>(bytes);
    let _ = wire::decode_frame::<SyncReply>(bytes);
    let _ = wire::decode_frame::<SyncPushReply>(bytes);
    if let Ok(push) = wire::decode_frame::<SyncPush>(bytes) {
        let mut store = ConfigStore::new("fuzz#1".into());
        let _ = store.apply_many(push.config_entries, 1_700_000_000_000);
    }
}

/// Config entries merged into a store, then the store's digest exchange run against
/// another.
pub fn config_merge(bytes: &[u8]) {
    let Ok(entries) = wire::decode_frame::<Vec<(String, Entry)>>(bytes) else {
        return;
    };
    let mut a = ConfigStore::new("a#1".into());
    let mut b = ConfigStore::new("b#1".into());
    let now = 1_700_000_000_000;
    let _ = a.apply_many(entries.clone(), now);
    let _ = b.apply_many(entries.into_iter().rev(), now);
    let buckets = a.diff_buckets(&b.digest());
    let (missing, _) = a.entries_in_buckets(&buckets, 1 << 20);
    let _ = b.apply_many(missing, now);
}

/// Catalog states merged both ways.
pub fn catalog_merge(bytes: &[u8]) {
    let Ok(payloads) = wire::decode_frame::<(SyncPayload, SyncPayload)>(bytes) else {
        return;
    };
    let mut a = Catalog::new("a", 1);
    let mut b = Catalog::new("b", 1);
    let _ = a.apply_sync(payloads.0);
    let _ = b.apply_sync(payloads.1);
    let _ = a.merge(&b);
    let _ = b.merge(&a);
    let _ = b.apply_sync(a.deltas_for(&b.digest(), 1 << 20));
}

/// A DNS query packet as the DNS interface answers it, over UDP and over TCP, against a
/// small fixed catalog.
pub fn dns_query(bytes: &[u8]) {
    crate::dns::fuzz_query(bytes);
}
