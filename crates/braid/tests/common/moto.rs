//! moto, an S3-compatible server for the tests, on a free loopback port.
//!
//! moto comes from `BRAID_MOTO_SERVER` (a `moto_server` executable), else from
//! `target/moto-venv`, which `cargo xtask test` and `cargo xtask setup` install.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A first start of moto imports Flask and every service's models: seconds.
const MOTO_START_TIMEOUT: Duration = Duration::from_secs(60);
const MOTO_START_ATTEMPTS: usize = 3;
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// What moto needs to take a request as authenticated; it checks no signature.
const UNCHECKED_AUTHORIZATION: &str = "AWS4-HMAC-SHA256 \
    Credential=braid-test/20260101/us-east-1/s3/aws4_request, \
    SignedHeaders=host, Signature=0000000000000000000000000000000000000000000000000000000000000000";

/// A child process killed (SIGKILL) and reaped when the guard goes, panics included.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A moto server on a loopback port, stopped when dropped.
pub struct Moto {
    process: KillOnDrop,
    pub port: u16,
    log: PathBuf,
}

impl Moto {
    /// Starts moto on a free port and waits until it answers; retries on another port
    /// if the one chosen was taken in between.
    pub fn start(exe: &Path, log: &Path) -> Moto {
        for attempt in 1..=MOTO_START_ATTEMPTS {
            let port = free_port();
            println!("starting moto on 127.0.0.1:{port} (attempt {attempt})");
            let log_file = std::fs::File::create(log).expect("create moto's log");
            let child = Command::new(exe)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("clone log handle"))
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
            let mut moto = Moto {
                process: KillOnDrop(child),
                port,
                log: log.to_path_buf(),
            };
            if moto.wait_until_ready() {
                return moto;
            }
            println!("moto exited early:\n{}", moto.log_text());
        }
        panic!("moto did not start in {MOTO_START_ATTEMPTS} attempts; see the log above");
    }

    /// True once moto answers; false if it exited (a port taken, say).
    fn wait_until_ready(&mut self) -> bool {
        let started = Instant::now();
        loop {
            if let Some(status) = self.process.0.try_wait().expect("poll moto") {
                println!("moto ended with {status}");
                return false;
            }
            if matches!(http(self.port, "GET", "/"), Ok((200, _))) {
                println!(
                    "moto answers on 127.0.0.1:{} after {:.1} s",
                    self.port,
                    started.elapsed().as_secs_f64()
                );
                return true;
            }
            assert!(
                started.elapsed() < MOTO_START_TIMEOUT,
                "moto did not answer on 127.0.0.1:{} within {MOTO_START_TIMEOUT:?}:\n{}",
                self.port,
                self.log_text()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = http(self.port, "PUT", &format!("/{bucket}")).expect("PUT bucket");
        assert_eq!(status, 200, "creating bucket {bucket}: {body}");
    }

    /// The body of an object.
    pub fn get(&self, bucket: &str, key: &str) -> String {
        let (status, body) = http(self.port, "GET", &format!("/{bucket}/{key}")).expect("GET");
        assert_eq!(status, 200, "reading {key}: {body}");
        body
    }

    /// The keys under `prefix` (the first 1,000: enough to see that some exist).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let target = format!("/{bucket}?list-type=2&prefix={prefix}");
        let (status, body) = http(self.port, "GET", &target).expect("list the bucket");
        assert_eq!(status, 200, "listing {target}: {body}");
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split_once("</Key>").map(|(key, _)| key.to_string()))
            .collect()
    }
}

/// A port free a moment ago: bound by the OS and released.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

/// One plain HTTP/1.0 request; the status and body of the answer. moto does not check
/// signatures, but it refuses anonymous reads of objects: hence an `Authorization`
/// header with a signature of zeros. HTTP/1.0, so that the server closes the connection
/// after one answer and never uses chunked encoding.
pub fn http(port: u16, method: &str, target: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "{method} {target} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\
         Authorization: {UNCHECKED_AUTHORIZATION}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {head:?}")))?;
    Ok((status, body.to_string()))
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace folder")
}

/// The `moto_server` to run: `BRAID_MOTO_SERVER`, else the workspace's venv, which
/// `cargo xtask test` (or `cargo xtask setup`) installs.
pub fn moto_server() -> PathBuf {
    if let Some(exe) = std::env::var_os("BRAID_MOTO_SERVER") {
        let exe = PathBuf::from(exe);
        assert!(
            exe.is_file(),
            "BRAID_MOTO_SERVER={} is not a file",
            exe.display()
        );
        return exe;
    }
    let exe = workspace().join("target/moto-venv/bin/moto_server");
    assert!(
        exe.is_file(),
        "{} is missing: moto, the S3 server of this test, is installed by `cargo xtask \
         setup` (or `cargo xtask test`); or set BRAID_MOTO_SERVER to a moto_server executable",
        exe.display()
    );
    exe
}

/// Credentials and endpoint for moto in a braid command, and no other AWS setting of
/// the environment (a profile or an S3 endpoint there would win).
pub fn with_moto(command: &mut Command, port: u16) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            command.env_remove(key);
        }
    }
    command
        .env("AWS_ACCESS_KEY_ID", "braid-test")
        .env("AWS_SECRET_ACCESS_KEY", "braid-test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_ALLOW_HTTP", "true")
        // A proxy of the environment must not see loopback traffic.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
}
