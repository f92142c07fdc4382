//! A shared tier on object storage (S3 and compatibles, or any [`object_store`] store): one
//! producer per key across a whole fleet, and readers on other machines that read an entry
//! while it is produced, every byte verified.
//!
//! Add it under a memory or a disk cache with [`CacheBuilder::shared`](crate::CacheBuilder::shared):
//!
//! ```
//! use std::io::{Read, Write};
//! use std::sync::Arc;
//! use streamcache::{Cache, Entry, shared::SharedTier};
//!
//! // Two nodes on one bucket (here an in-memory store; `SharedTier::from_url("s3://…")` in
//! // production, with the `s3` feature).
//! let bucket = Arc::new(object_store::memory::InMemory::new());
//! let node_a = Cache::builder().shared(SharedTier::new(bucket.clone())).build()?;
//! let node_b = Cache::builder().shared(SharedTier::new(bucket)).build()?;
//!
//! let Entry::Miss(mut w) = node_a.get_or_create("model.bin")? else { unreachable!() };
//! // Node B asks while A produces: it gets a reader that tails A's upload.
//! let Entry::Hit(mut r) = node_b.get_or_create("model.bin")? else { unreachable!() };
//! w.write_all(b"weights")?;
//! w.finish()?;
//! let mut got = Vec::new();
//! r.read_to_end(&mut got)?;
//! assert_eq!(got, b"weights");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # In the bucket
//!
//! ```text
//! <prefix>/<blake3(key) hex>/
//!     lease                    who produces now: generation, node, state
//!                              (producing | done | aborted), heartbeat time
//!     <generation>/00000000    chunk 0: header (generation, index, last?, offset, hash) +
//!     <generation>/00000001      the writer's metadata (chunk 0 only) + bytes; the hash
//!                                is blake3 over the blake3 of each 1 MiB piece, so a node
//!                                uploading a disk entry reuses the block hashes its disk
//!                                storage computed while writing
//!     …
//!     manifest                 the commit point, written last: key, generation, length,
//!                              finish time, own time to live, metadata, each chunk's
//!                              length and blake3, and a blake3 of the manifest itself
//! ```
//!
//! # The protocol of a local miss
//!
//! ```text
//!  GET manifest ──valid, not expired──▶ Hit: download (4 chunks ahead, each checked)
//!       │ absent / expired / corrupt
//!       ▼
//!  PUT lease If-None-Match: * ──won──▶ Miss: produce; chunks upload while written;
//!       │ exists                              heartbeat every lease/4 (If-Match)
//!       ▼                                     until the manifest is in; lease "done"
//!  GET lease ──producing, heartbeat fresh──▶ Hit: tail its generation's chunks
//!       │ stale / aborted / done without manifest
//!       ▼
//!  PUT lease If-Match: <its e-tag> ──won──▶ Miss (a new generation)
//!       │ lost: someone else took it
//!       └──▶ start over (a few rounds at most)
//! ```
//!
//! * **One producer fleet-wide.** Only conditional writes decide who produces: a create
//!   (`If-None-Match: *`) for a new key, a compare-and-swap (`If-Match`) to take over a lease
//!   whose heartbeat is older than [`lease`](SharedTier::lease), or that is aborted, or done
//!   while its manifest is gone or expired. Chunks live under their generation, and readers
//!   check each chunk's generation and index, so a dead producer's chunks never mix with its
//!   successor's.
//! * **Readers elsewhere stream while it is produced.** A producer cuts a chunk every
//!   [`chunk_size`](SharedTier::chunk_size) bytes or [`chunk_interval`](SharedTier::chunk_interval)
//!   after the chunk's first byte; a tailing node polls for the next chunk every
//!   [`poll_interval`](SharedTier::poll_interval), so its first byte comes about one chunk
//!   interval plus one poll interval after the producer wrote it. Each node downloads or
//!   tails an entry once, into its local cache; its local readers read that.
//! * **Failures are errors, never short or wrong bytes.** A remote producer that stops
//!   heartbeating, aborts, or loses its lease makes its tailing readers fail
//!   ([`Error::Shared`]), as does one whose lease, or next chunk, cannot be read for a whole
//!   [`lease`](SharedTier::lease) (a failing bucket); a chunk or manifest that fails its hash or does
//!   not parse fails the read ([`Error::Corrupt`]) and the entry is then
//!   treated as absent here (the next request produces it again and replaces the manifest).
//!   A chunk missing under the manifest that lists it is corruption too (on a store that
//!   gives ETags: elsewhere it cannot be told from the next case); one that is gone
//!   because the entry was replaced or removed while this node downloaded it (a replaced
//!   generation's chunks are deleted one [`lease`](SharedTier::lease) after the new
//!   manifest) fails the download with [`Error::Shared`]. The next request after a failure
//!   asks the bucket again.
//! * **A down bucket never fails a request.** Every bucket operation is bounded by
//!   [`timeout`](SharedTier::timeout); if the plan does not complete in time, the request
//!   produces locally (a [`Miss`](crate::Entry::Miss)), a warning is logged, and publishing
//!   the entry is retried in the background with a growing delay (at most 256 entries wait,
//!   each holding one local reader and no buffered bytes). A lease write whose answer came
//!   too late may still have landed: that lease names this node and no upload of it, and the
//!   retry takes it over instead of waiting for it to go stale. An upload holds one chunk in
//!   memory at a time.
//! * **Which calls wait.** [`Cache::get_or_create`](crate::Cache::get_or_create) waits for the
//!   one to four round trips of a local miss (never longer than the timeout); a local hit
//!   never touches the bucket. [`Cache::get_or_produce`](crate::Cache::get_or_produce) never
//!   waits for the network: it returns a reader at once and decides in the background. The
//!   `tokio` module's [`CacheExt::get_or_create_async`](crate::tokio::CacheExt::get_or_create_async)
//!   awaits the same decision without blocking a thread. [`Cache::get`](crate::Cache::get),
//!   `contains_key`, `entry_info`, `iter` and `len` look at this node only: they never reach the
//!   bucket.
//! * **Removal and expiry.** [`Cache::remove`](crate::Cache::remove) deletes the key's manifest
//!   and lease in the bucket before it returns, and in the background the chunks of the
//!   generations those two named (a production that starts right after keeps its own; chunks
//!   of producers taken over earlier are left to the bucket's lifecycle rules). Other nodes'
//!   local copies live until they expire or are removed there. Local eviction, `clear` and
//!   [`Stream::remove`](crate::Stream::remove) never delete from the bucket (use the bucket's
//!   lifecycle rules to bound it). An entry's time to live counts from the manifest's finish
//!   time on every node (the time the producer's local entry finished, however late the
//!   upload ends): each node serves it for the shorter of the producer's recorded time to
//!   live and its own cache-wide one, counted from then.
//! * **Shutdown.** Dropping the cache stops its tier at once, without waiting for the
//!   network: entries being downloaded here abort, and an upload not yet committed stops (the
//!   entry stays in the local cache; its lease expires and the next request elsewhere produces
//!   it again).
//! * **Clocks.** Heartbeats and finish times are wall-clock times from the cache's
//!   [clock](crate::CacheBuilder::clock): nodes' clocks must agree to well within the lease
//!   (NTP does).
//!
//! # Stores
//!
//! The store must support conditional create and conditional update
//! (`PutMode::Create` and `PutMode::Update`): AWS S3, MinIO, Cloudflare R2 and `object_store`'s
//! `InMemory` do; `LocalFileSystem` has no conditional update and is refused by
//! [`CacheBuilder::build`](crate::CacheBuilder::build) with [`Error::InvalidInput`],
//! as is a store that accepts a conditional write it should refuse. A store unreachable at
//! build time is not an error: the cache serves locally until it answers. The protocol also
//! assumes read-after-write consistency (a read sees every write that was answered before
//! it began), as AWS S3, MinIO, R2 and GCS give; behind an eventually consistent gateway a
//! tailing reader may fail a healthy production (never serve wrong bytes).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;

use crate::error::{Error, Result};

mod format;
pub(crate) mod tier;

/// The configuration of a shared tier: a bucket (any [`ObjectStore`] with conditional
/// writes), a prefix in it, and the protocol's timings. Hand it to
/// [`CacheBuilder::shared`](crate::CacheBuilder::shared).
#[derive(Clone)]
pub struct SharedTier {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) prefix: String,
    pub(crate) lease: Duration,
    pub(crate) chunk_size: usize,
    pub(crate) chunk_interval: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) timeout: Duration,
}

impl fmt::Debug for SharedTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedTier")
            .field("store", &format_args!("{}", self.store))
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .field("chunk_size", &self.chunk_size)
            .field("chunk_interval", &self.chunk_interval)
            .field("poll_interval", &self.poll_interval)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The S3 store `from_url` builds: the `AWS_*` environment, and unsigned bodies unless
/// `AWS_UNSIGNED_PAYLOAD` says otherwise (see `SharedTier::from_url`).
#[cfg(feature = "s3")]
fn s3_builder(bucket: &str) -> object_store::aws::AmazonS3Builder {
    let builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
    if std::env::var_os("AWS_UNSIGNED_PAYLOAD").is_some() {
        return builder;
    }
    builder.with_unsigned_payload(true)
}

impl SharedTier {
    /// A tier on `store`, at the root of the bucket, with the default timings: lease 5 s,
    /// chunks of 8 MiB or 250 ms, polls every 100 ms, bucket operations bounded by 3 s.
    pub fn new(store: Arc<dyn ObjectStore>) -> SharedTier {
        SharedTier {
            store,
            prefix: String::new(),
            lease: Duration::from_secs(5),
            chunk_size: 8 << 20,
            chunk_interval: Duration::from_millis(250),
            poll_interval: Duration::from_millis(100),
            timeout: Duration::from_secs(3),
        }
    }

    /// A tier on an S3-compatible bucket: `s3://bucket` or `s3://bucket/prefix`. Endpoint,
    /// credentials and region come from the standard `AWS_*` environment variables
    /// (`AWS_ENDPOINT`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`…, as
    /// `object_store`'s `AmazonS3Builder::from_env` reads them); set `AWS_ALLOW_HTTP=true` for a
    /// local server over plain HTTP.
    ///
    /// Uploads are sent with `UNSIGNED-PAYLOAD` (as AWS's own SDKs send them over HTTPS):
    /// the request is signed, its body is not hashed with SHA-256 for the signature, which
    /// was about a third of the tier's CPU per upload. The body's integrity is the
    /// transport's (TLS) and the tier's own: every chunk and the manifest carry blake3 hashes
    /// that readers check. Set `AWS_UNSIGNED_PAYLOAD=false` to sign bodies too (e.g. plain
    /// HTTP across a network you do not trust).
    ///
    /// ```
    /// # #[cfg(feature = "s3")] {
    /// use streamcache::shared::SharedTier;
    /// let tier = SharedTier::from_url("s3://my-bucket/cache")?;
    /// assert!(SharedTier::from_url("ftp://nope").is_err());
    /// # }
    /// # Ok::<(), streamcache::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if the URL is not an `s3://` URL with a bucket, if the
    /// environment's settings are invalid, or if the crate was built without the `s3`
    /// feature. (No request is made here; the bucket is checked when the cache is built.)
    pub fn from_url(url: &str) -> Result<SharedTier> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            Error::invalid(format!("shared tier URL {url:?} is not s3://bucket/prefix"))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::invalid(format!(
                "shared tier URL {url:?} names no bucket"
            )));
        }
        Self::s3(url, bucket).map(|t| t.prefix(prefix))
    }

    #[cfg(feature = "s3")]
    fn s3(url: &str, bucket: &str) -> Result<SharedTier> {
        let store = s3_builder(bucket)
            .build()
            .map_err(|e| Error::invalid(format!("shared tier {url:?}: {e}")))?;
        Ok(SharedTier::new(Arc::new(store)))
    }

    #[cfg(not(feature = "s3"))]
    fn s3(url: &str, _bucket: &str) -> Result<SharedTier> {
        Err(Error::invalid(format!(
            "shared tier {url:?}: this build of streamcache has no S3 support (enable the `s3` feature)"
        )))
    }

    /// Keeps this cache's objects under `prefix` in the bucket (several caches can share a
    /// bucket under different prefixes). Leading and trailing slashes are ignored.
    pub fn prefix(mut self, prefix: &str) -> SharedTier {
        self.prefix = prefix.trim_matches('/').to_string();
        self
    }

    /// How long a producer that stopped heartbeating is trusted before another node may take
    /// its key over [5 s]. Producers heartbeat every quarter of it; remote readers of a dead
    /// producer, or of one whose lease cannot be read, fail a little over this long after its
    /// last sign of life (the next lease check, which the [`timeout`](SharedTier::timeout)
    /// bounds). Too short risks taking over a producer that is
    /// only slow to reach the bucket (it then stops uploading and keeps its local entry).
    pub fn lease(mut self, lease: Duration) -> SharedTier {
        self.lease = lease.max(Duration::from_millis(100));
        self
    }

    /// The largest chunk uploaded [8 MiB]; at most 1 GiB. Larger chunks mean fewer requests,
    /// and each upload holds one chunk in memory.
    pub fn chunk_size(mut self, bytes: usize) -> SharedTier {
        self.chunk_size = bytes.clamp(1, format::MAX_CHUNK_PAYLOAD);
        self
    }

    /// How long the first byte of a chunk waits for more before the chunk is uploaded anyway
    /// [250 ms]: the latency remote readers of a slow producer see.
    pub fn chunk_interval(mut self, interval: Duration) -> SharedTier {
        self.chunk_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How often a node tailing a producer looks for its next chunk [100 ms].
    pub fn poll_interval(mut self, interval: Duration) -> SharedTier {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The longest any bucket operation, and the decision of a local miss in
    /// [`Cache::get_or_create`](crate::Cache::get_or_create), may take before the cache goes on
    /// without the bucket [3 s].
    pub fn timeout(mut self, timeout: Duration) -> SharedTier {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }
}

/// What the shared tier of a cache did since it was built ([`Cache::shared_stats`](crate::Cache::shared_stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SharedStats {
    /// Object GET requests made.
    pub gets: u64,
    /// Object PUT requests made (chunks, leases, manifests).
    pub puts: u64,
    /// Local misses that won the lease and produced.
    pub produced: u64,
    /// Local misses served by downloading a finished entry.
    pub downloaded: u64,
    /// Local misses served by tailing another node's production.
    pub tailed: u64,
    /// Local misses produced locally because the bucket failed or did not answer in time.
    pub fallbacks: u64,
}

#[cfg(all(test, feature = "s3"))]
mod tests {
    use object_store::aws::AmazonS3ConfigKey;

    /// `from_url`'s store sends unsigned bodies unless the environment asks otherwise.
    #[test]
    fn from_url_sends_unsigned_payloads_by_default() {
        let got = super::s3_builder("bucket").get_config_value(&AmazonS3ConfigKey::UnsignedPayload);
        match std::env::var("AWS_UNSIGNED_PAYLOAD") {
            Ok(set) => {
                eprintln!("AWS_UNSIGNED_PAYLOAD={set} is set here: checking it is kept as set");
                assert_eq!(got.as_deref(), Some(set.as_str()));
            }
            Err(_) => assert_eq!(got.as_deref(), Some("true")),
        }
    }
}
