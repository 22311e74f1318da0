//! Replays the fuzz corpora (`fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`) through
//! the very functions the cargo-fuzz targets call (`fuzz/harness.rs`), so every seed and every
//! input the fuzzer once found keeps passing in a plain `cargo test`, without cargo-fuzz.

use std::path::{Path, PathBuf};

#[path = "../fuzz/harness.rs"]
mod harness;

/// Every file of the corpus and regressions folders of `target`, sorted.
fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for folder in ["corpus", "regressions"] {
        let dir = fuzz.join(folder).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            assert!(
                folder != "corpus",
                "{}: cannot read the corpus",
                dir.display()
            );
            continue;
        };
        for entry in entries {
            let path = entry.expect("read a corpus entry").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    let files = inputs(target);
    assert!(
        files.len() >= 10,
        "the {target} corpus has {} files: did fuzz/corpus/{target} move?",
        files.len()
    );
    for path in &files {
        let data = std::fs::read(path).expect("read a corpus file");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(
            outcome.is_ok(),
            "{}: the {target} target failed",
            path.display()
        );
    }
}

#[test]
fn parse_corpus_replays() {
    replay("parse", harness::parse_one);
}

#[test]
fn query_corpus_replays() {
    replay("query", harness::query_one);
}

#[test]
fn frames_corpus_replays() {
    replay("frames", harness::frames_one);
}

#[test]
fn differential_corpus_replays() {
    replay("differential", harness::differential_one);
}
