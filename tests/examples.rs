//! The Python example backend (`examples/python-chat/`) against the real binary: the backend
//! reads the event stream and acts over the HTTP API; real clients check the chat works, also
//! after a client sent what used to stop it. The embedded (Rust) example has its own test in
//! `examples/embedded-chat/tests/`.

mod support;

#[path = "../examples/chat_scenario.rs"]
mod chat_scenario;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_scenario::User;
use serde_json::json;
use support::{API_KEY, Wse, collect_stderr, for_each_line, token, venv_python};
use wse_client::Connector;

/// How long the backend may take to start and reach the event stream.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client waits for an answer.
const T: Duration = Duration::from_secs(10);

/// The backend process; killed when dropped.
struct Backend {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Backend {
    /// Starts `chat_backend.py` and waits for its ready line (printed once it holds the event
    /// stream).
    fn start(wse: &Wse) -> Backend {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python-chat/chat_backend.py");
        let mut child = Command::new(venv_python())
            .arg(script)
            .args(["--api", &format!("http://{}", wse.control.unwrap())])
            .env("WSE_API_KEY", API_KEY)
            .env("PYTHONUNBUFFERED", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chat_backend.py");
        let log = collect_stderr(&mut child);
        let (tx, rx) = std::sync::mpsc::channel();
        for_each_line(child.stdout.take().unwrap(), move |line| {
            tx.send(line).is_ok()
        });
        let backend = Backend { child, log };
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(line) => assert_eq!(line, "chat backend ready"),
            Err(e) => panic!(
                "chat_backend.py not ready ({e}); its log:\n{}",
                backend.log.lock().unwrap()
            ),
        }
        backend
    }
}

async fn user(wse: &Wse, name: &str) -> User {
    let client = Connector::new(wse.url())
        .token(token(name, json!({})))
        .connect()
        .await
        .unwrap();
    User::new(client, name)
}

#[tokio::test]
async fn python_chat_backend_over_the_event_stream_and_http_api() {
    let wse = Wse::start(&["--cores", "2", "--presence-enabled", "true"]);
    let _backend = Backend::start(&wse);
    chat_scenario::run(user(&wse, "ann").await, user(&wse, "bob").await).await;
}

/// Issue 10: a 10 KB `say` of 5 000 nested arrays reached the backend, whose `json.loads`
/// raised RecursionError and ended it: the chat stopped for everyone. The server now refuses it
/// (too deep), and the backend skips whatever it cannot handle; the chat goes on.
#[tokio::test]
async fn python_chat_backend_outlives_a_hostile_client() {
    let wse = Wse::start(&["--cores", "2", "--presence-enabled", "true"]);
    let backend = Backend::start(&wse);
    let mut eve = Connector::new(wse.url())
        .token(token("eve", json!({})))
        .connect()
        .await
        .unwrap();
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    eve.send_text(format!(
        r#"{{"t":"say","p":{{"room":"lobby","text":{deep}}}}}"#
    ))
    .await
    .unwrap();
    let e = eve.recv_until(|e| e.is_error(), T).await.unwrap();
    assert_eq!(e.code(), Some("INVALID_MESSAGE"), "{}", e.raw);
    // Odd but within limits: relayed, and answered.
    eve.send_text("not json at all").await.unwrap();
    eve.send_text(r#"{"t":"join","p":{"room":{"x":[1]}}}"#)
        .await
        .unwrap();
    let reply = eve.recv_until(|e| e.t == "chat_error", T).await;
    assert!(
        reply.is_ok(),
        "the backend did not answer; its log:\n{}",
        backend.log.lock().unwrap()
    );
    chat_scenario::run(user(&wse, "ann").await, user(&wse, "bob").await).await;
}

/// The backend's frame handling on its own (`tests/python/chat_frames.py`): frames too deep for
/// Python's `json`, not JSON, not UTF-8, events of the wrong shape and a handler that fails are
/// each skipped, and the next event is handled.
#[test]
fn python_chat_backend_skips_frames_it_cannot_handle() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(venv_python())
        .arg(root.join("tests/python/chat_frames.py"))
        .arg(root.join("examples/python-chat"))
        .output()
        .expect("run chat_frames.py");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.trim() == "OK",
        "{}\n{stdout}\n{stderr}",
        out.status
    );
}
