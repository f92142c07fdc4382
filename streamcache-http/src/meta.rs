//! What an entry stores besides its body: the response head and what the caching policy needs
//! to be rebuilt (the response time and the request headers the response varies on); and the
//! request views the policy is evaluated on.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};
use http_cache_semantics::{CacheOptions, CachePolicy, RequestLike};

/// First line of the metadata of entries written by this crate (the encoding's version).
const META_MAGIC: &[u8] = b"streamcache-http/1";
/// First line of a vary index entry's metadata.
const VARY_MAGIC: &[u8] = b"streamcache-http-vary/1";

/// Hop-by-hop headers (RFC 9110 7.6.1): never stored, never forwarded.
pub(crate) const HOP_HEADERS: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers, and those the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_HEADERS {
        headers.remove(name);
    }
}

/// The client's own validators and range: the cache answers them itself from its entry, so
/// they are neither sent on a fill (the whole entity is fetched) nor part of the request a
/// stored response is evaluated against.
pub(crate) const CLIENT_CONDITIONALS: [HeaderName; 6] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

/// The request a cached response is evaluated against: a GET of the path and query, with the
/// client's end-to-end headers minus `Host` (one cache serves one origin) and minus the
/// client's own validators and ranges (the cache answers those itself, from its entry).
#[derive(Debug, Clone)]
pub(crate) struct View {
    pub(crate) uri: Uri,
    pub(crate) headers: HeaderMap,
}

impl View {
    /// The view of a request for `url` (path and query) with `headers`.
    pub(crate) fn new(url: &str, headers: &HeaderMap) -> Option<View> {
        let uri = Uri::try_from(url).ok()?;
        let mut headers = headers.clone();
        strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        for name in CLIENT_CONDITIONALS {
            headers.remove(name);
        }
        Some(View { uri, headers })
    }
}

impl RequestLike for View {
    fn uri(&self) -> Uri {
        self.uri.clone()
    }
    fn is_same_uri(&self, other: &Uri) -> bool {
        &self.uri == other
    }
    fn method(&self) -> &Method {
        &Method::GET
    }
    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

/// The response head of an entry, as stored in its metadata.
#[derive(Debug, Clone)]
pub(crate) struct StoredHead {
    /// When the response (or the 304 that refreshed it) was received.
    pub(crate) response_time: SystemTime,
    pub(crate) status: StatusCode,
    /// The request headers the response varies on (and only those: no credentials on disk).
    pub(crate) request: HeaderMap,
    /// The response headers, hop-by-hop ones excluded.
    pub(crate) response: HeaderMap,
}

struct PolicyResponse<'a> {
    status: StatusCode,
    headers: &'a HeaderMap,
}

impl http_cache_semantics::ResponseLike for PolicyResponse<'_> {
    fn status(&self) -> StatusCode {
        self.status
    }
    fn headers(&self) -> &HeaderMap {
        self.headers
    }
}

impl StoredHead {
    /// A head for a response received at `response_time` to a request seen as `view`.
    pub(crate) fn new(
        response_time: SystemTime,
        status: StatusCode,
        view: &View,
        response: &HeaderMap,
    ) -> StoredHead {
        let mut request = HeaderMap::new();
        for name in vary_names(response) {
            for value in view.headers.get_all(&name) {
                request.append(name.clone(), value.clone());
            }
        }
        let mut response = response.clone();
        strip_hop_by_hop(&mut response);
        // The body's own framing is the entry's; a refresh (304) must not bring one in.
        response.remove(header::CONTENT_LENGTH);
        StoredHead {
            response_time,
            status,
            request,
            response,
        }
    }

    /// The caching policy of this response, for requests of `uri`.
    pub(crate) fn policy(&self, uri: &Uri, opts: CacheOptions) -> CachePolicy {
        let view = View {
            uri: uri.clone(),
            headers: self.request.clone(),
        };
        let res = PolicyResponse {
            status: self.status,
            headers: &self.response,
        };
        CachePolicy::new_options(&view, &res, self.response_time, opts)
    }

    /// The response's age at `now`: its `Age` header plus the time since it was received, as
    /// `CachePolicy::age` computes it, without building a policy (this runs on every hit).
    pub(crate) fn age(&self, now: SystemTime) -> Duration {
        let header = self
            .response
            .get(http::header::AGE)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        Duration::from_secs(header) + now.duration_since(self.response_time).unwrap_or_default()
    }

    /// The metadata bytes: a version line, the response time in milliseconds since the Unix
    /// epoch, the status, then `q name: value` (request) and `h name: value` (response) lines.
    pub(crate) fn encode(&self) -> Bytes {
        let millis = self
            .response_time
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let mut out = META_MAGIC.to_vec();
        out.extend_from_slice(format!("\n{millis}\n{}\n", self.status.as_u16()).as_bytes());
        for (tag, map) in [(b'q', &self.request), (b'h', &self.response)] {
            for (name, value) in map {
                out.push(tag);
                out.push(b' ');
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes()); // header values never hold '\n'
                out.push(b'\n');
            }
        }
        out.into()
    }

    /// Inverse of [`encode`](StoredHead::encode); `None` if `meta` was not written by it.
    pub(crate) fn decode(meta: &[u8]) -> Option<StoredHead> {
        let mut lines = meta.split(|&b| b == b'\n');
        if lines.next()? != META_MAGIC {
            return None;
        }
        let millis: u64 = std::str::from_utf8(lines.next()?).ok()?.parse().ok()?;
        let status = StatusCode::from_bytes(lines.next()?).ok()?;
        let (mut request, mut response) = (HeaderMap::new(), HeaderMap::new());
        for line in lines.filter(|l| !l.is_empty()) {
            let (tag, rest) = (line.first()?, line.get(2..)?);
            let colon = rest.iter().position(|&b| b == b':')?;
            let name = HeaderName::from_bytes(&rest[..colon]).ok()?;
            let value = HeaderValue::from_bytes(rest[colon + 1..].trim_ascii()).ok()?;
            match tag {
                b'q' => request.append(name, value),
                b'h' => response.append(name, value),
                _ => return None,
            };
        }
        Some(StoredHead {
            response_time: UNIX_EPOCH + Duration::from_millis(millis),
            status,
            request,
            response,
        })
    }
}

/// The header names of a response's `Vary`, lower case, in order (`*` included as is).
pub(crate) fn vary_names(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::VARY) {
        let Ok(value) = value.to_str() else { continue };
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let name = if name == "*" {
                HeaderName::from_static("*")
            } else {
                match HeaderName::from_bytes(name.as_bytes()) {
                    Ok(n) => n,
                    Err(_) => continue,
                }
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// Whether a response has `Vary: *` (it never matches another request).
pub(crate) fn varies_on_everything(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| n.trim() == "*")
}

/// The metadata of a vary index entry: the header names a URL's responses vary on.
pub(crate) fn encode_vary_index(names: &[HeaderName]) -> Bytes {
    let mut out = VARY_MAGIC.to_vec();
    for name in names {
        out.push(b'\n');
        out.extend_from_slice(name.as_str().as_bytes());
    }
    out.into()
}

/// Inverse of [`encode_vary_index`].
pub(crate) fn decode_vary_index(meta: &[u8]) -> Option<Vec<HeaderName>> {
    let mut lines = meta.split(|&b| b == b'\n');
    if lines.next()? != VARY_MAGIC {
        return None;
    }
    lines
        .filter(|l| !l.is_empty())
        .map(|l| HeaderName::from_bytes(l).ok())
        .collect()
}

/// The key of a URL's vary index entry. Keys of the crate's entries never collide: a path
/// and query never holds a NUL.
pub(crate) fn vary_index_key(url: &str) -> String {
    format!("\0vary\0{url}")
}

/// The key of the variant of `url` that a request with `headers` selects, for responses that
/// vary on `names`.
pub(crate) fn variant_key(url: &str, names: &[HeaderName], headers: &HeaderMap) -> String {
    let mut key = String::from(url);
    for name in names {
        key.push('\0');
        key.push_str(name.as_str());
        key.push('=');
        for (i, value) in headers.get_all(name).iter().enumerate() {
            if i > 0 {
                key.push_str(", ");
            }
            key.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
    }
    key
}

/// Whether the client's conditional request headers (`If-None-Match`, else
/// `If-Modified-Since`, RFC 9110 13.2.2) match a stored response with `headers`: then the
/// answer is 304 Not Modified.
pub(crate) fn not_modified(request: &HeaderMap, headers: &HeaderMap) -> bool {
    if let Some(inm) = request.get(header::IF_NONE_MATCH) {
        let Some(etag) = headers.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        let etag = weak(etag);
        return request
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .chain(std::iter::once(inm))
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim() == "*" || weak(t) == etag);
    }
    let date = |map: &HeaderMap, name| {
        map.get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
    };
    match (
        date(request, header::IF_MODIFIED_SINCE),
        date(headers, header::LAST_MODIFIED),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// Whether an `If-Range` header (if any) lets a `Range` be served: it must equal the stored
/// strong ETag or `Last-Modified` exactly; otherwise the whole entity is sent.
pub(crate) fn if_range_holds(request: &HeaderMap, headers: &HeaderMap) -> bool {
    let Some(cond) = request.get(header::IF_RANGE) else {
        return true;
    };
    let same = |name| headers.get(name).is_some_and(|v| v == cond);
    let weak = cond.as_bytes().starts_with(b"W/");
    !weak && (same(header::ETAG) || same(header::LAST_MODIFIED))
}

/// The headers a 304 answer carries from the stored response (RFC 9110 15.4.5).
pub(crate) const NOT_MODIFIED_HEADERS: [HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
    header::LAST_MODIFIED,
];

/// A parsed single `Range: bytes=…` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=a-b` (inclusive).
    FromTo(u64, u64),
    /// `bytes=a-`.
    From(u64),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

impl RangeSpec {
    /// First and last byte for an entity of `total` bytes; `None` if unsatisfiable.
    pub fn resolve(self, total: u64) -> Option<(u64, u64)> {
        match self {
            RangeSpec::FromTo(first, last) if first < total => Some((first, last.min(total - 1))),
            RangeSpec::From(first) if first < total => Some((first, total - 1)),
            RangeSpec::Suffix(n) if n > 0 && total > 0 => {
                Some((total.saturating_sub(n), total - 1))
            }
            _ => None,
        }
    }

    /// Parses a single byte range. Anything else (other units, several ranges, bad syntax)
    /// is `None`: the header is ignored and the whole entity is served, as RFC 9110 allows.
    pub fn parse(value: &HeaderValue) -> Option<RangeSpec> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `StoredHead::age` computes what the caching policy's `age` does, without a policy.
    #[test]
    fn age_is_the_policys_age() {
        let received = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for age in [None, Some("30"), Some("junk")] {
            let mut response = HeaderMap::new();
            response.insert(
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=600"),
            );
            if let Some(a) = age {
                response.insert(http::header::AGE, HeaderValue::from_static(a));
            }
            let head = StoredHead {
                response_time: received,
                status: StatusCode::OK,
                request: HeaderMap::new(),
                response,
            };
            let policy = head.policy(&Uri::from_static("/"), CacheOptions::default());
            for later in [0, 7, 3600] {
                let now = received + Duration::from_secs(later);
                assert_eq!(
                    head.age(now),
                    policy.age(now),
                    "Age {age:?}, {later} s later"
                );
            }
            let before = received - Duration::from_secs(5);
            assert_eq!(head.age(before), policy.age(before));
        }
    }

    #[test]
    fn range_header_parsing() {
        use RangeSpec::*;
        let p = |s: &str| RangeSpec::parse(&HeaderValue::from_str(s).unwrap());
        assert_eq!(p("bytes=0-99"), Some(FromTo(0, 99)));
        assert_eq!(p("bytes=100-"), Some(From(100)));
        assert_eq!(p("bytes=-5"), Some(Suffix(5)));
        assert_eq!(p(" bytes= 1 - 2 "), Some(FromTo(1, 2)));
        for bad in [
            "bytes=5-1",
            "bytes=-",
            "bytes=1-2,4-5",
            "items=0-1",
            "bytes=a-b",
            "0-1",
        ] {
            assert_eq!(p(bad), None, "{bad}");
        }
        assert_eq!(FromTo(0, 99).resolve(50), Some((0, 49)));
        assert_eq!(From(50).resolve(50), None);
        assert_eq!(Suffix(10).resolve(5), Some((0, 4)));
        assert_eq!(Suffix(0).resolve(5), None);
    }

    #[test]
    fn stored_head_round_trip() {
        let mut res = HeaderMap::new();
        res.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        res.insert(header::ETAG, HeaderValue::from_static("\"x:y\""));
        res.insert(header::VARY, HeaderValue::from_static("X-Lang"));
        res.insert(header::CONNECTION, HeaderValue::from_static("close"));
        res.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        let mut req = HeaderMap::new();
        req.insert("x-lang", HeaderValue::from_static("fr"));
        req.insert(header::AUTHORIZATION, HeaderValue::from_static("secret"));
        let view = View::new("/a?b", &req).unwrap();
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let head = StoredHead::new(at, StatusCode::OK, &view, &res);
        let back = StoredHead::decode(&head.encode()).unwrap();
        assert_eq!(back.response_time, at);
        assert_eq!(back.status, StatusCode::OK);
        assert_eq!(
            back.request.len(),
            1,
            "only the vary'd request header is kept"
        );
        assert_eq!(back.request["x-lang"], "fr");
        assert_eq!(back.response[header::ETAG], "\"x:y\"");
        assert!(!back.response.contains_key(header::CONNECTION));
        assert!(!back.response.contains_key(header::CONTENT_LENGTH));
        assert!(StoredHead::decode(b"streamcache-proxy/1\n").is_none());
        assert!(StoredHead::decode(b"streamcache-http/1\nx\n200\n").is_none());
        let names = vary_names(&res);
        assert_eq!(decode_vary_index(&encode_vary_index(&names)), Some(names));
    }

    #[test]
    fn client_conditionals() {
        let mut stored = HeaderMap::new();
        stored.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        stored.insert(
            header::LAST_MODIFIED,
            HeaderValue::from_static("Tue, 01 Dec 2026 10:00:00 GMT"),
        );
        let req = |name, value| {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(value));
            h
        };
        assert!(not_modified(&req(header::IF_NONE_MATCH, "\"v1\""), &stored));
        assert!(not_modified(
            &req(header::IF_NONE_MATCH, "\"a\", W/\"v1\""),
            &stored
        ));
        assert!(not_modified(&req(header::IF_NONE_MATCH, "*"), &stored));
        assert!(!not_modified(
            &req(header::IF_NONE_MATCH, "\"v2\""),
            &stored
        ));
        let ims = |v| req(header::IF_MODIFIED_SINCE, v);
        assert!(not_modified(&ims("Tue, 01 Dec 2026 10:00:00 GMT"), &stored));
        assert!(!not_modified(
            &ims("Tue, 01 Dec 2026 09:59:59 GMT"),
            &stored
        ));
        assert!(!not_modified(&ims("garbage"), &stored));
        assert!(!not_modified(&HeaderMap::new(), &stored));
        assert!(if_range_holds(&req(header::IF_RANGE, "\"v1\""), &stored));
        assert!(!if_range_holds(&req(header::IF_RANGE, "\"v0\""), &stored));
    }
}
