//! An HTTP caching layer on [`streamcache`]: a [`tower_layer::Layer`] ([`CacheLayer`]) that
//! caches the responses of any inner `tower` service (a reverse proxy's [`Upstream`], an
//! application's handler) by the rules of a shared HTTP cache (RFC 9111), with the library's
//! one-producer streaming: the first request of a key asks the inner service, and every
//! concurrent or later request streams the same entry, also while it is still being written.
//!
//! * **What is stored** is decided by [`http_cache_semantics`] (RFC 7234/9111, shared cache):
//!   `no-store` and `private` responses are not stored, nor responses to requests with
//!   `Authorization` unless `public`, `s-maxage` or `must-revalidate` allow it. On top of
//!   that, only `200` responses whose end can be proved (a `Content-Length`, chunked, or a
//!   service's own body) are stored, never one that sets a cookie (`Set-Cookie` reaches its
//!   client) or has `Vary: *`. Everything else is streamed through untouched (hop-by-hop
//!   headers aside). Requests that joined a fill that turns out not storable ask the inner
//!   service themselves.
//! * **Freshness** (`max-age`, `s-maxage`, `Expires`, heuristics) becomes the entry's own
//!   time to live ([`streamcache::Writer::set_time_to_live`]), plus
//!   [`CacheConfig::keep_stale`] for responses with a validator. A stale entry is
//!   revalidated with `If-None-Match` / `If-Modified-Since`; a `304` refreshes its head (the
//!   body is copied locally into the refreshed entry, not fetched again); a new response
//!   replaces it. Concurrent requests for an entry that turned stale send one conditional
//!   request: the others wait for its outcome and read what it stored.
//! * **Vary**: a response that varies is stored under a key made of its URL and the values of
//!   the request headers it varies on; a small "vary index" entry per URL records the header
//!   names.
//! * **Requests**: `GET` is served from the cache or fills it; `HEAD` is answered from a
//!   stored response, or passed through (it never fills). Client validators
//!   (`If-None-Match`, `If-Modified-Since`) get `304` when they match the stored response;
//!   a single `Range` gets `206`, waiting only for the bytes it needs. Other methods are
//!   passed through, and a successful unsafe one (`POST`, `PUT`, `DELETE`…) invalidates its
//!   URL. `PURGE` removes a URL's entries when [`CacheConfig::purge`] allows it (off by
//!   default; [`Purge::Loopback`] for loopback clients only).
//! * **Failures**: an inner service that fails or falls silent for
//!   [`CacheConfig::upstream_timeout`] mid-body aborts the entry: clients already streaming it
//!   see their response end in error (hyper cuts the connection), never a clean short body.
//!
//! The cache key is the path and query (one layer serves one origin; `Host` is not in it).
//!
//! [`serve`] runs a service on a listener with per-connection limits ([`ConnLimits`]), and
//! on Linux sends hits of finished disk entries with `sendfile`; the repository's
//! `examples/proxy.rs` is a caching reverse proxy made of these pieces.
//!
//! ```
//! use std::convert::Infallible;
//! use std::future::{Ready, ready};
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::task::{Context, Poll};
//!
//! use http_body_util::{BodyExt, Full};
//! use streamcache_http::CacheLayer;
//! use tower_layer::Layer;
//! use tower_service::Service;
//!
//! /// An application handler that counts its calls.
//! #[derive(Clone)]
//! struct Hello(Arc<AtomicUsize>);
//!
//! impl Service<http::Request<()>> for Hello {
//!     type Response = http::Response<Full<bytes::Bytes>>;
//!     type Error = Infallible;
//!     type Future = Ready<Result<Self::Response, Infallible>>;
//!     fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
//!         Poll::Ready(Ok(()))
//!     }
//!     fn call(&mut self, _req: http::Request<()>) -> Self::Future {
//!         self.0.fetch_add(1, Ordering::SeqCst);
//!         let resp = http::Response::builder()
//!             .header("cache-control", "max-age=60")
//!             .body(Full::from("hello"))
//!             .unwrap();
//!         ready(Ok(resp))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), streamcache_http::BoxError> {
//! let cache = streamcache::Cache::builder().memory().build()?;
//! let calls = Arc::new(AtomicUsize::new(0));
//! let mut service = CacheLayer::new(cache).layer(Hello(calls.clone()));
//! for _ in 0..3 {
//!     let req = http::Request::get("/greeting").body(())?;
//!     let resp = service.call(req).await?;
//!     assert_eq!(resp.headers()["cache-control"], "max-age=60");
//!     let body = resp.into_body().collect().await?.to_bytes();
//!     assert_eq!(&body[..], b"hello");
//! }
//! assert_eq!(calls.load(Ordering::SeqCst), 1, "one call, two hits");
//! # Ok(())
//! # }
//! ```

mod body;
#[cfg(target_os = "linux")]
mod fast;
mod layer;
mod meta;
mod server;
mod upstream;

pub use body::{BoxError, RequestBody, ResponseBody};
pub use layer::{
    CacheConfig, CacheLayer, CacheService, CacheStatus, ClientAddr, CloseDelimited, Purge,
};
pub use meta::RangeSpec;
pub use server::{ConnLimits, serve};
pub use upstream::Upstream;
