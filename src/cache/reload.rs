//! Loading a storage's committed entries into the index when the cache opens.
//!
//! Invariants: at most one version of a key is indexed (the newest by finish time, then id);
//! every other version, every blob that is not a cache entry or whose name does not match its
//! key, and every entry already past its time to live is deleted; `next_id` ends above every
//! id found, so a new version never reuses a stored name.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::index::{Indexed, Inner, Slot};
use super::meta::EntryMeta;
use super::reaper;
use super::slot::blob_name;
use crate::error::{Error, Result};

/// Loads the committed entries of the storage into the index: newest version of each key
/// wins, older versions, unreadable records and entries past their time to live are deleted.
pub(super) fn reload(inner: &Arc<Inner>) -> Result<()> {
    let blobs = inner
        .storage
        .list()
        .map_err(|e| Error::from_io_without_path("list stored entries", e))?;
    let now = inner.books.clock.now_millis();
    let mut newest: HashMap<String, (u64, EntryMeta, u64)> = HashMap::new();
    let mut max_id = 0;
    for blob in blobs {
        let id = blob
            .name
            .rsplit_once('-')
            .and_then(|(_, id)| u64::from_str_radix(id, 16).ok());
        let meta = EntryMeta::decode(&blob.meta);
        // Ids come from a counter that starts at 0 in a fresh directory: one in the top half
        // of the range was not made by a cache (and `id + 1` below must not overflow).
        let id = id.filter(|&id| id < 1 << 63);
        let (Some(id), Ok(meta)) = (id, meta) else {
            tracing::warn!(blob = %blob.name, "discarding blob that is not a cache entry");
            reaper::delete_at_open(&*inner.storage, &blob.name);
            continue;
        };
        if blob_name(&meta.key, id) != blob.name {
            tracing::warn!(blob = %blob.name, "discarding blob whose name does not match its key");
            reaper::delete_at_open(&*inner.storage, &blob.name);
            continue;
        }
        max_id = max_id.max(id + 1);
        let ttl = match (inner.limits.ttl_ms, meta.ttl_ms) {
            (Some(ttl), 0) => Some(ttl),
            (Some(ttl), own) => Some(ttl.min(own)),
            (None, 0) => None,
            (None, own) => Some(own),
        };
        let expired = ttl.is_some_and(|ttl| now >= meta.finished.saturating_add(ttl));
        if expired {
            reaper::delete_at_open(&*inner.storage, &blob.name);
            continue;
        }
        match newest.get(&meta.key) {
            Some((old_id, old, _)) if (old.finished, *old_id) >= (meta.finished, id) => {
                reaper::delete_at_open(&*inner.storage, &blob.name);
            }
            _ => {
                if let Some((old_id, old, _)) =
                    newest.insert(meta.key.clone(), (id, meta, blob.len))
                {
                    reaper::delete_at_open(&*inner.storage, &blob_name(&old.key, old_id));
                }
            }
        }
    }
    inner.next_id.store(max_id, Ordering::Relaxed);
    let mut entries: Vec<_> = newest.into_values().collect();
    entries.sort_by_key(|(_, m, _)| m.last_access);
    let mut lru = inner.lru.lock().unwrap_or_else(|e| e.into_inner());
    for (id, meta, len) in entries {
        let key: Arc<str> = Arc::from(meta.key.as_str());
        let slot = Arc::new(Slot::new(
            inner,
            key,
            id,
            meta.finished.max(1),
            meta.last_access,
            len,
        ));
        slot.set_ttl_ms(meta.ttl_ms);
        slot.set_live();
        // Stamps of this session must order after those persisted by the last one.
        inner
            .books
            .access
            .fetch_max(meta.last_access, Ordering::Relaxed);
        inner.bytes.fetch_add(len, Ordering::Relaxed);
        lru.put(id, slot.clone());
        if inner.index.insert(Indexed(slot), None).is_none() {
            inner.entries.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}
