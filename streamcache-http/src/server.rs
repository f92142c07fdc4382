//! Serving a service over HTTP/1 with per-connection limits: [`serve`] and [`ConnLimits`].

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower_service::Service;

use crate::body::{BoxError, RequestBody, ResponseBody};
use crate::layer::ClientAddr;

/// What one client connection may hold. A connection that breaks a time limit is closed at
/// once (no response): a client that never finishes its request head, stays idle, or stops
/// reading cannot hold a descriptor (and a cache reader) for ever.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Longest time to receive a whole request head, counted from the accept (a new
    /// connection owes a request at once) or from the first byte of a later request. (Default: 10 s.)
    pub head_timeout: Duration,
    /// Longest time a keep-alive connection may wait between requests with nothing sent, and
    /// longest time a response may stay blocked on a client that reads nothing. (Default: 60 s.)
    pub idle_timeout: Duration,
    /// Most client connections served at once. Past it the server stops accepting: new
    /// connections wait in the listen backlog (in the kernel, costing no descriptor) until
    /// a served one closes. (Default: 1024.)
    pub max_connections: usize,
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

/// Serves HTTP/1 on `listener` until `shutdown` resolves; then drops every open connection
/// (and with them their cache readers) before returning. Upstream downloads already started
/// run on to their end in their own tasks.
///
/// At most [`ConnLimits::max_connections`] connections are served at once: at the cap the
/// loop stops accepting until one closes, so further clients wait in the kernel's listen
/// backlog (and are served in turn) instead of costing a descriptor each. Each connection
/// runs under the time limits of `limits`.
///
/// On Linux, plain `GET`s whose responses declare their length are answered by the server
/// itself, and bodies that are a finished disk entry's checked bytes
/// ([`ResponseBody::file_range`], which [`CacheService`](crate::CacheService) returns for
/// hits of requests from this server) are sent with `sendfile(2)`: no byte passes through
/// user space, as with nginx's `sendfile on`. A connection is served that way, request after
/// request, until one needs anything else (another method, a response of unknown length);
/// hyper then serves the rest of it. The service sees the same requests either way (with a
/// [`RequestBody`], empty for the bodiless requests the server parses itself).
///
/// # Errors
/// None today: accept errors are logged and retried.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
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
                let service = service.clone();
                conns.spawn(async move {
                    let _permit = permit; // held as long as the connection
                    serve_connection(stream, peer, service, limits).await;
                });
            }
        }
    }
    conns.shutdown().await;
    Ok(())
}

/// Serves one connection: on the zero-copy path while its requests take it (Linux), then
/// with hyper.
async fn serve_connection<S>(
    stream: TcpStream,
    peer: SocketAddr,
    #[cfg_attr(not(target_os = "linux"), allow(unused_mut))] mut service: S,
    limits: ConnLimits,
) where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    #[cfg(target_os = "linux")]
    let (stream, buffered, preloaded) =
        match crate::fast::serve(stream, peer, &mut service, limits).await {
            Some(h) => (h.stream, h.buffered, h.response),
            None => return,
        };
    #[cfg(not(target_os = "linux"))]
    let (buffered, preloaded) = (Bytes::new(), None);
    let state = Arc::new(Mutex::new(ConnState::new()));
    let io = TokioIo::new(WatchedIo {
        inner: stream,
        buffered,
        state: state.clone(),
    });
    let svc_state = state.clone();
    // The answer to the first request hyper reads, when the zero-copy path already asked the
    // service for it (the request's head is the first of the replayed bytes).
    let preloaded = Mutex::new(preloaded);
    let svc = service_fn(move |req: Request<Incoming>| {
        let mut service = service.clone();
        let guard = InFlight::begin(&svc_state);
        let ready = preloaded.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut req = req.map(RequestBody::from);
        req.extensions_mut().insert(ClientAddr(peer));
        async move {
            let resp = match ready {
                Some(resp) => resp,
                None => {
                    poll_fn(|cx| service.poll_ready(cx)).await?;
                    service.call(req).await?
                }
            };
            Ok::<_, Infallible>(resp.map(|body| Guarded {
                body,
                _guard: guard,
            }))
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
    body: ResponseBody,
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
/// writes blocked on a client that does not read. Reads start with `buffered`, the bytes
/// the zero-copy path read and did not consume.
struct WatchedIo {
    inner: TcpStream,
    buffered: Bytes,
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
        if !self.buffered.is_empty() {
            // Replayed bytes: the head of a request already counted as begun.
            let n = self.buffered.len().min(buf.remaining());
            buf.put_slice(&self.buffered.split_to(n));
            return Poll::Ready(Ok(()));
        }
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
