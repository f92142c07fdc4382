//! The crate's one error type.
//!
//! Variants are grouped by what the caller can do about them:
//!
//! * the stream ended without being finished ([`Error::Aborted`]) or was closed to the caller
//!   ([`Error::Closed`]): ask again — the next `get_or_create` of the key is a miss;
//! * the stored bytes are not what was written ([`Error::Corrupt`]): the entry is dropped, ask
//!   again;
//! * the operating system refused ([`Error::Io`]) or another process owns the directory
//!   ([`Error::Locked`]): fix the environment;
//! * the entry does not fit the cache's limits ([`Error::TooLarge`]): raise the limit or do
//!   without caching it;
//! * the shared tier failed for an operation that had to reach it ([`Error::Shared`]): retry
//!   later;
//! * the call itself was wrong ([`Error::InvalidInput`]): fix the caller.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// A shareable cause attached to [`Error::Aborted`] and [`Error::Closed`].
///
/// One abort reaches every reader of a stream, so its cause is reference-counted.
pub type Cause = Arc<dyn StdError + Send + Sync + 'static>;

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in streamcache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The stream's writer gave up before finishing: it called `abort`, was dropped without
    /// `finish`, hit a storage error, or its producer failed or panicked. Readers of an aborted
    /// stream always get this error, never a clean end of file. A cache forgets the key, so the
    /// next request for it is a miss.
    #[error("stream {key:?} was aborted{}", fmt_cause(cause))]
    Aborted {
        /// The stream's key (or the name it was created with).
        key: String,
        /// Why, when known (for example the writer's I/O error).
        #[source]
        cause: Option<Cause>,
    },

    /// The stream was closed to this caller: shut down to new readers, cancelled, or removed.
    #[error("stream {key:?} is closed{}", fmt_cause(cause))]
    Closed {
        /// The stream's key (or the name it was created with).
        key: String,
        /// The reason given by whoever closed it, when there is one.
        #[source]
        cause: Option<Cause>,
    },

    /// Stored data failed an integrity check (a checksum mismatch, a truncated or malformed
    /// file). The bytes are never returned as a clean read.
    #[error("corrupt data in {}: {reason}", path.display())]
    Corrupt {
        /// The file (or blob name, for non-disk storage) that failed the check.
        path: PathBuf,
        /// What did not match.
        reason: String,
    },

    /// An operating-system I/O error.
    #[error("{op}{}: {source}", fmt_path(path))]
    Io {
        /// What was being done (`"create"`, `"write"`, `"rename"`, `"spawn reaper thread"`, …).
        op: &'static str,
        /// The file or directory involved, if the operation had one (spawning a thread or
        /// listing a custom storage has none).
        path: Option<PathBuf>,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Another live process holds the cache directory.
    #[error("cache directory {} is in use by another process", dir.display())]
    Locked {
        /// The directory that is locked.
        dir: PathBuf,
    },

    /// An entry grew past the cache's `max_bytes` on its own: it could never be kept, so it
    /// was refused as it crossed the limit. The writer gets this error; its readers get
    /// [`Error::Aborted`] with it as the cause; the next request for the key is a miss.
    #[error("entry {key:?} reached {len} bytes, over the cache's max_bytes of {max_bytes}")]
    TooLarge {
        /// The entry's key.
        key: String,
        /// How many bytes it had when it was refused.
        len: u64,
        /// The limit it crossed.
        max_bytes: u64,
    },

    /// The shared tier (a bucket other machines read; see the `shared` module) failed or did not
    /// answer in time, for an operation that must reach it: a remote entry whose producer
    /// stopped or aborted while this node read it, or a `remove` that could not delete in the
    /// bucket. Requests themselves never fail for this: they produce locally.
    #[error("shared tier: {op} failed: {cause}")]
    Shared {
        /// What was being done (`"remove"`, `"read a remote entry"`).
        op: &'static str,
        /// Why.
        #[source]
        cause: Cause,
    },

    /// The call's arguments were not acceptable (for example more bytes written than the
    /// declared length, or an invalid blob name).
    #[error("invalid input: {reason}")]
    InvalidInput {
        /// What was wrong.
        reason: String,
    },
}

fn fmt_path(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" {}", p.display()),
        None => String::new(),
    }
}

fn fmt_cause(cause: &Option<Cause>) -> String {
    match cause {
        Some(c) => format!(": {c}"),
        None => String::new(),
    }
}

impl Error {
    /// The [`io::ErrorKind`] this error maps to when converted into an [`io::Error`].
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::Aborted { .. } => io::ErrorKind::BrokenPipe,
            Error::Closed { .. } => io::ErrorKind::ConnectionAborted,
            Error::Corrupt { .. } => io::ErrorKind::InvalidData,
            Error::Io { source, .. } => source.kind(),
            Error::Locked { .. } => io::ErrorKind::ResourceBusy,
            Error::TooLarge { .. } => io::ErrorKind::FileTooLarge,
            Error::InvalidInput { .. } => io::ErrorKind::InvalidInput,
            Error::Shared { .. } => io::ErrorKind::Other,
        }
    }

    #[cfg_attr(not(unix), allow(dead_code, reason = "only disk storage has paths"))]
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: Some(path.into()),
            source,
        }
    }

    /// An I/O error of an operation that involves no file (spawning a thread, say).
    pub(crate) fn io_without_path(op: &'static str, source: io::Error) -> Self {
        Error::Io {
            op,
            path: None,
            source,
        }
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            reason: reason.into(),
        }
    }

    /// Recover a typed [`Error`] from an [`io::Error`] produced by this crate, or wrap a foreign
    /// one as [`Error::Io`].
    pub(crate) fn from_io(op: &'static str, path: impl Into<PathBuf>, err: io::Error) -> Self {
        Self::from_io_at(op, Some(path.into()), err)
    }

    /// As [`from_io`](Error::from_io), for an operation that involves no file.
    pub(crate) fn from_io_without_path(op: &'static str, err: io::Error) -> Self {
        Self::from_io_at(op, None, err)
    }

    fn from_io_at(op: &'static str, path: Option<PathBuf>, err: io::Error) -> Self {
        if err.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            let inner = err.into_inner().expect("checked above");
            return *inner.downcast::<Error>().expect("checked above");
        }
        Error::Io {
            op,
            path,
            source: err,
        }
    }
}

/// Converts into an [`io::Error`] whose [`kind`](io::Error::kind) follows [`Error::kind`] and
/// whose [`get_ref`](io::Error::get_ref) is the original [`Error`], so callers can downcast.
impl From<Error> for io::Error {
    fn from(err: Error) -> Self {
        io::Error::new(err.kind(), err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_error_keeps_typed_cause() {
        let err = Error::Aborted {
            key: "k".into(),
            cause: Some(Arc::new(io::Error::other("disk full"))),
        };
        let io_err: io::Error = err.into();
        assert_eq!(io_err.kind(), io::ErrorKind::BrokenPipe);
        let inner = io_err.get_ref().unwrap().downcast_ref::<Error>().unwrap();
        assert!(matches!(inner, Error::Aborted { key, .. } if key == "k"));
        assert!(io_err.to_string().contains("disk full"));
    }

    #[test]
    fn from_io_round_trips() {
        let io_err: io::Error = Error::invalid("nope").into();
        assert!(matches!(
            Error::from_io("read", "x", io_err),
            Error::InvalidInput { .. }
        ));
        let foreign = io::Error::from(io::ErrorKind::StorageFull);
        match Error::from_io("write", "/d/f", foreign) {
            Error::Io { op, source, .. } => {
                assert_eq!(op, "write");
                assert_eq!(source.kind(), io::ErrorKind::StorageFull);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn io_error_without_path_has_no_empty_field_in_its_message() {
        let e = Error::io_without_path("spawn reaper thread", io::Error::other("no threads"));
        assert_eq!(e.to_string(), "spawn reaper thread: no threads");
        assert!(matches!(e, Error::Io { path: None, .. }));
        let e = Error::io("open", "/d/f", io::Error::other("denied"));
        assert_eq!(e.to_string(), "open /d/f: denied");
    }

    #[test]
    fn error_is_send_sync_static() {
        fn check<T: StdError + Send + Sync + 'static>() {}
        check::<Error>();
    }
}
