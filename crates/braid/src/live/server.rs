//! The HTTP side of `live`: one thread answers one request at a time, `GET /metrics`
//! (Prometheus' text format), `GET /status` (the job and its plan, JSON) and `GET /`
//! (the status page). Nothing else is served; the page is compiled into the binary.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::Live;

/// The most of a request read: its request line and headers (a body is never read).
const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// How long one client may take, from its connection to the end of the answer:
/// requests are answered one at a time, so a slow client holds the others this long
/// at most.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The pause after a failed accept (out of file descriptors, say), so that the thread
/// does not spin on it.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What one write of an answer sends at most before the deadline is checked again.
const WRITE_PIECE_BYTES: usize = 16 * 1024;

/// The status page: plain HTML, CSS and JavaScript, no build step.
const STATUS_PAGE: &str = include_str!("status.html");

pub(super) fn serve(listener: &TcpListener, live: &Live) {
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                if let Err(e) = answer(s, live) {
                    tracing::debug!("metrics: a request failed: {e}");
                }
            }
            Err(e) => {
                tracing::debug!("metrics: cannot accept a connection: {e}");
                std::thread::sleep(ACCEPT_RETRY_PAUSE);
            }
        }
    }
}

/// The time left of a client's `CLIENT_TIMEOUT` (at least a millisecond: a timeout of
/// zero would mean none), or an error once it has passed.
fn left(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client took too long",
        ));
    }
    Ok(left.max(Duration::from_millis(1)))
}

fn answer(mut stream: TcpStream, live: &Live) -> std::io::Result<()> {
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < REQUEST_BYTES_MAX {
        stream.set_read_timeout(Some(left(deadline)?))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            live.render(),
        ),
        ("GET", "/status") => ("200 OK", "application/json", live.status_json()),
        ("GET", "/" | "/index.html") => (
            "200 OK",
            "text/html; charset=utf-8",
            STATUS_PAGE.to_string(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "braid serves /, /metrics and /status\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // In pieces, so that a client that reads slowly meets the deadline too.
    for piece in head
        .as_bytes()
        .chunks(WRITE_PIECE_BYTES)
        .chain(body.as_bytes().chunks(WRITE_PIECE_BYTES))
    {
        stream.set_write_timeout(Some(left(deadline)?))?;
        stream.write_all(piece)?;
    }
    stream.flush()
}
