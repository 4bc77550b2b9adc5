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
}
