//! Golden tests of what SQL users see: the schemas of the view's tables, the rows a
//! few events become, and the `status` row. Each writes text and compares it with a
//! file in `pipeline/golden/`; a change of a table's columns, of a row's values or of
//! their formatting fails here with a line diff.
//!
//! - `sql_tables.schema.expected`: per table, each column's name, Arrow type and
//!   nullability ([`Table::schema`]).
//! - `view_rows.expected`: `pipeline/golden/view.events.jsonl` through the stream's
//!   steps (decode, the twin-only `Detector`, the `Responder` under the default
//!   policy, the changelog) into the view as the engine's observer ([`ViewFeed`]),
//!   then the published snapshot's `twins`, `verdicts`, `alerts` and `commands`.
//! - `status_row.expected`: the `status` row ([`status_fn`]) of fixed [`Metrics`],
//!   for both modes.
//!
//! Regenerate the expected files after an intended change, and review their diff:
//!
//! ```text
//! UPDATE_EXPECT=1 cargo test -p twinguard --locked --lib golden
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use twinguard_schemas::testing::{decode_records, expect_file, golden_float as num};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, Float64Array, RecordBatch, TimestampMillisecondArray};
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use twinguard_operators::gate::Figures;
use twinguard_operators::{Detector, GateStatus, Registry, Responder};
use twinguard_schemas::decode::fmt_ms;
use twinguard_schemas::verdict::{verdicts_from_batch, Verdict};
use twinguard_schemas::Decoder;

use crate::app::serve::{status_fn, Mode};
use crate::config::Config;
use crate::obs::Metrics;
use crate::sql::view::{SqlView, StatusFn, StatusRow, Table, Tables, ViewFeed};

/// The command that rewrites the expected files (also printed on a mismatch).
const REGENERATE: &str = "UPDATE_EXPECT=1 cargo test -p twinguard --locked --lib golden";

/// Processing clock of the golden run (2027-01-15T08:00:00Z): the decoder's "now" and
/// the responder's (commands' `issued_at`, `expires_at`). After every input event.
const NOW_MS: i64 = 1_800_000_000_000;

/// Warm-up of the golden twins: short enough that a handful of events judges.
const WARMUP_EVENTS: u64 = 3;

fn golden_dir() -> PathBuf {
    twinguard_schemas::testing::manifest_dir().join("golden")
}

#[test]
fn golden_sql_table_schemas() {
    // A table added to `Table` fails to compile here until it is listed (and in `Table::ALL`).
    let listed = |t: Table| match t {
        Table::Twins | Table::Verdicts | Table::Alerts | Table::Commands | Table::Status => Table::ALL.contains(&t),
    };
    assert!(Table::ALL.iter().all(|t| listed(*t)));
    let mut out = String::new();
    out.push_str("# Golden: the columns of the SQL view's tables (sql::view::Table::schema). Generated; do not edit by hand.\n");
    out.push_str(&format!("# Regenerate after an intended change, then review the diff: {REGENERATE}\n"));
    out.push_str("# One line per column: name, Arrow type, nullability.\n");
    for t in Table::ALL {
        let schema = t.schema();
        out.push_str(&format!("\n== {} ({} columns) ==\n", t.name(), schema.fields().len()));
        let lines: Vec<(String, String, &str)> = schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().to_string(), if f.is_nullable() { "NULL" } else { "NOT NULL" }))
            .collect();
        let (nw, tw) = (lines.iter().map(|l| l.0.len()).max().unwrap_or(0), lines.iter().map(|l| l.1.len()).max().unwrap_or(0));
        for (n, ty, null) in lines {
            out.push_str(&format!("{n:<nw$}  {ty:<tw$}  {null}\n"));
        }
    }
    expect_file(&golden_dir().join("sql_tables.schema.expected"), &out, "the SQL view shows", REGENERATE);
}

#[test]
fn golden_sql_view_rows() {
    let events_path = golden_dir().join("view.events.jsonl");
    let text = std::fs::read_to_string(&events_path).unwrap_or_else(|e| panic!("{}: {e}", events_path.display()));
    let batches = batches_of(&text);
    assert!(batches.iter().map(Vec::len).sum::<usize>() > 0, "{}: no records", events_path.display());

    let mut cfg = Config::load(None, Vec::new()).expect("default configuration");
    cfg.state.warmup_events = WARMUP_EVENTS;
    let schema = cfg.event_schema().unwrap();
    let decoder = Decoder::new(schema.clone(), cfg.decode_limits());
    // What the default configuration builds (no model, registry, audit log or ack
    // secret), made here from its settings.
    let mut detector = Detector::twin_only(&schema, cfg.state.clone());
    let mut responder = Responder::new(&schema, cfg.response.clone(), Registry::default(), None);
    let view = SqlView::new(cfg.sql.recent_rows);
    let feed = ViewFeed::for_config(view.clone(), &cfg).unwrap();

    // One micro-batch at a time, as `engine`'s `process` takes it: decode → detect →
    // verdicts → respond (automation on) → note the verdicts on the twins → the
    // changed twins as changelog records → the observer.
    let mut offset = 0;
    for records in &batches {
        let events = decode_records(&decoder, records, offset, NOW_MS, &events_path);
        offset += records.len();
        let (scored, _) = detector.detect(&events).unwrap();
        let mut verdicts: Vec<Verdict> = verdicts_from_batch(&scored, &cfg.topics.input);
        let r = responder.respond(detector.twin_mut(), &events, &mut verdicts, true, NOW_MS);
        assert!(r.audit_unchained.is_empty() && r.audit.is_empty(), "no audit log is configured");
        for v in &verdicts {
            detector.twin_mut().note_verdict(v.source.partition, &v.device_id, v.score, v.attack_class.as_deref());
        }
        let changelog = detector.twin_mut().drain_changelog();
        let commands: Vec<_> = r.commands.into_iter().map(|(c, _)| c).collect();
        feed.batch(None, &verdicts, &r.alerts, &commands, &changelog);
    }
    let snap = publish(&view, Box::new(StatusRow::default));

    let mut out = String::new();
    out.push_str("# Golden: the SQL view's tables after pipeline/golden/view.events.jsonl. Generated; do not edit by hand.\n");
    out.push_str(&format!("# Regenerate after an intended change, then review the diff: {REGENERATE}\n"));
    out.push_str(&format!(
        "# Input: decoded as `{}` (partition 0, offset = record index), one micro-batch per `# batch` line; default\n",
        schema.id()
    ));
    out.push_str(&format!(
        "# configuration (twin-only detector, default response policy, sql.expose_phi = false) but warmup_events = {WARMUP_EVENTS};\n"
    ));
    out.push_str(&format!("# processing clock fixed at {} (commands' issued_at/expires_at follow it).\n", fmt_ms(NOW_MS)));
    out.push_str("# Not shown: the snapshot's publication time (wall clock) and `status` (status_row.expected).\n");
    out.push_str("# Floats {:.6}; other cells as Arrow displays them.\n");
    out.push_str(&format!("\n== twins ({} rows, one block per row) ==\n", rows(&snap.twins)));
    out.push_str(&expanded("twins", &snap.twins, &[]));
    out.push_str(&format!("\n== verdicts ({} rows, oldest first, one line per row) ==\n", rows(&snap.verdicts)));
    out.push_str(&grid(&snap.verdicts));
    out.push_str(&format!("\n== alerts ({} rows) ==\n", rows(&snap.alerts)));
    out.push_str(&expanded("alerts", &snap.alerts, &[]));
    out.push_str(&format!("\n== commands ({} rows) ==\n", rows(&snap.commands)));
    out.push_str(&expanded("commands", &snap.commands, &[]));
    expect_file(&golden_dir().join("view_rows.expected"), &out, "the SQL view shows", REGENERATE);
}

#[test]
fn golden_sql_status_row() {
    let m = Arc::new(Metrics::default());
    let set = |c: &std::sync::atomic::AtomicU64, v: u64| c.store(v, Ordering::Relaxed);
    set(&m.records_in, 1234);
    set(&m.changelog_in, 567);
    set(&m.verdicts_out, 1200);
    set(&m.anomalies, 17);
    set(&m.alerts_out, 9);
    set(&m.commands_out, 4);
    set(&m.dlq_out, 34);
    m.set_twins(42, Some(123_456));
    m.set_ready(true);
    m.set_owned(vec![0, 2, 4]);
    m.set_lag(BTreeMap::from([(0, 12), (2, 0), (4, 3)]));
    *m.schema_id.lock().unwrap() = "wustl-flow-vitals/v1".into();
    *m.model_version.lock().unwrap() = Some("golden-model-1".into());
    *m.gate.lock().unwrap() = GateStatus {
        suspended: true,
        reasons: vec!["live FPR 0.200 above 0.100".into()],
        acting: Figures { tp: 6, fp: 2, fn_: 2, tn: 30, precision: Some(0.75), detection_rate: Some(0.75), fpr: Some(2.0 / 32.0) },
        labels: 40,
        ..GateStatus::default()
    };
    for ms in 1..=200 {
        m.record_response_ms(f64::from(ms) * 1.5);
    }

    let mut out = String::new();
    out.push_str("# Golden: the SQL `status` row (app::serve::status_fn) of fixed Metrics, in both modes. Generated; do not edit by hand.\n");
    out.push_str(&format!("# Regenerate after an intended change, then review the diff: {REGENERATE}\n"));
    out.push_str("# Masked (checked for sense instead): instance (host name and process id), started_at (when\n");
    out.push_str("# status_fn was built) and snapshot_at (when the refresh ran): wall clock and machine.\n");
    out.push_str("# records_per_s is shown: it is a rate over the samples' wall-clock span, 0 while records_in stands still.\n");
    for mode in [Mode::Pipeline, Mode::Global] {
        let t0 = chrono::Utc::now().timestamp_millis();
        let view = SqlView::new(10);
        let snap = publish(&view, status_fn(mode, m.clone()));
        let t1 = chrono::Utc::now().timestamp_millis();
        let b = &snap.status[0];
        assert_eq!(b.num_rows(), 1);
        let col = |n: &str| b.column(b.schema().index_of(n).unwrap()).clone();
        let instance = col("instance");
        let instance = ArrayFormatter::try_new(instance.as_ref(), &FormatOptions::default()).unwrap().value(0).to_string();
        assert!(instance.ends_with(&format!(":{}", std::process::id())), "instance is host:pid: {instance}");
        let ts = |n: &str| col(n).as_any().downcast_ref::<TimestampMillisecondArray>().unwrap().value(0);
        let (started, snapshot) = (ts("started_at"), ts("snapshot_at"));
        assert!(t0 <= started && started <= snapshot && snapshot <= t1, "{t0} <= started_at {started} <= snapshot_at {snapshot} <= {t1}");
        out.push_str(&format!("\n== status, {mode:?} ==\n"));
        out.push_str(&expanded(
            "status",
            &snap.status,
            &[("instance", "host:pid"), ("started_at", "wall clock"), ("snapshot_at", "wall clock")],
        ));
    }
    expect_file(&golden_dir().join("status_row.expected"), &out, "the SQL view shows", REGENERATE);
}

/// Run the view's refresher until it has published once, stop it, and return the
/// snapshot (everything was staged before, so the first refresh takes it all).
fn publish(view: &Arc<SqlView>, status: StatusFn) -> Arc<Tables> {
    let metrics = Arc::new(Metrics::default());
    let stop = Arc::new(AtomicBool::new(false));
    let h = view.spawn_refresher(Duration::from_millis(5), status, metrics.clone(), stop.clone()).expect("refresher thread");
    let deadline = Instant::now() + Duration::from_secs(60);
    while view.generation() == 0 {
        let failed = metrics.sql_refresh_failures.load(Ordering::Relaxed);
        if failed > 0 || Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            panic!("no snapshot published ({failed} refreshes failed)");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    h.join().expect("refresher thread");
    view.snapshot()
}

/// Micro-batches of record values: a `# batch` line starts one; other `#` lines and
/// blank lines are skipped.
fn batches_of(text: &str) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = vec![Vec::new()];
    for l in text.lines().map(str::trim) {
        if l.starts_with("# batch") {
            if !out.last().is_some_and(Vec::is_empty) {
                out.push(Vec::new());
            }
        } else if !l.is_empty() && !l.starts_with('#') {
            out.last_mut().expect("a batch").push(l.to_string());
        }
    }
    out.retain(|b| !b.is_empty());
    out
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// One cell as text: `NULL`, a float with 6 decimals, or Arrow's display of it.
fn cell(a: &dyn Array, row: usize) -> String {
    if a.is_null(row) {
        return "NULL".into();
    }
    if a.data_type() == &DataType::Float64 {
        return num(a.as_any().downcast_ref::<Float64Array>().expect("Float64").value(row));
    }
    ArrayFormatter::try_new(a, &FormatOptions::default()).expect("a displayable column").value(row).to_string()
}

/// Rows as blocks (as `psql`'s expanded display): one `name | value` line per column,
/// so a long JSON cell changes one line. `masked` columns show `<masked: why>`.
fn expanded(table: &str, batches: &[RecordBatch], masked: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let mut n = 0;
    for b in batches {
        let schema = b.schema();
        let w = schema.fields().iter().map(|f| f.name().len()).max().unwrap_or(0);
        for r in 0..b.num_rows() {
            n += 1;
            out.push_str(&format!("-[ {table} row {n} ]-\n"));
            for (c, f) in schema.fields().iter().enumerate() {
                let v = match masked.iter().find(|(m, _)| m == f.name()) {
                    Some((_, why)) => format!("<masked: {why}>"),
                    None => cell(b.column(c).as_ref(), r),
                };
                out.push_str(&format!("{:<w$} | {v}\n", f.name()));
            }
        }
    }
    if n == 0 {
        out.push_str("(no rows)\n");
    }
    out
}

/// Rows as lines under a header of the column names, columns two spaces apart.
fn grid(batches: &[RecordBatch]) -> String {
    let Some(first) = batches.first() else { return "(no rows)\n".into() };
    let names: Vec<String> = first.schema().fields().iter().map(|f| f.name().clone()).collect();
    let lines: Vec<Vec<String>> =
        batches.iter().flat_map(|b| (0..b.num_rows()).map(move |r| (0..b.num_columns()).map(|c| cell(b.column(c).as_ref(), r)).collect())).collect();
    if lines.is_empty() {
        return "(no rows)\n".into();
    }
    let widths: Vec<usize> = (0..names.len()).map(|c| lines.iter().map(|l| l[c].len()).chain([names[c].len()]).max().unwrap_or(0)).collect();
    let line = |vals: &[String]| {
        let mut s = String::new();
        for (v, w) in vals.iter().zip(&widths) {
            s.push_str(&format!("{v:<w$}  "));
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&names);
    for l in &lines {
        out.push_str(&line(l));
    }
    out
}
