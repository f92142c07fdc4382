//! A keyed cache of byte **streams**: the first requester of a key writes it, everyone else
//! reads it *while it is being written*, from byte 0, each at their own pace.
#![doc = "\n\n(Crate documentation is completed with the cache.)"]

pub mod error;
pub mod storage;
pub mod stream;
mod sync;

pub use error::{Error, Result};
pub use stream::{Reader, Size, Stream, Writer};
