//! Round 0: per-feature moments merged across sites (Chan et al.'s parallel
//! update), so the global standardiser equals the one fitted on the union; and
//! per-feature counts over a fixed grid (the same for every site and every
//! dataset, so it reveals nothing by itself), from which a differentially
//! private standardiser is derived when the plan asks for one.

use serde::{Deserialize, Serialize};

use crate::Standardizer;

/// Count, mean and sum of squared deviations of every feature over some rows
/// (non-finite values skipped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub n: Vec<u64>,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

impl Moments {
    /// The moments of `values` (row-major, `cols` wide).
    pub fn of(values: &[f64], cols: usize) -> Moments {
        let mut m = Moments { n: vec![0; cols], mean: vec![0.0; cols], m2: vec![0.0; cols] };
        for row in values.chunks_exact(cols) {
            for (c, &x) in row.iter().enumerate() {
                if x.is_finite() {
                    m.n[c] += 1;
                    let d = x - m.mean[c];
                    m.mean[c] += d / m.n[c] as f64;
                    m.m2[c] += d * (x - m.mean[c]);
                }
            }
        }
        m
    }

    /// The moments of the union of the parts' rows.
    pub fn merge(parts: &[&Moments]) -> Moments {
        let cols = parts.first().map_or(0, |p| p.n.len());
        let mut m = Moments { n: vec![0; cols], mean: vec![0.0; cols], m2: vec![0.0; cols] };
        for p in parts {
            for c in 0..cols.min(p.n.len()) {
                let (na, nb) = (m.n[c] as f64, p.n[c] as f64);
                if p.n[c] == 0 {
                    continue;
                }
                let n = na + nb;
                let d = p.mean[c] - m.mean[c];
                m.mean[c] += d * nb / n;
                m.m2[c] += p.m2[c] + d * d * na * nb / n;
                m.n[c] += p.n[c];
            }
        }
        m
    }

    /// The standardiser of these moments (sample standard deviation; a constant
    /// feature keeps scale 1).
    pub fn standardizer(&self) -> Standardizer {
        let sd = (0..self.n.len())
            .map(|c| if self.n[c] > 1 { (self.m2[c] / (self.n[c] - 1) as f64).sqrt() } else { 0.0 })
            .map(|s| if s > 1e-9 { s } else { 1.0 })
            .collect();
        Standardizer { mean: self.mean.clone(), sd }
    }
}

/// Grid bins per decade of |x|, and the decades covered (1e-6 to 1e12); values
/// nearer 0 than 1e-6 share the zero bin, those beyond 1e12 the outermost bins.
const PER_DECADE: f64 = 4.0;
const SMALLEST: f64 = 1e-6;
const SIDE: usize = 72;
/// Bins of the grid: `SIDE` negative, zero, `SIDE` positive.
pub const GRID_BINS: usize = 2 * SIDE + 1;

/// The grid bin of a finite value.
pub fn grid_bin(x: f64) -> usize {
    let a = x.abs();
    if a < SMALLEST {
        return SIDE;
    }
    let k = ((PER_DECADE * (a / SMALLEST).log10()).floor() as usize).min(SIDE - 1);
    if x > 0.0 { SIDE + 1 + k } else { SIDE - 1 - k }
}

/// The value a grid bin stands for: its geometric centre (0 for the zero bin).
pub fn grid_center(b: usize) -> f64 {
    if b == SIDE {
        return 0.0;
    }
    let k = if b > SIDE { b - SIDE - 1 } else { SIDE - 1 - b };
    let v = SMALLEST * 10f64.powf((k as f64 + 0.5) / PER_DECADE);
    if b > SIDE { v } else { -v }
}

/// The lowest value of a grid bin (bin `b` holds values from its lower edge up
/// to the next bin's): bins ascend with the value, so a value is below
/// `grid_lower_edge(b)` exactly when its bin is below `b` (a value on a
/// negative bin's edge counts in the bin below).
pub fn grid_lower_edge(b: usize) -> f64 {
    if b > SIDE {
        SMALLEST * 10f64.powf((b - SIDE - 1) as f64 / PER_DECADE)
    } else if b == SIDE {
        -SMALLEST
    } else {
        -SMALLEST * 10f64.powf((SIDE - b) as f64 / PER_DECADE)
    }
}

/// Per feature, the rows in each grid bin (only the bins holding any: a site
/// sends a few dozen pairs a feature). Non-finite values are not counted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    pub counts: Vec<Vec<(u16, u64)>>,
}

impl Grid {
    /// The grid counts of `values` (row-major, `cols` wide).
    pub fn of(values: &[f64], cols: usize) -> Grid {
        let mut dense = vec![vec![0u64; GRID_BINS]; cols];
        for row in values.chunks_exact(cols) {
            for (c, &x) in row.iter().enumerate() {
                if x.is_finite() {
                    dense[c][grid_bin(x)] += 1;
                }
            }
        }
        Grid { counts: dense.iter().map(|d| d.iter().enumerate().filter(|(_, &n)| n > 0).map(|(b, &n)| (b as u16, n)).collect()).collect() }
    }

    /// The sum of the parts' counts, dense (`cols` × [`GRID_BINS`]); a bin out
    /// of range or a part with another width is an error naming the part.
    pub fn merge(parts: &[&Grid], cols: usize) -> Result<Vec<Vec<f64>>, String> {
        let mut dense = vec![vec![0.0; GRID_BINS]; cols];
        for (i, p) in parts.iter().enumerate() {
            if p.counts.len() != cols {
                return Err(format!("part {i} has grid counts for {} features, not {cols}", p.counts.len()));
            }
            for (d, feature) in dense.iter_mut().zip(&p.counts) {
                for &(b, n) in feature {
                    *d.get_mut(usize::from(b)).ok_or_else(|| format!("part {i} counts grid bin {b} (of {GRID_BINS})"))? += n as f64;
                }
            }
        }
        Ok(dense)
    }
}

/// The standardiser of (noisy) grid counts, one row of [`GRID_BINS`] per
/// feature: bins under `floor` are taken as empty (noise in bins no row is in),
/// the rest stand at their centres. A feature with nothing left keeps (0, 1).
pub fn grid_standardizer(dense: &[Vec<f64>], floor: f64) -> Standardizer {
    let (mut mean, mut sd) = (Vec::with_capacity(dense.len()), Vec::with_capacity(dense.len()));
    for d in dense {
        let kept = || d.iter().enumerate().filter(|(_, &n)| n >= floor && n > 0.0);
        let n: f64 = kept().map(|(_, &n)| n).sum();
        if n < 2.0 {
            mean.push(0.0);
            sd.push(1.0);
            continue;
        }
        let m = kept().map(|(b, &c)| c * grid_center(b)).sum::<f64>() / n;
        let v = kept().map(|(b, &c)| c * (grid_center(b) - m).powi(2)).sum::<f64>() / (n - 1.0);
        mean.push(m);
        sd.push(if v.sqrt() > 1e-9 { v.sqrt() } else { 1.0 });
    }
    Standardizer { mean, sd }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_below_a_bins_lower_edge_when_its_bin_is_below() {
        let mut x = -3e12;
        while x < 3e12 {
            for b in 1..GRID_BINS {
                assert_eq!(x < grid_lower_edge(b), grid_bin(x) < b, "{x} bin {} edge {b} {}", grid_bin(x), grid_lower_edge(b));
            }
            x = if x.abs() < 1e-7 { 1.1e-7 } else if x < 0.0 { x / 1.37 } else { x * 1.37 };
        }
        assert!((1..GRID_BINS).all(|b| grid_lower_edge(b - 1) < grid_lower_edge(b)));
    }

    #[test]
    fn merged_moments_give_the_standardiser_of_the_union() {
        let cols = 3;
        let values: Vec<f64> = (0..300).map(|i| ((i * 37 % 101) as f64).sin() * 50.0 + (i % cols) as f64 * 1e3).collect();
        let mut values = values;
        values[4] = f64::NAN;
        let central = Standardizer::fit(&values, cols);
        let parts: Vec<Moments> = [0..30, 30..31, 31..75, 75..100].iter().map(|r| Moments::of(&values[r.start * cols..r.end * cols], cols)).collect();
        let merged = Moments::merge(&parts.iter().collect::<Vec<_>>()).standardizer();
        for c in 0..cols {
            assert!((merged.mean[c] - central.mean[c]).abs() < 1e-9 * central.mean[c].abs().max(1.0));
            assert!((merged.sd[c] - central.sd[c]).abs() < 1e-9 * central.sd[c]);
        }
    }

    #[test]
    fn the_grid_bins_every_value_where_its_centre_stands_and_merges_sparse_counts() {
        for &x in &[0.0, 1e-7, -1e-7, 1e-6, 3.7, -3.7, 12345.0, -0.02, 1e11, 1e30, -1e30] {
            let b = grid_bin(x);
            assert!(b < GRID_BINS, "{x}");
            let c = grid_center(b);
            if x.abs() < 1e-6 {
                assert_eq!(c, 0.0);
            } else if x.abs() < 1e12 {
                // Within a quarter decade, on the same side.
                assert!(c.signum() == x.signum() && (c / x).abs().log10().abs() <= 0.25 + 1e-12, "{x} -> {c}");
            } else {
                assert_eq!(b, if x > 0.0 { GRID_BINS - 1 } else { 0 });
            }
        }
        let values = [1.0, f64::NAN, 2.0, 5.0, 1.0, -3.0];
        let g = Grid::of(&values, 2);
        assert_eq!(g.counts[0], vec![(grid_bin(1.0) as u16, 2), (grid_bin(2.0) as u16, 1)]);
        assert_eq!(g.counts[1], vec![(grid_bin(-3.0) as u16, 1), (grid_bin(5.0) as u16, 1)]);
        let dense = Grid::merge(&[&g, &g], 2).unwrap();
        assert_eq!(dense[0][grid_bin(1.0)], 4.0);
        assert!(Grid::merge(&[&g], 3).unwrap_err().contains("part 0"));
        let bad = Grid { counts: vec![vec![(GRID_BINS as u16, 1)], vec![]] };
        assert!(Grid::merge(&[&g, &bad], 2).unwrap_err().contains("part 1"));
    }

    #[test]
    fn the_grid_standardiser_is_near_the_exact_one_and_ignores_bins_under_the_floor() {
        // A skewed feature (bytes: 10..10^4, log-uniform) and a signed one.
        let rows = 20_000;
        let values: Vec<f64> = (0..rows).flat_map(|i| {
            let u = ((i * 7919) % rows) as f64 / rows as f64;
            [10f64.powf(1.0 + 3.0 * u), (u - 0.3) * 40.0]
        }).collect();
        let exact = Standardizer::fit(&values, 2);
        let dense = Grid::merge(&[&Grid::of(&values, 2)], 2).unwrap();
        let g = grid_standardizer(&dense, 0.0);
        for c in 0..2 {
            assert!((g.mean[c] - exact.mean[c]).abs() < 0.1 * exact.sd[c], "mean {c}: {} vs {}", g.mean[c], exact.mean[c]);
            assert!((g.sd[c] / exact.sd[c] - 1.0).abs() < 0.15, "sd {c}: {} vs {}", g.sd[c], exact.sd[c]);
        }
        // A stray count far out (noise in an empty bin) is ignored under the floor.
        let mut noisy = dense.clone();
        noisy[0][GRID_BINS - 1] = 30.0;
        assert_eq!(grid_standardizer(&noisy, 50.0), grid_standardizer(&dense, 50.0));
        assert_ne!(grid_standardizer(&noisy, 0.0), grid_standardizer(&dense, 0.0));
        assert_eq!(grid_standardizer(&[vec![0.0; GRID_BINS]], 1.0), Standardizer { mean: vec![0.0], sd: vec![1.0] });
    }
}
