use super::*;
use crate::boost::BoostParams;
use crate::ensemble::{MemberScores, Stacker, MEMBERS};
use crate::forest::ForestParams;
use crate::lstm::LstmParams;
use crate::federated::privacy::DpPlan;
use crate::federated::robust::Rule;
use crate::federated::plan::ThresholdRule;
use crate::train::{member_scores, sequences};
use crate::svm::SvmParams;
use rand::{Rng, SeedableRng};

#[test]
fn the_federated_stacker_is_the_central_fit() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let rows: Vec<(MemberScores, bool)> = (0..900)
        .map(|i| {
            let y = i % 4 == 0;
            let b = if y { 0.35 } else { 0.0 };
            let p = |rng: &mut rand::rngs::StdRng| (rng.random::<f64>() * 0.6 + b).clamp(0.01, 0.99);
            (MemberScores { rf: p(&mut rng), svm: rng.random::<f64>() * 2.0 - 1.0 + 3.0 * b, lstm: p(&mut rng), twin: p(&mut rng), gbdt: p(&mut rng) }, y)
        })
        .collect();
    let (m, y): (Vec<MemberScores>, Vec<bool>) = rows.iter().copied().unzip();
    let central = Stacker::fit(&m, &y, 1e-2).unwrap();
    // Uneven parts, one of them without attack rows.
    let cuts = [0, 13, 14, 300, 700, 900];
    let mut parts: Vec<(Vec<MemberScores>, Vec<bool>)> = cuts.windows(2).map(|c| (m[c[0]..c[1]].to_vec(), y[c[0]..c[1]].to_vec())).collect();
    parts[1].1[0] = false;
    let mut y2 = y.clone();
    y2[13] = false;
    let central = if y[13] { Stacker::fit(&m, &y2, 1e-2).unwrap() } else { central };
    let (fed, steps) = federated_stacker(&parts, 1e-2).unwrap();
    assert!(steps > 2);
    for (a, b) in fed.weights.iter().chain([&fed.bias]).zip(central.weights.iter().chain([&central.bias])) {
        assert!((a - b).abs() < 1e-9, "federated {a} vs central {b}");
    }
}

/// A small labelled dataset: 8 features, normal rows around 0, three attack
/// classes shifted on different features, 4 devices in stream order.
fn synthetic(rows: usize) -> (Vec<String>, Vec<f64>, Vec<String>, Vec<String>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let names: Vec<String> = (0..8).map(|i| format!("f{i}")).collect();
    let mut values = Vec::with_capacity(rows * 8);
    let mut classes = Vec::with_capacity(rows);
    for i in 0..rows {
        let c = match i % 10 {
            0..=5 => 0,
            6 | 7 => 1,
            8 => 2,
            _ => 3,
        };
        for f in 0..8 {
            let shift = if c > 0 && (f == c || f == c + 3) { 1.6 } else { 0.0 };
            values.push(rng.random::<f64>() * 2.0 - 1.0 + shift + 0.3 * (rng.random::<f64>() - 0.5));
        }
        classes.push(["normal", "DoS", "Recon", "Spoofing"][c].to_string());
    }
    let devices = (0..rows).map(|i| format!("d{}", i % 4)).collect();
    (names, values, classes, devices)
}

fn opts() -> TrainOptions {
    TrainOptions {
        target_fpr: 0.02,
        seed: 1,
        forest: ForestParams { trees: 30, ..ForestParams::default() },
        svm: SvmParams { max_train_rows: 600, ..SvmParams::default() },
        lstm: LstmParams { hidden: 4, epochs: 1, ..LstmParams::default() },
        boost: BoostParams { rounds: 30, ..BoostParams::default() },
        flip_labels: 0.0,
        screen: false,
        screen_threshold: 0.1,
        combine: Default::default(),
    }
}

fn detection(ens: &Ensemble, ds: &Dataset<'_>, test: &[usize]) -> (f64, f64) {
    let x = ens.standardizer.apply_all(ds.values);
    let all = member_scores(ens, ds, &x, &sequences(ds.devices, None));
    let (mut tp, mut pos, mut fp, mut neg) = (0, 0, 0, 0);
    for &r in test {
        let hit = ens.stacker.predict(&all[r]) >= ens.threshold;
        if ds.classes[r] == "normal" {
            neg += 1;
            fp += usize::from(hit);
        } else {
            pos += 1;
            tp += usize::from(hit);
        }
    }
    (tp as f64 / pos as f64, fp as f64 / neg as f64)
}

/// Ten sites, three of them inverting their labels: the undefended federation
/// (rule mean, nothing screened) collapses, the default rules keep the clean
/// detection rate and exclude exactly the poisoned sites' trees.
#[test]
fn poisoned_sites_are_excluded_and_the_undefended_federation_is_not_spared() {
    let (names, values, classes, devices) = synthetic(5000);
    let ds = Dataset { names: &names, cols: 8, values: &values, classes: &classes, devices: &devices };
    let split = Split { train: (0..3000).collect(), validation: (3000..4000).collect(), test: (4000..5000).collect() };
    let plan = |rule, poisoned, gbdt| FederationPlan { rule, poisoned, gbdt, lstm_rounds: 1, lstm_local_epochs: 1, ..FederationPlan::clean(10, Sites::Dirichlet { alpha: 5.0 }, 5) };
    let run_with = |rule, poisoned, gbdt| {
        let (ens, rep) = fit_federated(&ds, &split, 6.0, &opts(), &plan(rule, poisoned, gbdt), &mut |_| {}).unwrap();
        (detection(&ens, &ds, &split.test), rep, ens)
    };
    let run = |rule, poisoned| run_with(rule, poisoned, GbdtMode::Bagging);
    let (clean, clean_rep, ens) = run(Rule::ClipMultiKrum, 0);
    assert!(clean.0 > 0.9 && clean.1 < 0.06, "clean federation: DR {} FPR {}", clean.0, clean.1);
    assert_eq!(clean_rep.exclusions().0, 0, "a clean round excludes no honest site: {:?}", clean_rep.decisions);
    assert!(ens.validation_normal.is_empty() && ens.calibration.is_some(), "no site's scores in the artifact");
    let (undefended, _, _) = run(Rule::Mean, 3);
    let (robust, rep, _) = run(Rule::ClipMultiKrum, 3);
    assert!(robust.0 > clean.0 - 0.05, "robust DR {} vs clean {}", robust.0, clean.0);
    assert!(undefended.0 < robust.0 - 0.2 || undefended.1 > robust.1 + 0.2, "undefended DR {} FPR {}", undefended.0, undefended.1);
    // Every poisoned site is excluded from every member: its trees are no better
    // than chance on the others' rows, so it is expelled after the forest screen
    // and asked nothing more.
    for m in ["rf", "gbdt", "svm", "lstm", "stacker", "threshold"] {
        let d = &rep.decisions[m];
        assert!(d[7..].iter().all(|d| !d.accepted) && d[..7].iter().all(|d| d.accepted), "{m}: {d:?}");
        assert!(m == "rf" || d[7..].iter().all(|d| d.reason.contains("expelled")), "{m}: {d:?}");
    }
    assert!(rep.sites.iter().all(|s| s.bytes["forest"] > 0));
    assert!(rep.sites[..7].iter().all(|s| s.bytes["lstm"] > 0) && rep.sites[7..].iter().all(|s| !s.bytes.contains_key("lstm")), "expelled sites are asked nothing more");
    // Cyclic boosting: the inverting sites never get a turn.
    let (cyclic, rep, _) = run_with(Rule::ClipMultiKrum, 3, GbdtMode::Cyclic);
    assert!(cyclic.0 > clean.0 - 0.05, "cyclic robust DR {} vs clean {}", cyclic.0, clean.0);
    let d = &rep.decisions["gbdt"];
    assert!(d[7..].iter().all(|d| !d.accepted) && d[..7].iter().all(|d| d.accepted), "{d:?}");
}

/// The targeted flip: 3 of 10 sites label every row of the most frequent attack
/// class (DoS) normal. Their trees rank DoS below normal traffic at the other
/// sites: the default rules expel them after the forest screen and DoS is still
/// detected; undefended, their "normal" DoS rows lift the threshold over DoS.
#[test]
fn sites_that_relabel_an_attack_class_normal_are_expelled_and_the_class_is_still_detected() {
    let (names, values, classes, devices) = synthetic(5000);
    let ds = Dataset { names: &names, cols: 8, values: &values, classes: &classes, devices: &devices };
    let split = Split { train: (0..3000).collect(), validation: (3000..4000).collect(), test: (4000..5000).collect() };
    let plan = |rule| FederationPlan { rule, poisoned: 3, poison: PoisonKind::Targeted, lstm_rounds: 1, lstm_local_epochs: 1, ..FederationPlan::clean(10, Sites::Dirichlet { alpha: 5.0 }, 5) };
    let recall = |ens: &Ensemble| {
        let x = ens.standardizer.apply_all(ds.values);
        let all = member_scores(ens, &ds, &x, &sequences(ds.devices, None));
        let dos: Vec<usize> = split.test.iter().copied().filter(|&r| ds.classes[r] == "DoS").collect();
        dos.iter().filter(|&&r| ens.stacker.predict(&all[r]) >= ens.threshold).count() as f64 / dos.len() as f64
    };
    let (robust, rep) = fit_federated(&ds, &split, 6.0, &opts(), &plan(Rule::ClipMultiKrum), &mut |_| {}).unwrap();
    let (undefended, _) = fit_federated(&ds, &split, 6.0, &opts(), &plan(Rule::Mean), &mut |_| {}).unwrap();
    assert_eq!(rep.targeted_class.as_deref(), Some("DoS"));
    let (r, u) = (recall(&robust), recall(&undefended));
    eprintln!("DoS recall: defended {r}, undefended {u}");
    assert!(r > 0.9, "defended DoS recall {r}");
    let rf = &rep.decisions["rf"];
    assert!(rf[7..].iter().all(|d| !d.accepted && d.reason.contains("ranks DoS below normal")) && rf[..7].iter().all(|d| d.accepted), "{rf:?}");
    for m in ["gbdt", "svm", "lstm", "stacker", "threshold"] {
        let d = &rep.decisions[m];
        assert!(d[7..].iter().all(|d| !d.accepted && d.reason.contains("expelled")) && d[..7].iter().all(|d| d.accepted), "{m}: {d:?}");
    }
    let (dr, fpr) = detection(&robust, &ds, &split.test);
    assert!(dr > 0.9 && fpr < 0.06, "defended federation: DR {dr} FPR {fpr}");
    assert!(u < r - 0.3, "undefended DoS recall {u} against defended {r}");
}

/// With differential privacy the federation still detects, publishes no
/// histogram and no member threshold, and accounts ε per member: the LSTM's
/// rounds compose, the threshold, the standardiser, the class list and the
/// trees stay within their budgets, the stacker costs nothing, and only the
/// provenance is listed as not private.
#[test]
fn a_private_federation_accounts_epsilon_per_member_and_still_detects() {
    use crate::federated::privacy::{epsilon, DpPlan};
    let (names, values, mut classes, devices) = synthetic(8000);
    // Three training rows of a class no other row has: the private class list
    // must not publish it (its rows are left out at their sites).
    for r in [10, 20, 30] {
        classes[r] = "Backdoor".into();
    }
    let ds = Dataset { names: &names, cols: 8, values: &values, classes: &classes, devices: &devices };
    // 4,000 validation rows (2,400 normal): the DP quantile's rank error is a few
    // rows whatever their number, so with the 1,000 of the other tests (12 normals
    // above the 2 % target) a candidate past every normal score was close enough
    // in utility to be drawn now and then (DR 0.28 once in CI, 0.81 once in 40
    // runs); here 40 of 40 runs gave DR 0.960–0.965.
    let split = Split { train: (0..3000).collect(), validation: (3000..7000).collect(), test: (7000..8000).collect() };
    let dp = DpPlan { noise_multiplier: 1.0, svm_clip: 1.0, lstm_clip: 1.0, threshold_epsilon: 2.0, moments_epsilon: 1.0, classes_epsilon: 1.0, trees_epsilon: 1.0, delta: 1e-5 };
    let plan = FederationPlan { rule: Rule::Mean, lstm_rounds: 3, lstm_local_epochs: 1, dp: Some(dp.clone()), ..FederationPlan::clean(5, Sites::Dirichlet { alpha: 5.0 }, 5) };
    let (ens, rep) = fit_federated(&ds, &split, 6.0, &opts(), &plan, &mut |_| {}).unwrap();
    let (dr, fpr) = detection(&ens, &ds, &split.test);
    // With the trees private too (ε 1 each, 3,000 training rows) the members'
    // test AUC is ~0.96 and DR 0.73–0.80 at 2–4 % FPR (0.96 with exact trees).
    assert!(dr > 0.6 && fpr < 0.1, "private federation: DR {dr} FPR {fpr}");
    assert!(ens.calibration.is_none() && ens.combination.as_ref().unwrap().member_thresholds.is_empty(), "nothing but the DP threshold is published");
    let p = rep.privacy.as_ref().expect("a privacy report");
    let (svm, lstm, thr) = (&p.members["svm"], &p.members["lstm"], &p.members["threshold"]);
    // z = 1: ρ = 1/2 per release; the LSTM's 3 rounds compose to 3/2.
    assert!((svm.rho - 0.5).abs() < 1e-9 && svm.releases == 1 && svm.aggregated == 5, "{svm:?}");
    assert!((lstm.rho - 1.5).abs() < 1e-9 && lstm.releases == 3, "{lstm:?}");
    assert!((lstm.epsilon - epsilon(1.5, 1e-5).unwrap()).abs() < 1e-9 && lstm.epsilon > svm.epsilon);
    assert!(thr.epsilon <= 2.0 + 1e-9 && thr.epsilon > 1.5 && thr.unit == "record", "{thr:?}");
    assert!(p.not_private.contains_key("provenance"), "{:?}", p.not_private);
    // The trees: record-level, shaped without rows, leaves from noisy sums.
    for m in ["rf", "gbdt"] {
        let t = &p.members[m];
        assert!(t.unit == "record" && t.epsilon <= 1.0 + 1e-9 && t.epsilon > 0.9 && !p.not_private.contains_key(m), "{m}: {t:?}");
    }
    assert_eq!(p.members["gbdt"].releases, crate::federated::private_trees::BOOST_ROUNDS);
    let (fa, ba) = (member_auc(&ens, &ds, &split.test, "rf"), member_auc(&ens, &ds, &split.test, "gbdt"));
    assert!(fa > 0.9 && ba > 0.9, "private trees' test AUC: forest {fa}, boosted {ba}");
    // The class list: record-level, without the class of three rows.
    let cl = &p.members["classes"];
    assert!(cl.unit == "record" && cl.epsilon <= 1.0 + 1e-9 && !p.not_private.contains_key("classes"), "{cl:?}");
    assert_eq!(ens.classes, vec!["normal", "DoS", "Recon", "Spoofing"]);
    // The stacker: fitted on no row, so it costs nothing.
    let stk = &p.members["stacker"];
    assert!(!p.not_private.contains_key("stacker") && stk.unit == "none" && stk.epsilon == 0.0, "{stk:?}");
    assert_eq!(ens.stacker, crate::federated::privacy::fixed_stacker());
    // The standardiser: record-level, from noisy grid counts, within its budget
    // and near the exact one (8 features, 1,200 training rows a site).
    let st = &p.members["standardiser"];
    assert!(st.unit == "record" && st.epsilon <= 1.0 + 1e-9 && st.epsilon > 0.9, "{st:?}");
    let train_rows: Vec<f64> = split.train.iter().flat_map(|&r| values[r * 8..r * 8 + 8].iter().copied()).collect();
    let exact = crate::Standardizer::fit(&train_rows, 8);
    for c in 0..8 {
        assert!((ens.standardizer.mean[c] - exact.mean[c]).abs() < 0.25 * exact.sd[c] && (ens.standardizer.sd[c] / exact.sd[c] - 1.0).abs() < 0.35, "feature {c}: {:?} vs {:?}", (ens.standardizer.mean[c], ens.standardizer.sd[c]), (exact.mean[c], exact.sd[c]));
    }
    assert_ne!(ens.standardizer, exact);
    // "Any member" with differential privacy: the two tree members, each offset a DP
    // quantile, two thirds of the threshold's ε to them, a third to the threshold.
    let any_opts = TrainOptions { combine: crate::combine::CombineMode::Any, ..opts() };
    let any_plan = FederationPlan { dp: Some(DpPlan { threshold_epsilon: 3.0, ..dp.clone() }), ..plan.clone() };
    let (ens, rep) = fit_federated(&ds, &split, 6.0, &any_opts, &any_plan, &mut |_| {}).unwrap();
    let used: Vec<&str> = MEMBERS.iter().zip(&ens.stacker.any).filter(|(_, o)| o.is_some()).map(|(m, _)| *m).collect();
    assert_eq!(used, vec!["rf", "gbdt"]);
    let p = rep.privacy.as_ref().unwrap();
    let (off, thr) = (&p.members["any offsets"], &p.members["threshold"]);
    assert!(off.epsilon <= 2.0 + 1e-9 && off.epsilon > 1.0 && thr.epsilon <= 1.0 + 1e-9 && thr.epsilon > 0.8, "{off:?} {thr:?}");
    assert!(ens.combination.as_ref().unwrap().candidates.is_empty(), "no member's out-of-fold rate is published");
    let (dr, fpr) = detection(&ens, &ds, &split.test);
    assert!(dr > 0.5 && fpr < 0.1, "private any member: DR {dr} FPR {fpr}");
    // The noise is real: the same plan gives another SVM.
    let (again, _) = fit_federated(&ds, &split, 6.0, &opts(), &plan, &mut |_| {}).unwrap();
    assert_ne!(again.svm.hyperplane(), ens.svm.hyperplane());
}

/// ROC-AUC on `rows` of one member's stacking input.
fn member_auc(ens: &Ensemble, ds: &Dataset<'_>, rows: &[usize], member: &str) -> f64 {
    let x = ens.standardizer.apply_all(ds.values);
    let all = member_scores(ens, ds, &x, &sequences(ds.devices, None));
    let k = MEMBERS.iter().position(|m| *m == member).unwrap();
    let s: Vec<f64> = rows.iter().map(|&r| all[r].inputs()[k]).collect();
    let y: Vec<bool> = rows.iter().map(|&r| ds.classes[r] != "normal").collect();
    crate::metrics::roc_auc(&s, &y)
}

/// A private federation's trees are filled from summed counts, not pooled:
/// the count screen expels 3 of 10 sites that invert their labels (their
/// normal rows fall where the others' attacks are) or label DoS normal (their
/// normal rows sit among the others' DoS rows), and refuses sites that scale
/// their counts past the rows they declared (model replacement).
#[test]
fn a_private_federation_screens_the_sites_counts() {
    let (names, values, classes, devices) = synthetic(8000);
    let ds = Dataset { names: &names, cols: 8, values: &values, classes: &classes, devices: &devices };
    let split = Split { train: (0..4000).collect(), validation: (4000..7000).collect(), test: (7000..8000).collect() };
    let dp = DpPlan { noise_multiplier: 1.0, svm_clip: 1.0, lstm_clip: 1.0, threshold_epsilon: 4.0, moments_epsilon: 1.0, classes_epsilon: 1.0, trees_epsilon: 1.0, delta: 1e-5 };
    let plan = |poison| FederationPlan { poisoned: 3, poison, lstm_rounds: 1, lstm_local_epochs: 1, dp: Some(dp.clone()), ..FederationPlan::clean(10, Sites::Dirichlet { alpha: 5.0 }, 5) };
    let (ens, rep) = fit_federated(&ds, &split, 6.0, &opts(), &plan(PoisonKind::Invert), &mut |_| {}).unwrap();
    let rf = &rep.decisions["rf"];
    assert!(rf[7..].iter().all(|d| !d.accepted && d.reason.contains("disagree")) && rf[..7].iter().all(|d| d.accepted), "{rf:?}");
    let gb = &rep.decisions["gbdt"];
    assert!(gb[7..].iter().all(|d| !d.accepted && d.reason.contains("expelled")) && gb[..7].iter().all(|d| d.accepted), "{gb:?}");
    assert!(member_auc(&ens, &ds, &split.test, "rf") > 0.9, "the forest of the 7 honest sites");
    let (_, rep) = fit_federated(&ds, &split, 6.0, &opts(), &plan(PoisonKind::Targeted), &mut |_| {}).unwrap();
    let rf = &rep.decisions["rf"];
    assert!(rf[7..].iter().all(|d| !d.accepted && d.reason.contains("sit among the other sites' DoS rows")) && rf[..7].iter().all(|d| d.accepted), "{rf:?}");
    let (_, rep) = fit_federated(&ds, &split, 6.0, &opts(), &plan(PoisonKind::Replace), &mut |_| {}).unwrap();
    for m in ["rf", "gbdt"] {
        let d = &rep.decisions[m];
        assert!(d[7..].iter().all(|d| !d.accepted && d.reason.contains("declared")) && d[..7].iter().all(|d| d.accepted), "{m}: {d:?}");
    }
    // Counts beyond its own rows are a lie about its data: the site is
    // expelled, so its score histograms cannot move the threshold either.
    let t = &rep.decisions["threshold"];
    assert!(t[7..].iter().all(|d| !d.accepted && d.reason.contains("expelled at the forest screen")), "{t:?}");
}

/// Fang et al.'s full-knowledge attack on Krum: 3 of 10 sites send the SVM
/// hyperplane and LSTM updates against the honest direction, as far as the rule
/// still selects them. Undefended (mean) the SVM turns against the attacks; the
/// default rules keep the federation's detection.
#[test]
fn fangs_attack_turns_the_undefended_svm_and_not_the_defended_federation() {
    let (names, values, classes, devices) = synthetic(5000);
    let ds = Dataset { names: &names, cols: 8, values: &values, classes: &classes, devices: &devices };
    let split = Split { train: (0..3000).collect(), validation: (3000..4000).collect(), test: (4000..5000).collect() };
    let plan = |rule| FederationPlan { rule, poisoned: 3, poison: PoisonKind::Fang, gbdt: GbdtMode::Bagging, lstm_rounds: 1, lstm_local_epochs: 1, ..FederationPlan::clean(10, Sites::Dirichlet { alpha: 5.0 }, 5) };
    let svm_auc = |ens: &Ensemble| {
        let x = ens.standardizer.apply_all(ds.values);
        let all = member_scores(ens, &ds, &x, &sequences(ds.devices, None));
        let s: Vec<f64> = split.test.iter().map(|&r| all[r].svm).collect();
        let y: Vec<bool> = split.test.iter().map(|&r| ds.classes[r] != "normal").collect();
        crate::metrics::roc_auc(&s, &y)
    };
    let (undefended, _) = fit_federated(&ds, &split, 6.0, &opts(), &plan(Rule::Mean), &mut |_| {}).unwrap();
    let (robust, rep) = fit_federated(&ds, &split, 6.0, &opts(), &plan(Rule::ClipMultiKrum), &mut |_| {}).unwrap();
    assert!(svm_auc(&undefended) < 0.5, "undefended SVM AUC {}", svm_auc(&undefended));
    // A member no threshold holds the target for is left out of the model, never
    // written as a non-finite number (JSON null: a model that would not load back).
    let thresholds = &undefended.combination.as_ref().unwrap().member_thresholds;
    assert!(thresholds.values().all(|t| t.is_finite()), "{thresholds:?}");
    assert!(svm_auc(&robust) > 0.9, "defended SVM AUC {}: {:?}", svm_auc(&robust), rep.decisions["svm"]);
    let (dr, fpr) = detection(&robust, &ds, &split.test);
    assert!(dr > 0.9 && fpr < 0.06, "defended federation: DR {dr} FPR {fpr}");
}

/// Very non-IID sites (α = 0.03): a site whose rows are nearly all of one class
/// grows trees that score everything alike (site 3: AUC 0.5 on the others'
/// rows). That is a weak site, not wrong labels: its trees are rejected but it is
/// not expelled, and the federation keeps its rows (expelling such a site on
/// CICIoMT at α = 0.1 left no normal validation rows at all).
#[test]
fn a_site_of_one_class_is_not_expelled_for_trees_that_learned_nothing() {
    let (names, values, classes, devices) = synthetic(5000);
    let ds = Dataset { names: &names, cols: 8, values: &values, classes: &classes, devices: &devices };
    let split = Split { train: (0..3000).collect(), validation: (3000..4000).collect(), test: (4000..5000).collect() };
    let plan = FederationPlan { gbdt: GbdtMode::Bagging, lstm_rounds: 1, lstm_local_epochs: 1, ..FederationPlan::clean(5, Sites::Dirichlet { alpha: 0.1 }, 1) };
    let (ens, rep) = fit_federated(&ds, &split, 6.0, &opts(), &plan, &mut |_| {}).unwrap();
    let rf = &rep.decisions["rf"][1];
    assert!(!rf.accepted && rf.score == 0.5, "the case needs a site whose trees learned nothing: {rf:?}");
    assert!(rep.decisions.values().flatten().all(|d| !d.reason.contains("expelled")), "{:?}", rep.decisions);
    // Sites this skewed cost detection (0.90 here against 0.96 at α = 5), but the
    // federation still detects and calibrates.
    let (dr, fpr) = detection(&ens, &ds, &split.test);
    assert!(dr > 0.5 && fpr < 0.1, "DR {dr} FPR {fpr}");
}

/// `--combine any` in a federation: the offsets come from merged per-member
/// histograms, and match what central training's "any member" sets on the
/// union of the sites' validation rows scored by the same members (within a
/// histogram bin or two); the threshold holds and the ensemble detects.
#[test]
fn a_federation_combines_any_member_as_central_training_does_on_the_same_scores() {
    let (names, values, classes, devices) = synthetic(3000);
    let ds = Dataset { names: &names, cols: 8, values: &values, classes: &classes, devices: &devices };
    let split = Split { train: (0..1800).collect(), validation: (1800..2400).collect(), test: (2400..3000).collect() };
    let opts = TrainOptions { combine: crate::combine::CombineMode::Any, ..opts() };
    let plan = FederationPlan { gbdt: GbdtMode::Bagging, lstm_rounds: 1, lstm_local_epochs: 1, ..FederationPlan::clean(3, Sites::Dirichlet { alpha: 5.0 }, 5) };
    let (ens, rep) = fit_federated(&ds, &split, 6.0, &opts, &plan, &mut |_| {}).unwrap();
    let c = ens.combination.as_ref().unwrap();
    assert_eq!((c.chosen.as_str(), c.candidates.len()), ("any", MEMBERS.len()), "{c:?}");
    assert!(rep.decisions["any"].iter().all(|d| d.accepted), "{:?}", rep.decisions["any"]);
    assert!(!ens.stacker.any.is_empty() && ens.stacker.any.iter().any(Option::is_some));
    // Central "any" on the same members' scores of the validation rows: the
    // row-wise members (forest, boosted trees, SVM) score each row as a site does.
    let x = ens.standardizer.apply_all(ds.values);
    let all = member_scores(&ens, &ds, &x, &sequences(ds.devices, None));
    let m: Vec<MemberScores> = split.validation.iter().map(|&r| all[r]).collect();
    let y: Vec<bool> = split.validation.iter().map(|&r| classes[r] != "normal").collect();
    let central = crate::combine::combine(&m, &y, opts.target_fpr, 5, 1e-2, crate::combine::CombineMode::Any).unwrap();
    let mut compared = 0;
    for name in ["rf", "gbdt", "svm"] {
        let k = MEMBERS.iter().position(|x| *x == name).unwrap();
        if let (Some(f), Some(c)) = (ens.stacker.any[k], central.stacker.any[k]) {
            assert!((f - c).abs() < 0.05, "{name}: offset {f} from histograms vs {c} from the rows");
            compared += 1;
        }
    }
    assert!(compared >= 1, "{:?} vs {:?}", ens.stacker.any, central.stacker.any);
    let (dr, fpr) = detection(&ens, &ds, &split.test);
    assert!(dr > 0.8 && fpr < 0.1, "DR {dr} FPR {fpr}");
}

/// Sites as periods; in the first site's validation period and in the first test
/// rows the normal traffic has drifted (feature 1, towards DoS). Calibrated on
/// the pooled histograms that site runs far above the target on new rows of the
/// same drift; the every-site rule finds it by its own histogram and lifts the
/// threshold for it as far as one point of the other sites' detection allows.
#[test]
fn a_site_whose_normal_traffic_drifted_gets_a_lift_the_others_can_afford() {
    let (names, mut values, classes, devices) = synthetic(5000);
    for r in (3000..3200).chain(4000..4200) {
        if classes[r] == "normal" {
            values[r * 8 + 1] += 0.6;
        }
    }
    let ds = Dataset { names: &names, cols: 8, values: &values, classes: &classes, devices: &devices };
    let split = Split { train: (0..3000).collect(), validation: (3000..4000).collect(), test: (4000..5000).collect() };
    let plan = |threshold| FederationPlan { threshold, gbdt: GbdtMode::Bagging, lstm_rounds: 1, lstm_local_epochs: 1, ..FederationPlan::clean(5, Sites::Periods, 5) };
    let (pooled, _) = fit_federated(&ds, &split, 6.0, &opts(), &plan(ThresholdRule::Pooled), &mut |_| {}).unwrap();
    let (every, rep) = fit_federated(&ds, &split, 6.0, &opts(), &plan(ThresholdRule::EverySite), &mut |_| {}).unwrap();
    let d = &rep.decisions["threshold"];
    assert!(d[0].reason.contains("run above"), "{}", d[0].reason);
    assert!(d[1..].iter().all(|d| d.reason.contains("hold FPR")), "{d:?}");
    let drifted: Vec<usize> = (4000..4200).filter(|&r| classes[r] == "normal").collect();
    let ((_, fpr_pooled), (_, fpr_every)) = (detection(&pooled, &ds, &drifted), detection(&every, &ds, &drifted));
    assert!(fpr_pooled > 0.06 && fpr_every < fpr_pooled - 0.01, "drifted site's new normal rows: {fpr_every} (pooled {fpr_pooled})");
    // The others pay about the budget (1 point of validation DR) on their new
    // rows: here the drifted site's FPR 0.100 -> 0.083, the others' DR 0.894 ->
    // 0.875. With a drift of 0.9 its normal rows score among the attacks and the
    // budget buys it nothing (8.3 % either way).
    let rest: Vec<usize> = (4200..5000).collect();
    let ((dr_p, _), (dr_e, _)) = (detection(&pooled, &ds, &rest), detection(&every, &ds, &rest));
    assert!(every.threshold > pooled.threshold && dr_e >= dr_p - 0.03, "DR {dr_e} vs {dr_p}");
}

/// The gap the evaluation reports (models/FEDERATED.md, "The threshold on every
/// site"): 3 of 10 sites train honestly but claim ten times their normal
/// validation rows in their score histograms, a tenth of them in the top bin.
/// Every screen accepts them and the federation's threshold goes above every
/// attack; each honest site's own threshold is the clean federation's and
/// detects as it did.
#[test]
fn sites_that_inflate_their_score_histograms_raise_the_federations_threshold_and_not_an_honest_sites_own() {
    let (names, values, classes, devices) = synthetic(5000);
    let ds = Dataset { names: &names, cols: 8, values: &values, classes: &classes, devices: &devices };
    let split = Split { train: (0..3000).collect(), validation: (3000..4000).collect(), test: (4000..5000).collect() };
    let plan = |poisoned| FederationPlan { poisoned, poison: PoisonKind::Inflate, gbdt: GbdtMode::Bagging, lstm_rounds: 1, lstm_local_epochs: 1, ..FederationPlan::clean(10, Sites::Dirichlet { alpha: 5.0 }, 5) };
    let (clean, _) = fit_federated(&ds, &split, 6.0, &opts(), &plan(0), &mut |_| {}).unwrap();
    let (lied, rep) = fit_federated(&ds, &split, 6.0, &opts(), &plan(3), &mut |_| {}).unwrap();
    for m in ["rf", "stacker", "threshold"] {
        assert!(rep.decisions[m][7..].iter().all(|d| d.accepted), "{m}: {:?}", rep.decisions[m]);
    }
    let ((dr_clean, _), (dr_lied, _)) = (detection(&clean, &ds, &split.test), detection(&lied, &ds, &split.test));
    assert!(lied.threshold > clean.threshold && dr_lied < dr_clean - 0.5, "threshold {} vs {}, DR {dr_lied} vs {dr_clean}", lied.threshold, clean.threshold);
    let own = |e: &Ensemble| e.combination.as_ref().unwrap().site_thresholds.clone();
    let (own_clean, own_lied) = (own(&clean), own(&lied));
    assert_eq!(own_lied.len(), 10);
    let mut judged = 0;
    for i in 0..7 {
        let name = format!("site-{i}");
        // (A site without one is listed at the federation's threshold, which moved.)
        assert_eq!(own_lied[&name].threshold, own_clean[&name].threshold, "{name}: what the other sites report moved its own threshold");
        if own_lied[&name].threshold.is_none() {
            continue;
        }
        assert_eq!(own_lied[&name], own_clean[&name]);
        judged += 1;
        let mut at_site = lied.clone();
        assert!(at_site.use_site_threshold(&name).unwrap().contains("own threshold"));
        let (dr, fpr) = detection(&at_site, &ds, &split.test);
        // A threshold from ~100 normal rows is noisy: its FPR is held to its own
        // law, at 99 % (several sites are judged here, and the test rows' FPR
        // has sampling noise of its own; a 90 % interval is missed by chance).
        let own = &own_lied[&name].fpr;
        let law = crate::metrics::FprInterval::from_counts(own.above, own.normals, 0.99);
        assert!(dr > dr_clean - 0.05 && fpr <= law.high, "{name} at its own threshold: DR {dr} (clean federation {dr_clean}), FPR {fpr} (its law {law:?})");
    }
    assert!(judged >= 3, "only {judged} honest sites could set their own threshold: the case is not exercised");
    let e = lied.clone().use_site_threshold("hospital-z").unwrap_err().to_string();
    assert!(e.contains("hospital-z") && e.contains("site-9"), "{e}");
}

#[test]
fn a_sites_validation_rows_come_from_the_traffic_it_trained_on() {
    // 6 classes, skewed sites: most sites train on few classes. A site must not
    // be judged on classes it never saw, and each class's validation rows go to
    // the sites in proportion to their training rows of that class.
    let y: Vec<usize> = (0..12_000).map(|r| (r * 7 + r / 13) % 6).collect();
    let split = Split { train: (0..9000).collect(), validation: (9000..12_000).collect(), test: vec![] };
    let plan = FederationPlan::clean(10, Sites::Dirichlet { alpha: 0.1 }, 11);
    let sites = make_sites(&split, &y, &plan).unwrap();
    let mut seen = vec![0usize; 12_000];
    for (i, s) in sites.iter().enumerate() {
        for &r in &s.validation {
            seen[r] += 1;
        }
        for c in 0..6 {
            let (t, v) = (s.train.iter().filter(|&&r| y[r] == c).count(), s.validation.iter().filter(|&&r| y[r] == c).count());
            let (t_all, v_all) = (split.train.iter().filter(|&&r| y[r] == c).count(), split.validation.iter().filter(|&&r| y[r] == c).count());
            let expected = t as f64 / t_all as f64 * v_all as f64;
            assert!((v as f64 - expected).abs() <= 1.0, "site {i}, class {c}: {v} validation rows for {t} of {t_all} training rows (expected {expected:.1})");
        }
    }
    assert!(split.validation.iter().all(|&r| seen[r] == 1), "every validation row goes to exactly one site");
}
