//! Resume tokens: opaque to clients, exact for the node.
//!
//! A token names a view, the incarnation of its change stream and the last
//! sequence delivered. Resuming is exclusive: the stream continues at
//! `seq + 1`, so a client that stores the token of the last batch it fully
//! processed sees neither a gap nor a duplicate.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ndc_proto::v1::ResumeToken;
use prost::Message;

const FORMAT: u32 = 1;

/// A decoded token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub incarnation: u64,
    pub seq: u64,
}

pub fn encode(view: &str, incarnation: u64, seq: u64) -> String {
    URL_SAFE_NO_PAD.encode(
        ResumeToken {
            format: FORMAT,
            view: view.to_string(),
            incarnation,
            seq,
        }
        .encode_to_vec(),
    )
}

/// Decodes a token, checking it belongs to `view`.
pub fn decode(token: &str, view: &str) -> Result<Position, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| "resume token is not valid base64url".to_string())?;
    let t = ResumeToken::decode(bytes.as_slice())
        .map_err(|_| "resume token is malformed".to_string())?;
    if t.format != FORMAT {
        return Err(format!("resume token format {} is not supported", t.format));
    }
    if t.view != view {
        return Err(format!(
            "resume token belongs to view {:?}, not {view:?}",
            t.view
        ));
    }
    Ok(Position {
        incarnation: t.incarnation,
        seq: t.seq,
    })
}

/// Reads a token without knowing its view (for tools that print per-change
/// tokens).
pub fn peek(token: &str) -> Option<(String, Position)> {
    let bytes = URL_SAFE_NO_PAD.decode(token.trim()).ok()?;
    let t = ResumeToken::decode(bytes.as_slice()).ok()?;
    Some((
        t.view,
        Position {
            incarnation: t.incarnation,
            seq: t.seq,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_view_check() {
        let t = encode("citizens", 7, 42);
        assert_eq!(
            decode(&t, "citizens"),
            Ok(Position {
                incarnation: 7,
                seq: 42
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
            peek(&t).map(|(v, p)| (v, p.seq)),
            Some(("citizens".to_string(), 42))
        );
    }
}
