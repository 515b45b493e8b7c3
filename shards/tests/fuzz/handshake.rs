//! The HTTP upgrade parser (`handshake::parse`) against arbitrary bytes and against valid upgrade
//! requests with random header mutations, fed whole and in random reads.

use proptest::prelude::*;
use proptest::sample::Index;
use wse_shards::handshake::{
    Outcome, accept_key, cookie_value, parse, query_param, response_101, response_reject,
};

use crate::cases;

/// The properties every outcome has, whatever the input.
fn check_outcome(buf: &[u8], max: usize, outcome: &Outcome) -> Result<(), TestCaseError> {
    match outcome {
        Outcome::Partial => {
            prop_assert!(buf.len() < max, "Partial at {} of {max} bytes", buf.len())
        }
        Outcome::Upgrade { request, consumed } => {
            prop_assert!(*consumed <= buf.len() && *consumed <= max);
            prop_assert!(buf[..*consumed].ends_with(b"\n"));
            prop_assert_eq!(request.key.len(), 24);
            prop_assert!(!request.path.contains('?'));
            // What the connection does next must not panic either.
            let response = response_101(&accept_key(&request.key));
            prop_assert!(response.starts_with(b"HTTP/1.1 101 "));
            if let Some(query) = &request.query {
                let _ = query_param(query, "token");
                let _ = query_param(query, "format");
            }
            if let Some(cookie) = &request.cookie {
                let _ = cookie_value(cookie, "access_token");
            }
        }
        Outcome::Reject(reject) => {
            prop_assert!(matches!(reject.status, 400 | 405 | 426 | 431), "{reject:?}");
            let response = response_reject(reject);
            prop_assert!(response.starts_with(b"HTTP/1.1 4"));
        }
    }
    Ok(())
}

/// Feeds `buf` in reads cut at `splits`, as a connection does (each parse sees everything
/// received so far), and returns the first outcome that is not `Partial`.
fn feed(buf: &[u8], splits: &[Index], max: usize) -> Result<Outcome, TestCaseError> {
    let mut cuts: Vec<usize> = splits.iter().map(|i| i.index(buf.len() + 1)).collect();
    cuts.push(buf.len());
    cuts.sort_unstable();
    for cut in cuts {
        let outcome = parse(&buf[..cut], max);
        check_outcome(&buf[..cut], max, &outcome)?;
        if outcome != Outcome::Partial {
            return Ok(outcome);
        }
    }
    Ok(Outcome::Partial)
}

/// Reading in pieces finds the same upgrade as reading everything at once. (Rejections may
/// differ in their reason: a request that turns out malformed past `max` bytes is "too large"
/// when read in pieces.)
fn check_split_invariance(buf: &[u8], splits: &[Index], max: usize) -> Result<(), TestCaseError> {
    let whole = parse(buf, max);
    check_outcome(buf, max, &whole)?;
    let pieces = feed(buf, splits, max)?;
    let upgrades = |o: &Outcome| matches!(o, Outcome::Upgrade { .. });
    if upgrades(&whole) || upgrades(&pieces) {
        prop_assert_eq!(whole, pieces);
    } else if whole == Outcome::Partial {
        prop_assert_eq!(pieces, Outcome::Partial);
    }
    Ok(())
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn valid_headers() -> Vec<(String, String)> {
    [
        ("Host", "example.com"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", KEY),
        ("Sec-WebSocket-Version", "13"),
        ("Origin", "https://example.com"),
        ("Cookie", "access_token=abc; theme=dark"),
        ("Authorization", "Bearer x.y.z"),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_owned(), v.to_owned()))
    .collect()
}

/// One change to a valid request's header list.
#[derive(Clone, Debug)]
enum Mutation {
    Remove(Index),
    Duplicate(Index),
    SetName(Index, String),
    SetValue(Index, String),
    RawValue(Index, Vec<u8>),
    Add(String, String),
    Swap(Index, Index),
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "Upgrade",
            "upgrade",
            "CONNECTION",
            "Sec-WebSocket-Key",
            "sec-websocket-version",
            "Origin",
            "Cookie",
            "Authorization",
            "Host",
            "X-Forwarded-For",
        ])
        .prop_map(str::to_owned),
        "[!-~]{0,12}",
        ".{0,8}",
    ]
}

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "websocket",
            "Upgrade",
            "keep-alive, Upgrade",
            "13",
            "8",
            " 13 ",
            KEY,
            "dGhlIHNhbXBsZSBub25jZQ=",
            "AAAAAAAAAAAAAAAAAAAAAA==",
            "",
            "token=%ZZ&format=msgpack",
        ])
        .prop_map(str::to_owned),
        "[ -~]{0,40}",
        ".{0,20}",
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::Remove),
        any::<Index>().prop_map(Mutation::Duplicate),
        (any::<Index>(), header_name()).prop_map(|(i, n)| Mutation::SetName(i, n)),
        (any::<Index>(), header_value()).prop_map(|(i, v)| Mutation::SetValue(i, v)),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(i, v)| Mutation::RawValue(i, v)),
        (header_name(), header_value()).prop_map(|(n, v)| Mutation::Add(n, v)),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
    ]
}

fn request_line() -> impl Strategy<Value = String> {
    let method = prop_oneof![
        8 => Just("GET".to_owned()),
        1 => prop::sample::select(vec!["POST", "get", "HEAD", ""]).prop_map(str::to_owned),
        1 => "[A-Z]{1,8}",
    ];
    let target = prop_oneof![
        4 => Just("/wse".to_owned()),
        2 => "/[a-z]{0,8}\\?[a-z=&%0-9A-F+]{0,30}",
        1 => "[!-~]{0,30}",
    ];
    let version = prop_oneof![
        8 => Just("HTTP/1.1"),
        1 => Just("HTTP/1.0"),
        1 => Just("HTTP/2.0"),
    ];
    (method, target, version).prop_map(|(m, t, v)| format!("{m} {t} {v}"))
}

/// A valid upgrade request with mutations applied, and bytes pipelined after it.
fn near_valid_request() -> impl Strategy<Value = Vec<u8>> {
    (
        request_line(),
        prop::collection::vec(mutation(), 0..4),
        prop::bool::weighted(0.1),
        prop::collection::vec(any::<u8>(), 0..20),
    )
        .prop_map(|(line, mutations, bare_lf, trailing)| {
            let mut headers: Vec<(String, Vec<u8>)> = valid_headers()
                .into_iter()
                .map(|(n, v)| (n, v.into_bytes()))
                .collect();
            for m in mutations {
                apply(&mut headers, m);
            }
            let eol: &[u8] = if bare_lf { b"\n" } else { b"\r\n" };
            let mut buf = line.into_bytes();
            buf.extend_from_slice(eol);
            for (name, value) in headers {
                buf.extend_from_slice(name.as_bytes());
                buf.extend_from_slice(b": ");
                buf.extend_from_slice(&value);
                buf.extend_from_slice(eol);
            }
            buf.extend_from_slice(eol);
            buf.extend_from_slice(&trailing);
            buf
        })
}

fn apply(headers: &mut Vec<(String, Vec<u8>)>, m: Mutation) {
    if headers.is_empty() {
        if let Mutation::Add(n, v) = m {
            headers.push((n, v.into_bytes()));
        }
        return;
    }
    let len = headers.len();
    match m {
        Mutation::Remove(i) => {
            headers.remove(i.index(len));
        }
        Mutation::Duplicate(i) => {
            let h = headers[i.index(len)].clone();
            headers.push(h);
        }
        Mutation::SetName(i, n) => headers[i.index(len)].0 = n,
        Mutation::SetValue(i, v) => headers[i.index(len)].1 = v.into_bytes(),
        Mutation::RawValue(i, v) => headers[i.index(len)].1 = v,
        Mutation::Add(n, v) => headers.push((n, v.into_bytes())),
        Mutation::Swap(a, b) => headers.swap(a.index(len), b.index(len)),
    }
}

fn max_bytes() -> impl Strategy<Value = usize> {
    prop_oneof![Just(8192usize), 0usize..400]
}

proptest! {
    #![proptest_config(cases(8192))]

    #[test]
    fn arbitrary_bytes(
        buf in prop::collection::vec(any::<u8>(), 0..1024),
        splits in prop::collection::vec(any::<Index>(), 0..8),
        max in max_bytes(),
    ) {
        check_split_invariance(&buf, &splits, max)?;
    }

    #[test]
    fn near_valid_requests(
        buf in near_valid_request(),
        splits in prop::collection::vec(any::<Index>(), 0..8),
        max in max_bytes(),
    ) {
        check_split_invariance(&buf, &splits, max)?;
    }

    /// The unmutated request upgrades, consuming exactly the request, however it is read.
    #[test]
    fn valid_request_upgrades(
        target in "/[a-z]{0,8}(\\?[a-z=&%0-9A-F+]{0,30})?",
        trailing in prop::collection::vec(any::<u8>(), 0..20),
        splits in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        let mut buf = format!("GET {target} HTTP/1.1\r\n").into_bytes();
        for (name, value) in valid_headers() {
            buf.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        buf.extend_from_slice(b"\r\n");
        let request_len = buf.len();
        buf.extend_from_slice(&trailing);
        let outcome = feed(&buf, &splits, 8192)?;
        let Outcome::Upgrade { request, consumed } = outcome else {
            return Err(TestCaseError::fail(format!("not upgraded: {outcome:?}")));
        };
        prop_assert_eq!(consumed, request_len);
        prop_assert_eq!(request.key, KEY);
    }

    /// The query and cookie readers take any string.
    #[test]
    fn query_and_cookie_readers(s in ".{0,60}", name in "[a-z_]{0,8}") {
        let _ = query_param(&s, &name);
        let _ = cookie_value(&s, &name);
    }
}
