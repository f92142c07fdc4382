//! Response bodies: an entry streamed from a cache reader, an origin body with a stall limit.

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
use streamcache::tokio::AsyncReader;

/// The error type of response bodies (and of inner services, once converted).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the cache layer returns: streamed from a cache entry, relayed
/// from the inner service, or a short text of its own. An error ends the response abnormally
/// (hyper cuts the connection), so a broken body never looks complete.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

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

/// 503 with `Retry-After`.
pub(crate) fn unavailable(text: &str) -> Response<ResponseBody> {
    let mut resp = simple(StatusCode::SERVICE_UNAVAILABLE, text);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    resp
}

/// An empty body.
pub(crate) fn empty() -> ResponseBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}
