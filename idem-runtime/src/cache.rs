//! The local tier: completed results this process has seen, kept in a bounded moka cache.
//!
//! Only completed, unexpired records are cached, each with the time it has left in the store,
//! so a replay from here is never served after the store would have stopped serving it. An
//! in-progress record is never cached: its outcome is not known yet.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;

use crate::codec::Codec;
use crate::key::{Fingerprint, RecordId};

/// A completed result as the local tier keeps it.
#[derive(Debug)]
pub(crate) struct Cached {
    pub(crate) codec: Codec,
    pub(crate) bytes: Arc<[u8]>,
    pub(crate) fingerprint: Option<Fingerprint>,
    expires_in: Duration,
}

struct PerEntry;

impl Expiry<RecordId, Arc<Cached>> for PerEntry {
    fn expire_after_create(
        &self,
        _key: &RecordId,
        value: &Arc<Cached>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.expires_in)
    }

    fn expire_after_update(
        &self,
        _key: &RecordId,
        value: &Arc<Cached>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.expires_in)
    }
}

#[derive(Clone)]
pub(crate) struct LocalCache {
    cache: Cache<RecordId, Arc<Cached>>,
}

impl LocalCache {
    /// A cache of at most `capacity` entries, or `None` when `capacity` is zero (turned off).
    pub(crate) fn new(capacity: u64) -> Option<LocalCache> {
        (capacity > 0).then(|| LocalCache {
            cache: Cache::builder()
                .max_capacity(capacity)
                .expire_after(PerEntry)
                .build(),
        })
    }

    pub(crate) fn get(&self, id: &RecordId) -> Option<Arc<Cached>> {
        self.cache.get(id)
    }

    pub(crate) fn insert(
        &self,
        id: RecordId,
        codec: Codec,
        bytes: Arc<[u8]>,
        fingerprint: Option<Fingerprint>,
        expires_in: Duration,
    ) {
        if expires_in.is_zero() {
            return;
        }
        self.cache.insert(
            id,
            Arc::new(Cached {
                codec,
                bytes,
                fingerprint,
                expires_in,
            }),
        );
    }

    #[cfg(test)]
    pub(crate) fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(k: &str) -> RecordId {
        RecordId::new("ns/v0", k)
    }

    fn put(c: &LocalCache, k: &str, ttl: Duration) {
        c.insert(id(k), Codec::Json, Arc::from(&b"1"[..]), None, ttl);
    }

    #[test]
    fn zero_capacity_turns_it_off() {
        assert!(LocalCache::new(0).is_none());
    }

    #[test]
    fn entries_expire_on_their_own_schedule() {
        let c = LocalCache::new(100).expect("on");
        put(&c, "short", Duration::from_millis(50));
        put(&c, "long", Duration::from_secs(60));
        assert!(c.get(&id("short")).is_some());
        std::thread::sleep(Duration::from_millis(120));
        assert!(
            c.get(&id("short")).is_none(),
            "expired with its own deadline"
        );
        assert!(c.get(&id("long")).is_some(), "the other entry is untouched");
    }

    #[test]
    fn bounded_by_entry_count() {
        let c = LocalCache::new(10).expect("on");
        for i in 0..200 {
            put(&c, &i.to_string(), Duration::from_secs(60));
        }
        assert!(c.entry_count() <= 10, "{}", c.entry_count());
    }
}
