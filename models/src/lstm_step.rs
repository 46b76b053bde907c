//! The LSTM's scoring step in a layout for SIMD, as wide as the CPU has.
//!
//! A step is the gate sums `z = b + Σ_k x_k·Wx[k] + Σ_j h_j·Wh[j]` (4H sums over
//! every input: 174 × 64 products for the default WUSTL model), then σ and tanh of
//! each sum, the cell and hidden update and the head. The stored form ran it with
//! the portable x86-64 baseline (4 lanes, the sums in memory) and called libm's
//! `expf` and `tanhf` 81 times a step — 60 % of its time (`perf`), `tanhf` alone 47 %.
//!
//! Here, built when a model first steps and never stored: `b`, `Wx` and `Wh` are one
//! buffer whose rows are padded to a multiple of [`GROUP`] floats and start on 64-byte
//! boundaries; the sums of a group of columns stay in registers over all the rows,
//! in vectors as wide as the CPU offers (AVX-512, AVX2, SSE) picked at run time by
//! `macerator` — the SIMD layer burn-ndarray already builds, whose dispatch is safe
//! (the workspace forbids `unsafe`); σ and tanh are computed a vector at a time by
//! [`exp`] (Cephes' `expf` reduction and polynomial) and [`tanh`].
//!
//! Every lane does the same IEEE operations in the same order whatever the vector
//! width — multiplies and adds rounded one at a time (never fused), divisions,
//! comparisons — so a step gives the same bits on every x86-64 CPU (and without
//! depending on the C library's `expf`/`tanhf`, which differ between glibc
//! versions): verdicts replayed after a crash or on another machine stay
//! byte-identical. The sums are bit for bit the stored form's (tested); σ and tanh
//! are within a few units in the last place of the exact values (tested), so scores
//! moved by at most ~1e-7 against the libm ones.

use macerator::{AutoArch, Scalar, Simd, Vector, WithSimd};

/// Floats in a column group: a padded row's length is a multiple of it, and 64 floats
/// are four 64-byte lines.
const GROUP: usize = 64;

/// `b`, `Wx` and `Wh` of one model, each row padded to `width` floats.
pub(crate) struct Packed {
    /// 4H rounded up to a multiple of [`GROUP`].
    width: usize,
    inputs: usize,
    hidden: usize,
    /// `16` spare floats, then the rows from the first 64-byte boundary (`start`).
    buf: Vec<f32>,
    start: usize,
}

impl Packed {
    /// The layout of `b` (4H), `wx` (`inputs` rows of 4H) and `wh` (`hidden` rows).
    pub(crate) fn new(b: &[f32], wx: &[f32], wh: &[f32], inputs: usize, hidden: usize) -> Packed {
        let h4 = 4 * hidden;
        let width = h4.div_ceil(GROUP).max(1) * GROUP;
        let rows = 1 + inputs + hidden;
        let mut buf = vec![0f32; rows * width + 16];
        let start = buf.as_ptr().align_offset(64).min(16);
        let src = std::iter::once(b).chain(wx.chunks_exact(h4.max(1))).chain(wh.chunks_exact(h4.max(1)));
        for (r, s) in src.enumerate() {
            buf[start + r * width..start + r * width + h4].copy_from_slice(s);
        }
        Packed { width, inputs, hidden, buf, start }
    }

    /// One event: `x` (len `inputs`), `state` = hidden ++ cell (len `2 * hidden`)
    /// updated in place; returns σ(h·head_w + head_b).
    pub(crate) fn step(&self, x: &[f32], state: &mut [f32], head_w: &[f32], head_b: f32) -> f32 {
        assert!(x.len() == self.inputs && state.len() == 2 * self.hidden && head_w.len() == self.hidden);
        let (nb, hb) = (self.width / 16, self.hidden.div_ceil(16));
        let need = 3 * nb + 2 * hb;
        let mut stack = [Block::ZERO; 64];
        let mut heap = Vec::new();
        let buf: &mut [Block] = if need <= stack.len() {
            &mut stack[..need]
        } else {
            heap.resize(need, Block::ZERO);
            &mut heap
        };
        AutoArch::new().dispatch(Step { p: self, x, state, head_w, head_b, buf })
    }

    /// The rows as one aligned slice (`b`, then `wx`, then `wh`).
    fn rows(&self) -> &[f32] {
        &self.buf[self.start..self.start + (1 + self.inputs + self.hidden) * self.width]
    }
}

/// 16 floats on a 64-byte boundary: the step's scratch, read as vectors of any width.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([f32; 16]);

impl Block {
    const ZERO: Block = Block([0.0; 16]);
}

/// Float `i` of a run of blocks.
#[inline(always)]
fn at(b: &[Block], i: usize) -> f32 {
    b[i / 16].0[i % 16]
}

/// Writes `v` at float `i` of a run of blocks (`i` a multiple of the lane count).
#[inline(always)]
fn put<S: Simd>(b: &mut [Block], i: usize, v: Vector<S, f32>) {
    let lanes: &[f32] = bytemuck::cast_slice(std::slice::from_ref(&*v));
    b[i / 16].0[i % 16..i % 16 + lanes.len()].copy_from_slice(lanes);
}

/// What [`map`] computes.
const EXP: u8 = 0;
const SIGMOID: u8 = 1;
const TANH: u8 = 2;

/// `dst` = `F` ([`EXP`], [`SIGMOID`] or [`TANH`]) of every vector of `src`. (A
/// constant, not a function value: a call through `Fn` goes through a shim compiled
/// without the dispatched target features, and the intrinsics behind it are then
/// not inlined: with closures and function values the step ran 2.7–3.3× slower
/// than the scalar one.)
#[inline(always)]
fn map<S: Simd, const F: u8>(src: &[Block], dst: &mut [Block]) {
    for (s, d) in src.iter().zip(dst.iter_mut()) {
        let (_, v, _) = f32::align_to::<S>(&s.0);
        for (k, &x) in v.iter().enumerate() {
            let y = match F {
                EXP => exp(x),
                SIGMOID => sigmoid(x),
                _ => tanh(x),
            };
            put(std::slice::from_mut(d), k * f32::lanes::<S>(), y);
        }
    }
}

/// e^x a vector at a time (Cephes `expf`: x = n·ln 2 + r, |r| ≤ ½ ln 2, a degree-7
/// polynomial for e^r, 2^n from the exponent bits), for x clamped to [−87, 88] (so
/// 2^n stays a normal float; e^−87 ≈ 1.6e−38, e^88 ≈ 1.7e38). Within 1 ulp (tested).
#[inline(always)]
pub(crate) fn exp<S: Simd>(x: Vector<S, f32>) -> Vector<S, f32> {
    let x = x.max(splat::<S>(-87.0)).min(splat::<S>(88.0));
    let n = (x * splat::<S>(std::f32::consts::LOG2_E)).round_to_int();
    let nf = n.to_float();
    let r = x - nf * splat::<S>(0.693_359_4);
    let r = r - nf * splat::<S>(-2.121_944_4e-4);
    let mut y = splat::<S>(1.987_569_1e-4);
    for p in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        y = y * r + splat::<S>(p);
    }
    let y = y * (r * r) + r + splat::<S>(1.0);
    let two_n = ((n + 127i32.splat::<S>()) << 23).reinterpret::<f32>();
    y * two_n
}

/// σ(x) = 1 / (1 + e^−x).
#[inline(always)]
pub(crate) fn sigmoid<S: Simd>(x: Vector<S, f32>) -> Vector<S, f32> {
    let one = 1f32.splat::<S>();
    one / (one + exp(c0::<S>() - x))
}

#[inline(always)]
fn c0<S: Simd>() -> Vector<S, f32> {
    0f32.splat::<S>()
}

/// `v` in every lane.
#[inline(always)]
fn splat<S: Simd>(v: f32) -> Vector<S, f32> {
    v.splat::<S>()
}

/// tanh(x): below |x| = 0.625 Cephes' odd polynomial (x + x³·P(x²)), above it
/// 1 − 2 / (e^2|x| + 1) with the sign of x. Within 2 ulp (tested).
#[inline(always)]
pub(crate) fn tanh<S: Simd>(x: Vector<S, f32>) -> Vector<S, f32> {
    let z = x * x;
    let mut p = splat::<S>(-5.704_988_7e-3);
    for k in [2.063_908_9e-2, -5.373_971_6e-2, 0.133_314_42, -0.333_332_82] {
        p = p * z + splat::<S>(k);
    }
    let small = p * z * x + x;
    let a = x.abs();
    let t = splat::<S>(1.0) - splat::<S>(2.0) / (exp(a + a) + splat::<S>(1.0));
    let large = x.lt(c0::<S>()).select(c0::<S>() - t, t);
    a.lt(splat::<S>(0.625)).select(small, large)
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed {{ width: {}, inputs: {}, hidden: {} }}", self.width, self.inputs, self.hidden)
    }
}

/// A model's [`Packed`] layout, built on first use; a clone starts empty (the
/// layout's alignment belongs to its own allocation).
#[derive(Debug, Default)]
pub(crate) struct PackedCell(std::sync::OnceLock<Packed>);

impl Clone for PackedCell {
    fn clone(&self) -> Self {
        PackedCell::default()
    }
}

impl PackedCell {
    pub(crate) fn get_or_init(&self, f: impl FnOnce() -> Packed) -> &Packed {
        self.0.get_or_init(f)
    }
}

struct Step<'a> {
    p: &'a Packed,
    x: &'a [f32],
    state: &'a mut [f32],
    head_w: &'a [f32],
    head_b: f32,
    /// z, σ(z), tanh(z) (`width` floats each), the new cell and its tanh
    /// (`hidden` rounded up to 16 each).
    buf: &'a mut [Block],
}

impl WithSimd for Step<'_> {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: Simd>(self) -> f32 {
        // Vectors held in registers per column group: 64 floats (4 × 512-bit,
        // 8 × 256-bit), or 8 narrower vectors.
        match f32::lanes::<S>() {
            16 => self.run::<S, 4>(),
            _ => self.run::<S, 8>(),
        }
    }
}

impl Step<'_> {
    #[inline(always)]
    fn run<S: Simd, const M: usize>(self) -> f32 {
        let Step { p, x, state, head_w, head_b, buf } = self;
        let (hn, nb) = (p.hidden, p.width / 16);
        let (z, rest) = buf.split_at_mut(nb);
        let (sg, rest) = rest.split_at_mut(nb);
        let (th, rest) = rest.split_at_mut(nb);
        let (cb, tc) = rest.split_at_mut(rest.len() / 2);
        let (hs, cs) = state.split_at_mut(hn);
        sums::<S, M>(p, x, hs, z);
        // Gates (i, f, o, g), the cell, the hidden state and the head.
        map::<S, SIGMOID>(z, sg);
        map::<S, TANH>(z, th);
        for j in 0..hn {
            let c = at(sg, hn + j) * cs[j] + at(sg, j) * at(th, 3 * hn + j);
            cs[j] = c;
            cb[j / 16].0[j % 16] = c;
        }
        map::<S, TANH>(cb, tc);
        let mut logit = head_b;
        for j in 0..hn {
            hs[j] = at(sg, 2 * hn + j) * at(tc, j);
            logit += hs[j] * head_w[j];
        }
        let mut one = [Block::ZERO];
        put(&mut one, 0, sigmoid(logit.splat::<S>()));
        one[0].0[0]
    }
}

/// `z` = the gate sums: `b`, then every input in order, then every hidden unit,
/// each column a lane; a group of `M` vectors of columns stays in registers over
/// all the rows.
#[inline(always)]
fn sums<S: Simd, const M: usize>(p: &Packed, x: &[f32], h: &[f32], z: &mut [Block]) {
    let lanes = f32::lanes::<S>();
    let (head, v, tail) = f32::align_to::<S>(p.rows());
    assert!(head.is_empty() && tail.is_empty() && GROUP % (M * lanes) == 0, "the packed LSTM rows are not aligned for {lanes} lanes");
    let vw = p.width / lanes;
    let (b, w) = v.split_at(vw);
    let (wx, wh) = w.split_at(p.inputs * vw);
    for g in (0..vw).step_by(M) {
        let mut acc: [Vector<S, f32>; M] = std::array::from_fn(|j| b[g + j]);
        for (rows, vals) in [(wx, x), (wh, h)] {
            for (k, &xk) in vals.iter().enumerate() {
                if xk != 0.0 {
                    let xv = xk.splat::<S>();
                    for (a, &wv) in acc.iter_mut().zip(&rows[k * vw + g..k * vw + g + M]) {
                        *a = *a + xv * wv;
                    }
                }
            }
        }
        for (j, &a) in acc.iter().enumerate() {
            put(z, (g + j) * lanes, a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored form's sums, as `LstmModel::step` computed them before this layout.
    fn stored_sums(b: &[f32], wx: &[f32], wh: &[f32], x: &[f32], h: &[f32]) -> Vec<f32> {
        let h4 = b.len();
        let mut z = b.to_vec();
        for (ws, vals) in [(wx, x), (wh, h)] {
            for (&v, w) in vals.iter().zip(ws.chunks_exact(h4)) {
                if v != 0.0 {
                    for (zz, &ww) in z.iter_mut().zip(w) {
                        *zz += v * ww;
                    }
                }
            }
        }
        z
    }

    /// The stored form's step (libm's `expf` and `tanhf`).
    fn stored_step(b: &[f32], wx: &[f32], wh: &[f32], head: (&[f32], f32), x: &[f32], state: &mut [f32]) -> f32 {
        let hn = state.len() / 2;
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        let z = stored_sums(b, wx, wh, x, &state[..hn]);
        let (hs, cs) = state.split_at_mut(hn);
        let mut logit = head.1;
        for j in 0..hn {
            let c = sig(z[hn + j]) * cs[j] + sig(z[j]) * z[3 * hn + j].tanh();
            cs[j] = c;
            hs[j] = sig(z[2 * hn + j]) * c.tanh();
            logit += hs[j] * head.0[j];
        }
        sig(logit)
    }

    fn noise(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
    }

    struct SumsOnly<'a>(&'a Packed, &'a [f32], &'a [f32], &'a mut [Block]);
    impl WithSimd for SumsOnly<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self) {
            match f32::lanes::<S>() {
                16 => sums::<S, 4>(self.0, self.1, self.2, self.3),
                _ => sums::<S, 8>(self.0, self.1, self.2, self.3),
            }
        }
    }

    /// exp (0), tanh (1) or σ (2) of every value, a vector at a time.
    fn apply(xs: &[f32], which: usize) -> Vec<f32> {
        struct Op<'a>(&'a [f32], usize);
        impl WithSimd for Op<'_> {
            type Output = Vec<f32>;
            #[inline(always)]
            fn with_simd<S: Simd>(self) -> Vec<f32> {
                let mut src = vec![Block::ZERO; self.0.len().div_ceil(16)];
                for (i, &v) in self.0.iter().enumerate() {
                    src[i / 16].0[i % 16] = v;
                }
                let mut dst = src.clone();
                match self.1 {
                    0 => map::<S, EXP>(&src, &mut dst),
                    1 => map::<S, TANH>(&src, &mut dst),
                    _ => map::<S, SIGMOID>(&src, &mut dst),
                }
                (0..self.0.len()).map(|i| at(&dst, i)).collect()
            }
        }
        AutoArch::new().dispatch(Op(xs, which))
    }

    #[test]
    fn the_gate_sums_are_the_stored_forms_bits_for_every_size() {
        let mut seed = 7u64;
        for (inputs, hidden) in [(174, 16), (3, 1), (40, 5), (17, 24), (9, 40)] {
            let h4 = 4 * hidden;
            let b: Vec<f32> = (0..h4).map(|_| noise(&mut seed)).collect();
            let wx: Vec<f32> = (0..inputs * h4).map(|_| noise(&mut seed)).collect();
            let wh: Vec<f32> = (0..hidden * h4).map(|_| noise(&mut seed)).collect();
            let p = Packed::new(&b, &wx, &wh, inputs, hidden);
            assert_eq!(p.width % GROUP, 0);
            for trial in 0..20 {
                // Zeros (skipped), tiny and huge magnitudes: rounding differences show.
                let x: Vec<f32> = (0..inputs).map(|k| if (k + trial) % 5 == 0 { 0.0 } else { noise(&mut seed) * 10f32.powi((k % 7) as i32 - 3) }).collect();
                let h: Vec<f32> = (0..hidden).map(|_| noise(&mut seed)).collect();
                let mut z = vec![Block([f32::NAN; 16]); p.width / 16];
                AutoArch::new().dispatch(SumsOnly(&p, &x, &h, &mut z));
                let got: Vec<u32> = (0..h4).map(|i| at(&z, i).to_bits()).collect();
                let want: Vec<u32> = stored_sums(&b, &wx, &wh, &x, &h).iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "inputs {inputs}, hidden {hidden}, trial {trial}");
                assert!((h4..p.width).all(|i| at(&z, i) == 0.0), "padding columns stay 0");
            }
        }
    }

    #[test]
    fn exp_sigmoid_and_tanh_are_within_a_few_ulp() {
        let xs: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 4.4e-4).chain([0.0, -0.0, 1e-30, -1e-30, 0.625, -0.625, 87.0, -87.0]).collect();
        let ulp = |want: f64| f64::from(f32::EPSILON) * want.abs().max(f64::from(f32::MIN_POSITIVE));
        for (which, name) in [(0, "exp"), (1, "tanh"), (2, "sigmoid")] {
            let got = apply(&xs, which);
            let mut worst = 0f64;
            for (&x, &g) in xs.iter().zip(&got) {
                let x64 = f64::from(x);
                if which == 0 && !(-87.0..=88.0).contains(&x) {
                    continue; // exp clamps its argument there
                }
                let want = match which {
                    0 => x64.exp(),
                    1 => x64.tanh(),
                    _ => 1.0 / (1.0 + (-x64).exp()),
                };
                worst = worst.max((f64::from(g) - want).abs() / ulp(want));
            }
            // Measured: exp 0.65, tanh 1.08, σ 1.21 (relative to the exact value).
            assert!(worst <= if which == 0 { 1.0 } else { 2.0 }, "{name}: {worst} ulp");
        }
        let big = apply(&[1e4, -1e4, 90.0, -90.0], 1);
        assert_eq!(big, [1.0, -1.0, 1.0, -1.0]);
        let sat = apply(&[1e4, -1e4], 2);
        assert!(sat[0] == 1.0 && sat[1] < 1e-37 && sat[1] >= 0.0, "{sat:?}");
    }

    #[test]
    fn a_step_follows_the_stored_forms_step() {
        let mut seed = 11u64;
        let (inputs, hidden) = (174, 16);
        let h4 = 4 * hidden;
        let b: Vec<f32> = (0..h4).map(|_| noise(&mut seed) * 0.3).collect();
        let wx: Vec<f32> = (0..inputs * h4).map(|_| noise(&mut seed) * 0.1).collect();
        let wh: Vec<f32> = (0..hidden * h4).map(|_| noise(&mut seed) * 0.3).collect();
        let head_w: Vec<f32> = (0..hidden).map(|_| noise(&mut seed)).collect();
        let p = Packed::new(&b, &wx, &wh, inputs, hidden);
        let (mut s1, mut s2) = (vec![0f32; 2 * hidden], vec![0f32; 2 * hidden]);
        for _ in 0..500 {
            let x: Vec<f32> = (0..inputs).map(|_| noise(&mut seed)).collect();
            let got = p.step(&x, &mut s1, &head_w, 0.1);
            let want = stored_step(&b, &wx, &wh, (&head_w, 0.1), &x, &mut s2);
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
            for (a, b) in s1.iter().zip(&s2) {
                assert!((a - b).abs() < 1e-4, "state {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_clone_lays_itself_out_afresh() {
        let cell = PackedCell::default();
        cell.get_or_init(|| Packed::new(&[1.0; 4], &[2.0; 4], &[3.0; 4], 1, 1));
        assert!(cell.clone().0.get().is_none());
    }
}
