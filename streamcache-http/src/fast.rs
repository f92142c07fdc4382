//! The zero-copy path of [`serve`](crate::serve) (Linux): bodiless `GET` requests whose
//! response declares its length are answered here, the head written by this module and the
//! body, when it is a finished disk entry's checked bytes ([`ResponseBody::file_range`]),
//! sent with `sendfile(2)`, without copying a byte through user space. hyper 1 writes every
//! body through its own buffers, so such a response cannot go through it. Other bodies of a
//! declared length (an entry not checked yet since a restart, a memory entry) are written
//! from their frames, so that a connection stays on this path.
//!
//! A connection starts here. The server reads each request head itself (with `httparse`,
//! as hyper does) and, if it is a plain `GET` (HTTP/1.1, no body, no `Expect` nor upgrade),
//! calls the service with it. When the response has a `Content-Length` that its body
//! matches exactly, it is sent here and the loop goes on with the next request. At the
//! first request or response this path does not take (any other method or version, a
//! malformed head, a response of unknown length such as a fill streamed as chunks, a 304…),
//! the connection is handed over to hyper for the rest of its life: the bytes read so far
//! are replayed to hyper, and a response already made is given to hyper as the answer to
//! that first request, so the service is never called twice for one request. A body that
//! fails or ends short closes the connection, as hyper does: the client sees the response
//! broken, never complete.
//!
//! Time limits are those of [`ConnLimits`]: the request head within `head_timeout` of the
//! accept (or of its first byte, for later requests), the next request within
//! `idle_timeout` of the last response, and a client that reads nothing for `idle_timeout`
//! loses its connection.
//!
//! `sendfile` reads the file in the calling thread: an entry whose pages left the page cache
//! is read from disk on a runtime worker, as nginx does without its thread pools. The
//! entries sent this way were read (and checked) recently, so their pages usually are there.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use streamcache::storage::FileRange;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tower_service::Service;

use crate::body::{RequestBody, ResponseBody};
use crate::layer::{ClientAddr, SendsFiles};
use crate::server::ConnLimits;

/// Longest request head read here; a longer one goes to hyper (which answers 431).
const MAX_HEAD: usize = 16 * 1024;
/// Most request headers read here; more go to hyper.
const MAX_HEADERS: usize = 64;
/// Bytes sent between two yields to the runtime: a client that reads as fast as the
/// kernel sends does not keep a worker from its other connections.
const YIELD_EVERY: u64 = 8 << 20;

/// What hyper takes over: the socket, the bytes read from it and not consumed (the head
/// of the request it answers first, and any after it), and the response to that request
/// if the service already made it.
pub(crate) struct Handover {
    pub(crate) stream: TcpStream,
    pub(crate) buffered: Bytes,
    pub(crate) response: Option<Response<ResponseBody>>,
}

/// Serves requests on `stream` while they take the zero-copy path. Returns what hyper needs
/// to go on, or `None` once the connection is done (closed by the client, timed out, or
/// broken while sending).
pub(crate) async fn serve<S>(
    mut stream: TcpStream,
    peer: SocketAddr,
    service: &mut S,
    limits: ConnLimits,
) -> Option<Handover>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>, Error = Infallible>,
{
    let mut buf = BytesMut::with_capacity(4096);
    // When the request head must be complete (`idle`: when its first byte must have come).
    let mut deadline = Instant::now() + limits.head_timeout;
    let mut idle = false;
    loop {
        let head = loop {
            match parse(&buf) {
                Parsed::Head(head) => break head,
                Parsed::Partial if buf.len() < MAX_HEAD => {}
                Parsed::Partial | Parsed::Other => {
                    return Some(Handover {
                        stream,
                        buffered: buf.freeze(),
                        response: None,
                    });
                }
            }
            match tokio::time::timeout_at(deadline.into(), stream.read_buf(&mut buf)).await {
                Err(_) => {
                    let why = if idle {
                        "idle keep-alive connection"
                    } else {
                        "request head not received in time"
                    };
                    tracing::debug!(%peer, "connection closed: {why}");
                    return None;
                }
                Ok(Ok(0) | Err(_)) => return None,
                Ok(Ok(_)) if idle => {
                    idle = false;
                    deadline = Instant::now() + limits.head_timeout;
                }
                Ok(Ok(_)) => {}
            }
        };
        let mut req = Request::new(RequestBody::empty());
        *req.uri_mut() = head.uri;
        *req.headers_mut() = head.headers;
        req.extensions_mut().insert(ClientAddr(peer));
        req.extensions_mut().insert(SendsFiles);
        let Ok(()) = poll_fn(|cx| service.poll_ready(cx)).await;
        let Ok(resp) = service.call(req).await;
        let (parts, body) = resp.into_parts();
        let Some(len) = declared_len(&parts) else {
            return Some(handover(stream, buf, Response::from_parts(parts, body)));
        };
        // (A file body's size hint is its range's length.)
        if body.size_hint().exact() != Some(len) {
            return Some(handover(stream, buf, Response::from_parts(parts, body)));
        }
        buf.advance(head.len);
        let out = encode_head(&parts, head.close);
        let idle_limit = limits.idle_timeout;
        let sent = match body.into_file() {
            Ok((range, reader)) => {
                let sent = send_file(&stream, &out, &range, idle_limit).await;
                drop(reader); // the entry was in use until its bytes were sent
                sent
            }
            Err(body) => send_body(&stream, &out, body, len, idle_limit).await,
        };
        if let Err(e) = sent {
            tracing::debug!(%peer, error = %e, "connection ended in error");
            return None;
        }
        if head.close {
            let _ = stream.shutdown().await;
            return None;
        }
        idle = buf.is_empty();
        deadline = Instant::now()
            + if idle {
                limits.idle_timeout
            } else {
                limits.head_timeout
            };
    }
}

fn handover(stream: TcpStream, buf: BytesMut, resp: Response<ResponseBody>) -> Handover {
    Handover {
        stream,
        buffered: buf.freeze(),
        response: Some(resp),
    }
}

/// A request head this path serves.
#[derive(Debug)]
struct Head {
    /// Its length in the buffer.
    len: usize,
    uri: Uri,
    headers: HeaderMap,
    /// The client asked to close after the response (`Connection: close`).
    close: bool,
}

#[derive(Debug)]
enum Parsed {
    Head(Head),
    /// Not a whole head yet.
    Partial,
    /// A head for hyper: not a plain HTTP/1.1 `GET` without body, or malformed.
    Other,
}

/// Parses the request head at the start of `buf`.
fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    if req.method != Some("GET") || req.version != Some(1) {
        return Parsed::Other;
    }
    let Some(path) = req.path.filter(|p| p.starts_with('/')) else {
        return Parsed::Other;
    };
    let Ok(uri) = Uri::try_from(path) else {
        return Parsed::Other;
    };
    let mut map = HeaderMap::with_capacity(req.headers.len());
    let mut close = false;
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::Other;
        };
        if name == header::CONTENT_LENGTH {
            if value.as_bytes().trim_ascii() != b"0" {
                return Parsed::Other;
            }
        } else if name == header::TRANSFER_ENCODING
            || name == header::EXPECT
            || name == header::UPGRADE
        {
            return Parsed::Other;
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Parsed::Other;
                }
            }
        }
        map.append(name, value);
    }
    Parsed::Head(Head {
        len,
        uri,
        headers: map,
        close,
    })
}

/// The body length a response declares, if this path can send it: `Content-Length`, no
/// transfer coding, and a status whose responses carry a body (not 1xx, 204 or 304, whose
/// framing hyper knows best).
fn declared_len(parts: &http::response::Parts) -> Option<u64> {
    let status = parts.status;
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || parts.headers.contains_key(header::TRANSFER_ENCODING)
    {
        return None;
    }
    let mut lengths = parts.headers.get_all(header::CONTENT_LENGTH).iter();
    let len = lengths.next()?.to_str().ok()?.trim().parse().ok()?;
    lengths.next().is_none().then_some(len)
}

/// The response head as HTTP/1.1 bytes, with a `Date` (as hyper adds) and, when the client
/// asked for it, `Connection: close`.
fn encode_head(parts: &http::response::Parts, close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        with_date(|d| out.extend_from_slice(d.as_bytes()));
        out.extend_from_slice(b"\r\n");
    }
    if close && !parts.headers.contains_key(header::CONNECTION) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Calls `f` with the current HTTP date, formatted once per second per thread.
fn with_date(f: impl FnOnce(&str)) {
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        f(text);
    });
}

/// Sends `head`, then `body`, which must deliver exactly `len` bytes; fails if it does not
/// (or fails itself: an entry aborted mid-stream), or if the client reads nothing for
/// `idle`. On failure the caller closes the connection, so the client sees the response
/// broken, never complete.
async fn send_body(
    stream: &TcpStream,
    head: &[u8],
    mut body: ResponseBody,
    len: u64,
    idle: Duration,
) -> io::Result<()> {
    write_all(stream, head, idle).await?;
    let (mut sent, mut since_yield) = (0u64, 0u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(io::Error::other)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: HTTP/1.1 has none for a body with Content-Length
        };
        sent += data.len() as u64;
        if sent > len {
            return Err(io::Error::other("body longer than its Content-Length"));
        }
        write_all(stream, &data, idle).await?;
        since_yield += data.len() as u64;
        if since_yield >= YIELD_EVERY {
            since_yield = 0;
            tokio::task::yield_now().await;
        }
    }
    if sent < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "body shorter than its Content-Length",
        ));
    }
    Ok(())
}

/// Writes all of `data`; fails if the client reads nothing for `idle`.
async fn write_all(stream: &TcpStream, mut data: &[u8], idle: Duration) -> io::Result<()> {
    while !data.is_empty() {
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(stream, idle).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `head`, then `range` with `sendfile`; fails if the client reads nothing for
/// `idle`, or if the file is shorter than the range (the response is then cut short, and
/// the caller closes the connection so the client sees it broken).
async fn send_file(
    stream: &TcpStream,
    head: &[u8],
    range: &FileRange,
    idle: Duration,
) -> io::Result<()> {
    use rustix::net::SendFlags;
    let mut rest = head;
    // MSG_MORE: the head leaves in the same segment as the first body bytes. Never without
    // body bytes to follow: the head would wait in the socket for them (about 200 ms here).
    let flags = if range.is_empty() {
        SendFlags::NOSIGNAL
    } else {
        SendFlags::MORE | SendFlags::NOSIGNAL
    };
    while !rest.is_empty() {
        match stream.try_io(Interest::WRITABLE, || {
            rustix::net::send(stream, rest, flags).map_err(io::Error::from)
        }) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(stream, idle).await?,
            Err(e) => return Err(e),
        }
    }
    let mut offset = range.offset();
    let end = range.offset() + range.len();
    let mut since_yield = 0;
    while offset < end {
        let count = usize::try_from(end - offset)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        let before = offset;
        match stream.try_io(Interest::WRITABLE, || {
            rustix::fs::sendfile(stream, range.file(), Some(&mut offset), count)
                .map_err(io::Error::from)
        }) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "entry file shorter than its checked length",
                ));
            }
            Ok(_) => {
                since_yield += offset - before;
                if since_yield >= YIELD_EVERY {
                    since_yield = 0;
                    tokio::task::yield_now().await;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(stream, idle).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn writable(stream: &TcpStream, idle: Duration) -> io::Result<()> {
    match tokio::time::timeout(idle, stream.writable()).await {
        Ok(ready) => ready,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client read nothing for the idle timeout",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::future::{Ready, ready};
    use std::task::{Context, Poll};

    use streamcache::{Cache, Entry};
    use tokio::net::TcpListener;

    use super::*;
    use crate::body::simple;

    const LEN: usize = (3 << 20) + 5;

    fn data() -> Vec<u8> {
        (0..LEN).map(|i| (i % 251) as u8).collect()
    }

    /// Answers `/file` with the file body of its one disk entry, anything else with a
    /// streamed body.
    #[derive(Clone)]
    struct Files {
        cache: std::sync::Arc<Cache>,
        /// Truncated to 1000 bytes right after each range is taken.
        truncate: Option<std::path::PathBuf>,
    }

    impl Files {
        fn new(dir: &std::path::Path) -> Files {
            let cache = Cache::builder().disk(dir).build().unwrap();
            let Ok(Entry::Miss(mut w)) = cache.get_or_create("file") else {
                panic!("fresh cache")
            };
            std::io::Write::write_all(&mut w, &data()).unwrap();
            w.finish().unwrap();
            Files {
                cache: std::sync::Arc::new(cache),
                truncate: None,
            }
        }
    }

    impl Service<Request<RequestBody>> for Files {
        type Response = Response<ResponseBody>;
        type Error = Infallible;
        type Future = Ready<Result<Response<ResponseBody>, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
            assert!(req.extensions().get::<SendsFiles>().is_some());
            if req.uri() == "/known" {
                let mut resp = simple(StatusCode::NOT_FOUND, "streamed");
                resp.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(8));
                return ready(Ok(resp));
            }
            let key = match req.uri().path() {
                "/file" => "file",
                "/empty" => "empty",
                // No Content-Length: for hyper to frame.
                _ => return ready(Ok(simple(StatusCode::OK, "streamed"))),
            };
            let reader = self.cache.get(key).unwrap().unwrap();
            let len = reader.size().len;
            let mut reader = streamcache::tokio::AsyncReader::from(reader);
            let range = reader.take_file_range(len).expect("vouched at commit");
            if let Some(path) = &self.truncate {
                let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                file.set_len(1000).unwrap();
            }
            let mut resp = Response::new(ResponseBody::file(range, reader));
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            ready(Ok(resp))
        }
    }

    /// Runs the zero-copy path on one accepted connection; returns the client socket and
    /// the path's outcome.
    async fn connect(svc: Files) -> (TcpStream, tokio::task::JoinHandle<Option<Handover>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            let mut svc = svc;
            serve(stream, peer, &mut svc, ConnLimits::default()).await
        });
        (TcpStream::connect(addr).await.unwrap(), served)
    }

    /// Everything the server sends until it closes the connection.
    async fn read_to_close(client: &mut TcpStream) -> Vec<u8> {
        let mut all = Vec::new();
        tokio::time::timeout(DEADLINE, client.read_to_end(&mut all))
            .await
            .expect("the server closes the connection")
            .unwrap();
        all
    }

    /// How the zero-copy path ended.
    async fn outcome(served: tokio::task::JoinHandle<Option<Handover>>) -> Option<Handover> {
        tokio::time::timeout(DEADLINE, served)
            .await
            .unwrap()
            .unwrap()
    }

    /// Splits `n` HTTP responses with `content-length` off `bytes`: (head, body) each.
    fn responses(mut bytes: &[u8], n: usize) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for _ in 0..n {
            let end = bytes
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("a head")
                + 4;
            let head = String::from_utf8(bytes[..end].to_vec()).unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .expect("a length")
                .trim()
                .parse()
                .unwrap();
            out.push((head, bytes[end..end + len].to_vec()));
            bytes = &bytes[end + len..];
        }
        assert!(
            bytes.is_empty(),
            "{} bytes after the responses",
            bytes.len()
        );
        out
    }

    /// Pipelined GETs of a file body are all answered here, with the entry's bytes, and
    /// `Connection: close` ends the connection without a handover to hyper.
    #[tokio::test]
    async fn file_bodies_are_sent_here_request_after_request() {
        let dir = tempfile::tempdir().unwrap();
        let (mut client, served) = connect(Files::new(dir.path())).await;
        client
            .write_all(b"GET /file HTTP/1.1\r\nHost: x\r\n\r\nGET /file HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut first = vec![0u8; LEN];
        // Read some of it before the last request: it is sent while the others are answered.
        client.read_exact(&mut first).await.unwrap();
        client
            .write_all(b"GET /file HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut all = first;
        all.extend(read_to_close(&mut client).await);
        let got = responses(&all, 3);
        for (i, (head, body)) in got.iter().enumerate() {
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(body[..] == data()[..], "response {i}: the entry's bytes");
            assert_eq!(head.contains("connection: close"), i == 2, "{head}");
        }
        let outcome = outcome(served).await;
        assert!(outcome.is_none(), "served here to the end, not handed over");
    }

    /// An empty entry's file body: a head with `Content-Length: 0` and nothing after it.
    /// (This cannot tell whether the head was held back: with MSG_MORE and no body bytes it
    /// left about 200 ms late, the kernel's cork limit, which no deadline here may assert.)
    #[tokio::test]
    async fn an_empty_file_body_is_a_head_alone() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path());
        let Ok(Entry::Miss(w)) = files.cache.get_or_create("empty") else {
            panic!("fresh key")
        };
        w.finish().unwrap();
        let (mut client, _served) = connect(files).await;
        client
            .write_all(b"GET /empty HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        while !got.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk))
                .await
                .expect("the head arrives")
                .unwrap();
            assert!(n > 0, "closed before the head");
            got.extend_from_slice(&chunk[..n]);
        }
        let head = String::from_utf8(got).unwrap();
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"),
            "{head}"
        );
    }

    /// Any body of a declared length is sent here too (read from its body, not with
    /// `sendfile`), interleaved with file bodies on one connection.
    #[tokio::test]
    async fn bodies_of_declared_length_are_sent_here_too() {
        let dir = tempfile::tempdir().unwrap();
        let (mut client, served) = connect(Files::new(dir.path())).await;
        client
            .write_all(b"GET /known HTTP/1.1\r\n\r\nGET /file HTTP/1.1\r\n\r\nGET /known HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let all = read_to_close(&mut client).await;
        let got = responses(&all, 3);
        assert!(
            got[0].0.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{}",
            got[0].0
        );
        assert_eq!(got[0].1, b"streamed");
        assert!(got[1].1[..] == data()[..]);
        assert_eq!(got[2].1, b"streamed");
        let outcome = outcome(served).await;
        assert!(outcome.is_none(), "served here to the end, not handed over");
    }

    /// A response this path cannot frame (no `Content-Length`) goes to hyper with the
    /// request's head (to be read again) and everything after it, and the response itself:
    /// the service is not asked twice.
    #[tokio::test]
    async fn other_responses_hand_the_connection_over() {
        let dir = tempfile::tempdir().unwrap();
        let (mut client, served) = connect(Files::new(dir.path())).await;
        let sent = b"GET /file HTTP/1.1\r\n\r\nGET /other HTTP/1.1\r\n\r\nGET /file HT";
        client.write_all(sent).await.unwrap();
        // Read on meanwhile: the first response (3 MiB) need not fit in the socket buffers.
        let drain = tokio::spawn(async move {
            let mut all = Vec::new();
            let _ = client.read_to_end(&mut all).await;
        });
        let h = outcome(served).await;
        drain.abort();
        let h = h.expect("handed over");
        assert_eq!(
            &h.buffered[..],
            &sent[b"GET /file HTTP/1.1\r\n\r\n".len()..]
        );
        let resp = h.response.expect("the response to /other");
        assert!(resp.body().file_range().is_none());
    }

    /// A request hyper must parse (here a POST) is handed over before the service sees it.
    #[tokio::test]
    async fn other_requests_go_to_hyper_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let (mut client, served) = connect(Files::new(dir.path())).await;
        let sent = b"POST /file HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi";
        client.write_all(sent).await.unwrap();
        let h = outcome(served).await;
        let h = h.expect("handed over");
        assert_eq!(&h.buffered[..], &sent[..]);
        assert!(h.response.is_none());
    }

    /// A file that shrinks after its range was checked (an outside truncation racing the
    /// response) cuts the response: the client gets fewer bytes than announced and the
    /// connection closes, never a response that looks complete.
    #[tokio::test]
    async fn a_file_truncated_after_its_check_cuts_the_response() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Files::new(dir.path());
        let path = walk(dir.path().to_owned())
            .into_iter()
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == LEN as u64))
            .expect("the entry's data file");
        files.truncate = Some(path);
        let (mut client, served) = connect(files).await;
        client
            .write_all(b"GET /file HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let all = read_to_close(&mut client).await;
        let end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(all[..end].starts_with(b"HTTP/1.1 200 OK"));
        assert_eq!(all.len() - end, 1000, "the body is cut where the file ends");
        assert!(outcome(served).await.is_none());
    }

    fn walk(p: std::path::PathBuf) -> Vec<std::path::PathBuf> {
        if p.is_dir() {
            std::fs::read_dir(&p)
                .unwrap()
                .flat_map(|e| walk(e.unwrap().path()))
                .collect()
        } else {
            vec![p]
        }
    }

    const DEADLINE: Duration = Duration::from_secs(30);

    fn head(text: &str) -> Head {
        match parse(text.as_bytes()) {
            Parsed::Head(h) => h,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    fn is_other(text: &str) -> bool {
        matches!(parse(text.as_bytes()), Parsed::Other)
    }

    #[test]
    fn plain_gets_are_parsed_here() {
        let text = "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Two: 1\r\nx-two: 2\r\n\r\nGET /next";
        let h = head(text);
        assert_eq!(h.len, text.find("GET /next").unwrap());
        assert_eq!(h.uri, "/a?b=1");
        assert_eq!(h.headers["host"], "x");
        let two: Vec<_> = h.headers.get_all("x-two").iter().collect();
        assert_eq!(two, ["1", "2"], "repeated headers are all kept, in order");
        assert!(!h.close);
        assert!(head("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n").close);
        assert!(
            head("GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
                .headers
                .contains_key("content-length")
        );
    }

    #[test]
    fn everything_else_goes_to_hyper() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Parsed::Partial
        ));
        assert!(matches!(parse(b""), Parsed::Partial));
        for text in [
            "HEAD / HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://example.com/ HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "GET /\u{1} HTTP/1.1\r\n\r\n",
        ] {
            assert!(is_other(text), "{text:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        assert!(
            is_other(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            "too many headers"
        );
    }

    #[test]
    fn heads_are_written_as_hyper_would() {
        let resp = Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header("content-length", "3")
            .header("x-a", "1")
            .body(())
            .unwrap();
        let (parts, ()) = resp.into_parts();
        let text = String::from_utf8(encode_head(&parts, true)).unwrap();
        assert!(
            text.starts_with(
                "HTTP/1.1 206 Partial Content\r\ncontent-length: 3\r\nx-a: 1\r\ndate: "
            )
        );
        assert!(
            text.ends_with(" GMT\r\nconnection: close\r\n\r\n"),
            "{text}"
        );
        let dated = Response::builder().header("date", "then").body(()).unwrap();
        let (parts, ()) = dated.into_parts();
        let text = String::from_utf8(encode_head(&parts, false)).unwrap();
        assert_eq!(
            text, "HTTP/1.1 200 OK\r\ndate: then\r\n\r\n",
            "a Date of its own is kept"
        );
    }
}
