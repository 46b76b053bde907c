//! A whole federation in one process: the dataset's training and validation rows
//! split over sites, each site training on its own rows only, the aggregator
//! combining what they send with a robust rule. The sites' updates are exactly
//! what would cross the site boundary (moments, trees, hyperplanes, LSTM weight
//! deltas, Newton sums, score histograms); no row, score or twin is shared.
//!
//! Poisoned sites (the last `k`) follow one of the attacks of the evaluation
//! protocol: their labels inverted, one attack class relabelled normal, model
//! replacement (inverted labels and the update boosted ×N), or "a little is
//! enough" (Baruch et al. 2019: colluding sites send the honest mean minus 1.5
//! standard deviations per coordinate).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde::Serialize;

use super::calibrate::{logit, sigmoid, ScoreHistogram};
use super::robust::{aggregate, screen_by_auc, tolerated, Decision, Rule};
use super::stats::Moments;
use super::partition;
pub use super::plan::{FederationPlan, FederationReport, GbdtMode, PoisonKind, SiteSummary, Sites};
pub use super::stacker::federated_stacker;
use crate::boost::Booster;
use crate::ensemble::{Combination, FprInterval, MemberScores, NewtonSums, Stacker, MEMBERS};
use crate::forest::{Forest, ForestParams};
use crate::lstm::{LstmModel, LstmParams};
use crate::svm::Svm;
use crate::train::{class_index, member_scores, screen_labels, sequences, Dataset, Progress, Split, TrainOptions};
use crate::{metrics, Ensemble, Matrix, ModelError};

/// One site's rows and labels (its own copy: a poisoned site's labels are its own).
pub(crate) struct Site {
    pub(crate) train: Vec<usize>,
    pub(crate) validation: Vec<usize>,
    pub(crate) poisoned: bool,
}

/// Folds of each site's validation rows for the out-of-fold stacker scores the
/// threshold is set on.
const OOF_FOLDS: usize = 5;

/// The federation's working state.
pub(crate) struct Fed<'a> {
    pub(crate) prep: &'a Dataset<'a>,
    pub(crate) plan: &'a FederationPlan,
    pub(crate) opts: &'a TrainOptions,
    pub(crate) sites: Vec<Site>,
    /// Labels as each row's site sees them (poisoned sites' rows changed).
    pub(crate) y: Vec<usize>,
    pub(crate) classes: Vec<String>,
    pub(crate) x: Matrix,
    pub(crate) f: usize,
    pub(crate) robust: bool,
    pub(crate) report: FederationReport,
}

pub(crate) fn bytes<T: Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(0, |b| b.len())
}

/// Train the ensemble as a federation of `plan.sites` sites over `split`'s
/// training and validation rows (the test rows belong to no site).
pub fn fit_federated(
    prep: &Dataset<'_>,
    split: &Split,
    twin_threshold: f64,
    opts: &TrainOptions,
    plan: &FederationPlan,
    log: &mut dyn FnMut(Progress<'_>),
) -> Result<(Ensemble, FederationReport), ModelError> {
    let started = Instant::now();
    if plan.sites < 2 {
        return Err(ModelError::Param { name: "sites", why: format!("a federation needs at least 2 sites, got {}", plan.sites) });
    }
    if plan.poisoned >= plan.sites {
        return Err(ModelError::Param { name: "poison", why: format!("{} poisoned sites of {} leaves no honest site", plan.poisoned, plan.sites) });
    }
    let (classes, y) = class_index(prep.classes);
    let sites = make_sites(split, &y, plan)?;
    let summaries = sites
        .iter()
        .enumerate()
        .map(|(i, s)| SiteSummary {
            site: i,
            train_rows: s.train.len(),
            validation_rows: s.validation.len(),
            validation_normal: s.validation.iter().filter(|&&r| y[r] == 0).count(),
            poisoned: s.poisoned,
            bytes: BTreeMap::new(),
        })
        .collect();
    let f = tolerated(plan.sites, plan.sites / 2);
    let mut fed = Fed {
        prep,
        plan,
        opts,
        sites,
        y,
        classes,
        x: Matrix::zeros(0, 0),
        f,
        robust: plan.rule != Rule::Mean,
        report: FederationReport { plan: plan.clone(), tolerated: f, targeted_class: None, sites: summaries, decisions: BTreeMap::new(), seconds: 0.0 },
    };
    log(Progress::Step(&format!(
        "federation: {} sites ({} poisoned: {}), rule {}, f = {f}; train rows per site {:?}",
        plan.sites,
        plan.poisoned,
        plan.poison.name(),
        plan.rule.name(),
        fed.sites.iter().map(|s| s.train.len()).collect::<Vec<_>>()
    )));
    fed.poison_labels();
    if opts.screen {
        fed.screen(log)?;
    }
    let standardizer = fed.round_zero();
    fed.x = standardizer.apply_all(prep.values);
    let forest = fed.forest(log)?;
    let boost = match plan.gbdt {
        GbdtMode::Bagging => fed.boost(log)?,
        GbdtMode::Cyclic => fed.boost_cyclic(log)?,
    };
    let svm = fed.svm(log)?;
    let lstm = fed.lstm(log)?;
    let mut ens = Ensemble::uncombined(standardizer, forest, svm, lstm, Some(boost), prep.names, twin_threshold, fed.classes.clone());
    let all = member_scores(&ens, prep, &fed.x, &sequences(prep.devices, None));
    let (stacker, oof) = fed.stacker(&all, log)?;
    ens.stacker = stacker;
    fed.threshold(&mut ens, &all, &oof, log)?;
    fed.report.seconds = started.elapsed().as_secs_f64();
    Ok((ens, fed.report))
}

/// Split the training and validation rows over the sites.
pub(crate) fn make_sites(split: &Split, y: &[usize], plan: &FederationPlan) -> Result<Vec<Site>, ModelError> {
    let (train, validation) = match plan.split {
        Sites::Dirichlet { alpha } => {
            let class = |r: usize| y[r];
            (
                partition::dirichlet(&split.train, &class, plan.sites, alpha, 20, plan.seed)?,
                partition::dirichlet(&split.validation, &class, plan.sites, alpha, 5, plan.seed ^ 0xFED)?,
            )
        }
        Sites::Periods => (partition::periods(&split.train, plan.sites), partition::periods(&split.validation, plan.sites)),
    };
    Ok(train
        .into_iter()
        .zip(validation)
        .enumerate()
        .map(|(i, (train, validation))| Site { train, validation, poisoned: i >= plan.sites - plan.poisoned })
        .collect())
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

impl Fed<'_> {
    fn poisoned_sites(&self) -> impl Iterator<Item = &Site> {
        self.sites.iter().filter(|s| s.poisoned)
    }

    /// Change the poisoned sites' labels (their own rows only).
    fn poison_labels(&mut self) {
        if self.plan.poisoned == 0 {
            return;
        }
        let mut counts = vec![0usize; self.classes.len()];
        for s in &self.sites {
            for &r in &s.train {
                counts[self.y[r]] += 1;
            }
        }
        let top_attack = (1..counts.len()).max_by_key(|&c| counts[c]).unwrap_or(1);
        if self.plan.poison == PoisonKind::Targeted {
            self.report.targeted_class = Some(self.classes[top_attack].clone());
        }
        let rows: Vec<usize> = self.poisoned_sites().flat_map(|s| s.train.iter().chain(&s.validation).copied()).collect();
        for r in rows {
            self.y[r] = match self.plan.poison {
                PoisonKind::Targeted => if self.y[r] == top_attack { 0 } else { self.y[r] },
                _ => if self.y[r] == 0 { top_attack } else { 0 },
            };
        }
    }

    /// Each site screens its own training labels (the label screen of `train`).
    fn screen(&mut self, log: &mut dyn FnMut(Progress<'_>)) -> Result<(), ModelError> {
        let train_vals: Vec<f64> = self.sites.iter().flat_map(|s| s.train.iter()).flat_map(|&i| self.prep.row(i).iter().copied()).collect();
        let x = crate::Standardizer::fit(&train_vals, self.prep.cols).apply_all(self.prep.values);
        for i in 0..self.sites.len() {
            let split = Split { train: self.sites[i].train.clone(), ..Default::default() };
            let r = screen_labels(&x, &split, &self.classes, &mut self.y, &BTreeSet::new(), self.opts, &mut |_| {});
            match r {
                Ok(r) => log(Progress::Step(&format!("site {i}: label screen relabelled {} rows", r.flagged))),
                Err(e) => log(Progress::Step(&format!("site {i}: label screen skipped ({e})"))),
            }
        }
        Ok(())
    }

    /// Round 0: every site's feature moments, merged into the global standardiser.
    fn round_zero(&mut self) -> crate::Standardizer {
        let parts: Vec<Moments> = self
            .sites
            .iter()
            .map(|s| Moments::of(&s.train.iter().flat_map(|&i| self.prep.row(i).iter().copied()).collect::<Vec<f64>>(), self.prep.cols))
            .collect();
        for (i, p) in parts.iter().enumerate() {
            self.report.sites[i].bytes.insert("moments".into(), bytes(p));
        }
        Moments::merge(&parts.iter().collect::<Vec<_>>()).standardizer()
    }

    /// Cross-site screen of site models (trees, boosters, stackers): every site
    /// scores every other site's model on its own validation rows (its own labels).
    fn screen_trees(&self, score: &dyn Fn(usize, usize) -> f64, fitted: &[bool]) -> Vec<Decision> {
        let n = self.sites.len();
        let table: Vec<Vec<Option<f64>>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        if i == j || !fitted[i] {
                            return None;
                        }
                        let v = &self.sites[j].validation;
                        let s: Vec<f64> = v.iter().map(|&r| score(i, r)).collect();
                        auc(&s, &binary(&self.y, v))
                    })
                    .collect()
            })
            .collect();
        let mut d = screen_by_auc(&table);
        for (i, x) in d.iter_mut().enumerate() {
            if !fitted[i] {
                x.accepted = false;
                x.reason = "no model: its training rows hold one class only".into();
            } else if !self.robust {
                x.accepted = true;
                x.reason = format!("rule mean: accepted unscreened (median AUC {:.4})", x.score);
            }
        }
        d
    }

    fn forest(&mut self, log: &mut dyn FnMut(Progress<'_>)) -> Result<Forest, ModelError> {
        let t0 = Instant::now();
        let per = (self.opts.forest.trees / self.sites.len()).max(1);
        let k = self.classes.len();
        let mut fits: Vec<Option<Forest>> = Vec::new();
        for (i, s) in self.sites.iter().enumerate() {
            let params = ForestParams { trees: per, seed: self.opts.forest.seed ^ (i as u64 + 1).wrapping_mul(0x9E37), ..self.opts.forest.clone() };
            let ys: Vec<usize> = s.train.iter().map(|&r| self.y[r]).collect();
            fits.push(Forest::fit(&self.x.select(&s.train), &ys, k, &params, &mut |_, _| {}).ok());
        }
        let fitted: Vec<bool> = fits.iter().map(Option::is_some).collect();
        let mut proba = vec![0f32; k];
        let x = &self.x;
        let cell = std::cell::RefCell::new(&mut proba);
        let score = |i: usize, r: usize| {
            let mut p = cell.borrow_mut();
            fits[i].as_ref().expect("fitted").predict_proba_row(x.row(r), &mut p);
            f64::from(1.0 - p[0])
        };
        let d = self.screen_trees(&score, &fitted);
        for (i, f) in fits.iter().enumerate() {
            self.report.sites[i].bytes.insert("forest".into(), f.as_ref().map_or(0, bytes));
        }
        let kept: Vec<&Forest> = fits.iter().zip(&d).filter(|(_, d)| d.accepted).filter_map(|(f, _)| f.as_ref()).collect();
        let merged = Forest::merge(&kept).map_err(|_| ModelError::Train("no site's trees were accepted".into()))?;
        log(Progress::Step(&format!("forest: {} trees pooled from {} of {} sites ({per} each) in {:.1} s", merged.trees(), kept.len(), fits.len(), t0.elapsed().as_secs_f64())));
        self.report.decisions.insert("rf".into(), d);
        Ok(merged)
    }

    fn boost(&mut self, log: &mut dyn FnMut(Progress<'_>)) -> Result<Booster, ModelError> {
        let t0 = Instant::now();
        let fits: Vec<Option<Booster>> = self
            .sites
            .iter()
            .map(|s| Booster::fit(&self.x.select(&s.train), &binary(&self.y, &s.train), &self.opts.boost, &mut |_, _| {}).ok())
            .collect();
        let fitted: Vec<bool> = fits.iter().map(Option::is_some).collect();
        let x = &self.x;
        let score = |i: usize, r: usize| f64::from(fits[i].as_ref().expect("fitted").predict_row(x.row(r)));
        let d = self.screen_trees(&score, &fitted);
        for (i, b) in fits.iter().enumerate() {
            self.report.sites[i].bytes.insert("gbdt".into(), b.as_ref().map_or(0, bytes));
        }
        let kept: Vec<&Booster> = fits.iter().zip(&d).filter(|(_, d)| d.accepted).filter_map(|(b, _)| b.as_ref()).collect();
        let avg = Booster::average(&kept).map_err(|_| ModelError::Train("no site's boosted trees were accepted".into()))?;
        log(Progress::Step(&format!("boosted trees: {} sites' boosters averaged in {:.1} s", kept.len(), t0.elapsed().as_secs_f64())));
        self.report.decisions.insert("gbdt".into(), d);
        Ok(avg)
    }

    /// Replace the poisoned sites' vectors per the attack: boosted (`replace`)
    /// or the honest mean − 1.5 sd (`little`). `global` is what a boosted update
    /// is a delta from.
    fn poison_vectors(&self, ups: &mut [Option<Vec<f64>>], global: Option<&[f64]>) {
        let n = self.sites.len() as f64;
        match self.plan.poison {
            PoisonKind::Replace => {
                for (u, s) in ups.iter_mut().zip(&self.sites) {
                    if let (Some(u), true) = (u.as_mut(), s.poisoned) {
                        for (k, v) in u.iter_mut().enumerate() {
                            let g = global.map_or(0.0, |g| g[k]);
                            *v = g + n * (*v - g);
                        }
                    }
                }
            }
            PoisonKind::Little => {
                let honest: Vec<&Vec<f64>> = ups.iter().zip(&self.sites).filter(|(_, s)| !s.poisoned).filter_map(|(u, _)| u.as_ref()).collect();
                if honest.is_empty() {
                    return;
                }
                let d = honest[0].len();
                let m = honest.len() as f64;
                let mean: Vec<f64> = (0..d).map(|k| honest.iter().map(|u| u[k]).sum::<f64>() / m).collect();
                let sd: Vec<f64> = (0..d).map(|k| (honest.iter().map(|u| (u[k] - mean[k]).powi(2)).sum::<f64>() / m).sqrt()).collect();
                let evil: Vec<f64> = (0..d).map(|k| mean[k] - 1.5 * sd[k]).collect();
                for (u, s) in ups.iter_mut().zip(&self.sites) {
                    if s.poisoned && u.is_some() {
                        *u = Some(evil.clone());
                    }
                }
            }
            PoisonKind::Invert | PoisonKind::Targeted => {}
        }
    }

    /// Aggregate the sites' vectors (sites without one are rejected with a reason).
    fn aggregate_vectors(&self, ups: &[Option<Vec<f64>>], what: &str) -> Result<(Vec<f64>, Vec<Decision>), ModelError> {
        let idx: Vec<usize> = (0..ups.len()).filter(|&i| ups[i].is_some()).collect();
        if idx.is_empty() {
            return Err(ModelError::Train(format!("no site could fit the {what}")));
        }
        let vecs: Vec<Vec<f64>> = idx.iter().map(|&i| ups[i].clone().expect("some")).collect();
        let f = self.f.min(tolerated(vecs.len(), self.f));
        let a = aggregate(&vecs, self.plan.rule, f)?;
        let mut decisions: Vec<Decision> = (0..ups.len())
            .map(|site| Decision { site, accepted: false, score: f64::NAN, reason: "no update: its rows hold one class only".into() })
            .collect();
        for (k, mut d) in a.decisions.into_iter().enumerate() {
            d.site = idx[k];
            decisions[idx[k]] = d;
        }
        Ok((a.value, decisions))
    }

    fn svm(&mut self, log: &mut dyn FnMut(Progress<'_>)) -> Result<Svm, ModelError> {
        let t0 = Instant::now();
        let mut ups: Vec<Option<Vec<f64>>> = self
            .sites
            .iter()
            .map(|s| Svm::fit(&self.x.select(&s.train), &binary(&self.y, &s.train), &self.opts.svm).ok().and_then(|m| m.hyperplane()))
            .collect();
        self.poison_vectors(&mut ups, None);
        for (i, u) in ups.iter().enumerate() {
            self.report.sites[i].bytes.insert("svm".into(), u.as_ref().map_or(0, bytes));
        }
        let (w, d) = self.aggregate_vectors(&ups, "linear SVM")?;
        log(Progress::Step(&format!("SVM: hyperplanes of {} sites aggregated ({}) in {:.1} s", d.iter().filter(|d| d.accepted).count(), self.plan.rule.name(), t0.elapsed().as_secs_f64())));
        self.report.decisions.insert("svm".into(), d);
        Svm::from_hyperplane(&w)
    }

    /// FedAvg rounds over weight deltas from the global LSTM: every round the
    /// cross-site screen, then the robust rule on the kept deltas; the decisions of
    /// the last round are reported.
    fn lstm(&mut self, log: &mut dyn FnMut(Progress<'_>)) -> Result<LstmModel, ModelError> {
        let t0 = Instant::now();
        let params = LstmParams { epochs: self.plan.lstm_local_epochs.max(1), ..self.opts.lstm.clone() };
        let mut global = LstmModel::initial(self.x.cols, &params);
        let mut last = Vec::new();
        for round in 1..=self.plan.lstm_rounds.max(1) {
            let g = global.to_vector();
            let mut ups: Vec<Option<Vec<f64>>> = Vec::new();
            for s in &self.sites {
                let mut yb = vec![false; self.x.rows];
                for &r in &s.train {
                    yb[r] = self.y[r] != 0;
                }
                let seqs = sequences(self.prep.devices, Some(&s.train));
                let fit = LstmModel::fit_from(Some(&global), &self.x, &yb, &seqs, &params, &mut |_, _, _| {}).ok();
                ups.push(fit.map(|m| m.to_vector()));
            }
            self.poison_vectors(&mut ups, Some(&g));
            // Cross-site screen first (as for the trees): each site's updated LSTM
            // scores the other sites' validation sequences; then the rule on the
            // deltas of the sites it kept.
            let seqs: Vec<Vec<usize>> = self.sites.iter().flat_map(|s| sequences(self.prep.devices, Some(&s.validation))).collect();
            let scored: Vec<Option<Vec<f32>>> = ups
                .iter()
                .map(|u| u.as_ref().and_then(|u| LstmModel::with_vector(&global, u).ok()).map(|m| m.score_sequences(&self.x, &seqs)))
                .collect();
            let fitted: Vec<bool> = scored.iter().map(Option::is_some).collect();
            let score = |i: usize, r: usize| f64::from(scored[i].as_ref().expect("fitted")[r]);
            let screen = self.screen_trees(&score, &fitted);
            let deltas: Vec<Option<Vec<f64>>> = ups
                .iter()
                .zip(&screen)
                .map(|(u, d)| u.as_ref().filter(|_| d.accepted).map(|u| u.iter().zip(&g).map(|(a, b)| a - b).collect()))
                .collect();
            let (delta, mut d) = self.aggregate_vectors(&deltas, "LSTM")?;
            for (x, sc) in d.iter_mut().zip(&screen) {
                if !sc.accepted {
                    *x = sc.clone();
                }
            }
            let next: Vec<f64> = g.iter().zip(&delta).map(|(a, b)| a + b).collect();
            global = LstmModel::with_vector(&global, &next)?;
            log(Progress::Status(&format!("  LSTM: round {round}/{}   ", self.plan.lstm_rounds)));
            for (i, u) in deltas.iter().enumerate() {
                *self.report.sites[i].bytes.entry("lstm".into()).or_default() += u.as_ref().map_or(0, bytes);
            }
            last = d;
        }
        log(Progress::StatusEnd);
        log(Progress::Step(&format!("LSTM: {} rounds of {} local epochs in {:.1} s", self.plan.lstm_rounds, params.epochs, t0.elapsed().as_secs_f64())));
        self.report.decisions.insert("lstm".into(), last);
        Ok(global)
    }

    /// The stacker by summed Newton steps over the sites' validation rows (global
    /// class weights). Robust: each site also sends its own stacker (6 numbers),
    /// screened like the trees by its AUC on the other sites' rows; sites that
    /// fail are left out of the sums.
    fn stacker(&mut self, all: &[MemberScores], log: &mut dyn FnMut(Progress<'_>)) -> Result<(Stacker, Vec<f64>), ModelError> {
        let parts: Vec<(Vec<MemberScores>, Vec<bool>)> =
            self.sites.iter().map(|s| (s.validation.iter().map(|&r| all[r]).collect(), binary(&self.y, &s.validation))).collect();
        let locals: Vec<Option<Stacker>> = parts.iter().map(|(m, y)| Stacker::fit(m, y, 1e-2).ok()).collect();
        let fitted: Vec<bool> = locals.iter().map(Option::is_some).collect();
        let score = |i: usize, r: usize| locals[i].as_ref().expect("fitted").predict(&all[r]);
        let mut d = self.screen_trees(&score, &fitted);
        for (x, l) in d.iter_mut().zip(&locals) {
            if l.is_none() {
                // Its rows hold one class: no own stacker to screen, its sums count.
                x.accepted = true;
                x.reason = "no own stacker to screen (one class only): its sums count".into();
            }
        }
        let keep: Vec<bool> = d.iter().map(|d| d.accepted).collect();
        let kept: Vec<&(Vec<MemberScores>, Vec<bool>)> = parts.iter().zip(&keep).filter(|(_, k)| **k).map(|(p, _)| p).collect();
        let (stacker, steps) = federated_stacker(&kept.iter().map(|p| (*p).clone()).collect::<Vec<_>>(), 1e-2)?;
        // Out-of-fold scores for the threshold (as central training does): every
        // site splits its validation rows into folds; fold k's rows are scored by
        // the stacker fitted, federated, on the other folds.
        let mut oof = vec![f64::NAN; self.x.rows];
        let mut total_steps = steps;
        for k in 0..OOF_FOLDS {
            let without: Vec<(Vec<MemberScores>, Vec<bool>)> = kept
                .iter()
                .map(|(m, y)| {
                    let idx = (0..m.len()).filter(|i| i % OOF_FOLDS != k);
                    (idx.clone().map(|i| m[i]).collect(), idx.map(|i| y[i]).collect())
                })
                .collect();
            let (fold, n) = federated_stacker(&without, 1e-2)?;
            total_steps += n;
            for s in &self.sites {
                for (_, &r) in s.validation.iter().enumerate().filter(|(i, _)| i % OOF_FOLDS == k) {
                    oof[r] = fold.predict(&all[r]);
                }
            }
        }
        for i in 0..self.sites.len() {
            self.report.sites[i].bytes.insert("stacker".into(), total_steps * bytes(&NewtonSums::zero()));
        }
        log(Progress::Step(&format!(
            "stacker: {steps} federated Newton steps over {} sites' validation rows (+ {} for out-of-fold scores)",
            keep.iter().filter(|&&k| k).count(),
            total_steps - steps
        )));
        self.report.decisions.insert("stacker".into(), d);
        Ok((stacker, oof))
    }

    /// The threshold from the sites' merged histograms of out-of-fold validation
    /// scores (`oof`);
    /// robust: a site most of whose normal rows score above 0.5, and far more of
    /// them than the other sites', is left out of the merge.
    fn threshold(&mut self, ens: &mut Ensemble, all: &[MemberScores], oof: &[f64], log: &mut dyn FnMut(Progress<'_>)) -> Result<(), ModelError> {
        let target = self.opts.target_fpr;
        let hist_of = |s: &Site, get: &dyn Fn(&MemberScores) -> f64| {
            let z: Vec<f64> = s.validation.iter().map(|&r| get(&all[r])).collect();
            ScoreHistogram::of(&z, &binary(&self.y, &s.validation))
        };
        let hists: Vec<ScoreHistogram> = self
            .sites
            .iter()
            .map(|s| ScoreHistogram::of(&s.validation.iter().map(|&r| logit(oof[r])).collect::<Vec<_>>(), &binary(&self.y, &s.validation)))
            .collect();
        let merge = |keep: &[bool], hs: &[ScoreHistogram]| -> Result<ScoreHistogram, ModelError> {
            let mut m = ScoreHistogram::default();
            for (h, _) in hs.iter().zip(keep).filter(|(_, k)| **k) {
                m.add(h)?;
            }
            Ok(m)
        };
        let mut keep = vec![true; hists.len()];
        // The screen's reference is p = 0.5, where the stacker (balanced class
        // weights) finds both classes equally likely: no site controls it. A
        // site whose "normal" rows score above it far more often than the others'
        // (inverted or flipped labels) is left out of the merge.
        let z0 = 0.0;
        let local: Vec<Option<f64>> = hists.iter().map(|h| (h.normals() > 0).then(|| h.normals_above(z0) as f64 / h.normals() as f64)).collect();
        let mut fprs: Vec<f64> = local.iter().flatten().copied().collect();
        fprs.sort_by(f64::total_cmp);
        let med = fprs.get(fprs.len() / 2).copied().unwrap_or(0.0);
        let mut dev: Vec<f64> = fprs.iter().map(|x| (x - med).abs()).collect();
        dev.sort_by(f64::total_cmp);
        // At least one half: a site most of whose normal rows the ensemble calls
        // attacks. An honest site whose period or mix differs can reach a few
        // tens of percent (WUSTL's first validation period: 0.1+), and excluding it
        // loses exactly the normal traffic the threshold must hold on.
        let bound = (med + 3.0 * dev.get(dev.len() / 2).copied().unwrap_or(0.0)).max(0.5);
        let mut decisions = Vec::new();
        for (i, l) in local.iter().enumerate() {
            let (accepted, reason) = match l {
                Some(x) if self.robust && *x > bound => (false, format!("{x:.4} of its normal rows score above 0.5, more than {bound:.4} (median + 3 MAD, at least one half)")),
                Some(x) => (true, format!("{x:.4} of its normal rows score above 0.5")),
                None => (true, "no normal validation rows: attack counts only".into()),
            };
            keep[i] = accepted;
            decisions.push(Decision { site: i, accepted, score: l.unwrap_or(f64::NAN), reason });
        }
        let merged = merge(&keep, &hists)?;
        let z = merged.threshold_for_fpr(target)?;
        ens.threshold = sigmoid(z);
        let law = {
            let (above, n) = (merged.normals_above(z) as usize, merged.normals() as usize);
            let (expected, low, high) = metrics::fpr_interval(above, n, 0.9);
            FprInterval { normals: n, above, expected, low, high, level: 0.9 }
        };
        let mut member_thresholds = BTreeMap::new();
        for m in MEMBERS {
            let get = |s: &MemberScores| if m == "svm" { s.svm } else { logit(s.get(m)) };
            let hs: Vec<ScoreHistogram> = self.sites.iter().map(|s| hist_of(s, &get)).collect();
            let zt = merge(&keep, &hs)?.threshold_for_fpr(target)?;
            member_thresholds.insert(m.to_string(), if m == "svm" { zt } else { sigmoid(zt) });
        }
        for (site, h) in self.report.sites.iter_mut().zip(&hists) {
            site.bytes.insert("histograms".into(), (1 + MEMBERS.len()) * bytes(h));
        }
        log(Progress::Step(&format!(
            "threshold {:.4} for FPR <= {target} from {} sites' merged histograms: {} of {} validation normals above (expected FPR {:.2} %)",
            ens.threshold,
            keep.iter().filter(|&&k| k).count(),
            law.above,
            law.normals,
            100.0 * law.expected
        )));
        ens.calibration = Some(merged);
        ens.combination = Some(Combination { chosen: "stack".into(), folds: 0, candidates: Vec::new(), threshold_fpr: law, member_thresholds });
        self.report.decisions.insert("threshold".into(), decisions);
        Ok(())
    }
}

#[cfg(test)]
#[path = "simulate_tests.rs"]
mod tests;
