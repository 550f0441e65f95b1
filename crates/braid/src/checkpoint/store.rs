//! Where checkpoints are kept: a local folder or an S3 bucket, behind one small trait.
//!
//! Names are `/`-separated paths under the store's root. Files are written once and
//! never changed; a put of the manifest is atomic (whole or absent), which makes it the
//! commit point. Integrity is checked by the caller against the checksums the manifest
//! lists, so a store only moves bytes.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;

pub trait CheckpointStore: Send + Sync {
    /// Where the store is, for messages.
    fn describe(&self) -> String;
    /// Stores a copy of the local file `from` as `name`.
    fn put_file(&self, name: &str, from: &Path) -> anyhow::Result<()>;
    /// Stores `bytes` as `name`, atomically: afterwards `name` is whole or absent.
    fn put_bytes(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()>;
    /// Copies `name` to the local file `to`.
    fn get_file(&self, name: &str, to: &Path) -> anyhow::Result<()>;
    fn get_bytes(&self, name: &str) -> anyhow::Result<Vec<u8>>;
    /// Every name under `prefix`.
    fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>>;
    /// Removes `name`; removing what is absent is not an error.
    fn delete(&self, name: &str) -> anyhow::Result<()>;
}

/// A checkpoint store in a local folder. Files are hard links where the folder is on
/// the same file system as the state (copies otherwise): segment files are immutable,
/// so a link is as good as a copy and costs nothing.
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn open(root: &Path) -> anyhow::Result<LocalStore> {
        std::fs::create_dir_all(root)
            .with_context(|| format!("cannot create checkpoint folder {}", root.display()))?;
        Ok(LocalStore {
            root: root.to_path_buf(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn parent_dir(&self, path: &Path) -> anyhow::Result<PathBuf> {
        let dir = path
            .parent()
            .expect("a store path has a parent")
            .to_path_buf();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }
}

/// Makes a rename or a new file in `dir` durable.
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync folder {}", dir.display()))
}

/// Links `from` to `to`, or copies it when a link is impossible (another file system).
fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    if to.exists() {
        std::fs::remove_file(to)?;
    }
    match std::fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(_) => {
            std::fs::copy(from, to)?;
            File::open(to)?.sync_all()
        }
    }
}

impl CheckpointStore for LocalStore {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn put_file(&self, name: &str, from: &Path) -> anyhow::Result<()> {
        let to = self.path(name);
        self.parent_dir(&to)?;
        link_or_copy(from, &to)
            .with_context(|| format!("cannot store {} as {}", from.display(), to.display()))
    }

    fn put_bytes(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let to = self.path(name);
        let dir = self.parent_dir(&to)?;
        let tmp = dir.join(format!(
            ".{}.tmp",
            to.file_name().expect("a file name").to_string_lossy()
        ));
        let written = File::create(&tmp)
            .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
            .with_context(|| format!("cannot write {}", tmp.display()));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &to)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), to.display()))?;
        sync_dir(&dir)
    }

    fn get_file(&self, name: &str, to: &Path) -> anyhow::Result<()> {
        let from = self.path(name);
        link_or_copy(&from, to)
            .with_context(|| format!("cannot restore {} to {}", from.display(), to.display()))
    }

    fn get_bytes(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let path = self.path(name);
        std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
    }

    fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        let mut stack = vec![self.path(prefix)];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
            };
            for entry in entries {
                let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    stack.push(path);
                } else if !entry.file_name().to_string_lossy().starts_with('.') {
                    let relative = path.strip_prefix(&self.root).expect("under the root");
                    names.push(relative.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn delete(&self, name: &str) -> anyhow::Result<()> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot delete {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}

/// Test hook: `BRAID_FAULTS=checkpoint-put:N` makes the checkpoint store's puts fail
/// after N succeeded, as a full disk would; `state-write:N` does the same to the state
/// store's segment writes; `crash-after-manifest:E` aborts the process right after the
/// manifest of epoch E is written, before its outputs are published;
/// `checkpoint-latency-ms:N` makes every request to the checkpoint store wait N ms,
/// `manifest-latency-ms:N` only the writes of manifests. Documented in the README
/// under "Fault injection".
pub const FAULTS_ENV: &str = "BRAID_FAULTS";

/// The number after `what:` in [`FAULTS_ENV`], if present.
pub fn fault_after(what: &str) -> Option<u64> {
    let spec = std::env::var(FAULTS_ENV).ok()?;
    spec.split(',').find_map(|part| {
        let (name, n) = part.split_once(':')?;
        (name.trim() == what)
            .then(|| n.trim().parse().ok())
            .flatten()
    })
}

/// A store whose puts fail after a number of successes (fault injection).
pub struct FaultyStore {
    inner: Box<dyn CheckpointStore>,
    puts_left: AtomicU64,
}

impl FaultyStore {
    pub fn new(inner: Box<dyn CheckpointStore>, puts: u64) -> FaultyStore {
        FaultyStore {
            inner,
            puts_left: AtomicU64::new(puts),
        }
    }

    fn spend(&self, name: &str) -> anyhow::Result<()> {
        let left = self.puts_left.load(Ordering::SeqCst);
        if left == 0 {
            anyhow::bail!(
                "cannot write {name} in {}: No space left on device (os error 28) (injected fault)",
                self.inner.describe()
            );
        }
        self.puts_left.store(left - 1, Ordering::SeqCst);
        Ok(())
    }
}

impl CheckpointStore for FaultyStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn put_file(&self, name: &str, from: &Path) -> anyhow::Result<()> {
        self.spend(name)?;
        self.inner.put_file(name, from)
    }
    fn put_bytes(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.spend(name)?;
        self.inner.put_bytes(name, bytes)
    }
    fn get_file(&self, name: &str, to: &Path) -> anyhow::Result<()> {
        self.inner.get_file(name, to)
    }
    fn get_bytes(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        self.inner.get_bytes(name)
    }
    fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        self.inner.list(prefix)
    }
    fn delete(&self, name: &str) -> anyhow::Result<()> {
        self.inner.delete(name)
    }
}

/// A store whose requests first wait `latency` (fault injection): every request (an
/// object store's round trip, for benchmarks of the store's request pattern), or only
/// the writes of names in a folder (the manifests' commits, for tests that must act
/// between two checkpoints however fast the rest of a checkpoint is).
pub struct SlowStore {
    inner: Box<dyn CheckpointStore>,
    latency: std::time::Duration,
    /// `Some(folder)`: only puts of names in a folder of this name wait (at the top,
    /// or under an instance's prefix).
    puts_in: Option<String>,
}

impl SlowStore {
    pub fn new(inner: Box<dyn CheckpointStore>, latency_ms: u64) -> SlowStore {
        SlowStore {
            inner,
            latency: std::time::Duration::from_millis(latency_ms),
            puts_in: None,
        }
    }

    /// Only puts of names in a folder named `folder` wait.
    pub fn puts_in(inner: Box<dyn CheckpointStore>, latency_ms: u64, folder: &str) -> SlowStore {
        SlowStore {
            puts_in: Some(folder.to_string()),
            ..SlowStore::new(inner, latency_ms)
        }
    }

    fn wait(&self) {
        if self.puts_in.is_none() {
            std::thread::sleep(self.latency);
        }
    }

    fn wait_put(&self, name: &str) {
        let slow = self.puts_in.as_ref().is_none_or(|folder| {
            let mut folders = name.split('/').rev().skip(1);
            folders.any(|f| f == folder)
        });
        if slow {
            std::thread::sleep(self.latency);
        }
    }
}

impl CheckpointStore for SlowStore {
    fn describe(&self) -> String {
        match &self.puts_in {
            None => format!(
                "{} (+{} ms a request)",
                self.inner.describe(),
                self.latency.as_millis()
            ),
            Some(folder) => format!(
                "{} (+{} ms a put in {folder}/)",
                self.inner.describe(),
                self.latency.as_millis()
            ),
        }
    }
    fn put_file(&self, name: &str, from: &Path) -> anyhow::Result<()> {
        self.wait_put(name);
        self.inner.put_file(name, from)
    }
    fn put_bytes(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.wait_put(name);
        self.inner.put_bytes(name, bytes)
    }
    fn get_file(&self, name: &str, to: &Path) -> anyhow::Result<()> {
        self.wait();
        self.inner.get_file(name, to)
    }
    fn get_bytes(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        self.wait();
        self.inner.get_bytes(name)
    }
    fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        self.wait();
        self.inner.list(prefix)
    }
    fn delete(&self, name: &str) -> anyhow::Result<()> {
        self.wait();
        self.inner.delete(name)
    }
}

/// One instance's part of a shared store (`--instance`): every name under `prefix/`.
pub struct PrefixStore {
    inner: Box<dyn CheckpointStore>,
    /// Empty, or ends in `/`.
    prefix: String,
}

impl PrefixStore {
    pub fn new(inner: Box<dyn CheckpointStore>, prefix: &str) -> PrefixStore {
        let prefix = match prefix {
            "" => String::new(),
            p => format!("{}/", p.trim_end_matches('/')),
        };
        PrefixStore { inner, prefix }
    }

    fn name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

impl CheckpointStore for PrefixStore {
    fn describe(&self) -> String {
        match self.prefix.as_str() {
            "" => self.inner.describe(),
            p => format!("{} ({p})", self.inner.describe()),
        }
    }
    fn put_file(&self, name: &str, from: &Path) -> anyhow::Result<()> {
        self.inner.put_file(&self.name(name), from)
    }
    fn put_bytes(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.inner.put_bytes(&self.name(name), bytes)
    }
    fn get_file(&self, name: &str, to: &Path) -> anyhow::Result<()> {
        self.inner.get_file(&self.name(name), to)
    }
    fn get_bytes(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        self.inner.get_bytes(&self.name(name))
    }
    fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .inner
            .list(&self.name(prefix))?
            .into_iter()
            .filter_map(|n| n.strip_prefix(&self.prefix).map(str::to_string))
            .collect())
    }
    fn delete(&self, name: &str) -> anyhow::Result<()> {
        self.inner.delete(&self.name(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_store_round_trips_lists_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("ckpt")).unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"segment").unwrap();
        store.put_file("files/shard-0/a.seg", &src).unwrap();
        store.put_bytes("manifests/1.json", b"m1").unwrap();
        store.put_bytes("manifests/1.json", b"m1b").unwrap();
        assert_eq!(
            store.list("").unwrap(),
            vec!["files/shard-0/a.seg", "manifests/1.json"]
        );
        assert_eq!(store.get_bytes("manifests/1.json").unwrap(), b"m1b");
        let back = dir.path().join("back");
        store.get_file("files/shard-0/a.seg", &back).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), b"segment");
        store.delete("files/shard-0/a.seg").unwrap();
        store.delete("files/shard-0/a.seg").unwrap();
        assert_eq!(store.list("files").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn faulty_store_fails_after_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::new(Box::new(LocalStore::open(dir.path()).unwrap()), 1);
        store.put_bytes("a", b"1").unwrap();
        let err = store.put_bytes("b", b"2").unwrap_err().to_string();
        assert!(err.contains("No space left"), "{err}");
        assert_eq!(store.list("").unwrap(), vec!["a"]);
    }

    /// `manifest-latency-ms`: only writes into a `manifests` folder wait, at the top or
    /// under an instance's prefix; other writes and every read do not.
    #[test]
    fn a_store_slow_in_one_folder_delays_only_its_writes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SlowStore::puts_in(
            Box::new(LocalStore::open(dir.path()).expect("store")),
            500,
            "manifests",
        );
        let took = |f: &dyn Fn()| {
            let start = std::time::Instant::now();
            f();
            start.elapsed()
        };
        let slow = std::time::Duration::from_millis(500);
        assert!(took(&|| store.put_bytes("manifests/1", b"m").expect("put")) >= slow);
        assert!(
            took(&|| store
                .put_bytes("instances/a/manifests/1", b"m")
                .expect("put"))
                >= slow
        );
        for fast in [
            took(&|| store.put_bytes("files/manifests", b"f").expect("put")),
            took(&|| store.put_bytes("files/part-0/x.seg", b"f").expect("put")),
            took(&|| drop(store.get_bytes("manifests/1").expect("get"))),
            took(&|| drop(store.list("manifests").expect("list"))),
        ] {
            assert!(fast < slow, "{fast:?}");
        }
    }

    #[test]
    fn a_prefix_store_keeps_its_names_apart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = PrefixStore::new(
            Box::new(LocalStore::open(dir.path()).expect("store")),
            "instances/a",
        );
        let b = PrefixStore::new(
            Box::new(LocalStore::open(dir.path()).expect("store")),
            "instances/b",
        );
        a.put_bytes("manifests/1", b"a1").expect("put");
        b.put_bytes("manifests/1", b"b1").expect("put");
        assert_eq!(a.list("manifests").expect("list"), ["manifests/1"]);
        assert_eq!(a.get_bytes("manifests/1").expect("get"), b"a1");
        assert_eq!(b.get_bytes("manifests/1").expect("get"), b"b1");
        a.delete("manifests/1").expect("delete");
        assert!(a.list("manifests").expect("list").is_empty());
        assert_eq!(b.list("manifests").expect("list"), ["manifests/1"]);
    }
}
