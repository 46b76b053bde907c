//! Cyclic federated boosting: the boosted model travels from site to site, each
//! adding trees boosted on its own rows from the current model's scores.

use std::time::Instant;

use super::plan::PoisonKind;
use super::robust::Decision;
use super::simulate::{auc, binary, Fed};
use crate::boost::{BoostParams, Booster};
use crate::train::Progress;
use crate::ModelError;

/// Passes of the model over the sites.
const PASSES: usize = 2;
/// A turn is refused when it lowers the model's median AUC on the other sites'
/// validation rows by more than this.
const MAX_AUC_LOSS: f64 = 0.01;

impl Fed<'_> {
    /// The boosted member by cyclic boosting (see [`super::plan::GbdtMode::Cyclic`]).
    pub(crate) fn boost_cyclic(&mut self, log: &mut dyn FnMut(Progress<'_>)) -> Result<Booster, ModelError> {
        let t0 = Instant::now();
        let n = self.sites.len();
        let per_turn = BoostParams { rounds: (self.opts.boost.rounds / (n * PASSES)).max(5), ..self.opts.boost.clone() };
        let mut model: Option<Booster> = None;
        let mut decisions: Vec<Decision> = (0..n).map(|site| Decision { site, accepted: true, score: 0.0, reason: String::new() }).collect();
        let mut turns = vec![0usize; n];
        for _ in 0..PASSES {
            for i in 0..n {
                if !decisions[i].accepted {
                    continue;
                }
                let s = &self.sites[i];
                let Ok(next) = Booster::fit_from(model.as_ref(), &self.x.select(&s.train), &binary(&self.y, &s.train), &per_turn, &mut |_, _| {}) else {
                    continue;
                };
                // Model replacement: the poisoned site sends back its trees with
                // their leaf values boosted ×sites.
                let next = if s.poisoned && self.plan.poison == PoisonKind::Replace { next.boost_new_trees(model.as_ref(), n as f32) } else { next };
                let gain = self.median_auc_gain(model.as_ref(), &next, i);
                *self.report.sites[i].bytes.entry("gbdt".into()).or_default() += super::simulate::bytes(&next);
                if self.robust && gain < -MAX_AUC_LOSS {
                    decisions[i] = Decision { site: i, accepted: false, score: gain, reason: format!("its trees changed the model's median AUC on the other sites' rows by {gain:+.4}") };
                    continue;
                }
                turns[i] += 1;
                decisions[i].score = gain;
                model = Some(next);
            }
        }
        for (d, t) in decisions.iter_mut().zip(&turns) {
            if d.accepted {
                d.reason = if *t == 0 {
                    "no turn: its rows hold one class only".into()
                } else {
                    format!("{t} turns kept; last changed the median AUC on the other sites' rows by {:+.4}", d.score)
                };
                d.accepted = *t > 0;
            }
        }
        let model = model.ok_or_else(|| ModelError::Train("no site could boost".into()))?;
        log(Progress::Step(&format!("boosted trees: cyclic, {} trees over {PASSES} passes in {:.1} s", model.rounds(), t0.elapsed().as_secs_f64())));
        self.report.decisions.insert("gbdt".into(), decisions);
        Ok(model)
    }

    /// Median over the other sites (with both classes) of the AUC change from
    /// `old` (chance when absent) to `new` on their validation rows.
    fn median_auc_gain(&self, old: Option<&Booster>, new: &Booster, me: usize) -> f64 {
        let mut gains: Vec<f64> = Vec::new();
        for s in self.sites.iter().enumerate().filter(|(j, _)| *j != me).map(|(_, s)| s) {
            let y = binary(&self.y, &s.validation);
            let score = |b: &Booster| s.validation.iter().map(|&r| f64::from(b.predict_row(self.x.row(r)))).collect::<Vec<f64>>();
            let Some(a) = auc(&score(new), &y) else { continue };
            let b = old.map_or(Some(0.5), |o| auc(&score(o), &y)).unwrap_or(0.5);
            gains.push(a - b);
        }
        if gains.is_empty() {
            return 0.0;
        }
        gains.sort_by(f64::total_cmp);
        gains[gains.len() / 2]
    }
}
