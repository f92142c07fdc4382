//! A cache over several directories (`CacheBuilder::disks`), on real directories: placement
//! that survives a reopen in any order, adding a directory (about `1/n` of the keys move,
//! only to the new one, never two versions of a key), one lock per directory, limits over the
//! whole cache, and bad configurations refused.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use streamcache::{Cache, Error};
use support::*;

fn key(i: usize) -> String {
    format!("key {i}")
}

/// The content of `key(i)` in its `version`-th version.
fn data(i: usize, version: u64) -> Vec<u8> {
    pattern(50 + i % 700, (i as u64) << 8 | version)
}

/// The key-hash part of the names of `key`'s files: 32 hex digits of blake3(key).
fn key_hash(key: &str) -> String {
    blake3::hash(key.as_bytes()).to_hex()[..32].to_owned()
}

/// `n` directories under `root`, not created yet.
fn dirs(root: &Path, n: usize) -> Vec<PathBuf> {
    (0..n).map(|i| root.join(format!("disk{i}"))).collect()
}

/// For each key hash, the indices (in `dirs`) of the directories holding a data file of it,
/// once per file.
fn layout(dirs: &[PathBuf]) -> BTreeMap<String, Vec<usize>> {
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, d) in dirs.iter().enumerate() {
        for f in data_files(d) {
            let name = f.file_name().unwrap().to_str().unwrap().to_owned();
            let (hash, id) = name
                .rsplit_once('-')
                .unwrap_or_else(|| panic!("unexpected data file {}", f.display()));
            assert_eq!(
                (hash.len(), id.len()),
                (32, 16),
                "unexpected data file {}",
                f.display()
            );
            // `<dir>/v1/<2 hex>/<name>`
            assert_eq!(
                f.parent().unwrap(),
                d.join("v1").join(&hash[..2]),
                "misfiled {}",
                f.display()
            );
            out.entry(hash.to_owned()).or_default().push(i);
        }
    }
    out
}

/// The one directory holding each of `n` keys' data; panics if a key has no file or several.
fn homes(dirs: &[PathBuf], n: usize) -> Vec<usize> {
    let layout = layout(dirs);
    assert_eq!(
        layout.len(),
        n,
        "data files for {} keys, {n} expected",
        layout.len()
    );
    (0..n)
        .map(
            |i| match layout.get(&key_hash(&key(i))).map(Vec::as_slice) {
                Some(&[d]) => d,
                other => panic!("{:?}: data files in directories {other:?}", key(i)),
            },
        )
        .collect()
}

fn open(dirs: &[&PathBuf]) -> Cache {
    Cache::builder()
        .disks(dirs.iter().copied())
        .build()
        .unwrap()
}

#[track_caller]
fn assert_serves(cache: &Cache, n: usize, version: impl Fn(usize) -> u64) {
    for i in 0..n {
        assert!(
            get_bytes(cache, &key(i)) == data(i, version(i)),
            "{:?}: wrong bytes",
            key(i)
        );
    }
    assert_eq!(cache.len(), n);
}

#[test]
fn reopening_the_same_set_in_any_order_finds_every_entry() {
    deadline("same set, any order", || {
        let root = tempfile::tempdir().unwrap();
        let d = dirs(root.path(), 3);
        let n = 90;
        {
            let cache = open(&[&d[0], &d[1], &d[2]]);
            for i in 0..n {
                put(&cache, &key(i), &data(i, 1));
            }
            assert_serves(&cache, n, |_| 1);
        }
        for dir in &d {
            let id = std::fs::read_to_string(dir.join("partition-id")).unwrap();
            assert_eq!(id.trim_end().len(), 32, "{id:?}");
        }
        let before = homes(&d, n);
        for used in 0..3 {
            assert!(before.contains(&used), "directory {used} got no key");
        }
        for order in [[0, 1, 2], [2, 0, 1], [1, 2, 0]] {
            let cache = open(&[&d[order[0]], &d[order[1]], &d[order[2]]]);
            assert_serves(&cache, n, |_| 1);
            drop(cache);
            assert_eq!(
                homes(&d, n),
                before,
                "files moved at a reopen in order {order:?}"
            );
        }
        // New versions after a reopen in another order go where the old ones were.
        let cache = open(&[&d[2], &d[1], &d[0]]);
        for i in 0..n {
            assert!(cache.remove(&key(i)).unwrap());
            put(&cache, &key(i), &data(i, 2));
        }
        cache.run_pending_tasks();
        assert_eq!(homes(&d, n), before);
        assert_serves(&cache, n, |_| 2);
    });
}

#[test]
fn adding_a_directory_moves_about_a_quarter_of_the_keys_to_it() {
    deadline_in(
        std::time::Duration::from_secs(120),
        "adding a directory",
        || {
            let root = tempfile::tempdir().unwrap();
            let d = dirs(root.path(), 4);
            let n = 400;
            {
                let cache = open(&[&d[0], &d[1], &d[2]]);
                for i in 0..n {
                    put(&cache, &key(i), &data(i, 1));
                }
            }
            let before = homes(&d, n);
            // Copies of the first versions of the first 40 keys (data and record), to put back
            // later as if the process had died before deleting them.
            let stash = root.path().join("stash");
            std::fs::create_dir(&stash).unwrap();
            let stashed: Vec<(usize, PathBuf)> = d[..3]
                .iter()
                .flat_map(|dir| files_under(&dir.join("v1")))
                .filter_map(|f| {
                    let name = f.file_name()?.to_str()?.to_owned();
                    let i = (0..40).find(|&i| name.starts_with(&key_hash(&key(i))))?;
                    std::fs::copy(&f, stash.join(&name)).unwrap();
                    Some((i, f))
                })
                .collect();
            assert_eq!(stashed.len(), 80, "a data file and a record per key");
            // The new directory in the middle: the order does not matter.
            let cache = open(&[&d[0], &d[3], &d[1], &d[2]]);
            assert_serves(&cache, n, |_| 1);
            assert_eq!(homes(&d, n), before, "entries migrated at open");
            // A new version of every key: those whose home is now the new directory move.
            for i in 0..n {
                assert!(cache.remove(&key(i)).unwrap());
                put(&cache, &key(i), &data(i, 2));
            }
            cache.run_pending_tasks();
            let after = homes(&d, n);
            assert_serves(&cache, n, |_| 2);
            let moved: Vec<usize> = (0..n).filter(|&i| after[i] != before[i]).collect();
            for &i in &moved {
                assert_eq!(
                    after[i],
                    3,
                    "{:?} moved from directory {} to {}, not to the new one",
                    key(i),
                    before[i],
                    after[i]
                );
            }
            let share = moved.len() as f64 / n as f64;
            assert!(
                (0.15..=0.35).contains(&share),
                "{} of {n} keys moved",
                moved.len()
            );
            // Half of the keys once more, then a reopen: still one file per key.
            for i in (0..n).step_by(2) {
                assert!(cache.remove(&key(i)).unwrap());
                put(&cache, &key(i), &data(i, 3));
            }
            drop(cache);
            // The stale first versions of the keys that moved come back in their old
            // directories: two versions of those keys on disk, the older one elsewhere.
            let mut restored = 0;
            for (i, f) in &stashed {
                if after[*i] != before[*i] {
                    std::fs::copy(stash.join(f.file_name().unwrap()), f).unwrap();
                    restored += 1;
                }
            }
            assert!(restored > 0, "none of the first 40 keys moved");
            assert_eq!(
                layout(&d).values().filter(|dirs| dirs.len() == 2).count(),
                restored / 2
            );
            let version = |i: usize| if i.is_multiple_of(2) { 3 } else { 2 };
            let cache = open(&[&d[3], &d[2], &d[1], &d[0]]);
            assert_serves(&cache, n, version);
            drop(cache);
            // The reload kept the newest and deleted the stale copies (`homes` panics if a key
            // has two data files anywhere).
            assert_eq!(
                homes(&d, n),
                after,
                "never two versions of a key, each where it was"
            );
        },
    );
}

#[test]
fn a_directory_left_out_takes_its_entries_and_brings_them_back() {
    deadline("directory left out", || {
        let root = tempfile::tempdir().unwrap();
        let d = dirs(root.path(), 3);
        let n = 60;
        {
            let cache = open(&[&d[0], &d[1], &d[2]]);
            for i in 0..n {
                put(&cache, &key(i), &data(i, 1));
            }
        }
        let home = homes(&d, n);
        {
            let cache = open(&[&d[0], &d[1]]);
            for (i, &home) in home.iter().enumerate() {
                let got = cache
                    .get(&key(i))
                    .unwrap()
                    .map(|mut r| read_all(&mut r).unwrap());
                if home == 2 {
                    assert!(got.is_none(), "{:?} served without its directory", key(i));
                } else {
                    assert!(got == Some(data(i, 1)), "{:?}: wrong bytes", key(i));
                }
            }
            assert_eq!(cache.len(), home.iter().filter(|&&h| h != 2).count());
        }
        let cache = open(&[&d[2], &d[1], &d[0]]);
        assert_serves(&cache, n, |_| 1);
    });
}

#[test]
fn each_directory_has_its_own_lock() {
    deadline("locks", || {
        let root = tempfile::tempdir().unwrap();
        let d = dirs(root.path(), 3);
        let (a, b, c) = (&d[0], &d[1], &d[2]);
        let cache = open(&[a, b]);
        put(&cache, "k", b"v");
        for dir in [a, b] {
            let e = Cache::builder().disk(dir).build().unwrap_err();
            assert!(
                matches!(e, Error::Locked { .. }),
                "{}: {e:?}",
                dir.display()
            );
        }
        let e = Cache::builder().disks([c, b]).build().unwrap_err();
        assert!(matches!(e, Error::Locked { .. }), "{e:?}");
        let e = Cache::builder().disks([b, c]).build().unwrap_err();
        assert!(matches!(e, Error::Locked { .. }), "{e:?}");
        // The failed opens left `c` unlocked.
        drop(Cache::builder().disk(c).build().unwrap());
        // The cache still works, and frees both directories when dropped.
        assert_eq!(get_bytes(&cache, "k"), b"v");
        drop(cache);
        drop(Cache::builder().disk(b).build().unwrap());
        let cache = Cache::builder().disks([c, b]).build().unwrap();
        drop(cache);
        let cache = open(&[b, a]);
        assert_eq!(get_bytes(&cache, "k"), b"v");
    });
}

#[test]
fn limits_hold_for_the_whole_cache() {
    deadline("limits", || {
        let root = tempfile::tempdir().unwrap();
        let d = dirs(root.path(), 3);
        let cache = Cache::builder().disks(&d).max_entries(10).build().unwrap();
        for i in 0..50 {
            put(&cache, &key(i), &data(i, 1));
        }
        cache.run_pending_tasks();
        assert!(cache.len() <= 10, "len {}", cache.len());
        let files: usize = d.iter().map(|d| data_files(d).len()).sum();
        assert!(files <= 10, "{files} data files over 3 directories");
        // The most recent keys survive, wherever they live.
        for i in 45..50 {
            assert_eq!(get_bytes(&cache, &key(i)), data(i, 1));
        }
        drop(cache);

        let root = tempfile::tempdir().unwrap();
        let d = dirs(root.path(), 3);
        let cache = Cache::builder()
            .disks(&d)
            .max_bytes(10_000)
            .build()
            .unwrap();
        for i in 0..50 {
            put(&cache, &key(i), &[i as u8; 1000]);
        }
        cache.run_pending_tasks();
        assert!(cache.total_bytes() <= 10_000, "{}", cache.total_bytes());
        let files: usize = d.iter().map(|d| data_files(d).len()).sum();
        assert!(files <= 10, "{files} data files over 3 directories");
    });
}

/// The directory sets `disks` must refuse, with what each is.
fn bad_directory_sets(d: &[PathBuf]) -> Vec<(Vec<PathBuf>, &'static str)> {
    vec![
        (Vec::new(), "no directory"),
        (
            vec![d[0].clone(), d[1].clone(), d[0].clone()],
            "a directory twice",
        ),
        (
            vec![d[0].clone(), d[1].join("..").join("disk0")],
            "a directory twice, spelled differently",
        ),
    ]
}

#[test]
fn bad_configurations_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let d = dirs(root.path(), 2);
    // Refused, with an `InvalidInput` kind (see the ignored test below for the variant).
    for (set, what) in bad_directory_sets(&d) {
        match Cache::builder().disks(set).build() {
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    let invalid = |b: streamcache::CacheBuilder, what: &str| match b.build() {
        Err(Error::InvalidInput { .. }) => {}
        other => panic!("{what}: {other:?}"),
    };
    invalid(
        Cache::builder().disks(&d).memory_front(0),
        "memory_front(0)",
    );
    invalid(
        Cache::builder().disk(&d[0]).memory_front(0),
        "memory_front(0)",
    );
    invalid(
        Cache::builder().memory().memory_front(1 << 20),
        "memory_front without disk",
    );
    // Nothing stays locked after the refusals, and the right configurations work.
    let cache = Cache::builder()
        .disks(&d)
        .memory_front(1 << 20)
        .build()
        .unwrap();
    put(&cache, "k", b"v");
    assert_eq!(get_bytes(&cache, "k"), b"v");
}

/// `CacheBuilder::build` documents `Error::InvalidInput` for these. (They came back as
/// `Error::Io { op: "open directories", .. }`: the storage's plain `io::Error` was wrapped.)
#[test]
fn bad_directory_sets_are_invalid_input() {
    let root = tempfile::tempdir().unwrap();
    let d = dirs(root.path(), 2);
    for (set, what) in bad_directory_sets(&d) {
        match Cache::builder().disks(set).build() {
            Err(Error::InvalidInput { .. }) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
}
