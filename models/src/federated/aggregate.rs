//! The aggregator: drives a federation's rounds over a [`Link`] and combines what
//! the sites answer with robust rules. It holds no row, label or score of any
//! site: only the answers of [`super::protocol`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use super::calibrate::{every_site_threshold, sigmoid, site_thresholds, EverySite, ScoreHistogram};
use super::plan::{FederationPlan, FederationReport, GbdtMode, SiteSummary, ThresholdRule};
use super::private_trees::Cuts;
use super::privacy::{clip, dp_threshold_caution, fixed_stacker, gaussian_aggregate, private_classes, private_standardizer, private_threshold, MemberPrivacy, PrivacyReport};
use super::protocol::{expect, Answer, Description, Fold, Link, Reply, Scorer, Task};
use super::robust::{aggregate, flagged, flagged_bound, screen_by_auc, screen_by_class, tolerated, Decision, Rule, WRONG_LABELS_AUC};
use super::stacker::federated_stacker_with;
use super::stats::{Grid, Moments};
use super::worker::OOF_FOLDS;
use crate::ensemble::{Candidate, Combination, FprInterval, NewtonSums, Stacker, MEMBERS};
use crate::forest::{Forest, ForestParams};
use crate::lstm::{LstmModel, LstmParams};
use crate::svm::Svm;
use crate::train::{Progress, TrainOptions};
use crate::{labels, Ensemble, ModelError};

/// The aggregator's working state.
pub(crate) struct Aggregator<'l> {
    pub(crate) link: &'l mut dyn Link,
    pub(crate) plan: &'l FederationPlan,
    pub(crate) opts: &'l TrainOptions,
    /// Sites taking part (they answered round 0 with the federation's features,
    /// and have not been expelled).
    pub(crate) active: Vec<usize>,
    /// Sites expelled from the rest of the federation, and why (the forest
    /// screen found their labels inverted or an attack class relabelled).
    pub(crate) expelled: BTreeMap<usize, String>,
    /// The federation's classes (normal first), from round 0.
    pub(crate) classes: Vec<String>,
    pub(crate) f: usize,
    pub(crate) robust: bool,
    pub(crate) report: FederationReport,
    /// Where private trees may cut (round 0, with DP only).
    cuts: Option<Cuts>,
}

/// Run a federation over `link`: round 0, every member, the stacker and the
/// threshold. Returns the global ensemble and what was decided on every update.
pub fn federate(link: &mut dyn Link, plan: &FederationPlan, opts: &TrainOptions, twin_threshold: f64, log: &mut dyn FnMut(Progress<'_>)) -> Result<(Ensemble, FederationReport), ModelError> {
    let started = Instant::now();
    let n = link.sites();
    if n < 2 {
        return Err(ModelError::Param { name: "sites", why: format!("a federation needs at least 2 sites, got {n}") });
    }
    let f = tolerated(n, n / 2);
    let any = opts.combine == crate::combine::CombineMode::Any;
    if let Some(dp) = &plan.dp {
        dp.validate()?;
    }
    let privacy = plan.dp.as_ref().map(|_| PrivacyReport::new());
    let report = FederationReport { plan: plan.clone(), tolerated: f, targeted_class: None, sites: Vec::new(), features: Vec::new(), decisions: BTreeMap::new(), privacy, seconds: 0.0, site_tests: Vec::new() };
    let mut agg = Aggregator { link, plan, opts, active: (0..n).collect(), expelled: BTreeMap::new(), classes: Vec::new(), f, robust: plan.rule != Rule::Mean, report, cuts: None };
    let (standardizer, names, classes) = agg.round_zero(log)?;
    // With DP the trees are drawn without rows and filled with noisy sums.
    let (forest, boost) = match agg.cuts.take() {
        Some(cuts) => (agg.private_forest(&cuts, classes.len(), log)?, agg.private_boost(&cuts, log)?),
        None => (agg.forest(classes.len(), log)?, if plan.gbdt == GbdtMode::Bagging { agg.boost(log)? } else { agg.boost_cyclic(log)? }),
    };
    let svm = agg.svm(log)?;
    let lstm = agg.lstm(standardizer.mean.len(), log)?;
    let mut ens = Ensemble::uncombined(standardizer, forest, svm, lstm, Some(boost), &names, twin_threshold, classes);
    agg.ask(&Task::Members(Box::new(ens.clone())))?;
    let (stacker, folds, candidates) = if any {
        agg.any_member(log)?
    } else {
        let (stacker, folds) = agg.stacker(log)?;
        (stacker, folds, Vec::new())
    };
    ens.stacker = stacker;
    agg.threshold(&mut ens, folds, candidates, log)?;
    agg.report.seconds = started.elapsed().as_secs_f64();
    for (s, b) in agg.report.sites.iter_mut().zip(agg.link.bytes()) {
        s.bytes = b;
    }
    Ok((ens, agg.report))
}

impl Aggregator<'_> {
    /// Ask every active site; one reply per site of the plan (inactive sites: an error).
    pub(crate) fn ask(&mut self, task: &Task) -> Result<Vec<Reply>, ModelError> {
        let active = self.active.clone();
        self.ask_some(&active, task)
    }

    /// Ask some sites; one reply per site of the plan (sites not asked: an error).
    pub(crate) fn ask_some(&mut self, to: &[usize], task: &Task) -> Result<Vec<Reply>, ModelError> {
        let got = self.link.ask(to, task)?;
        let mut out: Vec<Reply> = (0..self.link.sites()).map(|i| Err(self.absent(i))).collect();
        for (&i, r) in to.iter().zip(got) {
            out[i] = r;
        }
        Ok(out)
    }

    /// Why site `i` is not asked.
    pub(crate) fn absent(&self, i: usize) -> String {
        match self.expelled.get(&i) {
            Some(why) => format!("expelled {why}"),
            None => "not taking part in the federation".to_string(),
        }
    }

    /// Round 0: every site's feature names, classes and moments; the global
    /// standardiser (the moments' merge equals the fit on the union) and class list.
    fn round_zero(&mut self, log: &mut dyn FnMut(Progress<'_>)) -> Result<(crate::Standardizer, Vec<String>, Vec<String>), ModelError> {
        let replies = self.ask(&Task::Describe)?;
        let descs: Vec<Result<Description, String>> = replies.iter().map(|r| expect(r, "a description", |a| if let Answer::Description(d) = a { Some(d.clone()) } else { None })).collect();
        // The features most sites have are the federation's; a site with others is left out.
        let mut votes: BTreeMap<&[String], usize> = BTreeMap::new();
        for d in descs.iter().flatten() {
            *votes.entry(&d.names).or_default() += 1;
        }
        let names: Vec<String> = votes.iter().max_by_key(|(_, &c)| c).map(|(n, _)| n.to_vec()).ok_or_else(|| ModelError::Train("no site answered round 0".into()))?;
        let mut decisions = Vec::new();
        let mut classes: BTreeSet<String> = BTreeSet::new();
        let mut class_rows: BTreeMap<String, u64> = BTreeMap::new();
        let mut parts = Vec::new();
        self.active.clear();
        for (i, d) in descs.iter().enumerate() {
            let (accepted, reason) = match d {
                Err(e) => (false, format!("no description: {e}")),
                Ok(d) if d.names != names => (false, format!("its {} features are not the federation's {}", d.names.len(), names.len())),
                Ok(d) => {
                    classes.extend(d.classes.iter().filter(|c| *c != labels::NORMAL).cloned());
                    for (c, n) in d.classes.iter().zip(d.class_rows.iter().chain(std::iter::repeat(&0))).filter(|(c, _)| *c != labels::NORMAL) {
                        *class_rows.entry(c.clone()).or_default() += n;
                    }
                    parts.push((&d.moments, &d.grid));
                    self.active.push(i);
                    (true, format!("{} training rows", d.train_rows))
                }
            };
            decisions.push(Decision { site: i, accepted, score: f64::NAN, reason });
            self.report.sites.push(match d {
                Ok(d) => SiteSummary { site: i, train_rows: d.train_rows, validation_rows: d.validation_rows, validation_normal: d.validation_normal, poisoned: false, bytes: BTreeMap::new() },
                Err(_) => SiteSummary { site: i, train_rows: 0, validation_rows: 0, validation_normal: 0, poisoned: false, bytes: BTreeMap::new() },
            });
        }
        if self.active.len() < 2 {
            return Err(ModelError::Train(format!("round 0: {} site(s) can take part; a federation needs 2", self.active.len())));
        }
        let standardizer = match &self.plan.dp {
            None => Moments::merge(&parts.iter().map(|p| p.0).collect::<Vec<_>>()).standardizer(),
            Some(dp) => {
                // Record-level DP: from the noisy sum of the sites' grid counts,
                // never from their exact moments.
                let dense = Grid::merge(&parts.iter().map(|p| p.1).collect::<Vec<_>>(), names.len()).map_err(|e| ModelError::Data(format!("round 0: a site's grid counts: {e}")))?;
                let (s, cost, noisy) = private_standardizer(&dense, dp.moments_epsilon, dp.delta)?;
                self.report.privacy.get_or_insert_with(PrivacyReport::new).members.insert("standardiser".into(), cost);
                self.cuts = Some(Cuts::of(&noisy, &s));
                s
            }
        };
        let classes: Vec<String> = match &self.plan.dp {
            None => std::iter::once(labels::NORMAL.to_string()).chain(classes).collect(),
            Some(dp) => {
                // Record-level DP: a class is published only when its noisy row
                // count clears the bar; the others' rows stay out of training.
                let (kept, cost) = private_classes(&class_rows, dp.classes_epsilon, dp.delta)?;
                if kept.len() < class_rows.len() {
                    log(Progress::Step(&format!("class list: {} of {} attack classes too rare to publish privately; their rows are left out at the sites that hold them", class_rows.len() - kept.len(), class_rows.len())));
                }
                self.report.privacy.get_or_insert_with(PrivacyReport::new).members.insert("classes".into(), cost);
                std::iter::once(labels::NORMAL.to_string()).chain(kept).collect()
            }
        };
        self.classes = classes.clone();
        self.report.decisions.insert("round0".into(), decisions);
        self.report.features = names.clone();
        log(Progress::Step(&format!(
            "federation: {} of {} sites take part, rule {}, f = {}; train rows per site {:?}; {} classes",
            self.active.len(),
            self.link.sites(),
            self.plan.rule.name(),
            self.f,
            self.report.sites.iter().map(|s| s.train_rows).collect::<Vec<_>>(),
            classes.len()
        )));
        for (i, r) in self.ask(&Task::Standardise { standardizer: standardizer.clone(), classes: classes.clone() })?.into_iter().enumerate() {
            if let (Err(e), true) = (r, self.active.contains(&i)) {
                log(Progress::Step(&format!("site {i} leaves the federation: {e}")));
                self.active.retain(|&a| a != i);
            }
        }
        Ok((standardizer, names, classes))
    }

    /// Cross-site screen of site models (trees, boosters, LSTMs, stackers): every
    /// site scores every other site's model on its own validation rows.
    pub(crate) fn screen_models(&mut self, models: Vec<Option<Scorer>>) -> Result<Vec<Decision>, ModelError> {
        Ok(self.screen_models_why(models)?.0)
    }

    /// [`Self::screen_models`], and per site the evidence that its labels are
    /// wrong: its model's median AUC on the other sites' rows under
    /// [`WRONG_LABELS_AUC`] (inverted), or a model the overall screen accepts
    /// that ranks one attack class no higher than normal traffic, far below the
    /// other sites' ([`screen_by_class`]: that class relabelled). Trees that are
    /// merely no better than chance (0.5: a site of one class) are rejected, not
    /// taken as evidence.
    fn screen_models_why(&mut self, models: Vec<Option<Scorer>>) -> Result<(Vec<Decision>, Vec<Option<String>>), ModelError> {
        let fitted: Vec<bool> = models.iter().map(Option::is_some).collect();
        let replies = self.ask(&Task::Auc(models))?;
        let cols: Vec<Option<(Vec<Option<f64>>, Vec<Vec<Option<f64>>>)>> =
            replies.iter().map(|r| expect(r, "AUCs", |a| if let Answer::Aucs { all, by_class } = a { Some((all.clone(), by_class.clone())) } else { None }).ok()).collect();
        let n = fitted.len();
        let cell = |i: usize, j: usize| if i == j || !fitted[i] { None } else { cols[j].as_ref() };
        let table: Vec<Vec<Option<f64>>> = (0..n).map(|i| (0..n).map(|j| cell(i, j).and_then(|c| c.0.get(i).copied().flatten())).collect()).collect();
        let by_class: Vec<Vec<Vec<Option<f64>>>> =
            (0..n).map(|i| (0..n).map(|j| cell(i, j).and_then(|c| c.1.get(i).cloned()).unwrap_or_default()).collect()).collect();
        let mut d = screen_by_auc(&table);
        let flags = screen_by_class(&by_class, &self.classes);
        let mut wrong = vec![None; n];
        for (i, x) in d.iter_mut().enumerate() {
            if !fitted[i] {
                x.accepted = false;
                x.reason = if self.active.contains(&i) { "no model: its training rows hold one class only".into() } else { self.absent(i) };
            } else if !self.robust {
                x.accepted = true;
                x.reason = format!("rule mean: accepted unscreened (median AUC {:.4})", x.score);
            } else if let Some(why) = flags[i].as_ref().filter(|_| x.accepted) {
                // Sound on the rest, below chance on one class: that class relabelled.
                x.accepted = false;
                x.reason = why.clone();
                wrong[i] = Some(why.clone());
            } else if !x.accepted && x.score < WRONG_LABELS_AUC {
                wrong[i] = Some(x.reason.clone());
            }
        }
        Ok((d, wrong))
    }

    /// Replies' models of one kind, `None` where a site has none.
    fn models<T>(replies: &[Reply], pick: impl Fn(&Answer) -> Option<T>) -> Vec<Option<T>> {
        replies.iter().map(|r| r.as_ref().ok().and_then(&pick)).collect()
    }

    fn forest(&mut self, k: usize, log: &mut dyn FnMut(Progress<'_>)) -> Result<Forest, ModelError> {
        let t0 = Instant::now();
        let per = (self.opts.forest.trees / self.active.len()).max(1);
        let params = ForestParams { trees: per, ..self.opts.forest.clone() };
        let fits = Self::models(&self.ask(&Task::FitForest(params))?, |a| if let Answer::Forest(f) = a { Some(f.clone()) } else { None });
        let (mut d, wrong) = self.screen_models_why(fits.iter().map(|f| f.clone().map(Scorer::Forest)).collect())?;
        for (x, f) in d.iter_mut().zip(&fits) {
            if let Some(f) = f.as_ref().filter(|f| f.n_classes() != k) {
                x.accepted = false;
                x.reason = format!("its trees predict {} classes, the federation has {k}", f.n_classes());
            }
        }
        // A site whose trees show its labels inverted, or an attack class
        // relabelled as normal, trained everything else on those labels too: it
        // leaves the federation (its boosting turns, hyperplane, LSTM updates,
        // stacker sums and score histograms would carry the same labels).
        for (i, why) in wrong.into_iter().enumerate() {
            if let Some(why) = why {
                self.expel(i, "the forest screen", why, log);
            }
        }
        let kept: Vec<&Forest> = fits.iter().zip(&d).filter(|(_, d)| d.accepted).filter_map(|(f, _)| f.as_ref()).collect();
        let merged = Forest::merge(&kept).map_err(|_| ModelError::Train("no site's trees were accepted".into()))?;
        log(Progress::Step(&format!("forest: {} trees pooled from {} of {} sites ({per} each) in {:.1} s", merged.trees(), kept.len(), fits.len(), t0.elapsed().as_secs_f64())));
        self.report.decisions.insert("rf".into(), d);
        Ok(merged)
    }

    fn boost(&mut self, log: &mut dyn FnMut(Progress<'_>)) -> Result<crate::boost::Booster, ModelError> {
        let t0 = Instant::now();
        let fits = Self::models(&self.ask(&Task::FitBooster(self.opts.boost.clone()))?, |a| if let Answer::Booster(b) = a { Some(b.clone()) } else { None });
        let d = self.screen_models(fits.iter().map(|b| b.clone().map(Scorer::Booster)).collect())?;
        let kept: Vec<&crate::boost::Booster> = fits.iter().zip(&d).filter(|(_, d)| d.accepted).filter_map(|(b, _)| b.as_ref()).collect();
        let avg = crate::boost::Booster::average(&kept).map_err(|_| ModelError::Train("no site's boosted trees were accepted".into()))?;
        log(Progress::Step(&format!("boosted trees: {} sites' boosters averaged in {:.1} s", kept.len(), t0.elapsed().as_secs_f64())));
        self.report.decisions.insert("gbdt".into(), d);
        Ok(avg)
    }

    /// Aggregate the sites' vectors (sites without one are rejected with their reason).
    fn aggregate_vectors(&self, ups: &[Result<Vec<f64>, String>], what: &str) -> Result<(Vec<f64>, Vec<Decision>), ModelError> {
        let idx: Vec<usize> = (0..ups.len()).filter(|&i| ups[i].is_ok()).collect();
        if idx.is_empty() {
            return Err(ModelError::Train(format!("no site could fit the {what}")));
        }
        let vecs: Vec<Vec<f64>> = idx.iter().map(|&i| ups[i].clone().expect("ok")).collect();
        let f = self.f.min(tolerated(vecs.len(), self.f));
        let a = aggregate(&vecs, self.plan.rule, f)?;
        let mut decisions: Vec<Decision> = ups
            .iter()
            .enumerate()
            .map(|(site, u)| Decision { site, accepted: false, score: f64::NAN, reason: format!("no update: {}", u.as_ref().err().cloned().unwrap_or_default()) })
            .collect();
        for (k, mut d) in a.decisions.into_iter().enumerate() {
            d.site = idx[k];
            decisions[idx[k]] = d;
        }
        Ok((a.value, decisions))
    }

    /// [`Self::aggregate_vectors`], private when the plan asks for it: every
    /// update clipped to the member's norm first, the aggregate noised after
    /// (site-level Gaussian mechanism), the cost added to the member's account.
    fn private_vectors(&mut self, mut ups: Vec<Result<Vec<f64>, String>>, what: &str, member: &str) -> Result<(Vec<f64>, Vec<Decision>), ModelError> {
        let Some(dp) = self.plan.dp.clone() else {
            return self.aggregate_vectors(&ups, what);
        };
        let c = if member == "svm" { dp.svm_clip } else { dp.lstm_clip };
        let clipped = ups.iter_mut().flatten().map(|u| clip(u, c)).filter(|&c| c).count();
        let (mut value, d) = self.aggregate_vectors(&ups, what)?;
        let m = d.iter().filter(|d| d.accepted).count().max(1);
        let (sd, rho) = gaussian_aggregate(&mut value, c, dp.noise_multiplier, m)?;
        let account = self.report.privacy.get_or_insert_with(PrivacyReport::new).members.entry(member.to_string()).or_insert_with(|| MemberPrivacy {
            unit: "site".into(),
            mechanism: format!("updates clipped to L2 norm {c}, aggregated by {}, Gaussian noise z = {}", self.plan.rule.name(), dp.noise_multiplier),
            releases: 0,
            noise_sd: None,
            clipped: 0,
            aggregated: 0,
            rho: 0.0,
            epsilon: 0.0,
            delta: dp.delta,
        });
        account.releases += 1;
        account.noise_sd = Some(sd);
        account.clipped += clipped;
        account.aggregated += m;
        account.rho += rho;
        account.epsilon = super::privacy::epsilon(account.rho, dp.delta)?;
        Ok((value, d))
    }

    fn vectors(replies: &[Reply]) -> Vec<Result<Vec<f64>, String>> {
        replies.iter().map(|r| expect(r, "a vector", |a| if let Answer::Vector(v) = a { Some(v.clone()) } else { None })).collect()
    }

    fn svm(&mut self, log: &mut dyn FnMut(Progress<'_>)) -> Result<Svm, ModelError> {
        let t0 = Instant::now();
        let ups = Self::vectors(&self.ask(&Task::FitSvm(self.opts.svm.clone()))?);
        let (w, d) = self.private_vectors(ups, "linear SVM", "svm")?;
        log(Progress::Step(&format!("SVM: hyperplanes of {} sites aggregated ({}) in {:.1} s", d.iter().filter(|d| d.accepted).count(), self.plan.rule.name(), t0.elapsed().as_secs_f64())));
        self.report.decisions.insert("svm".into(), d);
        Svm::from_hyperplane(&w)
    }

    /// FedAvg rounds over weight deltas from the global LSTM: every round the
    /// cross-site screen, then the robust rule on the kept deltas; the decisions of
    /// the last round are reported.
    fn lstm(&mut self, cols: usize, log: &mut dyn FnMut(Progress<'_>)) -> Result<LstmModel, ModelError> {
        let t0 = Instant::now();
        let params = LstmParams { epochs: self.plan.lstm_local_epochs.max(1), ..self.opts.lstm.clone() };
        let mut global = LstmModel::initial(cols, &params);
        let mut last = Vec::new();
        for round in 1..=self.plan.lstm_rounds.max(1) {
            let g = global.to_vector();
            let ups = Self::vectors(&self.ask(&Task::LstmRound { global: global.clone(), params: params.clone() })?);
            // Cross-site screen first (as for the trees), then the rule on the
            // deltas of the sites it kept.
            let models: Vec<Option<Scorer>> = ups.iter().map(|u| u.as_ref().ok().and_then(|u| LstmModel::with_vector(&global, u).ok()).map(Scorer::Lstm)).collect();
            let screen = self.screen_models(models)?;
            let deltas: Vec<Result<Vec<f64>, String>> = ups
                .iter()
                .zip(&screen)
                .map(|(u, d)| match u {
                    Ok(u) if d.accepted => Ok(u.iter().zip(&g).map(|(a, b)| a - b).collect()),
                    Ok(_) => Err(d.reason.clone()),
                    Err(e) => Err(e.clone()),
                })
                .collect();
            let (delta, mut d) = self.private_vectors(deltas, "LSTM", "lstm")?;
            for (x, sc) in d.iter_mut().zip(&screen) {
                if !sc.accepted {
                    *x = sc.clone();
                }
            }
            let next: Vec<f64> = g.iter().zip(&delta).map(|(a, b)| a + b).collect();
            global = LstmModel::with_vector(&global, &next)?;
            log(Progress::Status(&format!("  LSTM: round {round}/{}   ", self.plan.lstm_rounds)));
            last = d;
        }
        log(Progress::StatusEnd);
        log(Progress::Step(&format!("LSTM: {} rounds of {} local epochs in {:.1} s", self.plan.lstm_rounds, params.epochs, t0.elapsed().as_secs_f64())));
        self.report.decisions.insert("lstm".into(), last);
        Ok(global)
    }

    /// The stacker fitted on the summed Newton sums of the sites `kept` over `fold`.
    fn federated_fit(&mut self, kept: &[usize], fold: Fold) -> Result<(Stacker, usize), ModelError> {
        let (mut pos, mut total) = (0, 0);
        for r in self.ask_some(kept, &Task::Counts(fold))? {
            if let Ok(Answer::Counts { attack, total: t }) = r {
                pos += attack;
                total += t;
            }
        }
        let mut step = |w: &[f64], cw: (f64, f64)| -> Result<NewtonSums, ModelError> {
            let mut sum = NewtonSums::zero();
            for r in self.ask_some(kept, &Task::Newton { w: w.to_vec(), class_weights: cw, fold })? {
                if let Ok(Answer::Sums(s)) = r {
                    sum.add(&s);
                }
            }
            Ok(sum)
        };
        federated_stacker_with(pos, total, &mut step, 1e-2)
    }

    /// The stacker by summed Newton steps over the sites' validation rows (global
    /// class weights), and the stackers of the out-of-fold folds. Robust: each site
    /// also sends its own stacker (6 numbers), screened like the trees by its AUC
    /// on the other sites' rows; sites that fail are left out of the sums. With
    /// differential privacy it is not fitted at all ([`fixed_stacker`]).
    fn stacker(&mut self, log: &mut dyn FnMut(Progress<'_>)) -> Result<(Stacker, Vec<Stacker>), ModelError> {
        if self.plan.dp.is_some() {
            let fixed = fixed_stacker();
            let cost = MemberPrivacy { unit: "none".into(), mechanism: "fixed in advance, fitted on no row: the mean of the forest's and the boosted trees' log-odds".into(), releases: 0, noise_sd: None, clipped: 0, aggregated: 0, rho: 0.0, epsilon: 0.0, delta: 0.0 };
            self.report.privacy.get_or_insert_with(PrivacyReport::new).members.insert("stacker".into(), cost);
            log(Progress::Step("stacker: fixed (private federation): the mean of the two tree members' log-odds"));
            return Ok((fixed.clone(), vec![fixed; OOF_FOLDS]));
        }
        let replies = self.ask(&Task::FitStacker)?;
        let locals = Self::models(&replies, |a| if let Answer::Stacker(s) = a { Some(s.clone()) } else { None });
        let mut d = self.screen_models(locals.iter().map(|s| s.clone().map(Scorer::Stacker)).collect())?;
        for (i, x) in d.iter_mut().enumerate() {
            if locals[i].is_none() && self.active.contains(&i) {
                // Its rows hold one class: no own stacker to screen, its sums count.
                x.accepted = true;
                x.reason = "no own stacker to screen (one class only): its sums count".into();
            }
        }
        let kept: Vec<usize> = d.iter().filter(|d| d.accepted).map(|d| d.site).collect();
        let (stacker, steps) = self.federated_fit(&kept, Fold::All)?;
        // Out-of-fold scores for the threshold (as central training does): fold
        // k's rows are scored by the stacker fitted, federated, on the other folds.
        let mut folds = Vec::with_capacity(OOF_FOLDS);
        let mut total_steps = steps;
        for k in 0..OOF_FOLDS {
            let (s, n) = self.federated_fit(&kept, Fold::Without(k))?;
            total_steps += n;
            folds.push(s);
        }
        log(Progress::Step(&format!(
            "stacker: {steps} federated Newton steps over {} sites' validation rows (+ {} for out-of-fold scores)",
            kept.len(),
            total_steps - steps
        )));
        self.report.decisions.insert("stacker".into(), d);
        Ok((stacker, folds))
    }

    /// The threshold from the sites' merged histograms of out-of-fold validation
    /// scores (of the stacker, or of the "any member" combination with its
    /// members' `candidates`); robust: a site most of whose normal rows score
    /// above 0.5, far more of them than the other sites' and by more than
    /// sampling explains (`robust::flagged`), is left out of the merge.
    fn threshold(&mut self, ens: &mut Ensemble, folds: Vec<Stacker>, candidates: Vec<Candidate>, log: &mut dyn FnMut(Progress<'_>)) -> Result<(), ModelError> {
        let target = self.opts.target_fpr;
        let replies = self.ask(&Task::Histograms { folds })?;
        let hists: Vec<Option<(ScoreHistogram, Vec<ScoreHistogram>)>> =
            Self::models(&replies, |a| match a {
                Answer::Histograms { oof, members } if members.len() == MEMBERS.len() => Some((oof.clone(), members.clone())),
                _ => None,
            });
        // The screen's reference is p = 0.5, where the stacker (balanced class
        // weights) finds both classes equally likely: no site controls it.
        let counts: Vec<Option<(u64, u64)>> = hists.iter().map(|h| h.as_ref().map(|(h, _)| (h.normals_above(0.0), h.normals())).filter(|c| c.1 > 0)).collect();
        let local: Vec<Option<f64>> = counts.iter().map(|c| c.map(|(a, n)| a as f64 / n as f64)).collect();
        let bound = flagged_bound(local.iter().flatten().copied());
        let mut decisions = Vec::new();
        for (i, (l, h)) in local.iter().zip(&hists).enumerate() {
            let p = counts[i].and_then(|(a, n)| flagged(a, n, bound));
            let (accepted, reason) = match (l, h, &replies[i]) {
                (_, None, Err(e)) => (false, format!("no histograms: {e}")),
                (_, None, Ok(_)) => (false, "answered something other than histograms".into()),
                (Some(x), _, _) if self.robust && p.is_some() => (false, format!("{x:.4} of its normal rows score above 0.5, more than {bound:.4} (median + 3 MAD, at least one half; p = {:.1e} at that rate)", p.unwrap_or(0.0))),
                (Some(x), _, _) if *x > bound && self.robust => (true, format!("{x:.4} of its normal rows score above 0.5: above {bound:.4}, but too few rows to tell")),
                (Some(x), _, _) => (true, format!("{x:.4} of its normal rows score above 0.5")),
                (None, _, _) => (true, "no normal validation rows: attack counts only".into()),
            };
            decisions.push(Decision { site: i, accepted, score: l.unwrap_or(f64::NAN), reason });
        }
        let kept_sites: Vec<usize> = (0..hists.len()).filter(|&i| decisions[i].accepted && hists[i].is_some()).collect();
        let kept: Vec<&(ScoreHistogram, Vec<ScoreHistogram>)> = kept_sites.iter().filter_map(|&i| hists[i].as_ref()).collect();
        let merge = |get: &dyn Fn(&(ScoreHistogram, Vec<ScoreHistogram>)) -> &ScoreHistogram| -> Result<ScoreHistogram, ModelError> {
            let mut m = ScoreHistogram::default();
            for h in &kept {
                m.add(get(h))?;
            }
            Ok(m)
        };
        let merged = merge(&|h| &h.0)?;
        let (z, (n, above)) = match &self.plan.dp {
            None => {
                let pooled = merged.threshold_for_fpr(target)?;
                let e = self.site_rule(pooled, &kept.iter().map(|h| &h.0).collect::<Vec<_>>(), target);
                for (j, (&i, h)) in kept_sites.iter().zip(&kept).enumerate().filter(|_| self.plan.threshold == ThresholdRule::EverySite) {
                    decisions[i].reason += &e.note(j, h.0.normals(), target);
                }
                if let Some(site) = e.set_by {
                    let dr = |z: f64| merged.attacks_above(z) as f64 / merged.attacks().max(1) as f64;
                    let own = e.own[site].unwrap_or(e.z);
                    let how = if e.z < own { format!("raised towards its own {:.4} as far as the lift budget allows: {:.4}", sigmoid(own), sigmoid(e.z)) } else { format!("its own {:.4} taken", sigmoid(e.z)) };
                    log(Progress::Step(&format!("threshold: site {}'s normal rows run above FPR {target} at the pooled {:.4}; {how} (validation DR {:.4} -> {:.4})", kept_sites[site], sigmoid(pooled), dr(pooled), dr(e.z))));
                }
                (e.z, (merged.normals() as usize, merged.normals_above(e.z) as usize))
            }
            Some(dp) => {
                // Published: a DP threshold and a noised law; no histogram and no
                // member thresholds (they would spend the budget again).
                if let Some(caution) = dp_threshold_caution(merged.normals(), target) {
                    log(Progress::Step(&caution));
                }
                // "Any member" spent two thirds of the budget on its offsets.
                let eps = if ens.stacker.any.is_empty() { dp.threshold_epsilon } else { dp.threshold_epsilon / 3.0 };
                let (z, (n, above), cost) = private_threshold(&merged, target, eps, dp.delta)?;
                self.report.privacy.get_or_insert_with(PrivacyReport::new).members.insert("threshold".into(), cost);
                (z, (n.round() as usize, above.round() as usize))
            }
        };
        ens.threshold = sigmoid(z);
        let law = FprInterval::from_counts(above, n, 0.9);
        let mut member_thresholds = BTreeMap::new();
        for (k, m) in MEMBERS.iter().enumerate().filter(|_| self.plan.dp.is_none()) {
            let pooled = merge(&|h| &h.1[k])?.threshold_for_fpr(target)?;
            match member_threshold(self.site_rule(pooled, &kept.iter().map(|h| &h.1[k]).collect::<Vec<_>>(), target).z, m) {
                Some(t) => {
                    member_thresholds.insert(m.to_string(), t);
                }
                None => log(Progress::Step(&format!("{m}: no threshold holds FPR <= {target} on the merged histograms; the model stores none for it"))),
            }
        }
        // Each site's own threshold, from its own histogram alone (none with DP).
        let own: Vec<Option<&ScoreHistogram>> = hists.iter().map(|h| h.as_ref().map(|h| &h.0)).collect();
        let site_thresholds = if self.plan.dp.is_none() { site_thresholds(&self.link.names(), &own, z, target) } else { BTreeMap::new() };
        let (ks, own_set) = (kept.len(), site_thresholds.values().filter(|s| s.threshold.is_some()).count());
        log(Progress::Step(&format!(
            "threshold {:.4} for FPR <= {target} from {ks} sites' merged histograms: {} of {} validation normals above (expected FPR {:.2} %); {own_set} of {} sites can set their own",
            ens.threshold, law.above, law.normals, 100.0 * law.expected, own.len()
        )));
        ens.calibration = self.plan.dp.is_none().then_some(merged);
        let chosen = if ens.stacker.any.is_empty() { "stack" } else { "any" };
        let folds = if candidates.is_empty() { 0 } else { OOF_FOLDS };
        ens.combination = Some(Combination { chosen: chosen.into(), folds, candidates, threshold_fpr: law, member_thresholds, site_thresholds });
        self.report.decisions.insert("threshold".into(), decisions);
        Ok(())
    }

    /// `pooled`, or under the plan's every-site rule the threshold that also holds
    /// the target on each site's own histogram in `own` ([`every_site_threshold`]).
    fn site_rule(&self, pooled: f64, own: &[&ScoreHistogram], target: f64) -> EverySite {
        match self.plan.threshold {
            ThresholdRule::EverySite => every_site_threshold(pooled, own, target),
            ThresholdRule::Pooled => EverySite { z: pooled, p: vec![None; own.len()], own: vec![None; own.len()], set_by: None },
        }
    }
}

/// A member's threshold from `z`, its threshold on the histograms' scale: a
/// probability, or the SVM's margin as it is; None when no threshold holds the
/// target (the top bin alone holds more normals than it allows: an SVM margin of
/// +∞, which JSON cannot carry, so the model would not load back).
fn member_threshold(z: f64, member: &str) -> Option<f64> {
    let t = if member == "svm" { z } else { sigmoid(z) };
    t.is_finite().then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_no_threshold_holds_has_none_rather_than_an_infinite_one() {
        // Every normal in the top bin: no threshold leaves ≤ 1 % of them above.
        let h = ScoreHistogram::of(&[30.0; 50], &[false; 50]);
        let z = h.threshold_for_fpr(0.01).unwrap();
        assert_eq!(member_threshold(z, "svm"), None);
        assert_eq!(member_threshold(z, "rf"), Some(1.0));
        let spread: Vec<f64> = (0..200).map(|i| -4.0 + i as f64 * 0.04).collect();
        let t = member_threshold(ScoreHistogram::of(&spread, &[false; 200]).threshold_for_fpr(0.05).unwrap(), "svm").unwrap();
        assert!((3.5..4.0).contains(&t), "{t}");
    }
}
