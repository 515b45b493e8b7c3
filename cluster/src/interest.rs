//! Interest: what this node's subscribers want (advertised to every peer) and, per session,
//! what the peer at the other end wants (applied from its generation-numbered SUB/UNSUB and
//! SYNC snapshots).

use std::collections::{BTreeMap, BTreeSet};

use crate::wire::{CtrlRecord, GROUP_SEP, Pattern, PatternKind, stable_hash};

/// Most exact topics one peer may advertise (memory bound; past it the session is closed).
pub const MAX_REMOTE_TOPICS: usize = 1_000_000;
/// Most globs one peer may advertise (each is tested per publication).
pub const MAX_REMOTE_GLOBS: usize = 10_000;

/// Character-level WSE glob: `*` any run (also empty), `?` exactly one character.
pub fn glob_match(pattern: &str, topic: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = topic.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A set of patterns answering "does anything here match this topic?".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatternSet {
    exact: BTreeSet<String>,
    globs: BTreeSet<String>,
    /// Queue groups as `group` U+001F `topic` (see [`Pattern::group`]).
    groups: BTreeSet<String>,
}

impl PatternSet {
    /// Whether a publication to `topic` is wanted.
    pub fn matches(&self, topic: &str) -> bool {
        self.exact.contains(topic) || self.globs.iter().any(|g| glob_match(g, topic))
    }
    /// Whether a member of queue group `group` on `topic` is here.
    pub fn has_group(&self, topic: &str, group: &str) -> bool {
        self.groups.contains(&Pattern::group(topic, group).text)
    }
    /// The queue groups on `topic`.
    pub fn groups_of<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.groups.iter().filter_map(move |t| {
            t.split_once(GROUP_SEP)
                .filter(|(_, tp)| *tp == topic)
                .map(|(g, _)| g)
        })
    }
    fn set_of(&mut self, kind: PatternKind) -> &mut BTreeSet<String> {
        match kind {
            PatternKind::Exact => &mut self.exact,
            PatternKind::Glob => &mut self.globs,
            PatternKind::Group => &mut self.groups,
        }
    }
    fn insert(&mut self, p: &Pattern) -> bool {
        self.set_of(p.kind).insert(p.text.clone())
    }
    fn remove(&mut self, p: &Pattern) -> bool {
        self.set_of(p.kind).remove(&p.text)
    }
    /// Number of patterns.
    pub fn len(&self) -> usize {
        self.exact.len() + self.globs.len() + self.groups.len()
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// All patterns, in order.
    pub fn patterns(&self) -> BTreeSet<Pattern> {
        let e = self.exact.iter().map(|t| Pattern {
            kind: PatternKind::Exact,
            text: t.clone(),
        });
        let g = self.globs.iter().map(|t| Pattern {
            kind: PatternKind::Glob,
            text: t.clone(),
        });
        let q = self.groups.iter().map(|t| Pattern {
            kind: PatternKind::Group,
            text: t.clone(),
        });
        e.chain(g).chain(q).collect()
    }
    /// Count and XOR of the patterns' stable hashes (SYNC_END's check).
    pub fn digest(&self) -> (u64, u64) {
        let d = self
            .exact
            .iter()
            .map(|t| stable_hash(PatternKind::Exact, t))
            .chain(self.globs.iter().map(|t| stable_hash(PatternKind::Glob, t)))
            .chain(
                self.groups
                    .iter()
                    .map(|t| stable_hash(PatternKind::Group, t)),
            )
            .fold(0, |a, h| a ^ h);
        (self.len() as u64, d)
    }
    fn within_limits(&self) -> bool {
        self.exact.len() + self.groups.len() <= MAX_REMOTE_TOPICS
            && self.globs.len() <= MAX_REMOTE_GLOBS
    }
}

/// This node's interest: subscriber counts per pattern; the advertised set is those above 0.
#[derive(Debug, Clone, Default)]
pub struct LocalInterest {
    counts: BTreeMap<Pattern, u64>,
    set: PatternSet,
}

impl LocalInterest {
    /// One more subscriber; true if the pattern was not advertised (send SUB). A pattern whose
    /// last subscriber left is still advertised until [`LocalInterest::withdraw`], so a quick
    /// resubscription costs nothing.
    pub fn add(&mut self, p: &Pattern) -> bool {
        *self.counts.entry(p.clone()).or_insert(0) += 1;
        self.set.insert(p)
    }
    /// One subscriber fewer; true on 1 → 0 (withdraw it after the linger).
    pub fn remove(&mut self, p: &Pattern) -> bool {
        match self.counts.get_mut(p) {
            Some(c) if *c > 1 => {
                *c -= 1;
                false
            }
            Some(_) => {
                self.counts.remove(p);
                true
            }
            None => false,
        }
    }
    /// Stops advertising `p` if it still has no subscriber; true if it did (send UNSUB).
    pub fn withdraw(&mut self, p: &Pattern) -> bool {
        !self.counts.contains_key(p) && self.set.remove(p)
    }
    /// Whether a local subscriber wants `topic` now. Asked for every publication a peer sends,
    /// so it looks the exact topic up and tests only the globs (never every pattern: a node may
    /// hold a million topics).
    pub fn wanted(&self, topic: &str) -> bool {
        if !self.set.matches(topic) {
            return false;
        }
        if self.counts.contains_key(&Pattern::exact(topic)) {
            return true;
        }
        let globs = Pattern {
            kind: PatternKind::Glob,
            text: String::new(),
        };
        self.counts
            .range(globs..)
            .take_while(|(p, _)| p.kind == PatternKind::Glob)
            .any(|(p, _)| glob_match(&p.text, topic))
    }
    /// Whether a local member of queue group `group` on `topic` is here now.
    pub fn wanted_group(&self, topic: &str, group: &str) -> bool {
        self.counts.contains_key(&Pattern::group(topic, group))
    }
    /// The advertised set.
    pub fn set(&self) -> &PatternSet {
        &self.set
    }
    /// The snapshot records for a session: SYNC_BEGIN, one SUB per pattern, SYNC_END, all with
    /// generation `generation`.
    pub fn snapshot(&self, generation: u64) -> Vec<CtrlRecord> {
        let mut v = vec![CtrlRecord::SyncBegin { generation }];
        v.extend(
            self.set
                .patterns()
                .into_iter()
                .map(|pattern| CtrlRecord::Sub {
                    generation,
                    pattern,
                }),
        );
        let (count, digest) = self.set.digest();
        v.push(CtrlRecord::SyncEnd {
            generation,
            count,
            digest,
        });
        v
    }
}

/// Why a peer's interest records were refused (the session is closed with `PROTOCOL`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterestError {
    /// A generation out of order (the control lane is lossless and ordered).
    #[error("generation {got} where {want} was due")]
    Generation {
        /// Received.
        got: u64,
        /// Expected.
        want: u64,
    },
    /// SYNC_END's count or digest disagrees with the SUBs received.
    #[error("snapshot digest mismatch")]
    Digest,
    /// A record outside or inside a snapshot where it does not belong.
    #[error("snapshot framing")]
    Framing,
    /// More than [`MAX_REMOTE_TOPICS`] / [`MAX_REMOTE_GLOBS`].
    #[error("peer interest over the limits")]
    TooMany,
}

/// What one peer wants, as received on one session.
#[derive(Debug, Clone, Default)]
pub struct RemoteInterest {
    table: PatternSet,
    applied: u64,
    pending: Option<(u64, PatternSet)>,
    synced: bool,
}

impl RemoteInterest {
    /// Whether a snapshot has completed (before that, publications for this peer are held).
    pub fn synced(&self) -> bool {
        self.synced
    }
    /// The highest applied generation (what ACK returns).
    pub fn applied(&self) -> u64 {
        self.applied
    }
    /// The peer's current interest.
    pub fn table(&self) -> &PatternSet {
        &self.table
    }
    /// Whether a DIGEST agrees with the table (a DIGEST for another generation, or during a
    /// snapshot, cannot be compared and counts as agreeing).
    pub fn agrees(&self, generation: u64, count: u64, digest: u64) -> bool {
        self.pending.is_some()
            || !self.synced
            || generation != self.applied
            || self.table.digest() == (count, digest)
    }
    /// Applies an interest record; `Ok(true)` if an ACK is due.
    pub fn apply(&mut self, rec: &CtrlRecord) -> Result<bool, InterestError> {
        match rec {
            CtrlRecord::SyncBegin { generation } => {
                if *generation <= self.applied && self.synced || self.pending.is_some() {
                    return Err(InterestError::Framing);
                }
                self.pending = Some((*generation, PatternSet::default()));
                Ok(false)
            }
            CtrlRecord::Sub {
                generation,
                pattern,
            } if self.pending.is_some() => {
                let (g, set) = self.pending.as_mut().expect("checked");
                if generation != g {
                    return Err(InterestError::Generation {
                        got: *generation,
                        want: *g,
                    });
                }
                set.insert(pattern);
                if !set.within_limits() {
                    return Err(InterestError::TooMany);
                }
                Ok(false)
            }
            CtrlRecord::SyncEnd {
                generation,
                count,
                digest,
            } => {
                let (g, set) = self.pending.take().ok_or(InterestError::Framing)?;
                if *generation != g {
                    return Err(InterestError::Generation {
                        got: *generation,
                        want: g,
                    });
                }
                if set.digest() != (*count, *digest) {
                    return Err(InterestError::Digest);
                }
                self.table = set;
                self.applied = g;
                self.synced = true;
                Ok(true)
            }
            CtrlRecord::Sub {
                generation,
                pattern,
            }
            | CtrlRecord::Unsub {
                generation,
                pattern,
            } => {
                if !self.synced {
                    return Err(InterestError::Framing);
                }
                if *generation != self.applied + 1 {
                    return Err(InterestError::Generation {
                        got: *generation,
                        want: self.applied + 1,
                    });
                }
                self.applied = *generation;
                if matches!(rec, CtrlRecord::Sub { .. }) {
                    self.table.insert(pattern);
                    if !self.table.within_limits() {
                        return Err(InterestError::TooMany);
                    }
                } else {
                    self.table.remove(pattern);
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_looks_up_exact_topics_and_tests_globs_only() {
        let mut l = LocalInterest::default();
        let exact = Pattern::exact("a*b");
        l.add(&exact);
        l.add(&Pattern::parse("x.*"));
        l.add(&Pattern::group("g1", "workers"));
        // An exact topic with `*` in it is not a glob.
        assert!(l.wanted("a*b"));
        assert!(!l.wanted("axb"));
        assert!(l.wanted("x.y"));
        // A group's members want their group's picks, not the topic's plain publications.
        assert!(!l.wanted("g1"));
        // A lingering pattern (no subscriber left, still advertised) is not wanted.
        assert!(l.remove(&exact));
        assert!(!l.wanted("a*b"));
        assert!(l.withdraw(&exact));
    }

    #[test]
    fn globs_are_character_level() {
        assert!(glob_match("a.*", "a.b.c"));
        assert!(glob_match("a.*", "a."));
        assert!(!glob_match("a.*", "a"));
        assert!(glob_match("*", ""));
        assert!(glob_match("pr?ce*z", "price.xyz"));
        assert!(!glob_match("pr?ce", "prce"));
        assert!(glob_match("*a*b*", "xxaxxbxx"));
        assert!(!glob_match("*a*b", "xxaxxbxx"));
        assert!(glob_match("é?", "éü"));
    }

    #[test]
    fn local_interest_advertises_on_first_and_withdraws_after_the_last() {
        let mut l = LocalInterest::default();
        let p = Pattern::parse("t");
        assert!(l.add(&p));
        assert!(!l.add(&p));
        assert!(!l.remove(&p));
        assert!(l.remove(&p));
        assert!(!l.remove(&p));
        assert!(
            !l.wanted("t") && l.set().matches("t"),
            "lingering: advertised, not wanted"
        );
        assert!(!l.add(&p), "back within the linger: nothing to send");
        assert!(!l.withdraw(&p), "a subscriber again: stays");
        assert!(l.remove(&p));
        assert!(l.withdraw(&p));
        assert!(l.set().is_empty());
        assert!(!l.withdraw(&p));
    }

    #[test]
    fn snapshot_then_deltas_in_generation_order() {
        let mut l = LocalInterest::default();
        l.add(&Pattern::parse("a"));
        l.add(&Pattern::parse("b.*"));
        let mut r = RemoteInterest::default();
        for rec in l.snapshot(1) {
            r.apply(&rec).unwrap();
        }
        assert!(r.synced() && r.table() == l.set());
        assert!(r.table().matches("b.x") && !r.table().matches("c"));
        let unsub = CtrlRecord::Unsub {
            generation: 2,
            pattern: Pattern::parse("a"),
        };
        assert_eq!(r.apply(&unsub), Ok(true));
        assert_eq!(
            r.apply(&unsub),
            Err(InterestError::Generation { got: 2, want: 3 })
        );
        // A tampered snapshot is detected at SYNC_END.
        let mut snap = l.snapshot(5);
        snap.remove(1);
        let mut r = RemoteInterest::default();
        let res: Result<Vec<bool>, _> = snap.iter().map(|x| r.apply(x)).collect();
        assert_eq!(res, Err(InterestError::Digest));
    }
}
