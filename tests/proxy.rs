//! End-to-end tests of the caching proxy example (`examples/proxy`) over real sockets on
//! 127.0.0.1, against a local, slow, request-counting origin; plus a check that many async
//! readers of one in-progress stream share a `current_thread` runtime without blocking it.
//!
//! Every test runs under a deadline, so a hang fails instead of stalling the suite.

#[cfg(feature = "s3")]
#[path = "support/moto.rs"]
mod moto;
#[path = "../examples/proxy/server.rs"]
mod server;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use streamcache::{Cache, Entry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, timeout};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Size of the origin's bodies.
const SIZE: usize = 3 << 20;
/// The origin sends this much per chunk, with a short pause in between.
const ORIGIN_CHUNK: usize = 64 << 10;
const ORIGIN_PAUSE: Duration = Duration::from_millis(2);
const DEADLINE: Duration = Duration::from_secs(60);

/// The origin's content: the same deterministic bytes for every path.
fn content() -> Vec<u8> {
    (0..SIZE)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect()
}

/// Runs a test body under [`DEADLINE`].
async fn deadline<T>(f: impl Future<Output = T>) -> T {
    timeout(DEADLINE, f)
        .await
        .expect("test exceeded its deadline")
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------------------------------------
// Origin

/// A local origin server. Routes (the first path segment):
///
/// * `/file/…`: 200, `Content-Length`, content type and ETag, slow chunks;
/// * `/chunked/…`: the same without `Content-Length` (chunked);
/// * `/gated/…`, `/gated-chunked/…`: send half the body, wait for [`Origin::open_gate`], send
///   the rest;
/// * `/flaky/…`, `/flaky-chunked/…`: the first request of a path sends half the body, waits
///   for the gate, then breaks the connection; later requests get the whole body;
/// * anything else: 404.
struct Origin {
    addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    gate: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl Origin {
    async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let (gate, _) = watch::channel(false);
        let (hits2, gate2) = (hits.clone(), gate.clone());
        let server = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (hits, gate) = (hits2.clone(), gate2.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (hits, gate) = (hits.clone(), gate.clone());
                        async move { Ok::<_, Infallible>(origin_handle(req, &hits, &gate)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
            // `conns` drops with this task: aborting it closes every origin connection.
        });
        Origin {
            addr,
            hits,
            gate,
            server,
        }
    }

    fn url(&self) -> hyper::Uri {
        format!("http://{}", self.addr).parse().unwrap()
    }

    /// Requests the origin received for `path` (path and query).
    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn total_hits(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }

    fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    /// Stops accepting and closes every connection.
    async fn stop(self) {
        self.server.abort();
        let _ = self.server.await;
    }
}

fn origin_handle(
    req: Request<Incoming>,
    hits: &Mutex<HashMap<String, usize>>,
    gate: &watch::Sender<bool>,
) -> Response<ChanBody> {
    let path = req.uri().path_and_query().unwrap().as_str().to_owned();
    let nth = {
        let mut hits = hits.lock().unwrap();
        let n = hits.entry(path.clone()).or_default();
        *n += 1;
        *n
    };
    let route = req.uri().path().split('/').nth(1).unwrap_or("").to_owned();
    let (tx, rx) = mpsc::channel(4);
    let chunked = route.ends_with("-chunked") || route == "chunked";
    let route = route.trim_end_matches("-chunked");
    if !matches!(route, "file" | "chunked" | "gated" | "flaky" | "no-store") {
        let _ = tx.try_send(Ok(Bytes::from_static(b"nope")));
        let mut resp = Response::new(ChanBody { rx, len: Some(4) });
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return resp;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = Response::new(ChanBody { rx, len: Some(0) });
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return resp;
    }
    let gated = route == "gated" || route == "flaky";
    let dies = route == "flaky" && nth == 1;
    let mut gate = gate.subscribe();
    tokio::spawn(async move {
        let data = Bytes::from(content());
        for (i, start) in (0..SIZE).step_by(ORIGIN_CHUNK).enumerate() {
            if gated && start == SIZE / 2 {
                let _ = gate.wait_for(|open| *open).await;
                if dies {
                    let _ = tx.send(Err(io::Error::other("origin died"))).await;
                    return;
                }
            }
            let end = (start + ORIGIN_CHUNK).min(SIZE);
            if tx.send(Ok(data.slice(start..end))).await.is_err() {
                return;
            }
            if i % 2 == 1 {
                sleep(ORIGIN_PAUSE).await;
            }
        }
    });
    let len = (!chunked).then_some(SIZE as u64);
    let mut resp = Response::new(ChanBody { rx, len });
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-test"),
    );
    h.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if route == "no-store" {
            "no-store"
        } else {
            "max-age=3600"
        }),
    );
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    resp
}

/// The origin's response body: chunks from a channel; an `Err` breaks the connection.
struct ChanBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    len: Option<u64>,
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|next| next.map(|r| r.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        self.len
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

// ---------------------------------------------------------------------------------------------
// Proxy and client

struct RunningProxy {
    addr: SocketAddr,
    proxy: Arc<server::Proxy>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<io::Result<()>>,
}

async fn start_proxy(dir: &std::path::Path, upstream: hyper::Uri) -> RunningProxy {
    start_proxy_with(&server::Config::new(upstream, dir)).await
}

async fn start_proxy_with(config: &server::Config) -> RunningProxy {
    init_logs();
    let proxy = server::Proxy::open(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(server::serve(listener, proxy.clone(), async {
        let _ = stopped.await;
    }));
    RunningProxy {
        addr,
        proxy,
        stop,
        task,
    }
}

impl RunningProxy {
    fn url(&self, path: &str) -> hyper::Uri {
        format!("http://{}{path}", self.addr).parse().unwrap()
    }

    /// Stops serving, closes its connections and drops the cache (releasing the directory).
    async fn shutdown(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
        assert_eq!(Arc::strong_count(&self.proxy), 1, "the proxy state leaked");
    }
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The usual fixture: a counting origin, a proxy over a fresh cache directory (keep the
/// `TempDir` alive), a client, and the bytes the origin serves.
async fn setup() -> (Origin, tempfile::TempDir, RunningProxy, HttpClient, Vec<u8>) {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(dir.path(), origin.url()).await;
    (origin, dir, proxy, client(), content())
}

/// Sends a GET; returns the response with its body still streaming.
async fn send(client: &HttpClient, url: hyper::Uri, range: Option<&str>) -> Response<Incoming> {
    let mut req = Request::get(url);
    if let Some(r) = range {
        req = req.header(header::RANGE, r);
    }
    client
        .request(req.body(Empty::new()).unwrap())
        .await
        .unwrap()
}

/// A GET with its whole body.
async fn fetch(
    client: &HttpClient,
    url: hyper::Uri,
    range: Option<&str>,
) -> (Response<()>, Result<Bytes, BoxError>) {
    let resp = send(client, url, range).await;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(Into::into);
    (Response::from_parts(parts, ()), body)
}

fn header_str(resp: &Response<()>, name: header::HeaderName) -> Option<&str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_clients_one_origin_request() {
    deadline(async {
        let (origin, _dir, proxy, client, expected) = setup().await;

        let mut clients = JoinSet::new();
        for _ in 0..20 {
            let (client, url) = (client.clone(), proxy.url("/file/a?v=1"));
            clients.spawn(async move { fetch(&client, url, None).await });
        }
        let mut n = 0;
        while let Some(done) = clients.join_next().await {
            let (resp, body) = done.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(header_str(&resp, header::CONTENT_LENGTH), Some("3145728"));
            assert_eq!(
                header_str(&resp, header::CONTENT_TYPE),
                Some("application/x-test")
            );
            assert_eq!(header_str(&resp, header::ETAG), Some("\"v1\""));
            let body = body.expect("complete body");
            assert!(body == expected[..], "body differs ({} bytes)", body.len());
            n += 1;
        }
        assert_eq!(n, 20);
        assert_eq!(origin.hits("/file/a?v=1"), 1, "the origin saw one request");

        // A later request is a hit; another query is another key.
        let (resp, body) = fetch(&client, proxy.url("/file/a?v=1"), None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(body.unwrap() == expected[..]);
        let (_, body) = fetch(&client, proxy.url("/file/a?v=2"), None).await;
        assert!(body.unwrap() == expected[..]);
        assert_eq!(origin.hits("/file/a?v=1"), 1);
        assert_eq!(origin.hits("/file/a?v=2"), 1);
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_answered_mid_download() {
    deadline(async {
        let (origin, _dir, proxy, client, expected) = setup().await;

        // The first client starts the download; the origin then stalls at half the body.
        let first = {
            let (client, url) = (client.clone(), proxy.url("/gated/r"));
            tokio::spawn(async move { fetch(&client, url, None).await })
        };

        // A range inside the first half is answered while the origin is stalled.
        let (resp, body) = fetch(&client, proxy.url("/gated/r"), Some("bytes=1000-1999")).await;
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            header_str(&resp, header::CONTENT_RANGE),
            Some("bytes 1000-1999/3145728")
        );
        assert_eq!(header_str(&resp, header::CONTENT_LENGTH), Some("1000"));
        assert_eq!(
            header_str(&resp, header::CONTENT_TYPE),
            Some("application/x-test")
        );
        assert!(body.unwrap() == expected[1000..2000]);

        // A suffix range waits for its bytes only: headers come at once (the length is
        // known), the body completes once the origin goes on.
        let tail = send(&client, proxy.url("/gated/r"), Some("bytes=-100")).await;
        assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            tail.headers()[header::CONTENT_RANGE],
            format!("bytes {}-{}/{SIZE}", SIZE - 100, SIZE - 1)
        );
        let tail =
            tokio::spawn(async move { tail.into_body().collect().await.map(|c| c.to_bytes()) });
        sleep(Duration::from_millis(200)).await;
        assert!(!tail.is_finished(), "the tail cannot exist yet");
        assert!(!first.is_finished());
        origin.open_gate();
        assert!(tail.await.unwrap().unwrap() == expected[SIZE - 100..]);

        let (resp, body) = fetch(&client, proxy.url("/gated/r"), Some("bytes=3000000-")).await;
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            header_str(&resp, header::CONTENT_RANGE),
            Some("bytes 3000000-3145727/3145728")
        );
        assert!(body.unwrap() == expected[3_000_000..]);
        let (resp, _) = fetch(&client, proxy.url("/gated/r"), Some("bytes=3145728-")).await;
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(
            header_str(&resp, header::CONTENT_RANGE),
            Some("bytes */3145728")
        );
        // A range end past the end is clamped.
        let (resp, body) = fetch(
            &client,
            proxy.url("/gated/r"),
            Some("bytes=3145700-9999999"),
        )
        .await;
        assert_eq!(
            header_str(&resp, header::CONTENT_RANGE),
            Some("bytes 3145700-3145727/3145728")
        );
        assert!(body.unwrap() == expected[3_145_700..]);

        let (resp, body) = first.await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(body.unwrap() == expected[..]);
        assert_eq!(origin.hits("/gated/r"), 1);
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_without_content_length_mid_download() {
    deadline(async {
        let (origin, _dir, proxy, client, expected) = setup().await;

        let first = send(&client, proxy.url("/gated-chunked/r"), None).await;
        assert_eq!(first.status(), StatusCode::OK);
        assert!(first.headers().get(header::CONTENT_LENGTH).is_none());
        let first =
            tokio::spawn(async move { first.into_body().collect().await.map(|c| c.to_bytes()) });

        // The total is unknown while the origin stalls: the range says so with `/*`.
        let (resp, body) = fetch(&client, proxy.url("/gated-chunked/r"), Some("bytes=10-19")).await;
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            header_str(&resp, header::CONTENT_RANGE),
            Some("bytes 10-19/*")
        );
        assert!(body.unwrap() == expected[10..20]);

        // A suffix needs the total: it waits for the end of the download.
        let hits = proxy.proxy.cache().stats().hits;
        let tail = {
            let (client, url) = (client.clone(), proxy.url("/gated-chunked/r"));
            tokio::spawn(async move { fetch(&client, url, Some("bytes=-5")).await })
        };
        // Once it has joined the entry, it must go on waiting (a window: a negative check).
        until(|| proxy.proxy.cache().stats().hits > hits).await;
        sleep(Duration::from_millis(200)).await;
        assert!(!tail.is_finished());
        origin.open_gate();
        let (resp, body) = tail.await.unwrap();
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            header_str(&resp, header::CONTENT_RANGE),
            Some("bytes 3145723-3145727/3145728")
        );
        assert!(body.unwrap() == expected[SIZE - 5..]);
        assert!(first.await.unwrap().unwrap() == expected[..]);
        assert_eq!(origin.hits("/gated-chunked/r"), 1);
        proxy.shutdown().await;
    })
    .await;
}

/// An origin that breaks mid-body: every client streaming sees an error, nothing is cached,
/// the next request goes upstream again (and, the origin being well now, is cached).
async fn broken_origin_case(path: &str, with_length: bool) {
    let (origin, _dir, proxy, client, expected) = setup().await;

    // Three clients have their response heads before the origin breaks.
    let mut streaming = Vec::new();
    for _ in 0..3 {
        let resp = send(&client, proxy.url(path), None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers().contains_key(header::CONTENT_LENGTH),
            with_length
        );
        streaming.push(tokio::spawn(async move {
            resp.into_body().collect().await.map(|c| c.to_bytes())
        }));
    }
    origin.open_gate();
    for s in streaming {
        let err = s
            .await
            .unwrap()
            .expect_err("a broken body must not look complete");
        tracing::debug!(error = %err, "client saw");
    }
    assert_eq!(origin.hits(path), 1);

    let (resp, body) = fetch(&client, proxy.url(path), None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(body.unwrap() == expected[..]);
    assert_eq!(origin.hits(path), 2, "the broken entry was not cached");
    let (_, body) = fetch(&client, proxy.url(path), None).await;
    assert!(body.unwrap() == expected[..]);
    assert_eq!(origin.hits(path), 2, "the complete entry was cached");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_dying_mid_body_with_content_length() {
    deadline(broken_origin_case("/flaky/x", true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_dying_mid_body_chunked() {
    deadline(broken_origin_case("/flaky-chunked/x", false)).await;
}

/// Polls `cond` until it holds (the test's own deadline bounds the wait).
async fn until(mut cond: impl FnMut() -> bool) {
    while !cond() {
        sleep(Duration::from_millis(1)).await;
    }
}

/// A raw HTTP/1.0 GET; returns everything the proxy sent before closing.
async fn http10_get(addr: SocketAddr, path: &str) -> Vec<u8> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out).await;
    out
}

/// HTTP/1.0 has no chunked encoding, so an entry of unknown length is only sent once its
/// length is final: a broken one gets an error status, never a close-delimited short body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_client_never_gets_a_short_body() {
    deadline(async {
        let (origin, _dir, proxy, client, expected) = setup().await;

        let first = send(&client, proxy.url("/flaky-chunked/old"), None).await;
        assert_eq!(first.status(), StatusCode::OK);
        let hits = proxy.proxy.cache().stats().hits;
        let old = tokio::spawn(http10_get(proxy.addr, "/flaky-chunked/old"));
        // It must join the entry still being written before the origin fails it (a fixed
        // sleep here could let the failure win on a slow machine, making it a fresh miss).
        until(|| proxy.proxy.cache().stats().hits > hits).await;
        sleep(Duration::from_millis(50)).await;
        assert!(!old.is_finished(), "waits for the final length");
        origin.open_gate();
        let raw = old.await.unwrap();
        assert!(
            raw.starts_with(b"HTTP/1.0 502"),
            "{:?}",
            String::from_utf8_lossy(&raw[..40.min(raw.len())])
        );
        assert!(first.into_body().collect().await.is_err());

        // Once cached, the whole body with its length.
        let (_, body) = fetch(&client, proxy.url("/flaky-chunked/old"), None).await;
        assert!(body.unwrap() == expected[..]);
        let raw = http10_get(proxy.addr, "/flaky-chunked/old").await;
        let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&raw[..head_end]).to_lowercase();
        assert!(head.starts_with("http/1.0 200"), "{head}");
        assert!(head.contains("content-length: 3145728"), "{head}");
        assert!(raw[head_end..] == expected[..]);
        assert_eq!(origin.hits("/flaky-chunked/old"), 2);
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_200_is_not_cached() {
    deadline(async {
        let (origin, dir, proxy, client, _) = setup().await;
        for n in 1..=2 {
            let (resp, body) = fetch(&client, proxy.url("/missing/x"), None).await;
            assert_eq!(resp.status(), StatusCode::NOT_FOUND);
            assert_eq!(&body.unwrap()[..], b"nope");
            assert_eq!(origin.hits("/missing/x"), n);
        }
        assert!(!proxy.proxy.cache().contains_key("/missing/x"));
        proxy.shutdown().await;

        // No origin at all: 502, not cached either.
        origin.stop().await;
        let proxy = start_proxy(dir.path(), "http://127.0.0.1:9".parse().unwrap()).await;
        let (resp, _) = fetch(&client, proxy.url("/file/none"), None).await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert!(!proxy.proxy.cache().contains_key("/file/none"));
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_from_disk_without_origin() {
    deadline(async {
        let (origin, dir, proxy, client, expected) = setup().await;
        let upstream = origin.url();
        for path in ["/file/keep", "/chunked/keep"] {
            let (resp, body) = fetch(&client, proxy.url(path), None).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert!(body.unwrap() == expected[..]);
        }
        // A client may have all the bytes before the download commits its entry (with a
        // Content-Length, the body ends when the bytes are there): wait for both commits, or
        // the shutdown could abort one.
        for path in ["/file/keep", "/chunked/keep"] {
            let cache = proxy.proxy.cache();
            until(|| cache.get(path).unwrap().is_some_and(|r| r.size().finished)).await;
        }
        proxy.shutdown().await;
        let seen = origin.total_hits();
        assert_eq!(seen, 2);
        origin.stop().await; // any upstream request would now fail

        let proxy = start_proxy(dir.path(), upstream).await;
        assert_eq!(proxy.proxy.cache().len(), 2);
        for path in ["/file/keep", "/chunked/keep"] {
            let (resp, body) = fetch(&client, proxy.url(path), None).await;
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            assert_eq!(
                header_str(&resp, header::CONTENT_TYPE),
                Some("application/x-test")
            );
            assert_eq!(header_str(&resp, header::ETAG), Some("\"v1\""));
            assert_eq!(header_str(&resp, header::CONTENT_LENGTH), Some("3145728"));
            assert!(body.unwrap() == expected[..]);
            let (resp, body) = fetch(&client, proxy.url(path), Some("bytes=-3")).await;
            assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
            assert!(body.unwrap() == expected[SIZE - 3..]);
        }
        proxy.shutdown().await;
    })
    .await;
}

/// The example follows the HTTP caching rules of the layer it is built on (all of them are
/// tested in `streamcache-http/tests/semantics.rs`): `no-store` is relayed, not cached;
/// `HEAD` and a matching `If-None-Match` are answered from the cache; `PURGE` is passed to the
/// origin unless `--purge` allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_follows_the_http_caching_rules() {
    deadline(async {
        let (origin, dir, proxy, client, expected) = setup().await;
        for n in 1..=2 {
            let (resp, body) = fetch(&client, proxy.url("/no-store/x"), None).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert!(body.unwrap() == expected[..]);
            assert_eq!(origin.hits("/no-store/x"), n, "not cached");
        }
        let (_, body) = fetch(&client, proxy.url("/file/rules"), None).await;
        assert!(body.unwrap() == expected[..]);
        let cache = proxy.proxy.cache();
        until(|| {
            cache
                .get("/file/rules")
                .unwrap()
                .is_some_and(|r| r.size().finished)
        })
        .await;
        let req = |method: &str, header: Option<(&str, &str)>| {
            let mut req = Request::builder()
                .method(method)
                .uri(proxy.url("/file/rules"));
            if let Some((name, value)) = header {
                req = req.header(name, value);
            }
            req.body(Empty::new()).unwrap()
        };
        let head = client.request(req("HEAD", None)).await.unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(
            head.headers()[header::CONTENT_LENGTH],
            SIZE.to_string().as_str()
        );
        let inm = client
            .request(req("GET", Some(("if-none-match", "\"v1\""))))
            .await
            .unwrap();
        assert_eq!(inm.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(origin.hits("/file/rules"), 1, "HEAD and 304 from the cache");
        let purge = client.request(req("PURGE", None)).await.unwrap();
        assert_eq!(
            purge.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "the origin's answer"
        );
        assert_eq!(origin.hits("/file/rules"), 2, "passed through");
        proxy.shutdown().await;

        let mut config = server::Config::new(origin.url(), dir.path());
        config.cache.purge = streamcache_http::Purge::Loopback;
        let proxy = start_proxy_with(&config).await;
        let purge = client.request(req_to(&proxy, "PURGE")).await.unwrap();
        assert_eq!(purge.status(), StatusCode::OK, "purged by the proxy");
        assert_eq!(origin.hits("/file/rules"), 2);
        assert!(!proxy.proxy.cache().contains_key("/file/rules"));
        proxy.shutdown().await;
    })
    .await;
}

fn req_to(proxy: &RunningProxy, method: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri(proxy.url("/file/rules"))
        .body(Empty::new())
        .unwrap()
}

/// 50 async readers of one stream being written, all on one `current_thread` runtime with the
/// writer: if anything blocked the executor thread, the writer could not progress and this
/// would hit its deadline.
#[tokio::test(flavor = "current_thread")]
async fn fifty_async_readers_on_current_thread() {
    deadline(async {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::builder().disk(dir.path()).build().unwrap();
        let Entry::Miss(w) = cache.get_or_create("in-progress").unwrap() else {
            unreachable!()
        };
        let expected: Vec<u8> = content()[..512 << 10].to_vec();

        let mut readers = JoinSet::new();
        for i in 0..50 {
            // Half from the writer, half as cache hits of the entry in progress.
            let r: streamcache::tokio::AsyncReader = if i % 2 == 0 {
                w.reader().unwrap().into()
            } else {
                let Entry::Hit(r) = cache.get_or_create("in-progress").unwrap() else {
                    panic!("expected a hit")
                };
                r.into()
            };
            readers.spawn(async move {
                let mut r = r;
                let mut out = Vec::new();
                if i % 3 == 0 {
                    loop {
                        let chunk = r.read_chunk(8 << 10).await?;
                        if chunk.is_empty() {
                            break;
                        }
                        out.extend_from_slice(&chunk);
                    }
                } else {
                    r.read_to_end(&mut out).await?;
                }
                io::Result::Ok(out)
            });
        }
        let data = expected.clone();
        let writer = tokio::spawn(async move {
            let mut w = streamcache::tokio::AsyncWriter::from(w);
            for chunk in data.chunks(16 << 10) {
                w.write_all(chunk).await?;
                w.flush().await?;
                sleep(Duration::from_millis(1)).await;
            }
            w.finish().map_err(io::Error::from)
        });
        writer.await.unwrap().unwrap();
        let mut n = 0;
        while let Some(out) = readers.join_next().await {
            assert!(out.unwrap().unwrap() == expected);
            n += 1;
        }
        assert_eq!(n, 50);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Hostile clients: connection limits

/// A proxy over a fresh directory with these connection limits.
async fn proxy_with_limits(
    origin: &Origin,
    limits: server::ConnLimits,
) -> (tempfile::TempDir, RunningProxy) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = server::Config::new(origin.url(), dir.path());
    config.limits = limits;
    let proxy = start_proxy_with(&config).await;
    (dir, proxy)
}

/// Waits (at most `within`) for the proxy to close `conn`: true if a read saw the end of the
/// stream or a reset, false if the connection was still open at the end.
async fn closed_by_server(conn: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = vec![0u8; 64 << 10];
    timeout(within, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408 or the tail of a response: keep reading
            }
        }
    })
    .await
    .is_ok()
}

/// Reads one HTTP/1.1 response with a `Content-Length` off a raw connection: (head, body).
async fn read_response(conn: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before the response head");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    let mut body = raw[head_end..].to_vec();
    while body.len() < len {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&buf[..n]);
    }
    (head, body)
}

/// Slowloris: connections that send half a request head (or nothing, or trickle bytes) are
/// closed once the head timeout passes; they did not reach the origin, and a normal request
/// is served afterwards. Regression: hyper never timed them out, so they piled up until the
/// proxy ran out of descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_heads_are_closed() {
    deadline(async {
        let origin = Origin::start().await;
        let limits = server::ConnLimits {
            head_timeout: Duration::from_millis(300),
            ..server::ConnLimits::default()
        };
        let (_dir, proxy) = proxy_with_limits(&origin, limits).await;

        let mut stalled = Vec::new();
        for i in 0..30 {
            let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
            if i % 3 != 0 {
                // Half a head; every third connection sends nothing at all.
                conn.write_all(b"GET /file/slow HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .await
                    .unwrap();
            }
            stalled.push(conn);
        }
        // One more keeps sending a header byte every 50 ms: a trickle does not extend the
        // deadline (it counts from the accept, not from the last byte).
        let trickle = tokio::spawn({
            let addr = proxy.addr;
            async move {
                let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
                conn.write_all(b"GET /file/slow HTTP/1.1\r\nX-A: ")
                    .await
                    .unwrap();
                for _ in 0..400 {
                    if conn.write_all(b"a").await.is_err() {
                        return true;
                    }
                    let mut probe = [0u8; 1024];
                    let read = timeout(Duration::from_millis(50), conn.read(&mut probe)).await;
                    if let Ok(Ok(0) | Err(_)) = read {
                        return true; // closed by the proxy
                    }
                }
                false
            }
        });
        for (i, conn) in stalled.iter_mut().enumerate() {
            assert!(
                closed_by_server(conn, Duration::from_secs(15)).await,
                "stalled connection {i} still open"
            );
        }
        assert!(trickle.await.unwrap(), "trickling connection still open");
        assert_eq!(origin.total_hits(), 0);

        let (resp, body) = fetch(&client(), proxy.url("/file/after"), None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(body.unwrap() == content()[..]);
        proxy.shutdown().await;
    })
    .await;
}

/// With a cap of K connections, K stalled clients hold every slot: the next client waits
/// (it is not served, the origin sees nothing), then is served as soon as one slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_makes_new_clients_wait_for_a_slot() {
    deadline(async {
        let origin = Origin::start().await;
        let limits = server::ConnLimits {
            max_connections: 3,
            ..server::ConnLimits::default() // heads time out after 10 s: not in this test
        };
        let (_dir, proxy) = proxy_with_limits(&origin, limits).await;

        let mut stalled = Vec::new();
        for _ in 0..3 {
            let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
            conn.write_all(b"GET /file/cap HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            stalled.push(conn);
        }
        // No wait needed here: the kernel hands connections to `accept` in arrival order,
        // so the stalled ones take the slots before the next one is accepted.

        // The kernel completes the handshake (listen backlog), but the proxy does not serve it.
        let mut waiting = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        waiting
            .write_all(b"GET /file/cap HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let waiting = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = waiting.read_to_end(&mut out).await;
            out
        });
        sleep(Duration::from_millis(500)).await;
        assert!(!waiting.is_finished(), "served past the connection cap");
        assert_eq!(origin.total_hits(), 0, "served past the connection cap");

        // A stalled client goes away: its slot goes to the waiting one.
        drop(stalled.pop());
        let raw = waiting.await.unwrap();
        assert!(
            raw.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            &raw[..raw.len().min(40)]
        );
        assert!(raw.ends_with(&content()[SIZE - 1000..]));
        assert_eq!(origin.hits("/file/cap"), 1);
        drop(stalled);
        proxy.shutdown().await;
    })
    .await;
}

/// A keep-alive connection left idle after its response is closed after the idle timeout
/// (well before the 30 s head timeout); a request in flight is never idle, however long the
/// origin stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_is_closed() {
    deadline(async {
        let origin = Origin::start().await;
        let limits = server::ConnLimits {
            head_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_millis(300),
            ..server::ConnLimits::default()
        };
        let (_dir, proxy) = proxy_with_limits(&origin, limits).await;

        let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        // The origin stalls half-way for longer than the idle timeout: still served whole.
        conn.write_all(b"GET /gated/idle HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let reading = tokio::spawn(async move {
            let resp = read_response(&mut conn).await;
            (conn, resp)
        });
        until(|| origin.hits("/gated/idle") == 1).await;
        sleep(Duration::from_secs(1)).await;
        origin.open_gate();
        let (mut conn, (head, body)) = reading.await.unwrap();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(body == content());

        // A second request on the same connection (keep-alive works), then silence.
        conn.write_all(b"GET /gated/idle HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_response(&mut conn).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(
            closed_by_server(&mut conn, Duration::from_secs(10)).await,
            "idle keep-alive connection still open"
        );
        proxy.shutdown().await;
    })
    .await;
}

/// When the cache's storage fails a request with an I/O error (here: its staging directory
/// is gone, as EMFILE or ENOSPC would fail it), the answer is 503 with `Retry-After`, and
/// the origin is not asked (nothing could be stored). Once the storage works again, so does
/// the proxy. Regression: 500, no hint to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_io_error_is_503_with_retry_after() {
    deadline(async {
        let (origin, dir, proxy, client, expected) = setup().await;
        let tmp = dir.path().join("tmp");
        std::fs::remove_dir_all(&tmp).unwrap();

        let (resp, body) = fetch(&client, proxy.url("/file/io"), None).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let retry: u64 = header_str(&resp, header::RETRY_AFTER)
            .expect("a Retry-After")
            .parse()
            .unwrap();
        assert!(retry > 0);
        tracing::debug!(body = ?body.unwrap(), "503");
        assert_eq!(origin.total_hits(), 0, "a cache failure is not a miss");
        assert!(!proxy.proxy.cache().contains_key("/file/io"));

        std::fs::create_dir(&tmp).unwrap();
        let (resp, body) = fetch(&client, proxy.url("/file/io"), None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(body.unwrap() == expected[..]);
        assert_eq!(origin.hits("/file/io"), 1);
        proxy.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Hostile origins: a raw TCP origin that frames its responses by hand

/// Size of the raw origin's bodies (`/big/…`: [`RAW_BIG`]).
const RAW_SIZE: usize = 5 << 20;
const RAW_BIG: usize = 32 << 20;

/// The raw origin's content: `n` deterministic bytes.
fn raw_content(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 253) as u8).collect()
}

/// A hand-written origin on raw TCP, one request per connection, counting connections.
/// Routes (the first path segment):
///
/// * `/close10/…`: `HTTP/1.0 200` without `Content-Length`, [`RAW_SIZE`] bytes, then it
///   closes: an origin that died half-way through 10 MiB looks exactly like this;
/// * `/close11/…`: the same as HTTP/1.1 with `Connection: close`;
/// * `/gated-close10/…`: `/close10/` that holds its response head until [`RawOrigin::open_gate`];
/// * `/length/…`, `/big/…`: `Content-Length`; `/chunked/…`: chunked (both complete);
/// * `/stall/…`: announces 10 MiB with `Content-Length`, sends 1 MiB, then sends nothing more
///   while keeping the connection open (until the test ends); `/stall10/…`: the same as a
///   close-delimited HTTP/1.0 response (relayed, not cached).
struct RawOrigin {
    addr: SocketAddr,
    conns: Arc<Mutex<HashMap<String, usize>>>,
    gate: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl RawOrigin {
    async fn start() -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let (gate, _) = watch::channel(false);
        let (conns2, gate2) = (conns.clone(), gate.clone());
        let server = tokio::spawn(async move {
            let mut tasks = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tasks.spawn(raw_origin_conn(stream, conns2.clone(), gate2.subscribe()));
                while tasks.try_join_next().is_some() {}
            }
        });
        RawOrigin {
            addr,
            conns,
            gate,
            server,
        }
    }

    fn url(&self) -> hyper::Uri {
        format!("http://{}", self.addr).parse().unwrap()
    }

    /// Connections (= requests) the origin received for `path`.
    fn hits(&self, path: &str) -> usize {
        self.conns.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn open_gate(&self) {
        self.gate.send_replace(true);
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn raw_origin_conn(
    mut conn: tokio::net::TcpStream,
    conns: Arc<Mutex<HashMap<String, usize>>>,
    mut gate: watch::Receiver<bool>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 << 10 {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
    *conns.lock().unwrap().entry(path.clone()).or_default() += 1;
    let route = path.split('/').nth(1).unwrap_or("");
    let body = raw_content(if route == "big" { RAW_BIG } else { RAW_SIZE });
    let out: Vec<u8> = match route {
        "close10" | "gated-close10" => {
            if route == "gated-close10" {
                let _ = gate.wait_for(|open| *open).await;
            }
            [
                b"HTTP/1.0 200 OK\r\nCache-Control: max-age=3600\r\nContent-Type: application/x-test\r\n\r\n",
                &body[..],
            ]
            .concat()
        }
        "close11" => [
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=3600\r\nConnection: close\r\nContent-Type: application/x-test\r\n\r\n",
            &body[..],
        ]
        .concat(),
        "length" | "big" => [
            format!(
                "HTTP/1.1 200 OK\r\nCache-Control: max-age=3600\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
            &body[..],
        ]
        .concat(),
        "chunked" => {
            let mut out =
                b"HTTP/1.1 200 OK\r\nCache-Control: max-age=3600\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                    .to_vec();
            for chunk in body.chunks(1 << 20) {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            out
        }
        "stall" | "stall10" => {
            let head = if route == "stall" {
                format!("HTTP/1.1 200 OK\r\nCache-Control: max-age=3600\r\nContent-Length: {}\r\n\r\n", 10 << 20)
            } else {
                "HTTP/1.0 200 OK\r\nCache-Control: max-age=3600\r\n\r\n".to_owned()
            };
            if conn.write_all(head.as_bytes()).await.is_ok()
                && conn.write_all(&body[..1 << 20]).await.is_ok()
            {
                sleep(DEADLINE).await; // silent, but open
            }
            return;
        }
        _ => b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".to_vec(),
    };
    if conn.write_all(&out).await.is_ok() {
        let _ = conn.shutdown().await;
    }
}

/// A close-delimited upstream body (no `Content-Length`, not chunked) cannot prove it is
/// complete: it is streamed to its client untouched but never cached, so every request goes
/// to the origin; a body with a length or chunked is cached as before. Regression: an
/// HTTP/1.0 origin that died after 5 of 10 MiB was cached as a complete 5 MiB entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_upstream_body_is_relayed_not_cached() {
    deadline(async {
        let origin = RawOrigin::start().await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(dir.path(), origin.url()).await;
        let client = client();
        let expected = raw_content(RAW_SIZE);

        for path in ["/close10/a", "/close11/a"] {
            for n in 1..=2 {
                let (resp, body) = fetch(&client, proxy.url(path), None).await;
                assert_eq!(resp.status(), StatusCode::OK, "{path}");
                assert_eq!(header_str(&resp, header::CONTENT_LENGTH), None);
                assert_eq!(
                    header_str(&resp, header::CONTENT_TYPE),
                    Some("application/x-test")
                );
                assert!(
                    body.unwrap() == expected[..],
                    "{path}: body relayed untouched"
                );
                assert_eq!(origin.hits(path), n, "{path}: request {n} went upstream");
                assert!(!proxy.proxy.cache().contains_key(path), "{path} was cached");
            }
        }

        // Complete framings are cached: the second request stays in the proxy.
        for path in ["/length/a", "/chunked/a"] {
            for _ in 0..2 {
                let (resp, body) = fetch(&client, proxy.url(path), None).await;
                assert_eq!(resp.status(), StatusCode::OK, "{path}");
                assert!(body.unwrap() == expected[..], "{path}");
            }
            assert_eq!(origin.hits(path), 1, "{path} was not cached");
        }
        proxy.shutdown().await;
    })
    .await;
}

/// A request that joined the entry of a close-delimited download (before its upstream head
/// came) fetches the path upstream on its own and gets the whole body too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joiner_of_a_close_delimited_download_fetches_it_itself() {
    deadline(async {
        let origin = RawOrigin::start().await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(dir.path(), origin.url()).await;
        let client = client();
        let path = "/gated-close10/j";

        let get = |url| {
            let client = client.clone();
            tokio::spawn(async move { fetch(&client, url, None).await })
        };
        let first = get(proxy.url(path));
        until(|| origin.hits(path) == 1).await;
        let hits = proxy.proxy.cache().stats().hits;
        let second = get(proxy.url(path));
        until(|| proxy.proxy.cache().stats().hits > hits).await; // joined the entry
        origin.open_gate();
        for resp in [first, second] {
            let (resp, body) = resp.await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert!(body.unwrap() == raw_content(RAW_SIZE)[..]);
        }
        assert_eq!(origin.hits(path), 2);
        assert!(!proxy.proxy.cache().contains_key(path));
        proxy.shutdown().await;
    })
    .await;
}

/// An origin that goes silent mid-body (connection open) fails the download after the
/// upstream timeout: its clients see an error instead of hanging for ever, nothing is
/// cached, the next request goes upstream again; the same for a relayed (uncached) body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_origin_mid_body_fails_instead_of_hanging() {
    deadline(async {
        let origin = RawOrigin::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = server::Config::new(origin.url(), dir.path());
        config.cache.upstream_timeout = Duration::from_millis(300);
        let proxy = start_proxy_with(&config).await;
        let client = client();

        for path in ["/stall/s", "/stall10/s"] {
            for n in 1..=2 {
                let (resp, body) = timeout(
                    Duration::from_secs(20),
                    fetch(&client, proxy.url(path), None),
                )
                .await
                .unwrap_or_else(|_| panic!("{path}: the client hangs with the origin"));
                assert_eq!(resp.status(), StatusCode::OK);
                assert!(
                    body.is_err(),
                    "{path}: a truncated body must not look complete"
                );
                assert_eq!(origin.hits(path), n, "{path}: nothing cached");
                until(|| !proxy.proxy.cache().contains_key(path)).await;
            }
        }
        proxy.shutdown().await;
    })
    .await;
}

/// A client that requests a large body and never reads it blocks the proxy's writes: after
/// the idle timeout its connection is closed (it then finds far less than the body in its
/// socket). Regression: it held its connection and cache reader for as long as it liked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_is_disconnected() {
    deadline(async {
        let origin = RawOrigin::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = server::Config::new(origin.url(), dir.path());
        config.limits.idle_timeout = Duration::from_millis(200);
        let proxy = start_proxy_with(&config).await;
        // Cache the body first, so the proxy can write as fast as the client reads.
        let (_, body) = fetch(&client(), proxy.url("/big/r"), None).await;
        assert_eq!(body.unwrap().len(), RAW_BIG);

        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut conn = socket.connect(proxy.addr).await.unwrap();
        conn.write_all(b"GET /big/r HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        sleep(Duration::from_secs(3)).await; // reads nothing: the proxy's writes block
        let mut got = Vec::new();
        let _ = timeout(Duration::from_secs(20), conn.read_to_end(&mut got))
            .await
            .expect("the proxy closed the connection");
        assert!(
            got.len() < RAW_BIG,
            "the whole body was delivered to a client that stopped reading ({} bytes)",
            got.len()
        );
        proxy.shutdown().await;
    })
    .await;
}

/// Downloads outlive the clients that start them, so the connection cap does not bound
/// them: `max_downloads` does. With one slot, a miss for another path waits (the origin sees
/// nothing) while a download runs, then runs once the slot frees. Regression: a client could
/// start any number of downloads (an upstream socket and a staged file each) by asking for
/// distinct paths and hanging up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_beyond_max_downloads_wait_for_a_slot() {
    deadline(async {
        let origin = Origin::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = server::Config::new(origin.url(), dir.path());
        config.cache.max_downloads = 1;
        let proxy = start_proxy_with(&config).await;
        let client = client();

        // The first download stalls half-way (gate closed); its client hangs up.
        let first = send(&client, proxy.url("/gated/d1"), None).await;
        assert_eq!(first.status(), StatusCode::OK);
        drop(first);

        let misses = proxy.proxy.cache().stats().misses;
        let second = {
            let (client, url) = (client.clone(), proxy.url("/file/d2"));
            tokio::spawn(async move { fetch(&client, url, None).await })
        };
        // Once it has reached the cache (a miss), its download must wait for the slot (a
        // window: a negative check).
        until(|| proxy.proxy.cache().stats().misses > misses).await;
        sleep(Duration::from_millis(500)).await;
        assert_eq!(
            origin.hits("/file/d2"),
            0,
            "a second download ran past the limit"
        );
        assert!(!second.is_finished());

        origin.open_gate();
        let (resp, body) = second.await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(body.unwrap() == content()[..]);
        assert_eq!(origin.hits("/file/d2"), 1);
        // The first download ran to its end without a client, and was cached.
        let cache = proxy.proxy.cache();
        until(|| {
            cache
                .get("/gated/d1")
                .unwrap()
                .is_some_and(|r| r.size().finished)
        })
        .await;
        proxy.shutdown().await;
    })
    .await;
}

/// A fleet of proxies on one bucket (`--shared`; here moto, a real S3-compatible server):
/// clients of two proxies ask for one path at once, and the origin sees one request; a third
/// proxy with an empty cache serves it from the bucket.
#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_proxies_shares_one_bucket() {
    let Some(moto) = moto::Moto::start("a_fleet_of_proxies_shares_one_bucket") else {
        return;
    };
    moto.create_bucket("proxies");
    deadline(async {
        let origin = Origin::start().await;
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let config = |dir: &tempfile::TempDir| {
            let mut c = server::Config::new(origin.url(), dir.path());
            c.shared = Some(
                streamcache::shared::SharedTier::new(moto.store("proxies"))
                    .chunk_interval(Duration::from_millis(20))
                    .poll_interval(Duration::from_millis(20)),
            );
            c
        };
        let a = start_proxy_with(&config(&dirs[0])).await;
        let b = start_proxy_with(&config(&dirs[1])).await;
        let client = client();
        let expected = content();
        let mut clients = JoinSet::new();
        for i in 0..10 {
            let proxy = if i % 2 == 0 { &a } else { &b };
            let (client, url) = (client.clone(), proxy.url("/file/fleet"));
            clients.spawn(async move { fetch(&client, url, None).await });
        }
        while let Some(done) = clients.join_next().await {
            let (resp, body) = done.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(
                header_str(&resp, header::CONTENT_TYPE),
                Some("application/x-test")
            );
            assert!(body.expect("complete body") == expected[..]);
        }
        assert_eq!(
            origin.hits("/file/fleet"),
            1,
            "one origin request for the fleet"
        );
        let c = start_proxy_with(&config(&dirs[2])).await;
        let (resp, body) = fetch(&client, c.url("/file/fleet"), None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(body.unwrap() == expected[..]);
        assert_eq!(
            origin.hits("/file/fleet"),
            1,
            "the third proxy read the bucket"
        );
        for p in [a, b, c] {
            p.shutdown().await;
        }
    })
    .await;
}
