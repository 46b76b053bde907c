//! The searches of `twinguard attack`, each over the knobs' factors and scored by
//! the real detector (`evaluate`: a batch of factor vectors → each candidate's
//! target score and feature row, on clones of the device's twin). They work in
//! log-factor space, where "pad ×2" and "slow to ½" are the same distance.
//!
//! - **A1, random** (score-based black box, SimBA-like): the corners first, then
//!   random draws around the best so far.
//! - **A2, gradient** (CAPGD-style, Simonetto et al. 2024): finite-difference
//!   gradients through the detector, one probe per free knob in one batch, with a
//!   step of a quarter of the knob's range (a tree member is piecewise constant:
//!   a small step would see no slope, a wide one crosses its splits); sign steps
//!   with momentum 0.75, the step halved when it does not improve (CAPGD's
//!   adaptive step), a random restart when it stalls. No distilled surrogate: the
//!   differences are taken on the real members, so nothing has to transfer.
//! - **A3, coordinate** (the neighbourhood move of LT-attack, Zhang et al. 2020,
//!   in the attacker's raw fields): a tree ensemble is piecewise constant along
//!   each knob, so scanning one knob at a time over a grid reaches the
//!   neighbouring leaf tuples; the best single-knob move is taken, and when no
//!   move improves the grid is refined between its points.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::Knob;
use crate::TrainError;

/// Scores candidate factor vectors: each one's target score and feature row
/// (None when the decoder refused it).
pub(crate) type Evaluate<'a> = dyn FnMut(&[Vec<f64>]) -> Result<Vec<Option<(f64, Vec<f64>)>>, TrainError> + 'a;

/// An attack's search method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// A1: random search from the corners.
    Random,
    /// A2: finite-difference sign gradient with momentum and step halving.
    Gradient,
    /// A3: greedy coordinate search over a refining grid per knob.
    Coordinate,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Random, Method::Gradient, Method::Coordinate];
    pub fn name(self) -> &'static str {
        match self {
            Method::Random => "random",
            Method::Gradient => "gradient",
            Method::Coordinate => "coordinate",
        }
    }
    pub fn parse(s: &str) -> Result<Method, TrainError> {
        Method::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| TrainError::Config {
            key: "--methods".into(),
            reason: format!("`{s}` is not a search; one of {}", Method::ALL.map(Method::name).join(", ")),
        })
    }
}

/// The best candidate a search found.
pub(crate) struct Found {
    pub score: f64,
    pub factors: Vec<f64>,
    pub row: Vec<f64>,
    pub used: usize,
}

/// One search's state: the target, its budget, and the best so far.
pub(crate) struct Search<'e, 'a> {
    pub knobs: &'a [Knob],
    /// Knobs the attacker can move (a range, no `follows`, an original value to scale).
    pub free: Vec<usize>,
    pub thr: f64,
    pub budget: usize,
    pub batch: usize,
    pub evaluate: &'e mut Evaluate<'a>,
    pub best: Found,
}

impl Search<'_, '_> {
    fn done(&self) -> bool {
        self.best.score < self.thr || self.best.used >= self.budget
    }

    fn bounds(&self, k: usize) -> (f64, f64) {
        (self.knobs[k].min_factor.ln(), self.knobs[k].max_factor.ln())
    }

    /// Score candidates (log factors), within the budget; keeps the best; returns
    /// each one's score (+∞ when refused or not scored).
    fn try_all(&mut self, us: &[Vec<f64>]) -> Result<Vec<f64>, TrainError> {
        let room = self.budget.saturating_sub(self.best.used);
        let mut out = vec![f64::INFINITY; us.len()];
        for (c, chunk) in us[..us.len().min(room)].chunks(self.batch.max(1)).enumerate() {
            let fs: Vec<Vec<f64>> = chunk.iter().map(|u| u.iter().map(|x| x.exp()).collect()).collect();
            let got = (self.evaluate)(&fs)?;
            self.best.used += fs.len();
            for (j, (f, v)) in fs.into_iter().zip(got).enumerate() {
                if let Some((s, row)) = v {
                    out[c * self.batch.max(1) + j] = s;
                    if s < self.best.score {
                        self.best = Found { score: s, factors: f, row, used: self.best.used };
                    }
                }
            }
        }
        Ok(out)
    }

    fn clamp(&self, u: &mut [f64]) {
        for &k in &self.free {
            let (lo, hi) = self.bounds(k);
            u[k] = u[k].clamp(lo, hi);
        }
    }

    fn random_point(&self, rng: &mut rand::rngs::StdRng) -> Vec<f64> {
        let mut u = vec![0.0; self.knobs.len()];
        for &k in &self.free {
            let (lo, hi) = self.bounds(k);
            u[k] = rng.random_range(lo..=hi);
        }
        u
    }

    /// A1: the corners (all knobs at one bound, then each alone), then random
    /// draws changing a random subset of the best factors.
    fn random(&mut self, rng: &mut rand::rngs::StdRng) -> Result<(), TrainError> {
        let zero = vec![0.0; self.knobs.len()];
        let mut queue: Vec<Vec<f64>> = vec![self.knobs.iter().map(|k| k.max_factor.ln()).collect(), self.knobs.iter().map(|k| k.min_factor.ln()).collect()];
        for k in self.free.clone() {
            for b in [self.bounds(k).0, self.bounds(k).1] {
                let mut u = zero.clone();
                u[k] = b;
                queue.push(u);
            }
        }
        while !self.done() {
            let n = self.batch.max(1);
            let mut step: Vec<Vec<f64>> = queue.drain(..queue.len().min(n)).collect();
            let best: Vec<f64> = self.best.factors.iter().map(|f| f.ln()).collect();
            while step.len() < n {
                let mut u = best.clone();
                let mut idx: Vec<usize> = (0..self.knobs.len()).collect();
                idx.shuffle(rng);
                for &k in idx.iter().take(rng.random_range(1..=self.knobs.len())) {
                    let (lo, hi) = self.bounds(k);
                    u[k] = if hi > lo { rng.random_range(lo..=hi) } else { lo };
                }
                step.push(u);
            }
            self.try_all(&step)?;
        }
        Ok(())
    }

    /// A2: sign gradient steps from finite differences, momentum, step halving,
    /// random restarts.
    fn gradient(&mut self, rng: &mut rand::rngs::StdRng) -> Result<(), TrainError> {
        let free = self.free.clone();
        let range: Vec<f64> = (0..self.knobs.len()).map(|k| self.bounds(k).1 - self.bounds(k).0).collect();
        let (mut u, mut s) = (vec![0.0; self.knobs.len()], self.best.score);
        let (mut prev, mut eta) = (u.clone(), 0.5);
        while !self.done() {
            let probes: Vec<(usize, f64, Vec<f64>)> = free
                .iter()
                .map(|&k| {
                    let h = 0.25 * range[k];
                    let dir = if u[k] + h <= self.bounds(k).1 + 1e-12 { 1.0 } else { -1.0 };
                    let mut p = u.clone();
                    p[k] += dir * h;
                    (k, dir * h, p)
                })
                .collect();
            let got = self.try_all(&probes.iter().map(|p| p.2.clone()).collect::<Vec<_>>())?;
            let g: Vec<(usize, f64)> = probes.iter().zip(&got).filter(|(_, v)| v.is_finite()).map(|((k, h, _), v)| (*k, (v - s) / h)).collect();
            if self.done() {
                break;
            }
            if g.iter().all(|(_, d)| *d == 0.0) || eta < 0.02 {
                // Flat here (every probe in the same leaves) or the step is spent:
                // restart from a random point.
                u = self.random_point(rng);
                prev = u.clone();
                eta = 0.5;
                s = self.try_all(std::slice::from_ref(&u))?[0];
                continue;
            }
            let mut z = u.clone();
            for &(k, d) in &g {
                z[k] -= eta * range[k] * d.signum();
            }
            let mut x: Vec<f64> = (0..u.len()).map(|k| u[k] + 0.75 * (z[k] - u[k]) + 0.25 * (u[k] - prev[k])).collect();
            self.clamp(&mut x);
            let sx = self.try_all(std::slice::from_ref(&x))?[0];
            if sx < s {
                prev = std::mem::replace(&mut u, x);
                s = sx;
            } else {
                eta *= 0.5;
            }
        }
        Ok(())
    }

    /// A3: per knob, a grid of values; the best single-knob move is taken; with no
    /// improving move the grid is refined (twice the points).
    fn coordinate(&mut self, rng: &mut rand::rngs::StdRng) -> Result<(), TrainError> {
        let mut order = self.free.clone();
        let (mut u, mut s) = (vec![0.0; self.knobs.len()], self.best.score);
        let mut points = 5usize;
        while !self.done() && points <= 65 {
            order.shuffle(rng);
            let mut moves: Vec<Vec<f64>> = Vec::new();
            for &k in &order {
                let (lo, hi) = self.bounds(k);
                for i in 0..points {
                    let v = lo + (hi - lo) * i as f64 / (points - 1) as f64;
                    if (v - u[k]).abs() > 1e-9 {
                        let mut m = u.clone();
                        m[k] = v;
                        moves.push(m);
                    }
                }
            }
            let got = self.try_all(&moves)?;
            match got.iter().enumerate().filter(|(_, v)| v.is_finite()).min_by(|a, b| a.1.total_cmp(b.1)) {
                Some((j, &v)) if v < s => {
                    u = moves[j].clone();
                    s = v;
                }
                _ => points = 2 * points - 1,
            }
        }
        Ok(())
    }

    /// Run `method` until the target's score falls below its threshold or the
    /// budget is spent.
    pub fn run(mut self, method: Method, seed: u64) -> Result<Found, TrainError> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        match method {
            Method::Random => self.random(&mut rng)?,
            Method::Gradient if !self.free.is_empty() => self.gradient(&mut rng)?,
            Method::Coordinate if !self.free.is_empty() => self.coordinate(&mut rng)?,
            _ => {}
        }
        Ok(self.best)
    }
}

/// The knobs an attacker can move on this event: a range, no `follows`, and an
/// original value a factor changes.
pub(crate) fn free_knobs(knobs: &[Knob], x0: &[f64]) -> Vec<usize> {
    (0..knobs.len()).filter(|&k| !knobs[k].derived() && knobs[k].max_factor > knobs[k].min_factor && x0[k].is_finite() && x0[k] != 0.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::tests::knob;

    /// Run `method` on a synthetic score of the knobs' log factors.
    fn run(method: Method, f: &dyn Fn(&[f64]) -> f64, budget: usize) -> Found {
        let knobs: Vec<Knob> = (0..4).map(|k| knob(&format!("k{k}"), 0.5, 2.0)).collect();
        let mut evaluate = |fs: &[Vec<f64>]| -> Result<Vec<Option<(f64, Vec<f64>)>>, TrainError> {
            Ok(fs.iter().map(|x| {
                let u: Vec<f64> = x.iter().map(|v| v.ln()).collect();
                Some((f(&u), u))
            }).collect())
        };
        let clean = f(&[0.0; 4]);
        let s = Search { knobs: &knobs, free: free_knobs(&knobs, &[1.0; 4]), thr: 0.05, budget, batch: 16, evaluate: &mut evaluate, best: Found { score: clean, factors: vec![1.0; 4], row: vec![0.0; 4], used: 1 } };
        s.run(method, 7).unwrap()
    }

    /// Each search earns its place: the gradient descends into a small interior
    /// basin no corner or random draw meets; the coordinate search assembles an
    /// evasion from three narrow single-knob steps (a tree ensemble's leaves),
    /// where the gradient (flat almost everywhere) fails.
    #[test]
    fn the_gradient_finds_interior_minima_and_the_coordinate_search_assembles_tree_steps() {
        let bowl = |u: &[f64]| ((u[0] - 0.3).powi(2) + (u[1] + 0.2).powi(2) + (u[2] - 0.1).powi(2) + u[3].powi(2)).sqrt();
        let g = run(Method::Gradient, &bowl, 300);
        assert!(g.score < 0.05 && g.used <= 300, "gradient: {} after {}", g.score, g.used);
        assert!(run(Method::Random, &bowl, 300).score >= 0.05, "random must miss the basin");
        let inside = |x: f64, lo: f64, hi: f64| if x > lo && x < hi { 0.3 } else { 0.0 };
        let steps = |u: &[f64]| 0.92 - inside(u[0], 0.2, 0.3) - inside(u[1], -0.5, -0.4) - inside(u[3], 0.1, 0.2);
        let c = run(Method::Coordinate, &steps, 300);
        assert!(c.score < 0.05, "coordinate: {} after {}", c.score, c.used);
        let (lo, hi) = (0.5f64.ln(), 2f64.ln());
        assert!(c.factors.iter().all(|f| (lo - 1e-9..=hi + 1e-9).contains(&f.ln())), "within bounds: {:?}", c.factors);
        // The gradient sees no slope on the plateaus (every probe in the same leaves).
        assert!(run(Method::Gradient, &steps, 300).score >= 0.05);
    }
}
