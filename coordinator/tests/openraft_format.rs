//! ndc 0.9-era builds (openraft 0.9) wrote their Raft log, vote, state
//! machine and snapshot as JSON, and sent append and vote RPCs as JSON. The
//! fixtures in `fixtures/openraft-0.9/` were written by that build; this
//! build must read every one of them (a node upgraded in place keeps its
//! data directory) and write append/vote messages and log entries in the
//! same layout (mixed builds elect and replicate during a rolling upgrade).

use ndc_coordinator::{Command, TypeConfig};
use openraft::EntryPayload;
use openraft::alias::{EntryOf, LogIdOf, SnapshotMetaOf, StoredMembershipOf, VoteOf};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/openraft-0.9/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Parses the fixture and writes it back: the JSON must be the same.
fn same_layout<T: Serialize + DeserializeOwned>(name: &str) -> T {
    same_layout_plus(name, &[])
}

/// As [`same_layout`], but the written JSON may also carry `added` fields
/// at its top level (new in openraft 0.10; 0.9 ignores unknown fields).
fn same_layout_plus<T: Serialize + DeserializeOwned>(name: &str, added: &[&str]) -> T {
    let text = fixture(name);
    let value: T = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut again: serde_json::Value = serde_json::to_value(&value).expect("serializes");
    if let Some(fields) = again.as_object_mut() {
        for field in added {
            assert!(fields.remove(*field).is_some(), "{name}: no field {field}");
        }
    }
    let before: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
    assert_eq!(
        again, before,
        "{name}: written differently than openraft 0.9 did"
    );
    value
}

#[test]
fn the_stored_raft_state_of_an_openraft_0_9_build_is_read() {
    let vote: VoteOf<TypeConfig> = same_layout("vote");
    assert_eq!(vote.leader_id.term, 3);
    assert_eq!(vote.leader_id.node_id, 2);
    assert!(vote.committed);
    let committed: Option<LogIdOf<TypeConfig>> = same_layout("log_id");
    assert_eq!(committed.map(|l| l.index), Some(17));
    let blank: EntryOf<TypeConfig> = same_layout("entry_blank");
    assert!(matches!(blank.payload, EntryPayload::Blank));
    let membership: EntryOf<TypeConfig> = same_layout("entry_membership");
    let EntryPayload::Membership(m) = membership.payload else {
        panic!("not a membership entry")
    };
    assert_eq!(m.voter_ids().collect::<Vec<_>>(), vec![1, 2]);
    let normal: EntryOf<TypeConfig> = same_layout("entry_normal");
    assert!(matches!(
        normal.payload,
        EntryPayload::Normal(Command::DropSpec { ref name }) if name == "x"
    ));
    let stored: StoredMembershipOf<TypeConfig> = same_layout("stored_membership");
    assert_eq!(stored.log_id().map(|l| l.index), Some(17));
    // 0.9 named each snapshot; 0.10 reads the name and no longer keeps it.
    let meta: SnapshotMetaOf<TypeConfig> =
        serde_json::from_str(&fixture("snapshot_meta")).expect("0.9 snapshot meta");
    assert_eq!(meta.last_log_id.map(|l| l.index), Some(17));
    assert_eq!(meta.last_membership, stored);
}

#[test]
fn append_and_vote_messages_keep_the_openraft_0_9_layout() {
    let append: AppendEntriesRequest<TypeConfig> = same_layout("append_request");
    assert_eq!(append.entries.len(), 1);
    // An election a leader hands over says so; from a 0.9 candidate it is not.
    let vote: VoteRequest<TypeConfig> = same_layout_plus("vote_request", &["leadership_transfer"]);
    assert_eq!(vote.vote.leader_id.term, 4);
    assert!(!vote.leadership_transfer);
    type Reply<T> = Result<T, serde_json::Value>;
    let granted: Reply<VoteResponse<TypeConfig>> = same_layout("vote_reply");
    assert!(granted.expect("granted").vote_granted);
    let ok: Reply<AppendEntriesResponse<TypeConfig>> = same_layout("append_reply_ok");
    assert!(matches!(ok, Ok(AppendEntriesResponse::Success)));
    let higher: Reply<AppendEntriesResponse<TypeConfig>> = same_layout("append_reply_higher");
    assert!(matches!(higher, Ok(AppendEntriesResponse::HigherVote(_))));
    let conflict: Reply<AppendEntriesResponse<TypeConfig>> = same_layout("append_reply_conflict");
    assert!(matches!(conflict, Ok(AppendEntriesResponse::Conflict)));
}
