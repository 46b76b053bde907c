//! Round 0: per-feature moments merged across sites (Chan et al.'s parallel
//! update), so the global standardiser equals the one fitted on the union.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
