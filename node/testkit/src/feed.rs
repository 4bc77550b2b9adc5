//! A citizens feed with the replica it must produce: upserts and deletes
//! of people as Debezium events (from the quickstart's synthetic
//! [`Feed`]), folded into the rows a replica of it ends with — the
//! reference the crash, shard and cluster tests compare against.

use ndc_node::quickstart::synthetic::{Event, Feed, Table, citizen_row, national_id};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Where the feed stands, and what the replica must hold.
pub struct Citizens {
    feed: Feed,
    /// Person → revision of its live row.
    revision: BTreeMap<u64, u32>,
    /// Key (canonical JSON) → row a replica must hold.
    pub expected: BTreeMap<String, Value>,
}

/// One change of one person.
pub struct Change {
    /// To publish, in order, keyed (a delete may bring its tombstone).
    pub events: Vec<Event>,
    /// The person's key, as a replica stores it.
    pub key: String,
    /// The row after the change; `None`: deleted.
    pub row: Option<Value>,
}

impl Default for Citizens {
    fn default() -> Self {
        Citizens {
            feed: Feed::new(Table::Citizens, 1_767_225_600_000),
            revision: BTreeMap::new(),
            expected: BTreeMap::new(),
        }
    }
}

impl Citizens {
    /// The next change of person `i`: a delete if `delete` and the person
    /// has a row (followed by its tombstone when `tombstone`), else an
    /// insert or an update to the next revision.
    pub fn change(&mut self, i: u64, delete: bool, tombstone: bool) -> Change {
        let key = json!({"person_id": national_id(i).to_string()}).to_string();
        if delete && let Some(rev) = self.revision.remove(&i) {
            let e = self.feed.event('d', i, rev, None);
            let mut events = vec![e.clone()];
            if tombstone {
                events.push(Event {
                    key: e.key,
                    value: None,
                });
            }
            self.expected.remove(&key);
            return Change {
                events,
                key,
                row: None,
            };
        }
        let (op, rev) = match self.revision.get(&i) {
            Some(r) => ('u', r + 1),
            None => ('c', 0),
        };
        self.revision.insert(i, rev);
        let row = citizen_row(i, rev);
        self.expected.insert(key.clone(), row.clone());
        Change {
            events: vec![self.feed.event(op, i, rev, None)],
            key,
            row: Some(row),
        }
    }
}

impl Citizens {
    /// Inserts people `0..n` through `producer` into `topic`, where its
    /// partitioner puts each key; returns each key's partition, checking
    /// that the feed's keys are canonical JSON and that every one of the
    /// topic's `partitions` got some.
    pub async fn publish_partitioned(
        &mut self,
        producer: &rdkafka::producer::FutureProducer,
        topic: &str,
        n: u64,
        partitions: i32,
    ) -> BTreeMap<String, i32> {
        let mut partition_of = BTreeMap::new();
        for i in 0..n {
            let change = self.change(i, false, false);
            for e in change.events {
                assert_eq!(e.key, change.key.as_bytes(), "keys are canonical JSON");
                let value = e.value.expect("an insert has a value");
                let p = crate::publish_keyed(producer, topic, &change.key, &value, None).await;
                partition_of.insert(change.key.clone(), p);
            }
        }
        let used: std::collections::BTreeSet<i32> = partition_of.values().copied().collect();
        assert_eq!(used.len(), partitions as usize, "every partition got keys");
        partition_of
    }
}
