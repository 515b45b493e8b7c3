//! Which client protocol a connection speaks, chosen once, at the upgrade.
//!
//! Owns: the choice — the conformance echo route (`server.echo_path`), the Centrifuge protocol
//! on `centrifuge.path` (JSON, or protobuf when the client offers the `centrifuge-protobuf`
//! subprotocol or asks with `?format=protobuf` / `?cf_protocol=protobuf`), WSE on every other
//! path — and the subprotocol the 101 response must name. Never: reads input after the
//! upgrade. Adding a protocol adds a variant here and its own module beside
//! [`crate::protocol`] and [`crate::centrifuge`].

use crate::centrifuge::Format;
use crate::centrifuge::codec::{JSON_SUBPROTOCOL, PROTOBUF_SUBPROTOCOL};
use crate::config::Config;
use crate::handshake::{UpgradeRequest, query_param};

/// A connection's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// RFC 6455 only: data messages echoed (the conformance route).
    Echo,
    /// The WSE protocol (docs/PROTOCOL.md).
    Wse,
    /// The Centrifuge client protocol v2 in this encoding (docs/CENTRIFUGO.md).
    Centrifuge(Format),
}

/// The choice, and the subprotocol to name in the 101 response (`None`: no header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The protocol.
    pub dialect: Dialect,
    /// One of the client's offers, to select in the response.
    pub subprotocol: Option<&'static str>,
}

impl Choice {
    /// What `request` gets under `cfg`.
    pub fn select(request: &UpgradeRequest, cfg: &Config) -> Self {
        let path = request.path.as_str();
        if cfg.server.echo_path.as_deref() == Some(path) {
            return Self {
                dialect: Dialect::Echo,
                subprotocol: None,
            };
        }
        if !(cfg.centrifuge.enabled && cfg.centrifuge.path == path) {
            return Self {
                dialect: Dialect::Wse,
                subprotocol: None,
            };
        }
        let offered = |name: &str| {
            request
                .protocols
                .as_deref()
                .is_some_and(|list| list.split(',').any(|p| p.trim() == name))
        };
        let (format, subprotocol) = if offered(PROTOBUF_SUBPROTOCOL) {
            (Format::Protobuf, Some(PROTOBUF_SUBPROTOCOL))
        } else if offered(JSON_SUBPROTOCOL) {
            (Format::Json, Some(JSON_SUBPROTOCOL))
        } else {
            let asked = request.query.as_deref().is_some_and(|q| {
                ["format", "cf_protocol"]
                    .iter()
                    .any(|name| query_param(q, name).is_some_and(|v| v == "protobuf"))
            });
            let format = if asked {
                Format::Protobuf
            } else {
                Format::Json
            };
            (format, None)
        };
        Self {
            dialect: Dialect::Centrifuge(format),
            subprotocol,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, query: Option<&str>, protocols: Option<&str>) -> UpgradeRequest {
        UpgradeRequest {
            path: path.into(),
            query: query.map(Into::into),
            protocols: protocols.map(Into::into),
            ..UpgradeRequest::default()
        }
    }

    fn choose(path: &str, query: Option<&str>, protocols: Option<&str>) -> Choice {
        let mut cfg = Config::default();
        cfg.server.echo_path = Some("/echo".into());
        Choice::select(&request(path, query, protocols), &cfg)
    }

    #[test]
    fn the_path_picks_the_protocol() {
        assert_eq!(choose("/echo", None, None).dialect, Dialect::Echo);
        assert_eq!(choose("/wse", None, None).dialect, Dialect::Wse);
        assert_eq!(
            choose("/", None, Some("centrifuge-protobuf")).dialect,
            Dialect::Wse
        );
        assert_eq!(
            choose("/connection/websocket", None, None),
            Choice {
                dialect: Dialect::Centrifuge(Format::Json),
                subprotocol: None
            }
        );
        let mut cfg = Config::default();
        cfg.centrifuge.enabled = false;
        let off = Choice::select(&request("/connection/websocket", None, None), &cfg);
        assert_eq!(off.dialect, Dialect::Wse);
    }

    #[test]
    fn the_encoding_comes_from_the_offers_then_the_query() {
        let path = "/connection/websocket";
        assert_eq!(
            choose(path, None, Some("centrifuge-json, centrifuge-protobuf")),
            Choice {
                dialect: Dialect::Centrifuge(Format::Protobuf),
                subprotocol: Some("centrifuge-protobuf")
            }
        );
        assert_eq!(
            choose(path, None, Some("centrifuge-json")),
            Choice {
                dialect: Dialect::Centrifuge(Format::Json),
                subprotocol: Some("centrifuge-json")
            }
        );
        for query in ["format=protobuf", "x=1&cf_protocol=protobuf"] {
            assert_eq!(
                choose(path, Some(query), Some("other")),
                Choice {
                    dialect: Dialect::Centrifuge(Format::Protobuf),
                    subprotocol: None
                },
                "{query}"
            );
        }
        assert_eq!(
            choose(path, Some("format=json"), None).dialect,
            Dialect::Centrifuge(Format::Json)
        );
    }
}
