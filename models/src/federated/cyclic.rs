//! Cyclic federated boosting: the boosted model travels from site to site, each
//! adding trees boosted on its own rows from the current model's scores.

use std::time::Instant;

use super::aggregate::Aggregator;
use super::protocol::{Answer, Scorer, Task};
use super::robust::Decision;
use crate::boost::{BoostParams, Booster};
use crate::train::Progress;
use crate::ModelError;

/// Passes of the model over the sites.
const PASSES: usize = 2;
/// A turn is refused when it lowers the model's median AUC on the other sites'
/// validation rows by more than this.
const MAX_AUC_LOSS: f64 = 0.01;

impl Aggregator<'_> {
    /// The boosted member by cyclic boosting (see [`super::plan::GbdtMode::Cyclic`]).
    pub(crate) fn boost_cyclic(&mut self, log: &mut dyn FnMut(Progress<'_>)) -> Result<Booster, ModelError> {
        let t0 = Instant::now();
        let n = self.link.sites();
        let per_turn = BoostParams { rounds: (self.opts.boost.rounds / (self.active.len() * PASSES)).max(5), ..self.opts.boost.clone() };
        let mut model: Option<Booster> = None;
        let mut decisions: Vec<Decision> = (0..n)
            .map(|site| {
                let active = self.active.contains(&site);
                Decision { site, accepted: active, score: 0.0, reason: if active { String::new() } else { self.absent(site) } }
            })
            .collect();
        let mut turns = vec![0usize; n];
        for _ in 0..PASSES {
            for i in 0..n {
                if !decisions[i].accepted {
                    continue;
                }
                let reply = self.ask_some(&[i], &Task::BoostTurn { model: model.clone(), params: per_turn.clone() })?.swap_remove(i);
                let Ok(Answer::Booster(next)) = reply else { continue };
                let gain = self.median_auc_gain(model.as_ref(), &next, i)?;
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
    fn median_auc_gain(&mut self, old: Option<&Booster>, new: &Booster, me: usize) -> Result<f64, ModelError> {
        let others: Vec<usize> = self.active.iter().copied().filter(|&j| j != me).collect();
        let replies = self.ask_some(&others, &Task::Auc(vec![Some(Scorer::Booster(new.clone())), old.cloned().map(Scorer::Booster)]))?;
        let mut gains: Vec<f64> = Vec::new();
        for j in others {
            let Ok(Answer::Aucs { all: a, .. }) = &replies[j] else { continue };
            let Some(Some(a_new)) = a.first() else { continue };
            let before = if old.is_some() { a.get(1).copied().flatten().unwrap_or(0.5) } else { 0.5 };
            gains.push(a_new - before);
        }
        if gains.is_empty() {
            return Ok(0.0);
        }
        gains.sort_by(f64::total_cmp);
        Ok(gains[gains.len() / 2])
    }
}
