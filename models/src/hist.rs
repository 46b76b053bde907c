//! Feature binning for histogram tree learners (the forest and the booster).
//!
//! Each column's values are cut at up to `max_bins - 1` edges taken from its
//! distinct training values (every distinct value its own bin when there are few,
//! quantiles otherwise). A value's code is the number of edges below it, so
//! `code <= b` holds exactly when `x <= edges[b]`: a split learnt on codes is the
//! threshold test `x <= edges[b]` on raw f32 values, which is what the trees store
//! and score with. NaN gets the highest code (it always goes right, as
//! `NaN <= t` is false at scoring time).

/// Column-wise cut points fitted on a training matrix.
#[derive(Debug, Clone)]
pub struct Bins {
    /// Per column, ascending edges (at most `max_bins - 1`).
    pub edges: Vec<Vec<f32>>,
}

/// Largest f32 `t` with `t <= v`.
fn f32_floor(v: f64) -> f32 {
    let t = v as f32;
    if f64::from(t) > v {
        t.next_down()
    } else {
        t
    }
}

impl Bins {
    /// Edges for every column of the row-major `data` (`rows × cols`), at most
    /// `max_bins` (2..=256) bins per column.
    pub fn fit(data: &[f32], rows: usize, cols: usize, max_bins: usize) -> Bins {
        let max_bins = max_bins.clamp(2, 256);
        let mut edges = Vec::with_capacity(cols);
        let mut col: Vec<f32> = Vec::with_capacity(rows);
        for c in 0..cols {
            col.clear();
            col.extend((0..rows).map(|r| data[r * cols + c]).filter(|v| !v.is_nan()));
            col.sort_by(f32::total_cmp);
            col.dedup();
            let e: Vec<f32> = if col.len() <= max_bins {
                // A cut between each pair of neighbours: the midpoint, rounded down
                // in f32 so the lower value stays at or below it.
                col.windows(2).map(|w| f32_floor((f64::from(w[0]) + f64::from(w[1])) / 2.0).max(w[0])).collect()
            } else {
                let mut e: Vec<f32> = (1..max_bins).map(|i| col[(i * col.len()) / max_bins - 1]).collect();
                e.dedup();
                e
            };
            edges.push(e);
        }
        Bins { edges }
    }

    /// Number of bins of column `c`.
    pub fn n_bins(&self, c: usize) -> usize {
        self.edges[c].len() + 1
    }

    /// The code of value `x` in column `c`.
    pub fn code(&self, c: usize, x: f32) -> u8 {
        let e = &self.edges[c];
        if x.is_nan() {
            return e.len() as u8;
        }
        e.partition_point(|&t| t < x) as u8
    }

    /// Codes of row-major `data`, column-major (`codes[c * rows + r]`): a node's
    /// histogram over one column reads one contiguous slice.
    pub fn codes(&self, data: &[f32], rows: usize) -> Vec<u8> {
        let cols = self.edges.len();
        let mut out = vec![0u8; rows * cols];
        for c in 0..cols {
            let dst = &mut out[c * rows..(c + 1) * rows];
            for (r, d) in dst.iter_mut().enumerate() {
                *d = self.code(c, data[r * cols + c]);
            }
        }
        out
    }
}

/// Reorder `idx` in place so the rows whose code in `column` (one column of
/// [`Bins::codes`]) is at most `bin` come first; returns how many they are.
pub fn partition(idx: &mut [u32], column: &[u8], bin: usize) -> usize {
    let mut i = 0;
    for j in 0..idx.len() {
        if usize::from(column[idx[j] as usize]) <= bin {
            idx.swap(i, j);
            i += 1;
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_on_codes_is_the_threshold_test_on_values() {
        let data: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 613) as f32 * 0.37 - 50.0).collect();
        for max_bins in [4, 32, 256, 1000] {
            let b = Bins::fit(&data, 1000, 1, max_bins);
            assert!(b.n_bins(0) <= max_bins.clamp(2, 256));
            let codes = b.codes(&data, 1000);
            for (bin, &t) in b.edges[0].iter().enumerate() {
                for (x, &c) in data.iter().zip(&codes) {
                    assert_eq!(usize::from(c) <= bin, *x <= t, "x {x}, edge {t}, code {c}, bin {bin}");
                }
            }
        }
    }

    #[test]
    fn few_distinct_values_each_get_a_bin_and_nan_goes_last() {
        let data = [1.0f32, 2.0, 2.0, 3.0, f32::NAN, 1.0];
        let b = Bins::fit(&data, 6, 1, 256);
        assert_eq!(b.n_bins(0), 3);
        // NaN takes the top code: the right side of any split, as at scoring time.
        assert_eq!(b.codes(&data, 6), vec![0, 1, 1, 2, 2, 0]);
    }
}
