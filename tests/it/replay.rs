//! `twinguard replay` streams a public dataset into the real broker; the pipeline
//! answers every row with a verdict that carries the row's ground-truth label.

use std::process::Command;

use crate::harness::*;

#[test]
fn replayed_wustl_rows_each_get_a_labelled_verdict() {
    let dir = scratch("replay");
    let broker = Broker::start(&dir);
    let cfg = broker.config("replay");
    create_topics(&cfg);
    let path = write_config(&dir, "pipeline", &cfg);
    let csv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/datasets/wustl-ehms-2020/train.csv");
    let out = Command::new(env!("CARGO_BIN_EXE_twinguard"))
        .args(["replay", "--config"])
        .arg(&path)
        .arg("--file")
        .arg(&csv)
        .args(["--limit", "2000"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("replayed 2000 rows"));

    let mut p = PipelineProc::start(&dir, "pipeline", &path);
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    verdicts.until("a verdict per replayed row", |r| verdicts_by_coords(r).len() >= 2000);
    p.stop();
    let labels: Vec<String> = verdicts
        .records
        .iter()
        .map(|r| {
            let v: twinguard_schemas::verdict::Verdict = serde_json::from_slice(rdkafka::Message::payload(r).unwrap()).unwrap();
            v.label.expect("label passed through")
        })
        .collect();
    assert_eq!(labels.len(), 2000);
    assert!(labels.iter().all(|l| l == "0" || l == "1"));
}
