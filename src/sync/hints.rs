//! Memory of the broadcast hints this node acted on.
//!
//! A hint (a change too big to gossip) was news while this node lacked the change it names.
//! When the change could not be fetched (its owner gone, the owner's state reset, the fetch
//! refused), the hint stayed news for ever: every node passed it on again with a fresh count
//! of transmissions, and every datagram carrying it started another anti-entropy exchange,
//! an endless storm. A hint is therefore news only once: the first time this node sees it
//! (or a higher one for the same owner or key). What the fetch misses, periodic
//! anti-entropy repairs; it no longer depends on the hint being repeated.

use std::collections::BTreeMap;

use crate::state::config::Version;

/// Most owners and keys remembered, each. Beyond that the smallest name is forgotten: one
/// replayed old hint may then act once more, which the driver's rate limit bounds.
pub const MAX_REMEMBERED_HINTS: usize = 4096;

/// The highest hint seen per catalog owner and per config key.
#[derive(Debug, Default, Clone)]
pub struct HintMemory {
    catalog: BTreeMap<String, (u64, u64)>,
    config: BTreeMap<String, Version>,
}

impl HintMemory {
    /// Records a catalog hint of `owner` at `(epoch, version)`; `true` if it is above every
    /// hint of that owner seen before (so: to act on), `false` if it was seen already.
    pub fn catalog_first_seen(&mut self, owner: &str, epoch: u64, version: u64) -> bool {
        first_seen(&mut self.catalog, owner, (epoch, version))
    }

    /// Records a config hint of `key` at `version`; `true` the first time that version (or
    /// a higher one) of the key is hinted.
    pub fn config_first_seen(&mut self, key: &str, version: &Version) -> bool {
        match self.config.get_mut(key) {
            Some(seen) if *seen >= *version => false,
            Some(seen) => {
                *seen = version.clone();
                true
            }
            None => {
                bounded_insert(&mut self.config, key, version.clone());
                true
            }
        }
    }

    /// Number of owners and keys remembered.
    pub fn len(&self) -> usize {
        self.catalog.len() + self.config.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn first_seen<V: Ord>(map: &mut BTreeMap<String, V>, name: &str, value: V) -> bool {
    match map.get_mut(name) {
        Some(seen) if *seen >= value => false,
        Some(seen) => {
            *seen = value;
            true
        }
        None => {
            bounded_insert(map, name, value);
            true
        }
    }
}

fn bounded_insert<V>(map: &mut BTreeMap<String, V>, name: &str, value: V) {
    if map.len() >= MAX_REMEMBERED_HINTS {
        map.pop_first();
    }
    map.insert(name.to_string(), value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::hlc::Timestamp;

    fn version(wall_ms: u64) -> Version {
        Version {
            hlc: Timestamp {
                wall_ms,
                logical: 0,
            },
            writer: "w#1".into(),
        }
    }

    #[test]
    fn a_catalog_hint_acts_once_and_only_a_higher_one_acts_again() {
        let mut m = HintMemory::default();
        assert!(m.catalog_first_seen("a", 2, 5));
        assert!(!m.catalog_first_seen("a", 2, 5), "the same hint again");
        assert!(!m.catalog_first_seen("a", 2, 4), "an older one");
        assert!(!m.catalog_first_seen("a", 1, 9), "an older epoch");
        assert!(m.catalog_first_seen("a", 2, 6));
        assert!(m.catalog_first_seen("a", 3, 0));
        assert!(m.catalog_first_seen("b", 1, 1), "owners are independent");
    }

    #[test]
    fn a_config_hint_acts_once_per_version() {
        let mut m = HintMemory::default();
        assert!(m.config_first_seen("k", &version(10)));
        assert!(!m.config_first_seen("k", &version(10)));
        assert!(!m.config_first_seen("k", &version(9)));
        assert!(m.config_first_seen("k", &version(11)));
        assert!(m.config_first_seen("other", &version(1)));
    }

    #[test]
    fn memory_is_bounded() {
        let mut m = HintMemory::default();
        for i in 0..MAX_REMEMBERED_HINTS + 10 {
            assert!(m.catalog_first_seen(&format!("owner-{i:05}"), 1, 1));
            assert!(m.config_first_seen(&format!("key-{i:05}"), &version(1)));
        }
        assert_eq!(m.len(), 2 * MAX_REMEMBERED_HINTS);
        // The most recent names are still remembered.
        let last = MAX_REMEMBERED_HINTS + 9;
        assert!(!m.catalog_first_seen(&format!("owner-{last:05}"), 1, 1));
    }
}
