//! The server API (docs/API.md) through the real binary over real HTTP: every endpoint, the batch
//! endpoint, the OpenAPI document, and errors that are always JSON and 4xx for the caller's
//! mistakes.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{API_KEY, Wse, token};
use wse_client::{Client, Connector, Encoding, Error};

const T: Duration = Duration::from_secs(10);

/// A request to the control plane with the API key; the body parsed as JSON.
async fn api(wse: &Wse, method: &str, path: &str, body: Value) -> (u16, Value) {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (status, text) = wse
        .http(method, path, &[("X-API-Key", API_KEY)], &body)
        .await;
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, value)
}

/// Asserts an error status and code, and the error shape.
fn assert_error(reply: &(u16, Value), status: u16, code: &str) {
    assert_eq!(reply.0, status, "{}", reply.1);
    assert_eq!(reply.1["error"]["code"], code, "{}", reply.1);
    assert!(reply.1["error"]["message"].is_string(), "{}", reply.1);
}

async fn client(wse: &Wse, user: &str) -> (Client, String) {
    let c = Connector::new(wse.url())
        .token(token(user, json!({})))
        .connect()
        .await
        .unwrap();
    let id = c.connection_id().to_owned();
    (c, id)
}

#[tokio::test]
async fn every_connection_endpoint_over_http() {
    let wse = Wse::start(&["--cores", "2", "--presence-enabled", "true"]);
    let (mut alice, id) = client(&wse, "alice").await;
    let conn = |op: &str| format!("/api/v1/connections/{id}/{op}");

    let (status, list) = api(&wse, "GET", "/api/v1/connections", Value::Null).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["count"], 1);
    assert_eq!(list["connections"][0]["connection_id"], id.as_str());
    assert_eq!(list["connections"][0]["user_id"], "alice");
    let (_, count) = api(&wse, "GET", "/api/v1/connections/count", Value::Null).await;
    assert_eq!(count, json!({"count": 1}));

    // Frames, verbatim.
    let (status, sent) = api(
        &wse,
        "POST",
        &conn("send"),
        json!({"text": r#"{"t":"a","p":1}"#}),
    )
    .await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["duplicate"], false);
    assert_eq!(alice.recv().await.unwrap().t, "a");
    api(
        &wse,
        "POST",
        &conn("send"),
        json!({"binary": "eyJ0IjoiYiJ9"}),
    )
    .await; // {"t":"b"}
    let ev = alice.recv().await.unwrap();
    assert_eq!((ev.t.as_str(), ev.encoding), ("b", Encoding::BinaryJson));

    // Events: the envelope, and a repeated id sends nothing.
    let event = json!({"event": {"t": "note", "p": {"n": 1}, "id": "evt-1"}});
    let (_, first) = api(&wse, "POST", &conn("send_event"), event.clone()).await;
    let (_, again) = api(&wse, "POST", &conn("send_event"), event).await;
    assert_eq!(
        (first["duplicate"].clone(), again["duplicate"].clone()),
        (json!(false), json!(true))
    );
    let ev = alice.recv().await.unwrap();
    assert_eq!(
        (ev.t.as_str(), &ev.raw["id"], &ev.raw["seq"]),
        ("note", &json!("evt-1"), &json!(2))
    );

    // Subscriptions made by the application, with presence; broadcasts reach them.
    let (status, sub) = api(
        &wse,
        "POST",
        &conn("subscribe"),
        json!({"topics": ["room", "bad\u{7}"], "presence": {"mood": "ok"}}),
    )
    .await;
    assert_eq!(status, 200, "{sub}");
    assert_eq!(sub["success_topics"], json!(["room"]));
    assert_eq!(sub["failed_topics"][0]["topic"], "bad\u{7}");
    let (_, n) = api(
        &wse,
        "GET",
        "/api/v1/topics/room/subscribers/count",
        Value::Null,
    )
    .await;
    assert_eq!(n, json!({"topic": "room", "count": 1, "queue_groups": {}}));
    let (_, members) = api(&wse, "GET", "/api/v1/presence/room", Value::Null).await;
    assert_eq!(members["members"][0]["data"], json!({"mood": "ok"}));
    let (_, stats) = api(&wse, "GET", "/api/v1/presence/room/stats", Value::Null).await;
    assert_eq!(stats["users"], 1);
    let (status, _) = api(
        &wse,
        "POST",
        "/api/v1/broadcast",
        json!({"topic": "room", "event": "m", "data": {"k": 1}}),
    )
    .await;
    assert_eq!(status, 200);
    let ev = alice.recv_until(|e| e.t == "m", T).await.unwrap();
    assert_eq!(ev.p, json!({"k": 1}));
    let (status, _) = api(
        &wse,
        "POST",
        "/api/v1/broadcast_local",
        json!({"topic": "room", "message": {"c": "U", "t": "raw", "p": 2, "v": 1}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(alice.recv_until(|e| e.t == "raw", T).await.unwrap().p, 2);

    // An ACL that denies the topic drops the subscription; unsubscribe answers what was left.
    let (_, acl) = api(&wse, "POST", &conn("acl"), json!({"deny": ["ro*"]})).await;
    assert_eq!(acl, json!({"removed": ["room"]}));
    let (_, sub) = api(
        &wse,
        "POST",
        &conn("subscribe"),
        json!({"topics": ["room", "lobby"]}),
    )
    .await;
    assert_eq!(
        sub["failed_topics"][0],
        json!({"topic": "room", "reason": "FORBIDDEN"})
    );
    let (_, left) = api(&wse, "POST", &conn("unsubscribe"), json!({})).await;
    assert_eq!(left, json!({"unsubscribed": ["lobby"]}));

    // A user's connections, everyone.
    let (_, to_user) = api(
        &wse,
        "POST",
        "/api/v1/users/alice/send",
        json!({"event": {"t": "dm"}}),
    )
    .await;
    assert_eq!(to_user, json!({"connections": 1}));
    alice.recv_until(|e| e.t == "dm", T).await.unwrap();
    let (_, nobody) = api(
        &wse,
        "POST",
        "/api/v1/users/nobody/send",
        json!({"text": "x"}),
    )
    .await;
    assert_eq!(nobody, json!({"connections": 0}));
    let (_, all) = api(
        &wse,
        "POST",
        "/api/v1/broadcast_all",
        json!({"text": r#"{"t":"all"}"#}),
    )
    .await;
    assert_eq!(all, json!({"connections": 1}));
    alice.recv_until(|e| e.t == "all", T).await.unwrap();

    // Disconnect with a reconnecting code; then the connection is unknown.
    let (status, _) = api(
        &wse,
        "POST",
        &conn("disconnect"),
        json!({"code": 4000, "reason": "kick"}),
    )
    .await;
    assert_eq!(status, 200);
    match alice.recv_until(|_| false, T).await {
        Err(Error::Closed { code, .. }) => assert_eq!(code, 4000),
        other => panic!("expected a close, got {other:?}"),
    }
    let gone = api(&wse, "POST", &conn("send"), json!({"text": "x"})).await;
    assert_error(&gone, 404, "UNKNOWN_CONNECTION");
}

#[tokio::test]
async fn mistakes_are_json_4xx_never_500() {
    let wse = Wse::start(&["--cores", "2"]);
    let unknown = "/api/v1/connections/0000000100000001/send";
    let cases: Vec<((u16, Value), u16, &str)> = vec![
        (
            api(&wse, "POST", unknown, json!({"text": "x"})).await,
            404,
            "UNKNOWN_CONNECTION",
        ),
        (
            api(
                &wse,
                "POST",
                "/api/v1/connections/zz/send",
                json!({"text": "x"}),
            )
            .await,
            400,
            "INVALID_CONNECTION_ID",
        ),
        (
            api(&wse, "POST", unknown, json!({"txt": "typo"})).await,
            400,
            "INVALID_REQUEST",
        ),
        (
            api(
                &wse,
                "POST",
                unknown,
                json!({"text": "x", "binary": "AA=="}),
            )
            .await,
            400,
            "INVALID_REQUEST",
        ),
        (
            api(&wse, "POST", unknown, json!({"binary": "***"})).await,
            400,
            "INVALID_REQUEST",
        ),
        (
            api(
                &wse,
                "POST",
                unknown,
                json!({"connection_id": "x", "text": "x"}),
            )
            .await,
            400,
            "INVALID_REQUEST",
        ),
        (
            api(
                &wse,
                "POST",
                "/api/v1/broadcast",
                json!({"topic": "", "data": 1}),
            )
            .await,
            400,
            "INVALID_TOPIC",
        ),
        (
            api(
                &wse,
                "POST",
                "/api/v1/broadcast",
                json!({"topic": "t", "message": [1]}),
            )
            .await,
            400,
            "INVALID_REQUEST",
        ),
        (
            api(
                &wse,
                "GET",
                "/api/v1/topics/a%01b/subscribers/count",
                Value::Null,
            )
            .await,
            400,
            "INVALID_TOPIC",
        ),
        (
            api(&wse, "GET", "/api/v1/presence/room", Value::Null).await,
            404,
            "PRESENCE_DISABLED",
        ),
        (
            api(
                &wse,
                "POST",
                "/api/v1/connections/0000000100000001/disconnect",
                json!({"code": 1001}),
            )
            .await,
            400,
            "INVALID_CLOSE_CODE",
        ),
        (
            api(
                &wse,
                "POST",
                "/api/v1/connections/0000000100000001/send_event",
                json!({"event": {"p": 1}}),
            )
            .await,
            400,
            "INVALID_EVENT",
        ),
        (
            api(&wse, "POST", "/api/v1/drain", json!({"close_code": 1000})).await,
            400,
            "INVALID_CLOSE_CODE",
        ),
        (
            api(&wse, "POST", "/api/v1/batch", json!({"commands": 5})).await,
            400,
            "INVALID_REQUEST",
        ),
        (
            api(&wse, "GET", "/api/v1/nothing", Value::Null).await,
            404,
            "NOT_FOUND",
        ),
        (
            api(&wse, "GET", "/api/v1/broadcast", Value::Null).await,
            405,
            "METHOD_NOT_ALLOWED",
        ),
    ];
    for (reply, status, code) in &cases {
        assert_error(reply, *status, code);
    }
    let (status, text) = wse
        .http("POST", unknown, &[("X-API-Key", API_KEY)], "{not json")
        .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("INVALID_JSON"), "{text}");
    let (status, text) = wse.http("GET", "/api/v1/connections", &[], "").await;
    assert_eq!(status, 401, "{text}");
}

#[tokio::test]
async fn batch_runs_commands_in_order_with_a_result_each() {
    let wse = Wse::start(&["--cores", "2"]);
    let (mut bob, id) = client(&wse, "bob").await;
    let (status, out) = api(
        &wse,
        "POST",
        "/api/v1/batch",
        json!({"commands": [
            {"op": "subscribe", "connection_id": id, "topics": ["t1"]},
            {"op": "broadcast", "topic": "t1", "event": "first", "data": 1},
            {"op": "send", "connection_id": id, "text": r#"{"t":"second"}"#},
            {"op": "send", "connection_id": "0000000100000009", "text": "x"},
            {"op": "no_such_op"},
            "not an object",
            {"op": "get_topic_subscriber_count", "topic": "t1"},
            {"op": "get_connection_count"},
            {"op": "health"},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    let results = out["results"].as_array().unwrap();
    assert_eq!(results.len(), 9);
    let oks: Vec<bool> = results.iter().map(|r| r["ok"] == true).collect();
    assert_eq!(
        oks,
        [true, true, true, false, false, false, true, true, true]
    );
    assert_eq!(results[3]["error"]["code"], "UNKNOWN_CONNECTION");
    assert_eq!(results[3]["error"]["status"], 404);
    assert_eq!(results[4]["error"]["code"], "INVALID_REQUEST");
    assert_eq!(results[6]["result"]["count"], 1);
    assert_eq!(results[8]["result"]["status"], "ok");
    // Both arrive. (In order of execution; a publication travels through its topic's owner
    // shard, so it may still reach the client after a later direct send.)
    let mut got = Vec::new();
    while got.len() < 2 {
        let ev = bob.recv().await.unwrap();
        if ev.t != "subscription_update" {
            got.push(ev.t);
        }
    }
    got.sort();
    assert_eq!(got, ["first", "second"]);
    // A bare array is a batch too.
    let (status, out) = api(
        &wse,
        "POST",
        "/api/v1/batch",
        json!([{"op": "get_connections"}]),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(out["results"][0]["result"]["count"], 1);
}

#[tokio::test]
async fn health_openapi_and_a_drain_that_ends_the_process() {
    let mut wse = Wse::start(&["--cores", "2"]);
    let (mut carl, _) = client(&wse, "carl").await;
    let (status, health) = api(&wse, "GET", "/api/v1/health", Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(
        (health["status"].as_str(), health["connections"].as_u64()),
        (Some("ok"), Some(1))
    );
    // The description needs no key, and names every endpoint.
    let (status, text) = wse.http("GET", "/api/v1/openapi.json", &[], "").await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/api/v1/connections/{id}/send_event"]["post"].is_object());

    // Dave does not read, so he does not answer the close: the drain waits for him (up to its
    // timeout) and the probe can be asked meanwhile.
    let (_dave, _) = client(&wse, "dave").await;
    let (status, out) = api(
        &wse,
        "POST",
        "/api/v1/drain",
        json!({"close_code": 4301, "timeout": 2}),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    let (status, body) = wse.http("GET", "/health", &[], "").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""status":"draining""#), "{body}");
    match carl.recv_until(|_| false, T).await {
        Err(Error::Closed { code, .. }) => assert_eq!(code, 4301),
        other => panic!("expected a close, got {other:?}"),
    }

    // The probe answers 503 until Dave's close times out (2 s), then the process exits 0.
    let (answers, exit) = health_until_exit(&mut wse).await;
    assert!(exit.success(), "{exit:?}");
    let served: Vec<u16> = answers.iter().copied().take_while(|&s| s != 0).collect();
    assert!(served.len() >= 10, "{answers:?}");
    assert!(served.iter().all(|&s| s == 503), "{answers:?}");
    let log = wse.log();
    assert!(log.contains("drain timed out with"), "{log}");
    assert!(!log.contains("closing connections with"), "{log}");
}

/// Asks `/health` until the process exits; returns each answer's status (0: refused) and the
/// exit status. A drain must answer 503 throughout and end with exit 0.
async fn health_until_exit(wse: &mut Wse) -> (Vec<u16>, std::process::ExitStatus) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut answers = Vec::new();
    loop {
        if let Some(exit) = wse.wait_exit(Duration::from_millis(50)) {
            return (answers, exit);
        }
        assert!(std::time::Instant::now() < deadline, "still running");
        let control = wse.control.unwrap();
        let probe = tokio::time::timeout(
            Duration::from_secs(1),
            support::http(control, "GET", "/health", &[], ""),
        );
        // The listener closes as the process ends: a refused probe after the drain's end is
        // fine; one before is what this test exists to catch (see below).
        let status = match tokio::spawn(probe).await {
            Ok(Ok((status, _))) => status,
            _ => 0,
        };
        answers.push(status);
    }
}

/// SIGTERM drains as the API does: `/health` answers 503 while the connection that does not
/// answer its close holds the drain open, the log says it timed out, and the exit is 0.
#[tokio::test]
async fn sigterm_drains_with_health_503_until_the_end() {
    // Wse::start sets --drain-timeout 3s.
    let mut wse = Wse::start(&["--cores", "2"]);
    let (_dave, _) = client(&wse, "dave").await;
    let started = std::time::Instant::now();
    wse.sigterm();
    let (answers, exit) = health_until_exit(&mut wse).await;
    assert!(exit.success(), "{exit:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "{:?}",
        started.elapsed()
    );
    // Every probe while the drain ran was a 503; at most the last ones, as the process ended,
    // were refused.
    let served: Vec<u16> = answers.iter().copied().take_while(|&s| s != 0).collect();
    assert!(served.len() >= 10, "{answers:?}");
    assert!(served.iter().all(|&s| s == 503), "{answers:?}");
    assert!(
        answers[served.len()..].iter().all(|&s| s == 0),
        "{answers:?}"
    );
    let log = wse.log();
    assert!(
        log.contains("drain timed out with 1 connections still open"),
        "{log}"
    );
    assert!(!log.contains("drain complete"), "{log}");
}
