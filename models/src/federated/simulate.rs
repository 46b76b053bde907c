//! A whole federation in one process: the dataset's training and validation rows
//! split over sites, each a [`SiteWorker`] answering from its own rows only, the
//! aggregator ([`super::aggregate::federate`]) combining their answers with
//! robust rules over an in-process [`Link`]. Every answer is encoded as it would
//! be on the wire (the bytes reported); no row, score or twin is shared.
//!
//! Poisoned sites (the last `k`) follow one of the attacks of the evaluation
//! protocol: their labels inverted, one attack class relabelled normal, model
//! replacement (inverted labels and the update boosted ×N), or "a little is
//! enough" (Baruch et al. 2019: colluding sites send the honest mean minus 1.5
//! standard deviations per coordinate), or Fang et al.'s (2020) full-knowledge
//! attack on Krum (the colluding sites go against the honest direction as far as
//! the rule still selects them). The collusion is the link's, since it needs the
//! honest sites' updates.

use std::collections::BTreeMap;
use std::sync::Arc;

pub use super::aggregate::federate;
use super::partition;
pub use super::plan::{FederationPlan, FederationReport, GbdtMode, PoisonKind, SiteSummary, SiteTest, Sites};
use super::protocol::{encode, Answer, Link, Reply, Task};
use super::robust::{aggregate, tolerated, Rule};
pub use super::stacker::federated_stacker;
use super::worker::{log_screen, SiteWorker};
use crate::train::{class_index, Dataset, Progress, Split, TrainOptions};
use crate::{Ensemble, ModelError};

/// One site's rows.
pub(crate) struct Site {
    pub(crate) train: Vec<usize>,
    pub(crate) validation: Vec<usize>,
    pub(crate) poisoned: bool,
}

/// The sites of a simulation, answering in turn.
pub struct InProcess<'a> {
    workers: Vec<SiteWorker<'a>>,
    /// How the poisoned sites collude on vector updates (and the rule they know).
    collude: Option<(PoisonKind, Rule)>,
    bytes: Vec<BTreeMap<String, usize>>,
}

impl<'a> InProcess<'a> {
    pub fn new(workers: Vec<SiteWorker<'a>>, collude: Option<(PoisonKind, Rule)>) -> InProcess<'a> {
        let bytes = vec![BTreeMap::new(); workers.len()];
        InProcess { workers, collude, bytes }
    }

    /// The honest sites' vectors among the replies of `to`.
    fn honest_vectors<'r>(&self, to: &[usize], replies: &'r [Reply]) -> Vec<&'r Vec<f64>> {
        replies
            .iter()
            .enumerate()
            .filter(|(i, _)| self.workers[to[*i]].poison.is_none())
            .filter_map(|(_, r)| match r {
                Ok(Answer::Vector(v)) => Some(v),
                _ => None,
            })
            .collect()
    }

    /// Every poisoned site that answered a vector sends `crafted` instead.
    fn send_crafted(&self, to: &[usize], replies: &mut [Reply], crafted: Vec<f64>) {
        for (i, r) in replies.iter_mut().enumerate() {
            if self.workers[to[i]].poison.is_some() && matches!(r, Ok(Answer::Vector(_))) {
                *r = Ok(Answer::Vector(crafted.clone()));
            }
        }
    }

    /// Fang et al.'s attack on Krum with full knowledge: the colluding sites send
    /// `base − λ·s`, `s` the sign of the honest mean's change from `base` (the
    /// global LSTM; zero for an SVM hyperplane), λ halved from twice the honest
    /// updates' largest coordinate change until `rule` (as the aggregator applies
    /// it) selects every colluding update.
    fn fang(&self, to: &[usize], task: &Task, rule: Rule, replies: &mut [Reply]) {
        let honest = self.honest_vectors(to, replies);
        let Some(first) = honest.first() else { return };
        let d = first.len();
        let base = match task {
            Task::LstmRound { global, .. } => global.to_vector(),
            _ => vec![0.0; d],
        };
        let deltas: Vec<Vec<f64>> = honest.iter().map(|u| u.iter().zip(&base).map(|(a, b)| a - b).collect()).collect();
        let mean: Vec<f64> = (0..d).map(|k| deltas.iter().map(|u| u[k]).sum::<f64>() / deltas.len() as f64).collect();
        let s: Vec<f64> = mean.iter().map(|m| m.signum()).collect();
        let evil = (0..replies.len()).filter(|&i| self.workers[to[i]].poison.is_some() && matches!(replies[i], Ok(Answer::Vector(_)))).count();
        let n = deltas.len() + evil;
        let f = tolerated(n, n / 2);
        let mut lambda = 2.0 * deltas.iter().flatten().fold(0.0f64, |m, x| m.max(x.abs()));
        for _ in 0..30 {
            let mut all = deltas.clone();
            all.extend(std::iter::repeat_n(s.iter().map(|x| -lambda * x).collect::<Vec<f64>>(), evil));
            match aggregate(&all, rule, f) {
                Ok(a) if a.decisions[deltas.len()..].iter().all(|d| d.accepted) => break,
                _ => lambda *= 0.5,
            }
        }
        let crafted: Vec<f64> = base.iter().zip(&s).map(|(b, x)| b - lambda * x).collect();
        self.send_crafted(to, replies, crafted);
    }

    /// The colluding sites replace their vectors by the honest mean − 1.5 sd.
    fn little(&self, to: &[usize], replies: &mut [Reply]) {
        let honest = self.honest_vectors(to, replies);
        let Some(first) = honest.first() else { return };
        let (d, m) = (first.len(), honest.len() as f64);
        let mean: Vec<f64> = (0..d).map(|k| honest.iter().map(|u| u[k]).sum::<f64>() / m).collect();
        let sd: Vec<f64> = (0..d).map(|k| (honest.iter().map(|u| (u[k] - mean[k]).powi(2)).sum::<f64>() / m).sqrt()).collect();
        let evil: Vec<f64> = (0..d).map(|k| mean[k] - 1.5 * sd[k]).collect();
        self.send_crafted(to, replies, evil);
    }
}

impl Link for InProcess<'_> {
    fn sites(&self) -> usize {
        self.workers.len()
    }

    fn ask(&mut self, to: &[usize], task: &Task) -> Result<Vec<Reply>, ModelError> {
        let mut replies: Vec<Reply> = match task {
            // The standardised rows once for all sites (they share the dataset).
            Task::Standardise { standardizer, classes } if !to.is_empty() => {
                let x = Arc::new(standardizer.apply_all(self.workers[to[0]].prep_values()));
                to.iter().map(|&i| self.workers[i].set_standardised(x.clone(), classes).map(|()| Answer::Ack)).collect()
            }
            _ => to.iter().map(|&i| self.workers[i].answer(task)).collect(),
        };
        match self.collude {
            Some((PoisonKind::Little, _)) if matches!(task, Task::FitSvm(_) | Task::LstmRound { .. }) => self.little(to, &mut replies),
            Some((PoisonKind::Fang, rule)) if matches!(task, Task::FitSvm(_) | Task::LstmRound { .. }) => self.fang(to, task, rule, &mut replies),
            _ => {}
        }
        for (&i, r) in to.iter().zip(&replies) {
            if let Ok(a) = r {
                *self.bytes[i].entry(task.kind().to_string()).or_default() += encode(a).len();
            }
        }
        Ok(replies)
    }

    fn bytes(&self) -> Vec<BTreeMap<String, usize>> {
        self.bytes.clone()
    }
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
    fit_federated_with(prep, split, twin_threshold, opts, plan, &[], log)
}

/// [`fit_federated`], site `k` also training on the rows `extra[k]` (rows it made
/// itself, e.g. its adversarial versions of its own attack rows).
pub fn fit_federated_with(
    prep: &Dataset<'_>,
    split: &Split,
    twin_threshold: f64,
    opts: &TrainOptions,
    plan: &FederationPlan,
    extra: &[Vec<usize>],
    log: &mut dyn FnMut(Progress<'_>),
) -> Result<(Ensemble, FederationReport), ModelError> {
    if plan.poisoned >= plan.sites {
        return Err(ModelError::Param { name: "poison", why: format!("{} poisoned sites of {} leaves no honest site", plan.poisoned, plan.sites) });
    }
    let (classes, y) = class_index(prep.classes);
    let mut sites = make_sites(split, &y, plan)?;
    for (s, e) in sites.iter_mut().zip(extra) {
        s.train.extend_from_slice(e);
    }
    let targeted = poison_target(&sites, &y, classes.len());
    let mut workers = Vec::with_capacity(sites.len());
    for (i, s) in sites.iter().enumerate() {
        let mut own = y.clone();
        if s.poisoned && plan.poison != PoisonKind::Inflate {
            for &r in s.train.iter().chain(&s.validation) {
                own[r] = match plan.poison {
                    PoisonKind::Targeted => if own[r] == targeted { 0 } else { own[r] },
                    _ => if own[r] == 0 { targeted } else { 0 },
                };
            }
        }
        let mut w = SiteWorker::new(i, prep, classes.clone(), own, s.train.clone(), s.validation.clone());
        w.poison = s.poisoned.then_some(plan.poison);
        w.sites = plan.sites;
        if opts.screen {
            log_screen(i, w.screen(opts), log);
        }
        workers.push(w);
    }
    log(Progress::Step(&format!("simulation: {} sites, {} poisoned ({})", plan.sites, plan.poisoned, plan.poison.name())));
    let collude = (plan.poisoned > 0 && matches!(plan.poison, PoisonKind::Little | PoisonKind::Fang)).then_some((plan.poison, plan.rule));
    let mut link = InProcess::new(workers, collude);
    let (ens, mut report) = federate(&mut link, plan, opts, twin_threshold, log)?;
    for (summary, s) in report.sites.iter_mut().zip(&sites) {
        summary.poisoned = s.poisoned;
    }
    if plan.poisoned > 0 && plan.poison == PoisonKind::Targeted {
        report.targeted_class = Some(classes[targeted].clone());
    }
    Ok((ens, report))
}

/// The attack class the poisoned sites use: the most frequent in the sites'
/// training rows.
fn poison_target(sites: &[Site], y: &[usize], k: usize) -> usize {
    let mut counts = vec![0usize; k];
    for s in sites {
        for &r in &s.train {
            counts[y[r]] += 1;
        }
    }
    (1..k).max_by_key(|&c| counts[c]).unwrap_or(1)
}

/// Site `k`'s training and validation rows of `plan`'s split of a dataset (a
/// `federate site` that carves its share of a shared dataset, for evaluation:
/// the same rows the simulation gives that site).
pub fn site_rows(split: &Split, classes: &[String], plan: &FederationPlan, k: usize) -> Result<(Vec<usize>, Vec<usize>), ModelError> {
    let (_, y) = class_index(classes);
    let mut sites = make_sites(split, &y, plan)?;
    if k >= sites.len() {
        return Err(ModelError::Param { name: "site", why: format!("site {k} of {} sites", sites.len()) });
    }
    let s = sites.swap_remove(k);
    Ok((s.train, s.validation))
}

/// Each site's share of `split`'s test rows (positions in `split.test`) in the
/// class mix of its validation rows (so a site's test traffic looks like the
/// traffic it calibrated on), for evaluating each site at the threshold it
/// scores at; None for periods (the test rows come after every site's period:
/// no site's own).
pub fn test_sites(split: &Split, classes: &[String], plan: &FederationPlan) -> Result<Option<Vec<Vec<usize>>>, ModelError> {
    if !matches!(plan.split, Sites::Dirichlet { .. }) {
        return Ok(None);
    }
    let (_, y) = class_index(classes);
    let validation: Vec<Vec<usize>> = make_sites(split, &y, plan)?.into_iter().map(|s| s.validation).collect();
    let positions: Vec<usize> = (0..split.test.len()).collect();
    Ok(Some(partition::like(&positions, &|k| y[split.test[k]], &validation, &|r| y[r], plan.seed ^ 0x7E57)))
}

/// Split the training and validation rows over the sites.
pub(crate) fn make_sites(split: &Split, y: &[usize], plan: &FederationPlan) -> Result<Vec<Site>, ModelError> {
    let (train, validation) = match plan.split {
        Sites::Dirichlet { alpha } => {
            // A site's validation rows are drawn from the same traffic as its
            // training rows: each class's validation rows are shared out in
            // proportion to the sites' training rows of that class (one
            // hospital's capture, split in two), not by a second, independent
            // Dirichlet draw that would give a site validation classes it
            // never trained on.
            let class = |r: usize| y[r];
            let train = partition::dirichlet(&split.train, &class, plan.sites, alpha, 20, plan.seed)?;
            let validation = partition::like(&split.validation, &class, &train, &class, plan.seed ^ 0xFED);
            (train, validation)
        }
        Sites::Periods => (partition::periods(&split.train, plan.sites), partition::periods(&split.validation, plan.sites)),
        Sites::Own => return Err(ModelError::Param { name: "split", why: "a simulation splits one dataset; `own` rows are a real federation's".into() }),
    };
    Ok(train
        .into_iter()
        .zip(validation)
        .enumerate()
        .map(|(i, (train, validation))| Site { train, validation, poisoned: i >= plan.sites - plan.poisoned })
        .collect())
}

#[cfg(test)]
#[path = "simulate_tests.rs"]
mod tests;
