//! A minimal HTTP/1.1 client for the workers' API (and Jaeger's): one request per
//! connection, waiting for a server that is still starting.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `method path` with `body` (and `Authorization: Bearer token`); the status and the body.
pub fn request(port: u16, token: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("connect to 127.0.0.1:{port}: {e}"),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .expect("write");
    stream.write_all(body).expect("body");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers end");
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let body = &response[split + 4..];
    let chunked = (head.lines()).any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    match chunked {
        true => (status, dechunk(body)),
        false => (status, body.to_vec()),
    }
}

/// A body sent with `Transfer-Encoding: chunked`, put back together.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut whole = Vec::new();
    while let Some(end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&body[..end]);
        let size = size.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16).expect("a chunk size");
        if size == 0 {
            break;
        }
        let chunk = &body[end + 2..];
        whole.extend_from_slice(&chunk[..size]);
        body = &chunk[size + 2..];
    }
    whole
}

/// As [`request`], the body parsed as JSON (`null` when it is not).
pub fn json(port: u16, token: &str, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let (status, bytes) = request(port, token, method, path, body);
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}
