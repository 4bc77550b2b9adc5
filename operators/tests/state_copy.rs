//! A view's state copied from one store into another (a holder of a shard
//! hands it to a node that can no longer catch up from a trimmed change
//! log): the copy is the view's whole state, and the receiving store goes on
//! from it as if it had applied everything itself.

use ndc_operators::debezium::{ChangeEvent, Decoded};
use ndc_operators::{
    Decoder, DecoderConfig, Format, Outcome, Position, Store, StoreConfig, StoreReader, ViewId,
    replica,
};
use serde_json::json;

/// A change of row `id` committed at log position `lsn`.
fn event(lsn: u64, id: u32, name: &str, op: &str) -> ChangeEvent {
    let decoder = Decoder::new(DecoderConfig {
        format: Format::Debezium,
        key_columns: vec!["id".into()],
        max_record_bytes: 0,
        national_id: None,
    });
    let after = (op != "d").then(|| json!({"id": id, "name": name}));
    let value = json!({"op": op, "before": {"id": id}, "after": after,
        "source": {"connector": "postgresql", "lsn": 100 + lsn, "ts_ms": 1}});
    let key = json!({"id": id}).to_string();
    match decoder.decode(
        "t",
        Some(key.as_bytes()),
        Some(value.to_string().as_bytes()),
    ) {
        Ok(Decoded::Change(e)) => e,
        other => panic!("decodes to a change, got {other:?}"),
    }
}

/// Applies `(offset, id, name, op)` to `view`, one commit.
fn apply(store: &mut Store, view: ViewId, events: &[(u64, u32, &str, &str)]) -> Vec<Outcome> {
    let mut txn = store.begin(0);
    let outcomes = events
        .iter()
        .map(|(offset, id, name, op)| {
            replica::apply(
                &mut txn,
                view,
                &event(*offset, *id, name, op),
                &Position::new("kafka:t:0", *offset),
            )
            .expect("apply")
        })
        .collect();
    txn.commit().expect("commit");
    outcomes
}

fn rows(reader: &StoreReader, view: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    reader
        .scan_snapshot(view, None, 100, |batch| {
            out.extend(batch.into_iter().map(|r| (r.key, r.row_json)));
            true
        })
        .expect("scan");
    out
}

fn export(reader: &StoreReader, view: &str) -> Vec<ndc_operators::StateEntry> {
    let mut entries = Vec::new();
    reader
        .export_views(&[view.to_string()], 3, |name, batch| {
            assert_eq!(name, view);
            assert!(batch.len() <= 3, "batches are bounded");
            entries.extend(batch);
            true
        })
        .expect("export");
    entries
}

#[test]
fn a_copied_view_is_the_holders_state_and_goes_on_from_it() {
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    // Different view ids on the two stores: ids are per store.
    let mut a = Store::open(
        &StoreConfig::new(dir_a.path()),
        &["other".into(), "v".into()],
    )
    .expect("open a");
    let mut b = Store::open(
        &StoreConfig::new(dir_b.path()),
        &["x".into(), "y".into(), "v".into()],
    )
    .expect("open b");
    let (va, vb) = (a.view_id("v").expect("v"), b.view_id("v").expect("v"));
    assert_ne!(va.as_u32(), vb.as_u32());
    apply(
        &mut a,
        va,
        &[
            (0, 1, "ana", "c"),
            (1, 2, "bo", "c"),
            (2, 1, "ana2", "u"),
            (3, 3, "cy", "c"),
            (4, 2, "", "d"),
        ],
    );
    let other = a.view_id("other").expect("other");
    apply(&mut a, other, &[(0, 9, "not copied", "c")]);
    // b's own, older state of the view, and a view next to it.
    apply(&mut b, vb, &[(0, 1, "stale", "c"), (1, 7, "gone", "c")]);
    let x = b.view_id("x").expect("x");
    apply(&mut b, x, &[(0, 5, "kept", "c")]);

    let entries = export(&a.reader(), "v");
    b.install_view("v", entries).expect("install");

    let (ra, rb) = (a.reader(), b.reader());
    assert_eq!(rows(&rb, "v"), rows(&ra, "v"));
    let names: Vec<String> = rows(&rb, "v").into_iter().map(|(_, row)| row).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names[0].contains("ana2") && names[1].contains("cy"),
        "{names:?}"
    );
    assert_eq!(rows(&rb, "x").len(), 1, "other views are untouched");
    let (ma, mb) = (
        ra.view_meta("v").expect("meta"),
        rb.view_meta("v").expect("meta"),
    );
    assert_eq!((mb.last_seq, mb.incarnation), (ma.last_seq, ma.incarnation));
    assert_eq!(mb.id, vb.as_u32(), "the copy takes the receiver's view id");
    assert_eq!(
        rb.changes_after("v", 0, 100).expect("changes"),
        ra.changes_after("v", 0, 100).expect("changes")
    );
    assert_eq!(rb.stream_offset("v", "kafka:t:0").expect("offset"), Some(5));
    assert_eq!(b.next_offset(vb, "kafka:t:0"), Some(5));

    // It goes on from the copy: what the holder applied is applied, the
    // next change takes the next sequence number.
    let outcomes = apply(&mut b, vb, &[(4, 2, "", "d"), (5, 4, "dee", "c")]);
    assert_eq!(outcomes[0], Outcome::AlreadyApplied);
    assert_ne!(outcomes[1], Outcome::AlreadyApplied);
    let last = rb.changes_after("v", ma.last_seq, 10).expect("changes");
    assert_eq!(
        last.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![ma.last_seq + 1]
    );
    drop((b, rb));

    // And after the store is opened again.
    let b = Store::open(
        &StoreConfig::new(dir_b.path()),
        &["x".into(), "y".into(), "v".into()],
    )
    .expect("reopen b");
    let vb = b.view_id("v").expect("v");
    assert_eq!(b.next_offset(vb, "kafka:t:0"), Some(6));
    assert_eq!(b.meta(vb).map(|m| m.last_seq), Some(ma.last_seq + 1));
    assert_eq!(rows(&b.reader(), "v").len(), 3);
}

#[test]
fn a_copy_without_its_metadata_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(&StoreConfig::new(dir.path()), &["v".into()]).expect("open");
    let view = store.view_id("v").expect("v");
    apply(&mut store, view, &[(0, 1, "ana", "c")]);
    let mut entries = export(&store.reader(), "v");
    entries.retain(|e| e.family != ndc_operators::StateFamily::Meta);
    assert!(store.install_view("v", entries).is_err());
    assert_eq!(rows(&store.reader(), "v").len(), 1);
    assert!(store.install_view("unknown", Vec::new()).is_err());
}

#[test]
fn a_copy_spilled_to_a_file_installs_like_one_in_memory() {
    use ndc_operators::copy_file::{CopyFileWriter, read_copy_file};
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Store::open(&StoreConfig::new(dir_a.path()), &["v".into()]).unwrap();
    let mut b = Store::open(&StoreConfig::new(dir_b.path()), &["w".into(), "v".into()]).unwrap();
    let (va, vb) = (a.view_id("v").unwrap(), b.view_id("v").unwrap());
    let events: Vec<(u64, u32, String, &str)> = (0..500u32)
        .map(|i| {
            (
                u64::from(i),
                i % 200,
                format!("n{i}"),
                if i < 200 { "c" } else { "u" },
            )
        })
        .collect();
    let events: Vec<(u64, u32, &str, &str)> = events
        .iter()
        .map(|(o, id, n, op)| (*o, *id, n.as_str(), *op))
        .collect();
    apply(&mut a, va, &events);
    apply(&mut b, vb, &[(0, 1, "stale", "c")]);
    let file = dir_b.path().join("v.copy");
    let mut writer = CopyFileWriter::create(&file).unwrap();
    for e in export(&a.reader(), "v") {
        writer.push(&e).unwrap();
    }
    let written = writer.finish().unwrap();
    assert!(written > 700, "rows, changes, offsets and meta: {written}");

    // Cut short mid-entry: refused, the view as it was.
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir_b.path().join("cut.copy");
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
    assert!(
        b.install_view_from("v", read_copy_file(&cut).unwrap())
            .is_err()
    );
    assert_eq!(rows(&b.reader(), "v").len(), 1);

    b.install_view_from("v", read_copy_file(&file).unwrap())
        .unwrap();
    let (ra, rb) = (a.reader(), b.reader());
    assert_eq!(rows(&rb, "v"), rows(&ra, "v"));
    assert_eq!(rows(&rb, "v").len(), 200);
    assert_eq!(
        rb.changes_after("v", 0, 1000).unwrap(),
        ra.changes_after("v", 0, 1000).unwrap()
    );
    assert_eq!(b.next_offset(vb, "kafka:t:0"), Some(500));
    drop((b, rb));
    let b = Store::open(&StoreConfig::new(dir_b.path()), &["w".into(), "v".into()]).unwrap();
    assert_eq!(rows(&b.reader(), "v"), rows(&ra, "v"));
}

#[test]
fn a_copy_with_a_family_split_apart_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&StoreConfig::new(dir.path()), &["v".into()]).unwrap();
    let view = store.view_id("v").unwrap();
    apply(&mut store, view, &[(0, 1, "ana", "c"), (1, 2, "bo", "c")]);
    let mut entries = export(&store.reader(), "v");
    // A row moved to the front: the rows' entries are no longer together.
    let row = entries
        .iter()
        .position(|e| e.family == ndc_operators::StateFamily::Rows)
        .unwrap();
    let moved = entries.remove(row);
    entries.insert(1, moved);
    assert!(store.install_view("v", entries).is_err());
    assert_eq!(rows(&store.reader(), "v").len(), 2);
}

#[test]
fn a_view_half_installed_when_the_node_stopped_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let mut store =
            Store::open(&StoreConfig::new(dir.path()), &["v".into(), "x".into()]).unwrap();
        let (v, x) = (store.view_id("v").unwrap(), store.view_id("x").unwrap());
        apply(&mut store, v, &[(0, 1, "ana", "c"), (1, 2, "bo", "c")]);
        apply(&mut store, x, &[(0, 5, "kept", "c")]);
        store.reader().view_meta("v").unwrap()
    };
    // What a stop between deleting the old state and storing the new
    // metadata leaves: the mark (the rows may be partly there).
    {
        let db = rocksdb::DB::open_cf(
            &rocksdb::Options::default(),
            dir.path(),
            ["rows", "changelog", "offsets", "meta"],
        )
        .unwrap();
        let meta = db.cf_handle("meta").unwrap();
        db.put_cf(meta, b"installing/v", b"").unwrap();
    }
    let store = Store::open(&StoreConfig::new(dir.path()), &["v".into(), "x".into()]).unwrap();
    let reader = store.reader();
    assert!(
        rows(&reader, "v").is_empty(),
        "a half-installed view starts empty"
    );
    let after = reader.view_meta("v").unwrap();
    assert_eq!((after.id, after.last_seq), (before.id, 0));
    assert_ne!(
        after.incarnation, before.incarnation,
        "its old resume tokens are void"
    );
    assert_eq!(
        store.next_offset(store.view_id("v").unwrap(), "kafka:t:0"),
        None
    );
    assert_eq!(rows(&reader, "x").len(), 1, "other views are untouched");
    drop((store, reader));
    // The mark is gone: opened again, the view is not reset again.
    let store = Store::open(&StoreConfig::new(dir.path()), &["v".into(), "x".into()]).unwrap();
    assert_eq!(
        store.reader().view_meta("v").unwrap().incarnation,
        after.incarnation
    );
}
