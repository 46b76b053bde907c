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
//!
//! `--combine any` instead takes the "any member" combination ([`Stacker::any`]):
//! each member measured against its own threshold for the target FPR, the event
//! as suspicious as its most suspicious member, the ensemble's threshold set on
//! that score's out-of-fold values. Members whose out-of-fold detection rate is
//! under half the best member's are left out (each would spend false positives
//! and add little). It is chosen when asked for, never by the out-of-fold
//! comparison (its clean detection is usually a little below the stacker's; what
//! it buys is that an attacker must evade every member at once).

use serde::{Deserialize, Serialize};

use crate::ensemble::{Candidate, MemberScores, Stacker, MEMBERS};
use crate::metrics::threshold_for_fpr;
use crate::ModelError;

/// How the members are combined (`train --combine`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CombineMode {
    /// The stacker, or the best member alone when stacking does not beat it out of fold.
    #[default]
    Auto,
    /// Any member: each against its own threshold, the most suspicious decides.
    Any,
}

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
        Stacker { weights, bias: 0.0, any: Vec::new() }
    }
}

/// Choose between the stacker and the members alone (see the module docs).
/// `y` is true for attack rows. Errors when the rows lack either class or are too
/// few for `folds`.
pub fn combine(members: &[MemberScores], y: &[bool], target_fpr: f64, folds: usize, l2: f64, mode: CombineMode) -> Result<Combined, ModelError> {
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
    // A candidate's out-of-fold detection: the threshold from the other folds' normals.
    let judge = |name: &str, s: &[f64]| {
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
        Candidate { name: name.to_string(), detection_rate: tp as f64 / pos as f64, fpr: fp as f64 / (n - pos) as f64 }
    };
    let mut cands: Vec<Candidate> = candidates().map(|name| judge(name, &(0..n).map(|i| score_of(name, i)).collect::<Vec<_>>())).collect();
    if mode == CombineMode::Any {
        let (stacker, oof) = any_member(members, y, &fold, folds, target_fpr, &cands[1..]);
        cands.push(judge("any", &oof));
        return Ok(Combined { stacker, chosen: "any".into(), scores: oof, candidates: cands });
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

/// The "any member" combination: offsets (each member's threshold for the target
/// on the normal rows) over all rows, and its out-of-fold scores (offsets from
/// the other folds). `members_oof` are the members' own out-of-fold candidates,
/// in [`MEMBERS`] order.
fn any_member(members: &[MemberScores], y: &[bool], fold: &[usize], folds: usize, target_fpr: f64, members_oof: &[Candidate]) -> (Stacker, Vec<f64>) {
    let best = members_oof.iter().map(|c| c.detection_rate).fold(0.0, f64::max);
    let used: Vec<bool> = members_oof.iter().map(|c| c.detection_rate > 0.0 && c.detection_rate >= 0.5 * best).collect();
    let offsets = |rows: &dyn Fn(usize) -> bool| -> Vec<Option<f64>> {
        (0..MEMBERS.len())
            .map(|k| {
                used[k].then(|| {
                    let normal: Vec<f64> = (0..members.len()).filter(|&i| rows(i) && !y[i]).map(|i| members[i].inputs()[k]).collect();
                    threshold_for_fpr(&normal, target_fpr)
                })
            })
            .collect()
    };
    let mut oof = vec![0.0; members.len()];
    for f in 0..folds {
        let st = Stacker::any_member(offsets(&|i| fold[i] != f));
        for i in (0..members.len()).filter(|&i| fold[i] == f) {
            oof[i] = st.predict(&members[i]);
        }
    }
    (Stacker::any_member(offsets(&|_| true)), oof)
}

#[cfg(test)]
pub(crate) mod tests {
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
        let c = combine(&m, &y, 0.01, 5, 1e-2, CombineMode::Auto).unwrap();
        assert_eq!(c.chosen, "stack", "{:?}", c.candidates);
        let stack = &c.candidates[0];
        let best_member = c.candidates[1..].iter().map(|k| k.detection_rate).fold(0.0, f64::max);
        assert!(stack.detection_rate > best_member + 0.2 && stack.fpr <= 0.02, "{:?}", c.candidates);
    }

    #[test]
    fn one_informative_member_alone_is_not_beaten_by_stacking_noise() {
        let (m, y) = rows(2000, 2, &["rf"]);
        let c = combine(&m, &y, 0.01, 5, 1e-2, CombineMode::Auto).unwrap();
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
        let e = combine(&m, &y, 0.01, 5, 1e-2, CombineMode::Auto).unwrap_err().to_string();
        assert!(e.contains("5 normal and 5 attack"), "{e}");
    }

    /// 4,000 rows: attacks of two kinds, the forest sees the first, the LSTM the
    /// second; the other members are noise. Normals: every member noise.
    pub(crate) fn two_attack_kinds(seed: u64) -> (Vec<MemberScores>, Vec<bool>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut m, mut y) = (Vec::new(), Vec::new());
        for i in 0..4000 {
            let kind = i % 4; // 0, 1: normal; 2: forest's attack; 3: LSTM's attack
            let noise = |rng: &mut rand::rngs::StdRng| rng.random::<f64>() * 0.6 + 0.01;
            let (rf, lstm) = match kind {
                2 => ((noise(&mut rng) + 0.6).min(0.999), noise(&mut rng)),
                3 => (noise(&mut rng), (noise(&mut rng) + 0.6).min(0.999)),
                _ => (noise(&mut rng), noise(&mut rng)),
            };
            m.push(MemberScores { rf, svm: noise(&mut rng) * 4.0 - 2.0, lstm, twin: noise(&mut rng), gbdt: noise(&mut rng) });
            y.push(kind >= 2);
        }
        (m, y)
    }

    #[test]
    fn any_member_catches_what_each_member_alone_misses_and_leaves_weak_members_out() {
        let (m, y) = two_attack_kinds(5);
        let auto = combine(&m, &y, 0.01, 5, 1e-2, CombineMode::Auto).unwrap();
        let any = combine(&m, &y, 0.01, 5, 1e-2, CombineMode::Any).unwrap();
        assert_eq!(any.chosen, "any");
        let dr = |c: &Combined, name: &str| c.candidates.iter().find(|k| k.name == name).unwrap().detection_rate;
        let a = any.candidates.last().unwrap();
        assert!(a.name == "any" && a.detection_rate > 0.9 && a.fpr <= 0.02, "{a:?}");
        assert!(dr(&any, "rf") < 0.6 && dr(&any, "lstm") < 0.6, "{:?}", any.candidates);
        // Only the forest and the LSTM are used; the rest spend FPR for nothing.
        let used: Vec<bool> = any.stacker.any.iter().map(Option::is_some).collect();
        assert_eq!(used, vec![true, false, true, false, false], "{:?}", any.stacker.any);
        // The score passes 0.5 exactly when a used member passes its own offset.
        for s in m.iter().take(400) {
            let x = s.inputs();
            let some = [0, 2].iter().any(|&k| x[k] > any.stacker.any[k].unwrap());
            assert_eq!(any.stacker.predict(s) > 0.5, some);
        }
        // Auto never picks it, and its candidates are the usual ones.
        assert!(auto.chosen != "any" && auto.candidates.iter().all(|k| k.name != "any"));
        // A model stored without the field reads back as a stacker.
        let st: Stacker = serde_json::from_str(r#"{"weights":[1.0,0.0,0.0,0.0,0.0],"bias":0.0}"#).unwrap();
        assert!(st.any.is_empty());
    }
}
