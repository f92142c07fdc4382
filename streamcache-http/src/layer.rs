//! The caching layer: [`CacheLayer`] and its [`CacheService`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::future::{Future, poll_fn};
use std::io::{self, SeekFrom};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use http_cache_semantics::{AfterResponse, BeforeRequest, CacheOptions, CachePolicy};
use streamcache::tokio::{AsyncReader, CacheExt};
use streamcache::{Cache, Entry, Writer};
use tokio::io::AsyncSeekExt;
use tokio::sync::{Semaphore, oneshot, watch};
use tower_service::Service;

use crate::body::{BoxError, CacheBody, ResponseBody, StallTimeout, empty, simple, unavailable};
use crate::meta::{
    CLIENT_CONDITIONALS, NOT_MODIFIED_HEADERS, RangeSpec, StoredHead, View, decode_vary_index,
    encode_vary_index, if_range_holds, not_modified, variant_key, varies_on_everything,
    vary_index_key, vary_names,
};

/// A response extension that marks a body delimited by the closing of its connection (an
/// HTTP/1.0 origin's without `Content-Length`, say): its end looks the same whether the
/// origin finished or died, so such a response is relayed, never stored. [`Upstream`](crate::Upstream)
/// sets it; an inner service that relays a socket of its own should too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseDelimited;

/// How the cache layer answered a request: a response extension set on every response it
/// serves from an entry or relays (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// From a stored entry (finished, or joined while it is being written).
    Hit,
    /// This request filled the entry (it asked the inner service).
    Miss,
    /// A stale entry, revalidated with the inner service (304), served from the cache.
    Revalidated,
    /// Relayed from the inner service, not stored (not storable, other methods, `HEAD`
    /// misses).
    Pass,
}

impl CacheStatus {
    /// `"hit"`, `"miss"`, `"revalidated"` or `"pass"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Revalidated => "revalidated",
            CacheStatus::Pass => "pass",
        }
    }
}

/// Who may purge entries with the `PURGE` method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Purge {
    /// Nobody: `PURGE` is passed to the inner service like any other method.
    #[default]
    Off,
    /// Clients on a loopback address (as told by the [`ClientAddr`] request extension; a
    /// request without it is refused).
    Loopback,
    /// Everybody.
    Anyone,
}

/// The client's address, as a request extension (the server inserts it; see
/// [`serve`](crate::serve)). Used to limit purges to loopback clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Settings of a [`CacheLayer`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CacheConfig {
    /// How long to wait for the inner service's response head, and for each piece of its
    /// body: a silent origin fails the entry instead of holding it in progress. (Default: 30 s.)
    pub upstream_timeout: Duration,
    /// Most cache fills at once (a fill outlives the client that started it). Past it a miss
    /// waits up to `upstream_timeout` for a slot, then gets 503. (Default: 1024.)
    pub max_downloads: usize,
    /// How long a response that has a validator (`ETag`, `Last-Modified`) is kept after it
    /// turned stale, to be revalidated (a 304 refreshes it without its body being sent
    /// again). A response without a validator is dropped when it turns stale. (Default: 1 day.)
    pub keep_stale: Duration,
    /// Who may purge with the `PURGE` method. (Default: off.)
    pub purge: Purge,
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig {
            upstream_timeout: Duration::from_secs(30),
            max_downloads: 1024,
            keep_stale: Duration::from_secs(24 * 3600),
            purge: Purge::Off,
        }
    }
}

/// A [`tower_layer::Layer`] that caches the responses of the service it wraps in a
/// [`Cache`], by the rules of a shared cache (RFC 9111, as `http-cache-semantics` applies
/// them). See the [crate documentation](crate) for what it does.
#[derive(Clone)]
pub struct CacheLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl CacheLayer {
    /// A layer storing responses in `cache`, with the default [`CacheConfig`].
    pub fn new(cache: Cache) -> CacheLayer {
        CacheLayer::with_config(cache, CacheConfig::default())
    }

    /// A layer storing responses in `cache`, with `config`.
    pub fn with_config(cache: Cache, config: CacheConfig) -> CacheLayer {
        let downloads = Arc::new(Semaphore::new(config.max_downloads.max(1)));
        CacheLayer {
            shared: Arc::new(Shared {
                cache,
                config,
                downloads,
                opts: CacheOptions::default(),
                revalidating: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The cache (for statistics, or to remove entries).
    pub fn cache(&self) -> &Cache {
        &self.shared.cache
    }

    /// Removes every stored response of `path_and_query` (all its variants); returns whether
    /// there was one. This is what an allowed `PURGE` does.
    pub fn purge(&self, path_and_query: &str) -> bool {
        self.shared.purge_url(path_and_query)
    }
}

impl<S> tower_layer::Layer<S> for CacheLayer {
    type Service = CacheService<S>;

    fn layer(&self, inner: S) -> CacheService<S> {
        CacheService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service of a [`CacheLayer`]: answers `GET` and `HEAD` from the cache where the rules
/// allow, asks the inner service otherwise (once per key for concurrent misses), and passes
/// every other method through. It never fails: errors become 502/503 responses.
#[derive(Clone)]
pub struct CacheService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for CacheService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheService")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S> CacheService<S> {
    /// The cache.
    pub fn cache(&self) -> &Cache {
        &self.shared.cache
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for CacheService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner service is made ready by each call that uses it (on its own clone).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let shared = self.shared.clone();
        let inner = Inner(self.inner.clone());
        Box::pin(async move { Ok(shared.handle(inner, req).await) })
    }
}

/// An inner service, called with its response body boxed.
struct Inner<S>(S);

impl<S> Inner<S> {
    /// Calls the service; waits at most `timeout` for the response head.
    async fn call<ReqB, ResB>(
        mut self,
        req: Request<ReqB>,
        timeout: Duration,
    ) -> Result<Response<ResponseBody>, String>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>>,
        S::Error: Into<BoxError>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let called = async {
            poll_fn(|cx| self.0.poll_ready(cx)).await?;
            self.0.call(req).await
        };
        match tokio::time::timeout(timeout, called).await {
            Ok(Ok(resp)) => Ok(resp.map(|b| {
                ResponseBody::new(StallTimeout::new(Box::pin(b.map_err(Into::into)), timeout))
            })),
            Ok(Err(e)) => Err(format!(
                "upstream request failed: {}",
                error_chain(&*e.into())
            )),
            Err(_) => Err(format!("upstream did not answer within {timeout:?}")),
        }
    }
}

struct Shared {
    cache: Cache,
    config: CacheConfig,
    downloads: Arc<Semaphore>,
    opts: CacheOptions,
    /// Keys being revalidated; their requests wait until the sender (held by the request
    /// that revalidates) is dropped.
    revalidating: Mutex<HashMap<String, watch::Receiver<()>>>,
}

/// Held by the request that revalidates a key: unregisters it (waking the requests that
/// wait for it) when dropped, also if that request is abandoned.
struct Leader<'a> {
    shared: &'a Shared,
    key: String,
    _done: watch::Sender<()>,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.shared.revalidations().remove(&self.key);
    }
}

/// What a fill tells the request that started it, once the inner service answered.
enum Head {
    /// Stored (or being stored): serve this reader, whose entry has this head (the one
    /// encoded in its metadata, handed over as is rather than decoded again).
    Stored(AsyncReader, StoredHead),
    /// Not stored: relay this response as it is.
    Pass(Response<ResponseBody>),
    /// No response (connection error, timeout).
    Failed(String),
    /// No download slot freed within the upstream timeout.
    Busy,
}

/// Abort causes of entries, which tell the requests that joined them what to do.
#[derive(Debug)]
enum Abort {
    /// The response varies: look the key up again (the vary index now exists).
    Varies,
    /// The response may not be stored: ask the inner service for this client alone.
    NotStorable(&'static str),
    /// The inner service answered with a status that is not stored: answer it too.
    Status(StatusCode),
    /// No download slot.
    Busy,
}

impl fmt::Display for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Abort::Varies => f.write_str("the response varies: stored under its variant key"),
            Abort::NotStorable(why) => write!(f, "not stored: {why}"),
            Abort::Status(s) => write!(f, "upstream answered {s} (not cached)"),
            Abort::Busy => f.write_str("too many upstream downloads in progress"),
        }
    }
}

impl StdError for Abort {}

/// The abort cause of an entry, if it was aborted by this crate.
fn abort_cause(e: &io::Error) -> Option<&Abort> {
    let err = e.get_ref()?.downcast_ref::<streamcache::Error>()?;
    match err {
        streamcache::Error::Aborted {
            cause: Some(cause), ..
        } => cause.downcast_ref::<Abort>(),
        _ => None,
    }
}

impl Shared {
    fn revalidations(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Receiver<()>>> {
        self.revalidating
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Becomes the request that revalidates `key`, or gets a receiver that reports when the
    /// one that does is done.
    fn join_revalidation(&self, key: &str) -> Result<Leader<'_>, watch::Receiver<()>> {
        let mut map = self.revalidations();
        if let Some(done) = map.get(key) {
            return Err(done.clone());
        }
        let (tx, rx) = watch::channel(());
        map.insert(key.to_owned(), rx);
        Ok(Leader {
            shared: self,
            key: key.to_owned(),
            _done: tx,
        })
    }

    async fn handle<S, ReqB, ResB>(
        self: Arc<Self>,
        inner: Inner<S>,
        req: Request<ReqB>,
    ) -> Response<ResponseBody>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        ReqB: Send + 'static,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let method = req.method().clone();
        if method == Method::GET || method == Method::HEAD {
            return self.get(inner, req).await;
        }
        if method.as_str() == "PURGE" && self.config.purge != Purge::Off {
            return self.purge_request(&req);
        }
        // Any other method goes to the origin; a success invalidates what is stored for its
        // URL (RFC 9111 4.4).
        let url = url_of(&req);
        let resp = self.forward(inner, req).await;
        if !method.is_safe() && (resp.status().is_success() || resp.status().is_redirection()) {
            self.purge_url(&url);
        }
        resp
    }

    fn purge_request<B>(&self, req: &Request<B>) -> Response<ResponseBody> {
        let allowed = match self.config.purge {
            Purge::Anyone => true,
            Purge::Loopback => req
                .extensions()
                .get::<ClientAddr>()
                .is_some_and(|a| a.0.ip().is_loopback()),
            Purge::Off => false,
        };
        if !allowed {
            return simple(StatusCode::FORBIDDEN, "purge not allowed from here\n");
        }
        if self.purge_url(&url_of(req)) {
            simple(StatusCode::OK, "purged\n")
        } else {
            simple(StatusCode::NOT_FOUND, "not cached\n")
        }
    }

    /// Removes every entry of `url`; returns whether there was one.
    fn purge_url(&self, url: &str) -> bool {
        let cache = &self.cache;
        let mut found = cache.remove(url).unwrap_or(false);
        if cache.remove(&vary_index_key(url)).unwrap_or(false) {
            found = true;
            let prefix = format!("{url}\0");
            for key in cache.keys().into_iter().filter(|k| k.starts_with(&prefix)) {
                found |= cache.remove(&key).unwrap_or(false);
            }
        }
        found
    }

    /// The key a request for `url` with `headers` reads: its variant's if the URL's
    /// responses vary, else the URL itself.
    fn key_for(&self, url: &str, headers: &HeaderMap) -> String {
        match self
            .cache
            .entry_info(&vary_index_key(url))
            .and_then(|info| decode_vary_index(&info.metadata))
        {
            Some(names) => variant_key(url, &names, headers),
            None => url.to_owned(),
        }
    }

    /// Relays the inner service's answer to `req`, uncached.
    async fn forward<S, ReqB, ResB>(
        &self,
        inner: Inner<S>,
        req: Request<ReqB>,
    ) -> Response<ResponseBody>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>>,
        S::Error: Into<BoxError>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        match inner.call(req, self.config.upstream_timeout).await {
            Ok(resp) => relay(resp),
            Err(msg) => simple(StatusCode::BAD_GATEWAY, &format!("{msg}\n")),
        }
    }

    async fn get<S, ReqB, ResB>(
        self: Arc<Self>,
        inner: Inner<S>,
        req: Request<ReqB>,
    ) -> Response<ResponseBody>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        ReqB: Send + 'static,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let url = url_of(&req);
        let Some(view) = View::new(&url, req.headers()) else {
            return simple(StatusCode::BAD_REQUEST, "bad request target\n");
        };
        let head_only = req.method() == Method::HEAD;
        let serve = ServeOpts {
            range: req
                .headers()
                .get(header::RANGE)
                .filter(|_| !head_only)
                .and_then(RangeSpec::parse),
            // HTTP/1.0 has no chunked encoding: a body of unknown length is delimited by
            // closing the connection, so a broken one would look complete. Wait for the
            // final length.
            need_len: req.version() < http::Version::HTTP_11,
            head_only,
            send_file: req.extensions().get::<SendsFiles>().is_some(),
        };
        // A few rounds: a joined entry may turn out to vary (then the variant's key is read).
        for _ in 0..3 {
            let key = self.key_for(&url, req.headers());
            let entry = if head_only {
                // HEAD never fills: it is answered from a stored response or passed through.
                match self.cache.get(&key) {
                    Ok(Some(r)) => Entry::Hit(r),
                    Ok(None) => return self.forward(inner, req).await,
                    Err(e) => return cache_failure(&e),
                }
            } else {
                // Async: with a shared tier, a local miss asks the bucket without blocking
                // the executor.
                match self.cache.get_or_create_async(&key).await {
                    Ok(e) => e,
                    Err(e) => {
                        // Never a miss: with the cache failing, a fetch could not be stored.
                        tracing::error!(key = %key, error = %e, "cache error");
                        return cache_failure(&e);
                    }
                }
            };
            let writer = match entry {
                Entry::Hit(r) => {
                    let mut reader = AsyncReader::from(r);
                    let stored = match wait_head(&mut reader).await {
                        Ok(Some(stored)) => stored,
                        Ok(None) => {
                            // Not ours (an older format): replace it.
                            let _ = self.cache.remove(&key);
                            continue;
                        }
                        Err(e) => match abort_cause(&e) {
                            Some(Abort::Varies) => continue,
                            Some(Abort::NotStorable(_)) => return self.forward(inner, req).await,
                            Some(Abort::Status(s)) => return simple(*s, ""),
                            Some(Abort::Busy) => {
                                return unavailable(&format!("{}\n", Abort::Busy));
                            }
                            None => return failure_response(&e),
                        },
                    };
                    if !reader.get_ref().size().finished {
                        // Joined a fill in progress: its response is as fresh as can be.
                        return self
                            .serve(req.headers(), reader, &stored, serve, CacheStatus::Hit)
                            .await;
                    }
                    let policy = stored.policy(&view.uri, self.opts);
                    return match policy.before_request(&view, SystemTime::now()) {
                        BeforeRequest::Fresh(_) => {
                            self.serve(req.headers(), reader, &stored, serve, CacheStatus::Hit)
                                .await
                        }
                        BeforeRequest::Stale { matches: false, .. } => {
                            self.forward(inner, req).await
                        }
                        BeforeRequest::Stale { request, .. } if !head_only => {
                            let now = SystemTime::now();
                            // Stale by age, and a 304 would make it fresh again: one request
                            // revalidates, the others wait for it and read what it stored.
                            let coalesce = policy.is_stale(now)
                                && !policy.time_to_live(stored.response_time).is_zero();
                            let _leader = if coalesce {
                                match self.join_revalidation(&key) {
                                    Ok(leader) => Some(leader),
                                    Err(mut done) => {
                                        drop(reader);
                                        let wait = self.config.upstream_timeout;
                                        let _ = tokio::time::timeout(wait, done.changed()).await;
                                        continue;
                                    }
                                }
                            } else {
                                None
                            };
                            let revalidation = Revalidation {
                                key,
                                view,
                                reader,
                                stored,
                                policy,
                            };
                            self.revalidate(inner, req, request, revalidation, serve)
                                .await
                        }
                        BeforeRequest::Stale { .. } => self.forward(inner, req).await,
                    };
                }
                Entry::Miss(w) => w,
            };
            let (tx, rx) = oneshot::channel();
            let fill_req = fill_request(req_clone_head(&req));
            // The fill runs on in its own task if this client goes away.
            let (parts, body) = req.into_parts();
            let fill_req = Request::from_parts(fill_req, body);
            let shared = self.clone();
            tokio::spawn(async move {
                shared
                    .download(inner, fill_req, url, key, writer, view, tx)
                    .await;
            });
            return self.fill_response(rx, &parts.headers, serve).await;
        }
        self.forward(inner, req).await
    }

    /// Answers the request that started a fill (with `req` headers), from what the fill
    /// tells it through `head` once the inner service answered.
    async fn fill_response(
        &self,
        head: oneshot::Receiver<Head>,
        req: &HeaderMap,
        serve: ServeOpts,
    ) -> Response<ResponseBody> {
        match head.await {
            Ok(Head::Stored(reader, stored)) => {
                self.serve(req, reader, &stored, serve, CacheStatus::Miss)
                    .await
            }
            Ok(Head::Pass(resp)) => resp,
            Ok(Head::Failed(msg)) => simple(StatusCode::BAD_GATEWAY, &format!("{msg}\n")),
            Ok(Head::Busy) => unavailable(&format!("{}\n", Abort::Busy)),
            Err(_) => simple(StatusCode::BAD_GATEWAY, "upstream task failed\n"),
        }
    }

    /// Fetches the response to `req` once and stores it in `writer`'s entry (or under its
    /// variant's key); tells the request that started it through `head_tx`.
    #[allow(clippy::too_many_arguments)]
    async fn download<S, ReqB, ResB>(
        self: Arc<Self>,
        inner: Inner<S>,
        req: Request<ReqB>,
        url: String,
        key: String,
        writer: Writer,
        view: View,
        head_tx: oneshot::Sender<Head>,
    ) where
        S: Service<Request<ReqB>, Response = Response<ResB>>,
        S::Error: Into<BoxError>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let timeout = self.config.upstream_timeout;
        let _slot =
            match tokio::time::timeout(timeout, self.downloads.clone().acquire_owned()).await {
                Ok(Ok(slot)) => slot,
                Ok(Err(_)) | Err(_) => {
                    tracing::warn!(%key, "{}: 503", Abort::Busy);
                    writer.abort_with(Abort::Busy);
                    let _ = head_tx.send(Head::Busy);
                    return;
                }
            };
        let resp = match inner.call(req, timeout).await {
            Ok(resp) => resp,
            Err(msg) => {
                tracing::warn!(%key, error = %msg, "upstream error");
                writer.abort_with(msg.clone());
                let _ = head_tx.send(Head::Failed(msg));
                return;
            }
        };
        self.store(resp, &url, key, writer, &view, head_tx).await;
    }

    /// Stores `resp` (the answer to a request seen as `view`) in `writer`'s entry if the
    /// rules allow, or relays it.
    async fn store(
        &self,
        resp: Response<ResponseBody>,
        url: &str,
        key: String,
        mut writer: Writer,
        view: &View,
        head_tx: oneshot::Sender<Head>,
    ) {
        let start = Instant::now();
        let status = resp.status();
        if status != StatusCode::OK {
            tracing::debug!(%key, status = status.as_u16(), "status not cached");
            writer.abort_with(Abort::Status(status));
            let _ = head_tx.send(Head::Pass(relay(resp)));
            return;
        }
        let now = SystemTime::now();
        let head = StoredHead::new(now, status, view, resp.headers());
        let policy = CachePolicy::new_options(view, &resp, now, self.opts);
        let framing = Framing::of(&resp);
        let why_not = if framing == Framing::Close {
            // Its end looks the same whether the origin finished or died.
            Some("the body is delimited by closing the connection")
        } else {
            self.why_not_stored(&policy, resp.headers(), now)
        };
        if let Some(why) = why_not {
            tracing::debug!(%key, why, "response passed through");
            writer.abort_with(Abort::NotStorable(why));
            let _ = head_tx.send(Head::Pass(relay(resp)));
            return;
        }
        let names = vary_names(resp.headers());
        let mut key = key;
        if !names.is_empty() {
            let vkey = variant_key(url, &names, &view.headers);
            if vkey != key {
                // Stored under the variant's key, found through the URL's vary index.
                let variant = self.cache.get_or_create(&vkey);
                self.write_vary_index(url, &names, &policy, resp.headers(), now);
                writer.abort_with(Abort::Varies);
                match variant {
                    Ok(Entry::Miss(w)) => {
                        writer = w;
                        key = vkey;
                    }
                    Ok(Entry::Hit(_)) | Err(_) => {
                        let _ = head_tx.send(Head::Pass(relay(resp)));
                        return;
                    }
                }
            }
        }
        let (_, body) = resp.into_parts();
        if let Framing::Length(len) = framing {
            // Only fails if bytes were written already, which they were not.
            let _ = writer.set_expected_len(len);
        }
        // Set before the first byte: readers that see a byte see the metadata.
        writer.set_metadata(head.encode());
        let validator = has_validator(&head.response);
        match writer.reader() {
            Ok(r) => {
                let _ = head_tx.send(Head::Stored(r.into(), head));
            }
            Err(e) => {
                let msg = format!("cache error: {e}");
                writer.abort_with(msg.clone());
                let _ = head_tx.send(Head::Failed(msg));
                return;
            }
        }
        let outcome = copy_body(body, &mut writer).await;
        let bytes = writer.written();
        let ms = start.elapsed().as_millis() as u64;
        match outcome {
            Ok(()) => {
                let ttl = self.lifetime(&policy, validator, SystemTime::now());
                writer.set_time_to_live(ttl);
                match writer.finish() {
                    Ok(()) => tracing::debug!(%key, bytes, ms, ?ttl, "response cached"),
                    Err(e) => tracing::warn!(%key, bytes, ms, error = %e, "entry not cached"),
                }
            }
            Err(msg) => {
                tracing::warn!(%key, bytes, ms, error = %msg, "upstream body failed");
                writer.abort_with(msg);
            }
        }
    }

    /// Why a response may not be stored, or `None` if it may. The rules of a shared cache
    /// are `http-cache-semantics`'s (`no-store`, `private`, `Authorization` without
    /// `public`/`s-maxage`/`must-revalidate`, the method and status); on top, a response
    /// that sets a cookie or varies on everything is never stored, nor one that would be
    /// stale at once with nothing to revalidate it with.
    fn why_not_stored(
        &self,
        policy: &CachePolicy,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Option<&'static str> {
        if !policy.is_storable() {
            Some("the caching rules forbid storing it")
        } else if headers.contains_key(header::SET_COOKIE) {
            Some("it sets a cookie")
        } else if varies_on_everything(headers) {
            Some("Vary: *")
        } else if self.lifetime(policy, has_validator(headers), now).is_zero() {
            Some("stale at once, without a validator")
        } else {
            None
        }
    }

    /// How long an entry is kept: while it is fresh, and `keep_stale` longer if it can be
    /// revalidated.
    fn lifetime(&self, policy: &CachePolicy, validator: bool, now: SystemTime) -> Duration {
        let fresh = policy.time_to_live(now);
        if validator {
            fresh.saturating_add(self.config.keep_stale)
        } else {
            fresh
        }
    }

    /// Records that `url`'s responses vary on `names` (replacing what was recorded).
    fn write_vary_index(
        &self,
        url: &str,
        names: &[http::HeaderName],
        policy: &CachePolicy,
        headers: &HeaderMap,
        now: SystemTime,
    ) {
        let key = vary_index_key(url);
        let _ = self.cache.remove(&key);
        if let Ok(Entry::Miss(mut w)) = self.cache.get_or_create(&key) {
            w.set_metadata(encode_vary_index(names));
            let ttl = self.lifetime(policy, has_validator(headers), now);
            w.set_time_to_live(ttl.max(Duration::from_secs(1)));
            if let Err(e) = w.finish() {
                tracing::warn!(url, error = %e, "vary index not stored");
            }
        }
    }

    /// Revalidates a stale entry with a conditional request: on 304 it is served (and
    /// stored again with the refreshed head, its body copied locally, not refetched); on a
    /// new response, that replaces it.
    async fn revalidate<S, ReqB, ResB>(
        self: &Arc<Self>,
        inner: Inner<S>,
        req: Request<ReqB>,
        conditional: http::request::Parts,
        old: Revalidation,
        serve: ServeOpts,
    ) -> Response<ResponseBody>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>>,
        S::Error: Into<BoxError>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        let mut ask = parts.clone();
        ask.method = Method::GET;
        ask.headers = conditional.headers;
        if let Some(host) = parts.headers.get(header::HOST) {
            ask.headers.insert(header::HOST, host.clone());
        }
        let req = Request::from_parts(parts, ());
        let resp = match inner
            .call(Request::from_parts(ask, body), self.config.upstream_timeout)
            .await
        {
            Ok(resp) => resp,
            Err(msg) => return simple(StatusCode::BAD_GATEWAY, &format!("{msg}\n")),
        };
        let now = SystemTime::now();
        let mut outcome = old.policy.after_response(&old.view, &resp, now);
        if resp.status() == StatusCode::NOT_MODIFIED
            && matches!(outcome, AfterResponse::Modified(..))
        {
            // A 304 answers the validators this cache sent, taken from the stored response
            // (RFC 9110 13.1), also when it repeats none of them (Python's http.server sends
            // no Last-Modified with its 304): the policy is asked again with the stored
            // validators added, so that its rules merge the 304's headers.
            let mut parts = Response::new(()).into_parts().0;
            parts.status = StatusCode::NOT_MODIFIED;
            parts.headers = resp.headers().clone();
            for name in [header::ETAG, header::LAST_MODIFIED] {
                if !parts.headers.contains_key(&name)
                    && let Some(v) = old.stored.response.get(&name)
                {
                    parts.headers.insert(name, v.clone());
                }
            }
            outcome = old.policy.after_response(&old.view, &parts, now);
        }
        match outcome {
            AfterResponse::Modified(..) if resp.status() == StatusCode::NOT_MODIFIED => {
                // Its validator differs from the stored one: never relay a 304 to a client
                // that did not ask for one. The stored copy is dropped, this client gets it.
                tracing::debug!(key = %old.key, "a 304 that does not match the stored response");
                let _ = self.cache.remove(&old.key);
                self.serve(
                    req.headers(),
                    old.reader,
                    &old.stored,
                    serve,
                    CacheStatus::Hit,
                )
                .await
            }
            AfterResponse::NotModified(policy, parts) => {
                let head = StoredHead::new(now, old.stored.status, &old.view, &parts.headers);
                tracing::debug!(key = %old.key, "revalidated (304)");
                // Stored again only if the entry itself had turned stale: a client's
                // `no-cache` or `max-age=0` on a fresh entry is answered, not re-stored.
                if old.policy.is_stale(now) && !policy.time_to_live(now).is_zero() {
                    self.restore(&old.key, &head, &policy);
                }
                self.serve(
                    req.headers(),
                    old.reader,
                    &head,
                    serve,
                    CacheStatus::Revalidated,
                )
                .await
            }
            AfterResponse::Modified(..) => {
                tracing::debug!(key = %old.key, "revalidation brought a new response");
                let _ = self.cache.remove(&old.key);
                match self.cache.get_or_create(&old.key) {
                    Ok(Entry::Miss(w)) => {
                        let (tx, rx) = oneshot::channel();
                        let url = old.view.uri.to_string();
                        let (shared, key, view) = (self.clone(), old.key, old.view);
                        // A revalidation holds no download slot: its request was made.
                        tokio::spawn(async move {
                            shared.store(resp, &url, key, w, &view, tx).await;
                        });
                        self.fill_response(rx, req.headers(), serve).await
                    }
                    Ok(Entry::Hit(_)) | Err(_) => relay(resp),
                }
            }
        }
    }

    /// Stores `head` and a copy of the entry `key`'s body as its new entry (after a 304).
    fn restore(&self, key: &str, head: &StoredHead, policy: &CachePolicy) {
        let Ok(Some(source)) = self.cache.get(key) else {
            return;
        };
        let _ = self.cache.remove(key);
        let Ok(Entry::Miss(mut w)) = self.cache.get_or_create(key) else {
            return;
        };
        let len = source.size().len;
        let _ = w.set_expected_len(len);
        w.set_metadata(head.encode());
        let ttl = self.lifetime(policy, has_validator(&head.response), SystemTime::now());
        w.set_time_to_live(ttl);
        let mut source = AsyncReader::from(source);
        tokio::spawn(async move {
            loop {
                match source.read_chunk(crate::body::CHUNK).await {
                    Ok(chunk) if chunk.is_empty() => break,
                    Ok(chunk) => {
                        if let Err(e) = w.write_bytes(&chunk) {
                            w.abort_with(format!("cache write failed: {e}"));
                            return;
                        }
                    }
                    Err(e) => {
                        w.abort_with(format!("cache read failed: {e}"));
                        return;
                    }
                }
            }
            if let Err(e) = w.finish() {
                tracing::warn!(error = %e, "refreshed entry not stored");
            }
        });
    }

    /// Answers `req` from an entry with `stored` head: 304 if the client's validators
    /// match, else the whole entity or the requested range (200/206/416).
    async fn serve(
        &self,
        req: &HeaderMap,
        reader: AsyncReader,
        stored: &StoredHead,
        opts: ServeOpts,
        status: CacheStatus,
    ) -> Response<ResponseBody> {
        let mut resp = self.serve_inner(req, reader, stored, opts).await;
        resp.extensions_mut().insert(status);
        resp
    }

    async fn serve_inner(
        &self,
        req: &HeaderMap,
        reader: AsyncReader,
        stored: &StoredHead,
        opts: ServeOpts,
    ) -> Response<ResponseBody> {
        let age = stored.age(SystemTime::now()).as_secs();
        let mut headers = stored.response.clone();
        headers.insert(header::AGE, HeaderValue::from(age));
        if stored.status == StatusCode::OK && not_modified(req, &headers) {
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            for name in NOT_MODIFIED_HEADERS.iter().chain([&header::AGE]) {
                for value in headers.get_all(name) {
                    resp.headers_mut().append(name.clone(), value.clone());
                }
            }
            return resp;
        }
        let range = opts.range.filter(|_| if_range_holds(req, &headers));
        match serve_entry(reader, stored.status, headers, range, opts).await {
            Ok(resp) => resp,
            Err(e) => failure_response(&e),
        }
    }
}

/// What a revalidation needs of the stale entry.
struct Revalidation {
    key: String,
    view: View,
    reader: AsyncReader,
    stored: StoredHead,
    policy: CachePolicy,
}

/// How an entry is served to one request.
#[derive(Debug, Clone, Copy)]
struct ServeOpts {
    range: Option<RangeSpec>,
    need_len: bool,
    head_only: bool,
    /// The server sends file bodies itself ([`SendsFiles`] on the request): a finished
    /// entry's checked bytes become a file body instead of a stream.
    send_file: bool,
}

/// A request extension by which [`serve`](crate::serve) says that it sends file bodies with
/// `sendfile` (see [`ResponseBody::file_range`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendsFiles;

/// The path and query of a request (`/` if none).
fn url_of<B>(req: &Request<B>) -> String {
    req.uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned())
}

/// A copy of a request's head (no extensions).
fn req_clone_head<B>(req: &Request<B>) -> http::request::Parts {
    let mut parts = Request::new(()).into_parts().0;
    parts.method = req.method().clone();
    parts.uri = req.uri().clone();
    parts.version = req.version();
    parts.headers = req.headers().clone();
    parts
}

/// The request a fill sends: the client's GET without its own validators and range (the
/// whole entity is fetched and stored; the cache answers those itself). Nothing here can
/// fail: the request target was checked before the fill (`View::new`, or a 400).
fn fill_request(mut parts: http::request::Parts) -> http::request::Parts {
    parts.method = Method::GET;
    for name in CLIENT_CONDITIONALS {
        parts.headers.remove(name);
    }
    parts
}

fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED)
}

/// Copies a body into the entry. Bytes are published to readers whenever the origin has
/// nothing more ready (and every 1 MiB by the writer itself), not on every small frame.
async fn copy_body(mut body: ResponseBody, writer: &mut Writer) -> Result<(), String> {
    let mut unpublished = false;
    loop {
        let next = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(next) => next,
            Poll::Pending => {
                if unpublished {
                    if let Err(e) = io::Write::flush(writer) {
                        return Err(format!("cache write failed: {e}"));
                    }
                    unpublished = false;
                }
                body.frame().await
            }
        };
        match next {
            None => return Ok(()),
            Some(Err(e)) => return Err(format!("upstream body failed: {}", error_chain(&*e))),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    if let Err(e) = writer.write_bytes(&data) {
                        return Err(format!("cache write failed: {e}"));
                    }
                    unpublished = true;
                }
            }
        }
    }
}

/// Waits until the entry's metadata is there (the writer sets it before the first byte) and
/// decodes it; `None` if it is not this crate's.
async fn wait_head(reader: &mut AsyncReader) -> io::Result<Option<StoredHead>> {
    if reader.get_ref().metadata().is_empty() {
        reader.read_at(&mut [0u8], 0).await?;
    }
    Ok(StoredHead::decode(&reader.get_ref().metadata()))
}

/// Serves an entry (finished or in progress), whole or the requested range.
async fn serve_entry(
    mut reader: AsyncReader,
    stored_status: StatusCode,
    headers: HeaderMap,
    range: Option<RangeSpec>,
    opts: ServeOpts,
) -> io::Result<Response<ResponseBody>> {
    let known_len = |r: &AsyncReader| {
        let size = r.get_ref().size();
        r.get_ref()
            .expected_len()
            .or(size.finished.then_some(size.len))
    };
    let mut total = known_len(&reader);
    if total.is_none() && opts.need_len {
        total = Some(reader.seek(SeekFrom::End(0)).await?);
    }

    // Work out (status, first byte, body length, Content-Range).
    let (status, start, len, content_range) = match range {
        None => (stored_status, 0, total, None),
        Some(spec) => {
            if total.is_none() {
                // No Content-Length upstream and still downloading: wait only as far as needed.
                match spec {
                    RangeSpec::FromTo(_, last) => {
                        reader.read_at(&mut [0u8], last).await?;
                    }
                    RangeSpec::From(_) | RangeSpec::Suffix(_) => {
                        reader.seek(SeekFrom::End(0)).await?;
                    }
                }
                total = known_len(&reader);
            }
            match (spec, total) {
                // The whole range exists although the final length is not known yet.
                (RangeSpec::FromTo(first, last), None) => (
                    StatusCode::PARTIAL_CONTENT,
                    first,
                    Some(last - first + 1),
                    Some(format!("bytes {first}-{last}/*")),
                ),
                (spec, Some(total)) => match spec.resolve(total) {
                    Some((first, last)) => (
                        StatusCode::PARTIAL_CONTENT,
                        first,
                        Some(last - first + 1),
                        Some(format!("bytes {first}-{last}/{total}")),
                    ),
                    None => {
                        let mut resp =
                            simple(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n");
                        if let Ok(v) = HeaderValue::try_from(format!("bytes */{total}")) {
                            resp.headers_mut().insert(header::CONTENT_RANGE, v);
                        }
                        return Ok(resp);
                    }
                },
                (_, None) => {
                    return Err(io::Error::other("entry length unknown after its end"));
                }
            }
        }
    };
    let body = if opts.head_only {
        empty()
    } else {
        reader.seek(SeekFrom::Start(start)).await?; // never waits
        match len {
            Some(len) if opts.send_file => match reader.take_file_range(len) {
                Some(range) => ResponseBody::file(range, reader),
                None => ResponseBody::new(CacheBody {
                    reader,
                    remaining: Some(len),
                    done: false,
                }),
            },
            _ => ResponseBody::new(CacheBody {
                reader,
                remaining: len,
                done: false,
            }),
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if let Some(cr) = content_range
        && let Ok(v) = HeaderValue::try_from(cr)
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(resp)
}

/// How a response body ends, as hyper's client decides it (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `Content-Length`: hyper fails a body that ends short.
    Length(u64),
    /// `Transfer-Encoding: …, chunked`: hyper fails a body without its last chunk.
    Chunked,
    /// Neither (an HTTP/1.0 response without length, or a transfer coding other than
    /// chunked last): the body ends when the connection closes, complete or not.
    Close,
}

impl Framing {
    /// The framing of a response; one without length nor chunked coding is only
    /// close-delimited if it says so with [`CloseDelimited`].
    fn of<B>(resp: &Response<B>) -> Framing {
        let h = resp.headers();
        if h.contains_key(header::TRANSFER_ENCODING) {
            if chunked_last(resp) {
                Framing::Chunked
            } else {
                Framing::Close
            }
        } else if let Some(len) = h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
        {
            Framing::Length(len)
        } else if resp.extensions().get::<CloseDelimited>().is_some() {
            Framing::Close
        } else {
            // Not read from a socket to its close: the body ends where it ends.
            Framing::Chunked
        }
    }
}

/// Whether `chunked` is the last transfer coding of an HTTP/1.1 (or later) response. Of a
/// response with `Transfer-Encoding`, hyper's client reads the body to its last chunk if so
/// (and fails it without one), else to the close of the connection (RFC 9112 6.3). Shared by
/// [`Framing::of`] and [`Upstream`](crate::Upstream), which must agree on it.
pub(crate) fn chunked_last<B>(resp: &Response<B>) -> bool {
    let last = resp
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back();
    let chunked = last
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
    chunked && resp.version() >= http::Version::HTTP_11
}

/// Relays an uncached response (minus hop-by-hop headers).
fn relay(resp: Response<ResponseBody>) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    crate::meta::strip_hop_by_hop(&mut parts.headers);
    // Not the upstream's version: an HTTP/1.0 response head would make hyper delimit the
    // body by closing for HTTP/1.1 clients too, and a relay that breaks would look complete.
    parts.version = http::Version::HTTP_11;
    parts.extensions.insert(CacheStatus::Pass);
    Response::from_parts(parts, body)
}

/// The answer to a request whose entry failed before its response started: 503 if the
/// cache's storage failed, otherwise 502.
fn failure_response(e: &io::Error) -> Response<ResponseBody> {
    let cache_err = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<streamcache::Error>());
    match cache_err {
        Some(err @ streamcache::Error::Io { .. }) => cache_failure(err),
        None if e.raw_os_error().is_some() => unavailable(&format!("cache error: {e}\n")),
        _ => simple(StatusCode::BAD_GATEWAY, &format!("{e}\n")),
    }
}

/// The answer when the cache itself fails a request: 503 with `Retry-After` for an I/O
/// error (out of descriptors, disk full or failing: conditions that pass), 500 otherwise.
fn cache_failure(e: &streamcache::Error) -> Response<ResponseBody> {
    match e {
        streamcache::Error::Io { .. } => unavailable(&format!("cache error: {e}\n")),
        _ => simple(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cache error: {e}\n"),
        ),
    }
}

/// An error and its sources on one line.
pub(crate) fn error_chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
