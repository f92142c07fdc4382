//! Helpers for the cache-level integration tests (`cache`, `cache_model`, `cache_crash`,
//! `eviction`). Each test binary uses a subset, hence the `dead_code` allowance.
#![allow(dead_code, unreachable_pub)]

use std::io;
use std::path::{Path, PathBuf};

use streamcache::{Cache, Entry, Error, Reader, Writer};

// The deadline helpers are shared with the stream-level tests.
mod child;
#[path = "../common/mod.rs"]
mod common;
#[allow(unused_imports)]
pub use child::*;
#[allow(unused_imports)]
pub use common::{DEADLINE, assert_closed, deadline, deadline_in, read_all, wait_until};

/// Deterministic, position-dependent test bytes (so a shifted or wrong block is visible).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `get_or_create` that must miss.
#[track_caller]
pub fn miss(cache: &Cache, key: &str) -> Writer {
    match cache.get_or_create(key).unwrap() {
        Entry::Miss(w) => w,
        Entry::Hit(_) => panic!("expected a miss for {key:?}, got a hit"),
    }
}

/// `get_or_create` that must hit.
#[track_caller]
pub fn hit(cache: &Cache, key: &str) -> Reader {
    match cache.get_or_create(key).unwrap() {
        Entry::Hit(r) => r,
        Entry::Miss(_) => panic!("expected a hit for {key:?}, got a miss"),
    }
}

/// Writes `data` as entry `key` (which must be absent) and finishes it.
#[track_caller]
pub fn put(cache: &Cache, key: &str, data: &[u8]) {
    let mut w = miss(cache, key);
    w.write_bytes(data).unwrap();
    w.finish().unwrap();
}

/// `get(key)` that must find the entry; returns its whole content.
#[track_caller]
pub fn get_bytes(cache: &Cache, key: &str) -> Vec<u8> {
    let mut r = cache
        .get(key)
        .unwrap()
        .unwrap_or_else(|| panic!("{key:?} should be present"));
    read_all(&mut r).unwrap()
}

/// The crate error inside an `io::Error` produced by a reader, if any.
pub fn inner_error(e: &io::Error) -> Option<&Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<Error>())
}

/// Whether `e` carries `Error::Aborted`.
pub fn is_aborted(e: &io::Error) -> bool {
    matches!(inner_error(e), Some(Error::Aborted { .. }))
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(_) => out.push(p),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// Data files (not `.meta` records) under `<dir>/v1/`.
pub fn data_files(dir: &Path) -> Vec<PathBuf> {
    files_under(&dir.join("v1"))
        .into_iter()
        .filter(|p| p.extension().is_none_or(|e| e != "meta"))
        .collect()
}

/// Number of committed blobs the cache's storage lists.
#[cfg(feature = "test-util")]
pub fn stored_blobs(cache: &Cache) -> usize {
    cache.storage().list().unwrap().len()
}

/// Copies the directory tree `from` into `to` (files and directories only): a stand-in for
/// what a crash would leave, taken while a cache runs on `from`.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}
