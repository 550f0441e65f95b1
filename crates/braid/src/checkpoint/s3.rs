//! The checkpoint store on S3 (or any S3-compatible server) through `object_store`.
//!
//! `[checkpoint] dir = "s3://BUCKET/PREFIX"`. Credentials, region and endpoint come from
//! the usual environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL` for a compatible server, `AWS_ALLOW_HTTP=true` for plain HTTP).
//! A single PUT is atomic in S3, so the manifest needs nothing more; files are
//! uploaded whole (segments are a few MiB, images at most the memory budget).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::store::CheckpointStore;

/// Write buffer of a download: the pieces of an HTTP body are small.
const DOWNLOAD_BUFFER_BYTES: usize = 1 << 20;

pub struct S3Store {
    url: String,
    prefix: String,
    store: AmazonS3,
    /// One runtime for the blocking calls of the trait; the committer is one thread.
    runtime: tokio::runtime::Runtime,
}

impl S3Store {
    pub fn open(url: &str) -> anyhow::Result<S3Store> {
        // `from_env` reads the AWS_* variables, AWS_ENDPOINT_URL and AWS_ALLOW_HTTP too.
        S3Store::open_with(url, AmazonS3Builder::from_env())
    }

    fn open_with(url: &str, builder: AmazonS3Builder) -> anyhow::Result<S3Store> {
        let rest = url.trim_start_matches("s3://");
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // The HTTP client is reqwest with rustls on `ring`, not aws-lc (Cargo.toml says
        // why): the provider must be the process's default before the client is built.
        // Err means one is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = builder
            .with_bucket_name(bucket)
            .build()
            .with_context(|| format!("cannot open checkpoint store {url}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the S3 client's runtime")?;
        Ok(S3Store {
            url: url.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            store,
            runtime,
        })
    }

    fn path(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }
}

impl S3Store {
    fn put(&self, name: &str, payload: PutPayload) -> anyhow::Result<()> {
        let path = self.path(name);
        self.runtime
            .block_on(self.store.put(&path, payload))
            .with_context(|| format!("cannot write {name} to {}", self.url))?;
        Ok(())
    }
}

impl CheckpointStore for S3Store {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn put_file(&self, name: &str, from: &Path) -> anyhow::Result<()> {
        let bytes =
            std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
        self.put(name, PutPayload::from(bytes))
    }

    fn put_bytes(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.put(name, PutPayload::from(bytes.to_vec()))
    }

    /// Streams the object into the file as its pieces arrive: a restore downloads
    /// images as large as a shard's state, and never holds one whole.
    fn get_file(&self, name: &str, to: &Path) -> anyhow::Result<()> {
        let path = self.path(name);
        let file =
            std::fs::File::create(to).with_context(|| format!("cannot create {}", to.display()))?;
        let mut out = std::io::BufWriter::with_capacity(DOWNLOAD_BUFFER_BYTES, file);
        let read = || format!("cannot read {name} from {}", self.url);
        let write = || format!("cannot write {}", to.display());
        self.runtime.block_on(async {
            let mut pieces = self
                .store
                .get(&path)
                .await
                .with_context(read)?
                .into_stream();
            while let Some(piece) = pieces.try_next().await.with_context(read)? {
                out.write_all(&piece).with_context(write)?;
            }
            anyhow::Ok(())
        })?;
        out.flush().with_context(write)
    }

    fn get_bytes(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let path = self.path(name);
        let bytes = self
            .runtime
            .block_on(async { self.store.get(&path).await?.bytes().await })
            .with_context(|| format!("cannot read {name} from {}", self.url))?;
        Ok(bytes.to_vec())
    }

    fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let root = self.path(prefix);
        let metas: Vec<object_store::ObjectMeta> = self
            .runtime
            .block_on(self.store.list(Some(&root)).try_collect())
            .with_context(|| format!("cannot list {}", self.url))?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut names: Vec<String> = metas
            .into_iter()
            .filter_map(|m| m.location.as_ref().strip_prefix(&strip).map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    fn delete(&self, name: &str) -> anyhow::Result<()> {
        let path = self.path(name);
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot delete {name} in {}", self.url)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpListener;

    use object_store::RetryConfig;

    use super::*;

    /// S3 over HTTPS without aws-lc: the client builds with rustls on `ring` and opens
    /// a TLS handshake (a ClientHello record reaches the server, which then hangs up).
    #[test]
    fn https_endpoint_gets_a_tls_client_hello() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().expect("its address").port();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("the client connects");
            let mut head = [0u8; 3];
            stream.read_exact(&mut head).expect("the client writes");
            head
        });
        let builder = AmazonS3Builder::new()
            .with_endpoint(format!("https://127.0.0.1:{port}"))
            .with_region("us-east-1")
            .with_access_key_id("braid-test")
            .with_secret_access_key("braid-test")
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            });
        let store = S3Store::open_with("s3://bucket/prefix", builder).expect("the store opens");
        assert!(
            store.put_bytes("probe", b"x").is_err(),
            "the server hung up"
        );
        let head = server.join().expect("the server thread");
        // A TLS record: content type 22 (handshake), protocol version 3.x.
        assert_eq!(head[..2], [0x16, 0x03], "not a TLS ClientHello: {head:?}");
    }
}
