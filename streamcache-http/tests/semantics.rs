//! The HTTP caching rules of the layer, row by row (issue 13's table), each over real sockets:
//! a client, the layer over [`Upstream`] served by [`serve`] on 127.0.0.1, and a scripted
//! origin on 127.0.0.1 that records every request it gets. Each test has a control case
//! that is cached, so a layer that stored nothing would fail too.
//!
//! Every test runs under a deadline, so a hang fails instead of stalling the suite.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use streamcache::Cache;
use streamcache_http::{CacheConfig, CacheLayer, ConnLimits, Purge, Upstream, serve};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::{sleep, timeout};
use tower_layer::Layer;

const DEADLINE: Duration = Duration::from_secs(60);

async fn deadline<T>(f: impl Future<Output = T>) -> T {
    timeout(DEADLINE, f)
        .await
        .expect("test exceeded its deadline")
}

/// A request as the origin saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    headers: HeaderMap,
}

type Script = Arc<dyn Fn(&Seen, usize) -> Response<Full<Bytes>> + Send + Sync>;

/// A scripted origin: `script(request, n)` answers the n-th request (from 1) of a path.
struct Origin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Origin {
    async fn start(
        script: impl Fn(&Seen, usize) -> Response<Full<Bytes>> + Send + Sync + 'static,
    ) -> Origin {
        let script: Script = Arc::new(script);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (seen, script) = (seen2.clone(), script.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (seen, script) = (seen.clone(), script.clone());
                        async move {
                            let s = Seen {
                                method: req.method().clone(),
                                path: req.uri().path_and_query().unwrap().as_str().to_owned(),
                                headers: req.headers().clone(),
                            };
                            let n = {
                                let mut seen = seen.lock().unwrap();
                                seen.push(s.clone());
                                seen.iter().filter(|x| x.path == s.path).count()
                            };
                            let mut resp = script(&s, n);
                            // A script delays its answer with this (test-only) header.
                            if let Some(ms) = resp.headers_mut().remove("x-test-delay-ms") {
                                let ms: u64 = ms.to_str().unwrap().parse().unwrap();
                                sleep(Duration::from_millis(ms)).await;
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Origin { addr, seen }
    }

    /// Requests received for `path`.
    fn hits(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .count()
    }

    /// The last request received for `path`.
    fn last(&self, path: &str) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|s| s.path == path)
            .cloned()
            .expect("the origin saw the path")
    }
}

/// A response with a body and headers.
fn reply(body: &str, headers: &[(&str, &str)]) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    for (name, value) in headers {
        resp.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    resp
}

struct Proxy {
    addr: SocketAddr,
    layer: CacheLayer,
    _dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

async fn proxy(origin: &Origin, config: CacheConfig) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::builder().disk(dir.path()).build().unwrap();
    let layer = CacheLayer::with_config(cache, config);
    let upstream = Upstream::new(format!("http://{}", origin.addr).parse().unwrap()).unwrap();
    let service = layer.layer(upstream);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(listener, service, ConnLimits::default(), async {
        let _ = stopped.await;
    }));
    Proxy {
        addr,
        layer,
        _dir: dir,
        _stop: stop,
    }
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends `method path` with `headers` to the proxy; returns the head and the whole body.
async fn send(
    proxy: &Proxy,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (Response<()>, Bytes) {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", proxy.addr));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = client()
        .request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (Response::from_parts(parts, ()), body)
}

async fn get(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> (Response<()>, Bytes) {
    send(proxy, "GET", path, headers).await
}

fn hdr<'a>(resp: &'a Response<()>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The entries' blobs are written in the background: wait until `key` is finished (or the
/// deadline).
async fn until_finished(layer: &CacheLayer, key: &str) {
    while !layer
        .cache()
        .entry_info(key)
        .is_some_and(|i| i.is_finished())
    {
        sleep(Duration::from_millis(2)).await;
    }
}

fn script_by_path(seen: &Seen, n: usize) -> Response<Full<Bytes>> {
    let path = seen.path.as_str();
    let body = format!("{path} #{n}");
    match path {
        "/public" => reply(&body, &[("cache-control", "max-age=60")]),
        "/no-store" => reply(&body, &[("cache-control", "no-store")]),
        "/private" => reply(&body, &[("cache-control", "private, max-age=60")]),
        "/auth" => reply(&body, &[("cache-control", "max-age=60")]),
        "/auth-public" => reply(&body, &[("cache-control", "public, max-age=60")]),
        "/auth-s-maxage" => reply(&body, &[("cache-control", "s-maxage=60")]),
        "/cookie" => reply(
            &body,
            &[
                ("cache-control", "max-age=60"),
                // A validator: without the Set-Cookie rule it could be kept to revalidate.
                ("etag", "\"c\""),
                ("set-cookie", &format!("session={n}")),
            ],
        ),
        "/short" => reply(&body, &[("cache-control", "max-age=1")]),
        "/expires" => {
            let at = std::time::SystemTime::now() + Duration::from_secs(1);
            reply(&body, &[("expires", &httpdate::fmt_http_date(at))])
        }
        "/etag" | "/last-modified" | "/etag60" | "/etag-slow" | "/bare-304" => {
            let lm = "Tue, 01 Dec 2026 10:00:00 GMT";
            let validator: (&str, &str) = if !matches!(path, "/last-modified" | "/bare-304") {
                ("etag", "\"v1\"")
            } else {
                ("last-modified", lm)
            };
            let matches = seen
                .headers
                .get("if-none-match")
                .is_some_and(|v| v == "\"v1\"")
                || seen
                    .headers
                    .get("if-modified-since")
                    .is_some_and(|v| v == lm);
            let max_age = if path == "/etag60" {
                "max-age=60"
            } else {
                "max-age=1"
            };
            let headers = [("cache-control", max_age), validator];
            if matches && path == "/bare-304" {
                // A 304 that repeats no validator (as Python's http.server sends).
                let mut resp = reply("", &[("cache-control", "max-age=1")]);
                *resp.status_mut() = StatusCode::NOT_MODIFIED;
                resp
            } else if matches {
                let mut resp = reply("", &headers);
                *resp.status_mut() = StatusCode::NOT_MODIFIED;
                if path == "/etag-slow" {
                    resp.headers_mut()
                        .insert("x-test-delay-ms", HeaderValue::from_static("300"));
                }
                resp
            } else {
                reply(&format!("{path} body"), &headers)
            }
        }
        "/vary" => {
            let lang = seen
                .headers
                .get("x-lang")
                .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
            reply(
                &format!("lang={lang} #{n}"),
                &[("cache-control", "max-age=60"), ("vary", "X-Lang")],
            )
        }
        "/error" => {
            let mut resp = reply("origin failed", &[("x-origin", "yes")]);
            *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            resp
        }
        _ => {
            let mut resp = reply(
                &format!("{} {path}", seen.method),
                &[("cache-control", "max-age=60")],
            );
            if seen.method == Method::POST {
                *resp.status_mut() = StatusCode::CREATED;
            } else if seen.method.as_str() == "PURGE" {
                *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            }
            resp
        }
    }
}

async fn setup() -> (Origin, Proxy) {
    let origin = Origin::start(script_by_path).await;
    let proxy = proxy(&origin, CacheConfig::default()).await;
    (origin, proxy)
}

#[tokio::test]
async fn control_max_age_is_stored_and_served() {
    deadline(async {
        let (origin, proxy) = setup().await;
        for _ in 0..3 {
            let (resp, body) = get(&proxy, "/public", &[]).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(&body[..], b"/public #1");
        }
        assert_eq!(origin.hits("/public"), 1);
    })
    .await;
}

#[tokio::test]
async fn no_store_and_private_are_not_stored() {
    deadline(async {
        let (origin, proxy) = setup().await;
        for path in ["/no-store", "/private"] {
            for n in 1..=2 {
                let (resp, body) = get(&proxy, path, &[]).await;
                assert_eq!(resp.status(), StatusCode::OK);
                assert_eq!(body, format!("{path} #{n}"), "never served from the cache");
            }
            assert_eq!(origin.hits(path), 2);
            assert!(!proxy.layer.cache().contains_key(path));
        }
    })
    .await;
}

#[tokio::test]
async fn authorization_responses_are_stored_only_when_public_or_s_maxage() {
    deadline(async {
        let (origin, proxy) = setup().await;
        let auth = [("authorization", "Bearer alice")];
        for n in 1..=2 {
            let (_, body) = get(&proxy, "/auth", &auth).await;
            assert_eq!(body, format!("/auth #{n}"));
        }
        assert_eq!(origin.hits("/auth"), 2, "max-age alone does not allow it");
        // Another client, without credentials, does not get alice's response either.
        let (_, body) = get(&proxy, "/auth", &[]).await;
        assert_eq!(body, "/auth #3");

        for path in ["/auth-public", "/auth-s-maxage"] {
            for _ in 0..2 {
                let (_, body) = get(&proxy, path, &auth).await;
                assert_eq!(body, format!("{path} #1"));
            }
            assert_eq!(
                origin.hits(path),
                1,
                "{path}: the origin allowed storing it"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn set_cookie_is_passed_through_and_not_stored() {
    deadline(async {
        let (origin, proxy) = setup().await;
        for n in 1..=2 {
            let (resp, body) = get(&proxy, "/cookie", &[]).await;
            assert_eq!(
                hdr(&resp, "set-cookie"),
                Some(format!("session={n}").as_str())
            );
            assert_eq!(body, format!("/cookie #{n}"));
            assert!(
                !proxy.layer.cache().contains_key("/cookie"),
                "not stored (an entry being written counts too)"
            );
        }
        assert_eq!(origin.hits("/cookie"), 2);
    })
    .await;
}

#[tokio::test]
async fn end_to_end_request_headers_are_forwarded_hop_by_hop_ones_dropped() {
    deadline(async {
        let (origin, proxy) = setup().await;
        let headers = [
            ("authorization", "Bearer bob"),
            ("cookie", "id=7"),
            ("x-custom", "kept"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "dropped"),
            ("te", "trailers"),
        ];
        get(&proxy, "/public", &headers).await;
        let seen = origin.last("/public");
        assert_eq!(seen.headers["authorization"], "Bearer bob");
        assert_eq!(seen.headers["cookie"], "id=7");
        assert_eq!(seen.headers["x-custom"], "kept");
        assert!(!seen.headers.contains_key("x-hop"), "{:?}", seen.headers);
        assert!(!seen.headers.contains_key("te"));
        // A pass-through (another method) forwards them too.
        send(&proxy, "POST", "/posted", &headers).await;
        let seen = origin.last("/posted");
        assert_eq!(seen.method, Method::POST);
        assert_eq!(seen.headers["authorization"], "Bearer bob");
        assert!(!seen.headers.contains_key("x-hop"));
    })
    .await;
}

#[tokio::test]
async fn max_age_and_expires_are_the_entry_time_to_live() {
    deadline(async {
        let (origin, proxy) = setup().await;
        for path in ["/short", "/expires"] {
            let (_, body) = get(&proxy, path, &[]).await;
            assert_eq!(body, format!("{path} #1"));
            until_finished(&proxy.layer, path).await;
            let info = proxy.layer.cache().entry_info(path).unwrap();
            let ttl = info.expires.unwrap() - info.finished.unwrap();
            assert!(ttl <= 1000, "{path}: time to live {ttl} ms");
            let (_, body) = get(&proxy, path, &[]).await;
            assert_eq!(body, format!("{path} #1"), "fresh: a hit");
        }
        sleep(Duration::from_millis(2100)).await;
        for path in ["/short", "/expires"] {
            let (_, body) = get(&proxy, path, &[]).await;
            assert_eq!(body, format!("{path} #2"), "{path}: stale, refetched");
            assert_eq!(origin.hits(path), 2);
        }
    })
    .await;
}

#[tokio::test]
async fn stale_entries_are_revalidated_and_refreshed_on_304() {
    deadline(async {
        let (origin, proxy) = setup().await;
        for (path, validator) in [
            ("/etag", "if-none-match"),
            ("/last-modified", "if-modified-since"),
            ("/bare-304", "if-modified-since"),
        ] {
            let (resp, body) = get(&proxy, path, &[]).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(body, format!("{path} body"));
            until_finished(&proxy.layer, path).await;
            let info = proxy.layer.cache().entry_info(path).unwrap();
            let ttl = info.expires.unwrap() - info.finished.unwrap();
            let keep = CacheConfig::default().keep_stale.as_millis() as u64;
            assert!(
                ttl > keep && ttl <= keep + 1000,
                "kept stale for revalidation: {ttl}"
            );
            sleep(Duration::from_millis(1100)).await;
            let (resp, body) = get(&proxy, path, &[]).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(
                body,
                format!("{path} body"),
                "{path}: the stored body, refreshed"
            );
            assert_eq!(origin.hits(path), 2);
            assert!(
                origin.last(path).headers.contains_key(validator),
                "{path}: revalidated with {validator}"
            );
            // Refreshed: fresh again for max-age, so the next request is a plain hit.
            let (_, body) = get(&proxy, path, &[]).await;
            assert_eq!(body, format!("{path} body"));
            assert_eq!(origin.hits(path), 2, "{path}: the 304 made it fresh again");
        }
    })
    .await;
}

/// Concurrent requests for a stale entry revalidate it once: one conditional request, the
/// others wait for its answer (here the origin takes 300 ms to send its 304).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stale_requests_revalidate_once() {
    deadline(async {
        let (origin, proxy) = setup().await;
        assert_eq!(get(&proxy, "/etag-slow", &[]).await.1, "/etag-slow body");
        until_finished(&proxy.layer, "/etag-slow").await;
        sleep(Duration::from_millis(1100)).await;
        let proxy = Arc::new(proxy);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let proxy = proxy.clone();
            tasks.push(tokio::spawn(
                async move { get(&proxy, "/etag-slow", &[]).await },
            ));
        }
        for t in tasks {
            let (resp, body) = t.await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(body, "/etag-slow body");
        }
        assert_eq!(origin.hits("/etag-slow"), 2, "one fill, one revalidation");
    })
    .await;
}

/// A client's `Cache-Control: no-cache` makes even a fresh entry revalidate (RFC 9111
/// 5.2.1.4); the 304 lets the stored body answer it.
#[tokio::test]
async fn client_no_cache_revalidates_a_fresh_entry() {
    deadline(async {
        let (origin, proxy) = setup().await;
        assert_eq!(get(&proxy, "/etag60", &[]).await.1, "/etag60 body");
        until_finished(&proxy.layer, "/etag60").await;
        assert_eq!(get(&proxy, "/etag60", &[]).await.1, "/etag60 body");
        assert_eq!(origin.hits("/etag60"), 1, "fresh: a hit");
        let (resp, body) = get(&proxy, "/etag60", &[("cache-control", "no-cache")]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body, "/etag60 body");
        assert_eq!(origin.hits("/etag60"), 2);
        assert_eq!(origin.last("/etag60").headers["if-none-match"], "\"v1\"");
        assert_eq!(get(&proxy, "/etag60", &[]).await.1, "/etag60 body");
        assert_eq!(origin.hits("/etag60"), 2, "still stored");
    })
    .await;
}

#[tokio::test]
async fn head_is_answered_from_the_cache_or_passed_through() {
    deadline(async {
        let (origin, proxy) = setup().await;
        // Not stored yet: passed through (and it stores nothing).
        let (resp, body) = send(&proxy, "HEAD", "/head", &[]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(body.is_empty());
        assert_eq!(origin.last("/head").method, Method::HEAD);
        let (_, body) = get(&proxy, "/head", &[]).await;
        assert_eq!(body, "GET /head");
        assert_eq!(origin.hits("/head"), 2);
        until_finished(&proxy.layer, "/head").await;
        // Stored: from the cache, with the entity's length.
        let (resp, body) = send(&proxy, "HEAD", "/head", &[]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(hdr(&resp, "content-length"), Some("9"));
        assert_eq!(hdr(&resp, "cache-control"), Some("max-age=60"));
        assert!(body.is_empty());
        assert_eq!(origin.hits("/head"), 2, "HEAD was a hit");
    })
    .await;
}

#[tokio::test]
async fn client_conditional_requests_get_304() {
    deadline(async {
        let (origin, proxy) = setup().await;
        get(&proxy, "/etag", &[]).await;
        get(&proxy, "/last-modified", &[]).await;
        let cases = [
            (
                "/etag",
                ("if-none-match", "\"v1\""),
                StatusCode::NOT_MODIFIED,
            ),
            (
                "/etag",
                ("if-none-match", "W/\"v1\", \"x\""),
                StatusCode::NOT_MODIFIED,
            ),
            ("/etag", ("if-none-match", "\"v0\""), StatusCode::OK),
            (
                "/last-modified",
                ("if-modified-since", "Tue, 01 Dec 2026 10:00:00 GMT"),
                StatusCode::NOT_MODIFIED,
            ),
            (
                "/last-modified",
                ("if-modified-since", "Mon, 30 Nov 2026 10:00:00 GMT"),
                StatusCode::OK,
            ),
        ];
        for (path, cond, want) in cases {
            let (resp, body) = get(&proxy, path, &[cond]).await;
            assert_eq!(resp.status(), want, "{path} {cond:?}");
            if want == StatusCode::NOT_MODIFIED {
                assert!(body.is_empty());
                assert!(hdr(&resp, "etag").is_some() || hdr(&resp, "last-modified").is_some());
            } else {
                assert_eq!(body, format!("{path} body"));
            }
        }
        assert_eq!(origin.hits("/etag"), 1, "answered by the cache");
        assert_eq!(origin.hits("/last-modified"), 1);
    })
    .await;
}

#[tokio::test]
async fn vary_stores_one_entry_per_variant() {
    deadline(async {
        let (origin, proxy) = setup().await;
        let (en, fr) = ([("x-lang", "en")], [("x-lang", "fr")]);
        assert_eq!(get(&proxy, "/vary", &en).await.1, "lang=en #1");
        assert_eq!(origin.last("/vary").headers["x-lang"], "en", "forwarded");
        assert_eq!(get(&proxy, "/vary", &fr).await.1, "lang=fr #2");
        assert_eq!(origin.last("/vary").headers["x-lang"], "fr");
        until_finished(&proxy.layer, "\0vary\0/vary").await;
        for _ in 0..2 {
            assert_eq!(get(&proxy, "/vary", &en).await.1, "lang=en #1");
            assert_eq!(get(&proxy, "/vary", &fr).await.1, "lang=fr #2");
        }
        assert_eq!(get(&proxy, "/vary", &[]).await.1, "lang=none #3");
        assert_eq!(origin.hits("/vary"), 3);
    })
    .await;
}

#[tokio::test]
async fn vary_herd_asks_the_origin_once_per_variant() {
    deadline(async {
        let (origin, proxy) = setup().await;
        let mut tasks = Vec::new();
        let proxy = Arc::new(proxy);
        for i in 0..8 {
            let proxy = proxy.clone();
            tasks.push(tokio::spawn(async move {
                let lang = if i % 2 == 0 { "en" } else { "fr" };
                let (_, body) = get(&proxy, "/vary", &[("x-lang", lang)]).await;
                (lang, body)
            }));
        }
        for t in tasks {
            let (lang, body) = t.await.unwrap();
            assert!(
                body.starts_with(format!("lang={lang} ").as_bytes()),
                "{body:?}"
            );
        }
        // A joiner that raced the first response may ask once more for its variant.
        assert!(origin.hits("/vary") <= 4, "{}", origin.hits("/vary"));
    })
    .await;
}

#[tokio::test]
async fn uncacheable_responses_are_streamed_through_untouched() {
    deadline(async {
        let (origin, proxy) = setup().await;
        for _ in 0..2 {
            let (resp, body) = get(&proxy, "/error", &[]).await;
            assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(hdr(&resp, "x-origin"), Some("yes"));
            assert_eq!(&body[..], b"origin failed");
        }
        assert_eq!(origin.hits("/error"), 2);
    })
    .await;
}

#[tokio::test]
async fn unsafe_methods_invalidate_the_url() {
    deadline(async {
        let (origin, proxy) = setup().await;
        get(&proxy, "/doc", &[]).await;
        get(&proxy, "/doc", &[]).await;
        assert_eq!(origin.hits("/doc"), 1);
        let (resp, _) = send(&proxy, "POST", "/doc", &[]).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        get(&proxy, "/doc", &[]).await;
        assert_eq!(
            origin.hits("/doc"),
            3,
            "POST, then the GET went to the origin"
        );
    })
    .await;
}

#[tokio::test]
async fn purge_is_off_by_default_and_loopback_only_when_on() {
    deadline(async {
        let (origin, proxy) = setup().await;
        get(&proxy, "/p", &[]).await;
        let (resp, body) = send(&proxy, "PURGE", "/p", &[]).await;
        assert_eq!(
            origin.last("/p").method.as_str(),
            "PURGE",
            "off: passed through"
        );
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(body, "PURGE /p");
        get(&proxy, "/p", &[]).await;
        assert_eq!(origin.hits("/p"), 2, "still cached");

        let mut config = CacheConfig::default();
        config.purge = Purge::Loopback;
        let on = self::proxy(&origin, config).await;
        get(&on, "/q", &[]).await;
        let (resp, _) = send(&on, "PURGE", "/q", &[]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let (resp, _) = send(&on, "PURGE", "/q", &[]).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "gone");
        get(&on, "/q", &[]).await;
        assert_eq!(origin.hits("/q"), 2, "refetched after the purge");
        assert!(
            origin
                .seen
                .lock()
                .unwrap()
                .iter()
                .all(|s| s.method.as_str() != "PURGE" || s.path == "/p")
        );
    })
    .await;
}

/// Without a loopback client address (a non-loopback peer, or no address known), a purge
/// is refused under [`Purge::Loopback`].
#[tokio::test]
async fn purge_refuses_other_clients() {
    use tower_service::Service;
    deadline(async {
        let origin = Origin::start(script_by_path).await;
        let cache = Cache::builder().memory().build().unwrap();
        let mut config = CacheConfig::default();
        config.purge = Purge::Loopback;
        let layer = CacheLayer::with_config(cache, config);
        let upstream = Upstream::new(format!("http://{}", origin.addr).parse().unwrap()).unwrap();
        let mut svc = layer.layer(upstream);
        let req = |method: &str, addr: Option<&str>| {
            let mut req = Request::builder()
                .method(method)
                .uri("/x")
                .body(Empty::<Bytes>::new())
                .unwrap();
            if let Some(a) = addr {
                req.extensions_mut()
                    .insert(streamcache_http::ClientAddr(a.parse().unwrap()));
            }
            req
        };
        svc.call(req("GET", None))
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap();
        for addr in [None, Some("192.0.2.7:5000")] {
            let resp = svc.call(req("PURGE", addr)).await.unwrap();
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{addr:?}");
        }
        assert!(layer.cache().contains_key("/x"));
        let resp = svc.call(req("PURGE", Some("[::1]:5000"))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(!layer.cache().contains_key("/x"));
    })
    .await;
}
