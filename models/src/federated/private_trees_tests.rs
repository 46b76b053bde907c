use super::*;
use crate::federated::stats::{grid_bin, Grid};

/// Grid counts of rows (`cols` wide) as the aggregator holds them (no noise).
fn grid_of(values: &[f64], cols: usize) -> Vec<Vec<f64>> {
    let g = Grid::of(values, cols);
    Grid::merge(&[&g], cols).unwrap()
}

fn rows(n: usize) -> (Vec<f64>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(5);
    let (mut v, mut y) = (Vec::new(), Vec::new());
    for i in 0..n {
        let c = i % 3;
        v.push(rng.random::<f64>() * 10.0 + if c == 1 { 12.0 } else { 0.0 });
        v.push(if c == 2 { 1.0 } else { 0.0 });
        v.push(rng.random::<f64>());
        y.push(c);
    }
    (v, y)
}

#[test]
fn cuts_lie_between_the_grid_cells_rows_fill_and_follow_them() {
    let (v, _) = rows(600);
    let s = Standardizer::fit(&v, 3);
    let cuts = Cuts::of(&grid_of(&v, 3), &s);
    for f in 0..3 {
        let t = &cuts.thr[f];
        assert!(!t.is_empty() && t.windows(2).all(|w| w[0] < w[1]), "feature {f}: {t:?}");
        assert_eq!(cuts.mass[f].len(), t.len() + 1);
        assert!((cuts.mass[f].iter().sum::<f64>() - 600.0).abs() < 1e-9);
        // Every segment's mass is the rows whose standardised value falls in it.
        let z: Vec<f32> = (0..600).map(|r| crate::vector::standardize_one(v[r * 3 + f], s.mean[f], s.sd[f], 8.0)).collect();
        for j in 0..=t.len() {
            let n = z.iter().filter(|&&x| (j == 0 || x > t[j - 1]) && (j == t.len() || x <= t[j])).count();
            assert_eq!(n as f64, cuts.mass[f][j], "feature {f} segment {j}");
        }
    }
    // The flag (0 or 1): its cuts are the grid edges between its two values
    // only, and all its rows are in the outer segments.
    assert_eq!(cuts.thr[1].len(), grid_bin(1.0) - grid_bin(0.0), "{:?}", cuts.thr[1]);
    assert_eq!(cuts.mass[1].iter().filter(|&&m| m > 0.0).count(), 2);
}

#[test]
fn shapes_are_drawn_without_rows_deterministically_and_checked() {
    let (v, y) = rows(900);
    let s = Standardizer::fit(&v, 3);
    let cuts = Cuts::of(&grid_of(&v, 3), &s);
    let a = Shapes::draw(&cuts, 20, 4, 7);
    assert_eq!(a, Shapes::draw(&cuts, 20, 4, 7));
    assert_ne!(a, Shapes::draw(&cuts, 20, 4, 8));
    a.check(3).unwrap();
    assert!(a.leaves.iter().all(|&l| (2..=16).contains(&l)), "{:?}", a.leaves);
    // Counts: every row in one leaf of every tree.
    let x = s.apply_all(&v);
    let all: Vec<usize> = (0..900).collect();
    let counts = leaf_counts(&a, &x, &all, &y, 3).unwrap();
    assert!(counts.iter().all(|t| t.iter().map(|c| c.1).sum::<u32>() == 900));
    // A malformed shape is refused with a reason, not walked.
    let mut bad = a.clone();
    bad.left[0] = 0;
    assert!(bad.check(3).unwrap_err().contains("tree 0"));
    assert!(a.check(4).unwrap_err().contains("malformed"));
    let mut bad = a.clone();
    bad.leaves[1] = 1;
    assert!(leaf_counts(&bad, &x, &all, &y, 3).unwrap_err().contains("tree 1"));
}

#[test]
fn a_site_whose_labels_are_inverted_disagrees_with_the_others_and_counts_are_checked() {
    let (v, y) = rows(1500);
    let s = Standardizer::fit(&v, 3);
    let cuts = Cuts::of(&grid_of(&v, 3), &s);
    let shapes = Shapes::draw(&cuts, 30, 6, 1);
    let x = s.apply_all(&v);
    let mut dense = Vec::new();
    for site in 0..5 {
        let part: Vec<usize> = (0..1500).filter(|r| r % 5 == site).collect();
        let labels: Vec<usize> = if site == 4 { y.iter().map(|&c| if c == 0 { 1 } else { 0 }).collect() } else { y.clone() };
        let answer = Answer::LeafCounts(leaf_counts(&shapes, &x, &part, &labels, 3).unwrap());
        dense.push(Some(dense_counts(&answer, &shapes.leaves, 3, 300).unwrap()));
        if site == 0 {
            // More rows than declared, or a cell out of range: refused.
            assert!(dense_counts(&answer, &shapes.leaves, 3, 299).unwrap_err().contains("declared 299"));
            let Answer::LeafCounts(mut c) = answer else { unreachable!() };
            c[2].push((10_000, 1));
            assert!(dense_counts(&Answer::LeafCounts(c), &shapes.leaves, 3, 300).unwrap_err().contains("tree 2"));
        }
    }
    let shares = agreement(&dense, &shapes.leaves, 3);
    let honest: Vec<f64> = shares[..4].iter().map(|s| s.unwrap()).collect();
    assert!(honest.iter().all(|&h| h > 0.8), "{shares:?}");
    assert!(shares[4].unwrap() < 0.2, "{shares:?}");
    // A site that labels class 1 normal: its "normal" rows sit among the
    // others' class-1 rows, far more than an honest site's.
    let flip: Vec<usize> = y.iter().map(|&c| if c == 1 { 0 } else { c }).collect();
    let part: Vec<usize> = (0..1500).filter(|r| r % 5 == 4).collect();
    let mut mixed = dense.clone();
    mixed[4] = Some(dense_counts(&Answer::LeafCounts(leaf_counts(&shapes, &x, &part, &flip, 3).unwrap()), &shapes.leaves, 3, 300).unwrap());
    let among = normal_among(&mixed, 3);
    let honest = (0..4).map(|i| among[i].as_ref().unwrap()[1]).fold(0.0, f64::max);
    assert!(among[4].as_ref().unwrap()[1] > honest + 0.3, "{among:?}");
    // A site of one class cannot be scored (and is not refused for it).
    let one = Some(vec![3.0, 0.0, 0.0].repeat(dense[0].as_ref().unwrap().len() / 3));
    assert_eq!(agreement(&[dense[0].clone(), dense[1].clone(), one], &shapes.leaves, 3)[2], None);
}

#[test]
fn gradient_sums_are_bounded_by_the_rows() {
    let (v, y) = rows(300);
    let s = Standardizer::fit(&v, 3);
    let shapes = Shapes::draw(&Cuts::of(&grid_of(&v, 3), &s), 3, 3, 2);
    let yb: Vec<bool> = y.iter().map(|&c| c != 0).collect();
    let all: Vec<usize> = (0..300).collect();
    let sums = leaf_gradients(&shapes, None, &s.apply_all(&v), &all, &yb).unwrap();
    let leaves: usize = shapes.leaves.iter().map(|&l| l as usize).sum();
    assert_eq!(sums.len(), 2 * leaves);
    // At log-odds 0: g = 0.5 − y, 4h = 1 a row; per tree Σ4h = rows, Σg = 150 − 200.
    let first = 2 * shapes.leaves[0] as usize;
    let (g, h) = sums[..first].chunks(2).fold((0.0, 0.0), |a, c| (a.0 + c[0], a.1 + c[1]));
    assert!((h - 300.0).abs() < 1e-9 && (g - (150.0 - 200.0)).abs() < 1e-9, "{g} {h}");
}
