//! Offline training and evaluation on labelled datasets, through the SAME path the
//! stream runs: dataset rows → JSON events → decoder → twin → feature SQL →
//! ensemble. Evaluation scores with the [`Detector`] itself, so `twinguard eval` and
//! a replay through Kafka see identical numbers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use arrow::array::{Array, Float64Array, Int64Array, StringArray};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use twinguard_models::ensemble::{MemberScores, Stacker, Standardizer, MEMBERS};
use twinguard_models::forest::{Forest, ForestParams};
use twinguard_models::lstm::{LstmModel, LstmParams};
use twinguard_models::metrics::{self, Binary, MultiClass};
use twinguard_models::svm::{Svm, SvmParams};
use twinguard_models::{labels, Artifact, Ensemble, Matrix, ModelCard};
use twinguard_operators::detect::feature_relevant;
use twinguard_operators::features::FeatureQuery;
use twinguard_operators::{Detector, TwinConfig};
use twinguard_schemas::{fields, DecodeLimits, Decoder, EventSchema, RawRecord};

use crate::replay::{self, ReplayOptions};
use crate::PipelineError;

/// Events per batch offline (the stream's default `batch.max_records`).
const BATCH: usize = 1024;

/// How rows are split into train / validation / test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SplitKind {
    /// In stream order: train on the earliest rows, validate on the next, test on the latest.
    Temporal,
    /// Per fine class, seeded random (rows are also replayed in a seeded random order).
    Stratified,
}

/// A reproducible split, recorded in the model card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitSpec {
    pub kind: SplitKind,
    pub train: f64,
    pub validation: f64,
    pub seed: u64,
}

impl SplitSpec {
    pub fn describe(&self) -> String {
        let (a, b) = (self.train * 100.0, (self.train + self.validation) * 100.0);
        match self.kind {
            SplitKind::Temporal => format!("temporal (stream order): train [0, {a:.0} %), validation [{a:.0}, {b:.0} %), test [{b:.0}, 100 %)"),
            SplitKind::Stratified => format!(
                "stratified by class, seed {}: train {a:.0} %, validation {:.0} %, test {:.0} % of each class",
                self.seed,
                b - a,
                100.0 - b
            ),
        }
    }

    /// Row indices of each part, given every row's fine class.
    pub fn apply(&self, classes: &[String]) -> Split {
        let n = classes.len();
        let cut = |len: usize| {
            let a = (len as f64 * self.train).round() as usize;
            let b = (len as f64 * (self.train + self.validation)).round() as usize;
            (a.min(len), b.min(len))
        };
        match self.kind {
            SplitKind::Temporal => {
                let (a, b) = cut(n);
                Split { train: (0..a).collect(), validation: (a..b).collect(), test: (b..n).collect() }
            }
            SplitKind::Stratified => {
                let mut by: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
                for (i, c) in classes.iter().enumerate() {
                    by.entry(c.as_str()).or_default().push(i);
                }
                let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
                let mut s = Split::default();
                for idx in by.values_mut() {
                    idx.shuffle(&mut rng);
                    let (a, b) = cut(idx.len());
                    s.train.extend_from_slice(&idx[..a]);
                    s.validation.extend_from_slice(&idx[a..b]);
                    s.test.extend_from_slice(&idx[b..]);
                }
                for v in [&mut s.train, &mut s.validation, &mut s.test] {
                    v.sort_unstable();
                }
                s
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Split {
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
    pub test: Vec<usize>,
}

/// Where the events come from and how they are replayed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetSpec {
    pub file: PathBuf,
    pub schema: String,
    /// Devices the rows are spread over (round-robin).
    pub devices: usize,
    pub interval_ms: i64,
    pub limit: Option<usize>,
    /// Set for stratified splits: rows are replayed in this seeded random order.
    pub shuffle_seed: Option<u64>,
}

/// Fixed start of offline event time (features depend on gaps, never on the epoch).
pub const OFFLINE_START_MS: i64 = 1_700_000_000_000;

impl DatasetSpec {
    /// The dataset's events, in replay order, as `(key, JSON)` records.
    pub fn load(&self, schema: &EventSchema) -> Result<Vec<(String, Vec<u8>)>, PipelineError> {
        let opts = ReplayOptions {
            file: self.file.clone(),
            device_column: None,
            devices: self.devices,
            start_ms: OFFLINE_START_MS,
            interval_ms: self.interval_ms,
            limit: self.limit,
            shuffle_seed: self.shuffle_seed,
        };
        Ok(replay::load(schema, &opts)?.0)
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &std::path::Path) -> Result<String, PipelineError> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|e| PipelineError::Io(format!("cannot read {}: {e}", path.display())))?;
    Ok(format!("{:x}", sha2::Sha256::digest(&bytes)))
}

/// Decode records exactly as the stream does (partition 0, offset = index), in
/// batches; calls `f` with each decoded batch. Rejected records are counted.
fn for_each_batch(
    schema: &EventSchema,
    records: &[(String, Vec<u8>)],
    mut f: impl FnMut(&arrow::record_batch::RecordBatch) -> Result<(), PipelineError>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<usize, PipelineError> {
    let decoder = Decoder::new(schema.clone(), DecodeLimits::default());
    let now = chrono::Utc::now().timestamp_millis();
    let mut rejected = 0;
    for (b, chunk) in records.chunks(BATCH).enumerate() {
        let raw: Vec<RawRecord<'_>> = chunk
            .iter()
            .enumerate()
            .map(|(i, (k, v))| RawRecord { partition: 0, offset: (b * BATCH + i) as i64, key: Some(k.as_bytes()), payload: Some(v) })
            .collect();
        let out = decoder.decode(&raw, now)?;
        rejected += out.rejects.len();
        f(&out.batch)?;
        progress((b * BATCH + chunk.len()).min(records.len()), records.len());
    }
    Ok(rejected)
}

/// Feature vectors of a whole dataset, with labels, in stream order.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub names: Vec<String>,
    pub cols: usize,
    pub values: Vec<f64>,
    /// Fine class per row (`normal` for normal traffic).
    pub classes: Vec<String>,
    pub devices: Vec<String>,
    /// Records the decoder refused (they would go to the DLQ in the stream).
    pub rejected: usize,
}

impl Prepared {
    pub fn rows(&self) -> usize {
        self.classes.len()
    }
    pub fn row(&self, i: usize) -> &[f64] {
        &self.values[i * self.cols..(i + 1) * self.cols]
    }
}

/// Run decode → twin → feature SQL over the records (no model).
pub fn prepare(
    schema: &EventSchema,
    twin: &TwinConfig,
    sql: &str,
    records: &[(String, Vec<u8>)],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Prepared, PipelineError> {
    let mut det = Detector::twin_only(schema, twin.clone());
    let mut query = FeatureQuery::new(sql, schema.arrow_schema(), det.twin().context_schema())?;
    let label_col = schema.fields.iter().position(|f| f.role == twinguard_schemas::Role::Label).map(|i| i + EventSchema::FIRST_FIELD_COLUMN);
    let mut p = Prepared { names: query.names().to_vec(), cols: query.names().len(), values: Vec::new(), classes: Vec::new(), devices: Vec::new(), rejected: 0 };
    p.rejected = for_each_batch(
        schema,
        records,
        |batch| {
            let (_, feats) = det.features_only(&mut query, batch)?;
            let offsets = batch.column(3).as_any().downcast_ref::<Int64Array>().expect("_offset");
            let devs = batch.column(0).as_any().downcast_ref::<StringArray>().expect("device_id");
            let labels = label_col.and_then(|c| batch.column(c).as_any().downcast_ref::<StringArray>());
            let row_of: HashMap<i64, usize> = (0..batch.num_rows()).map(|r| (offsets.value(r), r)).collect();
            for i in 0..feats.len() {
                let r = row_of[&feats.offset[i]];
                p.values.extend_from_slice(feats.row(i));
                p.devices.push(devs.value(r).to_string());
                let raw = labels.filter(|a| !a.is_null(r)).map(|a| a.value(r)).unwrap_or("");
                p.classes.push(if raw.is_empty() { String::new() } else { labels::fine_class(raw) });
            }
            Ok(())
        },
        progress,
    )?;
    if p.classes.iter().any(String::is_empty) {
        return Err(PipelineError::Io(format!("some rows carry no label: schema `{}` needs a `label` field with a source column", schema.id())));
    }
    Ok(p)
}

/// Training settings (all recorded in the model card).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    pub target_fpr: f64,
    pub seed: u64,
    pub forest: ForestParams,
    pub svm: SvmParams,
    pub lstm: LstmParams,
    /// Experiment: flip this fraction of the training labels (simulated poisoning).
    pub flip_labels: f64,
    /// Screen the training labels for poisoning (out-of-fold disagreement) and relabel.
    pub screen: bool,
    /// A training row is suspect when the out-of-fold probability of its given
    /// (binary) label is below this.
    pub screen_threshold: f64,
}

/// What the label screen found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScreenReport {
    pub flipped: usize,
    pub flagged: usize,
    /// Flagged rows that had been flipped.
    pub flagged_and_flipped: usize,
    pub precision: f64,
    pub recall: f64,
}

/// Per-row member scores over the whole dataset in stream order.
fn member_scores(e: &Ensemble, prep: &Prepared, x: &Matrix, seqs: &[Vec<usize>]) -> Vec<MemberScores> {
    let n = prep.rows();
    let lstm = e.lstm.score_sequences(x, seqs);
    let mut proba = vec![0.0f32; e.forest.n_classes()];
    (0..n)
        .map(|i| {
            e.forest.predict_proba_row(x.row(i), &mut proba);
            MemberScores {
                rf: f64::from(1.0 - proba[0]),
                svm: f64::from(e.svm.decision_row(x.row(i))),
                lstm: f64::from(lstm[i]),
                twin: e.twin_score(prep.row(i)),
            }
        })
        .collect()
}

/// Each device's rows in stream order, restricted to `keep` when given.
fn sequences(devices: &[String], keep: Option<&[usize]>) -> Vec<Vec<usize>> {
    let mut by: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let idx: Box<dyn Iterator<Item = usize>> = match keep {
        Some(k) => Box::new(k.iter().copied()),
        None => Box::new(0..devices.len()),
    };
    for i in idx {
        by.entry(devices[i].as_str()).or_default().push(i);
    }
    by.into_values().collect()
}

/// Train the ensemble. Returns it with the screen report (if screening ran).
pub fn fit(
    prep: &Prepared,
    split: &Split,
    twin_threshold: f64,
    opts: &TrainOptions,
    log: &mut dyn FnMut(&str),
) -> Result<(Ensemble, Option<ScreenReport>), PipelineError> {
    let merr = |e: twinguard_models::ModelError| PipelineError::Io(e.to_string());
    // Classes: normal first, then the others sorted.
    let set: BTreeSet<&str> = prep.classes.iter().map(String::as_str).filter(|c| *c != labels::NORMAL).collect();
    let classes: Vec<String> = std::iter::once(labels::NORMAL.to_string()).chain(set.iter().map(|s| s.to_string())).collect();
    let cidx: HashMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let mut y_class: Vec<usize> = prep.classes.iter().map(|c| cidx[c.as_str()]).collect();

    // Simulated poisoning of the training labels (experiment only).
    let mut flipped: BTreeSet<usize> = BTreeSet::new();
    if opts.flip_labels > 0.0 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed ^ 0xF11F);
        let k = (split.train.len() as f64 * opts.flip_labels).round() as usize;
        let mut pick = split.train.clone();
        pick.shuffle(&mut rng);
        for &i in &pick[..k.min(pick.len())] {
            y_class[i] = if y_class[i] == 0 { rng.random_range(1..classes.len().max(2)).min(classes.len() - 1) } else { 0 };
            flipped.insert(i);
        }
        log(&format!("poisoning experiment: flipped {} of {} training labels", flipped.len(), split.train.len()));
    }

    let train_vals: Vec<f64> = split.train.iter().flat_map(|&i| prep.row(i).iter().copied()).collect();
    let standardizer = Standardizer::fit(&train_vals, prep.cols);
    let x = standardizer.apply_all(&prep.values);
    let xt = x.select(&split.train);

    // Label screen: out-of-fold forests; a row whose given label the other folds
    // find improbable is relabelled.
    let mut screen = None;
    if opts.screen {
        let folds = 3;
        let mut order = split.train.clone();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(opts.seed ^ 0x5C4EE7));
        let params = ForestParams { trees: opts.forest.trees.min(40), ..opts.forest.clone() };
        let mut flagged = Vec::new();
        for f in 0..folds {
            let hold: Vec<usize> = order.iter().enumerate().filter(|(k, _)| k % folds == f).map(|(_, &i)| i).collect();
            let fit_on: Vec<usize> = order.iter().enumerate().filter(|(k, _)| k % folds != f).map(|(_, &i)| i).collect();
            let yf: Vec<usize> = fit_on.iter().map(|&i| y_class[i]).collect();
            let forest = Forest::fit(&x.select(&fit_on), &yf, classes.len(), &params, &mut |_, _| {}).map_err(merr)?;
            let mut proba = vec![0.0f32; classes.len()];
            for &i in &hold {
                forest.predict_proba_row(x.row(i), &mut proba);
                let p_attack = f64::from(1.0 - proba[0]);
                let p_given = if y_class[i] == 0 { 1.0 - p_attack } else { p_attack };
                if p_given < opts.screen_threshold {
                    let best = (1..classes.len()).max_by(|&a, &b| proba[a].total_cmp(&proba[b])).unwrap_or(1);
                    flagged.push((i, if y_class[i] == 0 { best } else { 0 }));
                }
            }
            log(&format!("label screen: fold {}/{folds} done", f + 1));
        }
        let hit = flagged.iter().filter(|(i, _)| flipped.contains(i)).count();
        let r = ScreenReport {
            flipped: flipped.len(),
            flagged: flagged.len(),
            flagged_and_flipped: hit,
            precision: if flagged.is_empty() { 0.0 } else { hit as f64 / flagged.len() as f64 },
            recall: if flipped.is_empty() { 0.0 } else { hit as f64 / flipped.len() as f64 },
        };
        log(&format!("label screen: flagged {} rows ({} of them flipped: precision {:.3}, recall {:.3})", r.flagged, hit, r.precision, r.recall));
        for (i, c) in flagged {
            y_class[i] = c;
        }
        screen = Some(r);
    }

    let yt_class: Vec<usize> = split.train.iter().map(|&i| y_class[i]).collect();
    let yt_bin: Vec<bool> = yt_class.iter().map(|&c| c != 0).collect();
    if yt_bin.iter().all(|&b| b) || yt_bin.iter().all(|&b| !b) {
        return Err(PipelineError::Io("the training rows need both normal and attack labels".into()));
    }
    let t0 = Instant::now();
    let forest = Forest::fit(&xt, &yt_class, classes.len(), &opts.forest, &mut |d, n| {
        if d % 10 == 0 || d == n {
            eprint!("\r  random forest: {d}/{n} trees   ");
        }
    })
    .map_err(merr)?;
    eprintln!();
    log(&format!("random forest: {} trees in {:.1} s", opts.forest.trees, t0.elapsed().as_secs_f64()));
    let t0 = Instant::now();
    let svm = Svm::fit(&xt, &yt_bin, &opts.svm).map_err(merr)?;
    log(&format!("SVM: {} support vectors in {:.1} s", svm.support_vectors(), t0.elapsed().as_secs_f64()));
    let t0 = Instant::now();
    let y_bin_all: Vec<bool> = y_class.iter().map(|&c| c != 0).collect();
    let train_seqs = sequences(&prep.devices, Some(&split.train));
    let lstm = LstmModel::fit(&x, &y_bin_all, &train_seqs, &opts.lstm, &mut |e, n, loss| {
        eprint!("\r  LSTM: epoch {e}/{n}, loss {loss:.4}   ");
    })
    .map_err(merr)?;
    eprintln!();
    log(&format!("LSTM: {} epochs in {:.1} s", opts.lstm.epochs, t0.elapsed().as_secs_f64()));

    let twin_feature = prep.names.iter().position(|n| n == "behaviour_distance");
    let mut ens = Ensemble {
        standardizer,
        forest,
        svm,
        lstm,
        stacker: Stacker { weights: vec![0.0; MEMBERS.len()], bias: 0.0 },
        twin_feature,
        twin_threshold,
        threshold: 0.5,
        classes,
        validation_normal: Vec::new(),
        validation_attack: Vec::new(),
    };
    // Stack on validation rows (true labels: the validation set is curated), with
    // every member scored in stream order exactly as the pipeline will.
    let all = member_scores(&ens, prep, &x, &sequences(&prep.devices, None));
    let vm: Vec<MemberScores> = split.validation.iter().map(|&i| all[i]).collect();
    let vy: Vec<bool> = split.validation.iter().map(|&i| prep.classes[i] != labels::NORMAL).collect();
    ens.stacker = Stacker::fit(&vm, &vy, 1e-2).map_err(merr)?;
    let normal_val: Vec<f64> = vm.iter().zip(&vy).filter(|(_, &y)| !y).map(|(m, _)| ens.stacker.predict(m)).collect();
    let attack_val: Vec<f64> = vm.iter().zip(&vy).filter(|(_, &y)| y).map(|(m, _)| ens.stacker.predict(m)).collect();
    ens.threshold = metrics::calibrate_threshold(&normal_val, &attack_val, opts.target_fpr);
    let sorted = |v: &[f64]| {
        let mut s: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        s.sort_by(f32::total_cmp);
        s
    };
    ens.validation_normal = sorted(&normal_val);
    ens.validation_attack = sorted(&attack_val);
    log(&format!(
        "ensemble: stacking weights rf {:.2}, svm {:.2}, lstm {:.2}, twin {:.2}; threshold {:.4} for FPR <= {} on validation",
        ens.stacker.weights[0], ens.stacker.weights[1], ens.stacker.weights[2], ens.stacker.weights[3], ens.threshold, opts.target_fpr
    ));
    Ok((ens, screen))
}

/// One model's figures on the test rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelReport {
    /// Threshold chosen on the validation rows for the target FPR
    /// ([`metrics::calibrate_threshold`]).
    pub at_threshold: Binary,
    /// Detection rate per attack class.
    pub recall_by_class: BTreeMap<String, f64>,
    #[serde(skip)]
    pub scores: Vec<f64>,
}

/// The evaluation report (`report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub model_version: String,
    pub dataset: String,
    pub split: String,
    pub target_fpr: f64,
    pub rows: BTreeMap<String, usize>,
    pub rejected_records: usize,
    pub models: BTreeMap<String, ModelReport>,
    /// Verdict class (normal unless the ensemble flags the event; then the forest's
    /// most probable attack class) against the truth, fine classes.
    pub classes: MultiClass,
    /// The same at family level (CICIoMT2024's 6 families).
    pub families: MultiClass,
    #[serde(skip)]
    pub test_truth: Vec<bool>,
}

/// Scores of every event from the detector with the model (the stream's code path).
#[derive(Debug, Clone, Default)]
pub struct Scores {
    pub members: Vec<MemberScores>,
    pub ensemble: Vec<f64>,
    pub attack: Vec<bool>,
    pub class: Vec<Option<String>>,
    pub truth: Vec<String>,
    pub rejected: usize,
}

/// Run the detector with the model over the records, in order.
pub fn score_stream(
    schema: &EventSchema,
    twin: &TwinConfig,
    artifact: Artifact,
    records: &[(String, Vec<u8>)],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Scores, PipelineError> {
    let mut det = Detector::with_model(schema, twin.clone(), artifact)?;
    let mut s = Scores::default();
    s.rejected = for_each_batch(
        schema,
        records,
        |batch| {
            let (v, _) = det.detect(batch)?;
            let f = |name: &str| v.column_by_name(name).expect("model column").as_any().downcast_ref::<Float64Array>().expect("f64").clone();
            let (ens, rf, svm, lstm, tw) = (f("ensemble_score"), f("rf_score"), f("svm_score"), f("lstm_score"), f("twin_score"));
            let anom = v.column_by_name(fields::ANOMALOUS).expect("anomalous").as_any().downcast_ref::<arrow::array::BooleanArray>().expect("bool").clone();
            let class = v.column_by_name("attack_class").expect("class").as_any().downcast_ref::<StringArray>().expect("utf8").clone();
            let label = v.column_by_name(fields::LABEL).expect("label").as_any().downcast_ref::<StringArray>().expect("utf8").clone();
            for r in 0..v.num_rows() {
                s.members.push(MemberScores { rf: rf.value(r), svm: svm.value(r), lstm: lstm.value(r), twin: tw.value(r) });
                s.ensemble.push(ens.value(r));
                s.attack.push(anom.value(r));
                s.class.push((!class.is_null(r)).then(|| class.value(r).to_string()));
                s.truth.push(if label.is_null(r) { String::new() } else { labels::fine_class(label.value(r)) });
            }
            Ok(())
        },
        progress,
    )?;
    Ok(s)
}

/// Figures on the test rows; single members get thresholds calibrated on the
/// validation rows for the same target FPR as the ensemble.
pub fn evaluate(artifact: &Artifact, scores: &Scores, split: &Split, dataset: &str) -> Report {
    let target = artifact.card.target_fpr;
    let is_attack = |i: usize| scores.truth[i] != labels::NORMAL;
    let vy: Vec<bool> = split.validation.iter().map(|&i| is_attack(i)).collect();
    let ty: Vec<bool> = split.test.iter().map(|&i| is_attack(i)).collect();
    let mut models = BTreeMap::new();
    let member_names: Vec<&str> = std::iter::once("ensemble").chain(MEMBERS).collect();
    for name in member_names {
        let get = |i: usize| if name == "ensemble" { scores.ensemble[i] } else { scores.members[i].get(name) };
        let thr = if name == "ensemble" {
            artifact.ensemble.threshold
        } else {
            let normal: Vec<f64> = split.validation.iter().zip(&vy).filter(|(_, &y)| !y).map(|(&i, _)| get(i)).collect();
            let attack: Vec<f64> = split.validation.iter().zip(&vy).filter(|(_, &y)| y).map(|(&i, _)| get(i)).collect();
            metrics::calibrate_threshold(&normal, &attack, target)
        };
        let ts: Vec<f64> = split.test.iter().map(|&i| get(i)).collect();
        let b = metrics::binary(&ts, &ty, thr);
        let mut by: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (k, &i) in split.test.iter().enumerate() {
            if ty[k] {
                let e = by.entry(scores.truth[i].clone()).or_default();
                e.1 += 1;
                e.0 += u64::from(ts[k] >= thr);
            }
        }
        let recall_by_class = by.into_iter().map(|(c, (hit, n))| (c, hit as f64 / n.max(1) as f64)).collect();
        models.insert(name.to_string(), ModelReport { at_threshold: b, recall_by_class, scores: ts });
    }
    let classes = &artifact.ensemble.classes;
    let cidx: HashMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let truth_c: Vec<usize> = split.test.iter().map(|&i| cidx.get(scores.truth[i].as_str()).copied().unwrap_or(0)).collect();
    let pred_c: Vec<usize> = split
        .test
        .iter()
        .map(|&i| scores.class[i].as_deref().and_then(|c| cidx.get(c).copied()).filter(|_| scores.attack[i]).unwrap_or(0))
        .collect();
    let fams: Vec<String> = classes.iter().map(|c| labels::family(c)).collect::<BTreeSet<_>>().into_iter().collect();
    let mut fams_sorted = vec![labels::NORMAL.to_string()];
    fams_sorted.extend(fams.into_iter().filter(|f| f != labels::NORMAL));
    let fidx: HashMap<&str, usize> = fams_sorted.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let fam_of = |c: usize| fidx[labels::family(&classes[c]).as_str()];
    let mut rows = BTreeMap::new();
    rows.insert("train".to_string(), split.train.len());
    rows.insert("validation".to_string(), split.validation.len());
    rows.insert("test".to_string(), split.test.len());
    Report {
        model_version: artifact.version.clone(),
        dataset: dataset.to_string(),
        split: artifact.card.split.clone(),
        target_fpr: target,
        rows,
        rejected_records: scores.rejected,
        models,
        classes: metrics::multiclass(&truth_c, &pred_c, classes),
        families: metrics::multiclass(
            &truth_c.iter().map(|&c| fam_of(c)).collect::<Vec<_>>(),
            &pred_c.iter().map(|&c| fam_of(c)).collect::<Vec<_>>(),
            &fams_sorted,
        ),
        test_truth: ty,
    }
}

/// The report as a plain-text table.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "model {}  dataset {}", r.model_version, r.dataset);
    let _ = writeln!(s, "split: {}  rows {:?}  target FPR {}", r.split, r.rows, r.target_fpr);
    let _ = writeln!(s, "{:<9} {:>9} {:>8} {:>9} {:>7} {:>8} {:>7} {:>6} {:>6} {:>6} {:>6}", "model", "DR", "FPR", "precision", "F1", "ROC-AUC", "PR-AUC", "TP", "FP", "TN", "FN");
    for (name, m) in &r.models {
        let b = &m.at_threshold;
        let _ = writeln!(
            s,
            "{name:<9} {:>9.4} {:>8.4} {:>9.4} {:>7.4} {:>8.4} {:>7.4} {:>6} {:>6} {:>6} {:>6}",
            b.detection_rate, b.fpr, b.precision, b.f1, b.roc_auc, b.pr_auc, b.tp, b.fp, b.tn, b.fn_
        );
    }
    let _ = writeln!(s, "detection rate per attack class (ensemble):");
    if let Some(m) = r.models.get("ensemble") {
        for (c, v) in &m.recall_by_class {
            let _ = writeln!(s, "  {c:<32} {v:.4}");
        }
    }
    for (title, mc) in [("fine classes", &r.classes), ("families", &r.families)] {
        let _ = writeln!(s, "{title}: macro-F1 {:.4}, accuracy {:.4}; confusion (rows = truth):", mc.macro_f1, mc.accuracy);
        for (i, row) in mc.confusion.iter().enumerate() {
            let _ = writeln!(s, "  {:<32} {:?}  recall {:.4}", mc.classes[i], row, mc.recall[i]);
        }
    }
    s
}

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
    pub fn from_card(a: &Artifact) -> Result<Recipe, PipelineError> {
        serde_json::from_value(a.card.hyper_parameters.clone())
            .map_err(|e| PipelineError::Io(format!("model {}: its card has no usable recipe: {e}", a.version)))
    }
}

/// Train, evaluate on the held-out rows through the detector, save the artifact,
/// model card, report and plots into `job.out`.
pub fn run_train(job: &TrainJob, log: &mut dyn FnMut(&str)) -> Result<(Artifact, Report), PipelineError> {
    let started = Instant::now();
    let records = job.dataset.load(&job.schema)?;
    log(&format!("{}: {} rows as `{}` events", job.dataset.file.display(), records.len(), job.schema.id()));
    let sha = sha256_file(&job.dataset.file)?;
    train_records(job, &records, &sha, started, log)
}

/// [`run_train`] on records already in memory (`dataset_sha256` identifies them).
pub fn train_records(
    job: &TrainJob,
    records: &[(String, Vec<u8>)],
    dataset_sha256: &str,
    started: Instant,
    log: &mut dyn FnMut(&str),
) -> Result<(Artifact, Report), PipelineError> {
    let prep = prepare(&job.schema, &job.twin, &job.feature_sql, records, &mut |d, n| eprint!("\r  features: {d}/{n} events   "))?;
    eprintln!();
    log(&format!("features: {} per event ({} records rejected by the decoder)", prep.cols, prep.rejected));
    let split = job.split.apply(&prep.classes);
    log(&format!(
        "split: {} -> {} train, {} validation, {} test rows",
        job.split.describe(),
        split.train.len(),
        split.validation.len(),
        split.test.len()
    ));
    let (ensemble, screen) = fit(&prep, &split, job.twin.anomaly_threshold, &job.opts, log)?;
    let training_seconds = started.elapsed().as_secs_f64();
    let recipe = Recipe { dataset: job.dataset.clone(), split: job.split.clone(), train: job.opts.clone() };
    let mut artifact = Artifact {
        format: twinguard_models::artifact::ARTIFACT_FORMAT,
        version: String::new(),
        schema: job.schema.id(),
        feature_sql: job.feature_sql.clone(),
        feature_names: prep.names.clone(),
        twin_config: feature_relevant(&job.twin),
        ensemble,
        card: ModelCard {
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
        },
    };
    artifact.card.threshold = artifact.ensemble.threshold;
    let digest = {
        use sha2::Digest;
        let bytes = serde_json::to_vec(&artifact.ensemble).expect("serialises");
        format!("{:x}", sha2::Sha256::digest(&bytes))
    };
    artifact.version = format!("{}-v{}-{}-{}", job.schema.name, job.schema.version, chrono::Utc::now().format("%Y%m%dT%H%M%SZ"), &digest[..8]);
    log(&format!("trained in {training_seconds:.1} s; evaluating on the test rows through the detector"));
    let scores = score_stream(&job.schema, &job.twin, artifact.clone(), records, &mut |d, n| eprint!("\r  scoring: {d}/{n} events   "))?;
    eprintln!();
    let report = evaluate(&artifact, &scores, &split, &artifact.card.dataset);
    artifact.card.test_metrics = summary_json(&report);
    let path = artifact.save(&job.out).map_err(|e| PipelineError::Io(e.to_string()))?;
    write_outputs(&job.out, &artifact, &report)?;
    log(&format!("model {} written to {}", artifact.version, path.display()));
    Ok((artifact, report))
}

/// Per-model headline figures for the model card.
fn summary_json(r: &Report) -> serde_json::Value {
    let models: serde_json::Map<String, serde_json::Value> = r
        .models
        .iter()
        .map(|(k, m)| (k.clone(), serde_json::to_value(&m.at_threshold).expect("serialises")))
        .collect();
    serde_json::json!({
        "models": models,
        "class_macro_f1": r.classes.macro_f1,
        "family_macro_f1": r.families.macro_f1,
    })
}

/// Write `report.json`, `MODEL_CARD.md` and the plots into `dir`.
pub fn write_outputs(dir: &std::path::Path, a: &Artifact, r: &Report) -> Result<(), PipelineError> {
    let io = |p: &std::path::Path, e: std::io::Error| PipelineError::Io(format!("cannot write {}: {e}", p.display()));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let p = dir.join("report.json");
    std::fs::write(&p, serde_json::to_vec_pretty(r).expect("report serialises")).map_err(|e| io(&p, e))?;
    let p = dir.join("MODEL_CARD.md");
    std::fs::write(&p, model_card_md(a, r)).map_err(|e| io(&p, e))?;
    crate::plots::write_all(dir, r).map_err(|e| PipelineError::Io(format!("plots in {}: {e}", dir.display())))?;
    Ok(())
}

fn model_card_md(a: &Artifact, r: &Report) -> String {
    let c = &a.card;
    format!(
        "# Model card: {ver}\n\n\
         - Event schema: `{schema}`; features: {nf} from the feature SQL stored in `model.json`\n\
         - Dataset: `{ds}` (SHA-256 `{sha}`), {rows} events\n\
         - Split: {split}: {tr} train / {va} validation / {te} test rows\n\
         - Members: random forest, SVM, LSTM (burn; stepped per event on the device's twin state), twin behavioural score; \
         stacked by logistic regression on the validation rows\n\
         - Decision threshold {thr:.6} for a target false-positive rate of {fpr} (set on validation normal rows)\n\
         - Label screen: {screen}\n\
         - Trained {created} in {secs:.1} s\n\n\
         ## Held-out test figures (computed by the detector itself)\n\n```\n{table}```\n\n\
         ## Recipe (hyper-parameters)\n\n```json\n{hyper}\n```\n",
        ver = a.version,
        schema = a.schema,
        nf = a.feature_names.len(),
        ds = c.dataset,
        sha = c.dataset_sha256,
        rows = c.rows,
        split = c.split,
        tr = c.train_rows,
        va = c.validation_rows,
        te = c.test_rows,
        thr = c.threshold,
        fpr = c.target_fpr,
        screen = c.poisoning_screen.as_ref().map_or("not applied".to_string(), |s| s.to_string()),
        created = c.created_utc,
        secs = c.training_seconds,
        table = render(r),
        hyper = serde_json::to_string_pretty(&c.hyper_parameters).unwrap_or_default(),
    )
}

/// Evaluate a saved model on its recipe's dataset and split (or another file of the
/// same schema, split the same way).
pub fn run_eval(
    artifact: Artifact,
    dataset: Option<PathBuf>,
    twin: &TwinConfig,
    out: &std::path::Path,
) -> Result<Report, PipelineError> {
    let recipe = Recipe::from_card(&artifact)?;
    let schema = EventSchema::builtin(&artifact.schema).or_else(|_| EventSchema::builtin(&recipe.dataset.schema))?;
    let mut spec = recipe.dataset.clone();
    if let Some(f) = dataset {
        spec.file = f;
    }
    let records = spec.load(&schema)?;
    let scores = score_stream(&schema, twin, artifact.clone(), &records, &mut |d, n| eprint!("\r  scoring: {d}/{n} events   "))?;
    eprintln!();
    let split = recipe.split.apply(&scores.truth);
    let report = evaluate(&artifact, &scores, &split, &spec.file.display().to_string());
    write_outputs(out, &artifact, &report)?;
    Ok(report)
}

/// The twin settings a model was trained with (to run eval and the demo with them).
pub fn twin_config_of(a: &Artifact) -> Result<TwinConfig, PipelineError> {
    let mut v = serde_json::to_value(TwinConfig::default()).expect("serialises");
    if let (Some(obj), Some(m)) = (v.as_object_mut(), a.twin_config.as_object()) {
        for (k, x) in m {
            obj.insert(k.clone(), x.clone());
        }
    }
    serde_json::from_value(v).map_err(|e| PipelineError::Io(format!("model {}: twin settings unreadable: {e}", a.version)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinguard_models::forest::ForestParams;
    use twinguard_models::lstm::LstmParams;
    use twinguard_models::svm::SvmParams;

    fn wustl() -> PathBuf {
        std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../../shared/datasets/wustl-ehms-2020/train.csv")
    }

    fn job(out: PathBuf, rows: usize) -> TrainJob {
        let schema = EventSchema::builtin("wustl-flow-vitals/v1").unwrap();
        TrainJob {
            dataset: DatasetSpec { file: wustl(), schema: schema.id(), devices: 1, interval_ms: 100, limit: Some(rows), shuffle_seed: None },
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
                flip_labels: 0.0,
                screen: false,
                screen_threshold: 0.2,
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

    #[test]
    fn splits_are_disjoint_complete_and_stratified() {
        let classes: Vec<String> = (0..1000).map(|i| if i % 10 == 0 { "a".to_string() } else { "normal".to_string() }).collect();
        for kind in [SplitKind::Temporal, SplitKind::Stratified] {
            let s = SplitSpec { kind, train: 0.6, validation: 0.2, seed: 1 }.apply(&classes);
            let mut all: Vec<usize> = s.train.iter().chain(&s.validation).chain(&s.test).copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..1000).collect::<Vec<_>>(), "{kind:?}");
            if kind == SplitKind::Temporal {
                assert!(s.train.iter().max() < s.validation.iter().min() && s.validation.iter().max() < s.test.iter().min());
            } else {
                assert_eq!(s.test.iter().filter(|&&i| classes[i] == "a").count(), 20);
            }
        }
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
        let (_, screen) = fit(&prep, &split, j.twin.anomaly_threshold, &j.opts, &mut |_| {}).unwrap();
        let s = screen.unwrap();
        assert_eq!(s.flipped, 180);
        assert!(s.recall > 0.5 && s.precision > 0.5, "{s:?}");
    }
}
