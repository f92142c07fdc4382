//! The caching reverse proxy behind `examples/proxy.rs`, also compiled into `tests/proxy.rs`:
//! [`streamcache_http`]'s cache layer over its [`Upstream`] service, on a disk cache, served
//! with its connection limits. The HTTP behaviour (what is cached, for how long, ranges,
//! revalidation, failures) is the layer's; see the `streamcache-http` crate documentation.

use std::convert::Infallible;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::{Request, Response, Uri};
use streamcache::Cache;
pub(crate) use streamcache_http::ConnLimits;
use streamcache_http::{
    BoxError, CacheConfig, CacheLayer, CacheService, CacheStatus, RequestBody, ResponseBody,
    Upstream,
};
use tokio::net::TcpListener;
use tower_layer::Layer;
use tower_service::Service;

/// What the proxy needs to start.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Base URI of the origin (`http://host:port`, optionally with a path prefix).
    pub(crate) upstream: Uri,
    /// Cache directory.
    pub(crate) dir: PathBuf,
    /// The caching layer's settings (upstream timeout, most downloads at once, purge).
    pub(crate) cache: CacheConfig,
    /// Optional cache size limit in bytes (least recently used entries are evicted).
    pub(crate) max_bytes: Option<u64>,
    /// Client connection limits.
    pub(crate) limits: ConnLimits,
    /// A shared tier (a bucket) that a fleet of proxies shares.
    #[cfg(feature = "shared")]
    pub(crate) shared: Option<streamcache::shared::SharedTier>,
}

impl Config {
    /// A configuration with the default timeouts and limits, and no size limit.
    pub(crate) fn new(upstream: Uri, dir: impl Into<PathBuf>) -> Config {
        Config {
            upstream,
            dir: dir.into(),
            cache: CacheConfig::default(),
            max_bytes: None,
            limits: ConnLimits::default(),
            #[cfg(feature = "shared")]
            shared: None,
        }
    }
}

/// The proxy: the cache layer over the upstream service.
#[derive(Debug)]
pub(crate) struct Proxy {
    service: Logging<CacheService<Upstream>>,
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
        #[cfg(feature = "shared")]
        if let Some(tier) = &config.shared {
            builder = builder.shared(tier.clone());
        }
        let cache = builder.build()?;
        let layer = CacheLayer::with_config(cache, config.cache.clone());
        let upstream = Upstream::new(config.upstream.clone()).map_err(|e| e.to_string())?;
        Ok(Arc::new(Proxy {
            service: Logging(layer.layer(upstream)),
            limits: config.limits,
        }))
    }

    /// The cache (for statistics).
    pub(crate) fn cache(&self) -> &Cache {
        self.service.0.cache()
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

/// Logs one line per request (method, path, cache outcome, status, bytes, duration, time to
/// first byte, and how it ended) when its response body is done or dropped.
#[derive(Debug, Clone)]
pub(crate) struct Logging<S>(S);

impl<S> Service<Request<RequestBody>> for Logging<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let method = req.method().clone();
        let path = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
        let start = Instant::now();
        let called = self.0.call(req);
        Box::pin(async move {
            let resp = called.await?;
            let log = RequestLog {
                method,
                path,
                cache: resp
                    .extensions()
                    .get::<CacheStatus>()
                    .map_or("none", |s| s.as_str()),
                status: resp.status().as_u16(),
                start,
                first_byte: None,
                bytes: 0,
                error: None,
            };
            if let Some(range) = resp.body().file_range() {
                // Sent by the server with `sendfile`, not polled: logged now, whole. (Wrapped,
                // it would be read into memory instead.)
                let mut log = log;
                log.bytes = range.len();
                log.emit("sent from file");
                return Ok(resp);
            }
            Ok(resp.map(|body| ResponseBody::new(Logged { body, log })))
        })
    }
}

/// What is logged of a request.
struct RequestLog {
    method: hyper::Method,
    path: String,
    cache: &'static str,
    status: u16,
    start: Instant,
    first_byte: Option<Duration>,
    bytes: u64,
    error: Option<String>,
}

/// A body that counts what it delivers and logs its request when dropped.
struct Logged {
    body: ResponseBody,
    log: RequestLog,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let outcome = match &self.log.error {
            Some(e) => e.as_str(),
            None if self.body.is_end_stream() => "complete",
            None => "client gone",
        };
        self.log.emit(outcome);
    }
}

impl RequestLog {
    fn emit(&self, outcome: &str) {
        let log = self;
        tracing::info!(
            method = %log.method,
            path = %log.path,
            cache = log.cache,
            status = log.status,
            bytes = log.bytes,
            ms = log.start.elapsed().as_millis() as u64,
            ttfb_ms = log.first_byte.map(|d| d.as_millis() as u64),
            outcome,
            "request"
        );
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &polled {
            Some(Err(e)) => this.log.error = Some(format!("error: {e}")),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if this.log.first_byte.is_none() {
                        this.log.first_byte = Some(this.log.start.elapsed());
                    }
                    this.log.bytes += data.len() as u64;
                }
            }
            None => {}
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
