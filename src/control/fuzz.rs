//! Property-based fuzzing of the control plane's request parsing: publish bodies, server-API
//! command bodies, batch entries, and whole requests (random routes, methods, keys and bodies)
//! through the router against a running one-shard engine.
//!
//! The properties: nothing panics, and every refusal is a typed [`ApiError`] (a 4xx status, a
//! stable code, the JSON error shape). Case counts keep this under a few seconds in a debug build;
//! `PROPTEST_CASES` raises them for a longer local run (see docs/ARCHITECTURE.md, "Fuzzing").

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::{Map, Value, json};
use tower::ServiceExt as _;
use wse_shards::{Config, Server};

use super::api::{body_fields, command_from};
use super::commands::{ApiCommand, OPS};
use super::publish::{parse_batch, parse_publish};
use super::{ApiError, events, router};

const KEY: &str = "kkkkkkkkkkkkkkkk";
const BODY_LIMIT: usize = 4096;

/// `default` cases, unless `PROPTEST_CASES` says otherwise.
fn cases(default: u32) -> ProptestConfig {
    let mut config = ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = default;
    }
    config
}

/// A refusal: a client error, a code, and the JSON error shape.
fn check_error(e: &ApiError) -> Result<(), TestCaseError> {
    prop_assert!(e.status.is_client_error(), "{e:?}");
    prop_assert!(!e.code.is_empty() && e.code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
    let body = e.body();
    prop_assert!(body["error"]["message"].is_string());
    Ok(())
}

fn check<T>(result: Result<T, ApiError>) -> Result<(), TestCaseError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) => check_error(&e),
    }
}

/// Parses `body` every way the control plane parses a body.
fn parse_everywhere(body: &[u8], op: &str) -> Result<(), TestCaseError> {
    check(parse_publish(body))?;
    check(parse_batch(body))?;
    match body_fields(Ok(Bytes::copy_from_slice(body))) {
        Ok(fields) => check(ApiCommand::parse(op, fields))?,
        Err(e) => check_error(&e)?,
    }
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        check(command_from(value.clone()))?;
        if let Value::Array(entries) = value {
            for entry in entries {
                check(command_from(entry))?;
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Strategies
// ------------------------------------------------------------------------------------------------

const FIELDS: &[&str] = &[
    "op",
    "connection_id",
    "user_id",
    "text",
    "binary",
    "event",
    "code",
    "reason",
    "topics",
    "topic",
    "presence",
    "queue_group",
    "recover",
    "recovery",
    "allow",
    "deny",
    "data",
    "message",
    "messages",
    "commands",
    "close_code",
    "timeout",
    "offset",
    "epoch",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        (0u64..70_000).prop_map(Value::from),
        "[0-9a-f]{16}".prop_map(Value::String),
        "[a-z:.*]{0,10}".prop_map(Value::String),
        "[A-Za-z0-9+/=]{0,12}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(FIELDS).prop_map(str::to_owned),
                        ".{0,6}"
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

/// An object with some of the known fields (random values) and maybe an `op`.
fn command_object() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(proptest::option::weighted(0.25, json_value()), FIELDS.len()),
        proptest::option::weighted(0.7, op()),
    )
        .prop_map(|(values, op)| {
            let mut map: Map<String, Value> = FIELDS
                .iter()
                .zip(values)
                .filter_map(|(k, v)| Some(((*k).to_owned(), v?)))
                .collect();
            if let Some(op) = op {
                map.insert("op".to_owned(), Value::String(op));
            }
            Value::Object(map)
        })
}

/// A command with the fields its `op` takes, of plausible values (so that it parses and runs
/// more often than not), then maybe one field dropped or one added.
fn plausible_command() -> impl Strategy<Value = Value> {
    let id = prop_oneof![3 => "[0-9a-f]{16}", 1 => ".{0,18}"];
    let topic = prop_oneof![4 => "[a-z]{1,6}(:[a-z*]{1,4})?", 1 => ".{0,10}"];
    let text = ".{0,40}";
    let b64 = prop_oneof!["([A-Za-z0-9+/]{4}){0,6}", "[A-Za-z0-9+/=]{0,10}"];
    let args = (
        id,
        topic.clone(),
        prop::collection::vec(topic, 0..4),
        text,
        b64,
        json_value(),
    );
    (
        prop::sample::select(
            OPS.iter()
                .copied()
                .filter(|op| *op != "drain")
                .collect::<Vec<_>>(),
        ),
        args,
        any::<u16>(),
        any::<bool>(),
        proptest::option::weighted(0.2, prop::sample::select(FIELDS)),
        proptest::option::weighted(0.2, (prop::sample::select(FIELDS), json_value())),
    )
        .prop_map(
            |(op, (id, topic, topics, text, b64, any), code, flag, drop, add)| {
                let mut c = match op {
                    "send" if flag => json!({"connection_id": id, "text": text}),
                    "send" => json!({"connection_id": id, "binary": b64}),
                    "send_event" => json!({"connection_id": id, "event": any}),
                    "send_user" if flag => json!({"user_id": id, "text": text}),
                    "send_user" => json!({"user_id": id, "event": any}),
                    "disconnect" => json!({"connection_id": id, "code": code, "reason": text}),
                    "subscribe" => json!({"connection_id": id, "topics": topics, "recover": flag,
                    "recovery": {topic: {"epoch": "00000000", "offset": code}}}),
                    "unsubscribe" => json!({"connection_id": id, "topics": topics}),
                    "set_acl" => json!({"connection_id": id, "allow": topics, "deny": [topic]}),
                    "broadcast" | "broadcast_local" | "broadcast_all" if flag => {
                        json!({"topic": topic, "event": text, "data": any})
                    }
                    "broadcast" | "broadcast_local" | "broadcast_all" => {
                        json!({"topic": topic, "message": any})
                    }
                    "get_topic_subscriber_count" | "presence" | "presence_stats" => {
                        json!({"topic": topic})
                    }
                    _ => json!({}),
                };
                let fields = c.as_object_mut().expect("an object");
                if let Some(field) = drop {
                    fields.remove(field);
                }
                if let Some((field, value)) = add {
                    fields.insert(field.to_owned(), value);
                }
                fields.insert("op".to_owned(), Value::String(op.to_owned()));
                c
            },
        )
}

fn op() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(OPS.to_vec()).prop_map(str::to_owned),
        1 => ".{0,10}",
    ]
}

/// Bodies: arbitrary bytes, JSON of any shape, command objects, arrays of them, publications,
/// deep nesting, and JSON cut short.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let command = prop_oneof![command_object(), plausible_command()];
    let json_body = prop_oneof![
        json_value(),
        command_object(),
        plausible_command(),
        prop::collection::vec(command.clone(), 0..4).prop_map(|c| json!({ "commands": c })),
        prop::collection::vec(command_object(), 0..4).prop_map(Value::Array),
        prop::collection::vec(command_object(), 0..4).prop_map(|c| json!({ "commands": c })),
        prop::collection::vec(command_object(), 0..4).prop_map(|m| json!({ "messages": m })),
    ]
    .prop_map(|v| serde_json::to_vec(&v).expect("a Value serialises"));
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..256),
        6 => json_body.clone(),
        1 => (json_body, any::<prop::sample::Index>())
            .prop_map(|(b, cut)| b[..cut.index(b.len() + 1)].to_vec()),
        1 => (1usize..5000, any::<bool>()).prop_map(|(depth, arr)| {
            let (open, close) = if arr { ("[", "]") } else { ("{\"data\":", "}") };
            format!("{}1{}", open.repeat(depth), close.repeat(depth)).into_bytes()
        }),
    ]
}

// ------------------------------------------------------------------------------------------------
// Properties
// ------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(2048))]

    #[test]
    fn bodies_parse_or_refuse_typed(body in body(), op in op()) {
        parse_everywhere(&body, &op)?;
    }

    #[test]
    fn commands_parse_or_refuse_typed(
        command in prop_oneof![command_object(), plausible_command()],
    ) {
        check(command_from(command.clone()))?;
        if let Value::Object(mut fields) = command {
            for op in OPS {
                fields.remove("op");
                check(ApiCommand::parse(op, fields.clone()))?;
            }
        }
    }
}

/// A route the router knows (with random path parameters), or a random path.
fn route() -> impl Strategy<Value = (&'static str, String)> {
    let id = prop_oneof![
        "[0-9a-f]{16}",
        "[!-~&&[^/?#%]]{0,20}",
        Just("%ZZ".to_owned())
    ];
    prop_oneof![
        Just(("POST", "/api/v1/publish".to_owned())),
        Just(("POST", "/api/v1/publish/batch".to_owned())),
        Just(("POST", "/api/v1/batch".to_owned())),
        Just(("POST", "/api/v1/broadcast".to_owned())),
        Just(("POST", "/api/v1/broadcast_local".to_owned())),
        Just(("POST", "/api/v1/broadcast_all".to_owned())),
        Just(("GET", "/api/v1/connections".to_owned())),
        Just(("GET", "/api/v1/connections/count".to_owned())),
        Just(("GET", "/api/v1/health".to_owned())),
        (
            prop::sample::select(vec![
                "send",
                "send_event",
                "disconnect",
                "subscribe",
                "unsubscribe",
                "acl"
            ]),
            id.clone()
        )
            .prop_map(|(what, id)| ("POST", format!("/api/v1/connections/{id}/{what}"))),
        id.clone()
            .prop_map(|u| ("POST", format!("/api/v1/users/{u}/send"))),
        id.clone()
            .prop_map(|t| ("GET", format!("/api/v1/topics/{t}/subscribers/count"))),
        id.clone()
            .prop_map(|t| ("GET", format!("/api/v1/presence/{t}"))),
        id.prop_map(|t| ("GET", format!("/api/v1/presence/{t}/stats"))),
        Just(("GET", "/health".to_owned())),
        Just(("PUT", "/api/v1/publish".to_owned())),
        // Centrifugo's API: every method, and unknown ones.
        prop::sample::select(super::centrifugo_api::METHODS.to_vec())
            .prop_map(|m| ("POST", format!("/api/{m}"))),
        "[a-z_]{1,12}".prop_map(|m| ("POST", format!("/api/{m}"))),
        "/[a-z/]{0,20}".prop_map(|p| ("POST", p)),
    ]
}

/// Whole requests through the router, against a running one-shard engine: any route, method,
/// key and body. Draining is left out (it would stop the engine the other cases use).
#[test]
fn requests_through_the_router() {
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.cores = 1;
    cfg.server.pin_threads = false;
    cfg.limits.max_message_size = BODY_LIMIT;
    let server = Arc::new(Server::start(cfg).expect("engine starts"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let app = {
        let _context = runtime.enter();
        let hub = events::Hub::new(server.clone(), false);
        router(
            server.clone(),
            Arc::new(RwLock::new(Some(KEY.to_owned()))),
            hub,
            Arc::default(),
            None,
        )
    };
    let key = prop_oneof![
        6 => Just(Some(format!("Bearer {KEY}"))),
        3 => Just(Some(format!("apikey {KEY}"))),
        1 => Just(None),
        1 => "[ -~]{0,30}".prop_map(Some),
    ];
    let mut runner = TestRunner::new(cases(512));
    runner
        .run(&(route(), key, body()), |((method, path), key, body)| {
            if String::from_utf8_lossy(&body).contains("drain") {
                return Ok(());
            }
            let mut request = Request::builder().method(method).uri(&path);
            if let Some(key) = key {
                request = request.header("authorization", key);
            }
            let Ok(request) = request.body(Body::from(body)) else {
                return Ok(()); // not a request http can even build (a bad path)
            };
            let response = runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), app.clone().oneshot(request))
                    .await
                    .expect("a reply within 10 s")
                    .expect("the router is infallible")
            });
            let status = response.status();
            prop_assert!(
                status != StatusCode::INTERNAL_SERVER_ERROR,
                "{method} {path}"
            );
            let bytes = runtime
                .block_on(axum::body::to_bytes(response.into_body(), 1 << 20))
                .expect("a body under 1 MiB");
            let centrifugo = path.starts_with("/api/")
                && !path.starts_with("/api/v1/")
                && path[5..].bytes().all(|b| b != b'/');
            if centrifugo && method == "POST" {
                // 200 with a result, an error or a batch's replies; or the key check's answer.
                if status.is_success() {
                    let v: Value = serde_json::from_slice(&bytes).expect("a JSON body");
                    prop_assert!(
                        v.get("result").is_some()
                            || v["error"]["code"].is_u64()
                            || v["replies"].is_array(),
                        "{path}: {v}"
                    );
                } else {
                    prop_assert!(
                        [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&status),
                        "{status} {path}"
                    );
                }
            } else if !status.is_success() && path != "/health" {
                let v: Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("{status} body not JSON ({e}): {bytes:?}"));
                prop_assert!(v["error"]["code"].is_string(), "{status}: {v}");
            }
            Ok(())
        })
        .unwrap();
    server.stop(Duration::from_secs(1));
}
