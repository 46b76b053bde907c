//! The "any member" combination in a federation (`--combine any`): each member
//! against its own threshold for the target FPR, the event as suspicious as its
//! most suspicious member ([`Stacker::any`]), as central training builds it
//! ([`crate::combine`]) — from histograms instead of rows.
//!
//! Every site counts each member's stacking inputs (log-odds; the SVM's margin)
//! of its validation rows into the calibration bins, per out-of-fold fold
//! ([`Task::MemberHistograms`]). The aggregator adds them up. A member's offset is
//! the conformal threshold for the target on the merged normal counts; its
//! out-of-fold detection rate (fold `k`'s attack counts above the offset set on
//! the other folds) decides whether it is used: as centrally, a member under half
//! the best member's rate is left out. The fold combinations (offsets from the
//! other folds) then score the out-of-fold histograms the ensemble's threshold is
//! set on ([`Task::Histograms`], the same robust merge as for the stacker).
//!
//! With differential privacy the members are fixed (the forest and the boosted
//! trees) and each offset is a DP quantile ([`Aggregator::private_offsets`]).
//!
//! What crosses a site's boundary: 5 folds × 5 members × 2 × 2,000 bin counts,
//! no score of any row. Robust: a site whose counts do not add up to the
//! validation rows it declared in round 0 is left out, and, as the threshold's
//! screen does, a site most of whose normal rows pass some member's offset (far
//! more than the other sites'); expelled sites are not asked. The counts weigh
//! a site by its rows, as the threshold's histograms do.

use super::aggregate::Aggregator;
use super::robust::{flagged, flagged_bound};
use super::calibrate::{ScoreHistogram, BINS};
use super::protocol::{expect, Answer, Task};
use super::robust::Decision;
use super::worker::OOF_FOLDS;
use crate::ensemble::{Candidate, Stacker, MEMBERS};
use crate::train::Progress;
use crate::ModelError;

/// The combination over all folds, one per fold (offsets from the other folds),
/// and each member's out-of-fold candidate.
pub type AnyMember = (Stacker, Vec<Stacker>, Vec<Candidate>);

impl Aggregator<'_> {
    /// Ask every site for its per-fold member histograms and build the "any
    /// member" combination (see the module docs).
    pub(crate) fn any_member(&mut self, log: &mut dyn FnMut(Progress<'_>)) -> Result<AnyMember, ModelError> {
        let replies = self.ask(&Task::MemberHistograms)?;
        let mut hists: Vec<Option<Vec<Vec<ScoreHistogram>>>> = Vec::new();
        let mut decisions = Vec::new();
        for (i, r) in replies.iter().enumerate() {
            let got = expect(r, "member histograms", |a| if let Answer::MemberHistograms(h) = a { Some(h.clone()) } else { None });
            let declared = self.report.sites.get(i).map(|s| (s.validation_normal as u64, s.validation_rows as u64));
            let (accepted, reason) = match &got {
                Ok(h) if h.len() != OOF_FOLDS || h.iter().any(|f| f.len() != MEMBERS.len()) => {
                    (false, format!("{} folds of {} members' histograms, not {OOF_FOLDS} of {}", h.len(), h.first().map_or(0, Vec::len), MEMBERS.len()))
                }
                Ok(h) if h.iter().flatten().any(|x| x.normal.len() != BINS || x.attack.len() != BINS) => (false, format!("histograms not of {BINS} bins")),
                Ok(h) => {
                    // Every member's counts must add up to the rows the site declared in round 0.
                    let counts: Vec<(u64, u64)> = (0..MEMBERS.len()).map(|m| h.iter().fold((0, 0), |(n, t), f| (n + f[m].normals(), t + f[m].normals() + f[m].attacks()))).collect();
                    match declared {
                        Some(d) if counts.iter().all(|&c| c == d) => (true, format!("{} normal and {} attack validation rows", d.0, d.1 - d.0)),
                        _ => (false, format!("its counts {:?} (normal, all) are not the {declared:?} validation rows it declared in round 0", counts[0])),
                    }
                }
                Err(e) => (false, e.clone()),
            };
            hists.push(got.ok().filter(|_| accepted));
            decisions.push(Decision { site: i, accepted, score: f64::NAN, reason });
        }
        let mut out = any_offsets(&merge(&hists)?, self.opts.target_fpr)?;
        if self.robust {
            // The threshold's screen, per member: a site most of whose normal rows
            // pass a member's offset, far more than the other sites', is left out.
            let flagged = screen_member_histograms(&hists, &out.0);
            if !flagged.is_empty() {
                for (i, why) in flagged {
                    hists[i] = None;
                    decisions[i].accepted = false;
                    decisions[i].reason = why;
                }
                out = any_offsets(&merge(&hists)?, self.opts.target_fpr)?;
            }
        }
        if let Some(dp) = self.plan.dp.clone() {
            out = self.private_offsets(&merge(&hists)?, dp.threshold_epsilon / 3.0, dp.delta)?;
        }
        let used: Vec<&str> = MEMBERS.iter().zip(&out.0.any).filter(|(_, o)| o.is_some()).map(|(m, _)| *m).collect();
        let dr: Vec<String> = out.2.iter().map(|c| format!("{} {:.3}", c.name, c.detection_rate)).collect();
        log(Progress::Step(&format!("any member: {} used (out-of-fold detection at the target: {})", used.join(", "), dr.join(", "))));
        self.report.decisions.insert("any".into(), decisions);
        Ok(out)
    }
}

impl Aggregator<'_> {
    /// A private federation's "any member": the two tree members (the ones that
    /// keep their detection under DP, as [`super::privacy::fixed_stacker`]
    /// takes), fixed in advance, each offset a record-level DP threshold of its
    /// merged normal inputs (over all folds) at `eps` each; no member's
    /// out-of-fold rate is published. The ensemble's own DP threshold takes the
    /// last third of the threshold's budget.
    fn private_offsets(&mut self, merged: &[Vec<ScoreHistogram>], eps: f64, delta: f64) -> Result<AnyMember, ModelError> {
        let mut offsets = vec![None; MEMBERS.len()];
        let (mut rho, mut sd) = (0.0, 0.0);
        for name in ["rf", "gbdt"] {
            let m = MEMBERS.iter().position(|x| *x == name).expect("a member");
            let (z, _, cost) = super::privacy::private_threshold(&summed(merged, m, None)?, self.opts.target_fpr, eps, delta)?;
            offsets[m] = Some(z);
            rho += cost.rho;
            sd = cost.noise_sd.unwrap_or(0.0);
        }
        let mechanism = format!("the forest's and the boosted trees' offsets: each a two-stage DP quantile of its merged normal inputs at ε {eps:.2}");
        let cost = super::privacy::MemberPrivacy::record(mechanism, 6, sd, rho, delta)?;
        self.report.privacy.get_or_insert_with(super::privacy::PrivacyReport::new).members.insert("any offsets".into(), cost);
        let any = Stacker::any_member(offsets);
        Ok((any.clone(), vec![any; OOF_FOLDS], Vec::new()))
    }
}

/// Member `m`'s histogram over the folds of `merged` but `skip`.
fn summed(merged: &[Vec<ScoreHistogram>], m: usize, skip: Option<usize>) -> Result<ScoreHistogram, ModelError> {
    let mut h = ScoreHistogram::default();
    for (_, f) in merged.iter().enumerate().filter(|(k, _)| Some(*k) != skip) {
        h.add(&f[m])?;
    }
    Ok(h)
}

/// The sites' histograms added up, fold by fold and member by member.
fn merge(hists: &[Option<Vec<Vec<ScoreHistogram>>>]) -> Result<Vec<Vec<ScoreHistogram>>, ModelError> {
    let mut merged = vec![vec![ScoreHistogram::default(); MEMBERS.len()]; OOF_FOLDS];
    for h in hists.iter().flatten() {
        for (m, f) in merged.iter_mut().zip(h) {
            for (a, b) in m.iter_mut().zip(f) {
                a.add(b)?;
            }
        }
    }
    Ok(merged)
}

/// Sites whose normal rows pass a used member's offset in a fraction above
/// max(median + 3 MAD over the sites, one half) — the bound of the threshold's
/// screen — with the reason.
fn screen_member_histograms(hists: &[Option<Vec<Vec<ScoreHistogram>>>], any: &Stacker) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for (m, offset) in any.any.iter().enumerate() {
        let Some(o) = offset else { continue };
        let counts: Vec<Option<(u64, u64)>> = hists
            .iter()
            .map(|h| {
                let (n, above) = h.as_ref()?.iter().fold((0, 0), |(n, a), f| (n + f[m].normals(), a + f[m].normals_above(*o)));
                (n > 0).then_some((above, n))
            })
            .collect();
        let frac: Vec<Option<f64>> = counts.iter().map(|c| c.map(|(a, n)| a as f64 / n as f64)).collect();
        let bound = flagged_bound(frac.iter().flatten().copied());
        for (i, f) in frac.iter().enumerate() {
            if let Some(f) = f.filter(|_| counts[i].is_some_and(|(a, n)| flagged(a, n, bound).is_some())) {
                if out.iter().all(|(j, _)| *j != i) {
                    out.push((i, format!("{f:.4} of its normal rows pass the {} offset, more than {bound:.4} (median + 3 MAD, at least one half)", MEMBERS[m])));
                }
            }
        }
    }
    out
}

/// The "any member" combination from merged histograms `merged[fold][member]`
/// (see the module docs). Errors when no member has a finite threshold for
/// `target` or the folds hold no normal rows.
pub fn any_offsets(merged: &[Vec<ScoreHistogram>], target: f64) -> Result<AnyMember, ModelError> {
    let folds = merged.len();
    let sum = |m: usize, skip: Option<usize>| summed(merged, m, skip);
    // Each member's threshold with fold k held out, and its out-of-fold counts.
    let mut without: Vec<Vec<Option<f64>>> = vec![vec![None; MEMBERS.len()]; folds];
    let mut candidates = Vec::with_capacity(MEMBERS.len());
    for (m, name) in MEMBERS.iter().enumerate() {
        let (mut tp, mut fp, mut pos, mut neg) = (0, 0, 0, 0);
        for (k, fold) in merged.iter().enumerate() {
            let z = sum(m, Some(k))?.threshold_for_fpr(target)?;
            let h = &fold[m];
            (pos, neg) = (pos + h.attacks(), neg + h.normals());
            if z.is_finite() {
                (tp, fp) = (tp + h.attacks_above(z), fp + h.normals_above(z));
                without[k][m] = Some(z);
            }
        }
        candidates.push(Candidate { name: name.to_string(), detection_rate: tp as f64 / pos.max(1) as f64, fpr: fp as f64 / neg.max(1) as f64 });
    }
    let best = candidates.iter().map(|c| c.detection_rate).fold(0.0, f64::max);
    let used: Vec<bool> = candidates.iter().map(|c| c.detection_rate > 0.0 && c.detection_rate >= 0.5 * best).collect();
    let pick = |offsets: &[Option<f64>]| Stacker::any_member(offsets.iter().zip(&used).map(|(o, &u)| o.filter(|_| u)).collect());
    let all: Vec<Option<f64>> = (0..MEMBERS.len()).map(|m| sum(m, None)?.threshold_for_fpr(target).map(|z| z.is_finite().then_some(z))).collect::<Result<_, _>>()?;
    let any = pick(&all);
    if any.any.iter().all(Option::is_none) {
        return Err(ModelError::Train(format!("any member: no member detects anything out of fold at FPR <= {target} on the merged histograms")));
    }
    Ok((any, without.iter().map(|o| pick(o)).collect(), candidates))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn histograms_give_the_offsets_and_member_choice_of_the_rows() {
        // The rows of combine's test: the forest sees one attack kind, the LSTM
        // the other, the rest is noise. Split over 3 "sites" and 5 folds as the
        // workers do, the histogram version must use the same members, and put
        // each offset within a bin or two of the central one (bins are 0.016 wide).
        let (m, y) = crate::combine::tests::two_attack_kinds(5);
        let central = crate::combine::combine(&m, &y, 0.01, 5, 1e-2, crate::combine::CombineMode::Any).unwrap();
        let mut merged = vec![vec![ScoreHistogram::default(); MEMBERS.len()]; OOF_FOLDS];
        for site in 0..3 {
            let rows: Vec<usize> = (0..m.len()).filter(|i| i % 3 == site).collect();
            for (k, fold) in merged.iter_mut().enumerate() {
                let r: Vec<usize> = rows.iter().enumerate().filter(|(j, _)| j % OOF_FOLDS == k).map(|(_, &i)| i).collect();
                let labels: Vec<bool> = r.iter().map(|&i| y[i]).collect();
                for (mm, h) in fold.iter_mut().enumerate() {
                    h.add(&ScoreHistogram::of(&r.iter().map(|&i| m[i].inputs()[mm]).collect::<Vec<_>>(), &labels)).unwrap();
                }
            }
        }
        let (any, folds, cands) = any_offsets(&merged, 0.01).unwrap();
        let used: Vec<bool> = any.any.iter().map(Option::is_some).collect();
        assert_eq!(used, vec![true, false, true, false, false], "{cands:?}");
        for (a, c) in any.any.iter().zip(&central.stacker.any) {
            if let (Some(a), Some(c)) = (a, c) {
                assert!((a - c).abs() < 0.05, "offset {a} from histograms vs {c} from rows");
            }
        }
        assert_eq!(folds.len(), OOF_FOLDS);
        assert!(folds.iter().all(|f| f.any.iter().map(Option::is_some).eq(used.iter().copied())));
        // Out of fold, each used member alone catches about half the attacks at ≤ ~1 % FPR.
        for c in cands.iter().filter(|c| c.name == "rf" || c.name == "lstm") {
            assert!((0.4..0.6).contains(&c.detection_rate) && c.fpr <= 0.02, "{c:?}");
        }
        // A site claiming its normal rows score like attacks on the forest is screened out.
        let honest = |seed: u64| -> Vec<Vec<ScoreHistogram>> {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (0..OOF_FOLDS).map(|_| (0..MEMBERS.len()).map(|_| ScoreHistogram::of(&(0..200).map(|_| rng.random::<f64>() * 2.0 - 3.0).collect::<Vec<_>>(), &[false; 200])).collect()).collect()
        };
        let mut sites: Vec<Option<Vec<Vec<ScoreHistogram>>>> = (0..4).map(|s| Some(honest(s))).collect();
        let mut bad = honest(9);
        bad.iter_mut().for_each(|f| f[0] = ScoreHistogram::of(&[5.0; 200], &[false; 200]));
        sites.push(Some(bad));
        let offsets = Stacker::any_member(vec![Some(-1.0), None, None, None, None]);
        let flagged = screen_member_histograms(&sites, &offsets);
        assert_eq!(flagged.len(), 1, "{flagged:?}");
        assert!(flagged[0].0 == 4 && flagged[0].1.contains("rf offset"), "{flagged:?}");
        // No normal rows anywhere: a clear error, not a threshold.
        let only_attacks = vec![vec![ScoreHistogram::of(&[1.0], &[true]); MEMBERS.len()]; OOF_FOLDS];
        assert!(any_offsets(&only_attacks, 0.01).unwrap_err().to_string().contains("no normal"));
    }
}
