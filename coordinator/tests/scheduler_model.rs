//! Property tests of the scheduler's planning against its safety and
//! balance rules, driven through the real state machine.

use ndc_coordinator::state::{Command, Liveness, plan};
use ndc_coordinator::{ClusterState, NodeId};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

fn cluster(partitions: usize, owners: &[Option<NodeId>]) -> ClusterState {
    let mut s = ClusterState::default();
    let names: Vec<String> = (0..partitions).map(|i| format!("view/topic/{i}")).collect();
    s.apply(
        &Command::RegisterPartitions {
            partitions: names.clone(),
        },
        1,
    );
    let changes = names
        .iter()
        .zip(owners.iter().cycle())
        .map(|(p, o)| (p.clone(), *o))
        .collect();
    s.apply(&Command::Assign { changes }, 2);
    s
}

fn loads(s: &ClusterState, live: &BTreeSet<NodeId>) -> BTreeMap<NodeId, usize> {
    let mut l: BTreeMap<NodeId, usize> = live.iter().map(|&n| (n, 0)).collect();
    for a in s.assignments.values() {
        if let Some(o) = a.owner
            && let Some(c) = l.get_mut(&o)
        {
            *c += 1;
        }
    }
    l
}

/// Planning rounds at Raft indexes `indexes` until planning is quiet, with
/// everything not owned by a live node released (its owner acknowledged,
/// or its lease expired).
fn converge(
    s: &mut ClusterState,
    live: &BTreeSet<NodeId>,
    draining: &BTreeSet<NodeId>,
    indexes: std::ops::Range<u64>,
) {
    for index in indexes {
        let released = s
            .partitions
            .iter()
            .filter(|p| {
                s.owner(p)
                    .and_then(|a| a.owner)
                    .is_none_or(|o| !live.contains(&o))
            })
            .cloned()
            .collect();
        let liveness = Liveness {
            live: live.clone(),
            released,
            draining: draining.clone(),
            ..Default::default()
        };
        let changes = plan(s, &liveness);
        if changes.is_empty() {
            break;
        }
        s.apply(&Command::Assign { changes }, index);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// One planning round never hands a partition to a node that is not
    /// live, never to a second owner directly, and never before release.
    #[test]
    fn a_round_is_safe(
        partitions in 0usize..24,
        owners in prop::collection::vec(prop::option::of(0u64..7), 1..8),
        live in prop::collection::btree_set(0u64..7, 0..6),
        released_mask in prop::collection::vec(any::<bool>(), 24),
        draining in prop::collection::btree_set(0u64..7, 0..3),
    ) {
        let s = cluster(partitions, &owners);
        let released: BTreeSet<String> = s
            .partitions
            .iter()
            .enumerate()
            .filter(|(i, _)| released_mask[*i])
            .map(|(_, p)| p.clone())
            .collect();
        let liveness = Liveness { live: live.clone(), released: released.clone(), draining: draining.clone(), ..Default::default() };
        let changes = plan(&s, &liveness);
        // Who may take partitions: live nodes not draining (all live ones
        // when every one drains).
        let takers: BTreeSet<u64> = live.difference(&draining).copied().collect();
        let takers = if takers.is_empty() { live.clone() } else { takers };
        let mut seen = BTreeSet::new();
        for (p, owner) in &changes {
            prop_assert!(seen.insert(p.clone()), "partition {} changed twice in one round", p);
            let current = s.owner(p).and_then(|a| a.owner);
            match owner {
                Some(n) => {
                    prop_assert!(takers.contains(n), "{} given to node {} (not live, or draining)", p, n);
                    prop_assert!(released.contains(p), "{} handed on before release", p);
                    prop_assert!(current.is_none_or(|c| !live.contains(&c)),
                        "{} moved directly from live owner {:?} to {}", p, current, n);
                }
                None => {
                    prop_assert!(current.is_some_and(|c| live.contains(&c)),
                        "{} unassigned from a non-live owner {:?}", p, current);
                }
            }
        }
    }

    /// With owners acknowledging releases, repeated rounds converge to an
    /// assignment where every partition has a live owner and loads differ by
    /// at most one; then planning is quiet.
    #[test]
    fn rounds_converge_to_a_balanced_quiet_assignment(
        partitions in 0usize..24,
        owners in prop::collection::vec(prop::option::of(0u64..7), 1..8),
        live in prop::collection::btree_set(0u64..7, 1..6),
    ) {
        let mut s = cluster(partitions, &owners);
        converge(&mut s, &live, &BTreeSet::new(), 3..7);
        for p in &s.partitions {
            let owner = s.owner(p).and_then(|a| a.owner);
            prop_assert!(owner.is_some_and(|o| live.contains(&o)), "{} owned by {:?}", p, owner);
        }
        let l = loads(&s, &live);
        let max = l.values().copied().max().unwrap_or(0);
        let min = l.values().copied().min().unwrap_or(0);
        prop_assert!(max - min <= 1, "unbalanced: {:?}", l);
        let quiet = plan(&s, &Liveness { live: live.clone(), released: s.partitions.clone(), draining: BTreeSet::new(), ..Default::default() });
        prop_assert!(quiet.is_empty(), "not quiet after convergence: {:?}", quiet);
    }

    /// A node that drains while another live node can take over ends with
    /// nothing; the others converge balanced as before. Draining never hands
    /// a partition from one live owner to another directly (checked above).
    #[test]
    fn a_draining_node_ends_with_nothing(
        partitions in 0usize..24,
        owners in prop::collection::vec(prop::option::of(0u64..7), 1..8),
        live in prop::collection::btree_set(0u64..7, 2..6),
        pick in any::<prop::sample::Index>(),
    ) {
        let drained = *pick.get(&live.iter().copied().collect::<Vec<_>>());
        let draining: BTreeSet<u64> = [drained].into();
        let mut s = cluster(partitions, &owners);
        // The drained node acknowledges what it gave up, as any owner does.
        converge(&mut s, &live, &draining, 3..9);
        prop_assert!(s.owned_by(drained).is_empty(), "node {} still owns {:?}", drained, s.owned_by(drained));
        let takers: BTreeSet<u64> = live.difference(&draining).copied().collect();
        for p in &s.partitions {
            let owner = s.owner(p).and_then(|a| a.owner);
            prop_assert!(owner.is_some_and(|o| takers.contains(&o)), "{} owned by {:?}", p, owner);
        }
        let l = loads(&s, &takers);
        let max = l.values().copied().max().unwrap_or(0);
        let min = l.values().copied().min().unwrap_or(0);
        prop_assert!(max - min <= 1, "unbalanced: {:?}", l);
    }

    /// Epochs only grow, and every change gets a new one.
    #[test]
    fn epochs_are_fresh_on_every_change(
        steps in prop::collection::vec((0usize..6, prop::option::of(0u64..4)), 1..40),
    ) {
        let mut s = cluster(6, &[None]);
        let mut seen = BTreeSet::new();
        for (i, (p, owner)) in steps.into_iter().enumerate() {
            let before = s.last_epoch;
            let reply = s.apply(&Command::Assign { changes: vec![(format!("view/topic/{p}"), owner)] }, 10 + i as u64);
            for (_, e) in &reply.epochs {
                prop_assert!(*e > before);
                prop_assert!(seen.insert(*e), "epoch {} reused", e);
            }
        }
    }
}
