//! Golden tests of the shipped feature queries (`schemas/features/*.sql`).
//!
//! For each query, `schemas/features/tests/<query>.events.jsonl` holds a few event
//! records; they go through the same path as in the stream (the schema's `Decoder`,
//! the `TwinOperator`'s per-event snapshot, the `FeatureQuery`), and the decoded
//! events, the twin rows and the feature rows are written as text tables and compared
//! with `schemas/features/tests/<query>.expected`. A change of a query's output (or of
//! the decoder or twin under it) fails here with a line diff.
//!
//! Regenerate the expected files after an intended change, and review their diff:
//!
//! ```text
//! UPDATE_EXPECT=1 cargo test -p twinguard-operators --locked golden
//! ```
#![cfg(feature = "scoring")]

use std::path::PathBuf;

use twinguard_schemas::testing::{decode_records, expect_file, golden_float as num};

use arrow::array::{Array, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, TimeUnit};
use twinguard_operators::features::{FeatureQuery, FeatureRows};
use twinguard_operators::{TwinConfig, TwinOperator};
use twinguard_schemas::decode::fmt_ms;
use twinguard_schemas::{DecodeLimits, Decoder, EventSchema};

/// The command that rewrites the expected files (also printed on a mismatch).
const REGENERATE: &str = "UPDATE_EXPECT=1 cargo test -p twinguard-operators --locked golden";

/// The shipped queries with a golden test; every `schemas/features/*.sql` must be here.
const QUERIES: &[&str] = &["ciciomt-flow-window.v1", "wustl-flow-vitals.v1", "wustl-flow-vitals.v1.identity"];

/// Processing clock of the decoder (2027-01-15): after every input event.
const NOW_MS: i64 = 1_800_000_000_000;

/// Twin settings of the golden runs: the defaults, but a warm-up short enough that a
/// handful of events reaches a ready baseline (z-scores, identity drift).
fn twin_config() -> TwinConfig {
    TwinConfig { warmup_events: 3, ..TwinConfig::default() }
}

fn features_dir() -> PathBuf {
    let dir = twinguard_schemas::testing::manifest_dir().join("../schemas/features");
    dir.canonicalize().unwrap_or(dir)
}

#[test]
fn golden_ciciomt_flow_window_v1() {
    check("ciciomt-flow-window.v1");
}

#[test]
fn golden_wustl_flow_vitals_v1() {
    check("wustl-flow-vitals.v1");
}

#[test]
fn golden_wustl_flow_vitals_v1_identity() {
    check("wustl-flow-vitals.v1.identity");
}

#[test]
fn golden_covers_every_shipped_query() {
    let mut shipped: Vec<String> = std::fs::read_dir(features_dir())
        .expect("schemas/features/")
        .map(|e| e.expect("directory entry").file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".sql").map(str::to_string))
        .collect();
    shipped.sort();
    let mut tested: Vec<String> = QUERIES.iter().map(|q| q.to_string()).collect();
    tested.sort();
    assert_eq!(
        shipped, tested,
        "every schemas/features/*.sql needs a golden test: add it to QUERIES and a #[test] in operators/tests/golden_features.rs, \
         write schemas/features/tests/<query>.events.jsonl, then run `{REGENERATE}`"
    );
}

/// `wustl-flow-vitals.v1.identity` → (`wustl-flow-vitals/v1`, Some(`identity`)).
fn schema_of(query: &str) -> (String, Option<String>) {
    let mut parts = query.splitn(3, '.');
    let name = parts.next().expect("query name");
    let version = parts.next().unwrap_or_else(|| panic!("{query}: expected <schema>.v<N>[.<variant>]"));
    (format!("{name}/{version}"), parts.next().map(str::to_string))
}

fn check(query: &str) {
    let dir = features_dir();
    let sql_path = dir.join(format!("{query}.sql"));
    let sql = std::fs::read_to_string(&sql_path).unwrap_or_else(|e| panic!("{}: {e}", sql_path.display()));
    let (schema_id, variant) = schema_of(query);
    assert_eq!(
        twinguard_schemas::builtin_feature_sql(&schema_id, variant.as_deref()),
        Some(sql.as_str()),
        "{query}.sql is not the query the binary ships for `{schema_id}` {variant:?} (twinguard_schemas::builtin_feature_sql)"
    );
    let schema = EventSchema::builtin(&schema_id).unwrap();
    let events_path = dir.join(format!("tests/{query}.events.jsonl"));
    let text = std::fs::read_to_string(&events_path).unwrap_or_else(|e| panic!("{}: {e}", events_path.display()));
    let records = records(&text);
    assert!(!records.is_empty(), "{}: no records", events_path.display());

    // All records as one batch, as the stream sees a micro-batch.
    let decoder = Decoder::new(schema.clone(), DecodeLimits::default());
    let mut twin = TwinOperator::new(&schema, twin_config());
    let mut q = FeatureQuery::new(&sql, schema.arrow_schema(), twin.context_schema()).unwrap();
    let events = decode_records(&decoder, &records, 0, NOW_MS, &events_path);
    let (_, ctx) = twin.process_with_context(&events).unwrap();
    let feats = q.compute(&events, &ctx).unwrap();
    assert_eq!(feats.len(), records.len(), "one feature row per event");

    // The same records one per batch: the vectors must not depend on batch boundaries.
    let mut twin1 = TwinOperator::new(&schema, twin_config());
    let mut one_by_one = FeatureRows { partition: Vec::new(), offset: Vec::new(), cols: feats.cols, values: Vec::new() };
    for i in 0..records.len() {
        let b = decode_records(&decoder, &records[i..=i], i, NOW_MS, &events_path);
        let (_, c) = twin1.process_with_context(&b).unwrap();
        let f = q.compute(&b, &c).unwrap();
        one_by_one.partition.extend(f.partition);
        one_by_one.offset.extend(f.offset);
        one_by_one.values.extend(f.values);
    }
    let names = q.names().to_vec();
    let got = features_table(&names, &feats);
    assert_eq!(features_table(&names, &one_by_one), got, "{query}: features differ when each event is its own batch");

    let cfg = twin_config();
    let mut out = String::new();
    out.push_str(&format!("# Golden output of schemas/features/{query}.sql. Generated; do not edit by hand.\n"));
    out.push_str(&format!("# Regenerate after an intended change, then review the diff: {REGENERATE}\n"));
    out.push_str(&format!(
        "# Input: schemas/features/tests/{query}.events.jsonl, decoded as `{schema_id}` (partition 0, offset = record index);\n"
    ));
    out.push_str(&format!("# twin: TwinConfig::default() but warmup_events = {}.\n", cfg.warmup_events));
    out.push_str("# Each table has one line per column and one column per event (partition:offset); floats {:.6}.\n");
    out.push_str("\n== events: the decoded event batch (SQL table `events`) ==\n");
    out.push_str(&batch_table(&events, 2, 3));
    out.push_str("\n== twin: each event's twin as it was before the event (SQL table `twin`) ==\n");
    out.push_str(&batch_table(&ctx, 1, 2));
    out.push_str("\n== features: the query's output, as the model sees it (NULL and non-finite become NaN) ==\n");
    out.push_str(&got);
    expect_file(&dir.join(format!("tests/{query}.expected")), &out, "the query computes", REGENERATE);
}

/// The record values of an `.events.jsonl` file, skipping blank and `#` lines.
fn records(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

fn cell(a: &dyn Array, row: usize) -> String {
    if a.is_null(row) {
        return "NULL".into();
    }
    let any = a.as_any();
    match a.data_type() {
        DataType::Float64 => num(any.downcast_ref::<Float64Array>().unwrap().value(row)),
        DataType::Int64 => any.downcast_ref::<Int64Array>().unwrap().value(row).to_string(),
        DataType::Int32 => any.downcast_ref::<Int32Array>().unwrap().value(row).to_string(),
        DataType::Utf8 => any.downcast_ref::<StringArray>().unwrap().value(row).to_string(),
        DataType::Boolean => any.downcast_ref::<BooleanArray>().unwrap().value(row).to_string(),
        DataType::Timestamp(TimeUnit::Millisecond, _) => fmt_ms(any.downcast_ref::<TimestampMillisecondArray>().unwrap().value(row)),
        other => panic!("no golden formatting for {other}"),
    }
}

/// A batch transposed: one line per column, one column per row, headed by the
/// rows' `partition:offset` (taken from columns `p` and `o`).
fn batch_table(b: &RecordBatch, p: usize, o: usize) -> String {
    let heads: Vec<String> = (0..b.num_rows()).map(|r| format!("{}:{}", cell(b.column(p), r), cell(b.column(o), r))).collect();
    let lines: Vec<(String, Vec<String>)> = b
        .schema()
        .fields()
        .iter()
        .enumerate()
        .map(|(c, f)| (f.name().clone(), (0..b.num_rows()).map(|r| cell(b.column(c), r)).collect()))
        .collect();
    table("column", &heads, &lines)
}

fn features_table(names: &[String], f: &FeatureRows) -> String {
    let heads: Vec<String> = (0..f.len()).map(|r| format!("{}:{}", f.partition[r], f.offset[r])).collect();
    let lines: Vec<(String, Vec<String>)> =
        names.iter().enumerate().map(|(c, n)| (n.clone(), (0..f.len()).map(|r| num(f.row(r)[c])).collect())).collect();
    table("feature", &heads, &lines)
}

/// Left-aligned names, right-aligned values, columns two spaces apart.
fn table(corner: &str, heads: &[String], lines: &[(String, Vec<String>)]) -> String {
    let name_w = lines.iter().map(|(n, _)| n.len()).chain([corner.len()]).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..heads.len()).map(|r| lines.iter().map(|(_, v)| v[r].len()).chain([heads[r].len()]).max().unwrap_or(0)).collect();
    let row = |name: &str, vals: &[String]| {
        let mut s = format!("{name:<name_w$}");
        for (v, w) in vals.iter().zip(&widths) {
            s.push_str(&format!("  {v:>w$}"));
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = row(corner, heads);
    for (n, v) in lines {
        out.push_str(&row(n, v));
    }
    out
}
