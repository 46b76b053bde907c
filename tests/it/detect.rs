//! Detectors end to end on the real broker: `twinguard train` writes a model,
//! `twinguard eval` scores its held-out rows offline, and the running pipeline,
//! fed the same dataset through Kafka and restarted halfway, gives every event the
//! same scores (so the LSTM state kept in the twins survived the restart) and the
//! same held-out figures.

use std::path::Path;
use std::process::Command;

use twinguard_train::{self as train, Recipe};
use twinguard_models::{metrics, Artifact};
use twinguard_schemas::verdict::Verdict;
use twinguard_schemas::EventSchema;

use crate::harness::*;

const ROWS: usize = 3000;

fn twinguard(args: &[&str], extra: &[&Path]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_twinguard")).args(args).args(extra).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "twinguard {args:?} failed:\n{text}");
    text
}

#[test]
fn pipeline_scores_match_offline_eval_across_a_restart() {
    let Setup { dir, broker: _broker, mut cfg } = Setup::new("detect");
    let csv = twinguard_schemas::testing::manifest_dir().join("../../shared/datasets/wustl-ehms-2020/train.csv");
    let model = dir.join("model");
    let limit = ROWS.to_string();
    let out = twinguard(
        &["train", "--schema", "wustl-flow-vitals/v1", "--limit", &limit, "--trees", "20", "--svm-rows", "600", "--lstm-epochs", "2", "--dataset"],
        &[&csv, Path::new("--out"), &model],
    );
    assert!(out.contains("ensemble"), "{out}");
    for f in ["model.json", "MODEL_CARD.md", "report.json", "roc.png", "pr.png", "confusion.png"] {
        assert!(model.join(f).is_file(), "train wrote no {f}");
    }
    let eval_dir = dir.join("eval");
    twinguard(&["eval", "--model"], &[&model, Path::new("--out"), &eval_dir]);
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(eval_dir.join("report.json")).unwrap()).unwrap();
    let ens = &report["models"]["ensemble"]["at_threshold"];

    // The same events, through Kafka, in two runs of the pipeline.
    let artifact = Artifact::load(&model).unwrap();
    let recipe = Recipe::from_card(&artifact).unwrap();
    let schema = EventSchema::builtin(&artifact.schema).unwrap();
    let records = recipe.dataset.load(&schema).unwrap();
    assert_eq!(records.len(), ROWS);
    cfg.model.path = Some(model.clone());
    let path = write_config(&dir, "pipeline", &cfg);
    let send = |recs: &[(String, Vec<u8>)]| {
        twinguard::tools::produce::produce_all(&cfg, &cfg.topics.input, recs.iter().cloned(), None, |_, _| {}).unwrap()
    };
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    let half = ROWS / 2;
    let coords_a = send(&records[..half]);
    let mut p = PipelineProc::start(&dir, "run-1", &path);
    verdicts.until("verdicts for the first half", |r| verdicts_by_coords(r).len() >= half);
    p.stop();
    let coords_b = send(&records[half..]);
    let mut p = PipelineProc::start(&dir, "run-2", &path);
    verdicts.until("verdicts for every row", |r| verdicts_by_coords(r).len() >= ROWS);
    p.stop();
    let coords: Vec<(i32, i64)> = coords_a.into_iter().chain(coords_b).collect();

    let by_coords: std::collections::HashMap<(i32, i64), Verdict> = verdicts
        .records
        .iter()
        .map(|r| {
            let v: Verdict = serde_json::from_slice(rdkafka::Message::payload(r).unwrap()).unwrap();
            ((v.source.partition, v.source.offset), v)
        })
        .collect();
    assert_eq!(by_coords.len(), ROWS, "one verdict per event, none twice");

    // Offline: the detector over the same records, in one go.
    let twin = train::twin_config_of(&artifact).unwrap();
    let offline = train::score_stream(&schema, &twin, artifact.clone(), &records, &mut |_, _| {}).unwrap();
    for (row, c) in coords.iter().enumerate() {
        let v = &by_coords[c];
        assert_eq!(v.model_version.as_deref(), Some(artifact.version.as_str()));
        let s = v.scores.as_ref().expect("scored by the ensemble");
        assert_eq!(
            (s.ensemble, s.rf, s.svm, s.lstm, s.twin, s.gbdt),
            (
                offline.ensemble[row],
                offline.members[row].rf,
                offline.members[row].svm,
                offline.members[row].lstm,
                offline.members[row].twin,
                Some(offline.members[row].gbdt)
            ),
            "row {row} (offset {c:?}) scored differently in the pipeline than offline"
        );
        assert_eq!(v.anomalous, offline.attack[row]);
    }

    // The held-out figures from the pipeline's verdicts equal eval's.
    let split = recipe.split.apply(&offline.truth);
    let scores: Vec<f64> = split.test.iter().map(|&i| by_coords[&coords[i]].score).collect();
    let truth: Vec<bool> = split.test.iter().map(|&i| offline.truth[i] != "normal").collect();
    let b = metrics::binary(&scores, &truth, artifact.ensemble.threshold);
    assert_eq!(
        (b.tp, b.fp, b.tn, b.fn_),
        (ens["tp"].as_u64().unwrap(), ens["fp"].as_u64().unwrap(), ens["tn"].as_u64().unwrap(), ens["fn"].as_u64().unwrap()),
        "pipeline verdicts and `twinguard eval` disagree on the test rows"
    );
}

/// A dataset onboarded by files alone (schema file with its label taxonomy, feature
/// SQL, a CSV with device ids and event times) trains with `twinguard train` and
/// runs in the pipeline: `twinguard replay` reads the CSV by the same schema file,
/// and the pipeline, configured with it, scores every event with the model and
/// names the schema file's classes.
#[test]
fn a_model_trained_on_a_schema_file_runs_in_the_pipeline() {
    const ROWS: usize = 1500;
    let Setup { dir, broker: _broker, mut cfg } = Setup::new("onboard");
    let start = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let lab = twinguard_train::testkit::write_lab_dataset(&dir.join("lab"), ROWS, start).unwrap();
    let model = dir.join("model");
    let schema_file = lab.schema.to_str().unwrap().to_string();
    let out = twinguard(
        &["train", "--schema", &schema_file, "--device-column", "device", "--time-column", "ts", "--trees", "20", "--svm-rows", "300", "--lstm-epochs", "1"],
        &[Path::new("--features"), &lab.features, Path::new("--dataset"), &lab.csv, Path::new("--out"), &model],
    );
    assert!(out.contains("lab-flows/v1"), "{out}");
    let artifact = Artifact::load(&model).unwrap();
    cfg.schema.name = None;
    cfg.schema.file = Some(lab.schema.clone());
    cfg.model.path = Some(model.clone());
    let path = write_config(&dir, "pipeline", &cfg);
    twinguard(&["replay", "--device-column", "device", "--time-column", "ts", "--config"], &[&path, Path::new("--file"), &lab.csv]);
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    let mut p = PipelineProc::start(&dir, "run", &path);
    verdicts.until("a verdict per event", |r| verdicts_by_coords(r).len() >= ROWS);
    p.stop();
    let vs: Vec<Verdict> = verdicts.records.iter().map(|r| serde_json::from_slice(rdkafka::Message::payload(r).unwrap()).unwrap()).collect();
    assert!(vs.iter().all(|v| v.model_version.as_deref() == Some(artifact.version.as_str())), "every event scored by the model");
    let classes: std::collections::BTreeSet<&str> = vs.iter().filter(|v| v.anomalous).filter_map(|v| v.attack_class.as_deref()).collect();
    assert_eq!(classes, ["DoS-Flood", "Recon-Sweep"].into_iter().collect(), "the schema file's classes");
    let caught = vs.iter().filter(|v| v.anomalous && v.label.as_deref() == Some("flood")).count();
    let floods = vs.iter().filter(|v| v.label.as_deref() == Some("flood")).count();
    assert!(floods > 0 && caught * 10 >= floods * 9, "{caught} of {floods} floods flagged");
}
