//! `twinguard replay` streams a public dataset into the real broker; the pipeline
//! answers every row with a verdict that carries the row's ground-truth label.

use std::process::Command;

use crate::harness::*;

#[test]
fn replayed_wustl_rows_each_get_a_labelled_verdict() {
    let Setup { dir, broker: _broker, cfg } = Setup::new("replay");
    let path = write_config(&dir, "pipeline", &cfg);
    let csv = twinguard_schemas::testing::manifest_dir().join("../../shared/datasets/wustl-ehms-2020/train.csv");
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
    assert!(labels.iter().all(|l| ["normal", "Spoofing", "Data Alteration"].contains(&l.as_str())), "{:?}", &labels[..5]);
}

#[test]
fn simulate_writes_the_requested_events_keyed_by_device() {
    let Setup { dir, broker: _broker, cfg } = Setup::new("simulate");
    let path = write_config(&dir, "pipeline", &cfg);
    let out = Command::new(env!("CARGO_BIN_EXE_twinguard"))
        .args(["simulate", "--config"])
        .arg(&path)
        .args(["--devices", "7", "--events", "700", "--malformed-rate", "0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut input = Reader::new(&cfg, &cfg.topics.input);
    input.until("700 simulated events", |r| r.len() >= 700);
    input.drain_to_end(&cfg, &cfg.topics.input);
    assert_eq!(input.records.len(), 700);
    let devices: std::collections::HashSet<Vec<u8>> = input.records.iter().map(|r| rdkafka::Message::key(r).unwrap().to_vec()).collect();
    assert_eq!(devices.len(), 7);
    for r in &input.records {
        let v: serde_json::Value = serde_json::from_slice(rdkafka::Message::payload(r).unwrap()).unwrap();
        assert_eq!(v["device_id"].as_str().unwrap().as_bytes(), rdkafka::Message::key(r).unwrap());
    }
}
