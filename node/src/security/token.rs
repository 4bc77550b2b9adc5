//! Resume tokens: opaque to clients, exact for the node.
//!
//! A token names a view and, for each of its shards, the incarnation of the
//! shard's change stream and the last sequence delivered from it. Resuming
//! is exclusive: each shard continues at `seq + 1`, so a client that stores
//! the token of the last batch it fully processed sees neither a gap nor a
//! duplicate, whichever node it resumes on.
//!
//! Tokens of format 1 (one position, before views had shards) are read for
//! a view of one shard, where they mean exactly what a format-2 token of one
//! shard means; for a sharded view they are refused.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ndc_proto::v1::{ResumeToken, ShardPosition};
use prost::Message;

/// One position per view (before shards).
const FORMAT_SINGLE: u32 = 1;
/// One position per shard.
const FORMAT_SHARDED: u32 = 2;

/// Where a subscriber stands in one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub incarnation: u64,
    pub seq: u64,
}

/// A decoded token: one position per shard, in shard order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positions {
    pub shards: Vec<Position>,
    /// Written by a release before shards (format 1).
    pub single_format: bool,
}

pub fn encode(view: &str, shards: &[Position]) -> String {
    URL_SAFE_NO_PAD.encode(
        ResumeToken {
            format: FORMAT_SHARDED,
            view: view.to_string(),
            shards: shards
                .iter()
                .map(|p| ShardPosition {
                    incarnation: p.incarnation,
                    seq: p.seq,
                })
                .collect(),
            ..ResumeToken::default()
        }
        .encode_to_vec(),
    )
}

fn parse(token: &str) -> Result<(String, Positions), String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| "resume token is not valid base64url".to_string())?;
    let t = ResumeToken::decode(bytes.as_slice())
        .map_err(|_| "resume token is malformed".to_string())?;
    let positions = match t.format {
        FORMAT_SINGLE => Positions {
            shards: vec![Position {
                incarnation: t.incarnation,
                seq: t.seq,
            }],
            single_format: true,
        },
        FORMAT_SHARDED if !t.shards.is_empty() => Positions {
            shards: t
                .shards
                .iter()
                .map(|p| Position {
                    incarnation: p.incarnation,
                    seq: p.seq,
                })
                .collect(),
            single_format: false,
        },
        FORMAT_SHARDED => return Err("resume token holds no shard position".to_string()),
        other => return Err(format!("resume token format {other} is not supported")),
    };
    Ok((t.view, positions))
}

/// Decodes a token, checking it belongs to `view`.
pub fn decode(token: &str, view: &str) -> Result<Positions, String> {
    let (of, positions) = parse(token)?;
    if of != view {
        return Err(format!("resume token belongs to view {of:?}, not {view:?}"));
    }
    Ok(positions)
}

/// Reads a token without knowing its view (for tools that print per-change
/// tokens).
pub fn peek(token: &str) -> Option<(String, Positions)> {
    parse(token).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(incarnation: u64, seq: u64) -> Position {
        Position { incarnation, seq }
    }

    #[test]
    fn round_trip_and_view_check() {
        let t = encode("citizens", &[at(7, 42), at(8, 3)]);
        assert_eq!(
            decode(&t, "citizens"),
            Ok(Positions {
                shards: vec![at(7, 42), at(8, 3)],
                single_format: false
            })
        );
        assert!(
            decode(&t, "addresses")
                .expect_err("other view")
                .contains("belongs to view \"citizens\"")
        );
        assert!(decode("!!!", "citizens").is_err());
        assert!(decode("AAAA", "citizens").is_err());
        assert_eq!(
            peek(&t).map(|(v, p)| (v, p.shards[0].seq)),
            Some(("citizens".to_string(), 42))
        );
    }

    #[test]
    fn a_token_of_the_release_before_shards_reads_as_one_position() {
        let old = URL_SAFE_NO_PAD.encode(
            ResumeToken {
                format: 1,
                view: "citizens".into(),
                incarnation: 7,
                seq: 42,
                shards: Vec::new(),
            }
            .encode_to_vec(),
        );
        assert_eq!(
            decode(&old, "citizens"),
            Ok(Positions {
                shards: vec![at(7, 42)],
                single_format: true
            })
        );
        let empty = URL_SAFE_NO_PAD.encode(
            ResumeToken {
                format: 2,
                view: "citizens".into(),
                ..ResumeToken::default()
            }
            .encode_to_vec(),
        );
        assert!(decode(&empty, "citizens").is_err());
    }
}
