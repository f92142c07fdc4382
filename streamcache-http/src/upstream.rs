//! [`Upstream`]: a service that forwards requests to an origin server over HTTP/1.1.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_service::Service;

use crate::body::BoxError;
use crate::layer::{CloseDelimited, chunked_last};
use crate::meta::strip_hop_by_hop;

/// A reverse proxy's inner service: sends each request to the origin at `base` (its path
/// and query appended to the base's path), with the client's end-to-end headers
/// (`Authorization` and `Cookie` included; hop-by-hop headers dropped; `Host` set to the
/// origin's), over pooled HTTP/1.1 connections. Marks close-delimited response bodies with
/// [`CloseDelimited`](crate::CloseDelimited).
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, UnsyncBoxBody<Bytes, BoxError>>,
    base: Uri,
    host: Option<HeaderValue>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Forwards to `base`, an `http://host:port` URI (optionally with a path prefix).
    ///
    /// # Errors
    /// If `base` is not an `http` URI with an authority.
    pub fn new(base: Uri) -> Result<Upstream, BoxError> {
        if base.scheme_str() != Some("http") || base.authority().is_none() {
            return Err(format!("expected http://host:port, not {base}").into());
        }
        let host = base
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Upstream { client, base, host })
    }

    /// The origin's base URI.
    pub fn base(&self) -> &Uri {
        &self.base
    }

    fn target(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let base = self.base.path().trim_end_matches('/');
        let pq = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(format!("{base}{pq}").parse()?);
        Ok(Uri::from_parts(parts)?)
    }
}

impl<B> Service<Request<B>> for Upstream
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let target = self.target(&parts.uri);
        let client = self.client.clone();
        let host = self.host.clone();
        Box::pin(async move {
            parts.uri = target?;
            parts.version = http::Version::HTTP_11;
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.remove(header::HOST);
            if let Some(host) = host {
                parts.headers.insert(header::HOST, host);
            }
            let body = body.map_err(Into::into).boxed_unsync();
            let mut resp = client.request(Request::from_parts(parts, body)).await?;
            if close_delimited(&resp) {
                resp.extensions_mut().insert(CloseDelimited);
            }
            Ok(resp)
        })
    }
}

/// Whether hyper's client reads this response's body to the close (RFC 9112 6.3): neither a
/// `Content-Length` nor chunked as the last transfer coding of an HTTP/1.1 response.
fn close_delimited<B>(resp: &Response<B>) -> bool {
    let h = resp.headers();
    if h.contains_key(header::TRANSFER_ENCODING) {
        !chunked_last(resp)
    } else {
        // Bodiless statuses (1xx, 204, 304) have no body to delimit.
        let bodiless = resp.status().is_informational()
            || resp.status() == http::StatusCode::NO_CONTENT
            || resp.status() == http::StatusCode::NOT_MODIFIED;
        !bodiless && !h.contains_key(header::CONTENT_LENGTH)
    }
}
