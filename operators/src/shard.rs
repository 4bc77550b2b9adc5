//! Shards: how a view's key space is split.
//!
//! A view with `n > 1` shards is stored as `n` store views, `view#0` …
//! `view#n-1`, each with its own rows key range, change stream, sequence
//! numbers, source offsets and (in a cluster) change log. A replica's shard
//! follows its source partition (`partition mod n`), so that the shard of
//! every event of a key is the one its agency's feed put the key in. A view
//! with one shard is stored under its own name, as before sharding.

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

#[cfg(test)]
mod tests {
    use super::*;

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
