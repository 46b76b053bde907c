//! How the members' scores become the ensemble's: the stacker, or the best single
//! member when stacking does not earn its place — chosen out of fold.
//!
//! The candidates (the stacker and each member alone) are compared by detection
//! rate at the target false-positive rate, measured out of fold on the stacking
//! rows: the rows are cut into `folds` interleaved folds; for each fold the stacker
//! is fitted on the others, and every candidate's threshold is set on the others'
//! normal rows, then both are applied to the held-out fold. Pooled over folds this
//! is the candidate's detection rate and FPR on rows that neither fitted it nor set
//! its threshold. The winner is refitted on all rows; the threshold comes from the
//! winner's out-of-fold scores (for the stacker) or its scores (a member alone).
//!
//! A member alone is expressed as a stacker with one weight of 1 and no bias: its
//! score through the same logistic link, so the artifact format and the stream's
//! scoring stay the same whichever wins.

use crate::ensemble::{Candidate, MemberScores, Stacker, MEMBERS};
use crate::metrics::threshold_for_fpr;
use crate::ModelError;

/// The chosen combiner.
#[derive(Debug, Clone)]
pub struct Combined {
    pub stacker: Stacker,
    /// "stack" or the member chosen alone.
    pub chosen: String,
    /// The chosen combiner's scores of the stacking rows, out of fold for the
    /// stacker: what the threshold is set on.
    pub scores: Vec<f64>,
    /// Every candidate, in [`candidates`] order.
    pub candidates: Vec<Candidate>,
}

/// "stack", then the members.
pub fn candidates() -> impl Iterator<Item = &'static str> {
    std::iter::once("stack").chain(MEMBERS)
}

impl Stacker {
    /// Member `i` alone, through the same link.
    pub fn single(i: usize) -> Stacker {
        let mut weights = vec![0.0; MEMBERS.len()];
        weights[i] = 1.0;
        Stacker { weights, bias: 0.0 }
    }
}

/// Choose between the stacker and the members alone (see the module docs).
/// `y` is true for attack rows. Errors when the rows lack either class or are too
/// few for `folds`.
pub fn combine(members: &[MemberScores], y: &[bool], target_fpr: f64, folds: usize, l2: f64) -> Result<Combined, ModelError> {
    let n = members.len();
    let folds = folds.max(2);
    let pos = y.iter().filter(|&&v| v).count();
    if pos < folds || n - pos < folds {
        return Err(ModelError::Data(format!(
            "the stacking (validation) rows need at least {folds} normal and {folds} attack rows, got {} and {pos}",
            n - pos
        )));
    }
    // Interleaved folds within each class: every fold has both classes.
    let mut fold = vec![0usize; n];
    let (mut np, mut nn) = (0, 0);
    for i in 0..n {
        let c = if y[i] { &mut np } else { &mut nn };
        fold[i] = *c % folds;
        *c += 1;
    }
    // Out-of-fold stacker scores.
    let mut oof_stack = vec![0.0; n];
    for f in 0..folds {
        let (fit_m, fit_y): (Vec<MemberScores>, Vec<bool>) = (0..n).filter(|&i| fold[i] != f).map(|i| (members[i], y[i])).unzip();
        let st = Stacker::fit(&fit_m, &fit_y, l2)?;
        for i in (0..n).filter(|&i| fold[i] == f) {
            oof_stack[i] = st.predict(&members[i]);
        }
    }
    let score_of = |name: &str, i: usize| -> f64 {
        match MEMBERS.iter().position(|m| *m == name) {
            Some(k) => Stacker::single(k).predict(&members[i]),
            None => oof_stack[i],
        }
    };
    let mut cands = Vec::new();
    for name in candidates() {
        let s: Vec<f64> = (0..n).map(|i| score_of(name, i)).collect();
        let (mut tp, mut fp) = (0usize, 0usize);
        for f in 0..folds {
            let normal: Vec<f64> = (0..n).filter(|&i| fold[i] != f && !y[i]).map(|i| s[i]).collect();
            let t = threshold_for_fpr(&normal, target_fpr);
            for i in (0..n).filter(|&i| fold[i] == f && s[i] >= t) {
                if y[i] {
                    tp += 1;
                } else {
                    fp += 1;
                }
            }
        }
        cands.push(Candidate { name: name.to_string(), detection_rate: tp as f64 / pos as f64, fpr: fp as f64 / (n - pos) as f64 });
    }
    // The highest out-of-fold detection rate; on a tie the earlier candidate
    // (the stacker first).
    let best = cands.iter().enumerate().fold(0, |b, (i, c)| if c.detection_rate > cands[b].detection_rate { i } else { b });
    let chosen = cands[best].name.clone();
    let (stacker, scores) = match MEMBERS.iter().position(|m| *m == chosen) {
        Some(k) => (Stacker::single(k), (0..n).map(|i| score_of(&chosen, i)).collect()),
        None => (Stacker::fit(members, y, l2)?, oof_stack),
    };
    Ok(Combined { stacker, chosen, scores, candidates: cands })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rows(n: usize, seed: u64, informative: &[&str]) -> (Vec<MemberScores>, Vec<bool>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut m = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let attack = i % 4 == 0;
            let sig = |rng: &mut rand::rngs::StdRng, on: bool| -> f64 {
                let base: f64 = rng.random::<f64>() * 0.6;
                if on && attack { (base + 0.5).min(0.999) } else { base.max(0.001) }
            };
            let on = |name: &str| informative.contains(&name);
            m.push(MemberScores {
                rf: sig(&mut rng, on("rf")),
                svm: sig(&mut rng, on("svm")) * 4.0 - 2.0,
                lstm: sig(&mut rng, on("lstm")),
                twin: sig(&mut rng, on("twin")),
                gbdt: sig(&mut rng, on("gbdt")),
            });
            y.push(attack);
        }
        (m, y)
    }

    #[test]
    fn two_half_informative_members_are_stacked() {
        // Each member sees half the attacks; together they see all.
        let (mut m, y) = rows(2000, 1, &[]);
        for (i, r) in m.iter_mut().enumerate() {
            if y[i] {
                if i % 8 == 0 { r.rf = 0.95 } else { r.svm = 1.9 }
            }
        }
        let c = combine(&m, &y, 0.01, 5, 1e-2).unwrap();
        assert_eq!(c.chosen, "stack", "{:?}", c.candidates);
        let stack = &c.candidates[0];
        let best_member = c.candidates[1..].iter().map(|k| k.detection_rate).fold(0.0, f64::max);
        assert!(stack.detection_rate > best_member + 0.2 && stack.fpr <= 0.02, "{:?}", c.candidates);
    }

    #[test]
    fn one_informative_member_alone_is_not_beaten_by_stacking_noise() {
        let (m, y) = rows(2000, 2, &["rf"]);
        let c = combine(&m, &y, 0.01, 5, 1e-2).unwrap();
        let rf = c.candidates.iter().find(|c| c.name == "rf").unwrap();
        let chosen = c.candidates.iter().find(|x| x.name == c.chosen).unwrap();
        assert!(chosen.detection_rate >= rf.detection_rate, "{:?}", c.candidates);
        assert_eq!(c.scores.len(), m.len());
        if c.chosen == "rf" {
            assert_eq!(c.stacker, Stacker::single(0));
        }
    }

    #[test]
    fn too_few_rows_of_a_class_is_an_error_naming_the_counts() {
        let (m, mut y) = rows(40, 3, &["rf"]);
        y.iter_mut().skip(3).for_each(|v| *v = false);
        let e = combine(&m, &y, 0.01, 5, 1e-2).unwrap_err().to_string();
        assert!(e.contains("5 normal and 5 attack"), "{e}");
    }
}
