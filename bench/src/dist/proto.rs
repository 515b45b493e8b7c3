//! The controller–agent messages and their framing: a 4-byte big-endian length, then JSON.
//! Blocking helpers for the controller (plain threads), async ones for the agent (tokio).

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fleet::{Loadgen, Slice, Snapshot};
use crate::scenarios::Phase;

/// Bumped when a message changes incompatibly; both sides refuse another version.
pub const VERSION: u32 = 1;
/// Largest frame accepted: results carry histograms (a few KiB each), never this much.
const FRAME_MAX: u32 = 64 << 20;

/// Controller to agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToAgent {
    Hello {
        version: u32,
    },
    /// Start `scenario`'s workload for `slice`. `common` and `args` are the scenario's flags as
    /// the controller parsed them; `sources` (comma list) replaces `--source` unless the agent
    /// has its own pool.
    Start {
        scenario: String,
        common: Value,
        args: Value,
        secret: String,
        slice: Slice,
        sources: Option<String>,
    },
    Phase {
        phase: Phase,
    },
    /// Stop the workload and send its figures.
    Finish,
}

/// Agent to controller.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromAgent {
    Hello {
        version: u32,
        wse_bench_version: String,
        host: String,
        /// RLIMIT_NOFILE after raising it to the hard limit.
        nofile: u64,
        /// Cores the agent may use.
        cores: usize,
        /// Worker threads it will run (`--threads`, else its cores).
        threads: usize,
        /// Size of its own `--source` pool (0: it takes the controller's share).
        sources: usize,
    },
    Started {
        threads: usize,
    },
    Progress(Snapshot),
    Result {
        part: Value,
        loadgen: Loadgen,
    },
    Error {
        message: String,
    },
}

fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let json = serde_json::to_vec(msg).expect("messages serialise");
    let mut frame = Vec::with_capacity(json.len() + 4);
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(&json);
    frame
}

fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> io::Result<T> {
    serde_json::from_slice(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn check_len(len: u32) -> io::Result<usize> {
    if len > FRAME_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the {FRAME_MAX}-byte limit"),
        ));
    }
    Ok(len as usize)
}

/// Writes one frame (blocking).
///
/// # Errors
/// The write failed.
pub fn write_msg<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    w.write_all(&encode(msg))
}

/// Reads one frame (blocking).
///
/// # Errors
/// The read failed, the peer closed, or the frame is not a message.
pub fn read_msg<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let mut body = vec![0u8; check_len(u32::from_be_bytes(len))?];
    r.read_exact(&mut body)?;
    decode(&body)
}

/// Writes one frame (async).
///
/// # Errors
/// The write failed.
pub async fn write_msg_async<T: Serialize>(
    w: &mut (impl AsyncWriteExt + Unpin),
    msg: &T,
) -> io::Result<()> {
    w.write_all(&encode(msg)).await
}

/// Reads one frame (async). Not cancel-safe: the agent reads from a task of its own.
///
/// # Errors
/// As [`read_msg`].
pub async fn read_msg_async<T: for<'de> Deserialize<'de>>(
    r: &mut (impl AsyncReadExt + Unpin),
) -> io::Result<T> {
    let len = r.read_u32().await?;
    let mut body = vec![0u8; check_len(len)?];
    r.read_exact(&mut body).await?;
    decode(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let msgs = [
            ToAgent::Hello { version: VERSION },
            ToAgent::Phase {
                phase: Phase::Measure,
            },
            ToAgent::Finish,
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            write_msg(&mut buf, m).unwrap();
        }
        // The documented shape: length, then JSON with a `type`.
        assert_eq!(
            &buf[4..buf[3] as usize + 4],
            br#"{"type":"hello","version":1}"#
        );
        let mut r = buf.as_slice();
        for m in &msgs {
            let back: ToAgent = read_msg(&mut r).unwrap();
            assert_eq!(format!("{back:?}"), format!("{m:?}"));
        }
        assert!(read_msg::<ToAgent>(&mut r).is_err(), "end of stream");
        let progress = FromAgent::Progress(Snapshot {
            ready: 3,
            ..Snapshot::default()
        });
        let json = serde_json::to_string(&progress).unwrap();
        assert!(
            json.starts_with(r#"{"type":"progress","opened":0,"ready":3"#),
            "{json}"
        );
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut buf = (FRAME_MAX + 1).to_be_bytes().to_vec();
        buf.extend_from_slice(b"{}");
        assert!(read_msg::<ToAgent>(&mut buf.as_slice()).is_err());
    }
}
