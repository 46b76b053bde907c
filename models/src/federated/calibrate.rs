//! The threshold from merged score histograms: each site counts its validation
//! rows' scores into fixed bins on the log-odds scale (where the probabilities
//! near 0 and 1 that decide a 1 % FPR are spread out; an SVM margin is binned as
//! it is), the aggregator adds the counts and sets the threshold conformally, as
//! [`metrics::threshold_for_fpr`](crate::metrics::threshold_for_fpr) does on raw
//! scores. No site's scores are kept in the artifact, only the summed counts.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Bins over the log-odds range [−`LOGIT_RANGE`, `LOGIT_RANGE`].
pub const BINS: usize = 2000;
const LOGIT_RANGE: f64 = 16.0;

/// Counts of normal and attack scores per bin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreHistogram {
    pub normal: Vec<u64>,
    pub attack: Vec<u64>,
}

/// Log-odds of a probability (the scale the histograms bin).
pub fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    (p / (1.0 - p)).ln()
}

/// The probability of a log-odds value.
pub fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn bin_of(z: f64) -> usize {
    let z = if z.is_nan() { -LOGIT_RANGE } else { z.clamp(-LOGIT_RANGE, LOGIT_RANGE) };
    (((z + LOGIT_RANGE) / (2.0 * LOGIT_RANGE) * BINS as f64).floor() as usize).min(BINS - 1)
}

/// The lower edge of bin `b` (log-odds), nudged up so that it falls in bin `b`.
pub(crate) fn lower_edge(b: usize) -> f64 {
    let z = -LOGIT_RANGE + 2.0 * LOGIT_RANGE * b as f64 / BINS as f64;
    if bin_of(z) < b { z.next_up() } else { z }
}

/// The centre of bin `b` (log-odds).
pub(crate) fn bin_center(b: usize) -> f64 {
    -LOGIT_RANGE + 2.0 * LOGIT_RANGE * (b as f64 + 0.5) / BINS as f64
}

impl Default for ScoreHistogram {
    fn default() -> Self {
        ScoreHistogram { normal: vec![0; BINS], attack: vec![0; BINS] }
    }
}

impl ScoreHistogram {
    /// Count the scores (log-odds, or an SVM margin) of normal and attack rows.
    pub fn of(z: &[f64], attack: &[bool]) -> ScoreHistogram {
        let mut h = ScoreHistogram::default();
        for (&s, &a) in z.iter().zip(attack) {
            let b = bin_of(s);
            if a {
                h.attack[b] += 1;
            } else {
                h.normal[b] += 1;
            }
        }
        h
    }

    /// Add another site's counts.
    pub fn add(&mut self, o: &ScoreHistogram) -> Result<(), ModelError> {
        if o.normal.len() != BINS || o.attack.len() != BINS {
            return Err(ModelError::Data(format!("a score histogram has {BINS} bins, got {} and {}", o.normal.len(), o.attack.len())));
        }
        self.normal.iter_mut().zip(&o.normal).for_each(|(a, b)| *a += b);
        self.attack.iter_mut().zip(&o.attack).for_each(|(a, b)| *a += b);
        Ok(())
    }

    pub fn normals(&self) -> u64 {
        self.normal.iter().sum()
    }

    /// Normal counts in `threshold`'s bin (log-odds) and above.
    pub fn normals_above(&self, threshold: f64) -> u64 {
        self.normal[bin_of(threshold)..].iter().sum()
    }

    pub fn attacks(&self) -> u64 {
        self.attack.iter().sum()
    }

    /// Attack counts in `threshold`'s bin (log-odds) and above.
    pub fn attacks_above(&self, threshold: f64) -> u64 {
        self.attack[bin_of(threshold)..].iter().sum()
    }

    /// The lowest bin edge (log-odds) with at most k = ⌊fpr·(n+1)⌋ normal scores
    /// in the bins at or above it (a score in the edge's own bin counts as above:
    /// conservative by at most one bin's width, 0.016 in log-odds). Above every
    /// bin (+∞) when even the top bin holds more than k.
    pub fn threshold_for_fpr(&self, fpr: f64) -> Result<f64, ModelError> {
        let n = self.normals();
        if n == 0 {
            return Err(ModelError::Data("no normal validation rows at any site: the threshold cannot be set".into()));
        }
        let k = (fpr * (n + 1) as f64).floor() as u64;
        let mut above = 0u64;
        let mut b = BINS;
        while b > 0 && above + self.normal[b - 1] <= k {
            above += self.normal[b - 1];
            b -= 1;
        }
        Ok(if b == BINS { f64::INFINITY } else { lower_edge(b) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_histograms_hold_the_target_like_the_raw_scores() {
        // 2,000 normal scores spread over (0, 1); 1 % FPR allows k = 20 above.
        let scores: Vec<f64> = (0..2000).map(|i| ((i * 7919 % 2000) as f64 + 0.5) / 2000.0).collect();
        let labels = vec![false; 2000];
        let mut merged = ScoreHistogram::default();
        for part in scores.chunks(700).zip(labels.chunks(700)) {
            let z: Vec<f64> = part.0.iter().map(|&p| logit(p)).collect();
            merged.add(&ScoreHistogram::of(&z, part.1)).unwrap();
        }
        let zt = merged.threshold_for_fpr(0.01).unwrap();
        let t = sigmoid(zt);
        let above = scores.iter().filter(|&&s| logit(s) >= zt).count();
        assert!((15..=20).contains(&above), "{above} normals at or above {t}");
        assert_eq!(merged.normals_above(zt), above as u64);
        let raw = crate::metrics::threshold_for_fpr(&scores, 0.01);
        assert!((t - raw).abs() < 0.01, "histogram {t} vs raw {raw}");
        assert!(ScoreHistogram::default().threshold_for_fpr(0.01).is_err());
    }
}
