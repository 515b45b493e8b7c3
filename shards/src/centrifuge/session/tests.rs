//! The session against byte-exact fixtures from the protocol's contract (spec `centrifuge.md`):
//! no sockets, a virtual clock.

use std::time::{Duration, Instant};

use bytes::Bytes;
use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
use prost::Message as _;
use serde_json::{Value, json};

use super::*;
use crate::centrifuge::config::NamespaceConfig;
use crate::centrifuge::proto::Publication;
use crate::config::AuthConfig;

const SECRET: &str = "centrifuge-test-secret-0123456789abcdef";
const QUEUED_MAX: usize = 4096;

fn settings() -> Arc<Settings> {
    let history = |name: &str, size| NamespaceConfig {
        name: name.into(),
        history_size: size,
        history_ttl: Duration::from_secs(300),
        presence: true,
        ..Default::default()
    };
    let cfg = CentrifugeConfig {
        namespaces: vec![
            NamespaceConfig {
                allow_subscribe_for_client: true,
                allow_publish_for_client: true,
                allow_history_for_client: true,
                allow_presence_for_client: true,
                join_leave: true,
                ..history("room", 100)
            },
            history("user", 50),
            NamespaceConfig {
                name: "forced".into(),
                force_recovery: true,
                allow_subscribe_for_client: true,
                ..history("forced", 10)
            },
            NamespaceConfig {
                name: "plain".into(),
                allow_subscribe_for_client: true,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    Arc::new(Settings::new(&cfg, QUEUED_MAX))
}

fn auth() -> Authenticator {
    Authenticator::new(&AuthConfig {
        enabled: true,
        secret: Some(SECRET.into()),
        ..Default::default()
    })
    .unwrap()
}

fn token(claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn wall() -> u64 {
    get_current_timestamp()
}

/// A session plus its clock.
struct Harness {
    s: Session,
    now: Instant,
    auth: Authenticator,
}

impl Harness {
    fn new(format: Format) -> Self {
        let now = Instant::now();
        Self {
            s: Session::new(format, "c1".into(), settings(), now),
            now,
            auth: auth(),
        }
    }

    fn send(&mut self, message: &str) -> Result<(), DisconnectCode> {
        let cx = Cx {
            now: self.now,
            wall_s: wall(),
            auth: Some(&self.auth),
        };
        self.s.handle_message(cx, message.as_bytes())
    }

    fn answer(&mut self, answer: Answer) -> Result<(), DisconnectCode> {
        let cx = Cx {
            now: self.now,
            wall_s: wall(),
            auth: Some(&self.auth),
        };
        self.s.answer(cx, answer)
    }

    fn sent(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.s.poll_transmit())
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect()
    }

    fn requests(&mut self) -> Vec<Request> {
        std::iter::from_fn(|| self.s.poll_request()).collect()
    }

    /// Connects as `sub` with a one-hour token; returns the connect reply.
    fn connect(&mut self, sub: &str) -> String {
        let t = token(json!({"sub": sub, "exp": wall() + 3600}));
        self.send(&format!("{{\"id\":1,\"connect\":{{\"token\":\"{t}\"}}}}"))
            .unwrap();
        self.sent().remove(0)
    }

    fn ticket_of(request: &Request) -> Ticket {
        match request {
            Request::Subscribe { ticket, .. }
            | Request::Publish { ticket, .. }
            | Request::Presence { ticket, .. }
            | Request::PresenceStats { ticket, .. }
            | Request::History { ticket, .. } => *ticket,
            other => panic!("no ticket in {other:?}"),
        }
    }
}

fn connect_reply(ttl: u64) -> String {
    format!(
        "{{\"id\":1,\"connect\":{{\"client\":\"c1\",\"version\":\"{SERVER_VERSION}\",\
         \"expires\":true,\"ttl\":{ttl},\"ping\":25,\"pong\":true}}}}"
    )
}

#[test]
fn connect_and_subscribe_in_one_message_are_handled_in_order() {
    let mut h = Harness::new(Format::Json);
    let t = token(json!({"sub": "alice", "exp": wall() + 3600}));
    // centrifuge-js 5.7.4's first message: `id` after the body.
    h.send(&format!(
        "{{\"connect\":{{\"token\":\"{t}\",\"name\":\"js\"}},\"id\":1}}\n\
         {{\"subscribe\":{{\"channel\":\"room:main\",\"flag\":1}},\"id\":2}}"
    ))
    .unwrap();
    assert_eq!(h.sent(), [connect_reply(3600)]);
    assert_eq!(h.s.user(), Some("alice"));
    let requests = h.requests();
    assert_eq!(requests.len(), 1);
    let Request::Subscribe {
        ticket,
        channel,
        stream,
        recover,
        presence,
        join_leave,
    } = &requests[0]
    else {
        panic!("{requests:?}")
    };
    assert_eq!(&**channel, "room:main");
    assert!(!stream, "neither recoverable nor positioned was asked for");
    assert_eq!(recover, &None);
    assert_eq!(presence.as_ref().unwrap().user, "alice");
    assert!(!join_leave);
    assert!(h.sent().is_empty(), "the reply waits for the shard");
    h.answer(Answer::Subscribed {
        ticket: *ticket,
        top: None,
        recovery: None,
    })
    .unwrap();
    assert_eq!(h.sent(), ["{\"id\":2,\"subscribe\":{}}"]);
}

#[test]
fn token_channels_are_server_side_subscriptions_and_a_client_subscribe_gets_105() {
    let mut h = Harness::new(Format::Json);
    let t = token(json!({
        "sub": "alice", "exp": wall() + 3600, "channels": ["room:main", "user:alice"]
    }));
    // token-bowl-chat 4.0.2: connect, then a subscribe per channel without waiting.
    h.send(&format!(
        "{{\"id\": 1, \"connect\": {{\"token\": \"{t}\"}}}}"
    ))
    .unwrap();
    h.send("{\"id\": 2, \"subscribe\": {\"channel\": \"room:main\", \"recover\": true}}")
        .unwrap();
    let requests = h.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(
        h.sent().is_empty(),
        "connect waits for its server-side subscriptions"
    );
    for r in &requests {
        h.answer(Answer::Subscribed {
            ticket: Harness::ticket_of(r),
            top: Some(StreamPosition {
                offset: 4,
                epoch: "0000beef".into(),
            }),
            recovery: None,
        })
        .unwrap();
    }
    // Not asked to recover: neither recoverable nor positioned (no force_* in these namespaces).
    assert_eq!(
        h.sent(),
        [
            format!(
                "{{\"id\":1,\"connect\":{{\"client\":\"c1\",\"version\":\"{SERVER_VERSION}\",\
                 \"expires\":true,\"ttl\":3600,\"subs\":{{\"room:main\":{{}},\"user:alice\":{{}}}},\
                 \"ping\":25,\"pong\":true}}}}"
            ),
            "{\"id\":2,\"error\":{\"code\":105,\"message\":\"already subscribed\"}}".to_owned(),
        ]
    );
}

#[test]
fn connect_subs_recover_server_side_subscriptions() {
    let mut h = Harness::new(Format::Json);
    let t = token(json!({"sub": "bob", "exp": wall() + 3600, "channels": ["user:bob"]}));
    h.send(&format!(
        "{{\"id\":1,\"connect\":{{\"token\":\"{t}\",\"subs\":{{\"user:bob\":\
         {{\"recover\":true,\"offset\":2,\"epoch\":\"0000beef\"}}}}}}}}"
    ))
    .unwrap();
    let requests = h.requests();
    let Request::Subscribe {
        ticket, recover, ..
    } = &requests[0]
    else {
        panic!()
    };
    assert_eq!(
        recover,
        &Some(StreamPosition {
            offset: 2,
            epoch: "0000beef".into()
        })
    );
    h.answer(Answer::Subscribed {
        ticket: *ticket,
        top: Some(StreamPosition {
            offset: 3,
            epoch: "0000beef".into(),
        }),
        recovery: Some((
            true,
            vec![Publication {
                data: Bytes::from_static(b"{\"n\":3}"),
                offset: 3,
                ..Default::default()
            }],
        )),
    })
    .unwrap();
    let reply: Value = serde_json::from_str(&h.sent()[0]).unwrap();
    assert_eq!(
        reply["connect"]["subs"]["user:bob"],
        json!({"recoverable": true, "epoch": "0000beef", "recovered": true, "offset": 2,
               "positioned": true, "was_recovering": true,
               "publications": [{"data": {"n": 3}, "offset": 3}]})
    );
}

#[test]
fn anything_but_connect_before_connect_is_a_bad_request() {
    for first in [
        "{}",
        "{\"id\":1,\"subscribe\":{\"channel\":\"room:main\"}}",
        "{\"id\":1,\"ping\":{}}",
    ] {
        let mut h = Harness::new(Format::Json);
        assert_eq!(h.send(first), Err(DisconnectCode::BadRequest), "{first}");
    }
    let mut h = Harness::new(Format::Json);
    h.connect("alice");
    let again = token(json!({"sub": "alice", "exp": wall() + 60}));
    assert_eq!(
        h.send(&format!(
            "{{\"id\":2,\"connect\":{{\"token\":\"{again}\"}}}}"
        )),
        Err(DisconnectCode::BadRequest)
    );
    let mut h = Harness::new(Format::Json);
    h.connect("alice");
    for bad in [
        "{\"id\":0,\"publish\":{\"channel\":\"room:main\",\"data\":{}}}",
        "{\"id\":5}",
        "{\"id\":6,\"subscribe\":{\"channel\":\"\"}}",
        "not json",
    ] {
        let mut h2 = Harness::new(Format::Json);
        h2.connect("alice");
        assert_eq!(h2.send(bad), Err(DisconnectCode::BadRequest), "{bad}");
    }
}

#[test]
fn tokens_invalid_expired_or_with_a_channel_claim() {
    let mut h = Harness::new(Format::Json);
    assert_eq!(
        h.send("{\"id\":1,\"connect\":{\"token\":\"not.a.jwt\"}}"),
        Err(DisconnectCode::InvalidToken)
    );
    let mut h = Harness::new(Format::Json);
    let forged = encode(
        &Header::default(),
        &json!({"sub": "alice", "exp": wall() + 60}),
        &EncodingKey::from_secret(b"another-secret-0123456789abcdef-xyz"),
    )
    .unwrap();
    assert_eq!(
        h.send(&format!(
            "{{\"id\":1,\"connect\":{{\"token\":\"{forged}\"}}}}"
        )),
        Err(DisconnectCode::InvalidToken)
    );
    let mut h = Harness::new(Format::Json);
    let with_channel = token(json!({"sub": "alice", "exp": wall() + 60, "channel": "room:main"}));
    assert_eq!(
        h.send(&format!(
            "{{\"id\":1,\"connect\":{{\"token\":\"{with_channel}\"}}}}"
        )),
        Err(DisconnectCode::InvalidToken)
    );
    // Expired: an error reply, the connection stays and may connect again.
    let mut h = Harness::new(Format::Json);
    let expired = token(json!({"sub": "alice", "exp": wall() - 3600}));
    h.send(&format!(
        "{{\"id\":1,\"connect\":{{\"token\":\"{expired}\"}}}}"
    ))
    .unwrap();
    assert_eq!(
        h.sent(),
        ["{\"id\":1,\"error\":{\"code\":109,\"message\":\"token expired\"}}"]
    );
    assert_eq!(h.s.user(), None);
    assert_eq!(h.connect("alice"), connect_reply(3600));
    // No token while auth is on.
    let mut h = Harness::new(Format::Json);
    assert_eq!(
        h.send("{\"id\":1,\"connect\":{}}"),
        Err(DisconnectCode::BadRequest)
    );
}

#[test]
fn anonymous_when_auth_is_off() {
    let now = Instant::now();
    let mut s = Session::new(Format::Json, "c9".into(), settings(), now);
    s.handle_message(
        Cx {
            now,
            wall_s: wall(),
            auth: None,
        },
        b"{\"id\":1,\"connect\":{\"name\":\"python\"}}",
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(s.poll_transmit().unwrap().to_vec()).unwrap(),
        format!(
            "{{\"id\":1,\"connect\":{{\"client\":\"c9\",\"version\":\"{SERVER_VERSION}\",\
             \"ping\":25,\"pong\":true}}}}"
        )
    );
    assert_eq!(s.user(), Some(""));
}

#[test]
fn pings_on_schedule_pong_answers_and_3012_when_missed() {
    let mut h = Harness::new(Format::Json);
    h.connect("alice");
    let first = h.now + Duration::from_secs(25);
    assert_eq!(h.s.poll_timeout(), Some(first));
    h.s.handle_timeout(first - Duration::from_millis(1))
        .unwrap();
    assert!(h.sent().is_empty());
    h.now = first;
    h.s.handle_timeout(h.now).unwrap();
    assert_eq!(h.sent(), ["{}"]);
    // Answered: the next ping 25 s after the first, whatever else happened.
    h.send("{}").unwrap();
    assert_eq!(h.s.poll_timeout(), Some(first + Duration::from_secs(25)));
    // A pong with no ping outstanding.
    assert_eq!(h.send("{}"), Err(DisconnectCode::BadRequest));

    let mut h = Harness::new(Format::Json);
    h.connect("alice");
    h.now += Duration::from_secs(25);
    h.s.handle_timeout(h.now).unwrap();
    assert_eq!(h.sent(), ["{}"]);
    assert_eq!(h.s.poll_timeout(), Some(h.now + Duration::from_secs(8)));
    h.now += Duration::from_secs(8);
    assert_eq!(h.s.handle_timeout(h.now), Err(DisconnectCode::NoPong));
}

#[test]
fn no_connect_in_time_is_stale() {
    let mut h = Harness::new(Format::Json);
    assert_eq!(h.s.poll_timeout(), Some(h.now + CONNECT_TIMEOUT));
    assert_eq!(
        h.s.handle_timeout(h.now + CONNECT_TIMEOUT),
        Err(DisconnectCode::Stale)
    );
}

#[test]
fn an_expired_connection_closes_with_3005_after_the_delay_unless_refreshed() {
    let mut h = Harness::new(Format::Json);
    let t = token(json!({"sub": "alice", "exp": wall() + 60}));
    h.send(&format!("{{\"id\":1,\"connect\":{{\"token\":\"{t}\"}}}}"))
        .unwrap();
    assert_eq!(h.sent(), [connect_reply(60)]);
    let close = h.now + Duration::from_secs(60 + 25);
    // Pings keep coming (and being answered) until then.
    let mut at = h.now;
    loop {
        at += Duration::from_secs(25);
        if at >= close {
            break;
        }
        h.s.handle_timeout(at).unwrap();
        h.send("{}").unwrap();
    }
    assert_eq!(
        h.s.handle_timeout(close),
        Err(DisconnectCode::ConnectionExpired)
    );

    let mut h = Harness::new(Format::Json);
    let t = token(json!({"sub": "alice", "exp": wall() + 60}));
    h.send(&format!("{{\"id\":1,\"connect\":{{\"token\":\"{t}\"}}}}"))
        .unwrap();
    h.sent();
    let fresh = token(json!({"sub": "alice", "exp": wall() + 7200}));
    h.send(&format!(
        "{{\"id\":2,\"refresh\":{{\"token\":\"{fresh}\"}}}}"
    ))
    .unwrap();
    assert_eq!(
        h.sent(),
        [format!(
            "{{\"id\":2,\"refresh\":{{\"client\":\"c1\",\"version\":\"{SERVER_VERSION}\",\
             \"expires\":true,\"ttl\":7200}}}}"
        )]
    );
    assert!(h.s.poll_timeout().unwrap() < h.now + Duration::from_secs(26));
    h.s.handle_timeout(h.now + Duration::from_secs(25)).unwrap();
    h.send("{}").unwrap();
    assert!(h.s.handle_timeout(close).is_ok(), "refreshed: not closed");
    // Another user's token cannot refresh this connection.
    let other = token(json!({"sub": "mallory", "exp": wall() + 7200}));
    assert_eq!(
        h.send(&format!(
            "{{\"id\":3,\"refresh\":{{\"token\":\"{other}\"}}}}"
        )),
        Err(DisconnectCode::InvalidToken)
    );
}

#[test]
fn the_server_refreshes_a_connections_expiry_or_expires_it() {
    let mut h = Harness::new(Format::Json);
    assert_eq!(
        h.s.server_refresh(h.now, wall(), None, true),
        Ok(()),
        "not connected"
    );
    h.connect("alice");
    // A later expiry: 3005 only `expired_close_delay` (25 s) after it.
    h.s.server_refresh(h.now, wall(), Some(wall() + 7200), false)
        .unwrap();
    let close = h.now + Duration::from_secs(7200 + 25);
    let mut at = h.now;
    loop {
        at += Duration::from_secs(25);
        if at >= close {
            break;
        }
        h.s.handle_timeout(at).unwrap();
        h.send("{}").unwrap();
    }
    assert_eq!(
        h.s.handle_timeout(close),
        Err(DisconnectCode::ConnectionExpired)
    );
    // 0: never; None: unchanged; expired: at once.
    let mut h = Harness::new(Format::Json);
    h.connect("alice");
    h.s.server_refresh(h.now, wall(), Some(0), false).unwrap();
    h.s.server_refresh(h.now, wall(), None, false).unwrap();
    let late = h.now + Duration::from_secs(3600 + 25);
    h.s.handle_timeout(late - Duration::from_secs(1)).unwrap();
    h.send("{}").unwrap();
    assert!(h.s.handle_timeout(late).is_ok(), "no expiry any more");
    assert_eq!(
        h.s.server_refresh(h.now, wall(), None, true),
        Err(DisconnectCode::ConnectionExpired)
    );
}

#[test]
fn subscribe_refusals_have_their_codes() {
    let mut h = Harness::new(Format::Json);
    h.connect("alice");
    let cases = [
        (
            "{\"id\":2,\"subscribe\":{\"channel\":\"nope:x\"}}",
            102,
            "unknown channel",
        ),
        (
            "{\"id\":3,\"subscribe\":{\"channel\":\"user:alice\"}}",
            103,
            "permission denied",
        ),
        (
            "{\"id\":4,\"subscribe\":{\"channel\":\"$room:secret\"}}",
            103,
            "permission denied",
        ),
        (
            "{\"id\":5,\"subscribe\":{\"channel\":\"room:dm#bob,carol\"}}",
            103,
            "permission denied",
        ),
        (
            "{\"id\":6,\"subscribe\":{\"channel\":\"room:x\",\"type\":4}}",
            108,
            "not available",
        ),
        (
            "{\"id\":7,\"subscribe\":{\"channel\":\"room:x\",\"tf\":{\"op\":\"eq\"}}}",
            108,
            "not available",
        ),
    ];
    for (command, code, message) in cases {
        h.send(command).unwrap();
        let id: Value = serde_json::from_str(command).unwrap();
        assert_eq!(
            h.sent(),
            [format!(
                "{{\"id\":{},\"error\":{{\"code\":{code},\"message\":\"{message}\"}}}}",
                id["id"]
            )],
            "{command}"
        );
    }
    let long = format!(
        "{{\"id\":8,\"subscribe\":{{\"channel\":\"room:{}\"}}}}",
        "x".repeat(251)
    );
    h.send(&long).unwrap();
    assert_eq!(
        h.sent(),
        ["{\"id\":8,\"error\":{\"code\":107,\"message\":\"bad request\"}}"]
    );
    // Listed in a user-limited channel: allowed.
    h.send("{\"id\":9,\"subscribe\":{\"channel\":\"room:dm#alice,bob\"}}")
        .unwrap();
    let requests = h.requests();
    assert_eq!(requests.len(), 1);
    // A command after a subscribe that waits for the shard waits too: its fault shows once
    // the subscribe is answered.
    assert_eq!(
        h.send("{\"id\":10,\"subscribe\":{\"channel\":\"room:x\",\"delta\":\"zstd\"}}"),
        Ok(())
    );
    assert!(h.requests().is_empty());
    assert_eq!(
        h.answer(Answer::Subscribed {
            ticket: Harness::ticket_of(&requests[0]),
            top: None,
            recovery: None,
        }),
        Err(DisconnectCode::BadRequest)
    );
    assert_eq!(h.sent(), ["{\"id\":9,\"subscribe\":{}}"]);
}

#[test]
fn channel_limit_is_106() {
    let cfg = CentrifugeConfig {
        channel_limit: 1,
        namespaces: vec![NamespaceConfig {
            name: "room".into(),
            allow_subscribe_for_client: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    let now = Instant::now();
    let mut s = Session::new(
        Format::Json,
        "c1".into(),
        Arc::new(Settings::new(&cfg, QUEUED_MAX)),
        now,
    );
    s.handle_message(Cx { now, wall_s: wall(), auth: None }, b"{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"room:a\"}}\n{\"id\":3,\"subscribe\":{\"channel\":\"room:b\"}}").unwrap();
    let ticket = Harness::ticket_of(&s.poll_request().unwrap());
    s.answer(
        Cx {
            now,
            wall_s: wall(),
            auth: None,
        },
        Answer::Subscribed {
            ticket,
            top: None,
            recovery: None,
        },
    )
    .unwrap();
    let sent: Vec<String> = std::iter::from_fn(|| s.poll_transmit())
        .map(|b| String::from_utf8(b.to_vec()).unwrap())
        .collect();
    assert_eq!(
        &sent[1..],
        [
            "{\"id\":2,\"subscribe\":{}}",
            "{\"id\":3,\"error\":{\"code\":106,\"message\":\"limit exceeded\"}}"
        ]
    );
}

#[test]
fn recovery_replies_and_flag_bit_2() {
    let mut h = Harness::new(Format::Json);
    h.connect("alice");
    h.send("{\"id\":2,\"subscribe\":{\"channel\":\"room:main\",\"recover\":true,\"offset\":3,\"epoch\":\"abcd0001\",\"flag\":1}}").unwrap();
    let r = h.requests();
    let Request::Subscribe {
        ticket,
        stream,
        recover,
        ..
    } = &r[0]
    else {
        panic!()
    };
    assert!(stream);
    assert_eq!(
        recover,
        &Some(StreamPosition {
            offset: 3,
            epoch: "abcd0001".into()
        })
    );
    let publication = |n: u64| Publication {
        data: Bytes::from(format!("{{\"n\":{n}}}")),
        offset: n,
        ..Default::default()
    };
    h.answer(Answer::Subscribed {
        ticket: *ticket,
        top: Some(StreamPosition {
            offset: 5,
            epoch: "abcd0001".into(),
        }),
        recovery: Some((true, vec![publication(4), publication(5)])),
    })
    .unwrap();
    assert_eq!(
        h.sent(),
        [
            "{\"id\":2,\"subscribe\":{\"recoverable\":true,\"epoch\":\"abcd0001\",\"publications\":[\
          {\"data\":{\"n\":4},\"offset\":4},{\"data\":{\"n\":5},\"offset\":5}],\"recovered\":true,\
          \"offset\":3,\"positioned\":true,\"was_recovering\":true}}"
        ]
    );

    // Another epoch: not recovered, the current top, no publications.
    h.send("{\"id\":3,\"subscribe\":{\"channel\":\"room:other\",\"recover\":true,\"offset\":3,\"epoch\":\"old00000\"}}").unwrap();
    let ticket = Harness::ticket_of(&h.requests()[0]);
    h.answer(Answer::Subscribed {
        ticket,
        top: Some(StreamPosition {
            offset: 9,
            epoch: "abcd0001".into(),
        }),
        recovery: Some((true, vec![publication(4)])),
    })
    .unwrap();
    assert_eq!(
        h.sent(),
        [
            "{\"id\":3,\"subscribe\":{\"recoverable\":true,\"epoch\":\"abcd0001\",\"offset\":9,\
          \"positioned\":true,\"was_recovering\":true}}"
        ]
    );

    // Flag bit 2: 112 instead, and the shard's subscription is undone.
    h.send("{\"id\":4,\"subscribe\":{\"channel\":\"room:gone\",\"recover\":true,\"offset\":1,\"epoch\":\"abcd0001\",\"flag\":3}}").unwrap();
    let ticket = Harness::ticket_of(&h.requests()[0]);
    h.answer(Answer::Subscribed {
        ticket,
        top: Some(StreamPosition {
            offset: 900,
            epoch: "abcd0001".into(),
        }),
        recovery: Some((false, Vec::new())),
    })
    .unwrap();
    assert_eq!(
        h.sent(),
        ["{\"id\":4,\"error\":{\"code\":112,\"message\":\"unrecoverable position\"}}"]
    );
    assert_eq!(
        h.requests(),
        [Request::Unsubscribe {
            channel: "room:gone".into()
        }]
    );

    // force_recovery: recoverable without asking.
    h.send("{\"id\":5,\"subscribe\":{\"channel\":\"forced:a\"}}")
        .unwrap();
    let ticket = Harness::ticket_of(&h.requests()[0]);
    h.answer(Answer::Subscribed {
        ticket,
        top: Some(StreamPosition {
            offset: 2,
            epoch: "abcd0002".into(),
        }),
        recovery: None,
    })
    .unwrap();
    assert_eq!(
        h.sent(),
        [
            "{\"id\":5,\"subscribe\":{\"recoverable\":true,\"epoch\":\"abcd0002\",\"offset\":2,\"positioned\":true}}"
        ]
    );
}

#[test]
fn publish_presence_history_unsubscribe() {
    let mut h = Harness::new(Format::Json);
    let t = token(json!({"sub": "alice", "exp": wall() + 3600, "info": {"name": "Alice"}}));
    h.send(&format!("{{\"id\":1,\"connect\":{{\"token\":\"{t}\"}}}}"))
        .unwrap();
    h.sent();
    h.send("{\"id\":2,\"publish\":{\"channel\":\"room:main\",\"data\":{\"text\":\"hi\"}}}\n\
            {\"id\":3,\"publish\":{\"channel\":\"user:bob\",\"data\":{}}}\n\
            {\"id\":4,\"publish\":{\"channel\":\"plain\",\"data\":1}}\n\
            {\"id\":5,\"presence\":{\"channel\":\"room:main\"}}\n\
            {\"id\":6,\"presence_stats\":{\"channel\":\"room:main\"}}\n\
            {\"id\":7,\"history\":{\"channel\":\"room:main\",\"limit\":-1,\"since\":{\"offset\":1,\"epoch\":\"e\"},\"reverse\":true}}\n\
            {\"id\":8,\"history\":{\"channel\":\"plain\",\"limit\":10}}\n\
            {\"id\":9,\"presence\":{\"channel\":\"plain\"}}\n\
            {\"id\":10,\"unsubscribe\":{\"channel\":\"room:never\"}}\n\
            {\"id\":11,\"rpc\":{\"method\":\"m\",\"data\":{}}}\n\
            {\"send\":{\"data\":{\"k\":1}}}")
        .unwrap();
    let requests = h.requests();
    let alice = ClientInfo {
        user: "alice".into(),
        client: "c1".into(),
        conn_info: Bytes::from_static(b"{\"name\":\"Alice\"}"),
        chan_info: Bytes::new(),
    };
    assert_eq!(requests.len(), 6, "{requests:?}");
    assert_eq!(
        requests[0],
        Request::Publish {
            ticket: Harness::ticket_of(&requests[0]),
            channel: "room:main".into(),
            data: Bytes::from_static(b"{\"text\":\"hi\"}"),
            info: alice.clone(),
        }
    );
    let Request::History {
        limit,
        since,
        reverse,
        ..
    } = &requests[3]
    else {
        panic!()
    };
    assert_eq!(
        (*limit, since.clone(), *reverse),
        (
            300,
            Some(StreamPosition {
                offset: 1,
                epoch: "e".into()
            }),
            true
        )
    );
    let Request::Rpc {
        ticket: rpc,
        method,
        data,
    } = &requests[4]
    else {
        panic!("{:?}", requests[4])
    };
    assert_eq!((method.as_str(), &data[..]), ("m", &b"{}"[..]));
    let rpc = *rpc;
    assert_eq!(
        requests[5],
        Request::Send {
            data: Bytes::from_static(b"{\"k\":1}")
        }
    );
    // Replies wait in order behind the publish.
    assert!(h.sent().is_empty());
    h.answer(Answer::Published {
        ticket: Harness::ticket_of(&requests[0]),
    })
    .unwrap();
    h.answer(Answer::History {
        ticket: Harness::ticket_of(&requests[3]),
        publications: vec![Publication {
            data: Bytes::from_static(b"{\"text\":\"hi\"}"),
            info: Some(alice.clone()),
            offset: 1,
            ..Default::default()
        }],
        top: StreamPosition {
            offset: 1,
            epoch: "e".into(),
        },
    })
    .unwrap();
    assert_eq!(
        h.sent(),
        [
            "{\"id\":2,\"publish\":{}}",
            "{\"id\":3,\"error\":{\"code\":103,\"message\":\"permission denied\"}}",
            "{\"id\":4,\"error\":{\"code\":103,\"message\":\"permission denied\"}}",
        ]
    );
    h.answer(Answer::Presence {
        ticket: Harness::ticket_of(&requests[1]),
        clients: vec![alice],
    })
    .unwrap();
    h.answer(Answer::PresenceStats {
        ticket: Harness::ticket_of(&requests[2]),
        num_clients: 2,
        num_users: 1,
    })
    .unwrap();
    assert_eq!(
        h.sent(),
        [
            "{\"id\":5,\"presence\":{\"presence\":{\"c1\":{\"user\":\"alice\",\"client\":\"c1\",\"conn_info\":{\"name\":\"Alice\"}}}}}",
            "{\"id\":6,\"presence_stats\":{\"num_clients\":2,\"num_users\":1}}",
            "{\"id\":7,\"history\":{\"publications\":[{\"data\":{\"text\":\"hi\"},\"info\":{\"user\":\"alice\",\"client\":\"c1\",\"conn_info\":{\"name\":\"Alice\"}},\"offset\":1}],\"epoch\":\"e\",\"offset\":1}}",
            "{\"id\":8,\"error\":{\"code\":108,\"message\":\"not available\"}}",
            "{\"id\":9,\"error\":{\"code\":108,\"message\":\"not available\"}}",
            "{\"id\":10,\"unsubscribe\":{}}",
        ]
    );
    // The rpc held no place: its reply goes out when the backend's comes.
    h.answer(Answer::Rpc {
        ticket: rpc,
        result: Ok(Bytes::from_static(b"{\"ok\":true}")),
    })
    .unwrap();
    assert_eq!(h.sent(), ["{\"id\":11,\"rpc\":{\"data\":{\"ok\":true}}}"]);
}

#[test]
fn publications_wait_behind_the_subscribe_reply_and_are_bounded() {
    let mut h = Harness::new(Format::Json);
    h.connect("alice");
    h.send("{\"id\":2,\"subscribe\":{\"channel\":\"room:main\"}}")
        .unwrap();
    let ticket = Harness::ticket_of(&h.requests()[0]);
    let publication = encode_publication(
        Format::Json,
        "room:main",
        Publication {
            data: Bytes::from_static(b"{\"n\":1}"),
            offset: 1,
            ..Default::default()
        },
    )
    .unwrap();
    h.s.push(publication.clone()).unwrap();
    assert!(h.sent().is_empty());
    h.answer(Answer::Subscribed {
        ticket,
        top: None,
        recovery: None,
    })
    .unwrap();
    assert_eq!(
        h.sent(),
        [
            "{\"id\":2,\"subscribe\":{}}",
            "{\"push\":{\"channel\":\"room:main\",\"pub\":{\"data\":{\"n\":1},\"offset\":1}}}",
        ]
    );
    // Nothing held back: pushes go whatever their number.
    for _ in 0..(QUEUED_MAX / publication.len() + 2) {
        h.s.push(publication.clone()).unwrap();
    }
    h.sent();
    h.send("{\"id\":3,\"subscribe\":{\"channel\":\"room:two\"}}")
        .unwrap();
    let mut result = Ok(());
    for _ in 0..(QUEUED_MAX / publication.len() + 2) {
        result = result.and_then(|()| h.s.push(publication.clone()));
    }
    assert_eq!(result, Err(DisconnectCode::Slow));
}

#[test]
fn subscription_tokens_open_private_channels() {
    let mut h = Harness::new(Format::Json);
    h.connect("alice");
    let sub = |claims: Value| token(claims);
    let good = sub(
        json!({"sub": "alice", "channel": "$room:secret", "exp": wall() + 60, "data": {"k": 1}}),
    );
    let other_user = sub(json!({"sub": "bob", "channel": "$room:secret", "exp": wall() + 60}));
    let other_channel = sub(json!({"sub": "alice", "channel": "$room:else", "exp": wall() + 60}));
    let other_client =
        sub(json!({"sub": "alice", "channel": "$room:secret", "client": "c2", "exp": wall() + 60}));
    let expired = sub(json!({"sub": "alice", "channel": "$room:secret", "exp": wall() - 3600}));
    for (id, t, want) in [
        (
            2,
            &other_user,
            "{\"id\":2,\"error\":{\"code\":103,\"message\":\"permission denied\"}}",
        ),
        (
            3,
            &other_channel,
            "{\"id\":3,\"error\":{\"code\":103,\"message\":\"permission denied\"}}",
        ),
        (
            4,
            &other_client,
            "{\"id\":4,\"error\":{\"code\":103,\"message\":\"permission denied\"}}",
        ),
        (
            5,
            &expired,
            "{\"id\":5,\"error\":{\"code\":109,\"message\":\"token expired\"}}",
        ),
    ] {
        h.send(&format!(
            "{{\"id\":{id},\"subscribe\":{{\"channel\":\"$room:secret\",\"token\":\"{t}\"}}}}"
        ))
        .unwrap();
        assert_eq!(h.sent(), [want]);
    }
    h.send(&format!(
        "{{\"id\":6,\"subscribe\":{{\"channel\":\"$room:secret\",\"token\":\"{good}\"}}}}"
    ))
    .unwrap();
    let ticket = Harness::ticket_of(&h.requests()[0]);
    h.answer(Answer::Subscribed {
        ticket,
        top: None,
        recovery: None,
    })
    .unwrap();
    assert_eq!(
        h.sent(),
        ["{\"id\":6,\"subscribe\":{\"expires\":true,\"ttl\":60,\"data\":{\"k\":1}}}"]
    );
}

#[test]
fn subscription_tokens_expire_unless_refreshed() {
    let mut h = Harness::new(Format::Json);
    h.connect("alice");
    let sub = |ttl: i64| {
        token(
            json!({"sub": "alice", "channel": "$room:p", "exp": wall() as i64 + ttl,
                     "info": {"role": "mod"}}),
        )
    };
    h.send(&format!(
        "{{\"id\":2,\"subscribe\":{{\"channel\":\"$room:p\",\"token\":\"{}\"}}}}",
        sub(60)
    ))
    .unwrap();
    let r = h.requests();
    let Request::Subscribe { presence, .. } = &r[0] else {
        panic!()
    };
    assert_eq!(
        &presence.as_ref().unwrap().chan_info[..],
        b"{\"role\":\"mod\"}"
    );
    h.answer(Answer::Subscribed {
        ticket: Harness::ticket_of(&r[0]),
        top: None,
        recovery: None,
    })
    .unwrap();
    assert_eq!(
        h.sent(),
        ["{\"id\":2,\"subscribe\":{\"expires\":true,\"ttl\":60}}"]
    );
    // Refreshing: not subscribed, not a token subscription, no token, an expired one.
    h.send("{\"id\":3,\"sub_refresh\":{\"channel\":\"$room:q\",\"token\":\"x\"}}")
        .unwrap();
    h.send("{\"id\":4,\"sub_refresh\":{\"channel\":\"$room:p\"}}")
        .unwrap();
    h.send(&format!(
        "{{\"id\":5,\"sub_refresh\":{{\"channel\":\"$room:p\",\"token\":\"{}\"}}}}",
        sub(-3600)
    ))
    .unwrap();
    assert_eq!(
        h.sent(),
        [
            "{\"id\":3,\"error\":{\"code\":103,\"message\":\"permission denied\"}}",
            "{\"id\":4,\"error\":{\"code\":107,\"message\":\"bad request\"}}",
            "{\"id\":5,\"error\":{\"code\":110,\"message\":\"expired\"}}",
        ]
    );
    // Not refreshed: 60 s + the 25 s delay, then unsubscribed with 2501 (clients resubscribe).
    let deadline = h.now + Duration::from_secs(85);
    assert_eq!(
        h.s.poll_timeout(),
        Some(h.now + Duration::from_secs(25)),
        "the ping comes first"
    );
    h.s.handle_timeout(h.now + Duration::from_secs(25)).unwrap();
    h.send("{}").unwrap();
    h.s.handle_timeout(h.now + Duration::from_secs(50)).unwrap();
    h.send("{}").unwrap();
    h.s.handle_timeout(h.now + Duration::from_secs(75)).unwrap();
    h.send("{}").unwrap();
    h.sent();
    assert_eq!(h.s.poll_timeout(), Some(deadline));
    h.s.handle_timeout(deadline).unwrap();
    assert_eq!(
        h.sent(),
        [
            "{\"push\":{\"channel\":\"$room:p\",\"unsubscribe\":{\"code\":2501,\"reason\":\"subscription expired\"}}}"
        ]
    );
    assert_eq!(
        h.requests(),
        [Request::Unsubscribe {
            channel: "$room:p".into()
        }]
    );

    // Refreshed in time: extended, and a plain subscription cannot be refreshed.
    let mut h = Harness::new(Format::Json);
    h.connect("alice");
    h.send(&format!(
        "{{\"id\":2,\"subscribe\":{{\"channel\":\"$room:p\",\"token\":\"{}\"}}}}\n\
         {{\"id\":3,\"subscribe\":{{\"channel\":\"room:open\"}}}}",
        sub(60)
    ))
    .unwrap();
    for _ in 0..2 {
        let r = h.requests();
        h.answer(Answer::Subscribed {
            ticket: Harness::ticket_of(&r[0]),
            top: None,
            recovery: None,
        })
        .unwrap();
    }
    h.sent();
    h.send(&format!(
        "{{\"id\":4,\"sub_refresh\":{{\"channel\":\"$room:p\",\"token\":\"{}\"}}}}",
        sub(3600)
    ))
    .unwrap();
    assert_eq!(
        h.sent(),
        ["{\"id\":4,\"sub_refresh\":{\"expires\":true,\"ttl\":3600}}"]
    );
    // Past the old deadline (85 s): still subscribed, only pings went out.
    for t in [25, 50, 75, 100] {
        h.s.handle_timeout(h.now + Duration::from_secs(t)).unwrap();
        h.send("{}").unwrap();
    }
    assert_eq!(h.sent(), ["{}", "{}", "{}", "{}"]);
    assert!(h.requests().is_empty());
    assert_eq!(
        h.send("{\"id\":5,\"sub_refresh\":{\"channel\":\"room:open\",\"token\":\"x\"}}"),
        Err(DisconnectCode::BadRequest)
    );
}

#[test]
fn protobuf_session_speaks_the_same() {
    let mut h = Harness::new(Format::Protobuf);
    let t = token(json!({"sub": "alice", "exp": wall() + 3600}));
    let mut message = Vec::new();
    for command in [
        Command {
            id: 1,
            connect: Some(ConnectRequest {
                token: t,
                name: "python".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Command {
            id: 2,
            publish: Some(PublishRequest {
                channel: "room:main".into(),
                data: Bytes::from_static(&[0xff]),
                kind: 0,
            }),
            ..Default::default()
        },
        Command {
            id: 3,
            publish: Some(PublishRequest {
                channel: "room:main".into(),
                data: Bytes::from_static(b"{\"a\":1}"),
                kind: 0,
            }),
            ..Default::default()
        },
    ] {
        command.encode_length_delimited(&mut message).unwrap();
    }
    h.s.handle_message(
        Cx {
            now: h.now,
            wall_s: wall(),
            auth: Some(&h.auth),
        },
        &message,
    )
    .unwrap();
    let replies: Vec<Reply> = std::iter::from_fn(|| h.s.poll_transmit())
        .map(|b| Reply::decode_length_delimited(&b[..]).unwrap())
        .collect();
    assert_eq!(replies.len(), 2);
    let connect = replies[0].connect.as_ref().unwrap();
    assert_eq!(
        (
            connect.client.as_str(),
            connect.ping,
            connect.pong,
            connect.ttl
        ),
        ("c1", 25, true, 3600)
    );
    assert_eq!(replies[1].id, 2);
    assert_eq!(
        replies[1].error.as_ref().unwrap().code,
        107,
        "binary data cannot enter the JSON topic space"
    );
    let r = h.requests();
    h.answer(Answer::Published {
        ticket: Harness::ticket_of(&r[0]),
    })
    .unwrap();
    let b = h.s.poll_transmit().unwrap();
    assert_eq!(
        &b[..],
        [4, 0x08, 3, 0x42, 0],
        "Reply{{id: 3, publish: {{}}}}"
    );
    // The ping and the pong.
    h.now += Duration::from_secs(25);
    h.s.handle_timeout(h.now).unwrap();
    assert_eq!(&h.s.poll_transmit().unwrap()[..], [0]);
    h.s.handle_message(
        Cx {
            now: h.now,
            wall_s: wall(),
            auth: Some(&h.auth),
        },
        &[0],
    )
    .unwrap();
    assert_eq!(
        h.s.handle_message(
            Cx {
                now: h.now,
                wall_s: wall(),
                auth: Some(&h.auth)
            },
            &[0]
        ),
        Err(DisconnectCode::BadRequest)
    );
}

#[test]
fn tokens_verify_with_the_wse_keys_including_the_previous_one() {
    const OLD: &str = "the-previous-secret-0123456789abcdefgh";
    let rotating = Authenticator::new(&AuthConfig {
        enabled: true,
        secret: Some(SECRET.into()),
        previous_secret: Some(OLD.into()),
        ..Default::default()
    })
    .unwrap();
    let old = encode(
        &Header::default(),
        &json!({"sub": "alice", "exp": wall() + 60}),
        &EncodingKey::from_secret(OLD.as_bytes()),
    )
    .unwrap();
    let now = Instant::now();
    let message = format!("{{\"id\":1,\"connect\":{{\"token\":\"{old}\"}}}}");
    let mut s = Session::new(Format::Json, "c1".into(), settings(), now);
    s.handle_message(
        Cx {
            now,
            wall_s: wall(),
            auth: Some(&rotating),
        },
        message.as_bytes(),
    )
    .unwrap();
    assert_eq!(s.user(), Some("alice"));
    // Without the rotation the same token is refused.
    let mut s = Session::new(Format::Json, "c1".into(), settings(), now);
    assert_eq!(
        s.handle_message(
            Cx {
                now,
                wall_s: wall(),
                auth: Some(&auth())
            },
            message.as_bytes()
        ),
        Err(DisconnectCode::InvalidToken)
    );
}

#[test]
fn exp_is_required_and_expire_at_zero_never_expires() {
    let mut h = Harness::new(Format::Json);
    let no_exp = token(json!({"sub": "alice"}));
    assert_eq!(
        h.send(&format!(
            "{{\"id\":1,\"connect\":{{\"token\":\"{no_exp}\"}}}}"
        )),
        Err(DisconnectCode::InvalidToken)
    );
    let mut h = Harness::new(Format::Json);
    let forever = token(json!({"sub": "alice", "exp": wall() + 60, "expire_at": 0}));
    h.send(&format!(
        "{{\"id\":1,\"connect\":{{\"token\":\"{forever}\"}}}}"
    ))
    .unwrap();
    assert_eq!(
        h.sent(),
        [format!(
            "{{\"id\":1,\"connect\":{{\"client\":\"c1\",\"version\":\"{SERVER_VERSION}\",\
             \"ping\":25,\"pong\":true}}}}"
        )]
    );
    // Only the ping schedule is armed: no 3005 deadline.
    assert_eq!(h.s.poll_timeout(), Some(h.now + Duration::from_secs(25)));
}
