//! Fitting the ensemble on a prepared dataset: the label screen, the members,
//! stacking and the decision threshold.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::boost::{BoostParams, Booster};
use crate::combine::{combine, CombineMode};
use crate::ensemble::{Combination, FprInterval};
use crate::ensemble::{MemberScores, Standardizer, MEMBERS};
use crate::forest::{Forest, ForestParams};
use crate::lstm::{LstmModel, LstmParams};
use crate::metrics;
use crate::svm::{Svm, SvmParams};
use crate::{labels, Ensemble, Matrix, ModelError};

/// Feature vectors of a dataset with their labels, in stream order (row-major,
/// `cols` values per row).
#[derive(Debug, Clone, Copy)]
pub struct Dataset<'a> {
    pub names: &'a [String],
    pub cols: usize,
    pub values: &'a [f64],
    /// Fine class per row (`normal` for normal traffic).
    pub classes: &'a [String],
    pub devices: &'a [String],
}

impl Dataset<'_> {
    pub fn rows(&self) -> usize {
        self.classes.len()
    }
    pub fn row(&self, i: usize) -> &[f64] {
        &self.values[i * self.cols..(i + 1) * self.cols]
    }
}

/// Row indices of the train, validation and test parts.
#[derive(Debug, Clone, Default)]
pub struct Split {
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
    pub test: Vec<usize>,
}

/// What a training run reports as it goes, through the callback it is given (a
/// library never writes to stderr; the CLI prints these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress<'a> {
    /// A step is done: one line.
    Step(&'a str),
    /// Where a long step is: replaces the previous status (a terminal shows it on one
    /// line, `\r` first).
    Status(&'a str),
    /// The long step is over: ends the status line.
    StatusEnd,
}

impl std::fmt::Display for Progress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Progress::Step(m) | Progress::Status(m) => f.write_str(m),
            Progress::StatusEnd => Ok(()),
        }
    }
}

/// Training settings (all recorded in the model card).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    pub target_fpr: f64,
    pub seed: u64,
    pub forest: ForestParams,
    pub svm: SvmParams,
    pub lstm: LstmParams,
    /// The boosted member (recipes stored before it existed train with the defaults).
    #[serde(default)]
    pub boost: BoostParams,
    /// Experiment: flip this fraction of the training labels (simulated poisoning).
    pub flip_labels: f64,
    /// Screen the training labels for poisoning (out-of-fold disagreement) and relabel.
    pub screen: bool,
    /// A training row is suspect when the out-of-fold probability of its given
    /// (binary) label is below this.
    pub screen_threshold: f64,
    /// How the members are combined (`--combine`; recipes stored before it existed: auto).
    #[serde(default)]
    pub combine: CombineMode,
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
pub(crate) fn member_scores(e: &Ensemble, prep: &Dataset<'_>, x: &Matrix, seqs: &[Vec<usize>]) -> Vec<MemberScores> {
    member_scores_of(e, prep, x, seqs, 0..prep.rows())
}

/// Member scores of `rows`, in their order; the LSTM steps along `seqs` (which
/// must hold every row of `rows`).
pub(crate) fn member_scores_of(e: &Ensemble, prep: &Dataset<'_>, x: &Matrix, seqs: &[Vec<usize>], rows: impl IntoIterator<Item = usize>) -> Vec<MemberScores> {
    let lstm = e.lstm.score_sequences(x, seqs);
    let mut proba = vec![0.0f32; e.forest.n_classes()];
    rows.into_iter()
        .map(|i| {
            e.forest.predict_proba_row(x.row(i), &mut proba);
            MemberScores {
                rf: f64::from(1.0 - proba[0]),
                svm: f64::from(e.svm.decision_row(x.row(i))),
                lstm: f64::from(lstm[i]),
                twin: e.twin_score(prep.row(i)),
                gbdt: e.boost.as_ref().map_or(0.5, |b| f64::from(b.predict_row(x.row(i)))),
            }
        })
        .collect()
}

/// Each device's rows in stream order, restricted to `keep` when given.
pub(crate) fn sequences(devices: &[String], keep: Option<&[usize]>) -> Vec<Vec<usize>> {
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

/// Label screen: out-of-fold forests over the training rows; a row whose given
/// label the other folds find improbable is relabelled in `y_class`.
pub(crate) fn screen_labels(
    x: &Matrix,
    split: &Split,
    classes: &[String],
    y_class: &mut [usize],
    flipped: &BTreeSet<usize>,
    opts: &TrainOptions,
    log: &mut dyn FnMut(Progress<'_>),
) -> Result<ScreenReport, ModelError> {
    let folds = 3;
    let mut order = split.train.clone();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(opts.seed ^ 0x5C4EE7));
    let params = ForestParams { trees: opts.forest.trees.min(40), ..opts.forest.clone() };
    let mut flagged = Vec::new();
    for f in 0..folds {
        let hold: Vec<usize> = order.iter().enumerate().filter(|(k, _)| k % folds == f).map(|(_, &i)| i).collect();
        let fit_on: Vec<usize> = order.iter().enumerate().filter(|(k, _)| k % folds != f).map(|(_, &i)| i).collect();
        let yf: Vec<usize> = fit_on.iter().map(|&i| y_class[i]).collect();
        let forest = Forest::fit(&x.select(&fit_on), &yf, classes.len(), &params, &mut |_, _| {})?;
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
        log(Progress::Step(&format!("label screen: fold {}/{folds} done", f + 1)));
    }
    let hit = flagged.iter().filter(|(i, _)| flipped.contains(i)).count();
    let r = ScreenReport {
        flipped: flipped.len(),
        flagged: flagged.len(),
        flagged_and_flipped: hit,
        precision: if flagged.is_empty() { 0.0 } else { hit as f64 / flagged.len() as f64 },
        recall: if flipped.is_empty() { 0.0 } else { hit as f64 / flipped.len() as f64 },
    };
    log(Progress::Step(&format!("label screen: flagged {} rows ({} of them flipped: precision {:.3}, recall {:.3})", r.flagged, hit, r.precision, r.recall)));
    for (i, c) in flagged {
        y_class[i] = c;
    }
    Ok(r)
}

/// The class list (normal first, then the others sorted) and each row's index in it.
pub fn class_index(row_classes: &[String]) -> (Vec<String>, Vec<usize>) {
    let set: BTreeSet<&str> = row_classes.iter().map(String::as_str).filter(|c| *c != labels::NORMAL).collect();
    let classes: Vec<String> = std::iter::once(labels::NORMAL.to_string()).chain(set.iter().map(|s| s.to_string())).collect();
    let cidx: HashMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let y = row_classes.iter().map(|c| cidx[c.as_str()]).collect();
    (classes, y)
}

/// Train the ensemble. Returns it with the screen report (if screening ran).
pub fn fit(
    prep: &Dataset<'_>,
    split: &Split,
    twin_threshold: f64,
    opts: &TrainOptions,
    log: &mut dyn FnMut(Progress<'_>),
) -> Result<(Ensemble, Option<ScreenReport>), ModelError> {
    let (classes, mut y_class) = class_index(prep.classes);

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
        log(Progress::Step(&format!("poisoning experiment: flipped {} of {} training labels", flipped.len(), split.train.len())));
    }

    let train_vals: Vec<f64> = split.train.iter().flat_map(|&i| prep.row(i).iter().copied()).collect();
    let standardizer = Standardizer::fit(&train_vals, prep.cols);
    let x = standardizer.apply_all(prep.values);
    let xt = x.select(&split.train);

    let screen = if opts.screen { Some(screen_labels(&x, split, &classes, &mut y_class, &flipped, opts, log)?) } else { None };

    let yt_class: Vec<usize> = split.train.iter().map(|&i| y_class[i]).collect();
    let yt_bin: Vec<bool> = yt_class.iter().map(|&c| c != 0).collect();
    if yt_bin.iter().all(|&b| b) || yt_bin.iter().all(|&b| !b) {
        return Err(ModelError::Data("the training rows need both normal and attack labels".into()));
    }
    let t0 = Instant::now();
    let forest = Forest::fit(&xt, &yt_class, classes.len(), &opts.forest, &mut |d, n| {
        if d % 10 == 0 || d == n {
            log(Progress::Status(&format!("  random forest: {d}/{n} trees   ")));
        }
    })
    ?;
    log(Progress::StatusEnd);
    log(Progress::Step(&format!("random forest: {} trees in {:.1} s", opts.forest.trees, t0.elapsed().as_secs_f64())));
    let t0 = Instant::now();
    let boost = Booster::fit(&xt, &yt_bin, &opts.boost, &mut |r, n| {
        if r % 25 == 0 {
            log(Progress::Status(&format!("  boosted trees: round {r}/{n}   ")));
        }
    })?;
    log(Progress::StatusEnd);
    log(Progress::Step(&format!("boosted trees: {} rounds (early stopping) in {:.1} s", boost.rounds(), t0.elapsed().as_secs_f64())));
    let t0 = Instant::now();
    let svm = Svm::fit(&xt, &yt_bin, &opts.svm)?;
    log(Progress::Step(&format!("SVM: {} support vectors in {:.1} s", svm.support_vectors(), t0.elapsed().as_secs_f64())));
    let t0 = Instant::now();
    let y_bin_all: Vec<bool> = y_class.iter().map(|&c| c != 0).collect();
    let train_seqs = sequences(prep.devices, Some(&split.train));
    let lstm = LstmModel::fit(&x, &y_bin_all, &train_seqs, &opts.lstm, &mut |e, n, loss| {
        log(Progress::Status(&format!("  LSTM: epoch {e}/{n}, loss {loss:.4}   ")));
    })
    ?;
    log(Progress::StatusEnd);
    log(Progress::Step(&format!("LSTM: {} epochs in {:.1} s", opts.lstm.epochs, t0.elapsed().as_secs_f64())));

    let mut ens = Ensemble::uncombined(standardizer, forest, svm, lstm, Some(boost), prep.names, twin_threshold, classes);
    stack(&mut ens, prep, &x, split, opts, log)?;
    Ok((ens, screen))
}

/// Combine the members on the validation rows (true labels: the validation set is
/// curated), every member scored in stream order exactly as the pipeline will: the
/// stacker or the best member alone, chosen out of fold ([`combine`]), and the
/// threshold for the target FPR set conformally on its (out-of-fold) scores.
fn stack(ens: &mut Ensemble, prep: &Dataset<'_>, x: &Matrix, split: &Split, opts: &TrainOptions, log: &mut dyn FnMut(Progress<'_>)) -> Result<(), ModelError> {
    const FOLDS: usize = 5;
    let all = member_scores(ens, prep, x, &sequences(prep.devices, None));
    let vm: Vec<MemberScores> = split.validation.iter().map(|&i| all[i]).collect();
    let vy: Vec<bool> = split.validation.iter().map(|&i| prep.classes[i] != labels::NORMAL).collect();
    let c = combine(&vm, &vy, opts.target_fpr, FOLDS, 1e-2, opts.combine)?;
    ens.stacker = c.stacker;
    let normal_val: Vec<f64> = c.scores.iter().zip(&vy).filter(|(_, &y)| !y).map(|(s, _)| *s).collect();
    let attack_val: Vec<f64> = c.scores.iter().zip(&vy).filter(|(_, &y)| y).map(|(s, _)| *s).collect();
    ens.threshold = metrics::calibrate_threshold(&normal_val, &attack_val, opts.target_fpr);
    let sorted = |v: &[f64]| {
        let mut s: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        s.sort_by(f32::total_cmp);
        s
    };
    ens.validation_normal = sorted(&normal_val);
    ens.validation_attack = sorted(&attack_val);
    let law = FprInterval::of(&normal_val, ens.threshold, 0.9);
    let table: Vec<String> = c.candidates.iter().map(|k| format!("{} {:.3} at {:.2} %", k.name, k.detection_rate, 100.0 * k.fpr)).collect();
    log(Progress::Step(&format!("combination, out of {FOLDS} folds on the validation rows (DR at FPR): {}", table.join(", "))));
    let w = &ens.stacker.weights;
    log(Progress::Step(&if c.chosen == "stack" {
        format!("ensemble: stacked, weights rf {:.2}, svm {:.2}, lstm {:.2}, twin {:.2}, gbdt {:.2}", w[0], w[1], w[2], w[3], w[4])
    } else if c.chosen == "any" {
        let used: Vec<&str> = MEMBERS.iter().zip(&ens.stacker.any).filter(|(_, o)| o.is_some()).map(|(m, _)| *m).collect();
        format!("ensemble: any member ({}), each against its own threshold (--combine any)", used.join(", "))
    } else {
        format!("ensemble: the {} member alone (stacking did not beat it out of fold)", c.chosen)
    }));
    log(Progress::Step(&format!(
        "threshold {:.4} for FPR <= {}: {} of {} validation normals above; FPR on new normal events {:.2} % expected, 90 % interval {:.2}-{:.2} %",
        ens.threshold,
        opts.target_fpr,
        law.above,
        law.normals,
        100.0 * law.expected,
        100.0 * law.low,
        100.0 * law.high
    )));
    let member_thresholds = MEMBERS
        .iter()
        .map(|m| (m.to_string(), metrics::calibrate_labelled(vm.iter().zip(&vy).map(|(s, &y)| (s.get(m), y)), opts.target_fpr)))
        .collect();
    ens.combination = Some(Combination { chosen: c.chosen, folds: FOLDS, candidates: c.candidates, threshold_fpr: law, member_thresholds, site_thresholds: Default::default() });
    Ok(())
}
