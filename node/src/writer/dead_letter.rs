//! Dead letters: records that cannot be applied, kept with their reason.
//!
//! A batch's dead letters are written, and acknowledged, before the batch's
//! offsets are committed; so a crash can repeat a dead letter (at-least-once,
//! same source coordinates in its headers) but never lose one.
//!
//! Every byte of what was rejected is kept. A dead letter larger than the
//! dead-letter topic takes (its `max.message.bytes`, asked of the broker
//! once in the background; Kafka's default 1 MiB until and unless the
//! broker says) is written as
//! consecutive chunks of its value, each a record with the same key and
//! headers plus `ndc-chunk: i/n`: the value is the chunks' values joined in
//! order (docs/operations.md, "Replaying dead letters").

use base64::Engine;
use ndc_operators::DecodeError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Header names on dead-letter records.
pub mod header {
    pub const REASON: &str = "ndc-reason";
    pub const ERROR_KIND: &str = "ndc-error-kind";
    pub const SOURCE_TOPIC: &str = "ndc-source-topic";
    pub const SOURCE_PARTITION: &str = "ndc-source-partition";
    pub const SOURCE_OFFSET: &str = "ndc-source-offset";
    pub const SOURCE_STREAM: &str = "ndc-source-stream";
    pub const VIEW: &str = "ndc-view";
    pub const NODE: &str = "ndc-node";
    pub const ORIGINAL_SIZE: &str = "ndc-original-size";
    /// `i/n` on each of the `n` records of a dead letter written in chunks.
    pub const CHUNK: &str = "ndc-chunk";
    /// On a dead letter whose *key* alone exceeds the topic's limit: the
    /// key's original size (the key is then cut to half the limit; the only
    /// case where bytes are not kept, and Kafka keys are never near it).
    pub const KEY_TRUNCATED: &str = "ndc-key-truncated";
}

/// Kafka's default `max.message.bytes`, assumed when the broker does not say.
pub const KAFKA_DEFAULT_MAX_MESSAGE_BYTES: usize = 1_048_588;
/// The dead-letter producer's own `message.max.bytes`.
pub const PRODUCER_MAX_MESSAGE_BYTES: usize = 10 << 20;
/// Room left in each record for its headers and Kafka's framing.
const RECORD_OVERHEAD: usize = 4096;

/// A rejected record with everything needed to find and replay it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub view: String,
    pub stream: String,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: u64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub error: DecodeError,
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("dead-letter file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where dead letters go (one per state writer: clones share the producer,
/// or append whole lines to the same file).
#[derive(Clone)]
pub enum DeadLetterSink {
    Kafka {
        producer: FutureProducer,
        topic: String,
        node: String,
        /// The largest record written: Kafka's default until the broker
        /// has said the topic's (see [`DeadLetterSink::kafka`]).
        limit: Arc<AtomicUsize>,
    },
    File {
        path: PathBuf,
    },
}

impl DeadLetterSink {
    /// A sink writing to `topic`. The topic's `max.message.bytes` is asked
    /// of the broker in the background (the write path never waits for it:
    /// some brokers do not answer); until then, and if the broker does not
    /// say, Kafka's default applies. A letter too large for a smaller limit
    /// fails its write, which is retried, by then with the limit known.
    pub fn kafka(
        producer: FutureProducer,
        admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
        topic: String,
        node: String,
    ) -> DeadLetterSink {
        let limit = Arc::new(AtomicUsize::new(KAFKA_DEFAULT_MAX_MESSAGE_BYTES));
        let learned = limit.clone();
        let asked_topic = topic.clone();
        tokio::spawn(async move {
            use rdkafka::admin::{AdminOptions, ResourceSpecifier};
            let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
            let asked = admin
                .describe_configs(&[ResourceSpecifier::Topic(&asked_topic)], &options)
                .await;
            let found = asked.ok().and_then(|results| {
                results.into_iter().flatten().find_map(|resource| {
                    resource
                        .get("max.message.bytes")
                        .and_then(|e| e.value.as_deref())
                        .and_then(|v| v.parse::<usize>().ok())
                })
            });
            match found {
                Some(bytes) => {
                    tracing::info!(
                        topic = asked_topic,
                        bytes,
                        "dead-letter topic's max.message.bytes"
                    );
                    learned.store(bytes.min(PRODUCER_MAX_MESSAGE_BYTES), Ordering::Relaxed);
                }
                None => tracing::info!(
                    topic = asked_topic,
                    bytes = KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
                    "the broker did not say the dead-letter topic's max.message.bytes; \
                     assuming Kafka's default"
                ),
            }
        });
        DeadLetterSink::Kafka {
            producer,
            topic,
            node,
            limit,
        }
    }

    /// Writes all letters and waits until each is acknowledged.
    pub async fn write_all(&self, letters: &[DeadLetter]) -> Result<(), DeadLetterError> {
        match self {
            DeadLetterSink::Kafka {
                producer,
                topic,
                node,
                limit,
            } => {
                let limit = limit.load(Ordering::Relaxed);
                let records: Vec<Record<'_>> =
                    letters.iter().flat_map(|l| split(l, limit)).collect();
                let sends = records.iter().map(|r| {
                    let l = r.letter;
                    let partition = l.partition.map(|p| p.to_string());
                    let offset = l.offset.to_string();
                    let size = l.value.as_ref().map_or(0, Vec::len).to_string();
                    let mut headers = OwnedHeaders::new()
                        .insert(Header {
                            key: header::REASON,
                            value: Some(l.error.message.as_str()),
                        })
                        .insert(Header {
                            key: header::ERROR_KIND,
                            value: Some(l.error.kind.as_str()),
                        })
                        .insert(Header {
                            key: header::SOURCE_STREAM,
                            value: Some(l.stream.as_str()),
                        })
                        .insert(Header {
                            key: header::SOURCE_OFFSET,
                            value: Some(offset.as_str()),
                        })
                        .insert(Header {
                            key: header::VIEW,
                            value: Some(l.view.as_str()),
                        })
                        .insert(Header {
                            key: header::NODE,
                            value: Some(node.as_str()),
                        })
                        .insert(Header {
                            key: header::ORIGINAL_SIZE,
                            value: Some(size.as_str()),
                        });
                    if let Some(t) = &l.topic {
                        headers = headers.insert(Header {
                            key: header::SOURCE_TOPIC,
                            value: Some(t.as_str()),
                        });
                    }
                    if let Some(p) = &partition {
                        headers = headers.insert(Header {
                            key: header::SOURCE_PARTITION,
                            value: Some(p.as_str()),
                        });
                    }
                    if let Some(chunk) = &r.chunk {
                        headers = headers.insert(Header {
                            key: header::CHUNK,
                            value: Some(chunk.as_str()),
                        });
                    }
                    if let Some(size) = &r.key_truncated {
                        headers = headers.insert(Header {
                            key: header::KEY_TRUNCATED,
                            value: Some(size.as_str()),
                        });
                    }
                    let mut record: FutureRecord<'_, [u8], [u8]> =
                        FutureRecord::to(topic).headers(headers);
                    if let Some(k) = r.key {
                        record = record.key(k);
                    }
                    if let Some(v) = r.value {
                        record = record.payload(v);
                    }
                    producer.send(record, Duration::from_secs(30))
                });
                // Sent in order with the idempotent producer and one key per
                // letter: a letter's chunks land in one partition, in order.
                for result in futures::future::join_all(sends).await {
                    result.map_err(|(e, _)| e)?;
                }
                Ok(())
            }
            DeadLetterSink::File { path } => {
                let io = |source| DeadLetterError::File {
                    path: path.clone(),
                    source,
                };
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(io)?;
                let b64 = base64::engine::general_purpose::STANDARD;
                // One write of whole lines: writers of a pool append to the
                // same file, and an appended write is not interleaved.
                let mut text = String::new();
                for l in letters {
                    let line = serde_json::json!({
                        "reason": l.error.message,
                        "error_kind": l.error.kind.as_str(),
                        "view": l.view,
                        "stream": l.stream,
                        "offset": l.offset,
                        "key_base64": l.key.as_ref().map(|k| b64.encode(k)),
                        "value_base64": l.value.as_ref().map(|v| b64.encode(v)),
                    });
                    text.push_str(&line.to_string());
                    text.push('\n');
                }
                file.write_all(text.as_bytes()).map_err(io)?;
                file.sync_data().map_err(io)?;
                Ok(())
            }
        }
    }
}

/// One record of a dead letter: the whole letter, or one chunk of its value.
struct Record<'a> {
    letter: &'a DeadLetter,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    /// `i/n` when the letter is written in `n` chunks.
    chunk: Option<String>,
    key_truncated: Option<String>,
}

/// The records of `letter` for a topic that takes records of at most
/// `limit` bytes: one when it fits, else its value in consecutive chunks.
fn split(letter: &DeadLetter, limit: usize) -> Vec<Record<'_>> {
    let headers: usize = [
        letter.error.message.len(),
        letter.stream.len(),
        letter.view.len(),
        letter.topic.as_ref().map_or(0, String::len),
    ]
    .iter()
    .sum();
    let room = limit.saturating_sub(RECORD_OVERHEAD + headers).max(1);
    let mut key = letter.key.as_deref();
    let mut key_truncated = None;
    if let Some(k) = key
        && k.len() > room / 2
    {
        key_truncated = Some(k.len().to_string());
        key = Some(&k[..room / 2]);
    }
    let room = room - key.map_or(0, <[u8]>::len);
    let value = letter.value.as_deref();
    let whole = |value| Record {
        letter,
        key,
        value,
        chunk: None,
        key_truncated: key_truncated.clone(),
    };
    match value {
        Some(v) if v.len() > room => {
            let n = v.len().div_ceil(room);
            v.chunks(room)
                .enumerate()
                .map(|(i, part)| Record {
                    chunk: Some(format!("{}/{n}", i + 1)),
                    ..whole(Some(part))
                })
                .collect()
        }
        _ => vec![whole(value)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndc_operators::{DecodeError, DecodeErrorKind};

    fn letter(key: usize, value: usize) -> DeadLetter {
        DeadLetter {
            view: "v".into(),
            stream: "kafka:t:0".into(),
            topic: Some("t".into()),
            partition: Some(0),
            offset: 7,
            key: Some((0..key).map(|i| (i % 251) as u8).collect()),
            value: Some((0..value).map(|i| (i % 241) as u8).collect()),
            error: DecodeError::new(DecodeErrorKind::Oversized, "too big"),
        }
    }

    #[test]
    fn a_letter_that_fits_is_one_record_and_a_larger_one_is_chunks_that_join_to_every_byte() {
        let small = letter(20, 1000);
        let one = split(&small, 1 << 20);
        assert_eq!(one.len(), 1);
        assert!(one[0].chunk.is_none());
        assert_eq!(one[0].value, small.value.as_deref());

        let big = letter(20, 3 << 20);
        let limit = 1 << 20;
        let parts = split(&big, limit);
        assert_eq!(parts.len(), 4);
        let mut joined = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.chunk.as_deref(), Some(format!("{}/4", i + 1).as_str()));
            assert_eq!(p.key, big.key.as_deref(), "every chunk has the key");
            let size = p.key.map_or(0, <[u8]>::len) + p.value.map_or(0, <[u8]>::len);
            assert!(size + RECORD_OVERHEAD <= limit, "chunk of {size} bytes");
            joined.extend_from_slice(p.value.unwrap_or_default());
        }
        assert_eq!(Some(joined), big.value);
    }

    #[test]
    fn only_a_key_beyond_half_the_limit_is_cut_and_says_so() {
        let huge_key = letter(700_000, 10);
        let parts = split(&huge_key, 1 << 20);
        assert_eq!(parts[0].key_truncated.as_deref(), Some("700000"));
        let joined: Vec<u8> = parts
            .iter()
            .flat_map(|p| p.value.unwrap_or_default().iter().copied())
            .collect();
        assert_eq!(Some(joined), huge_key.value, "the value is still whole");
    }
}
