//! Train / validation / test splits: temporal (stream order) or stratified by
//! class, reproducible from the recipe stored in the model card.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
pub use twinguard_models::train::Split;

/// How rows are split into train / validation / test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum SplitKind {
    /// In stream order: train on the earliest rows, validate on the next, test on the latest.
    Temporal,
    /// Per fine class, seeded random (rows are also replayed in a seeded random order).
    Stratified,
}

/// A reproducible split, recorded in the model card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitSpec {
    pub kind: SplitKind,
    pub train: f64,
    pub validation: f64,
    pub seed: u64,
}

impl SplitSpec {
    pub fn describe(&self) -> String {
        let (a, b) = (self.train * 100.0, (self.train + self.validation) * 100.0);
        match self.kind {
            SplitKind::Temporal => format!("temporal (stream order): train [0, {a:.0} %), validation [{a:.0}, {b:.0} %), test [{b:.0}, 100 %)"),
            SplitKind::Stratified => format!(
                "stratified by class, seed {}: train {a:.0} %, validation {:.0} %, test {:.0} % of each class",
                self.seed,
                b - a,
                100.0 - b
            ),
        }
    }

    /// Row indices of each part, given every row's fine class.
    pub fn apply(&self, classes: &[String]) -> Split {
        let n = classes.len();
        let cut = |len: usize| {
            let a = (len as f64 * self.train).round() as usize;
            let b = (len as f64 * (self.train + self.validation)).round() as usize;
            (a.min(len), b.min(len))
        };
        match self.kind {
            SplitKind::Temporal => {
                let (a, b) = cut(n);
                Split { train: (0..a).collect(), validation: (a..b).collect(), test: (b..n).collect() }
            }
            SplitKind::Stratified => {
                let mut by: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
                for (i, c) in classes.iter().enumerate() {
                    by.entry(c.as_str()).or_default().push(i);
                }
                let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
                let mut s = Split::default();
                for idx in by.values_mut() {
                    idx.shuffle(&mut rng);
                    let (a, b) = cut(idx.len());
                    s.train.extend_from_slice(&idx[..a]);
                    s.validation.extend_from_slice(&idx[a..b]);
                    s.test.extend_from_slice(&idx[b..]);
                }
                for v in [&mut s.train, &mut s.validation, &mut s.test] {
                    v.sort_unstable();
                }
                s
            }
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_disjoint_complete_and_stratified() {
        let classes: Vec<String> = (0..1000).map(|i| if i % 10 == 0 { "a".to_string() } else { "normal".to_string() }).collect();
        for kind in [SplitKind::Temporal, SplitKind::Stratified] {
            let s = SplitSpec { kind, train: 0.6, validation: 0.2, seed: 1 }.apply(&classes);
            let mut all: Vec<usize> = s.train.iter().chain(&s.validation).chain(&s.test).copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..1000).collect::<Vec<_>>(), "{kind:?}");
            if kind == SplitKind::Temporal {
                assert!(s.train.iter().max() < s.validation.iter().min() && s.validation.iter().max() < s.test.iter().min());
            } else {
                assert_eq!(s.test.iter().filter(|&&i| classes[i] == "a").count(), 20);
            }
        }
    }
}
