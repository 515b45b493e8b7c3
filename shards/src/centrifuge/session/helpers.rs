//! What the command handlers share: subscribing, replies in order, the held-back bytes,
//! token checks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::*;

/// What a subscribe asked for, once checked against the namespace.
pub(super) struct SubscribeOptions {
    pub(super) recoverable: bool,
    pub(super) positioned: bool,
    pub(super) recovering: Option<StreamPosition>,
    pub(super) reject_unrecovered: bool,
    pub(super) presence: bool,
    pub(super) join_leave: bool,
    pub(super) close_at: Option<Instant>,
    pub(super) granted: Granted,
}

/// What a subscription token granted (all empty without one).
#[derive(Default)]
pub(super) struct Granted {
    pub(super) token: bool,
    /// Seconds until the token expires; `None` = never.
    pub(super) ttl: Option<u64>,
    /// The token's `info`, raw JSON (`chan_info` in presence and join/leave).
    pub(super) chan_info: Bytes,
    /// The token's `data`, raw JSON, returned in the subscribe result.
    pub(super) data: Bytes,
}

/// Helpers.
impl Session {
    /// Drops a channel and its expiry; whether it was there.
    pub(super) fn forget_channel(&mut self, channel: &Arc<str>) -> bool {
        let Some(state) = self.channels.remove(channel) else {
            return false;
        };
        if let Some(at) = state.close_at {
            self.sub_deadlines.remove(&(at, Arc::clone(channel)));
        }
        true
    }

    /// A subscription token for `channel`, for this user (and this client, if it names one).
    pub(super) fn verify_subscription(
        &self,
        auth: Option<&Authenticator>,
        token: &str,
        channel: &str,
        user: &str,
        wall_s: u64,
    ) -> Result<SubscriptionClaims, ErrorCode> {
        let Some(auth) = auth else {
            return Err(ErrorCode::PermissionDenied);
        };
        match auth.verify_as::<SubscriptionClaims>(token) {
            Ok(claims) if claims.expires_at().is_some_and(|at| at <= wall_s) => {
                Err(ErrorCode::TokenExpired)
            }
            Ok(claims)
                if claims.channel == channel
                    && claims.sub == user
                    && claims.client.as_deref().is_none_or(|c| c == &*self.client) =>
            {
                Ok(claims)
            }
            Err(AuthError::Expired) => Err(ErrorCode::TokenExpired),
            Ok(_) | Err(_) => Err(ErrorCode::PermissionDenied),
        }
    }

    pub(super) fn ticket(&mut self) -> Ticket {
        let t = Ticket(self.next_ticket);
        self.next_ticket += 1;
        t
    }

    /// Records a pending request and holds the reply's place; `None` when too many wait.
    pub(super) fn wait(&mut self, pending: Pending) -> Result<Option<Ticket>, DisconnectCode> {
        if self.pending.len() >= PENDING_MAX {
            return Ok(None);
        }
        let ticket = self.ticket();
        self.pending.insert(ticket, pending);
        self.queue(Slot::Waiting(ticket))?;
        Ok(Some(ticket))
    }

    pub(super) fn start_subscribe(
        &mut self,
        id: u32,
        channel: Arc<str>,
        o: SubscribeOptions,
        connect: Option<Ticket>,
    ) -> Ticket {
        let ticket = self.ticket();
        let presence = o.presence.then(|| {
            let mut info = self.client_info();
            info.chan_info = o.granted.chan_info.clone();
            info
        });
        self.channels.insert(
            Arc::clone(&channel),
            ChannelState {
                live: false,
                token: o.granted.token,
                close_at: o.close_at,
            },
        );
        if let Some(at) = o.close_at {
            self.sub_deadlines.insert((at, Arc::clone(&channel)));
        }
        self.subscribing += 1;
        self.requests.push_back(Request::Subscribe {
            ticket,
            channel: Arc::clone(&channel),
            stream: o.positioned,
            recover: o.recovering.clone(),
            presence,
            join_leave: o.join_leave,
        });
        self.pending.insert(
            ticket,
            Pending::Subscribe {
                id,
                channel,
                recoverable: o.recoverable,
                positioned: o.positioned,
                recovering: o.recovering,
                reject_unrecovered: o.reject_unrecovered,
                data: o.granted.data,
                ttl: o.granted.ttl,
                connect,
            },
        );
        ticket
    }

    pub(super) fn answer_subscribe(
        &mut self,
        ticket: Ticket,
        pending: Pending,
        answer: Answer,
    ) -> Result<(), DisconnectCode> {
        let Pending::Subscribe {
            id,
            channel,
            recoverable,
            positioned,
            recovering,
            reject_unrecovered,
            data,
            ttl,
            connect,
        } = pending
        else {
            unreachable!("called with a subscribe");
        };
        self.subscribing -= 1;
        let outcome = match answer {
            Answer::Subscribed { top, recovery, .. } => {
                let top = top.unwrap_or_default();
                let mut result = SubscribeResult {
                    recoverable,
                    positioned,
                    data,
                    expires: ttl.is_some(),
                    ttl: ttl.map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX)),
                    ..Default::default()
                };
                if positioned {
                    result.epoch = top.epoch.clone();
                    result.offset = top.offset;
                }
                if let Some(asked) = recovering {
                    result.was_recovering = true;
                    let (recovered, publications) = recovery.unwrap_or_default();
                    let epoch_ok = asked.epoch.is_empty() || asked.epoch == top.epoch;
                    result.recovered = recovered && epoch_ok;
                    if result.recovered {
                        // The clients catch up through the publications from where they were.
                        result.offset = asked.offset;
                        result.publications = publications;
                    }
                }
                if reject_unrecovered && result.was_recovering && !result.recovered {
                    Err(ErrorCode::UnrecoverablePosition)
                } else {
                    Ok(result)
                }
            }
            Answer::Failed { code, .. } => Err(code),
            _ => Err(ErrorCode::Internal),
        };
        match &outcome {
            Ok(_) => {
                if let Some(state) = self.channels.get_mut(&channel) {
                    state.live = true;
                }
            }
            Err(_) => {
                // The shard may have subscribed (112 comes after it did): undo it.
                if self.forget_channel(&channel) {
                    self.requests.push_back(Request::Unsubscribe {
                        channel: Arc::clone(&channel),
                    });
                }
            }
        }
        match connect {
            None => self.resolve(
                ticket,
                match outcome {
                    Ok(result) => Reply {
                        id,
                        subscribe: Some(result),
                        ..Default::default()
                    },
                    Err(code) => error_reply(id, code),
                },
            ),
            Some(connect) => self.server_side_done(connect, &channel, outcome),
        }
    }

    /// A server-side subscription of a connect got its answer; the connect reply goes once
    /// all have.
    pub(super) fn server_side_done(
        &mut self,
        connect: Ticket,
        channel: &str,
        outcome: Result<SubscribeResult, ErrorCode>,
    ) -> Result<(), DisconnectCode> {
        let Some(Pending::Connect {
            id,
            result,
            waiting,
        }) = self.pending.get_mut(&connect)
        else {
            return Ok(());
        };
        match outcome {
            Ok(sub) => {
                result.subs.insert(channel.to_owned(), sub);
            }
            // A server-side subscription the server could not make: the connection cannot be
            // what the token says.
            Err(_) => return Err(DisconnectCode::Internal),
        }
        *waiting -= 1;
        if *waiting > 0 {
            return Ok(());
        }
        let reply = Reply {
            id: *id,
            connect: Some(std::mem::take(result)),
            ..Default::default()
        };
        self.pending.remove(&connect);
        self.resolve(connect, reply)
    }

    pub(super) fn client_info(&self) -> ClientInfo {
        let (user, info) = match &self.phase {
            Phase::Connected(c) => (c.user.to_string(), c.info.clone()),
            Phase::Connecting => (String::new(), Bytes::new()),
        };
        ClientInfo {
            user,
            client: self.client.to_string(),
            conn_info: info,
            chan_info: Bytes::new(),
        }
    }

    /// Whether protobuf-borne data is JSON we can relay (JSON commands were parsed whole).
    pub(super) fn is_json(&self, data: &[u8]) -> bool {
        match self.format {
            Format::Json => true,
            Format::Protobuf => {
                !nests_deeper_than(data, JSON_DEPTH_MAX)
                    && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok()
            }
        }
    }

    pub(super) fn reply(&mut self, reply: Reply) -> Result<(), DisconnectCode> {
        let message = codec::encode(self.format, &reply)
            .map_err(|_| DisconnectCode::InappropriateProtocol)?;
        self.queue(Slot::Ready(message))
    }

    /// Fills the slot `ticket` held with `reply`.
    pub(super) fn resolve(&mut self, ticket: Ticket, reply: Reply) -> Result<(), DisconnectCode> {
        let message = codec::encode(self.format, &reply)
            .map_err(|_| DisconnectCode::InappropriateProtocol)?;
        let Some(at) = self
            .out
            .iter()
            .position(|s| matches!(s, Slot::Waiting(t) if *t == ticket))
        else {
            return Ok(());
        };
        self.out[at] = Slot::Ready(message);
        self.waiting -= 1;
        self.recount_held();
        Ok(())
    }

    pub(super) fn queue(&mut self, slot: Slot) -> Result<(), DisconnectCode> {
        match &slot {
            Slot::Waiting(_) => self.waiting += 1,
            Slot::Ready(m) if self.waiting > 0 => {
                self.held_bytes += m.len();
                if self.held_bytes > self.settings.queued_bytes_max {
                    return Err(DisconnectCode::Slow);
                }
            }
            Slot::Ready(_) => {}
        }
        self.out.push_back(slot);
        Ok(())
    }

    pub(super) fn recount_held(&mut self) {
        if self.waiting == 0 {
            self.held_bytes = 0;
            return;
        }
        let mut held = 0;
        let mut behind = false;
        for slot in &self.out {
            match slot {
                Slot::Waiting(_) => behind = true,
                Slot::Ready(m) if behind => held += m.len(),
                Slot::Ready(_) => {}
            }
        }
        self.held_bytes = held;
    }
}

pub(super) enum Refused {
    Expired,
    Invalid,
}

/// The user, info, expiry and server-side subscriptions (channel → token `data`) of a
/// connection token.
pub(super) type Verified = (Box<str>, Bytes, Option<u64>, BTreeMap<String, Bytes>);

pub(super) fn verify_connection(
    auth: &Authenticator,
    token: &str,
    wall_s: u64,
) -> Result<Verified, Refused> {
    let claims = match auth.verify_as::<ConnectionClaims>(token) {
        Ok(claims) => claims,
        Err(AuthError::Expired) => return Err(Refused::Expired),
        Err(_) => return Err(Refused::Invalid),
    };
    if claims.channel.is_some() {
        return Err(Refused::Invalid);
    }
    let expires_at = match claims.expire_at {
        Some(0) => None,
        Some(at) => Some(at),
        None => claims.exp,
    };
    // jsonwebtoken allowed the leeway; the connection itself has no time left.
    if expires_at.is_some_and(|at| at <= wall_s) {
        return Err(Refused::Expired);
    }
    let mut subs: BTreeMap<String, Bytes> = claims
        .subs
        .into_iter()
        .map(|(channel, sub)| {
            (
                channel,
                sub.data.map_or_else(Bytes::new, |raw| raw_bytes(&raw)),
            )
        })
        .collect();
    for channel in claims.channels {
        subs.entry(channel).or_default();
    }
    Ok((
        claims.sub.into(),
        claims.info.as_deref().map_or_else(Bytes::new, raw_bytes),
        expires_at,
        subs,
    ))
}

pub(super) fn raw_bytes(raw: &RawValue) -> Bytes {
    Bytes::from(raw.get().to_owned())
}

pub(super) fn error_reply(id: u32, code: ErrorCode) -> Reply {
    Reply {
        id,
        error: Some(Error {
            code: code.code(),
            message: code.message().to_owned(),
            temporary: code.temporary(),
        }),
        ..Default::default()
    }
}
