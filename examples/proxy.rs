//! A caching reverse proxy on hyper, backed by a streamcache disk cache, following the HTTP
//! caching rules (RFC 9111) of the `streamcache-http` crate it is made of.
//!
//! ```text
//! cargo run --release --example proxy --features tokio -- \
//!     --listen 127.0.0.1:8080 --upstream http://127.0.0.1:9000 --dir ./proxy-cache
//! ```
//!
//! The first request of a path (and query) fetches it upstream once and streams it while it
//! fills the cache; concurrent and later requests stream from the cache, ranges included,
//! as long as the origin's caching headers allow; other responses are passed through.
//! See `examples/proxy/server.rs` for the behaviour and `tests/proxy.rs` for its tests.

#[path = "proxy/server.rs"]
mod server;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tracing_subscriber::EnvFilter;

const USAGE: &str = "\
A caching reverse proxy (streamcache example): RFC 9111 caching of GET responses.

USAGE:
    proxy --listen ADDR --upstream URL --dir DIR [OPTIONS]

OPTIONS:
    --listen ADDR              address to listen on, e.g. 127.0.0.1:8080
    --upstream URL             origin base URL, e.g. http://127.0.0.1:9000
    --dir DIR                  cache directory (created if missing; reused across restarts)
    --upstream-timeout SECS    wait at most this long for the origin's response head, and
                               for each piece of its body (a silent origin fails the entry) [30]
    --max-bytes N              evict least recently used entries above N bytes [unlimited]
    --head-timeout SECS        close a connection that has not sent a whole request head
                               this long after connecting or after its first byte [10]
    --idle-timeout SECS        close a keep-alive connection idle this long between requests,
                               or whose client has read nothing this long [60]
    --max-connections N        serve at most N client connections at once; more wait in the
                               listen backlog until one closes [1024]
    --max-downloads N          run at most N upstream downloads (cache fills) at once; a miss
                               waits up to the upstream timeout for a slot, then gets 503 [1024]
    --purge WHO                who may remove a URL's entries with the PURGE method:
                               off, loopback or anyone [off]
    --shared URL               share one bucket with a fleet of proxies (s3://bucket/prefix;
                               AWS_* variables configure it; needs --features s3): a path is
                               fetched from the origin by one proxy of the fleet, the others
                               stream it from the bucket, even while it is fetched [none]
    -h, --help                 print this help

Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) to change the level [info].";

struct Args {
    listen: SocketAddr,
    config: server::Config,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let (mut listen, mut upstream, mut dir) = (None, None, None);
    let mut max_bytes = None;
    // The layer's and the server's own settings types, with their defaults (USAGE's).
    let mut layer = streamcache_http::CacheConfig::default();
    let mut limits = server::ConnLimits::default();
    let mut shared = None;
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (flag, None),
        };
        let value = match inline.or_else(|| args.next()) {
            Some(v) => v,
            None => return Err(format!("{name} needs a value")),
        };
        let bad = |e: &dyn std::fmt::Display| format!("bad value for {name}: {value:?} ({e})");
        match name.as_str() {
            "--listen" => listen = Some(value.parse().map_err(|e| bad(&e))?),
            "--upstream" => {
                let uri: hyper::Uri = value.parse().map_err(|e| bad(&e))?;
                if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                    return Err(bad(&"expected http://host:port"));
                }
                upstream = Some(uri);
            }
            "--dir" => dir = Some(value),
            "--upstream-timeout" => {
                let secs: f64 = value.parse().map_err(|e| bad(&e))?;
                layer.upstream_timeout = Duration::try_from_secs_f64(secs).map_err(|e| bad(&e))?;
            }
            "--max-bytes" => max_bytes = Some(value.parse().map_err(|e| bad(&e))?),
            "--head-timeout" | "--idle-timeout" => {
                let secs: f64 = value.parse().map_err(|e| bad(&e))?;
                let d = Duration::try_from_secs_f64(secs).map_err(|e| bad(&e))?;
                if d.is_zero() {
                    return Err(bad(&"must be more than 0"));
                }
                if name == "--head-timeout" {
                    limits.head_timeout = d;
                } else {
                    limits.idle_timeout = d;
                }
            }
            "--max-downloads" => {
                layer.max_downloads = value.parse().map_err(|e| bad(&e))?;
                if layer.max_downloads == 0 {
                    return Err(bad(&"must be at least 1"));
                }
            }
            "--purge" => {
                layer.purge = match value.as_str() {
                    "off" => streamcache_http::Purge::Off,
                    "loopback" => streamcache_http::Purge::Loopback,
                    "anyone" => streamcache_http::Purge::Anyone,
                    _ => return Err(bad(&"expected off, loopback or anyone")),
                }
            }
            "--shared" => shared = Some(shared_tier(&value)?),
            "--max-connections" => {
                limits.max_connections = value.parse().map_err(|e| bad(&e))?;
                if limits.max_connections == 0 {
                    return Err(bad(&"must be at least 1"));
                }
            }
            _ => return Err(format!("unknown option {name}")),
        }
    }
    let missing = |what| format!("{what} is required");
    let mut config = server::Config::new(
        upstream.ok_or_else(|| missing("--upstream"))?,
        dir.ok_or_else(|| missing("--dir"))?,
    );
    config.cache = layer;
    config.max_bytes = max_bytes;
    config.limits = limits;
    #[cfg(feature = "shared")]
    {
        config.shared = shared;
    }
    #[cfg(not(feature = "shared"))]
    let _: Option<()> = shared;
    Ok(Some(Args {
        listen: listen.ok_or_else(|| missing("--listen"))?,
        config,
    }))
}

/// The shared tier at `url` (`s3://bucket/prefix`).
#[cfg(feature = "s3")]
fn shared_tier(url: &str) -> Result<streamcache::shared::SharedTier, String> {
    streamcache::shared::SharedTier::from_url(url).map_err(|e| format!("--shared: {e}"))
}

#[cfg(all(feature = "shared", not(feature = "s3")))]
fn shared_tier(url: &str) -> Result<streamcache::shared::SharedTier, String> {
    Err(format!(
        "--shared {url}: this proxy was built without the `s3` feature (add --features s3)"
    ))
}

#[cfg(not(feature = "shared"))]
fn shared_tier(url: &str) -> Result<(), String> {
    Err(format!(
        "--shared {url}: this proxy was built without the `s3` feature (add --features s3)"
    ))
}

/// The soft limit on open files (Linux; `None` elsewhere or if unlimited).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Warns if the caps let the proxy need more descriptors than it may open: past that, the
/// cache fails requests (503) instead of the caps making clients wait.
fn check_descriptor_budget(config: &server::Config) {
    // A connection: its socket and maybe an entry's file. A download: the upstream socket
    // and the staged file. Plus the cache's own and the runtime's.
    let conns = config.limits.max_connections as u64;
    let need = 2 * conns + 2 * config.cache.max_downloads as u64 + 64;
    if let Some(limit) = open_files_limit()
        && limit < need
    {
        tracing::warn!(
            limit,
            need,
            "open files limit (ulimit -n) below what --max-connections and --max-downloads \
             allow: raise it or lower them"
        );
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("error: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = async {
        check_descriptor_budget(&args.config);
        let proxy = server::Proxy::open(&args.config)?;
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        tracing::info!(
            listen = %listener.local_addr()?,
            upstream = %args.config.upstream,
            dir = %args.config.dir.display(),
            entries = proxy.cache().len(),
            "proxy ready"
        );
        // Ctrl-C stops accepting, closes connections and drops the cache, which records
        // recency on disk and releases the directory.
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        };
        server::serve(listener, proxy, shutdown).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    match result.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
