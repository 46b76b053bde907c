//! How an evaluation turns one labelled dataset into sites: per class, Dirichlet(α)
//! shares over the sites (Hsu et al. 2019; flwr-datasets' `DirichletPartitioner`):
//! small α gives each site a few classes, large α the same mix everywhere. Or, for
//! a single capture in time order, contiguous periods.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};

use crate::ModelError;

/// Split `rows` (indices) into `sites` parts: for each class (`class_of(row)`),
/// shares drawn from Dirichlet(`alpha`), seeded. Redrawn (up to 100 times, as
/// flwr-datasets does) until every site has at least `min_rows`.
pub fn dirichlet(rows: &[usize], class_of: &dyn Fn(usize) -> usize, sites: usize, alpha: f64, min_rows: usize, seed: u64) -> Result<Vec<Vec<usize>>, ModelError> {
    if sites == 0 {
        return Err(ModelError::Param { name: "sites", why: "must be at least 1".into() });
    }
    let gamma = Gamma::new(alpha, 1.0).map_err(|e| ModelError::Param { name: "alpha", why: format!("{alpha}: {e}") })?;
    let mut by_class: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for &r in rows {
        by_class.entry(class_of(r)).or_default().push(r);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..100 {
        let mut parts = vec![Vec::new(); sites];
        for members in by_class.values() {
            let mut members = members.clone();
            members.shuffle(&mut rng);
            let w: Vec<f64> = (0..sites).map(|_| gamma.sample(&mut rng).max(f64::MIN_POSITIVE)).collect();
            let total: f64 = w.iter().sum();
            let mut start = 0usize;
            let mut acc = 0.0;
            for (s, wi) in w.iter().enumerate() {
                acc += wi / total;
                let end = if s + 1 == sites { members.len() } else { ((acc * members.len() as f64).round() as usize).min(members.len()) };
                parts[s].extend_from_slice(&members[start..end.max(start)]);
                start = end.max(start);
            }
        }
        if parts.iter().all(|p| p.len() >= min_rows) {
            for p in &mut parts {
                p.sort_unstable();
            }
            return Ok(parts);
        }
    }
    Err(ModelError::Data(format!(
        "could not split {} rows over {sites} sites with at least {min_rows} each at α = {alpha} in 100 draws",
        rows.len()
    )))
}

/// Split `rows` over the sites in the class mix each part of `reference` has:
/// each class's rows (shuffled, seeded) cut by the sites' shares of that class in
/// `reference` (evenly where `reference` has none of it). A site's held-out rows
/// then look like its validation rows.
pub fn like(rows: &[usize], class_of: &dyn Fn(usize) -> usize, reference: &[Vec<usize>], reference_class: &dyn Fn(usize) -> usize, seed: u64) -> Vec<Vec<usize>> {
    let mut by_class: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for &r in rows {
        by_class.entry(class_of(r)).or_default().push(r);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut parts = vec![Vec::new(); reference.len()];
    for (c, members) in &mut by_class {
        members.shuffle(&mut rng);
        let counts: Vec<usize> = reference.iter().map(|p| p.iter().filter(|&&r| reference_class(r) == *c).count()).collect();
        let total = counts.iter().sum::<usize>();
        let share = |s: usize| if total == 0 { 1.0 / reference.len() as f64 } else { counts[s] as f64 / total as f64 };
        let (mut start, mut acc) = (0usize, 0.0);
        for (s, part) in parts.iter_mut().enumerate() {
            acc += share(s);
            let end = if s + 1 == reference.len() { members.len() } else { ((acc * members.len() as f64).round() as usize).min(members.len()) };
            part.extend_from_slice(&members[start..end.max(start)]);
            start = end.max(start);
        }
    }
    for p in &mut parts {
        p.sort_unstable();
    }
    parts
}

/// Split `rows` (in time order) into `sites` contiguous periods of equal length.
pub fn periods(rows: &[usize], sites: usize) -> Vec<Vec<usize>> {
    let n = rows.len();
    (0..sites).map(|s| rows[s * n / sites..(s + 1) * n / sites].to_vec()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirichlet_sites_cover_every_row_once_and_small_alpha_skews_them() {
        let rows: Vec<usize> = (0..3000).collect();
        let class = |r: usize| r % 6;
        for alpha in [0.1, 100.0] {
            let parts = dirichlet(&rows, &class, 5, alpha, 20, 7).unwrap();
            let mut all: Vec<usize> = parts.concat();
            all.sort_unstable();
            assert_eq!(all, rows);
            assert_eq!(parts, dirichlet(&rows, &class, 5, alpha, 20, 7).unwrap(), "seeded");
            // How far each site's class mix is from the global one (1/6 each).
            let skew: f64 = parts
                .iter()
                .map(|p| (0..6).map(|c| (p.iter().filter(|&&r| class(r) == c).count() as f64 / p.len() as f64 - 1.0 / 6.0).abs()).sum::<f64>())
                .sum::<f64>()
                / 5.0;
            if alpha < 1.0 {
                assert!(skew > 0.5, "α = {alpha}: mean skew {skew}");
            } else {
                assert!(skew < 0.15, "α = {alpha}: mean skew {skew}");
            }
        }
        assert!(dirichlet(&rows, &class, 5, 0.0, 1, 1).is_err());
        // Held-out rows (as many per class) in each site's class mix: a site with
        // none of a class gets none.
        let parts = dirichlet(&rows, &class, 5, 0.1, 20, 7).unwrap();
        let held: Vec<usize> = (3000..6000).collect();
        let like_parts = like(&held, &class, &parts, &class, 3);
        assert_eq!(like_parts.iter().map(Vec::len).sum::<usize>(), held.len());
        for (p, q) in parts.iter().zip(&like_parts) {
            for c in 0..6 {
                let (a, b) = (p.iter().filter(|&&r| class(r) == c).count(), q.iter().filter(|&&r| class(r) == c).count());
                assert!(a.abs_diff(b) <= 1, "class {c}: {a} in the reference, {b} alike");
            }
        }
        let p = periods(&rows[..10], 3);
        assert_eq!(p, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8, 9]]);
    }
}
