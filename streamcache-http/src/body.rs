//! Response bodies: an entry streamed from a cache reader, an origin body with a stall limit.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use streamcache::storage::FileRange;
use streamcache::tokio::AsyncReader;

/// The error type of response bodies (and of inner services, once converted).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the cache layer returns: streamed from a cache entry, relayed
/// from the inner service, or a short text of its own. An error ends the response abnormally
/// (hyper cuts the connection), so a broken body never looks complete.
///
/// A response that [`serve`](crate::serve) asked for may carry a finished disk entry's bytes
/// as a [`FileRange`] instead of a stream ([`file_range`](ResponseBody::file_range)), which
/// the server sends with `sendfile`. Any other code that polls such a body gets the bytes
/// read from the file, so wrapping it (in a compression or logging body, then
/// [`ResponseBody::new`]) stays correct: it only gives up the zero-copy send.
pub struct ResponseBody {
    kind: Kind,
}

enum Kind {
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
    /// Boxed: a reader is large, and most bodies are streams.
    File(Box<FileBody>),
}

impl ResponseBody {
    /// Boxes any body.
    pub fn new<B>(body: B) -> ResponseBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        ResponseBody {
            kind: Kind::Boxed(body.map_err(Into::into).boxed_unsync()),
        }
    }

    /// A body of no bytes.
    pub fn empty() -> ResponseBody {
        ResponseBody::new(http_body_util::Empty::new())
    }

    /// A body of `range`'s bytes, vouched for by `reader`'s storage; `reader` is kept so
    /// that the entry stays in use while the body lives.
    pub(crate) fn file(range: FileRange, reader: AsyncReader) -> ResponseBody {
        ResponseBody {
            kind: Kind::File(Box::new(FileBody {
                range,
                sent: 0,
                reader,
            })),
        }
    }

    /// The file bytes this body consists of, if it is a whole file range that nothing has
    /// polled yet (see the type's documentation).
    pub fn file_range(&self) -> Option<&FileRange> {
        match &self.kind {
            Kind::File(f) if f.sent == 0 => Some(&f.range),
            _ => None,
        }
    }

    /// The file range and the reader that keeps its entry in use, if this is an unpolled
    /// file body; else the body back.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(crate) fn into_file(self) -> Result<(FileRange, AsyncReader), ResponseBody> {
        match self.kind {
            Kind::File(f) if f.sent == 0 => {
                let FileBody { range, reader, .. } = *f;
                Ok((range, reader))
            }
            kind => Err(ResponseBody { kind }),
        }
    }
}

impl Default for ResponseBody {
    fn default() -> ResponseBody {
        ResponseBody::empty()
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Boxed(_) => f.write_str("ResponseBody::Stream"),
            Kind::File(b) => f
                .debug_struct("ResponseBody::File")
                .field("range", &b.range)
                .field("sent", &b.sent)
                .finish(),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Boxed(b) => Pin::new(b).poll_frame(cx),
            Kind::File(f) => Poll::Ready(f.next_frame()),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Boxed(b) => b.is_end_stream(),
            Kind::File(f) => f.sent == f.range.len(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Boxed(b) => b.size_hint(),
            Kind::File(f) => SizeHint::with_exact(f.range.len() - f.sent),
        }
    }
}

/// A file range read in chunks, for code that polls a file body instead of sending it.
struct FileBody {
    range: FileRange,
    /// Bytes of `range` delivered so far.
    sent: u64,
    /// Keeps the entry in use (eviction leaves it alone) while the body lives; handed over
    /// with the range by `into_file`.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    reader: AsyncReader,
}

impl FileBody {
    fn next_frame(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        let left = self.range.len() - self.sent;
        if left == 0 {
            return None;
        }
        let want = usize::try_from(left).map_or(CHUNK, |n| n.min(CHUNK));
        let mut buf = vec![0; want];
        match read_file_at(self.range.file(), &mut buf, self.range.offset() + self.sent) {
            Ok(0) => Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("entry file ended {left} bytes short of the response length"),
            )
            .into())),
            Ok(n) => {
                buf.truncate(n);
                self.sent += n as u64;
                Some(Ok(Frame::data(Bytes::from(buf))))
            }
            Err(e) => Some(Err(e.into())),
        }
    }
}

#[cfg(unix)]
fn read_file_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

#[cfg(windows)]
fn read_file_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

/// Largest chunk handed to hyper at once.
pub(crate) const CHUNK: usize = 256 * 1024;

/// A response body streamed from a cache reader, `remaining` bytes (or to the end of the
/// entry when unknown). An aborted entry ends the body with an error, so hyper cuts the
/// connection instead of completing the response.
pub(crate) struct CacheBody {
    pub(crate) reader: AsyncReader,
    pub(crate) remaining: Option<u64>,
    pub(crate) done: bool,
}

impl Body for CacheBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
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
                    )
                    .into()))),
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
                Poll::Ready(Some(Err(e.into())))
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

/// An inner service's body that fails once it has had nothing ready for `limit`: a silent
/// origin would otherwise hold its entry in progress for ever (every reader, its client
/// connection and the upstream socket with it).
pub(crate) struct StallTimeout<B> {
    body: B,
    limit: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

impl<B> StallTimeout<B> {
    pub(crate) fn new(body: B, limit: Duration) -> StallTimeout<B> {
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

/// Seconds a client is told to wait (`Retry-After`) before retrying after a 503.
const RETRY_AFTER_SECS: u32 = 2;

/// A response with a short text body (none if `text` is empty).
pub(crate) fn simple(status: StatusCode, text: &str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::new(Full::new(Bytes::copy_from_slice(
        text.as_bytes(),
    ))));
    *resp.status_mut() = status;
    if !text.is_empty() {
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    resp
}

/// 503 with `Retry-After`.
pub(crate) fn unavailable(text: &str) -> Response<ResponseBody> {
    let mut resp = simple(StatusCode::SERVICE_UNAVAILABLE, text);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    resp
}

/// An empty body.
pub(crate) fn empty() -> ResponseBody {
    ResponseBody::empty()
}

/// The body of a request as [`serve`](crate::serve) hands it to its service: hyper's
/// [`Incoming`] body, or none at all for the bodiless requests the server parses itself.
#[derive(Debug, Default)]
pub struct RequestBody {
    inner: Option<Incoming>,
}

impl RequestBody {
    /// A body of no bytes.
    pub fn empty() -> RequestBody {
        RequestBody { inner: None }
    }
}

impl From<Incoming> for RequestBody {
    fn from(body: Incoming) -> RequestBody {
        RequestBody { inner: Some(body) }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().inner {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

#[cfg(all(test, unix))]
mod tests {
    use streamcache::{Cache, Entry};

    use super::*;

    /// A file body polled like any other (by a wrapper, or by hyper) yields the range's
    /// bytes, in chunks of at most `CHUNK`, with an exact size hint all along; once polled it
    /// no longer offers its file for sending.
    #[tokio::test]
    async fn a_polled_file_body_reads_its_range() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::builder().disk(dir.path()).build().unwrap();
        let data: Vec<u8> = (0..CHUNK * 2 + 10).map(|i| (i % 253) as u8).collect();
        let Ok(Entry::Miss(mut w)) = cache.get_or_create("k") else {
            panic!("fresh cache")
        };
        std::io::Write::write_all(&mut w, &data).unwrap();
        w.finish().unwrap();
        let mut reader = AsyncReader::from(cache.get("k").unwrap().unwrap());
        tokio::io::AsyncSeekExt::seek(&mut reader, io::SeekFrom::Start(3))
            .await
            .unwrap();
        let len = data.len() as u64 - 3 - 5;
        let range = reader.take_file_range(len).expect("vouched for at commit");
        let mut body = ResponseBody::file(range, reader);
        assert_eq!(body.file_range().map(FileRange::len), Some(len));
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            let chunk = frame.unwrap().into_data().unwrap();
            assert!(chunk.len() <= CHUNK);
            got.extend_from_slice(&chunk);
            assert_eq!(body.size_hint().exact(), Some(len - got.len() as u64));
            assert!(
                body.file_range().is_none(),
                "partly read: no longer a whole file"
            );
        }
        assert!(body.is_end_stream());
        assert!(got == data[3..data.len() - 5]);
    }
}
