//! The topic side of the engine API: publications (broadcasts) through a topic's owner shard,
//! presence queries answered by the owner, and subscriber counts gathered from every shard.
//!
//! Owns: routing these to the owner (computed from the topic's name) or to every shard. Never:
//! sequences or delivers anything (the owner does).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{PresenceMember, PublishError, QueryError, Server};
use crate::centrifuge::proto::{ClientInfo, Publication};
use crate::command::{Command, CommandError, TopicStats, TopicSubscribers};
use crate::fabric::{FabricMsg, Query, QueryAnswer, QueryKind, Sent};
use crate::protocol;
use crate::reply::{ReplyFuture, ReplySlot};
use crate::topics::owner_of;

/// A read of a topic's history ([`Server::history`]).
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    /// The history's epoch (Centrifuge shows it as [`protocol::epoch_hex`] writes it).
    pub epoch: u32,
    /// The topic's last offset.
    pub offset: u64,
    /// The history still holds every publication after the position asked for (always, when
    /// none was given): otherwise that position is unrecoverable.
    pub complete: bool,
    /// The publications read, in offset order (`reverse`: newest first).
    pub publications: Vec<Publication>,
}

impl Server {
    /// Publishes `{"c":"U","t":<event>,"p":<data>,"v":1}` to every subscriber of `topic`.
    ///
    /// # Errors
    /// An invalid topic, or a full queue to the topic's owner shard.
    pub fn publish(&self, topic: &str, event: &str, data: &RawValue) -> Result<(), PublishError> {
        if let Some(problem) = protocol::topic_problem(topic) {
            return Err(PublishError::InvalidTopic(problem));
        }
        let body = protocol::publication(event, data);
        self.publish_body(topic, body)
    }

    /// [`Server::publish`] to the subscribers in this process only (not the other nodes of a
    /// cluster; see [`Server::broadcast_local`]).
    ///
    /// # Errors
    /// As [`Server::publish`].
    pub fn publish_local(
        &self,
        topic: &str,
        event: &str,
        data: &RawValue,
    ) -> Result<(), PublishError> {
        if let Some(problem) = protocol::topic_problem(topic) {
            return Err(PublishError::InvalidTopic(problem));
        }
        let m = FabricMsg::PublishLocal {
            topic: Arc::from(topic),
            body: protocol::publication(event, data),
        };
        self.publish_to_owner(topic, m)
    }

    pub(super) fn publish_body(&self, topic: &str, body: Bytes) -> Result<(), PublishError> {
        self.publish_to_owner(
            topic,
            FabricMsg::Publish {
                topic: Arc::from(topic),
                body,
                ack: None,
            },
        )
    }

    /// Sends `m`, a publication of `topic`, to the topic's owner shard.
    fn publish_to_owner(&self, topic: &str, m: FabricMsg) -> Result<(), PublishError> {
        let owner = owner_of(topic, self.shared.shards);
        let mut ep = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let sent = ep.send(owner, m);
        self.flusher.flush(&mut ep);
        match sent {
            Sent::Queued => Ok(()),
            Sent::Dropped => Err(PublishError::Overloaded),
        }
    }

    /// Publishes `message` — a JSON object, sent to subscribers verbatim (plus recovery stamps
    /// when recovery is on) — to every subscriber of `topic`, through the topic's owner shard
    /// as any publication: numbered, in the topic's order, recorded for recovery. Upstream's
    /// `broadcast(topic, data)`.
    ///
    /// ```no_run
    /// # fn demo(server: &wse_shards::Server) -> Result<(), wse_shards::PublishError> {
    /// let msg = serde_json::value::RawValue::from_string(
    ///     r#"{"c":"U","t":"price","p":{"px":101},"v":1}"#.to_owned(),
    /// ).unwrap();
    /// server.broadcast("prices", &msg)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// An invalid topic, a message that is not a JSON object, or a full queue to the owner.
    pub fn broadcast(&self, topic: &str, message: &RawValue) -> Result<(), PublishError> {
        if let Some(problem) = protocol::topic_problem(topic) {
            return Err(PublishError::InvalidTopic(problem));
        }
        if !message.get().starts_with('{') {
            return Err(PublishError::NotAnObject);
        }
        self.publish_body(topic, Bytes::copy_from_slice(message.get().as_bytes()))
    }

    /// Publishes any text to every subscriber of `topic`, as upstream's Python `broadcast`
    /// does: a JSON object (surrounding whitespace dropped) goes as [`Server::broadcast`] sends
    /// it, stamped when recovery is on; any other text (plain text, a JSON array, string or
    /// number, empty) goes as it is, never stamped, but still numbered in the topic's order and,
    /// with recovery on, kept in its history and replayed as it is (a client learns its position
    /// from the next stamped publication).
    ///
    /// ```no_run
    /// # fn demo(server: &wse_shards::Server) -> Result<(), wse_shards::PublishError> {
    /// server.broadcast_text("news", "plain text, sent as it is")?;
    /// server.broadcast_text("news", r#"{"t":"headline","p":{"id":7}}"#)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// An invalid topic; text that starts with `{` (after whitespace) but is not a JSON object
    /// ([`PublishError::NotAnObject`]: stamping it would make broken JSON); a full queue to the
    /// owner.
    pub fn broadcast_text(&self, topic: &str, text: &str) -> Result<(), PublishError> {
        if let Some(problem) = protocol::topic_problem(topic) {
            return Err(PublishError::InvalidTopic(problem));
        }
        // The owner stamps a body that starts with `{` and sends any other as it is.
        if text.trim_start().starts_with('{') {
            let object =
                serde_json::from_str::<&RawValue>(text).map_err(|_| PublishError::NotAnObject)?;
            return self.publish_body(topic, Bytes::copy_from_slice(object.get().as_bytes()));
        }
        self.publish_body(topic, Bytes::copy_from_slice(text.as_bytes()))
    }

    /// [`Server::broadcast`] to the subscribers in this process only. "Local" is upstream's
    /// meaning, this process and not the other nodes of a cluster: the publication goes through
    /// the topic's owner shard like any other (numbered, in the topic's order, reaching every
    /// shard), but never to the cluster core; a standalone server reaches exactly what
    /// `broadcast` reaches. (A shard-local broadcast would reach an arbitrary part of the
    /// subscribers, since connections land on shards by the kernel's choice, and would bypass
    /// the topic's numbering that recovery relies on.)
    ///
    /// # Errors
    /// As [`Server::broadcast`].
    pub fn broadcast_local(&self, topic: &str, message: &RawValue) -> Result<(), PublishError> {
        if let Some(problem) = protocol::topic_problem(topic) {
            return Err(PublishError::InvalidTopic(problem));
        }
        if !message.get().starts_with('{') {
            return Err(PublishError::NotAnObject);
        }
        self.publish_to_owner(
            topic,
            FabricMsg::PublishLocal {
                topic: Arc::from(topic),
                body: Bytes::copy_from_slice(message.get().as_bytes()),
            },
        )
    }

    /// Connections subscribed to `topic` across all shards (queue-group members included), as
    /// each shard counted when it answered: exact when nothing changes meanwhile, never a
    /// global snapshot.
    ///
    /// # Errors
    /// An invalid topic; a shard that cannot be asked.
    pub async fn get_topic_subscriber_count(&self, topic: &str) -> Result<usize, CommandError> {
        Ok(self.get_topic_subscribers(topic).await?.count)
    }

    /// [`Server::get_topic_subscriber_count`] with the members of each of the topic's queue
    /// groups, summed over the shards, in group-name order.
    ///
    /// # Errors
    /// As [`Server::get_topic_subscriber_count`].
    pub async fn get_topic_subscribers(
        &self,
        topic: &str,
    ) -> Result<TopicSubscribers, CommandError> {
        if let Some(problem) = protocol::topic_problem(topic) {
            return Err(CommandError::InvalidTopic(problem));
        }
        let topic: Arc<str> = Arc::from(topic);
        let answers = self
            .gather(|reply| Command::SubscriberCount {
                topic: topic.clone(),
                reply,
            })
            .await?;
        let mut groups = std::collections::BTreeMap::<String, usize>::new();
        let mut count = 0;
        for a in answers {
            count += a.count;
            for (g, n) in a.queue_groups {
                *groups.entry(g).or_default() += n;
            }
        }
        Ok(TopicSubscribers {
            count,
            queue_groups: groups.into_iter().collect(),
        })
    }

    /// The topics with a subscriber (queue-group members included) on any shard that match
    /// `pattern` (a glob with `*` and `?`; `None`: all), each with its subscribers summed over the
    /// shards, in name order: at most `max` (the first by name), as each shard counted when it
    /// answered.
    ///
    /// # Errors
    /// A shard that cannot be asked.
    pub async fn channel_counts(
        &self,
        pattern: Option<&str>,
        max: usize,
    ) -> Result<Vec<(String, usize)>, CommandError> {
        let pattern: Option<Arc<str>> = pattern.map(Arc::from);
        let answers = self
            .gather(|reply| Command::ChannelCounts {
                pattern: pattern.clone(),
                max,
                reply,
            })
            .await?;
        let mut all = std::collections::BTreeMap::<Arc<str>, usize>::new();
        for (name, n) in answers.into_iter().flatten() {
            *all.entry(name).or_default() += n;
        }
        Ok(all
            .into_iter()
            .take(max)
            .map(|(name, n)| (name.to_string(), n))
            .collect())
    }

    /// How many topics have a subscriber or queue-group member, and the `top` topics with the
    /// most publications (most first; see [`TopicStats`]), from every shard's owned topics.
    ///
    /// # Errors
    /// A shard that cannot be asked.
    pub async fn topic_stats(&self, top: usize) -> Result<TopicStats, CommandError> {
        let answers = self
            .gather(|reply| Command::TopicStats { top, reply })
            .await?;
        let mut all = TopicStats::default();
        for a in answers {
            all.subscribed += a.subscribed;
            all.publications.extend(a.publications);
        }
        all.publications
            .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.publications.truncate(top);
        Ok(all)
    }

    /// The members of `topic` with their data and connection counts (asked of its owner shard).
    ///
    /// # Errors
    /// An invalid topic, presence off, or a full queue to the owner.
    pub async fn presence(&self, topic: &str) -> Result<Vec<PresenceMember>, QueryError> {
        let kind = QueryKind::Presence {
            topic: Arc::from(topic),
        };
        match self.query(topic, kind)?.await {
            QueryAnswer::Presence(members) => Ok(members
                .into_iter()
                .map(|(user_id, connections, data)| PresenceMember {
                    user_id,
                    connections,
                    data,
                })
                .collect()),
            _ => Err(QueryError::PresenceDisabled),
        }
    }

    /// `(users, connections)` of `topic`: constant time on its owner shard.
    ///
    /// # Errors
    /// An invalid topic, presence off, or a full queue to the owner.
    pub async fn presence_stats(&self, topic: &str) -> Result<(usize, u64), QueryError> {
        let kind = QueryKind::PresenceStats {
            topic: Arc::from(topic),
        };
        match self.query(topic, kind)?.await {
            QueryAnswer::PresenceStats(users, conns) => Ok((users, conns)),
            _ => Err(QueryError::PresenceDisabled),
        }
    }

    /// The connections of `topic`'s presence members, one entry each, as a Centrifuge client's
    /// `presence` lists them (a WSE connection shows as its user and connection id alone).
    ///
    /// # Errors
    /// An invalid topic, presence off, or a full queue to the owner.
    pub async fn presence_clients(&self, topic: &str) -> Result<Vec<ClientInfo>, QueryError> {
        let kind = QueryKind::PresenceClients {
            topic: Arc::from(topic),
        };
        match self.query(topic, kind)?.await {
            QueryAnswer::Clients(clients) => Ok(clients),
            _ => Err(QueryError::PresenceDisabled),
        }
    }

    /// A read of `topic`'s history, asked of its owner as a Centrifuge client's `history` is:
    /// at most `limit` publications after offset `after` (`None`: from the oldest held), the
    /// oldest of them (`reverse`: the newest, listed newest first), where only the newest
    /// `keep` publications count as history. `None` when recovery is off.
    ///
    /// # Errors
    /// An invalid topic, or a full queue to the owner.
    pub async fn history(
        &self,
        topic: &str,
        after: Option<u64>,
        limit: usize,
        reverse: bool,
        keep: usize,
    ) -> Result<Option<HistoryPage>, QueryError> {
        if !self.shared.cfg.recovery.enabled {
            return Ok(None);
        }
        let kind = QueryKind::History {
            topic: Arc::from(topic),
            after,
            limit,
            reverse,
            keep,
        };
        match self.ask_owner(topic, kind)?.await {
            QueryAnswer::History(read) => {
                let mut publications = crate::conn::replayed_publications(&read.frames);
                if reverse {
                    publications.reverse();
                }
                Ok(Some(HistoryPage {
                    epoch: read.epoch,
                    offset: read.offset,
                    complete: read.complete,
                    publications,
                }))
            }
            _ => Ok(None),
        }
    }

    /// Forgets the publications `topic`'s history holds, keeping its position (offset and
    /// epoch): the next publication gets the next offset, and a position from before is no
    /// longer recoverable. `false` when recovery is off.
    ///
    /// # Errors
    /// An invalid topic, or a full queue to the owner.
    pub async fn history_remove(&self, topic: &str) -> Result<bool, QueryError> {
        if !self.shared.cfg.recovery.enabled {
            return Ok(false);
        }
        let kind = QueryKind::HistoryRemove {
            topic: Arc::from(topic),
        };
        Ok(matches!(
            self.ask_owner(topic, kind)?.await,
            QueryAnswer::HistoryRemoved
        ))
    }

    /// A presence question for `topic`'s owner.
    fn query(&self, topic: &str, kind: QueryKind) -> Result<ReplyFuture<QueryAnswer>, QueryError> {
        if let Some(problem) = protocol::topic_problem(topic) {
            return Err(QueryError::InvalidTopic(problem));
        }
        if !self.shared.cfg.presence.enabled {
            return Err(QueryError::PresenceDisabled);
        }
        self.ask_owner(topic, kind)
    }

    /// Sends `kind` to `topic`'s owner; the future resolves with its answer.
    fn ask_owner(
        &self,
        topic: &str,
        kind: QueryKind,
    ) -> Result<ReplyFuture<QueryAnswer>, QueryError> {
        if let Some(problem) = protocol::topic_problem(topic) {
            return Err(QueryError::InvalidTopic(problem));
        }
        let reply = ReplySlot::new();
        let owner = owner_of(topic, self.shared.shards);
        let mut ep = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let sent = ep.send(
            owner,
            FabricMsg::Query(Box::new(Query {
                kind,
                reply: reply.clone(),
            })),
        );
        self.flusher.flush(&mut ep);
        match sent {
            Sent::Queued => Ok(reply.wait()),
            Sent::Dropped => Err(QueryError::Overloaded),
        }
    }
}
