//! The caching reverse proxy behind `examples/proxy.rs`, also compiled into `tests/proxy.rs`.
//!
//! * A GET is keyed by its path and query. The first request of a key becomes the entry's
//!   producer: it spawns [`download`] (one upstream request) that writes the body into the
//!   cache's [`Writer`], then reads the entry back from a cache reader like every later or
//!   concurrent request does, so the upstream sees one request per key.
//! * Upstream `Content-Length` becomes the entry's expected length (readers send it before
//!   the end); content type, ETag and a few more headers are the entry's metadata
//!   ([`encode_head`]) and are replayed on hits, also after a restart.
//! * `Range: bytes=a-b | a- | -n` gets a 206 that waits only for the bytes it needs.
//! * An upstream error, a non-200 status, or a body that breaks aborts the entry: readers
//!   already streaming see their connection end in error (a short body under a
//!   `Content-Length`, or a chunked body without its last chunk), and the next request goes
//!   upstream again.
//! * Only a body that can prove it is complete is cached: one with a `Content-Length` or
//!   chunked. A body delimited by closing the connection (an HTTP/1.0 origin without
//!   `Content-Length`, say) ends the same way whether the origin finished or died, so it is
//!   relayed to its client as it comes and not cached: every request for it goes upstream.
//! * Client connections are bounded ([`ConnLimits`]): a request head must arrive within
//!   `head_timeout`, a keep-alive connection may idle (or a client stall reading a response)
//!   for `idle_timeout`, and at most `max_connections` are served at once (more wait in the
//!   listen backlog), so slow or silent clients cannot use up the descriptors.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::future::{Future, poll_fn};
use std::io::{self, SeekFrom};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use streamcache::tokio::AsyncReader;
use streamcache::{Cache, Entry, Writer};
use tokio::io::{AsyncRead, AsyncSeekExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;

/// Error type of response bodies.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;
/// The body of every response the proxy sends.
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Largest chunk handed to hyper at once.
const CHUNK: usize = 256 * 1024;
/// First line of the metadata of entries written by this proxy (the encoding's version).
const META_MAGIC: &[u8] = b"streamcache-proxy/1";
/// Upstream response headers kept in an entry's metadata and replayed on hits.
const KEPT_HEADERS: [&str; 6] = [
    "content-type",
    "etag",
    "last-modified",
    "content-encoding",
    "content-disposition",
    "content-language",
];
/// Hop-by-hop headers not forwarded from an uncached upstream response.
const HOP_HEADERS: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

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
    /// Most upstream downloads (cache fills) at once. A download outlives the client that
    /// started it, so the connection cap alone does not bound them; past this, a miss waits
    /// up to `upstream_timeout` for one to end, then gets 503.
    pub(crate) max_downloads: usize,
}

/// What one client connection may hold. A connection that breaks a time limit is closed at
/// once (no response): a client that never finishes its request head, stays idle, or stops
/// reading cannot hold a descriptor (and a cache reader) for ever.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    /// Longest time to receive a whole request head, counted from the accept (a new
    /// connection owes a request at once) or from the first byte of a later request.
    pub(crate) head_timeout: Duration,
    /// Longest time a keep-alive connection may wait between requests with nothing sent, and
    /// longest time a response may stay blocked on a client that reads nothing.
    pub(crate) idle_timeout: Duration,
    /// Most client connections served at once. Past it the proxy stops accepting: new
    /// connections wait in the listen backlog (in the kernel, costing the proxy no
    /// descriptor) until a served one closes.
    pub(crate) max_connections: usize,
}

impl Default for ConnLimits {
    fn default() -> ConnLimits {
        ConnLimits {
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

impl Config {
    /// A configuration with the default timeouts and limits, and no size limit.
    pub(crate) fn new(upstream: Uri, dir: impl Into<PathBuf>) -> Config {
        Config {
            upstream,
            dir: dir.into(),
            upstream_timeout: Duration::from_secs(30),
            max_bytes: None,
            limits: ConnLimits::default(),
            max_downloads: 1024,
        }
    }
}

/// The proxy's shared state: the cache and an upstream client.
#[derive(Debug)]
pub(crate) struct Proxy {
    cache: Cache,
    client: Client<HttpConnector, Empty<Bytes>>,
    upstream: Uri,
    upstream_timeout: Duration,
    limits: ConnLimits,
    downloads: Arc<Semaphore>,
}

impl Proxy {
    /// Opens (or reopens) the disk cache at `config.dir`.
    ///
    /// # Errors
    /// If the cache directory cannot be opened or is used by another process.
    pub(crate) fn open(config: &Config) -> Result<Arc<Proxy>, streamcache::Error> {
        let mut builder = Cache::builder().disk(&config.dir);
        if let Some(n) = config.max_bytes {
            builder = builder.max_bytes(n);
        }
        let cache = builder.build()?;
        let client = Client::builder(TokioExecutor::new()).build_http();
        Ok(Arc::new(Proxy {
            cache,
            client,
            upstream: config.upstream.clone(),
            upstream_timeout: config.upstream_timeout,
            limits: config.limits,
            downloads: Arc::new(Semaphore::new(config.max_downloads)),
        }))
    }

    /// The cache (for statistics).
    pub(crate) fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The upstream URI of a request's path and query.
    fn upstream_uri(&self, path_and_query: &str) -> Result<Uri, hyper::http::Error> {
        let base = self.upstream.path().trim_end_matches('/');
        let mut parts = self.upstream.clone().into_parts();
        parts.path_and_query = Some(format!("{base}{path_and_query}").parse()?);
        Ok(Uri::from_parts(parts)?)
    }

    /// Answers one request. Never fails: errors become error responses.
    pub(crate) async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let mut log = RequestLog {
            path: req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned()),
            cache: "none",
            status: 0,
            start: Instant::now(),
            first_byte: None,
            bytes: 0,
            error: None,
        };
        if req.method() != Method::GET {
            let mut resp = simple(StatusCode::METHOD_NOT_ALLOWED, "only GET is proxied\n");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            return log.wrap(resp);
        }
        let key = log.path.clone();
        let range = req.headers().get(header::RANGE).and_then(parse_range);
        let entry = match self.cache.get_or_create(&key) {
            Ok(e) => e,
            Err(e) => {
                // Never a miss: with the cache failing, a fetch could not be stored (and must
                // not replace what is stored).
                tracing::error!(path = %key, error = %e, "cache error");
                return log.wrap(cache_failure(&e));
            }
        };
        let reader: AsyncReader = match entry {
            Entry::Hit(r) => {
                log.cache = if r.size().finished {
                    "hit"
                } else {
                    "hit-inflight"
                };
                r.into()
            }
            Entry::Miss(w) => {
                log.cache = "miss";
                let reader = match w.reader() {
                    Ok(r) => r.into(),
                    Err(e) => {
                        tracing::error!(path = %key, error = %e, "cache error");
                        return log.wrap(cache_failure(&e));
                    }
                };
                let (tx, rx) = oneshot::channel();
                let uri = match self.upstream_uri(&key) {
                    Ok(u) => u,
                    Err(e) => {
                        w.abort_with(format!("bad upstream URI: {e}"));
                        return log.wrap(simple(StatusCode::BAD_REQUEST, "bad path\n"));
                    }
                };
                tokio::spawn(download(
                    self.client.clone(),
                    uri,
                    w,
                    tx,
                    self.upstream_timeout,
                    self.downloads.clone(),
                ));
                match rx.await {
                    Ok(UpstreamHead::Cacheable) => reader,
                    Ok(UpstreamHead::Uncacheable(resp)) => {
                        return log.wrap(pass_through(resp, self.upstream_timeout));
                    }
                    Ok(UpstreamHead::Failed(msg)) => {
                        return log.wrap(simple(StatusCode::BAD_GATEWAY, &format!("{msg}\n")));
                    }
                    Ok(UpstreamHead::Busy) => {
                        return log.wrap(unavailable(&format!("{TooManyDownloads}\n")));
                    }
                    Err(_) => {
                        return log.wrap(simple(StatusCode::BAD_GATEWAY, "upstream task failed\n"));
                    }
                }
            }
        };
        // HTTP/1.0 has no chunked encoding: a body of unknown length is delimited by closing
        // the connection, so a broken one would look complete. Wait for the final length.
        let need_len = req.version() < hyper::Version::HTTP_11;
        let resp = match serve_entry(reader, range, need_len).await {
            Ok(resp) => resp,
            Err(e) if aborted_by::<NotCacheable>(&e) => {
                // Joined an entry whose upstream body turned out uncacheable: fetch it again
                // for this client alone.
                log.cache = "bypass";
                self.fetch_uncached(&key).await
            }
            Err(e) => failure_response(&e),
        };
        log.wrap(resp)
    }

    /// Relays one upstream response for `path_and_query` without caching it.
    async fn fetch_uncached(&self, path_and_query: &str) -> Response<ProxyBody> {
        let uri = match self.upstream_uri(path_and_query) {
            Ok(u) => u,
            Err(_) => return simple(StatusCode::BAD_REQUEST, "bad path\n"),
        };
        let timeout = self.upstream_timeout;
        match tokio::time::timeout(timeout, self.client.request(upstream_request(uri))).await {
            Ok(Ok(resp)) => pass_through(resp, timeout),
            Ok(Err(e)) => simple(
                StatusCode::BAD_GATEWAY,
                &format!("upstream request failed: {}\n", error_chain(&e)),
            ),
            Err(_) => simple(
                StatusCode::BAD_GATEWAY,
                &format!("upstream did not answer within {timeout:?}\n"),
            ),
        }
    }
}

/// Serves HTTP/1 on `listener` until `shutdown` resolves; then drops every open connection
/// (and with them their cache readers) before returning. Upstream downloads already started
/// run on to their end in their own tasks.
///
/// At most [`ConnLimits::max_connections`] connections are served at once: at the cap the
/// loop stops accepting until one closes, so further clients wait in the kernel's listen
/// backlog (and are served in turn) instead of costing a descriptor each. Each connection
/// runs under [`watch_connection`]'s time limits.
///
/// # Errors
/// None today: accept errors are logged and retried.
pub(crate) async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let limits = proxy.limits;
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    let mut at_cap = false;
    tokio::pin!(shutdown);
    loop {
        if permits.available_permits() == 0 {
            if !at_cap {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "connection limit reached: new clients wait in the listen backlog"
                );
            }
            at_cap = true;
        } else {
            at_cap = false;
        }
        let next = async {
            let permit = permits.clone().acquire_owned().await.expect("never closed");
            (permit, listener.accept().await)
        };
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            (permit, accepted) = next => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let proxy = proxy.clone();
                conns.spawn(async move {
                    let _permit = permit; // held as long as the connection
                    let state = Arc::new(Mutex::new(ConnState::new()));
                    let io = TokioIo::new(WatchedIo {
                        inner: stream,
                        state: state.clone(),
                    });
                    let svc_state = state.clone();
                    let svc = service_fn(move |req| {
                        let proxy = proxy.clone();
                        let guard = InFlight::begin(&svc_state);
                        async move {
                            let resp = proxy.handle(req).await;
                            Ok::<_, Infallible>(resp.map(|body| Guarded { body, _guard: guard }))
                        }
                    });
                    let conn = http1::Builder::new().serve_connection(io, svc);
                    match watch_connection(conn, &state, limits).await {
                        Ok(()) => {}
                        Err(ConnEnd::Hyper(e)) => {
                            tracing::debug!(%peer, error = %e, "connection ended in error");
                        }
                        Err(ConnEnd::TimedOut(why)) => {
                            tracing::debug!(%peer, "connection closed: {why}");
                        }
                    }
                });
            }
        }
    }
    conns.shutdown().await;
    Ok(())
}

/// How a connection ended, other than cleanly.
enum ConnEnd {
    Hyper(hyper::Error),
    TimedOut(&'static str),
}

/// Drives one connection until it ends, or until it breaks a limit of `limits`; then it is
/// dropped, which closes the socket and releases whatever its requests held.
///
/// hyper's own `header_read_timeout` is not used: it runs whenever the connection waits for
/// a request head, idle keep-alive time included, so it would close every idle connection
/// after the (short) head timeout. Here the head clock starts at the accept or at the first
/// byte of a later request, the idle clock when the last response has been handed over.
async fn watch_connection<F>(
    conn: F,
    state: &Mutex<ConnState>,
    limits: ConnLimits,
) -> Result<(), ConnEnd>
where
    F: Future<Output = hyper::Result<()>>,
{
    // State changes never bring a deadline closer than the shortest limit from now, so
    // looking again at that interval (or at the deadline) never misses one.
    let tick = limits.head_timeout.min(limits.idle_timeout);
    tokio::pin!(conn);
    loop {
        let now = Instant::now();
        let wake = match state.lock().unwrap().deadline(&limits) {
            Some((at, why)) if at <= now => return Err(ConnEnd::TimedOut(why)),
            Some((at, _)) => at.min(now + tick),
            None => now + tick,
        };
        tokio::select! {
            done = conn.as_mut() => return done.map_err(ConnEnd::Hyper),
            () = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// What a connection is doing, as far as its time limits care. Updated by [`WatchedIo`]
/// (bytes in and out) and [`InFlight`] (requests), read by [`watch_connection`].
#[derive(Debug)]
struct ConnState {
    /// Requests received whose response body is not finished (or dropped) yet.
    in_flight: usize,
    /// Since when the client owes a request head: the accept, or the first byte received
    /// after the last response. `None` while a request is in flight or the connection idles.
    head_since: Option<Instant>,
    /// Since when the connection has been idle: last response handed over, no byte since.
    idle_since: Option<Instant>,
    /// Since when writing to the client has been blocked (it reads nothing).
    write_blocked_since: Option<Instant>,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            in_flight: 0,
            head_since: Some(Instant::now()),
            idle_since: None,
            write_blocked_since: None,
        }
    }

    /// When the connection must be closed, and why; `None` while nothing is due.
    fn deadline(&self, limits: &ConnLimits) -> Option<(Instant, &'static str)> {
        let blocked = self.write_blocked_since.map(|t| {
            (
                t + limits.idle_timeout,
                "client read nothing for the idle timeout",
            )
        });
        let waiting = if self.in_flight > 0 {
            None
        } else if let Some(t) = self.head_since {
            Some((t + limits.head_timeout, "request head not received in time"))
        } else {
            self.idle_since
                .map(|t| (t + limits.idle_timeout, "idle keep-alive connection"))
        };
        match (blocked, waiting) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }
}

/// Counts one request from the moment hyper hands it over until its response body is done
/// (hyper drops it) or abandoned.
#[derive(Debug)]
struct InFlight(Arc<Mutex<ConnState>>);

impl InFlight {
    fn begin(state: &Arc<Mutex<ConnState>>) -> InFlight {
        let mut s = state.lock().unwrap();
        s.in_flight += 1;
        s.head_since = None;
        s.idle_since = None;
        drop(s);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.lock().unwrap();
        s.in_flight -= 1;
        if s.in_flight == 0 {
            s.idle_since = Some(Instant::now());
        }
    }
}

/// A response body that keeps its request counted in flight while hyper sends it.
struct Guarded {
    body: ProxyBody,
    _guard: InFlight,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A client socket that reports to its [`ConnState`]: the first byte of a request head, and
/// writes blocked on a client that does not read.
struct WatchedIo {
    inner: TcpStream,
    state: Arc<Mutex<ConnState>>,
}

impl WatchedIo {
    fn wrote(&self, polled: &Poll<io::Result<usize>>) {
        let mut s = self.state.lock().unwrap();
        match polled {
            Poll::Pending => {
                s.write_blocked_since.get_or_insert_with(Instant::now);
            }
            Poll::Ready(_) => s.write_blocked_since = None,
        }
    }
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let mut s = self.state.lock().unwrap();
            if s.in_flight == 0 && s.head_since.is_none() {
                s.head_since = Some(Instant::now());
                s.idle_since = None;
            }
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the download task tells the request that started it, once the upstream answered.
enum UpstreamHead {
    /// A 200: the entry's metadata (and expected length, if any) are set; read the entry.
    Cacheable,
    /// Any other status: the entry was aborted; relay this response as it is.
    Uncacheable(Response<Incoming>),
    /// No response (connection error, timeout): the entry was aborted.
    Failed(String),
    /// Not started: no download slot freed within the upstream timeout; the entry was
    /// aborted (with [`TooManyDownloads`]).
    Busy,
}

/// The abort cause of an entry that found no free download slot (answered 503).
#[derive(Debug)]
struct TooManyDownloads;

impl fmt::Display for TooManyDownloads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("too many upstream downloads in progress")
    }
}

impl StdError for TooManyDownloads {}

/// The abort cause of an entry whose upstream answered with a status other than 200.
/// Requests that joined the entry answer with the same status.
#[derive(Debug)]
struct UpstreamStatus(StatusCode);

impl fmt::Display for UpstreamStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "upstream answered {} (not cached)", self.0)
    }
}

impl StdError for UpstreamStatus {}

/// The abort cause of an entry whose upstream response cannot be proved complete. Requests
/// that joined the entry fetch the path upstream themselves, uncached.
#[derive(Debug)]
struct NotCacheable(&'static str);

impl fmt::Display for NotCacheable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (not cached)", self.0)
    }
}

impl StdError for NotCacheable {}

/// How an upstream response body ends, as hyper's client decides it (RFC 9112 6.3).
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
    fn of<B>(resp: &Response<B>) -> Framing {
        let h = resp.headers();
        if h.contains_key(header::TRANSFER_ENCODING) {
            // hyper rejects Transfer-Encoding in an HTTP/1.0 response, and reads any other
            // to the close unless chunked is the last coding (Content-Length is ignored).
            let last = h.get_all(header::TRANSFER_ENCODING).iter().next_back();
            let chunked = last
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
            if chunked && resp.version() >= hyper::Version::HTTP_11 {
                Framing::Chunked
            } else {
                Framing::Close
            }
        } else {
            content_length(h).map_or(Framing::Close, Framing::Length)
        }
    }
}

/// Fetches `uri` once and writes its body into the entry's `writer`; finishes the entry at
/// the end of a complete body, aborts it on any error.
async fn download(
    client: Client<HttpConnector, Empty<Bytes>>,
    uri: Uri,
    mut writer: Writer,
    head_tx: oneshot::Sender<UpstreamHead>,
    timeout: Duration,
    slots: Arc<Semaphore>,
) {
    let start = Instant::now();
    let path = writer.key().to_owned();
    // Held to the end of the download (of the cache fill; a relay runs on the client's
    // connection, bounded by the connection cap).
    let _slot = match tokio::time::timeout(timeout, slots.acquire_owned()).await {
        Ok(Ok(slot)) => slot,
        Ok(Err(_)) | Err(_) => {
            tracing::warn!(%path, "{TooManyDownloads}: 503");
            writer.abort_with(TooManyDownloads);
            let _ = head_tx.send(UpstreamHead::Busy);
            return;
        }
    };
    let req = upstream_request(uri);
    let resp = match tokio::time::timeout(timeout, client.request(req)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            let msg = format!("upstream request failed: {}", error_chain(&e));
            tracing::warn!(%path, error = %msg, "upstream error");
            writer.abort_with(msg.clone());
            let _ = head_tx.send(UpstreamHead::Failed(msg));
            return;
        }
        Err(_) => {
            let msg = format!("upstream did not answer within {timeout:?}");
            tracing::warn!(%path, "{msg}");
            writer.abort_with(msg.clone());
            let _ = head_tx.send(UpstreamHead::Failed(msg));
            return;
        }
    };
    let status = resp.status();
    if status != StatusCode::OK {
        tracing::info!(%path, status = status.as_u16(), "upstream status not cacheable");
        writer.abort_with(UpstreamStatus(status));
        let _ = head_tx.send(UpstreamHead::Uncacheable(resp));
        return;
    }
    let framing = Framing::of(&resp);
    if framing == Framing::Close {
        // Its end looks the same whether the origin finished or died: never cache it.
        tracing::info!(%path, "upstream body delimited by closing: relayed, not cached");
        writer.abort_with(NotCacheable("the upstream body is delimited by closing"));
        let _ = head_tx.send(UpstreamHead::Uncacheable(resp));
        return;
    }
    let (parts, body) = resp.into_parts();
    let mut body = StallTimeout::new(body, timeout);
    if let Framing::Length(len) = framing {
        // Only fails if bytes were written already, which they were not.
        let _ = writer.set_expected_len(len);
    }
    // Set before the first byte: readers that see a byte see the metadata.
    writer.set_metadata(encode_head(&parts.headers));
    let _ = head_tx.send(UpstreamHead::Cacheable);

    // Copy the body. Bytes are published to readers whenever the upstream has nothing more
    // ready (and every 1 MiB by the writer itself), not on every small frame.
    let mut unpublished = false;
    let outcome: Result<(), String> = loop {
        let next = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(next) => next,
            Poll::Pending => {
                if unpublished {
                    if let Err(e) = io::Write::flush(&mut writer) {
                        break Err(format!("cache write failed: {e}"));
                    }
                    unpublished = false;
                }
                body.frame().await
            }
        };
        match next {
            None => break Ok(()),
            Some(Err(e)) => break Err(format!("upstream body failed: {}", error_chain(&*e))),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    if let Err(e) = writer.write_bytes(&data) {
                        break Err(format!("cache write failed: {e}"));
                    }
                    unpublished = true;
                }
            }
        }
    };
    let bytes = writer.written();
    let ms = start.elapsed().as_millis() as u64;
    match outcome {
        Ok(()) => match writer.finish() {
            Ok(()) => tracing::info!(%path, bytes, ms, "upstream download cached"),
            Err(e) => tracing::warn!(%path, bytes, ms, error = %e, "entry not cached"),
        },
        Err(msg) => {
            tracing::warn!(%path, bytes, ms, error = %msg, "upstream download aborted");
            writer.abort_with(msg);
        }
    }
}

/// Serves an entry (finished or in progress), whole or the requested range.
async fn serve_entry(
    mut reader: AsyncReader,
    range: Option<RangeSpec>,
    need_len: bool,
) -> io::Result<Response<ProxyBody>> {
    // The writer sets the metadata before its first byte: wait for a byte (or the end).
    if reader.get_ref().metadata().is_empty() {
        reader.read_at(&mut [0u8], 0).await?;
    }
    let headers = decode_head(&reader.get_ref().metadata())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "entry has no proxy metadata"))?;
    let known_len = |r: &AsyncReader| {
        let size = r.get_ref().size();
        r.get_ref()
            .expected_len()
            .or(size.finished.then_some(size.len))
    };
    let mut total = known_len(&reader);
    if total.is_none() && need_len {
        total = Some(reader.seek(SeekFrom::End(0)).await?);
    }

    // Work out (status, first byte, body length, Content-Range).
    let (status, start, len, content_range) = match range {
        None => (StatusCode::OK, 0, total, None),
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
                        resp.headers_mut().insert(
                            header::CONTENT_RANGE,
                            HeaderValue::try_from(format!("bytes */{total}")).expect("ascii"),
                        );
                        return Ok(resp);
                    }
                },
                (_, None) => unreachable!("the end was awaited"),
            }
        }
    };
    reader.seek(SeekFrom::Start(start)).await?; // never waits
    let mut resp = Response::new(
        CacheBody {
            reader,
            remaining: len,
            done: false,
        }
        .map_err(BoxError::from)
        .boxed_unsync(),
    );
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    for (name, value) in headers {
        h.append(name, value);
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if let Some(cr) = content_range {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::try_from(cr).expect("ascii"),
        );
    }
    Ok(resp)
}

/// A response body streamed from a cache reader, `remaining` bytes (or to the end of the
/// entry when unknown). An aborted entry ends the body with an error, so hyper cuts the
/// connection instead of completing the response.
struct CacheBody {
    reader: AsyncReader,
    remaining: Option<u64>,
    done: bool,
}

impl Body for CacheBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let max = match this.remaining {
            Some(0) => {
                this.done = true;
                return Poll::Ready(None);
            }
            Some(n) => usize::try_from(n).map_or(CHUNK, |n| n.min(CHUNK)),
            None => CHUNK,
        };
        match ready!(this.reader.poll_read_chunk(cx, max)) {
            Ok(chunk) if chunk.is_empty() => {
                this.done = true;
                match this.remaining {
                    None => Poll::Ready(None),
                    Some(n) => Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("entry ended {n} bytes short of the response length"),
                    )))),
                }
            }
            Ok(chunk) => {
                if let Some(n) = &mut this.remaining {
                    *n -= chunk.len() as u64;
                }
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Err(e) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.remaining == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// What is logged of a request: one line, written when its response body is done (or
/// dropped, if the client went away first).
struct RequestLog {
    path: String,
    cache: &'static str,
    status: u16,
    start: Instant,
    first_byte: Option<Duration>,
    bytes: u64,
    error: Option<String>,
}

impl RequestLog {
    fn wrap(mut self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        self.status = resp.status().as_u16();
        resp.map(|body| Logged { body, log: self }.boxed_unsync())
    }
}

/// A body that counts what it delivers and logs its request when dropped.
struct Logged {
    body: ProxyBody,
    log: RequestLog,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let log = &self.log;
        let outcome = match &log.error {
            Some(e) => e.as_str(),
            None if self.body.is_end_stream() => "complete",
            None => "client gone",
        };
        tracing::info!(
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

/// A parsed single `Range: bytes=…` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RangeSpec {
    /// `bytes=a-b` (inclusive).
    FromTo(u64, u64),
    /// `bytes=a-`.
    From(u64),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

impl RangeSpec {
    /// First and last byte for an entity of `total` bytes; `None` if unsatisfiable.
    pub(crate) fn resolve(self, total: u64) -> Option<(u64, u64)> {
        match self {
            RangeSpec::FromTo(first, last) if first < total => Some((first, last.min(total - 1))),
            RangeSpec::From(first) if first < total => Some((first, total - 1)),
            RangeSpec::Suffix(n) if n > 0 && total > 0 => {
                Some((total.saturating_sub(n), total - 1))
            }
            _ => None,
        }
    }
}

/// Parses a single byte range. Anything else (other units, several ranges, bad syntax) is
/// `None`: the header is ignored and the whole entity is served, as RFC 9110 allows.
pub(crate) fn parse_range(value: &HeaderValue) -> Option<RangeSpec> {
    let spec = value.to_str().ok()?.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    let num = |s: &str| -> Option<u64> {
        if s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    match (first.is_empty(), last.is_empty()) {
        (true, false) => Some(RangeSpec::Suffix(num(last)?)),
        (false, true) => Some(RangeSpec::From(num(first)?)),
        (false, false) => {
            let (a, b) = (num(first)?, num(last)?);
            (a <= b).then_some(RangeSpec::FromTo(a, b))
        }
        (true, true) => None,
    }
}

/// The entry metadata: a version line, then `name: value` lines of [`KEPT_HEADERS`].
pub(crate) fn encode_head(headers: &HeaderMap) -> Bytes {
    let mut out = META_MAGIC.to_vec();
    out.push(b'\n');
    for name in KEPT_HEADERS {
        for value in headers.get_all(name) {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes()); // header values never hold '\n'
            out.push(b'\n');
        }
    }
    out.into()
}

/// Inverse of [`encode_head`]; `None` if `meta` was not written by this proxy.
pub(crate) fn decode_head(meta: &[u8]) -> Option<Vec<(HeaderName, HeaderValue)>> {
    let mut lines = meta.split(|&b| b == b'\n');
    if lines.next()? != META_MAGIC {
        return None;
    }
    let mut out = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let colon = line.iter().position(|&b| b == b':')?;
        let name = HeaderName::from_bytes(&line[..colon]).ok()?;
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).ok()?;
        out.push((name, value));
    }
    Some(out)
}

/// The GET the proxy sends upstream.
fn upstream_request(uri: Uri) -> Request<Empty<Bytes>> {
    Request::get(uri)
        .header(header::USER_AGENT, "streamcache-proxy")
        .body(Empty::new())
        .expect("valid request")
}

/// Whether `e` reports an entry aborted with a cause of type `T`.
fn aborted_by<T: StdError + 'static>(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<streamcache::Error>())
        .is_some_and(|err| match err {
            streamcache::Error::Aborted {
                cause: Some(cause), ..
            } => cause.is::<T>(),
            _ => false,
        })
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Relays an uncached upstream response (minus hop-by-hop headers); a body silent for
/// `stall` fails (the client's connection is cut, not left hanging).
fn pass_through(resp: Response<Incoming>, stall: Duration) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    for name in HOP_HEADERS {
        parts.headers.remove(name);
    }
    // Not the upstream's version: an HTTP/1.0 response head would make hyper delimit the
    // body by closing for HTTP/1.1 clients too, and a relay that breaks would look complete.
    // hyper answers an HTTP/1.0 request in HTTP/1.0 by itself.
    parts.version = hyper::Version::HTTP_11;
    Response::from_parts(parts, StallTimeout::new(body, stall).boxed_unsync())
}

/// An upstream body that fails once it has had nothing ready for `limit`: a silent origin
/// would otherwise hold its entry in progress for ever (every reader, its client
/// connection and the upstream socket with it).
struct StallTimeout<B> {
    body: B,
    limit: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

impl<B> StallTimeout<B> {
    fn new(body: B, limit: Duration) -> StallTimeout<B> {
        StallTimeout {
            body,
            limit,
            sleep: Box::pin(tokio::time::sleep(limit)),
            armed: false,
        }
    }
}

impl<B> Body for StallTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(next) => {
                this.armed = false;
                Poll::Ready(next.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                if !this.armed {
                    let at = tokio::time::Instant::now() + this.limit;
                    this.sleep.as_mut().reset(at);
                    this.armed = true;
                }
                ready!(this.sleep.as_mut().poll(cx));
                let limit = this.limit;
                Poll::Ready(Some(Err(
                    format!("upstream sent nothing for {limit:?}").into()
                )))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The answer to a request whose entry failed before its response started: the upstream's
/// status if that is why it was not cached, 503 if the cache's storage failed, otherwise 502.
fn failure_response(e: &io::Error) -> Response<ProxyBody> {
    let cache_err = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<streamcache::Error>());
    match cache_err {
        Some(streamcache::Error::Aborted {
            cause: Some(cause), ..
        }) if cause.is::<UpstreamStatus>() => simple(
            cause.downcast_ref::<UpstreamStatus>().expect("checked").0,
            "",
        ),
        Some(streamcache::Error::Aborted {
            cause: Some(cause), ..
        }) if cause.is::<TooManyDownloads>() => unavailable(&format!("{TooManyDownloads}\n")),
        Some(err @ streamcache::Error::Io { .. }) => cache_failure(err),
        None if e.raw_os_error().is_some() => unavailable(&format!("cache error: {e}\n")),
        _ => simple(StatusCode::BAD_GATEWAY, &format!("{e}\n")),
    }
}

/// Seconds a client is told to wait (`Retry-After`) before retrying after a 503.
const RETRY_AFTER_SECS: u32 = 2;

/// The answer when the cache itself fails a request: 503 with `Retry-After` for an I/O
/// error (out of descriptors, disk full or failing: conditions that pass), 500 otherwise.
fn cache_failure(e: &streamcache::Error) -> Response<ProxyBody> {
    match e {
        streamcache::Error::Io { .. } => unavailable(&format!("cache error: {e}\n")),
        _ => simple(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cache error: {e}\n"),
        ),
    }
}

fn unavailable(text: &str) -> Response<ProxyBody> {
    let mut resp = simple(StatusCode::SERVICE_UNAVAILABLE, text);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    resp
}

fn simple(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::copy_from_slice(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    if !text.is_empty() {
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    resp
}

/// An error and its sources on one line.
fn error_chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
