//! The Centrifuge client protocol v2 messages, for both encodings.
//!
//! Owns: the message types, with the field numbers of the published schema
//! (`definitions/client.proto` of centrifugal/protocol, package
//! `centrifugal.centrifuge.protocol`) for protobuf, and the JSON shape the clients use: field
//! names as in the schema, zero and empty fields left out (so an empty result is `{}` and the
//! result key is still present), and every `bytes` field (`data`, `conn_info`, `chan_info`)
//! embedded as raw JSON, not base64. Never: decides anything.
//!
//! Only the fields this server reads or sends are declared: protobuf decoders skip unknown
//! fields and our JSON decoding ignores unknown keys, so a newer client's extra fields pass.
//! Request fields that change what the client expects (`tf`, `type`, `delta`) are declared so
//! the session can refuse or ignore them deliberately.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One client command: an id and exactly one request (the first present one counts, in field
/// order). `{}` / an empty protobuf message is the pong.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Command {
    /// Matches the reply to the command; counts up from 1. 0 only for `send` and the pong.
    #[prost(uint32, tag = "1")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub id: u32,
    /// `connect`.
    #[prost(message, optional, tag = "4")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<ConnectRequest>,
    /// `subscribe`.
    #[prost(message, optional, tag = "5")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribeRequest>,
    /// `unsubscribe`.
    #[prost(message, optional, tag = "6")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsubscribe: Option<UnsubscribeRequest>,
    /// `publish`.
    #[prost(message, optional, tag = "7")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishRequest>,
    /// `presence`.
    #[prost(message, optional, tag = "8")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceRequest>,
    /// `presence_stats`.
    #[prost(message, optional, tag = "9")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_stats: Option<PresenceStatsRequest>,
    /// `history`.
    #[prost(message, optional, tag = "10")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryRequest>,
    /// `ping` (protocol v1's; the v2 SDKs never send it).
    #[prost(message, optional, tag = "11")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping: Option<Empty>,
    /// `send`: an asynchronous message to the application, no reply.
    #[prost(message, optional, tag = "12")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send: Option<SendRequest>,
    /// `rpc`.
    #[prost(message, optional, tag = "13")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc: Option<RpcRequest>,
    /// `refresh`: a new connection token.
    #[prost(message, optional, tag = "14")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshRequest>,
    /// `sub_refresh`: a new subscription token.
    #[prost(message, optional, tag = "15")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_refresh: Option<SubRefreshRequest>,
}

/// One server message: a reply (`id` with a result or an `error`), a push (no id), or, with
/// nothing set, the ping.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Reply {
    /// The command's id; 0 on pushes.
    #[prost(uint32, tag = "1")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub id: u32,
    /// The command failed.
    #[prost(message, optional, tag = "2")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
    /// A push.
    #[prost(message, optional, tag = "4")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push: Option<Push>,
    /// `connect`'s result.
    #[prost(message, optional, tag = "5")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<ConnectResult>,
    /// `subscribe`'s result.
    #[prost(message, optional, tag = "6")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribeResult>,
    /// `unsubscribe`'s result (empty).
    #[prost(message, optional, tag = "7")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsubscribe: Option<Empty>,
    /// `publish`'s result (empty).
    #[prost(message, optional, tag = "8")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<Empty>,
    /// `presence`'s result.
    #[prost(message, optional, tag = "9")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceResult>,
    /// `presence_stats`' result.
    #[prost(message, optional, tag = "10")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_stats: Option<PresenceStatsResult>,
    /// `history`'s result.
    #[prost(message, optional, tag = "11")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryResult>,
    /// `ping`'s result (empty).
    #[prost(message, optional, tag = "12")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping: Option<Empty>,
    /// `rpc`'s result.
    #[prost(message, optional, tag = "13")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc: Option<RpcResult>,
    /// `refresh`'s result.
    #[prost(message, optional, tag = "14")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshResult>,
    /// `sub_refresh`'s result.
    #[prost(message, optional, tag = "15")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_refresh: Option<SubRefreshResult>,
}

/// A message with no fields: the results of unsubscribe, publish and ping, the ping request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
pub struct Empty {}

/// A reply's error.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Error {
    /// The code (100..=113).
    #[prost(uint32, tag = "1")]
    pub code: u32,
    /// What it means, in words.
    #[prost(string, tag = "2")]
    pub message: String,
    /// The client may retry.
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_false")]
    pub temporary: bool,
}

/// A push: something that happened on a channel (or to the connection), not an answer.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Push {
    /// The channel it concerns.
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub channel: String,
    /// A publication.
    #[prost(message, optional, tag = "4")]
    #[serde(rename = "pub", skip_serializing_if = "Option::is_none")]
    pub publication: Option<Publication>,
    /// Someone joined the channel.
    #[prost(message, optional, tag = "5")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinLeave>,
    /// Someone left the channel.
    #[prost(message, optional, tag = "6")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leave: Option<JoinLeave>,
    /// The server ended the subscription.
    #[prost(message, optional, tag = "7")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsubscribe: Option<UnsubscribePush>,
    /// A message to this connection alone.
    #[prost(message, optional, tag = "8")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<MessagePush>,
    /// The server subscribed the connection (a server-side subscription added later).
    #[prost(message, optional, tag = "9")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribePush>,
    /// The server disconnects the connection (unidirectional transports; we close instead).
    #[prost(message, optional, tag = "11")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnect: Option<DisconnectPush>,
}

/// Who: a connection in presence, join/leave and client publications.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientInfo {
    /// The user id (`sub`; empty for anonymous).
    #[prost(string, tag = "1")]
    pub user: String,
    /// The connection's client id.
    #[prost(string, tag = "2")]
    pub client: String,
    /// The connection token's `info`, raw JSON.
    #[prost(bytes = "bytes", tag = "3")]
    #[serde(with = "raw_json", skip_serializing_if = "Bytes::is_empty")]
    pub conn_info: Bytes,
    /// The subscription token's `info`, raw JSON.
    #[prost(bytes = "bytes", tag = "4")]
    #[serde(with = "raw_json", skip_serializing_if = "Bytes::is_empty")]
    pub chan_info: Bytes,
}

/// A publication.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Publication {
    /// The payload, raw JSON.
    #[prost(bytes = "bytes", tag = "4")]
    #[serde(with = "raw_json", skip_serializing_if = "Bytes::is_empty")]
    pub data: Bytes,
    /// The publishing connection, for publications from clients.
    #[prost(message, optional, tag = "5")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<ClientInfo>,
    /// Its offset in the channel's stream (0 = the channel keeps no history).
    #[prost(uint64, tag = "6")]
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub offset: u64,
    /// Tags.
    #[prost(btree_map = "string, string", tag = "7")]
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// `join` / `leave` push body.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct JoinLeave {
    /// Who joined or left.
    #[prost(message, optional, tag = "1")]
    pub info: Option<ClientInfo>,
}

/// `unsubscribe` push body.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct UnsubscribePush {
    /// [`super::codes::UnsubscribeCode`].
    #[prost(uint32, tag = "2")]
    pub code: u32,
    /// In words.
    #[prost(string, tag = "3")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// `message` push body.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct MessagePush {
    /// The payload, raw JSON.
    #[prost(bytes = "bytes", tag = "1")]
    #[serde(with = "raw_json", skip_serializing_if = "Bytes::is_empty")]
    pub data: Bytes,
}

/// `subscribe` push body.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SubscribePush {
    /// The stream is recoverable.
    #[prost(bool, tag = "1")]
    #[serde(skip_serializing_if = "is_false")]
    pub recoverable: bool,
    /// The stream's epoch.
    #[prost(string, tag = "4")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    /// The stream's top offset.
    #[prost(uint64, tag = "5")]
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub offset: u64,
    /// The stream is positioned.
    #[prost(bool, tag = "6")]
    #[serde(skip_serializing_if = "is_false")]
    pub positioned: bool,
}

/// `disconnect` push body.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct DisconnectPush {
    /// The close code.
    #[prost(uint32, tag = "1")]
    pub code: u32,
    /// The reason.
    #[prost(string, tag = "2")]
    pub reason: String,
    /// Whether to reconnect.
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_false")]
    pub reconnect: bool,
}

/// `connect` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectRequest {
    /// The connection JWT.
    #[prost(string, tag = "1")]
    pub token: String,
    /// Custom data (for a connect proxy; not used here).
    #[prost(bytes = "bytes", tag = "2")]
    #[serde(with = "raw_json", skip_serializing_if = "Bytes::is_empty")]
    pub data: Bytes,
    /// Recovery positions for server-side subscriptions, by channel.
    #[prost(btree_map = "string, message", tag = "3")]
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub subs: BTreeMap<String, SubscribeRequest>,
    /// The SDK's name (`js`, `python`).
    #[prost(string, tag = "4")]
    pub name: String,
    /// The SDK's version.
    #[prost(string, tag = "5")]
    pub version: String,
}

/// `connect` result.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectResult {
    /// The connection's client id.
    #[prost(string, tag = "1")]
    pub client: String,
    /// The server's version.
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// The connection expires (refresh before `ttl` runs out).
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    /// Seconds until it expires.
    #[prost(uint32, tag = "4")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
    /// The server-side subscriptions, by channel.
    #[prost(btree_map = "string, message", tag = "6")]
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub subs: BTreeMap<String, SubscribeResult>,
    /// Seconds between the server's pings.
    #[prost(uint32, tag = "7")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ping: u32,
    /// The client must answer pings.
    #[prost(bool, tag = "8")]
    #[serde(skip_serializing_if = "is_false")]
    pub pong: bool,
}

/// `refresh` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct RefreshRequest {
    /// The new connection JWT.
    #[prost(string, tag = "1")]
    pub token: String,
}

/// `refresh` result.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct RefreshResult {
    /// The connection's client id.
    #[prost(string, tag = "1")]
    pub client: String,
    /// The server's version.
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// The connection expires.
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    /// Seconds until it expires.
    #[prost(uint32, tag = "4")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
}

/// `subscribe` request (also a connect `subs` entry).
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SubscribeRequest {
    /// The channel.
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub channel: String,
    /// A subscription JWT.
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub token: String,
    /// Recover from `offset` / `epoch`.
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_false")]
    pub recover: bool,
    /// The epoch last seen.
    #[prost(string, tag = "6")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    /// The offset last seen.
    #[prost(uint64, tag = "7")]
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub offset: u64,
    /// Custom data (for a subscribe proxy; not used here).
    #[prost(bytes = "bytes", tag = "8")]
    #[serde(with = "raw_json", skip_serializing_if = "Bytes::is_empty")]
    pub data: Bytes,
    /// Asks for a positioned stream.
    #[prost(bool, tag = "9")]
    #[serde(skip_serializing_if = "is_false")]
    pub positioned: bool,
    /// Asks for a recoverable stream.
    #[prost(bool, tag = "10")]
    #[serde(skip_serializing_if = "is_false")]
    pub recoverable: bool,
    /// Asks for join/leave pushes.
    #[prost(bool, tag = "11")]
    #[serde(skip_serializing_if = "is_false")]
    pub join_leave: bool,
    /// Delta compression asked for (`fossil`); never negotiated here.
    #[prost(string, tag = "12")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub delta: String,
    /// A tags filter: refused with 108 (ignoring it would deliver what the client filtered out).
    #[prost(message, optional, tag = "13")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tf: Option<FilterNode>,
    /// Bit 1: channel compaction (ignored: we never assign channel ids); bit 2: reject an
    /// unrecovered subscription with 112.
    #[prost(int64, tag = "14")]
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub flag: i64,
    /// Subscription type; anything but 0 (map, shared poll) is refused with 108.
    #[prost(int32, tag = "15")]
    #[serde(rename = "type", skip_serializing_if = "is_zero_i32")]
    pub kind: i32,
}

/// A tags filter node; declared only so that its presence is seen.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct FilterNode {
    /// The operation.
    #[prost(string, tag = "1")]
    pub op: String,
    /// The tag.
    #[prost(string, tag = "2")]
    pub key: String,
    /// The comparison.
    #[prost(string, tag = "3")]
    pub cmp: String,
    /// The value.
    #[prost(string, tag = "4")]
    pub val: String,
    /// The values.
    #[prost(string, repeated, tag = "5")]
    pub vals: Vec<String>,
    /// Sub-filters.
    #[prost(message, repeated, tag = "6")]
    pub nodes: Vec<FilterNode>,
}

/// `subscribe` result (also a connect `subs` entry).
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SubscribeResult {
    /// The subscription expires (subscription tokens).
    #[prost(bool, tag = "1")]
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    /// Seconds until it expires.
    #[prost(uint32, tag = "2")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
    /// The stream is recoverable.
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_false")]
    pub recoverable: bool,
    /// The stream's epoch.
    #[prost(string, tag = "6")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    /// The recovered publications, in offset order.
    #[prost(message, repeated, tag = "7")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publications: Vec<Publication>,
    /// The recovery got every missed publication.
    #[prost(bool, tag = "8")]
    #[serde(skip_serializing_if = "is_false")]
    pub recovered: bool,
    /// The stream's offset (the requested one after a successful recovery, else the top).
    #[prost(uint64, tag = "9")]
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub offset: u64,
    /// The stream is positioned.
    #[prost(bool, tag = "10")]
    #[serde(skip_serializing_if = "is_false")]
    pub positioned: bool,
    /// The subscription token's `data`.
    #[prost(bytes = "bytes", tag = "11")]
    #[serde(with = "raw_json", skip_serializing_if = "Bytes::is_empty")]
    pub data: Bytes,
    /// The client asked to recover.
    #[prost(bool, tag = "12")]
    #[serde(skip_serializing_if = "is_false")]
    pub was_recovering: bool,
}

/// `sub_refresh` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SubRefreshRequest {
    /// The channel.
    #[prost(string, tag = "1")]
    pub channel: String,
    /// The new subscription JWT.
    #[prost(string, tag = "2")]
    pub token: String,
}

/// `sub_refresh` result.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SubRefreshResult {
    /// The subscription expires.
    #[prost(bool, tag = "1")]
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    /// Seconds until it expires.
    #[prost(uint32, tag = "2")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
}

/// `unsubscribe` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct UnsubscribeRequest {
    /// The channel.
    #[prost(string, tag = "1")]
    pub channel: String,
}

/// `publish` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct PublishRequest {
    /// The channel.
    #[prost(string, tag = "1")]
    pub channel: String,
    /// The payload, raw JSON.
    #[prost(bytes = "bytes", tag = "2")]
    #[serde(with = "raw_json", skip_serializing_if = "Bytes::is_empty")]
    pub data: Bytes,
    /// 0 = a publication; 1 = a map publish (refused with 108).
    #[prost(int32, tag = "3")]
    #[serde(rename = "type", skip_serializing_if = "is_zero_i32")]
    pub kind: i32,
}

/// `presence` and `presence_stats` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct PresenceRequest {
    /// The channel.
    #[prost(string, tag = "1")]
    pub channel: String,
}

/// `presence_stats` request (same shape as `presence`'s).
pub type PresenceStatsRequest = PresenceRequest;

/// `presence` result.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct PresenceResult {
    /// Every connection subscribed, by client id.
    #[prost(btree_map = "string, message", tag = "1")]
    pub presence: BTreeMap<String, ClientInfo>,
}

/// `presence_stats` result.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct PresenceStatsResult {
    /// Connections subscribed.
    #[prost(uint32, tag = "1")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub num_clients: u32,
    /// Distinct users among them.
    #[prost(uint32, tag = "2")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub num_users: u32,
}

/// A position in a channel's stream.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamPosition {
    /// The offset.
    #[prost(uint64, tag = "1")]
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub offset: u64,
    /// The epoch.
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
}

/// `history` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct HistoryRequest {
    /// The channel.
    #[prost(string, tag = "1")]
    pub channel: String,
    /// 0 = only the stream's top; -1 = everything (capped); n = at most n.
    #[prost(int32, tag = "7")]
    #[serde(skip_serializing_if = "is_zero_i32")]
    pub limit: i32,
    /// Publications after this position.
    #[prost(message, optional, tag = "8")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<StreamPosition>,
    /// Newest first.
    #[prost(bool, tag = "9")]
    #[serde(skip_serializing_if = "is_false")]
    pub reverse: bool,
}

/// `history` result.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct HistoryResult {
    /// The publications.
    #[prost(message, repeated, tag = "1")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publications: Vec<Publication>,
    /// The stream's epoch.
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    /// The stream's top offset.
    #[prost(uint64, tag = "3")]
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub offset: u64,
}

/// `rpc` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct RpcRequest {
    /// The payload, raw JSON.
    #[prost(bytes = "bytes", tag = "1")]
    #[serde(with = "raw_json", skip_serializing_if = "Bytes::is_empty")]
    pub data: Bytes,
    /// The method.
    #[prost(string, tag = "2")]
    pub method: String,
}

/// `rpc` result.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct RpcResult {
    /// The payload, raw JSON.
    #[prost(bytes = "bytes", tag = "1")]
    #[serde(with = "raw_json", skip_serializing_if = "Bytes::is_empty")]
    pub data: Bytes,
}

/// `send` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SendRequest {
    /// The payload, raw JSON.
    #[prost(bytes = "bytes", tag = "1")]
    #[serde(with = "raw_json", skip_serializing_if = "Bytes::is_empty")]
    pub data: Bytes,
}

fn is_false(v: &bool) -> bool {
    !*v
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}
fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}
fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

/// `bytes` fields in the JSON protocol: the bytes are JSON text, embedded as it is.
mod raw_json {
    use bytes::Bytes;
    use serde::de::Error as _;
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::value::RawValue;

    pub fn serialize<S: Serializer>(bytes: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        // Checked again here (the session checks what it accepts): a field that is not JSON
        // would make the whole line unreadable to the client.
        let text = std::str::from_utf8(bytes).map_err(S::Error::custom)?;
        let raw: &RawValue = serde_json::from_str(text).map_err(S::Error::custom)?;
        raw.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        if raw.get().is_empty() {
            return Err(D::Error::custom("empty JSON value"));
        }
        Ok(Bytes::from(raw.get().to_owned()))
    }
}
