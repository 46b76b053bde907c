//! A small labelled dataset written by hand for tests: what a hospital onboarding
//! its own telemetry brings — a CSV with device ids, event times, a few metrics and
//! a label column, the schema file that declares it (with its `[labels]` taxonomy),
//! and the feature SQL. Nothing in it is built into twinguard.

use std::path::{Path, PathBuf};

/// The three files of the lab dataset.
#[derive(Debug, Clone)]
pub struct LabDataset {
    pub csv: PathBuf,
    pub schema: PathBuf,
    pub features: PathBuf,
    /// Rows written (device-interleaved, in time order).
    pub rows: usize,
}

/// The schema file: three flow metrics, a label, and the label taxonomy.
pub const LAB_SCHEMA: &str = r#"name = "lab-flows"
version = 1
description = "Flow summaries of a hospital lab network, labelled by hand (test data)"

[[fields]]
name = "pkts"
type = "f64"
role = "metric"
transform = "log1p"
source_column = "packets"

[[fields]]
name = "bytes"
type = "f64"
role = "metric"
transform = "log1p"
source_column = "bytes"

[[fields]]
name = "dur"
type = "f64"
role = "metric"
source_column = "duration_s"

[[fields]]
name = "label"
type = "string"
role = "label"
source_column = "verdict"

[labels]
normal = ["ok"]

[labels.classes]
sweep = "Recon-Sweep"
flood = "DoS-Flood"

[labels.families]
"Recon-Sweep" = "Recon"
"DoS-Flood" = "DoS"
"#;

/// The feature SQL: the metrics on a log scale, their z-scores against the device's
/// own baseline, and the twin's behavioural distance.
pub const LAB_FEATURES: &str = "SELECT
  e._partition,
  e._offset,
  ln(1.0 + greatest(e.pkts, 0.0)) AS pkts,
  ln(1.0 + greatest(e.bytes, 0.0)) AS bytes,
  e.dur AS dur,
  coalesce((t.pkts__x - t.pkts__mean) / t.pkts__sd, 0.0) AS pkts_z,
  coalesce((t.bytes__x - t.bytes__mean) / t.bytes__sd, 0.0) AS bytes_z,
  t.behaviour_distance AS behaviour_distance
FROM events e
JOIN twin t ON e._partition = t._partition AND e._offset = t._offset
";

/// Write the lab dataset into `dir`: `rows` rows over three devices, one row a
/// second from `start_ms` (RFC 3339 times), with sweeps and floods spread over the
/// whole capture so a temporal split sees every class in each part.
pub fn write_lab_dataset(dir: &Path, rows: usize, start_ms: i64) -> std::io::Result<LabDataset> {
    std::fs::create_dir_all(dir)?;
    let mut csv = String::from("device,ts,packets,bytes,duration_s,verdict\n");
    // A fixed LCG: the same file on every machine.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let devices = ["pump-a", "pump-b", "monitor-c"];
    for i in 0..rows {
        let device = devices[i % devices.len()];
        let t = chrono::DateTime::from_timestamp_millis(start_ms + i as i64 * 1000).expect("valid time");
        let phase = (i / 30) % 10;
        let (label, pkts, bytes, dur) = match phase {
            3 if i % 3 == 0 => ("sweep", 1.0 + rnd() * 2.0, 60.0 + rnd() * 40.0, 0.001 + rnd() * 0.004),
            7 if i % 3 == 1 => ("flood", 400.0 + rnd() * 300.0, 4.0e5 + rnd() * 2.0e5, 1.0 + rnd()),
            _ => ("ok", 20.0 + rnd() * 15.0, 9.0e3 + rnd() * 4.0e3, 0.5 + rnd()),
        };
        csv.push_str(&format!("{device},{},{pkts:.2},{bytes:.1},{dur:.4},{label}\n", t.format("%Y-%m-%dT%H:%M:%S%.3fZ")));
    }
    let out = LabDataset { csv: dir.join("lab.csv"), schema: dir.join("lab-flows.toml"), features: dir.join("lab-flows.sql"), rows };
    std::fs::write(&out.csv, csv)?;
    std::fs::write(&out.schema, LAB_SCHEMA)?;
    std::fs::write(&out.features, LAB_FEATURES)?;
    Ok(out)
}

/// A `twinguard train` job on the lab dataset `lab`: a small, quick model
/// (stratified split and seeds 3, `trees` trees, one LSTM epoch) written to `out`.
pub fn lab_job(lab: &LabDataset, trees: usize, out: PathBuf) -> crate::TrainJob {
    use twinguard_models::{boost::BoostParams, forest::ForestParams, lstm::LstmParams, svm::SvmParams};
    let schema = twinguard_schemas::EventSchema::named_or_file(lab.schema.to_str().expect("utf-8 path")).expect("the lab schema file parses");
    crate::TrainJob {
        dataset: crate::DatasetSpec {
            file: lab.csv.clone(),
            schema: schema.id(),
            devices: 1,
            interval_ms: 0,
            limit: None,
            shuffle_seed: Some(3),
            device_column: Some("device".into()),
            time_column: Some("ts".into()),
        },
        feature_sql: std::fs::read_to_string(&lab.features).expect("the lab feature SQL"),
        schema,
        twin: twinguard_operators::TwinConfig::default(),
        split: crate::SplitSpec { kind: crate::SplitKind::Stratified, train: 0.6, validation: 0.2, seed: 3 },
        opts: crate::TrainOptions {
            target_fpr: 0.02,
            seed: 3,
            forest: ForestParams { trees, seed: 3, ..Default::default() },
            svm: SvmParams { max_train_rows: 300, seed: 3, ..Default::default() },
            lstm: LstmParams { epochs: 1, seed: 3, ..Default::default() },
            boost: BoostParams { rounds: 20, seed: 3, ..Default::default() },
            flip_labels: 0.0,
            screen: false,
            screen_threshold: 0.2,
            combine: Default::default(),
        },
        out,
    }
}
