//! The shard's index from user id to its live connections on this shard, for
//! `Server::send_user` (each shard answers for its own connections; no global table).
//!
//! Owns: the index. Never: decides what is sent. Invariant: a connection is listed under its
//! user from its `Connected` event to its `Left` event, exactly once.
//!
//! Cost: one map entry per user with a connection here; a user with one connection (the common
//! case) stores its key inline, without a second allocation.

use std::collections::HashMap;

use crate::conn::ConnKey;

#[derive(Debug)]
enum Keys {
    One(ConnKey),
    Many(Vec<ConnKey>),
}

#[derive(Debug, Default)]
pub struct Users {
    map: HashMap<Box<str>, Keys>,
}

impl Users {
    pub fn insert(&mut self, user: &str, key: ConnKey) {
        match self.map.get_mut(user) {
            None => {
                self.map.insert(user.into(), Keys::One(key));
            }
            Some(Keys::One(k)) => {
                debug_assert_ne!(*k, key, "listed twice");
                let first = *k;
                self.map.insert(user.into(), Keys::Many(vec![first, key]));
            }
            Some(Keys::Many(keys)) => keys.push(key),
        }
    }

    pub fn remove(&mut self, user: &str, key: ConnKey) {
        let Some(entry) = self.map.get_mut(user) else {
            debug_assert!(false, "user {user} not listed");
            return;
        };
        match entry {
            Keys::One(k) if *k == key => {
                self.map.remove(user);
            }
            Keys::One(_) => debug_assert!(false, "connection not listed"),
            Keys::Many(keys) => {
                keys.retain(|k| *k != key);
                if let [only] = keys[..] {
                    *entry = Keys::One(only);
                }
            }
        }
    }

    /// The user's connections here.
    pub fn get(&self, user: &str) -> &[ConnKey] {
        match self.map.get(user) {
            None => &[],
            Some(Keys::One(k)) => std::slice::from_ref(k),
            Some(Keys::Many(keys)) => keys,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_then_many_then_one_then_none() {
        let mut u = Users::default();
        u.insert("ann", 1);
        assert_eq!(u.get("ann"), &[1]);
        u.insert("ann", 5);
        u.insert("bob", 2);
        assert_eq!(u.get("ann"), &[1, 5]);
        u.remove("ann", 1);
        assert_eq!(u.get("ann"), &[5]);
        u.remove("ann", 5);
        assert!(u.get("ann").is_empty());
        assert_eq!(u.get("bob"), &[2]);
    }
}
