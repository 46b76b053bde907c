//! Test support shared by the workspace's tests (nothing at run time uses it):
//! expected-output ("golden") files compared or regenerated with `UPDATE_EXPECT=1`,
//! the replay of the committed fuzz corpora, and the fuzz targets' seed writer.

use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;

use crate::Decoder;

/// The directory of the package under test, read when the test runs. Not
/// `env!("CARGO_MANIFEST_DIR")`: that is fixed when the test binary is compiled,
/// and with the target directory shared between clones (scripts/deps.sh) a
/// binary built in one clone would read another clone's files.
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo when it runs tests and benches"))
}

/// Compare `actual` with the file at `path`; with `UPDATE_EXPECT` set (not `0`),
/// rewrite the file instead. `what` names what produced `actual` ("the query
/// computes"), `regenerate` the command that rewrites the file.
pub fn expect_file(path: &Path, actual: &str, what: &str, regenerate: &str) {
    let update = std::env::var("UPDATE_EXPECT").is_ok_and(|v| !v.is_empty() && v != "0");
    let expected = std::fs::read_to_string(path).map(|s| s.replace("\r\n", "\n"));
    if update {
        if expected.as_deref().ok() != Some(actual) {
            std::fs::write(path, actual).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            eprintln!("updated {}", path.display());
        }
        return;
    }
    let expected = expected.unwrap_or_else(|e| panic!("{}: {e}; create it with `{regenerate}`", path.display()));
    if expected != actual {
        panic!(
            "{} differs from what {what} now (- expected, + got):\n{}\nIf the change is intended, run `{regenerate}` and review the diff.",
            path.display(),
            line_diff(&expected, actual, 60)
        );
    }
}

/// A line diff (longest common subsequence): changed lines only, with their line
/// numbers in the expected (`-`) and actual (`+`) text, at most `limit` lines.
pub fn line_diff(expected: &str, actual: &str, limit: usize) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    // lcs[i][j]: length of the LCS of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let (mut i, mut j, mut out, mut shown, mut more) = (0, 0, String::new(), 0usize, 0usize);
    let mut emit = |s: String| {
        if shown < limit {
            out.push_str(&s);
            shown += 1;
        } else {
            more += 1;
        }
    };
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            emit(format!("-{:>4}| {}\n", i + 1, a[i]));
            i += 1;
        } else {
            emit(format!("+{:>4}| {}\n", j + 1, b[j]));
            j += 1;
        }
    }
    if more > 0 {
        out.push_str(&format!("... and {more} more changed lines\n"));
    }
    out
}

/// A float as golden files print it: 6 decimals, no negative zero, `NaN`, `inf`.
pub fn golden_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    let s = format!("{x:.6}");
    if s.strip_prefix('-').is_some_and(|r| r.chars().all(|c| c == '0' || c == '.')) {
        s[1..].to_string()
    } else {
        s
    }
}

/// Decode records as the stream does: keyed by their `device_id`, partition 0,
/// offsets from `first_offset`, at the processing time `now_ms`. A rejected record
/// fails the test, naming `path` (fix the input).
pub fn decode_records(decoder: &Decoder, records: &[String], first_offset: usize, now_ms: i64, path: &Path) -> RecordBatch {
    let keys: Vec<String> = records
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_str(r).unwrap_or_else(|e| panic!("{}: {e}: {r}", path.display()));
            v.get(crate::fields::DEVICE_ID).and_then(|d| d.as_str()).unwrap_or_default().to_string()
        })
        .collect();
    let raw: Vec<crate::RawRecord<'_>> = records
        .iter()
        .zip(&keys)
        .enumerate()
        .map(|(i, (r, k))| crate::RawRecord {
            partition: 0,
            offset: (first_offset + i) as i64,
            key: Some(k.as_bytes()),
            payload: Some(r.as_bytes()),
        })
        .collect();
    let out = decoder.decode(&raw, now_ms).unwrap();
    assert!(out.rejects.is_empty(), "{}: the decoder rejected records: {:?}", path.display(), out.rejects);
    out.batch
}

/// Replays every file of `corpus/<target>/` (and the seeds) through a fuzz
/// checker, failing with the file's name when one fails. A missing or empty
/// corpus directory fails too: CI must replay something.
pub fn replay_corpus(corpus: &Path, target: &str, check: fn(&[u8]), seeds: Vec<Vec<u8>>) {
    for s in &seeds {
        check(s);
    }
    let dir = corpus.join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    for f in &files {
        let data = std::fs::read(f).expect("corpus file");
        if let Err(e) = std::panic::catch_unwind(|| check(&data)) {
            panic!("corpus input {} fails: {:?}", f.display(), e.downcast_ref::<String>().map(String::as_str).or(e.downcast_ref::<&str>().copied()));
        }
    }
    eprintln!("{target}: {} corpus inputs and {} seeds replayed", files.len(), seeds.len());
}

/// For a fuzz target's `init`: with `TWINGUARD_FUZZ_WRITE_SEEDS=<dir>`, write the
/// built-in seeds there and exit (scripts/fuzz.sh seeds the corpus this way).
pub fn write_fuzz_seeds_if_asked(seeds: fn() -> Vec<Vec<u8>>) {
    if let Some(dir) = std::env::var_os("TWINGUARD_FUZZ_WRITE_SEEDS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("seed directory");
        for (i, s) in seeds().iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), s).expect("seed file");
        }
        std::process::exit(0);
    }
}
