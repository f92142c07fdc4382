//! The caching reverse proxy behind `examples/proxy.rs`, also compiled into `tests/proxy.rs`:
//! [`streamcache_http`]'s cache layer over its [`Upstream`] service, on a disk cache, served
//! with its connection limits. The HTTP behaviour (what is cached, for how long, ranges,
//! revalidation, failures) is the layer's; see the `streamcache-http` crate documentation.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::Uri;
use streamcache::Cache;
pub(crate) use streamcache_http::ConnLimits;
use streamcache_http::{CacheConfig, CacheLayer, CacheService, Purge, Upstream};
use tokio::net::TcpListener;
use tower_layer::Layer;

/// What the proxy needs to start.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Base URI of the origin (`http://host:port`, optionally with a path prefix).
    pub(crate) upstream: Uri,
    /// Cache directory.
    pub(crate) dir: PathBuf,
    /// How long to wait for the upstream's response head, and for each piece of its body.
    pub(crate) upstream_timeout: Duration,
    /// Optional cache size limit in bytes (least recently used entries are evicted).
    pub(crate) max_bytes: Option<u64>,
    /// Client connection limits.
    pub(crate) limits: ConnLimits,
    /// Most upstream downloads (cache fills) at once; past this, a miss waits up to
    /// `upstream_timeout` for one to end, then gets 503.
    pub(crate) max_downloads: usize,
    /// Who may `PURGE`.
    pub(crate) purge: Purge,
}

impl Config {
    /// A configuration with the default timeouts and limits, and no size limit.
    pub(crate) fn new(upstream: Uri, dir: impl Into<PathBuf>) -> Config {
        let defaults = CacheConfig::default();
        Config {
            upstream,
            dir: dir.into(),
            upstream_timeout: defaults.upstream_timeout,
            max_bytes: None,
            limits: ConnLimits::default(),
            max_downloads: defaults.max_downloads,
            purge: Purge::Off,
        }
    }
}

/// The proxy: the cache layer over the upstream service.
#[derive(Debug)]
pub(crate) struct Proxy {
    service: CacheService<Upstream>,
    limits: ConnLimits,
}

impl Proxy {
    /// Opens (or reopens) the disk cache at `config.dir`.
    ///
    /// # Errors
    /// If the cache directory cannot be opened or is used by another process, or the
    /// upstream URI is not `http://host:port`.
    pub(crate) fn open(config: &Config) -> Result<Arc<Proxy>, Box<dyn std::error::Error>> {
        let mut builder = Cache::builder().disk(&config.dir);
        if let Some(n) = config.max_bytes {
            builder = builder.max_bytes(n);
        }
        let cache = builder.build()?;
        let mut cache_config = CacheConfig::default();
        cache_config.upstream_timeout = config.upstream_timeout;
        cache_config.max_downloads = config.max_downloads;
        cache_config.purge = config.purge;
        let layer = CacheLayer::with_config(cache, cache_config);
        let upstream = Upstream::new(config.upstream.clone()).map_err(|e| e.to_string())?;
        Ok(Arc::new(Proxy {
            service: layer.layer(upstream),
            limits: config.limits,
        }))
    }

    /// The cache (for statistics).
    pub(crate) fn cache(&self) -> &Cache {
        self.service.cache()
    }
}

/// Serves the proxy on `listener` until `shutdown` resolves (see [`streamcache_http::serve`]).
///
/// # Errors
/// None today: accept errors are logged and retried.
pub(crate) async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    streamcache_http::serve(listener, proxy.service.clone(), proxy.limits, shutdown).await
}
