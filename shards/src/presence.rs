//! Who is in a topic (protocol.md §8), kept by the topic's owner shard, sans-IO.
//!
//! Owns: per topic, each member (JWT `sub`) with its connection count across all shards and its
//! data, and the totals. Never: sends events (it says which one is due; the shard fans it out).
//!
//! Invariants: a member exists iff its connection count is positive; `connections` is the sum of
//! the members' counts. Both are checked in debug builds after every change.

use std::collections::HashMap;

use bytes::Bytes;

/// One member of a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Connections of this user subscribed to the topic, on any shard.
    pub connections: u32,
    /// The member's data: a JSON text.
    pub data: Bytes,
}

/// What a join means for the topic's subscribers.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// The user's first connection: send `presence_join`.
    New,
    /// Another connection of a present user; `true` when its data changed (send
    /// `presence_update`).
    Again {
        /// The new data differs from what the user had (send `presence_update`).
        data_changed: bool,
    },
    /// The topic is at `presence.max_members`.
    Full,
}

/// A topic's presence members on its owner: each user once, with a count of connections and
/// the latest data.
#[derive(Debug, Default)]
pub struct Members {
    members: HashMap<Box<str>, Member>,
    connections: u64,
}

impl Members {
    /// Counts one more connection of `user`. `max_members` 0 = unlimited.
    pub fn join(&mut self, user: &str, data: Bytes, max_members: usize) -> Joined {
        let full = max_members != 0 && self.members.len() >= max_members;
        let outcome = match self.members.get_mut(user) {
            Some(m) => {
                m.connections += 1;
                let data_changed = m.data != data;
                m.data = data;
                Joined::Again { data_changed }
            }
            None if full => return Joined::Full,
            None => {
                self.members.insert(
                    user.into(),
                    Member {
                        connections: 1,
                        data,
                    },
                );
                Joined::New
            }
        };
        self.connections += 1;
        self.check();
        outcome
    }

    /// Counts one connection of `user` less; `true` when it was the last (send `presence_leave`,
    /// with the returned data).
    pub fn leave(&mut self, user: &str) -> Option<Bytes> {
        let m = self.members.get_mut(user)?;
        m.connections -= 1;
        self.connections -= 1;
        let gone = (m.connections == 0).then(|| self.members.remove(user).expect("present").data);
        self.check();
        gone
    }

    /// Replaces a present user's data; `true` when it changed.
    pub fn update(&mut self, user: &str, data: Bytes) -> bool {
        match self.members.get_mut(user) {
            Some(m) if m.data != data => {
                m.data = data;
                true
            }
            _ => false,
        }
    }

    /// Distinct users and their connections, in O(1).
    pub fn stats(&self) -> (usize, u64) {
        (self.members.len(), self.connections)
    }

    /// No member left.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member: user id and its entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Member)> {
        self.members.iter().map(|(u, m)| (&**u, m))
    }

    fn check(&self) {
        debug_assert_eq!(
            self.connections,
            self.members
                .values()
                .map(|m| u64::from(m.connections))
                .sum::<u64>()
        );
        debug_assert!(self.members.values().all(|m| m.connections > 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[test]
    fn join_and_leave_on_first_and_last_connection() {
        let mut m = Members::default();
        assert_eq!(m.join("ann", d("{}"), 0), Joined::New);
        assert_eq!(
            m.join("ann", d("{}"), 0),
            Joined::Again {
                data_changed: false
            }
        );
        assert_eq!(m.join("bob", d("{}"), 0), Joined::New);
        assert_eq!(m.stats(), (2, 3));
        assert_eq!(m.leave("ann"), None);
        assert_eq!(m.leave("ann"), Some(d("{}")));
        assert_eq!(m.leave("ann"), None, "unknown users are ignored");
        assert_eq!(m.stats(), (1, 1));
    }

    #[test]
    fn limits_and_updates() {
        let mut m = Members::default();
        assert_eq!(m.join("a", d("1"), 1), Joined::New);
        assert_eq!(m.join("b", d("1"), 1), Joined::Full);
        assert_eq!(m.join("a", d("2"), 1), Joined::Again { data_changed: true });
        assert!(m.update("a", d("3")));
        assert!(!m.update("a", d("3")));
        assert!(!m.update("zed", d("3")));
        assert_eq!(m.iter().next().unwrap().1.data, d("3"));
    }
}
