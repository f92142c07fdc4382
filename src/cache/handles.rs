//! Open file handles: finished entries nobody uses keep their stream open only while among the
//! `max_idle_open` most recently released; when the process runs out of descriptors, the
//! handles of all queued idle entries are closed and the operation is retried once.
//!
//! Invariant: running out of descriptors is a passing shortage, never a verdict on an entry:
//! only an error that proves the stored data lost (`proves_loss`) may drop one.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::index::Inner;
use super::slot::QUEUED_IDLE;
use crate::error::{Error, Result};

/// Whether `e` says the process (`EMFILE`) or the system (`ENFILE`) has no file descriptor
/// left: a passing shortage, never a verdict on an entry.
pub(crate) fn out_of_handles(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => io_out_of_handles(source),
        _ => false,
    }
}

/// `out_of_handles` for an `io::Error`, also when the OS error is wrapped (e.g. in a
/// `tempfile::PathError` naming the file).
pub(crate) fn io_out_of_handles(e: &std::io::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(23 | 24))
        {
            return true;
        }
        // An `io::Error` wrapping another error exposes it through `get_ref`, not `source`.
        cur = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

/// Whether an error opening an entry's blob proves the entry lost (its files missing or
/// damaged), rather than a passing failure (no descriptors, no memory, EIO, EACCES…) that
/// must fail only the request.
pub(super) fn proves_loss(e: &Error) -> bool {
    matches!(e, Error::Corrupt { .. })
        || matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidData
        )
}

impl Inner {
    /// Runs `op`; if it fails for want of file descriptors, closes the idle entries' handles
    /// and runs it once more.
    pub(crate) fn retry_out_of_handles<T>(&self, op: impl Fn() -> Result<T>) -> Result<T> {
        match op() {
            Err(e) if out_of_handles(&e) => {
                self.close_idle_handles();
                op()
            }
            other => other,
        }
    }

    /// Closes the storage handles of every finished entry nobody uses (they reopen on
    /// demand). Called when the process runs out of file descriptors.
    pub(crate) fn close_idle_handles(&self) {
        let idle = std::mem::take(&mut *self.idle_open.lock().unwrap_or_else(|e| e.into_inner()));
        tracing::warn!(
            handles = idle.len(),
            "out of file descriptors: closing the idle entries' handles"
        );
        for (key, id) in idle {
            self.close_if_idle(&key, id);
        }
    }

    pub(super) fn queue_idle(&self, key: Arc<str>, id: u64) {
        let evicted = {
            let mut q = self.idle_open.lock().unwrap_or_else(|e| e.into_inner());
            q.push_back((key, id));
            if q.len() > self.max_idle_open {
                q.pop_front()
            } else {
                None
            }
        };
        if let Some((key, id)) = evicted {
            self.close_if_idle(&key, id);
        }
    }

    /// Drops the stream of the finished entry (`key`, `id`) if nobody uses it, closing its
    /// storage handle.
    fn close_if_idle(&self, key: &str, id: u64) {
        let stream = {
            let Some(mut e) = self.index.get_mut(key) else {
                return;
            };
            let slot = &e.key().0;
            if slot.id != id {
                return;
            }
            slot.flags.fetch_and(!QUEUED_IDLE, Ordering::AcqRel);
            let idle = e.value().as_ref().is_some_and(|s| s.handles() == 0);
            if !idle || slot.finished.load(Ordering::Relaxed) == 0 {
                return;
            }
            e.value_mut().take()
        };
        // Closed after the shard guard is gone.
        drop(stream);
    }
}
