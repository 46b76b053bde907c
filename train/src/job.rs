//! A training run and an evaluation run over a dataset file: load, features,
//! split, fit, score through the detector, report, and the files they write.

use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use twinguard_models::eval::evaluate;
use twinguard_models::eval::Scores;
use twinguard_models::labels;
use twinguard_models::train::{fit, Dataset, Progress, ScreenReport, Split, TrainOptions};
use twinguard_models::{Artifact, Ensemble, ModelCard, ModelError};
use twinguard_operators::detect::feature_relevant;
use twinguard_operators::TwinConfig;
use twinguard_schemas::EventSchema;

use crate::dataset::{sha256_file, DatasetSpec};
use crate::features::{prepare, score_stream};
use crate::plots::{self, Series};
use crate::report::{model_card_md, summary_json, Report};
use crate::split::SplitSpec;
use crate::TrainError;

/// A training run: dataset, features, split, settings, output directory.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub dataset: DatasetSpec,
    pub schema: EventSchema,
    pub feature_sql: String,
    pub twin: TwinConfig,
    pub split: SplitSpec,
    pub opts: TrainOptions,
    pub out: PathBuf,
}

/// Everything a training run recorded, besides the artifact (in the model card's
/// `hyper_parameters`), so `eval` can rebuild the same split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recipe {
    pub dataset: DatasetSpec,
    pub split: SplitSpec,
    pub train: TrainOptions,
}

impl Recipe {
    pub fn from_card(a: &Artifact) -> Result<Recipe, TrainError> {
        serde_json::from_value(a.card.hyper_parameters.clone())
            .map_err(|e| TrainError::Model(ModelError::Artifact(format!("model {}: its card has no usable recipe: {e}", a.version))))
    }
}

/// Train, evaluate on the held-out rows through the detector, save the artifact,
/// model card, report and plots into `job.out`.
pub fn run_train(job: &TrainJob, log: &mut dyn FnMut(Progress<'_>)) -> Result<(Artifact, Report), TrainError> {
    let started = Instant::now();
    let records = job.dataset.load(&job.schema)?;
    log(Progress::Step(&format!("{}: {} rows as `{}` events", job.dataset.file.display(), records.len(), job.schema.id())));
    let sha = sha256_file(&job.dataset.file)?;
    train_records(job, &records, &sha, started, log)
}

/// [`run_train`] on records already in memory (`dataset_sha256` identifies them).
pub fn train_records(
    job: &TrainJob,
    records: &[(String, Vec<u8>)],
    dataset_sha256: &str,
    started: Instant,
    log: &mut dyn FnMut(Progress<'_>),
) -> Result<(Artifact, Report), TrainError> {
    let mut central = |ds: &Dataset<'_>, split: &Split, log: &mut dyn FnMut(Progress<'_>)| fit(ds, split, job.twin.anomaly_threshold, &job.opts, log);
    train_records_with(job, records, dataset_sha256, started, &mut central, "", log)
}

/// How a training run fits the ensemble on the prepared rows and their split.
pub type Fitter<'a> = dyn FnMut(&Dataset<'_>, &Split, &mut dyn FnMut(Progress<'_>)) -> Result<(Ensemble, Option<ScreenReport>), ModelError> + 'a;

/// [`train_records`] with another way to fit (a federation); `version_prefix`
/// starts the model version (e.g. `fed-`).
pub fn train_records_with(
    job: &TrainJob,
    records: &[(String, Vec<u8>)],
    dataset_sha256: &str,
    started: Instant,
    fitter: &mut Fitter<'_>,
    version_prefix: &str,
    log: &mut dyn FnMut(Progress<'_>),
) -> Result<(Artifact, Report), TrainError> {
    let prep = prepare(&job.schema, &job.twin, &job.feature_sql, records, &mut |d, n| log(Progress::Status(&format!("  features: {d}/{n} events   "))))?;
    log(Progress::StatusEnd);
    log(Progress::Step(&format!("features: {} per event ({} records rejected by the decoder)", prep.cols, prep.rejected)));
    let split = job.split.apply(&prep.classes);
    log(Progress::Step(&format!(
        "split: {} -> {} train, {} validation, {} test rows",
        job.split.describe(),
        split.train.len(),
        split.validation.len(),
        split.test.len()
    )));
    let (ensemble, screen) = fitter(&prep.dataset(), &split, log)?;
    let training_seconds = started.elapsed().as_secs_f64();
    let recipe = Recipe { dataset: job.dataset.clone(), split: job.split.clone(), train: job.opts.clone() };
    let card = ModelCard {
        dataset: job.dataset.file.display().to_string(),
        dataset_sha256: dataset_sha256.to_string(),
        rows: prep.rows(),
        split: job.split.describe(),
        train_rows: split.train.len(),
        validation_rows: split.validation.len(),
        test_rows: split.test.len(),
        hyper_parameters: serde_json::to_value(&recipe).expect("recipe serialises"),
        target_fpr: job.opts.target_fpr,
        threshold: 0.0,
        test_metrics: serde_json::Value::Null,
        poisoning_screen: screen.map(|s| serde_json::to_value(s).expect("serialises")),
        created_utc: chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        training_seconds,
    };
    let mut artifact = new_artifact(&job.schema, &job.feature_sql, &job.twin, &prep.names, ensemble, card, version_prefix);
    log(Progress::Step(&format!("trained in {training_seconds:.1} s; evaluating on the test rows through the detector")));
    let scores = score_stream(&job.schema, &job.twin, artifact.clone(), records, &mut |d, n| log(Progress::Status(&format!("  scoring: {d}/{n} events   "))))?;
    log(Progress::StatusEnd);
    let report = evaluate(&artifact, &scores, &split, &artifact.card.dataset);
    artifact.card.test_metrics = summary_json(&report);
    let path = artifact.save(&job.out)?;
    write_outputs(&job.out, &artifact, &report)?;
    log(Progress::Step(&format!("model {} written to {}", artifact.version, path.display())));
    Ok((artifact, report))
}


/// A model artifact around a fitted ensemble: the schema (its definition when not
/// built in), feature SQL and names, the twin settings features depend on, the
/// class families, and a version `<prefix><schema>-v<N>-<UTC time>-<digest>`.
pub fn new_artifact(
    schema: &EventSchema,
    feature_sql: &str,
    twin: &TwinConfig,
    names: &[String],
    ensemble: twinguard_models::Ensemble,
    mut card: ModelCard,
    version_prefix: &str,
) -> Artifact {
    card.threshold = ensemble.threshold;
    let mut artifact = Artifact {
        format: twinguard_models::artifact::ARTIFACT_FORMAT,
        version: String::new(),
        schema: schema.id(),
        feature_sql: feature_sql.to_string(),
        feature_names: names.to_vec(),
        twin_config: feature_relevant(twin),
        ensemble,
        schema_definition: None,
        class_families: Default::default(),
        provenance: None,
        card,
    };
    if !schema.is_builtin() {
        artifact.schema_definition = Some(schema.definition.clone());
    }
    if schema.labels.is_some() {
        artifact.class_families = artifact.ensemble.classes.iter().map(|c| (c.clone(), crate::features::family(schema, c))).collect();
    }
    let digest = {
        use sha2::Digest;
        let bytes = serde_json::to_vec(&artifact.ensemble).expect("serialises");
        format!("{:x}", sha2::Sha256::digest(&bytes))
    };
    artifact.version = format!("{version_prefix}{}-v{}-{}-{}", schema.name, schema.version, chrono::Utc::now().format("%Y%m%dT%H%M%SZ"), &digest[..8]);
    artifact
}

/// Write `report.json`, `MODEL_CARD.md` and the plots into `dir`.
pub fn write_outputs(dir: &std::path::Path, a: &Artifact, r: &Report) -> Result<(), TrainError> {
    let io = |p: &std::path::Path, e: std::io::Error| TrainError::Io { path: p.to_path_buf(), reason: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let p = dir.join("report.json");
    std::fs::write(&p, serde_json::to_vec_pretty(r).expect("report serialises")).map_err(|e| io(&p, e))?;
    let p = dir.join("MODEL_CARD.md");
    std::fs::write(&p, model_card_md(a, r)).map_err(|e| io(&p, e))?;
    let series: Vec<Series<'_>> = r
        .models
        .iter()
        .map(|(name, m)| Series { name, scores: &m.scores, roc_auc: m.at_threshold.roc_auc, pr_auc: m.at_threshold.pr_auc })
        .collect();
    plots::write_all(dir, &series, &r.test_truth, &r.families).map_err(|e| TrainError::Io { path: dir.to_path_buf(), reason: format!("plots: {e}") })?;
    Ok(())
}


/// What `twinguard eval` scores and writes.
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    /// Another file of the model's schema (default: the recipe's dataset).
    pub dataset: Option<PathBuf>,
    /// Every row is a test row (a capture the model never saw), not the recipe's split.
    pub all: bool,
    /// Write per-event scores here as CSV.
    pub scores: Option<PathBuf>,
}

/// Evaluate a saved model on its recipe's dataset and split (or another file of the
/// same schema, split the same way, or scored whole with `all`).
pub fn run_eval(
    artifact: Artifact,
    opts: &EvalOptions,
    twin: &TwinConfig,
    out: &std::path::Path,
    log: &mut dyn FnMut(Progress<'_>),
) -> Result<Report, TrainError> {
    let recipe = Recipe::from_card(&artifact)?;
    let schema = schema_of(&artifact, &recipe)?;
    let mut spec = recipe.dataset.clone();
    if let Some(f) = &opts.dataset {
        spec.file = f.clone();
    }
    if opts.all {
        // A new capture is replayed in its own order, whole.
        spec.shuffle_seed = None;
        spec.limit = None;
    }
    let (records, file_rows) = spec.load_with_rows(&schema)?;
    let scores = score_stream(&schema, twin, artifact.clone(), &records, &mut |d, n| log(Progress::Status(&format!("  scoring: {d}/{n} events   "))))?;
    log(Progress::StatusEnd);
    let split = if opts.all {
        Split { train: Vec::new(), validation: Vec::new(), test: (0..scores.truth.len()).collect() }
    } else {
        recipe.split.apply(&scores.truth)
    };
    let report = evaluate(&artifact, &scores, &split, &spec.file.display().to_string());
    write_outputs(out, &artifact, &report)?;
    if let Some(f) = &opts.scores {
        write_scores(f, &artifact, &scores, &split, &file_rows)?;
    }
    Ok(report)
}

/// The schema a model was trained on: the text it carries (a schema file), else the
/// built-in one it names.
pub fn schema_of(artifact: &Artifact, recipe: &Recipe) -> Result<EventSchema, TrainError> {
    match &artifact.schema_definition {
        Some(text) => Ok(EventSchema::parse(text, &format!("the schema carried by model {}", artifact.version))?),
        None => Ok(EventSchema::builtin(&artifact.schema).or_else(|_| EventSchema::builtin(&recipe.dataset.schema))?),
    }
}

/// Per-event scores as CSV, one line per scored event in replay order.
pub fn write_scores(path: &std::path::Path, artifact: &Artifact, s: &Scores, split: &Split, file_rows: &[usize]) -> Result<(), TrainError> {
    use std::io::Write;
    let io = |e: std::io::Error| TrainError::Io { path: path.to_path_buf(), reason: e.to_string() };
    let mut part = vec!["test"; s.truth.len()];
    for &i in &split.train {
        part[i] = "train";
    }
    for &i in &split.validation {
        part[i] = "validation";
    }
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    writeln!(w, "row,split,label,family,rf,svm,lstm,twin,gbdt,ensemble,attack,class").map_err(io)?;
    for i in 0..s.truth.len() {
        let m = &s.members[i];
        let row = usize::try_from(s.offsets[i]).ok().and_then(|o| file_rows.get(o)).copied().unwrap_or(usize::MAX);
        let class = s.class[i].as_deref().filter(|_| s.attack[i]).unwrap_or(labels::NORMAL);
        writeln!(
            w,
            "{row},{},{},{},{},{},{},{},{},{},{},{}",
            part[i],
            csv_field(&s.truth[i]),
            csv_field(&artifact.family(&s.truth[i])),
            m.rf,
            m.svm,
            m.lstm,
            m.twin,
            m.gbdt,
            s.ensemble[i],
            u8::from(s.attack[i]),
            csv_field(class)
        )
        .map_err(io)?;
    }
    w.flush().map_err(io)
}

/// A CSV field, quoted when it needs to be.
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

/// The twin settings a model was trained with (to run eval and the demo with them).
pub fn twin_config_of(a: &Artifact) -> Result<TwinConfig, TrainError> {
    let mut v = serde_json::to_value(TwinConfig::default()).expect("serialises");
    if let (Some(obj), Some(m)) = (v.as_object_mut(), a.twin_config.as_object()) {
        for (k, x) in m {
            obj.insert(k.clone(), x.clone());
        }
    }
    serde_json::from_value(v).map_err(|e| TrainError::Model(ModelError::Artifact(format!("model {}: twin settings unreadable: {e}", a.version))))
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::DatasetSpec;
    use crate::features::prepare;
        use crate::split::{SplitKind, SplitSpec};
    use rand::{Rng, SeedableRng};
    use twinguard_operators::Detector;
    use twinguard_schemas::{DecodeLimits, Decoder, RawRecord};
    use twinguard_models::forest::ForestParams;
    use twinguard_models::lstm::LstmParams;
    use twinguard_models::svm::SvmParams;

    fn wustl() -> PathBuf {
        twinguard_schemas::testing::manifest_dir().join("../../shared/datasets/wustl-ehms-2020/train.csv")
    }

    fn job(out: PathBuf, rows: usize) -> TrainJob {
        let schema = EventSchema::builtin("wustl-flow-vitals/v1").unwrap();
        TrainJob {
            dataset: DatasetSpec { file: wustl(), schema: schema.id(), devices: 1, interval_ms: 100, limit: Some(rows), shuffle_seed: None, device_column: None, time_column: None },
            feature_sql: twinguard_schemas::builtin_feature_sql(&schema.id(), None).unwrap().to_string(),
            schema,
            twin: TwinConfig::default(),
            split: SplitSpec { kind: SplitKind::Temporal, train: 0.6, validation: 0.2, seed: 7 },
            opts: TrainOptions {
                target_fpr: 0.01,
                seed: 7,
                forest: ForestParams { trees: 8, seed: 7, ..Default::default() },
                svm: SvmParams { max_train_rows: 300, seed: 7, ..Default::default() },
                lstm: LstmParams { epochs: 1, seed: 7, ..Default::default() },
                boost: twinguard_models::boost::BoostParams { rounds: 30, seed: 7, ..Default::default() },
                flip_labels: 0.0,
                screen: false,
                screen_threshold: 0.2,
                combine: Default::default(),
            },
            out,
        }
    }

    /// Train/serve parity: the feature vectors the stream's detector computes (with
    /// a model loaded, batches of arbitrary sizes) are bit-identical to the ones
    /// training computed offline for the same events.
    #[test]
    fn stream_features_equal_training_features_whatever_the_batching() {
        let dir = std::env::temp_dir().join(format!("twinguard-parity-{}", std::process::id()));
        let j = job(dir.clone(), 1500);
        let (artifact, _) = run_train(&j, &mut |_| {}).unwrap();
        // A deployment can ask for another FPR: the stored validation scores give a
        // threshold that admits at most that share of validation normals.
        let mut strict = artifact.ensemble.clone();
        strict.recalibrate(0.002).unwrap();
        let fp = strict.validation_normal.iter().filter(|&&x| f64::from(x) >= strict.threshold).count();
        assert!(fp as f64 <= 0.002 * strict.validation_normal.len() as f64 + 1.0, "{fp} validation false positives");
        assert!(strict.threshold >= artifact.ensemble.threshold - 1e-6 || fp == 0);
        assert!(strict.recalibrate(1.5).is_err());
        let records = j.dataset.load(&j.schema).unwrap();
        let offline = prepare(&j.schema, &j.twin, &j.feature_sql, &records, &mut |_, _| {}).unwrap();

        let mut det = Detector::with_model(&j.schema, j.twin.clone(), artifact).unwrap();
        let decoder = Decoder::new(j.schema.clone(), DecodeLimits::default());
        let now = chrono::Utc::now().timestamp_millis();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (mut at, mut live) = (0usize, Vec::new());
        while at < records.len() {
            let n = [1, 2, 17, 64, 300, 999][rng.random_range(0..6)].min(records.len() - at);
            let raw: Vec<RawRecord<'_>> = (at..at + n)
                .map(|i| RawRecord { partition: 0, offset: i as i64, key: Some(records[i].0.as_bytes()), payload: Some(&records[i].1) })
                .collect();
            let (_, feats) = det.detect(&decoder.decode(&raw, now).unwrap().batch).unwrap();
            live.extend_from_slice(&feats.expect("a model computes features").values);
            at += n;
        }
        assert_eq!(live.len(), offline.values.len());
        for (i, (a, b)) in live.iter().zip(&offline.values).enumerate() {
            assert!(a.to_bits() == b.to_bits(), "row {} feature `{}`: stream {a} vs training {b}", i / offline.cols, offline.names[i % offline.cols]);
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Two versions in one detector (a pipeline switching to a published model):
    /// from the switch on, every event carries the new version, and each device's
    /// first event under it starts the new LSTM from zero state, whatever the
    /// batching, so the switch is deterministic.
    #[test]
    fn a_second_version_scores_from_its_switch_with_each_devices_lstm_started_afresh() {
        let dir = std::env::temp_dir().join(format!("twinguard-swap-{}", std::process::id()));
        let mut j = job(dir.clone(), 1200);
        j.dataset.devices = 4;
        let (v1, _) = run_train(&j, &mut |_| {}).unwrap();
        let mut v2 = v1.clone();
        v2.version = format!("{}-b", v1.version);
        let records = j.dataset.load(&j.schema).unwrap();
        let decoder = Decoder::new(j.schema.clone(), DecodeLimits::default());
        let now = chrono::Utc::now().timestamp_millis();
        let switch = 700;
        let run = |seed: u64| {
            let mut det = Detector::with_model(&j.schema, j.twin.clone(), v1.clone()).unwrap();
            assert_eq!(det.add_model(v2.clone()).unwrap(), v2.version);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let (mut at, mut out) = (0usize, Vec::new());
            while at < records.len() {
                let end = if at < switch { switch } else { records.len() };
                let n = [1, 5, 64, 333][rng.random_range(0..4)].min(end - at);
                let raw: Vec<RawRecord<'_>> = (at..at + n)
                    .map(|i| RawRecord { partition: 0, offset: i as i64, key: Some(records[i].0.as_bytes()), payload: Some(&records[i].1) })
                    .collect();
                let version = if at < switch { v1.version.as_str() } else { v2.version.as_str() };
                let (v, feats) = det.detect_as(&decoder.decode(&raw, now).unwrap().batch, Some(version)).unwrap();
                let feats = feats.unwrap();
                out.extend(twinguard_schemas::verdict::verdicts_from_batch(&v, "in").into_iter().enumerate().map(|(i, v)| (v, feats.row(i).to_vec())));
                at += n;
            }
            (out, det)
        };
        let (a, det) = run(1);
        let (b, _) = run(2);
        assert_eq!(a.len(), records.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(serde_json::to_string(&x.0).unwrap(), serde_json::to_string(&y.0).unwrap(), "batching changed a verdict");
        }
        let mut fresh = std::collections::HashSet::new();
        let mut scratch = twinguard_models::ensemble::Scratch::default();
        for (i, (v, row)) in a.iter().enumerate() {
            let want = if i < switch { &v1.version } else { &v2.version };
            assert_eq!(v.model_version.as_ref(), Some(want), "event {i}");
            if i >= switch && fresh.insert(v.device_id.clone()) {
                let from_zero = v2.ensemble.score(row, &mut Vec::new(), &mut scratch).members.lstm;
                assert_eq!(v.scores.as_ref().unwrap().lstm.to_bits(), from_zero.to_bits(), "device {}: its first v2 event must start from zero state", v.device_id);
            }
        }
        assert_eq!(fresh.len(), 4, "every device was scored after the switch");
        assert!(det.twin().store().iter().all(|t| t.lstm_model == twinguard_operators::twin::version_tag(&v2.version)));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_label_screen_finds_flipped_labels() {
        let dir = std::env::temp_dir().join(format!("twinguard-screen-{}", std::process::id()));
        let mut j = job(dir.clone(), 3000);
        j.opts.flip_labels = 0.1;
        j.opts.screen = true;
        j.opts.forest.trees = 20;
        let records = j.dataset.load(&j.schema).unwrap();
        let prep = prepare(&j.schema, &j.twin, &j.feature_sql, &records, &mut |_, _| {}).unwrap();
        let split = j.split.apply(&prep.classes);
        let (_, screen) = fit(&prep.dataset(), &split, j.twin.anomaly_threshold, &j.opts, &mut |_| {}).unwrap();
        let s = screen.unwrap();
        assert_eq!(s.flipped, 180);
        assert!(s.recall > 0.5 && s.precision > 0.5, "{s:?}");
    }

    /// `eval --all` scores every row of a file as test rows, with the thresholds
    /// set at training, and `--scores` writes one CSV line per event that ties it
    /// back to its file row.
    #[test]
    fn eval_all_scores_every_row_of_a_new_file_and_writes_per_event_scores() {
        let dir = std::env::temp_dir().join(format!("twinguard-eval-all-{}", std::process::id()));
        let j = job(dir.join("model"), 3000);
        let (artifact, _) = run_train(&j, &mut |_| {}).unwrap();
        // The "new capture": the file's rows 3000.. (the model trained on 0..3000).
        let text = std::fs::read_to_string(wustl()).unwrap();
        let mut lines = text.lines();
        let header = lines.next().unwrap();
        let rest: Vec<&str> = lines.skip(3000).take(1500).collect();
        let capture = dir.join("capture.csv");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&capture, format!("{header}\n{}\n", rest.join("\n"))).unwrap();
        let scores = dir.join("scores.csv");
        let opts = EvalOptions { dataset: Some(capture), all: true, scores: Some(scores.clone()) };
        let twin = twin_config_of(&artifact).unwrap();
        let r = run_eval(artifact.clone(), &opts, &twin, &dir.join("eval"), &mut |_| {}).unwrap();
        assert_eq!(r.rows["test"], 1500);
        assert_eq!((r.rows["train"], r.rows["validation"]), (0, 0));
        let e = &r.models["ensemble"].at_threshold;
        assert_eq!(e.tp + e.fp + e.tn + e.fn_, 1500);
        let csv = std::fs::read_to_string(&scores).unwrap();
        let mut lines = csv.lines();
        assert_eq!(lines.next().unwrap(), "row,split,label,family,rf,svm,lstm,twin,gbdt,ensemble,attack,class");
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
        assert_eq!(rows.len(), 1500);
        assert!(rows.iter().enumerate().all(|(i, r)| r[0] == i.to_string() && r[1] == "test"), "file rows in order, all test");
        // The verdict column agrees with the ensemble score and the stored threshold.
        let thr = artifact.ensemble.threshold;
        for r in &rows {
            let ens: f64 = r[9].parse().unwrap();
            assert_eq!(r[10] == "1", ens >= thr, "{r:?}");
        }
        let flagged = rows.iter().filter(|r| r[10] == "1").count() as u64;
        assert_eq!(flagged, e.tp + e.fp);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A dataset twinguard has never seen, onboarded by files alone (CSV, schema
    /// file with its label taxonomy, feature SQL): trained, evaluated from the model
    /// directory alone, and every class and family named by the files.
    #[test]
    fn a_dataset_onboarded_by_files_alone_trains_and_evaluates() {
        let dir = std::env::temp_dir().join(format!("twinguard-onboard-{}", std::process::id()));
        let lab = crate::testkit::write_lab_dataset(&dir, 3000, 1_760_000_000_000).unwrap();
        let schema = EventSchema::named_or_file(lab.schema.to_str().unwrap()).unwrap();
        assert!(!schema.is_builtin());
        let mut j = job(dir.join("model"), 0);
        j.dataset = DatasetSpec {
            file: lab.csv.clone(),
            schema: schema.id(),
            devices: 1,
            interval_ms: 0,
            limit: None,
            shuffle_seed: None,
            device_column: Some("device".into()),
            time_column: Some("ts".into()),
        };
        j.feature_sql = std::fs::read_to_string(&lab.features).unwrap();
        j.schema = schema;
        let (artifact, report) = run_train(&j, &mut |_| {}).unwrap();
        assert_eq!(artifact.schema, "lab-flows/v1");
        assert!(artifact.schema_definition.as_deref().is_some_and(|d| d.contains("[labels]")));
        assert_eq!(artifact.ensemble.classes, vec!["normal", "DoS-Flood", "Recon-Sweep"]);
        assert_eq!(artifact.family("Recon-Sweep"), "Recon");
        assert_eq!(report.families.classes, vec!["normal", "DoS", "Recon"]);
        let e = &report.models["ensemble"].at_threshold;
        assert!(e.detection_rate > 0.9 && e.fpr < 0.05, "{e:?}");
        // Evaluated from the model directory alone: the schema comes from the model.
        let twin = twin_config_of(&artifact).unwrap();
        let scores = dir.join("scores.csv");
        let opts = EvalOptions { dataset: None, all: false, scores: Some(scores.clone()) };
        let again = run_eval(artifact.clone(), &opts, &twin, &dir.join("eval"), &mut |_| {}).unwrap();
        assert_eq!(again.models["ensemble"].at_threshold, *e, "eval reproduces training's figures");
        let csv = std::fs::read_to_string(&scores).unwrap();
        assert!(csv.lines().any(|l| l.contains(",DoS-Flood,DoS,")) && csv.lines().any(|l| l.contains(",Recon-Sweep,Recon,")), "families from the schema file");
        let _ = std::fs::remove_dir_all(dir);
    }
}
