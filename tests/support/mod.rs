//! Shared by the end-to-end tests: start the real `wse-server` binary on loopback, mint tokens,
//! speak raw TCP when a test needs to misbehave.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// HS256 secret the tests configure (≥ 32 bytes).
pub const SECRET: &str = "wse-server-test-secret-0123456789abcdef";
/// API key for the control plane.
pub const API_KEY: &str = "test-api-key-0123456789";
/// How long a server may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running server process; killed when dropped.
pub struct Wse {
    child: Child,
    pub ws: SocketAddr,
    pub control: Option<SocketAddr>,
    /// Everything the server logged (stderr), for failure messages.
    pub log: Arc<Mutex<String>>,
}

impl Wse {
    /// Starts the binary with `args` after loopback listeners on free ports, JWT auth with
    /// [`SECRET`] and the API key; later flags override earlier ones.
    pub fn start(args: &[&str]) -> Wse {
        Self::start_env(args, &[])
    }

    /// [`Wse::start`] with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Wse {
        let mut all: Vec<&str> = vec![
            "--listen",
            "127.0.0.1:0",
            "--control-listen",
            "127.0.0.1:0",
            "--auth-enabled",
            "true",
            "--auth-secret",
            SECRET,
            "--api-key",
            API_KEY,
            "--drain-timeout",
            "3s",
        ];
        all.extend_from_slice(args);
        let mut cmd = Self::command();
        cmd.args(&all).envs(env.iter().copied());
        Self::start_command(cmd)
    }

    /// Starts the binary with exactly `args`.
    pub fn start_raw(args: &[&str]) -> Wse {
        let mut cmd = Self::command();
        cmd.args(args);
        Self::start_command(cmd)
    }

    /// The binary, logging at info.
    pub fn command() -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wse-server"));
        cmd.env("RUST_LOG", "info");
        cmd
    }

    /// Starts `cmd`, which must end up running the binary (it may be a shell that `exec`s it),
    /// and waits for its ready line.
    pub fn start_command(mut cmd: Command) -> Wse {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wse-server");
        let log = collect_stderr(&mut child);
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "wse-server did not become ready; log:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        let field = |name: &str| -> Option<String> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")).map(str::to_owned))
        };
        let ws = field("ws")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no ws= in {line:?}"));
        let control = field("control").and_then(|a| a.parse().ok());
        Wse {
            child,
            ws,
            control,
            log,
        }
    }

    /// `ws://127.0.0.1:PORT/wse`.
    pub fn url(&self) -> String {
        format!("ws://{}/wse", self.ws)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    }

    /// Sends SIGHUP (reload).
    pub fn sighup(&self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    }

    /// Waits until the log holds `needle` at least `count` times; false on timeout.
    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= count {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// GET on the control plane; returns (status, body).
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        http(
            self.control.expect("control plane on"),
            method,
            path,
            headers,
            body,
        )
        .await
    }

    /// Publishes through the control plane's API.
    pub async fn api_publish(&self, topic: &str, event: &str, data: Value) -> (u16, String) {
        let body = json!({"topic": topic, "event": event, "data": data}).to_string();
        self.http(
            "POST",
            "/api/v1/publish",
            &[("Authorization", &format!("Bearer {API_KEY}"))],
            &body,
        )
        .await
    }

    /// A counter's value from `/metrics` (summed over label sets matching `labels`).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (status, text) = self.http("GET", "/metrics", &[], "").await;
        assert_eq!(status, 200);
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                let (metric, rest) = key.split_once('{').map_or((key, ""), |(m, r)| (m, r));
                (metric == name && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
            })
            .sum()
    }
}

impl Drop for Wse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- wse-server log ----\n{}", self.log());
        }
    }
}

/// A minimal HTTP/1.1 client (one request per connection), enough for the control plane.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    let typed = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    if !body.is_empty() && !typed {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp))
        .await
        .expect("control plane answered in time")
        .unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, dechunk(&body))
}

/// Undoes `Transfer-Encoding: chunked` when the body looks chunked.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if n == 0 {
            return out;
        }
        if after.len() < n {
            return body.to_owned();
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
}

/// A token for `sub` with extra claims, valid for an hour, signed with [`SECRET`].
pub fn token(sub: &str, extra: Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut claims = json!({"sub": sub, "iat": now, "exp": now + 3600});
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A token for `sub`, valid for an hour, signed with `secret`.
pub fn token_signed(secret: &str, sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": sub, "iat": now, "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A token that may publish anywhere.
pub fn publisher_token(sub: &str) -> String {
    token(sub, json!({"wse_publish": {"allow": ["*"]}}))
}

/// Opens a raw TCP connection and completes a WebSocket upgrade by hand; returns the stream and
/// any bytes that followed the 101 response.
pub fn raw_upgrade(
    addr: SocketAddr,
    path: &str,
    extra_headers: &str,
) -> (std::net::TcpStream, Vec<u8>) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "closed during upgrade: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).into_owned();
            assert!(head.starts_with("HTTP/1.1 101"), "not upgraded: {head}");
            return (s, buf[i + 4..].to_vec());
        }
    }
}

/// Sends raw bytes and returns everything received until the server closes (or `timeout`).
pub fn send_and_read_to_end(
    s: &mut std::net::TcpStream,
    bytes: &[u8],
    timeout: Duration,
) -> Vec<u8> {
    use std::io::Write;
    s.write_all(bytes).unwrap();
    read_to_end(s, timeout)
}

/// Reads until EOF, an error, or `timeout`.
pub fn read_to_end(s: &mut std::net::TcpStream, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut chunk = [0u8; 65536];
    while Instant::now() < deadline {
        s.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
    out
}

/// The server frames on `s` up to its close frame, or what came before EOF or `timeout`. Stops at
/// the close frame rather than EOF: the server ends the TCP connection only once the peer answers
/// the close or its close timeout passes (5 s by default).
pub fn frames_until_close(s: &mut std::net::TcpStream, timeout: Duration) -> Vec<(u8, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let frames = server_frames(&bytes);
        let left = deadline.saturating_duration_since(Instant::now());
        if close_code(&frames).is_some() || left.is_zero() {
            return frames;
        }
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return server_frames(&bytes),
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Decodes the server frames in `bytes` (unmasked); returns (opcode, payload) pairs.
pub fn server_frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 2 <= bytes.len() {
        let op = bytes[i] & 0x0f;
        let mut len = u64::from(bytes[i + 1] & 0x7f);
        let mut p = i + 2;
        if len == 126 {
            if p + 2 > bytes.len() {
                break;
            }
            len = u64::from(u16::from_be_bytes([bytes[p], bytes[p + 1]]));
            p += 2;
        } else if len == 127 {
            if p + 8 > bytes.len() {
                break;
            }
            len = u64::from_be_bytes(bytes[p..p + 8].try_into().unwrap());
            p += 8;
        }
        let end = p + len as usize;
        if end > bytes.len() {
            break;
        }
        out.push((op, bytes[p..end].to_vec()));
        i = end;
    }
    out
}

/// The close code of the last close frame in `frames`, if any.
pub fn close_code(frames: &[(u8, Vec<u8>)]) -> Option<u16> {
    frames
        .iter()
        .rev()
        .find(|(op, _)| *op == 8)
        .and_then(|(_, p)| (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])))
}

/// A masked client frame.
pub fn client_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut f = vec![first_byte];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The Python of the test venv (`tests/python/setup-venv.sh`: the published `wse-client` and the
/// example backend's packages), created on first use.
pub fn venv_python() -> std::path::PathBuf {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(root.join("tests/python/setup-venv.sh"))
        .status()
        .expect("run tests/python/setup-venv.sh");
    assert!(
        status.success(),
        "setting up the Python venv failed: {status}"
    );
    std::env::var_os("WSE_PY_VENV")
        .map_or_else(|| root.join("target/py-venv"), std::path::PathBuf::from)
        .join("bin/python")
}

/// Collects a piped child's stderr as it comes, for failure messages.
pub fn collect_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    for_each_line(child.stderr.take().expect("stderr piped"), move |line| {
        let mut l = sink.lock().unwrap();
        l.push_str(&line);
        l.push('\n');
        true
    });
    log
}

/// Hands each line of `r` to `each` on a thread of its own, until the end of the stream or
/// until `each` returns false.
pub fn for_each_line(
    r: impl Read + Send + 'static,
    mut each: impl FnMut(String) -> bool + Send + 'static,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if !each(line) {
                break;
            }
        }
    });
}

/// The process's resident set size (`VmRSS` in `/proc/<pid>/status`), bytes; `None` where
/// `/proc` has no such line (not Linux, or the process is gone).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}
