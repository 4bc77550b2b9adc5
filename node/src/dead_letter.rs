//! Dead letters: records that cannot be applied, kept with their reason.
//!
//! A batch's dead letters are written, and acknowledged, before the batch's
//! offsets are committed; so a crash can repeat a dead letter (at-least-once,
//! same source coordinates in its headers) but never lose one.

use base64::Engine;
use ndc_operators::DecodeError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::io::Write;
use std::path::PathBuf;
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
}

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

/// Where dead letters go.
pub enum DeadLetterSink {
    Kafka {
        producer: FutureProducer,
        topic: String,
        node: String,
        /// Values larger than this are cut (the header keeps the size).
        max_value_bytes: usize,
    },
    File {
        path: PathBuf,
    },
}

impl DeadLetterSink {
    /// Writes all letters and waits until each is acknowledged.
    pub async fn write_all(&self, letters: &[DeadLetter]) -> Result<(), DeadLetterError> {
        match self {
            DeadLetterSink::Kafka {
                producer,
                topic,
                node,
                max_value_bytes,
            } => {
                let sends = letters.iter().map(|l| {
                    let original = l.value.as_ref().map_or(0, Vec::len);
                    let value = l
                        .value
                        .as_deref()
                        .map(|v| &v[..v.len().min(*max_value_bytes)]);
                    let partition = l.partition.map(|p| p.to_string());
                    let offset = l.offset.to_string();
                    let size = original.to_string();
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
                    let mut record: FutureRecord<'_, [u8], [u8]> =
                        FutureRecord::to(topic).headers(headers);
                    if let Some(k) = l.key.as_deref() {
                        record = record.key(k);
                    }
                    if let Some(v) = value {
                        record = record.payload(v);
                    }
                    producer.send(record, Duration::from_secs(30))
                });
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
                    writeln!(file, "{line}").map_err(io)?;
                }
                file.sync_data().map_err(io)?;
                Ok(())
            }
        }
    }
}
