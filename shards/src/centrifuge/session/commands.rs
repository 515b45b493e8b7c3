//! The session's command handlers: one per command, each checking what the protocol and the
//! namespace require, then replying at once or asking the shard (`Request`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::helpers::{
    Granted, Refused, SubscribeOptions, error_reply, raw_bytes, verify_connection,
};
use super::*;

/// Commands.
impl Session {
    pub(super) fn handle_command(
        &mut self,
        cx: Cx<'_>,
        cmd: Command,
    ) -> Result<(), DisconnectCode> {
        let Cx { now, wall_s, auth } = cx;
        let connected = matches!(self.phase, Phase::Connected(_));
        if cmd.connect.is_some() {
            if connected {
                return Err(DisconnectCode::BadRequest);
            }
        } else if !connected {
            // Anything before a successful connect, the pong included.
            return Err(DisconnectCode::BadRequest);
        }
        if cmd.id == 0 && cmd.send.is_none() {
            if cmd != Command::default() {
                return Err(DisconnectCode::BadRequest);
            }
            // The pong: only as an answer to a ping.
            if self.pong_due.take().is_none() {
                return Err(DisconnectCode::BadRequest);
            }
            return Ok(());
        }
        let id = cmd.id;
        if let Some(req) = cmd.connect {
            self.connect(now, wall_s, auth, id, req)
        } else if let Some(req) = cmd.subscribe {
            self.subscribe(cx, id, req)
        } else if let Some(req) = cmd.unsubscribe {
            if req.channel.is_empty() {
                return Err(DisconnectCode::BadRequest);
            }
            if let Some((channel, _)) = self.channels.get_key_value(req.channel.as_str()) {
                let channel = Arc::clone(channel);
                self.forget_channel(&channel);
                self.requests.push_back(Request::Unsubscribe { channel });
            }
            self.reply(Reply {
                id,
                unsubscribe: Some(Empty {}),
                ..Default::default()
            })
        } else if let Some(req) = cmd.publish {
            self.publish(id, req)
        } else if let Some(req) = cmd.presence {
            self.presence(id, req, false)
        } else if let Some(req) = cmd.presence_stats {
            self.presence(id, req, true)
        } else if let Some(req) = cmd.history {
            self.history(id, req)
        } else if cmd.ping.is_some() {
            self.reply(Reply {
                id,
                ping: Some(Empty {}),
                ..Default::default()
            })
        } else if let Some(req) = cmd.send {
            if !req.data.is_empty() && !self.is_json(&req.data) {
                return Err(DisconnectCode::BadRequest);
            }
            self.requests.push_back(Request::Send { data: req.data });
            Ok(())
        } else if let Some(req) = cmd.sub_refresh {
            self.sub_refresh(cx, id, &req.channel, &req.token)
        } else if let Some(req) = cmd.rpc {
            self.rpc(now, id, req)
        } else if let Some(req) = cmd.refresh {
            self.refresh(now, wall_s, auth, id, &req.token)
        } else {
            Err(DisconnectCode::BadRequest)
        }
    }

    /// An `rpc`: to the application's backend (which the shard may find absent: 108), its
    /// reply when the backend answers, error 100 past `rpc_timeout`, 106 past
    /// [`RPC_PENDING_MAX`] calls waiting.
    fn rpc(&mut self, now: Instant, id: u32, req: RpcRequest) -> Result<(), DisconnectCode> {
        if !req.data.is_empty() && !self.is_json(&req.data) {
            // The application's events are JSON, as publications are.
            return self.reply(error_reply(id, ErrorCode::BadRequest));
        }
        if self.rpcs.len() >= RPC_PENDING_MAX {
            return self.reply(error_reply(id, ErrorCode::LimitExceeded));
        }
        let ticket = self.ticket();
        self.rpcs
            .push_back((ticket, id, now + self.settings.rpc_timeout));
        self.requests.push_back(Request::Rpc {
            ticket,
            method: req.method,
            data: req.data,
        });
        Ok(())
    }

    pub(super) fn connect(
        &mut self,
        now: Instant,
        wall_s: u64,
        auth: Option<&Authenticator>,
        id: u32,
        req: ConnectRequest,
    ) -> Result<(), DisconnectCode> {
        let (user, info, expires_at, server_subs) = match auth {
            None => (Box::from(""), Bytes::new(), None, BTreeMap::new()),
            Some(auth) => {
                if req.token.is_empty() {
                    // Centrifugo: "client credentials not found".
                    return Err(DisconnectCode::BadRequest);
                }
                match verify_connection(auth, &req.token, wall_s) {
                    Ok(claims) => claims,
                    Err(Refused::Expired) => {
                        return self.reply(error_reply(id, ErrorCode::TokenExpired));
                    }
                    Err(Refused::Invalid) => return Err(DisconnectCode::InvalidToken),
                }
            }
        };
        // Server-side subscriptions: `subs` first, then `channels` not already in it.
        for channel in server_subs.keys() {
            match self.settings.namespaces.resolve(channel) {
                Ok(_) if !channel.is_empty() => {}
                Ok(_) => return Err(DisconnectCode::BadRequest),
                Err(code) => return self.reply(error_reply(id, code)),
            }
        }
        if server_subs.len() > self.settings.channel_limit {
            return self.reply(error_reply(id, ErrorCode::LimitExceeded));
        }
        let ttl = expires_at.map(|at| at.saturating_sub(wall_s));
        self.phase = Phase::Connected(Connected {
            user,
            info,
            expires_at,
        });
        self.connect_deadline = None;
        self.next_ping = Some(now + self.settings.ping_interval);
        self.expiry_close =
            ttl.map(|ttl| now + Duration::from_secs(ttl) + self.settings.expired_close_delay);
        let result = ConnectResult {
            client: self.client.to_string(),
            version: SERVER_VERSION.to_owned(),
            expires: ttl.is_some(),
            ttl: ttl.map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX)),
            ping: u32::try_from(self.settings.ping_interval.as_secs()).unwrap_or(u32::MAX),
            pong: true,
            ..Default::default()
        };
        if server_subs.is_empty() {
            return self.reply(Reply {
                id,
                connect: Some(result),
                ..Default::default()
            });
        }
        let connect = self.ticket();
        self.pending.insert(
            connect,
            Pending::Connect {
                id,
                result,
                waiting: server_subs.len(),
            },
        );
        self.queue(Slot::Waiting(connect))?;
        for (channel, data) in server_subs {
            let asked = req.subs.get(&channel);
            let channel: Arc<str> = channel.into();
            let ns = self
                .settings
                .namespaces
                .resolve(&channel)
                .map_err(|_| DisconnectCode::Internal)?
                .namespace
                .clone();
            // The token is trusted: no permission check, as in Centrifugo.
            let recoverable =
                ns.has_history() && (ns.force_recovery || asked.is_some_and(|s| s.recover));
            let positioned = ns.has_history() && (recoverable || ns.force_positioning);
            let recovering = asked
                .filter(|s| s.recover && recoverable)
                .map(|s| StreamPosition {
                    offset: s.offset,
                    epoch: s.epoch.clone(),
                });
            self.start_subscribe(
                0,
                channel,
                SubscribeOptions {
                    recoverable,
                    positioned,
                    recovering,
                    reject_unrecovered: false,
                    presence: ns.presence,
                    join_leave: ns.join_leave && ns.force_push_join_leave,
                    close_at: None,
                    granted: Granted {
                        data,
                        ..Granted::default()
                    },
                },
                Some(connect),
            );
        }
        Ok(())
    }

    pub(super) fn refresh(
        &mut self,
        now: Instant,
        wall_s: u64,
        auth: Option<&Authenticator>,
        id: u32,
        token: &str,
    ) -> Result<(), DisconnectCode> {
        let Some(auth) = auth else {
            // Nothing expires without auth.
            return self.reply(error_reply(id, ErrorCode::NotAvailable));
        };
        if token.is_empty() {
            return Err(DisconnectCode::BadRequest);
        }
        let claims = match verify_connection(auth, token, wall_s) {
            Ok(claims) => claims,
            Err(Refused::Expired) => return self.reply(error_reply(id, ErrorCode::TokenExpired)),
            Err(Refused::Invalid) => return Err(DisconnectCode::InvalidToken),
        };
        let Phase::Connected(connected) = &mut self.phase else {
            unreachable!("commands other than connect need a connected session");
        };
        if *claims.0 != *connected.user {
            return Err(DisconnectCode::InvalidToken);
        }
        connected.expires_at = claims.2;
        let ttl = claims.2.map(|at| at.saturating_sub(wall_s));
        self.expiry_close =
            ttl.map(|ttl| now + Duration::from_secs(ttl) + self.settings.expired_close_delay);
        self.reply(Reply {
            id,
            refresh: Some(RefreshResult {
                client: self.client.to_string(),
                version: SERVER_VERSION.to_owned(),
                expires: ttl.is_some(),
                ttl: ttl.map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX)),
            }),
            ..Default::default()
        })
    }

    /// The server refreshes the connection (Centrifugo's server API `refresh`): `expired`
    /// closes it with 3005 at once; else `expire_at` (Unix seconds; 0: never) replaces its
    /// token's expiry, and it closes with 3005 `expired_close_delay` after that unless the
    /// client refreshes with a token; `None` leaves the expiry as it is. The client is not told
    /// (its own refresh schedule follows its token). Nothing happens before connect.
    ///
    /// # Errors
    /// 3005 when `expired`.
    pub fn server_refresh(
        &mut self,
        now: Instant,
        wall_s: u64,
        expire_at: Option<u64>,
        expired: bool,
    ) -> Result<(), DisconnectCode> {
        let Phase::Connected(connected) = &mut self.phase else {
            return Ok(());
        };
        if expired {
            return Err(DisconnectCode::ConnectionExpired);
        }
        if let Some(at) = expire_at {
            connected.expires_at = (at > 0).then_some(at);
            self.expiry_close = connected.expires_at.map(|at| {
                now + Duration::from_secs(at.saturating_sub(wall_s))
                    + self.settings.expired_close_delay
            });
        }
        Ok(())
    }

    pub(super) fn sub_refresh(
        &mut self,
        cx: Cx<'_>,
        id: u32,
        channel: &str,
        token: &str,
    ) -> Result<(), DisconnectCode> {
        if channel.is_empty() {
            return Err(DisconnectCode::BadRequest);
        }
        let Some((name, state)) = self.channels.get_key_value(channel) else {
            // Must be subscribed to refresh.
            return self.reply(error_reply(id, ErrorCode::PermissionDenied));
        };
        if !state.token {
            // Nothing to refresh: it was not subscribed with a token (Centrifuge: "server-side
            // sub refresh expected").
            return Err(DisconnectCode::BadRequest);
        }
        if token.is_empty() {
            return self.reply(error_reply(id, ErrorCode::BadRequest));
        }
        let (name, old) = (Arc::clone(name), state.close_at);
        let user = self.user().unwrap_or_default().to_owned();
        let claims = match self.verify_subscription(cx.auth, token, channel, &user, cx.wall_s) {
            Ok(claims) => claims,
            Err(ErrorCode::TokenExpired) => return self.reply(error_reply(id, ErrorCode::Expired)),
            Err(code) => return self.reply(error_reply(id, code)),
        };
        let ttl = claims.expires_at().map(|at| at.saturating_sub(cx.wall_s));
        let close_at =
            ttl.map(|ttl| cx.now + Duration::from_secs(ttl) + self.settings.expired_close_delay);
        if let Some(at) = old {
            self.sub_deadlines.remove(&(at, Arc::clone(&name)));
        }
        if let Some(at) = close_at {
            self.sub_deadlines.insert((at, Arc::clone(&name)));
        }
        if let Some(state) = self.channels.get_mut(&name) {
            state.close_at = close_at;
        }
        self.reply(Reply {
            id,
            sub_refresh: Some(SubRefreshResult {
                expires: ttl.is_some(),
                ttl: ttl.map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX)),
            }),
            ..Default::default()
        })
    }

    pub(super) fn subscribe(
        &mut self,
        cx: Cx<'_>,
        id: u32,
        req: SubscribeRequest,
    ) -> Result<(), DisconnectCode> {
        let Cx { now, wall_s, auth } = cx;
        if req.channel.is_empty() {
            return Err(DisconnectCode::BadRequest);
        }
        if !req.delta.is_empty() && req.delta != "fossil" {
            return Err(DisconnectCode::BadRequest);
        }
        if req.kind != 0 || req.tf.is_some() {
            // Map and shared-poll subscriptions, tags filters: not served.
            return self.reply(error_reply(id, ErrorCode::NotAvailable));
        }
        let settings = Arc::clone(&self.settings);
        let channel = match settings.namespaces.resolve(&req.channel) {
            Ok(channel) => channel,
            Err(code) => return self.reply(error_reply(id, code)),
        };
        if self.channels.contains_key(req.channel.as_str()) {
            return self.reply(error_reply(id, ErrorCode::AlreadySubscribed));
        }
        if self.channels.len() >= settings.channel_limit {
            return self.reply(error_reply(id, ErrorCode::LimitExceeded));
        }
        let user = self.user().unwrap_or_default().to_owned();
        let mut granted = Granted::default();
        if !req.token.is_empty() {
            // A subscription token grants the channel whatever the namespace allows clients.
            match self.verify_subscription(auth, &req.token, &req.channel, &user, wall_s) {
                Ok(claims) => {
                    granted = Granted {
                        token: true,
                        ttl: claims.expires_at().map(|at| at.saturating_sub(wall_s)),
                        chan_info: claims.info.as_deref().map_or_else(Bytes::new, raw_bytes),
                        data: claims.data.as_deref().map_or_else(Bytes::new, raw_bytes),
                    };
                }
                Err(code) => return self.reply(error_reply(id, code)),
            }
        } else if channel.private
            || !channel.namespace.allow_subscribe_for_client
            || !channel.allows_user(&user)
        {
            return self.reply(error_reply(id, ErrorCode::PermissionDenied));
        }
        let ns = channel.namespace;
        let may_recover = ns.force_recovery || ns.allow_history_for_client;
        let recoverable = ns.has_history()
            && (ns.force_recovery || (req.recoverable || req.recover) && may_recover);
        let positioned =
            ns.has_history() && (recoverable || ns.force_positioning || req.positioned);
        let recovering = (req.recover && recoverable).then(|| StreamPosition {
            offset: req.offset,
            epoch: req.epoch.clone(),
        });
        let options = SubscribeOptions {
            recoverable,
            positioned,
            recovering,
            reject_unrecovered: req.flag & FLAG_REJECT_UNRECOVERED != 0,
            presence: ns.presence,
            join_leave: ns.join_leave && (req.join_leave || ns.force_push_join_leave),
            close_at: granted
                .ttl
                .map(|ttl| now + Duration::from_secs(ttl) + self.settings.expired_close_delay),
            granted,
        };
        if self.pending.len() >= PENDING_MAX {
            return self.reply(error_reply(id, ErrorCode::TooManyRequests));
        }
        let channel: Arc<str> = req.channel.into();
        let ticket = self.start_subscribe(id, channel, options, None);
        self.queue(Slot::Waiting(ticket))
    }

    pub(super) fn publish(&mut self, id: u32, req: PublishRequest) -> Result<(), DisconnectCode> {
        if req.channel.is_empty() {
            return Err(DisconnectCode::BadRequest);
        }
        if req.kind != 0 {
            return self.reply(error_reply(id, ErrorCode::NotAvailable));
        }
        let settings = Arc::clone(&self.settings);
        let channel = match settings.namespaces.resolve(&req.channel) {
            Ok(channel) => channel,
            Err(code) => return self.reply(error_reply(id, code)),
        };
        if !channel.namespace.allow_publish_for_client {
            return self.reply(error_reply(id, ErrorCode::PermissionDenied));
        }
        // The topic space is JSON: WSE subscribers and JSON clients get the data embedded.
        if req.data.is_empty() || !self.is_json(&req.data) {
            return self.reply(error_reply(id, ErrorCode::BadRequest));
        }
        let info = self.client_info();
        let Some(ticket) = self.wait(Pending::Publish { id })? else {
            return self.reply(error_reply(id, ErrorCode::TooManyRequests));
        };
        self.requests.push_back(Request::Publish {
            ticket,
            channel: req.channel.into(),
            data: req.data,
            info,
        });
        Ok(())
    }

    pub(super) fn presence(
        &mut self,
        id: u32,
        req: PresenceRequest,
        stats: bool,
    ) -> Result<(), DisconnectCode> {
        if req.channel.is_empty() {
            return Err(DisconnectCode::BadRequest);
        }
        let settings = Arc::clone(&self.settings);
        let ns = match settings.namespaces.resolve(&req.channel) {
            Ok(channel) => channel.namespace,
            Err(code) => return self.reply(error_reply(id, code)),
        };
        if !ns.presence {
            return self.reply(error_reply(id, ErrorCode::NotAvailable));
        }
        if !ns.allow_presence_for_client {
            return self.reply(error_reply(id, ErrorCode::PermissionDenied));
        }
        let pending = if stats {
            Pending::PresenceStats { id }
        } else {
            Pending::Presence { id }
        };
        let Some(ticket) = self.wait(pending)? else {
            return self.reply(error_reply(id, ErrorCode::TooManyRequests));
        };
        let channel = req.channel.into();
        self.requests.push_back(if stats {
            Request::PresenceStats { ticket, channel }
        } else {
            Request::Presence { ticket, channel }
        });
        Ok(())
    }

    pub(super) fn history(&mut self, id: u32, req: HistoryRequest) -> Result<(), DisconnectCode> {
        if req.channel.is_empty() {
            return Err(DisconnectCode::BadRequest);
        }
        let settings = Arc::clone(&self.settings);
        let ns = match settings.namespaces.resolve(&req.channel) {
            Ok(channel) => channel.namespace,
            Err(code) => return self.reply(error_reply(id, code)),
        };
        if !ns.has_history() {
            return self.reply(error_reply(id, ErrorCode::NotAvailable));
        }
        if !ns.allow_history_for_client {
            return self.reply(error_reply(id, ErrorCode::PermissionDenied));
        }
        // 0 = only the top; negative = all, capped like any limit.
        let limit = usize::try_from(req.limit)
            .unwrap_or(usize::MAX)
            .min(settings.history_limit_max);
        let Some(ticket) = self.wait(Pending::History { id })? else {
            return self.reply(error_reply(id, ErrorCode::TooManyRequests));
        };
        self.requests.push_back(Request::History {
            ticket,
            channel: req.channel.into(),
            limit,
            since: req.since,
            reverse: req.reverse,
        });
        Ok(())
    }
}
