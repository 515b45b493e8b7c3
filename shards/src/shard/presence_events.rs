//! A connection's presence events in the application event stream, in the connection's order:
//! `connect` first, then its `presence_join`s and `presence_leave`s, `disconnect` last
//! (docs/API.md's promise). Topic owners decide presence (a user joins on their first
//! connection to a topic and leaves with their last), but the events are reported here, on the
//! connection's shard, in the one queue that also holds its `connect` and `disconnect`, so the
//! event stream (which keeps each shard's order per connection) cannot reorder them.
//!
//! Owns: the departures a connection awaits from remote owners, and its `disconnect` held back
//! until they are answered (at most [`PRESENCE_LEAVE_WAIT`]). Never: counts presence members
//! (the owner does, `owner`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Shard, Transport, empty};
use crate::conn::ConnId;
use crate::fabric::PresenceLeft;
use crate::inbound::AppEventKind;

/// Longest a departed connection's `disconnect` waits for the owners' answers about its presence
/// departures (an answer lost to a full fabric queue). Past it the `disconnect` is reported and a
/// late `presence_leave` is not.
pub const PRESENCE_LEAVE_WAIT: Duration = Duration::from_secs(1);

/// Connections with presence departures awaited from other shards, or whose `disconnect` waits
/// for them. An entry goes once both are done (or the wait expired).
#[derive(Debug, Default)]
pub(super) struct AwaitedLeaves {
    by_conn: HashMap<ConnId, Awaited>,
}

#[derive(Debug, Default)]
struct Awaited {
    /// Presence departures announced to owners (on this shard or another) and not answered yet.
    outstanding: u32,
    /// The connection has left: its user, and until when its `disconnect` may wait.
    disconnect: Option<(Box<str>, Instant)>,
    /// Every departure of the leaving connection was announced: the `disconnect` goes with the
    /// last answer.
    settled: bool,
}

impl AwaitedLeaves {
    /// Whether a `disconnect` is held back.
    pub fn holds_disconnects(&self) -> bool {
        self.by_conn.values().any(|a| a.disconnect.is_some())
    }

    /// The earliest instant a held `disconnect` must go out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.by_conn
            .values()
            .filter_map(|a| a.disconnect.as_ref().map(|(_, until)| *until))
            .min()
    }
}

impl<T: Transport> Shard<T> {
    /// Connection `conn` of this shard left (its session ended): from here until its
    /// `disconnect` is reported, its presence departures are still reported.
    pub(super) fn begin_disconnect(&mut self, conn: ConnId, user: &str, now: Instant) {
        let a = self.app.leaves.by_conn.entry(conn).or_default();
        a.disconnect = Some((user.into(), now + PRESENCE_LEAVE_WAIT));
    }

    /// The departure of `conn` has announced all its leaves: its `disconnect` goes now, unless
    /// an owner's answer is still on its way.
    pub(super) fn settle_disconnect(&mut self, conn: ConnId) {
        let Some(a) = self.app.leaves.by_conn.get_mut(&conn) else {
            return;
        };
        a.settled = true;
        if a.outstanding == 0 {
            self.report_disconnect(conn);
        }
    }

    /// A presence departure of `conn` was announced to its topic's owner; its answer
    /// ([`Shard::handle_presence_left`]) is awaited.
    pub(super) fn await_presence_left(&mut self, conn: ConnId) {
        self.app.leaves.by_conn.entry(conn).or_default().outstanding += 1;
    }

    /// An owner's answer about a presence departure of `conn` (a connection of this shard).
    pub(super) fn handle_presence_left(&mut self, answer: PresenceLeft) {
        let conn = answer.conn;
        if let Some((user, payload)) = answer.left
            && self.reports_presence(conn)
        {
            self.push_app_event(AppEventKind::PresenceLeave, Some(conn), &user, payload);
        }
        let Some(a) = self.app.leaves.by_conn.get_mut(&conn) else {
            return; // its disconnect went out already (the wait expired)
        };
        a.outstanding = a.outstanding.saturating_sub(1);
        if a.outstanding > 0 {
            return;
        }
        if a.settled {
            self.report_disconnect(conn);
        } else if a.disconnect.is_none() {
            self.app.leaves.by_conn.remove(&conn);
        }
    }

    /// An owner counted `conn`'s user as a new presence member.
    pub(super) fn report_presence_joined(&mut self, conn: ConnId, user: &str, payload: Bytes) {
        if self.reports_presence(conn) {
            self.push_app_event(AppEventKind::PresenceJoin, Some(conn), user, payload);
        }
    }

    /// Reports the `disconnect`s whose wait has expired.
    pub(super) fn expire_awaited_leaves(&mut self, now: Instant) {
        let due: Vec<ConnId> = self
            .app
            .leaves
            .by_conn
            .iter()
            .filter(|(_, a)| {
                a.disconnect
                    .as_ref()
                    .is_some_and(|(_, until)| now >= *until)
            })
            .map(|(c, _)| *c)
            .collect();
        for conn in due {
            self.report_disconnect(conn);
        }
    }

    /// The shard exits: every `disconnect` held back goes now.
    pub(super) fn report_awaited_disconnects(&mut self) {
        let held: Vec<ConnId> = self.app.leaves.by_conn.keys().copied().collect();
        for conn in held {
            self.report_disconnect(conn);
        }
    }

    /// Whether `conn`'s presence events are still reported: it is live, or has left without its
    /// `disconnect` reported yet.
    fn reports_presence(&self, conn: ConnId) -> bool {
        self.app
            .leaves
            .by_conn
            .get(&conn)
            .is_some_and(|a| a.disconnect.is_some())
            || self
                .conns
                .get(conn.key() as usize)
                .is_some_and(|s| s.conn.id() == conn && s.conn.has_session())
    }

    fn report_disconnect(&mut self, conn: ConnId) {
        let Some(a) = self.app.leaves.by_conn.remove(&conn) else {
            return;
        };
        if let Some((user, _)) = a.disconnect {
            self.push_app_event(AppEventKind::Disconnect, Some(conn), &user, empty());
        }
    }
}
