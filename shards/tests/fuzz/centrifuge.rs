//! The Centrifuge session (`centrifuge::Session`, sans-IO) fed arbitrary bytes and random command
//! sequences in both encodings, with the shard's answers coming back in any order.
//!
//! Properties: no input panics; what one message causes is bounded by the commands it holds
//! (at most `COMMANDS_PER_MESSAGE_MAX`); the outcome does not depend on how commands are grouped
//! into messages (up to a fault, which closes the connection before replies still waiting for
//! the shard); replies leave in command order whatever order the shard answers in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message as _;
use wse_shards::centrifuge::codec::COMMANDS_PER_MESSAGE_MAX;
use wse_shards::centrifuge::proto::{
    Command, ConnectRequest, HistoryRequest, PresenceRequest, PublishRequest, Reply,
    SubscribeRequest, UnsubscribeRequest,
};
use wse_shards::centrifuge::{
    Answer, CentrifugeConfig, Cx, DisconnectCode, Format, NamespaceConfig, Request, Session,
    Settings, Ticket,
};

use crate::cases;

fn settings() -> Arc<Settings> {
    let open = |name: &str| NamespaceConfig {
        name: name.into(),
        history_size: 16,
        history_ttl: Duration::from_secs(60),
        presence: true,
        join_leave: true,
        allow_subscribe_for_client: true,
        allow_publish_for_client: true,
        allow_history_for_client: true,
        allow_presence_for_client: true,
        ..Default::default()
    };
    let cfg = CentrifugeConfig {
        channel_limit: 4,
        namespaces: vec![open("room"), open("")],
        ..Default::default()
    };
    Arc::new(Settings::new(&cfg, 64 * 1024))
}

/// A connected session (auth off: anonymous).
fn connected(format: Format, now: Instant) -> Session {
    let mut s = Session::new(format, "c1".into(), settings(), now);
    let connect = Command {
        id: 1,
        connect: Some(ConnectRequest::default()),
        ..Default::default()
    };
    s.handle_message(cx(now), &encode(format, &[connect]))
        .unwrap();
    assert!(s.poll_transmit().is_some());
    s
}

fn cx(now: Instant) -> Cx<'static> {
    Cx {
        now,
        wall_s: 0,
        auth: None,
    }
}

fn encode(format: Format, commands: &[Command]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in commands.iter().enumerate() {
        match format {
            Format::Json => {
                if i > 0 {
                    out.push(b'\n');
                }
                out.extend_from_slice(&serde_json::to_vec(c).unwrap());
            }
            Format::Protobuf => c.encode_length_delimited(&mut out).unwrap(),
        }
    }
    out
}

fn ticket(r: &Request) -> Option<Ticket> {
    match r {
        Request::Subscribe { ticket, .. }
        | Request::Publish { ticket, .. }
        | Request::Presence { ticket, .. }
        | Request::PresenceStats { ticket, .. }
        | Request::History { ticket, .. }
        | Request::Rpc { ticket, .. } => Some(*ticket),
        Request::Unsubscribe { .. } | Request::Send { .. } => None,
    }
}

/// A successful answer of the right kind for `r`.
fn answer(r: &Request) -> Option<Answer> {
    let ticket = ticket(r)?;
    Some(match r {
        Request::Subscribe { .. } => Answer::Subscribed {
            ticket,
            top: None,
            recovery: None,
        },
        Request::Publish { .. } => Answer::Published { ticket },
        Request::Presence { .. } => Answer::Presence {
            ticket,
            clients: Vec::new(),
        },
        Request::PresenceStats { .. } => Answer::PresenceStats {
            ticket,
            num_clients: 1,
            num_users: 1,
        },
        Request::Rpc { .. } => Answer::Rpc {
            ticket,
            result: Ok(bytes::Bytes::from_static(b"{}")),
        },
        _ => Answer::History {
            ticket,
            publications: Vec::new(),
            top: Default::default(),
        },
    })
}

fn format() -> impl Strategy<Value = Format> {
    prop_oneof![Just(Format::Json), Just(Format::Protobuf)]
}

fn channel() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("room:a".to_owned()),
        Just("room:b".to_owned()),
        Just("plain".to_owned()),
        Just("nope:x".to_owned()),
        Just("$room:p".to_owned()),
        Just("room:d#c1".to_owned()),
        "[a-z:$#]{0,12}",
    ]
}

/// A well-formed command with an id (never connect or the pong, which have rules of their own).
fn command() -> impl Strategy<Value = Command> {
    let data = prop_oneof![
        Just(Bytes::from_static(b"{\"k\":1}")),
        Just(Bytes::from_static(b"[1,2]")),
        Just(Bytes::new()),
    ];
    (1u32..1000, channel(), data, -2i32..5, 0u8..6).prop_map(|(id, channel, data, n, kind)| {
        let mut c = Command {
            id,
            ..Default::default()
        };
        match kind {
            0 => {
                c.subscribe = Some(SubscribeRequest {
                    channel,
                    recover: n > 2,
                    offset: n.unsigned_abs().into(),
                    flag: i64::from(n & 3),
                    ..Default::default()
                })
            }
            1 => c.unsubscribe = Some(UnsubscribeRequest { channel }),
            2 => {
                c.publish = Some(PublishRequest {
                    channel,
                    data,
                    kind: 0,
                })
            }
            3 => c.presence = Some(PresenceRequest { channel }),
            4 => c.presence_stats = Some(PresenceRequest { channel }),
            _ => {
                c.history = Some(HistoryRequest {
                    channel,
                    limit: n,
                    ..Default::default()
                })
            }
        }
        c
    })
}

/// Runs `commands` grouped into messages at `splits`, answering every request right away.
/// Returns the replies and requests in order, and how it ended.
fn run(
    format: Format,
    commands: &[Command],
    splits: &[Index],
) -> (Vec<Bytes>, Vec<Request>, Result<(), DisconnectCode>) {
    let now = Instant::now();
    let mut s = connected(format, now);
    let mut cuts: Vec<usize> = splits.iter().map(|i| i.index(commands.len() + 1)).collect();
    cuts.push(0);
    cuts.push(commands.len());
    cuts.sort_unstable();
    cuts.dedup();
    let (mut sent, mut requests) = (Vec::new(), Vec::new());
    let mut end = Ok(());
    for pair in cuts.windows(2) {
        let message = encode(format, &commands[pair[0]..pair[1]]);
        end = step(&mut s, now, &message, &mut requests);
        sent.extend(std::iter::from_fn(|| s.poll_transmit()));
        if end.is_err() {
            break;
        }
    }
    (sent, requests, end)
}

/// One message, then the answers to what it asked. After a fault, what the commands before it
/// asked is still collected (the connection carries it out as it closes), and nothing answered.
fn step(
    s: &mut Session,
    now: Instant,
    message: &[u8],
    requests: &mut Vec<Request>,
) -> Result<(), DisconnectCode> {
    match s.handle_message(cx(now), message) {
        Ok(()) => answer_all(s, now, requests),
        Err(e) => {
            requests.extend(std::iter::from_fn(|| s.poll_request()));
            Err(e)
        }
    }
}

/// Answers every request, those of commands that waited for an answer included, in order.
fn answer_all(
    s: &mut Session,
    now: Instant,
    requests: &mut Vec<Request>,
) -> Result<(), DisconnectCode> {
    while let Some(r) = s.poll_request() {
        let a = answer(&r);
        requests.push(r);
        if let Some(a) = a
            && let Err(e) = s.answer(cx(now), a)
        {
            // What the commands before the fault asked for still counts.
            requests.extend(std::iter::from_fn(|| s.poll_request()));
            return Err(e);
        }
    }
    Ok(())
}

fn reply_id(format: Format, message: &[u8]) -> u32 {
    match format {
        Format::Json => serde_json::from_slice::<Reply>(message).unwrap().id,
        Format::Protobuf => Reply::decode_length_delimited(message).unwrap().id,
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_and_cause_bounded_work(
        format in format(),
        messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..512), 1..8),
    ) {
        let now = Instant::now();
        let mut s = connected(format, now);
        for m in &messages {
            let result = s.handle_message(cx(now), m);
            let requests = std::iter::from_fn(|| s.poll_request()).count();
            let replies = std::iter::from_fn(|| s.poll_transmit()).count();
            prop_assert!(requests <= COMMANDS_PER_MESSAGE_MAX);
            prop_assert!(replies <= COMMANDS_PER_MESSAGE_MAX);
            if result.is_err() {
                break;
            }
        }
    }

    #[test]
    fn grouping_into_messages_does_not_change_the_outcome(
        format in format(),
        commands in prop::collection::vec(command(), 1..24),
        splits in prop::collection::vec(any::<Index>(), 0..6),
    ) {
        let apart = {
            let now = Instant::now();
            let mut s = connected(format, now);
            let (mut sent, mut requests) = (Vec::new(), Vec::new());
            let mut end = Ok(());
            for c in &commands {
                end = step(&mut s, now, &encode(format, std::slice::from_ref(c)), &mut requests);
                sent.extend(std::iter::from_fn(|| s.poll_transmit()));
                if end.is_err() {
                    break;
                }
            }
            (sent, requests, end)
        };
        let grouped = run(format, &commands, &splits);
        prop_assert_eq!(&grouped.1, &apart.1);
        prop_assert_eq!(grouped.2, apart.2);
        if grouped.2.is_ok() {
            prop_assert_eq!(&grouped.0, &apart.0);
        } else {
            // A fault closes the connection (3501, terminal for the client) at once: replies
            // still waiting for the shard then are not sent, those before them are.
            prop_assert!(apart.0.starts_with(&grouped.0));
        }
    }

    #[test]
    fn replies_leave_in_command_order_whatever_order_the_shard_answers_in(
        format in format(),
        commands in prop::collection::vec(command(), 1..24),
        order in prop::collection::vec(any::<Index>(), 0..24),
    ) {
        let now = Instant::now();
        let mut s = connected(format, now);
        let message = encode(format, &commands);
        let mut end = s.handle_message(cx(now), &message);
        // Outstanding answers, given back in a random order; answering may release commands that
        // waited, whose requests join the outstanding ones.
        let mut outstanding: Vec<Answer> = Vec::new();
        let mut order = order.into_iter();
        loop {
            outstanding.extend(std::iter::from_fn(|| s.poll_request()).filter_map(|r| answer(&r)));
            if outstanding.is_empty() || end.is_err() {
                break;
            }
            let at = order.next().map_or(0, |i| i.index(outstanding.len()));
            let a = outstanding.remove(at);
            if let Err(e) = s.answer(cx(now), a) {
                end = Err(e);
            }
        }
        let ids: Vec<u32> = std::iter::from_fn(|| s.poll_transmit())
            .map(|m| reply_id(format, &m))
            .collect();
        // The commands that got a reply, in order: every one up to the fault, if any.
        let expected: Vec<u32> = commands.iter().map(|c| c.id).take(ids.len()).collect();
        prop_assert_eq!(&ids, &expected);
        if end.is_ok() {
            prop_assert_eq!(ids.len(), commands.len());
        }
    }
}
