//! Shards: how a view's key space is split.
//!
//! A view with `n > 1` shards is stored as `n` store views, `view#0` …
//! `view#n-1`, each with its own rows key range, change stream, sequence
//! numbers, source offsets and (in a cluster) change log. A replica's shard
//! follows its source partition (`partition mod n`), so that the shard of
//! every event of a key is the one its agency's feed put the key in. A view
//! with one shard is stored under its own name, as before sharding.
//!
//! # Keys routed to their shard
//!
//! Which partition a replica's key is in is the agency's producer's choice,
//! so a keyed read cannot in general know its shard. Kafka Connect (and so
//! Debezium) places a keyed record with Kafka's default partitioner:
//! `murmur2(key bytes) mod partitions`. When the key bytes are the canonical
//! JSON of the key (Debezium's JSON key with `schemas.enable=false`, one key
//! column or columns in name order), the key's partition, and so its shard,
//! follows from the key alone. ndc does not assume it: the owner of each
//! shard checks every keyed record it applies
//! ([`crate::store::Txn::check_key_placement`]) and the shard's metadata
//! keeps what the records showed ([`KeyPlacement`]); a keyed read goes to one
//! shard only while every shard that can hold keys says so ([`key_route`]).

/// Store name of shard `shard` of a view with `shards` shards.
pub fn store_name(view: &str, shard: u32, shards: u32) -> String {
    if shards <= 1 {
        view.to_string()
    } else {
        format!("{view}#{shard}")
    }
}

/// Store names of every shard of a view, in shard order.
pub fn store_names(view: &str, shards: u32) -> Vec<String> {
    (0..shards.max(1))
        .map(|s| store_name(view, s, shards))
        .collect()
}

/// The view and shard a store name belongs to (`None` for a one-shard view's
/// own name).
pub fn parse_store_name(name: &str) -> Option<(&str, u32)> {
    let (view, shard) = name.rsplit_once('#')?;
    Some((view, shard.parse().ok()?))
}

/// A name Kafka accepts for a store name (`#` is not a topic character):
/// `people#3` → `people.shard3`. View names ending in `.shard<N>` are
/// refused by configuration, so two views never share a topic.
pub fn topic_safe(store_name: &str) -> String {
    match parse_store_name(store_name) {
        Some((view, shard)) => format!("{view}.shard{shard}"),
        None => store_name.to_string(),
    }
}

/// Whether a name ends in `.shard<N>` (reserved for shards' topics).
pub fn is_shard_suffixed(name: &str) -> bool {
    name.rsplit_once(".shard")
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Shard of a source partition.
pub fn of_partition(partition: i32, shards: u32) -> u32 {
    u32::try_from(partition).unwrap_or(0) % shards.max(1)
}

/// Shard of a person in a view split by national ID (a pipeline's merge
/// state): FNV-1a of the ID, stable across releases and platforms, so that
/// every node, and the re-keying stage that picks the repartition
/// partition, agree on it.
pub fn of_national_id(national_id: &str, shards: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in national_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    u32::try_from(h % u64::from(shards.max(1))).unwrap_or(0)
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`, and
/// librdkafka's `murmur2` partitioners): the hash its default partitioner
/// places keyed records by.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Kafka hashes the length as a Java int.
    let mut h: u32 = SEED ^ (data.len() as u32);
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        let mut k = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        for (i, b) in tail.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner gives a record whose key is
/// `key` in a topic of `partitions` partitions.
pub fn kafka_partition(key: &[u8], partitions: u32) -> u32 {
    // Kafka's `toPositive`: the sign bit masked off, not `abs`.
    ((murmur2(key) & 0x7fff_ffff) as u32) % partitions.max(1)
}

/// Shard of `key` (canonical JSON) in a view of `shards` shards fed by
/// topics of `partitions` partitions, when its keys are routed
/// ([`key_route`]).
pub fn of_key(key: &[u8], partitions: u32, shards: u32) -> u32 {
    let p = kafka_partition(key, partitions);
    of_partition(i32::try_from(p).unwrap_or(0), shards)
}

pub use ndc_proto::state::KeyPlacement;

/// What a shard's records showed, `known` so far, once they also showed
/// `seen`: broken once anything was out of place or came over another
/// partition count, and for good (the partition count first seen is kept).
/// Whether the result is broken does not depend on the order of the
/// observations nor on one seen twice, so a holder applying an observation
/// again, or late, is broken exactly when the owner is.
pub fn merge_key_placement(known: Option<KeyPlacement>, seen: KeyPlacement) -> KeyPlacement {
    match known {
        None => seen,
        Some(k) => KeyPlacement {
            partitions: k.partitions,
            broken: k.broken || seen.broken || seen.partitions != k.partitions,
        },
    }
}

/// Whether a keyed read of a view may go to one shard: `Some(partitions)`
/// when every shard that can hold keys (`shards[i]` for every `i` below the
/// partition count) showed only records where Kafka's default partitioner
/// puts their keys, over the same partition count, and none showed one out
/// of place. `shards` are what each shard's records showed, in shard order
/// (`None`: no keyed record yet). A shard with no record yet withholds the
/// route: a view is routed on evidence, never on an assumption.
pub fn key_route(shards: &[Option<KeyPlacement>]) -> Option<u32> {
    if shards.len() < 2 {
        return None;
    }
    let partitions = shards.iter().flatten().next()?.partitions;
    if partitions == 0 {
        return None;
    }
    for (i, shard) in shards.iter().enumerate() {
        match shard {
            Some(p) if p.broken || p.partitions != partitions => return None,
            None if (i as u64) < u64::from(partitions) => return None,
            _ => {}
        }
    }
    Some(partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_is_kafkas() {
        // Kafka's UtilsTest.testMurmur2 and librdkafka's rdmurmur2.c cases.
        let cases: [(&str, i32); 7] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
            ("kafka", 0xd067_cf64_u32 as i32),
        ];
        for (text, hash) in cases {
            assert_eq!(murmur2(text.as_bytes()), hash, "{text}");
        }
        assert_eq!(kafka_partition(b"21", 1), 0);
        // -973932308 & 0x7fffffff = 1173551340.
        assert_eq!(kafka_partition(b"21", 7), 1_173_551_340 % 7);
    }

    #[test]
    fn a_view_is_routed_only_when_every_shard_that_can_hold_keys_agrees() {
        let ok = |partitions| {
            Some(KeyPlacement {
                partitions,
                broken: false,
            })
        };
        let broken = Some(KeyPlacement {
            partitions: 4,
            broken: true,
        });
        assert_eq!(key_route(&[ok(4), ok(4), ok(4), ok(4)]), Some(4));
        // More shards than partitions: shards 2 and 3 never hold a key.
        assert_eq!(key_route(&[ok(2), ok(2), None, None]), Some(2));
        // More partitions than shards.
        assert_eq!(key_route(&[ok(8), ok(8)]), Some(8));
        assert_eq!(key_route(&[ok(4), None, ok(4), ok(4)]), None);
        assert_eq!(key_route(&[ok(4), broken, ok(4), ok(4)]), None);
        assert_eq!(key_route(&[ok(4), ok(3), ok(4), ok(4)]), None);
        assert_eq!(key_route(&[None, None]), None);
        assert_eq!(key_route(&[ok(4)]), None, "one shard needs no route");
    }

    #[test]
    fn names_round_trip_and_never_collide_in_topics() {
        assert_eq!(store_name("people", 0, 1), "people");
        assert_eq!(
            store_names("people", 3),
            ["people#0", "people#1", "people#2"]
        );
        assert_eq!(parse_store_name("people#2"), Some(("people", 2)));
        assert_eq!(parse_store_name("people"), None);
        assert_eq!(topic_safe("people#2"), "people.shard2");
        assert_eq!(topic_safe("people"), "people");
        assert!(is_shard_suffixed("people.shard2"));
        assert!(!is_shard_suffixed("people.shard"));
        assert!(!is_shard_suffixed("people.shards"));
        assert!(!is_shard_suffixed("people"));
    }

    #[test]
    fn partitions_spread_round_robin() {
        let shards: Vec<u32> = (0..8).map(|p| of_partition(p, 4)).collect();
        assert_eq!(shards, [0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(of_partition(5, 1), 0);
        assert_eq!(of_partition(-1, 4), 0);
    }

    #[test]
    fn people_spread_over_shards_and_always_land_on_the_same_one() {
        let ids: Vec<String> = (0..4000)
            .map(|i| format!("{:012}", 1_000_000 + i))
            .collect();
        let mut counts = [0u32; 8];
        for id in &ids {
            let s = of_national_id(id, 8);
            assert_eq!(s, of_national_id(id, 8));
            counts[s as usize] += 1;
        }
        // Roughly even: no shard with less than half or more than twice its share.
        assert!(
            counts.iter().all(|c| (250..=1000).contains(c)),
            "{counts:?}"
        );
        assert_eq!(of_national_id("001234567890", 1), 0);
        assert_eq!(of_national_id("001234567890", 0), 0);
        // Pinned: a change of hash would move people between shards of
        // existing state.
        assert_eq!(of_national_id("001234567890", 1024), 204);
    }
}
