//! docs/API.md replayed: its examples are one session, run top to bottom against the real binary,
//! and every answer the page shows is compared with the server's, so the page cannot drift from
//! the code (change an answer there, or the server's behaviour, and this test fails).
//!
//! The page's convention (stated in its "This page is a test" section):
//!
//! - A `sh` block right after `<!-- replay: setup -->` is the set-up: `cargo …` and
//!   `export PATH=…` lines are skipped (the test has the binary), `NAME=value` assignments (also
//!   after `export`, several per line with `;`) are kept as variables, `$(wse-server …)` is run
//!   with the real binary, and `wse-server … &` starts the server (listeners on free loopback
//!   ports, two shards, whatever the page's flags say otherwise).
//! - In any other `sh` block, a line starting with `$ curl` is a request; the lines after it, up
//!   to the next `$ ` line or the end of the block, are its answer. The request is made as curl
//!   would make it (`-X`, `-H`, `-d` with curl's default form content type, `-s`); any other
//!   option fails the test, so the page uses nothing the test does not understand. Answers are
//!   JSON compared as values (key order aside). `…` (bare or quoted) stands for any value;
//!   a string `"$NAME"` binds NAME to the value found there the first time and must match it
//!   afterwards; later commands use it as `$NAME`.
//! - `<!-- replay: connect NAME $TOKEN -->` connects a real client (the Rust client crate) with
//!   the token; `<!-- replay: receive NAME -->` waits for that client's next message of the type
//!   shown in the following `json` block and compares it with the block;
//!   `<!-- replay: closed NAME CODE -->` waits for the server to close that client with CODE and
//!   for the server to count it gone; `<!-- replay: exit CODE -->` waits for the process to exit.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::Wse;
use wse_client::{Client, Connector, Error};

/// How long a client event, a close or the exit may take.
const T: Duration = Duration::from_secs(10);
/// The page's wildcard.
const ANY: &str = "…";

/// One thing the page asks for, in document order, with the line it starts on (for failures).
#[derive(Debug)]
enum Step {
    /// The set-up block's lines.
    Setup(Vec<String>),
    /// `$ curl …` and the answer shown.
    Curl {
        command: String,
        answer: String,
    },
    Connect {
        name: String,
        token: String,
    },
    /// Wait for `name`'s next message of the block's type and compare it with the block.
    Receive {
        name: String,
        expected: String,
    },
    Closed {
        name: String,
        code: u16,
    },
    Exit {
        code: i32,
    },
}

/// Reads the page into steps.
fn parse_page(page: &str) -> Vec<(usize, Step)> {
    let mut steps = Vec::new();
    let lines: Vec<&str> = page.lines().collect();
    // A directive that takes the next fenced block: (its line, kind, name).
    let mut pending: Option<(usize, &str, String)> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if let Some(d) = line
            .strip_prefix("<!-- replay:")
            .and_then(|d| d.strip_suffix("-->"))
        {
            let words: Vec<&str> = d.split_whitespace().collect();
            let at = i + 1;
            match words.as_slice() {
                ["setup"] => pending = Some((at, "setup", String::new())),
                ["receive", name] => pending = Some((at, "receive", (*name).to_owned())),
                ["connect", name, token] => steps.push((
                    at,
                    Step::Connect {
                        name: (*name).to_owned(),
                        token: (*token).to_owned(),
                    },
                )),
                ["closed", name, code] => steps.push((
                    at,
                    Step::Closed {
                        name: (*name).to_owned(),
                        code: code.parse().expect("a close code"),
                    },
                )),
                ["exit", code] => steps.push((
                    at,
                    Step::Exit {
                        code: code.parse().expect("an exit code"),
                    },
                )),
                _ => panic!("docs/API.md:{at}: unknown replay directive {line:?}"),
            }
            i += 1;
            continue;
        }
        let Some(lang) = line.strip_prefix("```") else {
            i += 1;
            continue;
        };
        let start = i + 1;
        let end = (start..lines.len())
            .find(|&j| lines[j].trim() == "```")
            .unwrap_or_else(|| panic!("docs/API.md:{start}: unclosed block"));
        let body: Vec<String> = lines[start..end].iter().map(|l| l.to_string()).collect();
        i = end + 1;
        match pending.take() {
            Some((_, "setup", _)) => {
                assert_eq!(lang, "sh", "docs/API.md:{start}: the set-up is a sh block");
                steps.push((start, Step::Setup(body)));
                continue;
            }
            Some((_, _, name)) => {
                assert_eq!(
                    lang, "json",
                    "docs/API.md:{start}: a receive takes a json block"
                );
                steps.push((
                    start,
                    Step::Receive {
                        name,
                        expected: body.join("\n"),
                    },
                ));
                continue;
            }
            None => {}
        }
        if lang != "sh" {
            continue;
        }
        let mut j = 0;
        while j < body.len() {
            let Some(command) = body[j].strip_prefix("$ ") else {
                j += 1;
                continue;
            };
            let at = start + j + 1;
            let answer_end = (j + 1..body.len())
                .find(|&k| body[k].starts_with("$ "))
                .unwrap_or(body.len());
            steps.push((
                at,
                Step::Curl {
                    command: command.to_owned(),
                    answer: body[j + 1..answer_end].join("\n"),
                },
            ));
            j = answer_end;
        }
    }
    assert!(pending.is_none(), "a directive without its block");
    steps
}

/// A shell-like word splitter for the page's command lines: `'…'`, `"…"` (with `$NAME`, `${NAME}`,
/// `$(…)` and `\` escapes), bare `$NAME`, and `;`/`&` as separators (returned as words of their
/// own). `$(…)` goes to `subst`. A variable the page never set fails the test.
fn words(
    line: &str,
    vars: &HashMap<String, String>,
    subst: &mut dyn FnMut(&str) -> String,
) -> Vec<String> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut word: Option<String> = None;
    let mut i = 0;
    let expand = |i: &mut usize, w: &mut String, subst: &mut dyn FnMut(&str) -> String| {
        // chars[*i] is '$'.
        *i += 1;
        if chars.get(*i) == Some(&'(') {
            let mut depth = 1;
            let mut inner = String::new();
            let mut quote: Option<char> = None;
            *i += 1;
            while *i < chars.len() {
                let c = chars[*i];
                match (quote, c) {
                    (Some(q), c) if c == q => quote = None,
                    (None, '\'' | '"') => quote = Some(c),
                    (None, '(') => depth += 1,
                    (None, ')') => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                inner.push(c);
                *i += 1;
            }
            assert!(*i < chars.len(), "unclosed $( in {line:?}");
            *i += 1;
            w.push_str(&subst(&inner));
            return;
        }
        let braced = chars.get(*i) == Some(&'{');
        if braced {
            *i += 1;
        }
        let mut name = String::new();
        while let Some(&c) = chars.get(*i) {
            if !(c.is_ascii_alphanumeric() || c == '_') {
                break;
            }
            name.push(c);
            *i += 1;
        }
        if braced {
            assert_eq!(chars.get(*i), Some(&'}'), "unclosed ${{ in {line:?}");
            *i += 1;
        }
        let value = vars
            .get(&name)
            .unwrap_or_else(|| panic!("${name} is used before the page sets it: {line:?}"));
        w.push_str(value);
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => {
                out.extend(word.take());
                i += 1;
            }
            ';' | '&' => {
                out.extend(word.take());
                out.push(c.to_string());
                i += 1;
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    w.push(chars[i]);
                    i += 1;
                }
                assert!(i < chars.len(), "unclosed ' in {line:?}");
                i += 1;
            }
            '"' => {
                let mut w = word.take().unwrap_or_default();
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    match chars[i] {
                        '\\' if matches!(chars.get(i + 1), Some('"' | '\\' | '$' | '`')) => {
                            w.push(chars[i + 1]);
                            i += 2;
                        }
                        '$' => expand(&mut i, &mut w, subst),
                        c => {
                            w.push(c);
                            i += 1;
                        }
                    }
                }
                assert!(i < chars.len(), "unclosed \" in {line:?}");
                i += 1;
                word = Some(w);
            }
            '\\' => {
                let w = word.get_or_insert_with(String::new);
                w.extend(chars.get(i + 1));
                i += 2;
            }
            '$' => {
                let mut w = word.take().unwrap_or_default();
                expand(&mut i, &mut w, subst);
                word = Some(w);
            }
            c => {
                word.get_or_insert_with(String::new).push(c);
                i += 1;
            }
        }
    }
    out.extend(word);
    out
}

/// `wse-server ARGS`, as `$(…)` in the set-up: runs the real binary, returns its stdout trimmed.
fn run_binary(inner: &str, vars: &HashMap<String, String>) -> String {
    let args = words(inner, vars, &mut |s| panic!("nested $( in {s:?}"));
    assert_eq!(
        args.first().map(String::as_str),
        Some("wse-server"),
        "the set-up's $(…) runs wse-server only: {inner:?}"
    );
    let out = Wse::command()
        .args(&args[1..])
        .output()
        .expect("run wse-server");
    assert!(
        out.status.success(),
        "{inner:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Runs the set-up block: variables, and the server started as the page starts it.
fn setup(lines: &[String], vars: &mut HashMap<String, String>) -> Wse {
    let mut server = None;
    for line in lines {
        let line = line.trim();
        if line.is_empty() || line.starts_with("cargo ") || line.starts_with("export PATH=") {
            continue;
        }
        let snapshot = vars.clone();
        let ws = words(line, &snapshot, &mut |inner| run_binary(inner, &snapshot));
        for command in ws.split(|w| w == ";") {
            let mut command: Vec<&str> = command.iter().map(String::as_str).collect();
            if command.first() == Some(&"export") {
                command.remove(0);
            }
            if command.first() == Some(&"wse-server") {
                assert_eq!(
                    command.last(),
                    Some(&"&"),
                    "the server runs in the background"
                );
                assert!(server.is_none(), "one server");
                let mut args: Vec<&str> = command[1..command.len() - 1].to_vec();
                // Free ports instead of the defaults the page's $B names; two shards whatever the
                // machine (the page shows the counts that vary as `…`).
                args.extend([
                    "--listen",
                    "127.0.0.1:0",
                    "--control-listen",
                    "127.0.0.1:0",
                    "--cores",
                    "2",
                ]);
                server = Some(Wse::start_raw(&args));
                continue;
            }
            for assignment in command {
                let (name, value) = assignment
                    .split_once('=')
                    .filter(|(n, _)| {
                        !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    })
                    .unwrap_or_else(|| panic!("set-up line not understood: {line:?}"));
                vars.insert(name.to_owned(), value.to_owned());
            }
        }
    }
    server.expect("the set-up starts wse-server")
}

/// A request as curl would send it.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

fn parse_curl(args: &[String]) -> Request {
    assert_eq!(
        args.first().map(String::as_str),
        Some("curl"),
        "only curl runs"
    );
    let (mut method, mut url, mut headers, mut body) = (None, None, Vec::new(), None);
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
                .clone()
        };
        match a.as_str() {
            "-s" => {}
            "-X" => method = Some(value("-X")),
            "-H" => {
                let h = value("-H");
                let (k, v) = h.split_once(':').expect("a header is Name: value");
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
            "-d" => body = Some(value("-d")),
            x if x.starts_with("-X") => method = Some(x[2..].to_owned()),
            x if x.starts_with('-') => panic!("curl option {x} is not part of the convention"),
            x => {
                assert!(url.is_none(), "one URL");
                url = Some(x.to_owned());
            }
        }
    }
    let url = url.expect("a URL");
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let path = rest.find('/').map_or("/", |i| &rest[i..]).to_owned();
    if body.is_some() {
        // What curl sends with -d and no Content-Type of the caller's.
        headers.push((
            "Content-Type".into(),
            "application/x-www-form-urlencoded".into(),
        ));
    }
    Request {
        method: method.unwrap_or_else(|| if body.is_some() { "POST" } else { "GET" }.into()),
        path,
        headers,
        body: body.unwrap_or_default(),
    }
}

/// The page's answer text as JSON, with bare `…` made a string so that it parses.
fn parse_answer(text: &str) -> Value {
    let mut out = String::new();
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_string {
            in_string = c != '"' || escaped;
            escaped = c == '\\' && !escaped;
            out.push(c);
        } else if c == '…' {
            out.push_str("\"…\"");
        } else {
            in_string = c == '"';
            out.push(c);
        }
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("the answer is not JSON ({e}): {text}"))
}

/// Whether `actual` is what the page shows as `expected`; binds `"$NAME"`s. `Err` says where not.
fn matches(
    expected: &Value,
    actual: &Value,
    vars: &mut HashMap<String, String>,
    at: &str,
) -> Result<(), String> {
    match (expected, actual) {
        (Value::String(s), _) if s == ANY => Ok(()),
        (Value::String(s), _) if s.starts_with('$') && s.len() > 1 => {
            let name = &s[1..];
            let value = actual
                .as_str()
                .map_or_else(|| actual.to_string(), str::to_owned);
            match vars.get(name) {
                Some(bound) if *bound != value => Err(format!(
                    "{at}: ${name} is {bound:?} but the server said {value:?}"
                )),
                Some(_) => Ok(()),
                None => {
                    vars.insert(name.to_owned(), value);
                    Ok(())
                }
            }
        }
        (Value::Object(e), Value::Object(a)) => {
            let mut keys: Vec<&String> = e.keys().chain(a.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                match (e.get(k), a.get(k)) {
                    (Some(ev), Some(av)) => matches(ev, av, vars, &format!("{at}.{k}"))?,
                    (Some(_), None) => return Err(format!("{at}.{k}: shown, not answered")),
                    (None, Some(av)) => {
                        return Err(format!("{at}.{k}: answered ({av}), not shown"));
                    }
                    (None, None) => unreachable!(),
                }
            }
            Ok(())
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => e
            .iter()
            .zip(a)
            .enumerate()
            .try_for_each(|(i, (ev, av))| matches(ev, av, vars, &format!("{at}[{i}]"))),
        _ if expected == actual => Ok(()),
        _ => Err(format!("{at}: shown {expected}, answered {actual}")),
    }
}

fn compare(
    line: usize,
    what: &str,
    expected: &str,
    actual: &Value,
    vars: &mut HashMap<String, String>,
) {
    if let Err(e) = matches(&parse_answer(expected), actual, vars, "") {
        panic!(
            "docs/API.md:{line}: {what}\n  the page shows: {expected}\n  the server answered: {actual}\n  first difference at {e}"
        );
    }
}

/// Waits until the server counts no connection (a closed client is released once its socket is
/// gone, just after the client sees the close).
async fn await_no_connections(control: SocketAddr, key_header: &(String, String)) {
    let deadline = Instant::now() + T;
    loop {
        let (_, body) = support::http(
            control,
            "GET",
            "/api/v1/connections/count",
            &[(&key_header.0, &key_header.1)],
            "",
        )
        .await;
        let n: Value = serde_json::from_str(&body).unwrap();
        if n["count"] == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the connection was never released: {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn api_md_replays_top_to_bottom() {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/API.md"))
        .expect("read docs/API.md");
    let steps = parse_page(&page);
    let curls = steps
        .iter()
        .filter(|(_, s)| matches!(s, Step::Curl { .. }))
        .count();
    assert!(
        curls >= 20,
        "only {curls} curl examples found: is the convention still followed?"
    );

    let mut vars: HashMap<String, String> = HashMap::new();
    let mut server: Option<Wse> = None;
    let mut clients: HashMap<String, Client> = HashMap::new();
    // The last request's API key header, for waiting on the server's count.
    let mut key_header: Option<(String, String)> = None;
    let mut exited = false;
    for (line, step) in steps {
        match step {
            Step::Setup(lines) => server = Some(setup(&lines, &mut vars)),
            Step::Curl { command, answer } => {
                let wse = server
                    .as_ref()
                    .unwrap_or_else(|| panic!("docs/API.md:{line}: a request before the set-up"));
                assert!(
                    !exited,
                    "docs/API.md:{line}: a request after the server exited"
                );
                let snapshot = vars.clone();
                let args = words(&command, &snapshot, &mut |s| {
                    panic!("docs/API.md:{line}: $({s}) in a request")
                });
                let req = parse_curl(&args);
                if let Some(h) = req.headers.iter().find(|(k, _)| k == "Authorization") {
                    key_header = Some(h.clone());
                }
                let headers: Vec<(&str, &str)> = req
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let (status, body) = wse.http(&req.method, &req.path, &headers, &req.body).await;
                let actual: Value = serde_json::from_str(&body).unwrap_or_else(|e| {
                    panic!("docs/API.md:{line}: answer {status} is not JSON ({e}): {body}")
                });
                compare(line, &command, &answer, &actual, &mut vars);
            }
            Step::Connect { name, token } => {
                let wse = server.as_ref().expect("a client after the set-up");
                let token = token
                    .strip_prefix('$')
                    .and_then(|v| vars.get(v))
                    .unwrap_or_else(|| panic!("docs/API.md:{line}: {token} is not a variable"));
                let client = Connector::new(wse.url())
                    .token(token.clone())
                    .connect()
                    .await
                    .unwrap_or_else(|e| {
                        panic!("docs/API.md:{line}: {name} could not connect: {e}")
                    });
                clients.insert(name, client);
            }
            Step::Receive { name, expected } => {
                let client = clients.get_mut(&name).expect("a connected client");
                let want = parse_answer(&expected);
                let t = want["t"]
                    .as_str()
                    .expect("the message shown has a type")
                    .to_owned();
                let ev = client
                    .recv_until(|e| e.t == t, T)
                    .await
                    .unwrap_or_else(|e| panic!("docs/API.md:{line}: {name} got no {t:?}: {e}"));
                compare(
                    line,
                    &format!("{name} receives"),
                    &expected,
                    &ev.raw,
                    &mut vars,
                );
            }
            Step::Closed { name, code } => {
                let mut client = clients.remove(&name).expect("a connected client");
                match client.recv_until(|_| false, T).await {
                    Err(Error::Closed { code: got, .. }) => assert_eq!(
                        got, code,
                        "docs/API.md:{line}: {name} closed with another code"
                    ),
                    other => panic!("docs/API.md:{line}: {name} was not closed: {other:?}"),
                }
                // The socket goes as a client's does once it has the close; the server then
                // releases the connection.
                drop(client);
                let wse = server.as_ref().expect("a server");
                await_no_connections(
                    wse.control.expect("control plane"),
                    key_header
                        .as_ref()
                        .expect("a request with the key came first"),
                )
                .await;
            }
            Step::Exit { code } => {
                let wse = server.as_mut().expect("a server");
                let status = wse
                    .wait_exit(T)
                    .unwrap_or_else(|| panic!("docs/API.md:{line}: the server did not exit"));
                assert_eq!(status.code(), Some(code), "docs/API.md:{line}: exit status");
                exited = true;
            }
        }
    }
    assert!(exited, "the page ends with the server's exit");
}
