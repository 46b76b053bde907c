//! Tests of the random forest (`forest.rs`).

use super::*;
use rand::Rng;

/// Three classes: class 1 when f0 > 1, class 2 when f1 > 1 (f0 ≤ 1), else 0; the
/// other columns are noise.
fn synthetic(rows: usize, cols: usize, seed: u64) -> (Matrix, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut x = Matrix::zeros(rows, cols);
    let mut y = Vec::with_capacity(rows);
    for i in 0..rows {
        let r = x.row_mut(i);
        for v in r.iter_mut() {
            *v = rng.random_range(-2.0f32..2.0);
        }
        y.push(if r[0] > 1.0 { 1 } else if r[1] > 1.0 { 2 } else { 0 });
    }
    (x, y)
}

fn params(trees: usize) -> ForestParams {
    ForestParams { trees, max_features: MaxFeatures::Fraction(0.6), ..ForestParams::default() }
}

#[test]
fn learns_and_generalises() {
    let (x, y) = synthetic(1500, 6, 1);
    let mut calls = 0;
    let f = Forest::fit(&x, &y, 3, &params(20), &mut |done, total| {
        calls += 1;
        assert_eq!(total, 20);
        assert_eq!(done, calls);
    })
    .unwrap();
    assert_eq!(calls, 20);
    let (xt, yt) = synthetic(1000, 6, 2);
    let mut p = [0f32; 3];
    let mut correct = 0;
    for i in 0..xt.rows {
        f.predict_proba_row(xt.row(i), &mut p);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        let best = (0..3).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
        correct += usize::from(best == yt[i]);
    }
    let acc = correct as f64 / xt.rows as f64;
    assert!(acc > 0.93, "accuracy {acc}");
    // Tree by tree over a batch: the same bits as row by row.
    let mut batch = vec![0f32; xt.rows * 3];
    f.predict_proba_rows(&xt.data, &mut batch);
    for i in 0..xt.rows {
        f.predict_proba_row(xt.row(i), &mut p);
        assert_eq!(p.map(f32::to_bits).to_vec(), batch[i * 3..i * 3 + 3].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "row {i}");
    }
    let s = f.attack_scores(&xt);
    let auc_ok = (0..xt.rows).filter(|&i| (s[i] > 0.5) == (yt[i] != 0)).count() as f64 / xt.rows as f64;
    assert!(auc_ok > 0.93, "attack accuracy {auc_ok}");
    let imp = f.feature_importance();
    assert_eq!(imp.len(), 6);
    assert!((imp.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    assert!(imp[0] > 0.25 && imp[1] > 0.25, "{imp:?}");
    assert!(imp[2..].iter().all(|&v| v < 0.1), "{imp:?}");
}

#[test]
fn deterministic_and_serde_roundtrip() {
    let (x, y) = synthetic(400, 5, 3);
    let a = Forest::fit(&x, &y, 3, &params(5), &mut |_, _| {}).unwrap();
    let b = Forest::fit(&x, &y, 3, &params(5), &mut |_, _| {}).unwrap();
    // Same seed, same model, bit for bit (no hash-map order in training, trees
    // seeded by index whatever thread grows them).
    assert_eq!(a.attack_scores(&x), b.attack_scores(&x));
    assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
    let json = serde_json::to_string(&a).unwrap();
    let c: Forest = serde_json::from_str(&json).unwrap();
    assert_eq!(a.attack_scores(&x), c.attack_scores(&x));
    let other = Forest::fit(&x, &y, 3, &ForestParams { seed: 7, ..params(5) }, &mut |_, _| {}).unwrap();
    assert_ne!(a.attack_scores(&x), other.attack_scores(&x));
}

#[test]
fn features_are_sampled_at_every_split_not_once_per_tree() {
    // One informative column among 16. A random-subspace forest (4 columns per
    // tree) leaves it out of ~3/4 of its trees; sampling at every split finds it
    // in every tree.
    let (x, _) = synthetic(600, 16, 8);
    let y: Vec<usize> = (0..x.rows).map(|i| usize::from(x.row(i)[5] > 0.3)).collect();
    let f = Forest::fit(&x, &y, 2, &ForestParams { trees: 12, max_depth: 4, ..ForestParams::default() }, &mut |_, _| {}).unwrap();
    for (t, &root) in f.roots.iter().enumerate() {
        let end = f.roots.get(t + 1).map_or(f.feat.len(), |&r| r as usize);
        assert!(f.feat[root as usize..end].contains(&5), "tree {t} never splits on the informative column");
    }
    let (xt, _) = synthetic(400, 16, 9);
    let s = f.attack_scores(&xt);
    let acc = (0..xt.rows).filter(|&i| (s[i] > 0.5) == (xt.row(i)[5] > 0.3)).count() as f64 / xt.rows as f64;
    assert!(acc > 0.97, "accuracy {acc}");
}

#[test]
fn a_tree_scores_its_training_thresholds_as_it_split_them() {
    // Values on both sides of every learnt threshold land in the leaves the
    // binned learner assigned them to: a full-depth tree on distinct values
    // reproduces its (bootstrap-free) training labels exactly.
    // (200 rows: every value its own bin.)
    let (x, y) = synthetic(200, 4, 4);
    let p = ForestParams { trees: 1, max_features: MaxFeatures::Fraction(1.0), max_depth: 64, sample_fraction: 1.0, ..ForestParams::default() };
    let f = Forest::fit(&x, &y, 3, &p, &mut |_, _| {}).unwrap();
    let mut pr = [0f32; 3];
    let mut in_bag = vec![0u32; x.rows];
    let mut rng = StdRng::seed_from_u64(tree_seed(p.seed, 0));
    for _ in 0..x.rows {
        in_bag[rng.random_range(0..x.rows)] += 1;
    }
    for i in (0..x.rows).filter(|&i| in_bag[i] > 0) {
        f.predict_proba_row(x.row(i), &mut pr);
        assert_eq!(pr[y[i]], 1.0, "row {i}: {pr:?}, label {}", y[i]);
    }
}

#[test]
fn balanced_weights_raise_minority_scores() {
    let (x, mut y) = synthetic(1000, 4, 6);
    // make class 2 rare: keep only 5% of them
    for (i, c) in y.iter_mut().enumerate() {
        if *c == 2 && i % 20 != 0 {
            *c = 0;
        }
    }
    // Shallow trees with large leaves: the rare rows share leaves with others,
    // where their class weight shows in the leaf distribution.
    let shallow = ForestParams { max_depth: 3, min_samples_leaf: 20, ..params(10) };
    let plain = Forest::fit(&x, &y, 3, &shallow, &mut |_, _| {}).unwrap();
    let bal = Forest::fit(&x, &y, 3, &ForestParams { balanced: true, ..shallow }, &mut |_, _| {}).unwrap();
    let sum = |f: &Forest| -> f32 {
        let mut p = [0f32; 3];
        (0..x.rows).filter(|&i| y[i] == 2).map(|i| { f.predict_proba_row(x.row(i), &mut p); p[2] }).sum()
    };
    assert!(sum(&bal) > 2.0 * sum(&plain), "balanced {} plain {}", sum(&bal), sum(&plain));
}

#[test]
fn rejects_bad_input() {
    let (x, y) = synthetic(50, 3, 7);
    let e = |r: Result<Forest, ModelError>| r.unwrap_err().to_string();
    assert!(e(Forest::fit(&Matrix::zeros(0, 3), &[], 3, &params(1), &mut |_, _| {})).contains("empty"));
    assert!(e(Forest::fit(&x, &y[1..], 3, &params(1), &mut |_, _| {})).contains("labels"));
    assert!(e(Forest::fit(&x, &vec![0; 50], 3, &params(1), &mut |_, _| {})).contains("one class"));
    assert!(e(Forest::fit(&x, &vec![5; 50], 3, &params(1), &mut |_, _| {})).contains("n_classes"));
    assert!(e(Forest::fit(&x, &y, 3, &ForestParams { max_features: MaxFeatures::Fraction(0.0), ..params(1) }, &mut |_, _| {}))
        .contains("max_features"));
}
