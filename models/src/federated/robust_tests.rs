use super::*;

#[derive(serde::Deserialize)]
struct Fixture {
    flwr: String,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    updates: Vec<Vec<f64>>,
    f: usize,
    multikrum_selected: Vec<usize>,
    multikrum_scores: Vec<f64>,
    multikrum_mean: Vec<f64>,
    median: Vec<f64>,
    trimmed_mean: Vec<f64>,
}

fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-9 * y.abs().max(1.0), "{what}[{i}]: {x} vs Flower's {y}");
    }
}

/// The rules select and compute what Flower's reference implementations do on the
/// same inputs (benches/peer/flower_rules.py wrote the fixture with flwr).
#[test]
fn rules_match_flowers_reference_implementations() {
    let fx: Fixture = serde_json::from_str(include_str!("flower_fixture.json")).unwrap();
    assert!(fx.flwr.starts_with("1."), "fixture from flwr {}", fx.flwr);
    for (k, c) in fx.cases.iter().enumerate() {
        let views: Vec<&[f64]> = c.updates.iter().map(Vec::as_slice).collect();
        close(&krum_scores(&views, c.f), &c.multikrum_scores, &format!("case {k} krum scores"));
        let mk = aggregate(&c.updates, Rule::MultiKrum, c.f).unwrap();
        let kept: Vec<usize> = mk.decisions.iter().filter(|d| d.accepted).map(|d| d.site).collect();
        assert_eq!(kept, c.multikrum_selected, "case {k}: multi-krum selection");
        close(&mk.value, &c.multikrum_mean, &format!("case {k} multi-krum mean"));
        close(&aggregate(&c.updates, Rule::Median, c.f).unwrap().value, &c.median, &format!("case {k} median"));
        close(&aggregate(&c.updates, Rule::TrimmedMean, c.f).unwrap().value, &c.trimmed_mean, &format!("case {k} trimmed mean"));
        // The poisoned sites are the last f: Multi-Krum excludes every one of them.
        let n = c.updates.len();
        assert!(mk.decisions[n - c.f..].iter().all(|d| !d.accepted), "case {k}: {:?}", mk.decisions);
    }
}

#[test]
fn clipping_keeps_a_boosted_update_from_dominating_and_the_mean_does_not() {
    // Four honest hyperplanes near (1, 1, 1, 1); one site sends −10 × its own.
    let mut ups: Vec<Vec<f64>> = (0..4).map(|i| vec![1.0 + 0.01 * i as f64; 4]).collect();
    ups.push(vec![-10.0; 4]);
    let mean = aggregate(&ups, Rule::Mean, 1).unwrap();
    assert!(mean.value[0] < 0.0, "the undefended mean is flipped: {:?}", mean.value);
    for rule in [Rule::MultiKrum, Rule::ClipMultiKrum, Rule::Median, Rule::TrimmedMean] {
        let a = aggregate(&ups, rule, tolerated(5, 3)).unwrap();
        assert!(a.value.iter().all(|&v| (v - 1.015).abs() < 0.05), "{}: {:?}", rule.name(), a.value);
    }
    let a = aggregate(&ups, Rule::ClipMultiKrum, 1).unwrap();
    assert!(!a.decisions[4].accepted && a.decisions[4].reason.contains("clipped"), "{:?}", a.decisions[4]);
    assert!(aggregate(&[vec![1.0], vec![1.0, 2.0]], Rule::Mean, 0).unwrap_err().to_string().contains("site 1"));
    assert!(aggregate(&[vec![f64::NAN]], Rule::Mean, 0).is_err());
    assert_eq!(Rule::parse("clip-multi-krum").unwrap(), Rule::ClipMultiKrum);
    assert!(Rule::parse("krum").unwrap_err().to_string().contains("multi-krum"));
}

#[test]
fn the_tree_screen_drops_sites_whose_trees_fail_elsewhere() {
    // Sites 0–6 honest (AUC 0.97–0.995 on each other's rows), 7–9 inverted (0.03).
    let auc: Vec<Vec<Option<f64>>> = (0..10)
        .map(|i| (0..10).map(|j| (i != j).then_some(if i >= 7 { 0.03 } else { 0.97 + 0.003 * ((i + j) % 9) as f64 })).collect())
        .collect();
    let d = screen_by_auc(&auc);
    assert!(d[..7].iter().all(|x| x.accepted), "{d:?}");
    assert!(d[7..].iter().all(|x| !x.accepted && x.reason.contains("chance")), "{d:?}");
    // A weaker honest site (0.955 against 0.97–0.99) is within 3 MAD (floor 0.1):
    // not excluded for noise.
    let mut auc2 = auc.clone();
    for a in auc2[0].iter_mut().skip(1) {
        *a = Some(0.955);
    }
    assert!(screen_by_auc(&auc2)[0].accepted);
    // Better than chance but far below the rest (0.62 against 0.97–0.99): out.
    for a in auc2[0].iter_mut().skip(1) {
        *a = Some(0.62);
    }
    let d = screen_by_auc(&auc2);
    assert!(!d[0].accepted && d[0].reason.contains("MAD"), "{:?}", d[0]);
    // Every model near chance (an early LSTM round): inconclusive, all kept.
    let flat: Vec<Vec<Option<f64>>> = (0..5).map(|i| (0..5).map(|j| (i != j).then_some(0.45 + 0.02 * i as f64)).collect()).collect();
    assert!(screen_by_auc(&flat).iter().all(|x| x.accepted && x.reason.contains("inconclusive")));
}
