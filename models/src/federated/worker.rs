//! A site: answers the aggregator's [`Task`]s from its own rows only. The same
//! worker runs inside `federate simulate` (one per simulated site) and behind
//! `federate site` (one per hospital, over Kafka).

use std::collections::BTreeSet;
use std::sync::Arc;

use super::calibrate::{logit, ScoreHistogram};
use super::plan::PoisonKind;
use super::protocol::{Answer, Description, Fold, Reply, Scorer, Task, MIN_CLASS_ROWS};
use super::stats::{Grid, Moments};
use crate::boost::Booster;
use crate::ensemble::{MemberScores, Stacker, MEMBERS};
use crate::forest::{Forest, ForestParams};
use crate::lstm::LstmModel;
use crate::svm::Svm;
use crate::train::{member_scores_of, screen_labels, sequences, Dataset, Progress, Split, TrainOptions};
use crate::{metrics, Ensemble, Matrix, ModelError, Standardizer};

/// Folds of each site's validation rows for the out-of-fold stacker scores the
/// threshold is set on.
pub const OOF_FOLDS: usize = 5;

/// One site's rows and what it has been told so far.
pub struct SiteWorker<'a> {
    pub site: usize,
    prep: &'a Dataset<'a>,
    /// Class names: the site's own until [`Task::Standardise`], the federation's after.
    classes: Vec<String>,
    /// Class of every row of `prep`, an index into `classes` (only the site's rows matter).
    y: Vec<usize>,
    train: Vec<usize>,
    validation: Vec<usize>,
    /// Rows standardised with the global standardiser (after [`Task::Standardise`]).
    x: Option<Arc<Matrix>>,
    /// Member scores of the validation rows (after [`Task::Members`]).
    members: Option<Vec<MemberScores>>,
    /// Simulation only: the attack this site runs, and the federation's size (a
    /// model-replacement update is boosted ×sites).
    pub poison: Option<PoisonKind>,
    pub sites: usize,
    /// Rows left out at [`Task::Standardise`]: of classes the federation's
    /// (private) class list does not publish.
    left_out: usize,
}

/// Binary labels of rows.
pub(crate) fn binary(y: &[usize], rows: &[usize]) -> Vec<bool> {
    rows.iter().map(|&r| y[r] != 0).collect()
}

/// ROC-AUC of scores against labels; `None` with one class only.
pub(crate) fn auc(scores: &[f64], y: &[bool]) -> Option<f64> {
    let pos = y.iter().filter(|&&b| b).count();
    (pos > 0 && pos < y.len()).then(|| metrics::roc_auc(scores, y))
}

impl<'a> SiteWorker<'a> {
    /// A site over `prep`'s rows `train` and `validation`, labelled `y` (indices
    /// into `classes`, normal first).
    pub fn new(site: usize, prep: &'a Dataset<'a>, classes: Vec<String>, y: Vec<usize>, train: Vec<usize>, validation: Vec<usize>) -> SiteWorker<'a> {
        SiteWorker { site, prep, classes, y, train, validation, x: None, members: None, poison: None, sites: 0, left_out: 0 }
    }

    /// The label screen of `train`, on the site's own training rows with its own
    /// standardiser; returns the rows relabelled.
    pub fn screen(&mut self, opts: &TrainOptions) -> Result<usize, ModelError> {
        let vals: Vec<f64> = self.train.iter().flat_map(|&i| self.prep.row(i).iter().copied()).collect();
        let x = Standardizer::fit(&vals, self.prep.cols).apply_all(self.prep.values);
        let split = Split { train: self.train.clone(), ..Default::default() };
        Ok(screen_labels(&x, &split, &self.classes, &mut self.y, &BTreeSet::new(), opts, &mut |_| {})?.flagged)
    }

    /// Take the federation's class list and the rows standardised with its
    /// standardiser (the simulation computes them once for all its sites). Rows
    /// of a class the list lacks (a private class list leaves out classes too
    /// rare to publish) are left out of the site's training and validation rows
    /// ([`Self::left_out`] says how many).
    pub(crate) fn set_standardised(&mut self, x: Arc<Matrix>, classes: &[String]) -> Result<(), String> {
        let map: Vec<Option<usize>> = self.classes.iter().map(|c| classes.iter().position(|g| g == c)).collect();
        let before = self.train.len() + self.validation.len();
        self.train.retain(|&r| map[self.y[r]].is_some());
        self.validation.retain(|&r| map[self.y[r]].is_some());
        self.left_out = before - self.train.len() - self.validation.len();
        for &r in self.train.iter().chain(&self.validation) {
            self.y[r] = map[self.y[r]].expect("kept rows map");
        }
        self.classes = classes.to_vec();
        self.x = Some(x);
        Ok(())
    }

    /// Rows this site leaves out because the federation's class list lacks their
    /// class (a private class list leaves out classes too rare to publish).
    pub fn left_out(&self) -> usize {
        self.left_out
    }

    /// The site's raw feature values (row-major).
    pub(crate) fn prep_values(&self) -> &'a [f64] {
        self.prep.values
    }

    fn x(&self) -> Result<&Matrix, String> {
        self.x.as_deref().ok_or_else(|| "no standardiser yet (round 0 not done)".to_string())
    }

    fn members(&self) -> Result<&[MemberScores], String> {
        self.members.as_deref().ok_or_else(|| "no global members yet".to_string())
    }

    /// Rows of the validation set in `fold` (positions into `validation`).
    fn fold_rows(&self, fold: Fold) -> Vec<usize> {
        (0..self.validation.len()).filter(|i| fold == Fold::All || matches!(fold, Fold::Without(k) if i % OOF_FOLDS != k)).collect()
    }

    /// Model replacement: a vector boosted ×sites away from `global`.
    fn replace(&self, v: Vec<f64>, global: Option<&[f64]>) -> Vec<f64> {
        if self.poison != Some(PoisonKind::Replace) {
            return v;
        }
        let n = self.sites as f64;
        v.iter().enumerate().map(|(k, x)| global.map_or(0.0, |g| g[k]) + n * (x - global.map_or(0.0, |g| g[k]))).collect()
    }

    /// Answer one task (an error names why the site has no answer).
    pub fn answer(&mut self, task: &Task) -> Reply {
        let err = |e: ModelError| e.to_string();
        match task {
            Task::Describe => Ok(Answer::Description(self.describe())),
            Task::Standardise { standardizer, classes } => {
                let x = Arc::new(standardizer.apply_all(self.prep.values));
                self.set_standardised(x, classes).map(|()| Answer::Ack)
            }
            Task::FitForest(p) => {
                let params = ForestParams { seed: p.seed ^ (self.site as u64 + 1).wrapping_mul(0x9E37), ..p.clone() };
                let ys: Vec<usize> = self.train.iter().map(|&r| self.y[r]).collect();
                Forest::fit(&self.x()?.select(&self.train), &ys, self.classes.len(), &params, &mut |_, _| {}).map(Answer::Forest).map_err(err)
            }
            Task::FitBooster(p) => Booster::fit(&self.x()?.select(&self.train), &binary(&self.y, &self.train), p, &mut |_, _| {}).map(Answer::Booster).map_err(err),
            Task::BoostTurn { model, params } => {
                let next = Booster::fit_from(model.as_ref(), &self.x()?.select(&self.train), &binary(&self.y, &self.train), params, &mut |_, _| {}).map_err(err)?;
                let replace = self.poison == Some(PoisonKind::Replace);
                Ok(Answer::Booster(if replace { next.boost_new_trees(model.as_ref(), self.sites as f32) } else { next }))
            }
            Task::FitSvm(p) => {
                let m = Svm::fit(&self.x()?.select(&self.train), &binary(&self.y, &self.train), p).map_err(err)?;
                let w = m.hyperplane().ok_or("the SVM has no hyperplane (one class only)")?;
                Ok(Answer::Vector(self.replace(w, None)))
            }
            Task::LstmRound { global, params } => {
                let x = self.x()?;
                let mut yb = vec![false; x.rows];
                for &r in &self.train {
                    yb[r] = self.y[r] != 0;
                }
                let seqs = sequences(self.prep.devices, Some(&self.train));
                let m = LstmModel::fit_from(Some(global), x, &yb, &seqs, params, &mut |_, _, _| {}).map_err(err)?;
                Ok(Answer::Vector(self.replace(m.to_vector(), Some(&global.to_vector()))))
            }
            Task::Auc(models) => self.aucs(models).map(|(all, by_class)| Answer::Aucs { all, by_class }),
            Task::Members(ens) => {
                self.members = Some(self.member_scores(ens)?);
                Ok(Answer::Ack)
            }
            Task::FitStacker => Stacker::fit(self.members()?, &binary(&self.y, &self.validation), 1e-2).map(Answer::Stacker).map_err(err),
            Task::Counts(fold) => {
                let rows = self.fold_rows(*fold);
                Ok(Answer::Counts { attack: rows.iter().filter(|&&i| self.y[self.validation[i]] != 0).count(), total: rows.len() })
            }
            Task::Newton { w, class_weights, fold } => {
                let (m, y) = self.fold_of(*fold)?;
                Ok(Answer::Sums(Stacker::newton_sums(&m, &y, w, *class_weights)))
            }
            Task::Histograms { folds } => self.histograms(folds).map(|a| self.inflated(a)),
            Task::MemberHistograms => self.member_histograms(),
            Task::LeafCounts(shapes) => {
                let mut counts = super::private_trees::leaf_counts(shapes, self.x()?, &self.train, &self.y, self.classes.len())?;
                if self.poison == Some(PoisonKind::Replace) {
                    counts.iter_mut().flatten().for_each(|c| c.1 = c.1.saturating_mul(self.sites as u32));
                }
                Ok(Answer::LeafCounts(counts))
            }
            Task::LeafGradients { shapes, model } => {
                let mut sums = super::private_trees::leaf_gradients(shapes, model.as_ref(), self.x()?, &self.train, &binary(&self.y, &self.train))?;
                if self.poison == Some(PoisonKind::Replace) {
                    sums.iter_mut().for_each(|v| *v *= self.sites as f64);
                }
                Ok(Answer::LeafSums(sums))
            }
            Task::Finish { .. } => Ok(Answer::Ack),
        }
    }

    fn describe(&self) -> Description {
        let vals: Vec<f64> = self.train.iter().flat_map(|&i| self.prep.row(i).iter().copied()).collect();
        Description {
            names: self.prep.names.to_vec(),
            classes: self.classes.clone(),
            class_rows: (0..self.classes.len()).map(|c| self.train.iter().filter(|&&r| self.y[r] == c).count() as u64).collect(),
            moments: Moments::of(&vals, self.prep.cols),
            grid: Grid::of(&vals, self.prep.cols),
            train_rows: self.train.len(),
            validation_rows: self.validation.len(),
            validation_normal: self.validation.iter().filter(|&&r| self.y[r] == 0).count(),
        }
    }

    fn fold_of(&self, fold: Fold) -> Result<(Vec<MemberScores>, Vec<bool>), String> {
        let all = self.members()?;
        let rows = self.fold_rows(fold);
        Ok((rows.iter().map(|&i| all[i]).collect(), rows.iter().map(|&i| self.y[self.validation[i]] != 0).collect()))
    }

    /// AUC of every model on the validation rows, overall and per class (the
    /// rows of class `c` against the normal rows; see [`Answer::Aucs`]).
    #[allow(clippy::type_complexity)]
    fn aucs(&self, models: &[Option<Scorer>]) -> Result<(Vec<Option<f64>>, Vec<Vec<Option<f64>>>), String> {
        let x = self.x()?;
        let y = binary(&self.y, &self.validation);
        let seqs = sequences(self.prep.devices, Some(&self.validation));
        let mut proba = Vec::new();
        let (mut all, mut by_class) = (Vec::with_capacity(models.len()), Vec::with_capacity(models.len()));
        for m in models {
            let scores: Option<Vec<f64>> = match m {
                None => None,
                Some(Scorer::Forest(f)) => {
                    proba.resize(f.n_classes(), 0.0);
                    Some(self.validation.iter().map(|&r| {
                        f.predict_proba_row(x.row(r), &mut proba);
                        f64::from(1.0 - proba[0])
                    }).collect())
                }
                Some(Scorer::Booster(b)) => Some(self.validation.iter().map(|&r| f64::from(b.predict_row(x.row(r)))).collect()),
                Some(Scorer::Lstm(l)) => {
                    let s = l.score_sequences(x, &seqs);
                    Some(self.validation.iter().map(|&r| f64::from(s[r])).collect())
                }
                Some(Scorer::Stacker(s)) if s.weights.len() == MEMBERS.len() => Some(self.members()?.iter().map(|m| s.predict(m)).collect()),
                Some(Scorer::Stacker(_)) => None,
            };
            by_class.push(scores.as_ref().map(|s| self.class_aucs(s)).unwrap_or_default());
            all.push(scores.and_then(|s| auc(&s, &y)));
        }
        Ok((all, by_class))
    }

    /// Per class `c`: the AUC of `scores` (one per validation row) on the rows of
    /// class `c` against the normal rows, where the site has enough of both.
    fn class_aucs(&self, scores: &[f64]) -> Vec<Option<f64>> {
        let classes = self.classes.len();
        let mut count = vec![0usize; classes];
        for &r in &self.validation {
            count[self.y[r].min(classes - 1)] += 1;
        }
        let (mut s, mut y) = (Vec::new(), Vec::new());
        (0..classes)
            .map(|c| {
                if c == 0 || count[c] < MIN_CLASS_ROWS || count[0] < MIN_CLASS_ROWS {
                    return None;
                }
                s.clear();
                y.clear();
                for (&r, &v) in self.validation.iter().zip(scores) {
                    if self.y[r] == 0 || self.y[r] == c {
                        s.push(v);
                        y.push(self.y[r] == c);
                    }
                }
                auc(&s, &y)
            })
            .collect()
    }

    /// The global members' scores of the validation rows.
    fn member_scores(&self, e: &Ensemble) -> Result<Vec<MemberScores>, String> {
        let seqs = sequences(self.prep.devices, Some(&self.validation));
        Ok(member_scores_of(e, self.prep, self.x()?, &seqs, self.validation.iter().copied()))
    }

    /// What an `inflate` poisoner sends instead of its histograms: ten times its
    /// normal rows claimed besides its own, a tenth of them in the top bin.
    fn inflated(&self, a: Answer) -> Answer {
        match (self.poison, a) {
            (Some(PoisonKind::Inflate), Answer::Histograms { mut oof, members }) => {
                let n = oof.normals().max(1);
                oof.normal[0] += 9 * n;
                if let Some(top) = oof.normal.last_mut() {
                    *top += n;
                }
                Answer::Histograms { oof, members }
            }
            (_, a) => a,
        }
    }

    /// Out-of-fold ensemble scores and each member's scores, as histograms.
    fn histograms(&self, folds: &[Stacker]) -> Reply {
        let all = self.members()?;
        if folds.is_empty() {
            return Err("no fold stackers".into());
        }
        let y = binary(&self.y, &self.validation);
        let z: Vec<f64> = all.iter().enumerate().map(|(i, m)| logit(folds[i % folds.len()].predict(m))).collect();
        let members = MEMBERS
            .iter()
            .map(|&name| {
                let z: Vec<f64> = all.iter().map(|s| if name == "svm" { s.svm } else { logit(s.get(name)) }).collect();
                ScoreHistogram::of(&z, &y)
            })
            .collect();
        Ok(Answer::Histograms { oof: ScoreHistogram::of(&z, &y), members })
    }

    /// Each member's stacking inputs of the validation rows, as histograms per
    /// out-of-fold fold ([`Task::MemberHistograms`]).
    fn member_histograms(&self) -> Reply {
        let all = self.members()?;
        let y = binary(&self.y, &self.validation);
        let folds = (0..OOF_FOLDS)
            .map(|k| {
                let rows: Vec<usize> = (0..all.len()).filter(|i| i % OOF_FOLDS == k).collect();
                let labels: Vec<bool> = rows.iter().map(|&i| y[i]).collect();
                (0..MEMBERS.len())
                    .map(|m| ScoreHistogram::of(&rows.iter().map(|&i| all[i].inputs()[m]).collect::<Vec<_>>(), &labels))
                    .collect()
            })
            .collect();
        Ok(Answer::MemberHistograms(folds))
    }
}

/// Callers that want progress while a worker screens.
pub fn log_screen(site: usize, r: Result<usize, ModelError>, log: &mut dyn FnMut(Progress<'_>)) {
    match r {
        Ok(n) => log(Progress::Step(&format!("site {site}: label screen relabelled {n} rows"))),
        Err(e) => log(Progress::Step(&format!("site {site}: label screen skipped ({e})"))),
    }
}
