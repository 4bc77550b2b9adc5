//! The node crate's house stays in order: each module (a folder or a file
//! of `node/src`) uses only the modules listed before it in `lib.rs`'s
//! documented order, so there is no import cycle between them.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

/// Bottom up, as `node/src/lib.rs` documents them.
const LAYERS: &[&str] = &[
    "config",
    "telemetry",
    "lifecycle",
    "security",
    "client",
    "kafka",
    "views",
    "cluster",
    "writer",
    "sources",
    "pipelines",
    "serving",
    "node",
    "quickstart",
];

/// The modules of `crate::` that `text` uses outside its tests.
fn uses(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    code.match_indices("crate::")
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect::<String>()
        })
        .collect()
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_uses_only_the_ones_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut seen = BTreeSet::new();
    let mut wrong = Vec::new();
    for path in all {
        let relative = path.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let layer = LAYERS
            .iter()
            .position(|l| *l == module)
            .unwrap_or_else(|| panic!("node/src/{module} is in no layer of this test"));
        seen.insert(module.clone());
        for used in uses(&std::fs::read_to_string(&path).unwrap()) {
            if let Some(at) = LAYERS.iter().position(|l| *l == used)
                && at > layer
            {
                wrong.push(format!("{} uses crate::{used}", relative.display()));
            }
        }
    }
    assert_eq!(seen.len(), LAYERS.len(), "modules found: {seen:?}");
    assert!(wrong.is_empty(), "modules used from below: {wrong:#?}");
}
