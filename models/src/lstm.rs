//! Many-to-many LSTM (one P(attack) per event) trained with burn and stepped natively
//! one event at a time, so each device's twin can carry the recurrent state.
//!
//! Training: burn 0.22.1 `Lstm` + `Linear(hidden → 1)` head, binary cross-entropy on
//! the logits at every step (optional positive-class weight), Adam with gradient-norm
//! clipping, truncated BPTT over chunks of `chunk_len` events with the state carried
//! (detached) from chunk to chunk. Backend: ndarray with autodiff, or CUDA with the
//! `cuda` feature.
//!
//! Inference: the weights are exported to plain vectors and [`LstmModel::step`] runs
//! burn's cell equations by hand (gates in burn's order and form):
//! ```text
//! i = σ(x·Wxi + h·Whi + bi)   f = σ(x·Wxf + h·Whf + bf)   o = σ(x·Wxo + h·Who + bo)
//! g = tanh(x·Wxg + h·Whg + bg)   c' = f⊙c + i⊙g   h' = o⊙tanh(c')   p = σ(h'·w + b)
//! ```
//! where burn's `bi` is the sum of the input- and hidden-transform biases.

use burn::module::{Module, Param};
use burn::nn::{GateController, Linear, Lstm, LstmConfig, LstmState};
use burn::optim::{AdamConfig, GradientsParams};
use burn::grad_clipping::GradientClippingConfig;
use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::lstm_step::{Packed, PackedCell};
use crate::{Matrix, ModelError};

/// Hyper-parameters of [`LstmModel::fit`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LstmParams {
    /// Hidden (and cell) state size.
    pub hidden: usize,
    /// Truncated-BPTT chunk length in events.
    pub chunk_len: usize,
    /// Parallel stream segments per batch.
    pub streams: usize,
    pub epochs: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Loss weight of attack events (1 = unweighted; e.g. n_normal / n_attack to balance).
    pub pos_weight: f32,
    pub seed: u64,
}

impl Default for LstmParams {
    fn default() -> Self {
        LstmParams { hidden: 16, chunk_len: 32, streams: 16, epochs: 15, lr: 1e-2, pos_weight: 1.0, seed: 42 }
    }
}

/// Exported LSTM: plain weights, no burn at inference.
///
/// Layout (gate order i, f, o, g = input, forget, output, cell candidate, as burn's
/// `Lstm` fields `input_gate, forget_gate, output_gate, cell_gate`):
/// `wx[k*4H + gate*H + j]` = burn `gate.input_transform.weight[k][j]` (`[d_in, H]`),
/// `wh[k*4H + gate*H + j]` = burn `gate.hidden_transform.weight[k][j]` (`[H, H]`),
/// `b[gate*H + j]` = sum of both transforms' biases, head `p = σ(h·head_w + head_b)`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LstmModel {
    input_dim: usize,
    hidden: usize,
    wx: Vec<f32>,
    wh: Vec<f32>,
    b: Vec<f32>,
    head_w: Vec<f32>,
    head_b: f32,
    /// `b`, `wx` and `wh` laid out for [`step`](Self::step), built on first use.
    #[serde(skip)]
    packed: PackedCell,
}

/// burn network: LSTM + linear head.
#[derive(Module, Debug)]
struct Net {
    lstm: Lstm,
    head: Linear,
}

fn param_err(name: &'static str, why: impl Into<String>) -> ModelError {
    ModelError::Param { name, why: why.into() }
}

fn train_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        Device::cuda(0).autodiff()
    }
    #[cfg(not(feature = "cuda"))]
    {
        #[allow(deprecated)]
        Device::ndarray().autodiff()
    }
}

/// A `Linear` with weights drawn from U(-k, k), k = 1/√fan (PyTorch's LSTM init), from
/// our seeded RNG so training is reproducible independently of burn's global RNG.
fn seeded_linear(d_in: usize, d_out: usize, k: f32, bias: f32, rng: &mut StdRng, device: &Device) -> Linear {
    let w: Vec<f32> = (0..d_in * d_out).map(|_| rng.random_range(-k..k)).collect();
    let b: Vec<f32> = (0..d_out).map(|_| bias + rng.random_range(-k..k)).collect();
    Linear {
        weight: Param::from_tensor(Tensor::<2>::from_data(TensorData::new(w, [d_in, d_out]), device)),
        bias: Some(Param::from_tensor(Tensor::<1>::from_data(TensorData::new(b, [d_out]), device))),
    }
}

fn seeded_net(d_in: usize, hidden: usize, seed: u64, device: &Device) -> Net {
    let mut rng = StdRng::seed_from_u64(seed);
    let k = 1.0 / (hidden as f32).sqrt();
    let mut gate = |bias: f32| GateController {
        input_transform: seeded_linear(d_in, hidden, k, bias, &mut rng, device),
        hidden_transform: seeded_linear(hidden, hidden, k, 0.0, &mut rng, device),
    };
    let mut lstm = LstmConfig::new(d_in, hidden, true).init(device);
    lstm.input_gate = gate(0.0);
    lstm.forget_gate = Some(gate(1.0)); // forget bias 1: remember by default
    lstm.output_gate = gate(0.0);
    lstm.cell_gate = gate(0.0);
    let head = seeded_linear(hidden, 1, k, 0.0, &mut rng, device);
    Net { lstm, head }
}

/// A `Linear` holding given weights (`[d_in, d_out]` row-major) and bias.
fn fixed_linear(w: Vec<f32>, d_in: usize, d_out: usize, b: Vec<f32>, device: &Device) -> Linear {
    Linear {
        weight: Param::from_tensor(Tensor::<2>::from_data(TensorData::new(w, [d_in, d_out]), device)),
        bias: Some(Param::from_tensor(Tensor::<1>::from_data(TensorData::new(b, [d_out]), device))),
    }
}

/// The burn network holding an exported model's weights (both biases of a gate
/// go to its input transform, so exporting it again gives the same model).
fn imported_net(m: &LstmModel, device: &Device) -> Net {
    let (d, h) = (m.input_dim, m.hidden);
    let h4 = 4 * h;
    let gate = |g: usize| {
        let wi: Vec<f32> = (0..d).flat_map(|k| m.wx[k * h4 + g * h..k * h4 + (g + 1) * h].iter().copied()).collect();
        let whh: Vec<f32> = (0..h).flat_map(|k| m.wh[k * h4 + g * h..k * h4 + (g + 1) * h].iter().copied()).collect();
        GateController {
            input_transform: fixed_linear(wi, d, h, m.b[g * h..(g + 1) * h].to_vec(), device),
            hidden_transform: fixed_linear(whh, h, h, vec![0.0; h], device),
        }
    };
    let mut lstm = LstmConfig::new(d, h, true).init(device);
    lstm.input_gate = gate(0);
    lstm.forget_gate = Some(gate(1));
    lstm.output_gate = gate(2);
    lstm.cell_gate = gate(3);
    let head = fixed_linear(m.head_w.clone(), h, 1, vec![m.head_b], device);
    Net { lstm, head }
}

fn to_vec(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("f32 weights")
}
fn to_vec1(t: Tensor<1>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("f32 weights")
}

impl LstmModel {
    fn export(net: &Net, input_dim: usize, hidden: usize) -> LstmModel {
        let h4 = 4 * hidden;
        let mut wx = vec![0f32; input_dim * h4];
        let mut wh = vec![0f32; hidden * h4];
        let mut b = vec![0f32; h4];
        let forget = net.lstm.forget_gate.as_ref().expect("forget gate (input_forget = false)");
        let gates = [&net.lstm.input_gate, forget, &net.lstm.output_gate, &net.lstm.cell_gate];
        for (g, gate) in gates.iter().enumerate() {
            let wi = to_vec(gate.input_transform.weight.val());
            for k in 0..input_dim {
                wx[k * h4 + g * hidden..k * h4 + (g + 1) * hidden].copy_from_slice(&wi[k * hidden..(k + 1) * hidden]);
            }
            let whh = to_vec(gate.hidden_transform.weight.val());
            for k in 0..hidden {
                wh[k * h4 + g * hidden..k * h4 + (g + 1) * hidden].copy_from_slice(&whh[k * hidden..(k + 1) * hidden]);
            }
            for lin in [&gate.input_transform, &gate.hidden_transform] {
                if let Some(bias) = &lin.bias {
                    for (acc, v) in b[g * hidden..(g + 1) * hidden].iter_mut().zip(to_vec1(bias.val())) {
                        *acc += v;
                    }
                }
            }
        }
        let head_w = to_vec(net.head.weight.val());
        let head_b = net.head.bias.as_ref().map(|p| to_vec1(p.val())[0]).unwrap_or(0.0);
        LstmModel { input_dim, hidden, wx, wh, b, head_w, head_b, packed: PackedCell::default() }
    }

    /// Trains on device event sequences. `seqs[s]` lists row indices of `x` for one
    /// device in event order; `y[i]` is the label of row `i` (true = attack).
    ///
    /// Loss: binary cross-entropy at every event (attack events weighted by
    /// `pos_weight`). Truncated BPTT: the events are laid out as `streams` parallel
    /// lanes; every sequence is cut into contiguous segments of about
    /// `total_events / streams` events (a multiple of `chunk_len`), and lanes process
    /// their segments chunk by chunk, carrying the (detached) state from one chunk to
    /// the next, so training matches streaming where the state is never reset. The
    /// state starts from zeros at the start of each segment (for a segment that starts
    /// mid-sequence this is the one approximation). Deterministic for a given seed on
    /// the CPU backend. `progress(epoch, epochs, mean_loss)` after each epoch
    /// (epoch counts from 1).
    ///
    /// Errors: no events, `y.len() != x.rows`, an index out of range, only one class
    /// among the sequenced rows, or parameters out of range.
    pub fn fit(
        x: &Matrix,
        y: &[bool],
        seqs: &[Vec<usize>],
        params: &LstmParams,
        progress: &mut dyn FnMut(usize, usize, f32),
    ) -> Result<LstmModel, ModelError> {
        Self::fit_from(None, x, y, seqs, params, progress)
    }

    /// [`LstmModel::fit`] starting from `init`'s weights instead of the seeded
    /// initialisation (a federated round: local epochs from the global model).
    pub fn fit_from(
        init: Option<&LstmModel>,
        x: &Matrix,
        y: &[bool],
        seqs: &[Vec<usize>],
        params: &LstmParams,
        progress: &mut dyn FnMut(usize, usize, f32),
    ) -> Result<LstmModel, ModelError> {
        if let Some(m) = init.filter(|m| m.input_dim != x.cols || m.hidden != params.hidden) {
            return Err(ModelError::Data(format!(
                "the starting LSTM has {} inputs × {} hidden units, the fit {} × {}",
                m.input_dim, m.hidden, x.cols, params.hidden
            )));
        }
        if x.cols == 0 {
            return Err(ModelError::Data("empty training set (0 feature columns)".into()));
        }
        if y.len() != x.rows {
            return Err(ModelError::Data(format!("{} labels for {} rows", y.len(), x.rows)));
        }
        let total: usize = seqs.iter().map(Vec::len).sum();
        if total == 0 {
            return Err(ModelError::Data("empty training set (no events in the sequences)".into()));
        }
        if let Some((s, &i)) = seqs.iter().enumerate().flat_map(|(s, q)| q.iter().map(move |i| (s, i))).find(|(_, &i)| i >= x.rows) {
            return Err(ModelError::Data(format!("sequence {s} refers to row {i}, but x has {} rows", x.rows)));
        }
        let n_pos = seqs.iter().flatten().filter(|&&i| y[i]).count();
        if n_pos == 0 || n_pos == total {
            return Err(ModelError::Data("only one class among the sequenced rows".into()));
        }
        if params.hidden == 0 {
            return Err(param_err("hidden", "must be at least 1"));
        }
        if params.chunk_len == 0 {
            return Err(param_err("chunk_len", "must be at least 1"));
        }
        if params.streams == 0 {
            return Err(param_err("streams", "must be at least 1"));
        }
        if params.epochs == 0 {
            return Err(param_err("epochs", "must be at least 1"));
        }
        if !(params.lr > 0.0 && params.lr.is_finite()) {
            return Err(param_err("lr", format!("{} is not a positive finite number", params.lr)));
        }
        if !(params.pos_weight > 0.0 && params.pos_weight.is_finite()) {
            return Err(param_err("pos_weight", format!("{} is not a positive finite number", params.pos_weight)));
        }

        let (d, h, l) = (x.cols, params.hidden, params.chunk_len);
        let batches = layout_batches(x, y, seqs, params);
        let b = batches.lanes;

        let device = train_device();
        let mut net = match init {
            Some(m) => imported_net(m, &device),
            None => seeded_net(d, h, params.seed, &device),
        };
        let mut optim = AdamConfig::new().with_grad_clipping(Some(GradientClippingConfig::Norm(1.0))).init();

        for epoch in 1..=params.epochs {
            let mut state: Option<(Tensor<2>, Tensor<2>)> = None;
            let (mut loss_sum, mut weight_sum) = (0f64, 0f64);
            for chunk in &batches.chunks {
                if chunk.weight_sum == 0.0 {
                    state = None; // only padding left in every lane
                    continue;
                }
                let xs = Tensor::<3>::from_data(TensorData::new(chunk.x.clone(), [b, l, d]), &device);
                let ys = Tensor::<2>::from_data(TensorData::new(chunk.y.clone(), [b, l]), &device);
                let ws = Tensor::<2>::from_data(TensorData::new(chunk.w.clone(), [b, l]), &device);
                let init = state.take().map(|(c, hh)| {
                    let keep = Tensor::<2>::from_data(TensorData::new(chunk.keep.clone(), [b, 1]), &device);
                    LstmState::new(c * keep.clone(), hh * keep)
                });
                let (out, st) = net.lstm.forward(xs, init);
                let z = net.head.forward(out).reshape([b, l]);
                // stable BCE with logits: max(z,0) − z·y + log(1 + e^−|z|)
                let bce = z.clone().clamp_min(0.0) - z.clone() * ys + z.abs().neg().exp().log1p();
                let loss = (bce * ws).sum().div_scalar(chunk.weight_sum);
                let loss_val: f32 = loss.clone().into_scalar();
                state = Some((st.cell.detach(), st.hidden.detach()));
                let grads = GradientsParams::from_grads(loss.backward(), &net);
                net = optim.step(params.lr, net, grads);
                loss_sum += f64::from(loss_val) * f64::from(chunk.weight_sum);
                weight_sum += f64::from(chunk.weight_sum);
            }
            let mean = (loss_sum / weight_sum.max(f64::MIN_POSITIVE)) as f32;
            if !mean.is_finite() {
                return Err(ModelError::Train(format!("LSTM loss diverged ({mean}) in epoch {epoch}")));
            }
            progress(epoch, params.epochs, mean);
        }
        Ok(Self::export(&net, d, h))
    }

    /// The untrained model every fit with `params.seed` starts from (a
    /// federation's round-0 global LSTM).
    pub fn initial(input_dim: usize, params: &LstmParams) -> LstmModel {
        Self::export(&seeded_net(input_dim, params.hidden, params.seed, &train_device()), input_dim, params.hidden)
    }

    /// All weights as one vector (`wx`, `wh`, `b`, `head_w`, `head_b`): what a
    /// federation averages.
    pub fn to_vector(&self) -> Vec<f64> {
        self.wx.iter().chain(&self.wh).chain(&self.b).chain(&self.head_w).chain([&self.head_b]).map(|&v| f64::from(v)).collect()
    }

    /// The model of a weight vector laid out as `like`'s [`to_vector`](Self::to_vector).
    pub fn with_vector(like: &LstmModel, v: &[f64]) -> Result<LstmModel, ModelError> {
        let n = like.wx.len() + like.wh.len() + like.b.len() + like.head_w.len() + 1;
        if v.len() != n || v.iter().any(|x| !x.is_finite()) {
            return Err(ModelError::Data(format!("an LSTM weight vector needs {n} finite values, got {}", v.len())));
        }
        let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        let (wx, r) = f.split_at(like.wx.len());
        let (wh, r) = r.split_at(like.wh.len());
        let (b, r) = r.split_at(like.b.len());
        let (head_w, r) = r.split_at(like.head_w.len());
        Ok(LstmModel { input_dim: like.input_dim, hidden: like.hidden, wx: wx.to_vec(), wh: wh.to_vec(), b: b.to_vec(), head_w: head_w.to_vec(), head_b: r[0], packed: PackedCell::default() })
    }

    /// Length of the per-device state: hidden ++ cell = `2 * hidden`.
    pub fn state_len(&self) -> usize {
        2 * self.hidden
    }

    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// One event: consumes `row` (len `input_dim`), updates `state` (hidden ++ cell,
    /// len `state_len`, all zeros for a fresh device) in place and returns P(attack)
    /// for this event.
    ///
    /// Panics on a length mismatch.
    pub fn step(&self, row: &[f32], state: &mut [f32]) -> f32 {
        assert_eq!(row.len(), self.input_dim, "row length does not match the LSTM input");
        assert_eq!(state.len(), 2 * self.hidden, "state length is not 2 * hidden");
        let packed = self.packed.get_or_init(|| Packed::new(&self.b, &self.wx, &self.wh, self.input_dim, self.hidden));
        packed.step(row, state, &self.head_w, self.head_b)
    }

    /// Scores each sequence from a zero state by [`LstmModel::step`] (the streaming code
    /// path). Returns one probability per row of `x`; rows in no sequence get NaN.
    ///
    /// Panics when an index is out of range or `x.cols != input_dim`.
    pub fn score_sequences(&self, x: &Matrix, seqs: &[Vec<usize>]) -> Vec<f32> {
        let mut out = vec![f32::NAN; x.rows];
        let mut state = vec![0f32; self.state_len()];
        for seq in seqs {
            state.fill(0.0);
            for &i in seq {
                out[i] = self.step(x.row(i), &mut state);
            }
        }
        out
    }
}

/// One TBPTT chunk for all lanes: `x` `[lanes, chunk_len, d]`, `y`/`w` `[lanes, chunk_len]`
/// (w = 0 on padding), `keep[lane]` = 0 when the lane starts a new segment.
struct Chunk {
    x: Vec<f32>,
    y: Vec<f32>,
    w: Vec<f32>,
    keep: Vec<f32>,
    weight_sum: f32,
}

struct Batches {
    lanes: usize,
    chunks: Vec<Chunk>,
}

/// Cuts the sequences into segments (chunk-aligned, ~total/streams events), assigns
/// them to lanes (longest first, to the least loaded lane) and materialises the chunks.
fn layout_batches(x: &Matrix, y: &[bool], seqs: &[Vec<usize>], p: &LstmParams) -> Batches {
    let (d, l) = (x.cols, p.chunk_len);
    let total: usize = seqs.iter().map(Vec::len).sum();
    let seg_len = total.div_ceil(p.streams).div_ceil(l).max(1) * l;
    let mut segs: Vec<&[usize]> = seqs.iter().flat_map(|s| s.chunks(seg_len)).filter(|s| !s.is_empty()).collect();
    // deterministic order: longest first (stable on ties keeps input order)
    segs.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let lanes = p.streams.min(segs.len()).max(1);
    let mut lane_segs: Vec<Vec<&[usize]>> = vec![Vec::new(); lanes];
    let mut load = vec![0usize; lanes];
    for s in segs {
        let lane = (0..lanes).min_by_key(|&i| (load[i], i)).unwrap_or(0);
        load[lane] += s.len().div_ceil(l);
        lane_segs[lane].push(s);
    }
    let n_chunks = load.iter().copied().max().unwrap_or(0);
    let mut chunks: Vec<Chunk> = (0..n_chunks)
        .map(|_| Chunk {
            x: vec![0.0; lanes * l * d],
            y: vec![0.0; lanes * l],
            w: vec![0.0; lanes * l],
            keep: vec![1.0; lanes],
            weight_sum: 0.0,
        })
        .collect();
    for (lane, list) in lane_segs.iter().enumerate() {
        let mut c0 = 0;
        for seg in list {
            chunks[c0].keep[lane] = 0.0;
            for (t, &row) in seg.iter().enumerate() {
                let ch = &mut chunks[c0 + t / l];
                let pos = lane * l + t % l;
                ch.x[pos * d..(pos + 1) * d].copy_from_slice(x.row(row));
                ch.y[pos] = if y[row] { 1.0 } else { 0.0 };
                let w = if y[row] { p.pos_weight } else { 1.0 };
                ch.w[pos] = w;
                ch.weight_sum += w;
            }
            c0 += seg.len().div_ceil(l);
        }
    }
    Batches { lanes, chunks }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_matrix(rows: usize, cols: usize, seed: u64) -> Matrix {
        let mut rng = StdRng::seed_from_u64(seed);
        Matrix::new(rows, cols, (0..rows * cols).map(|_| rng.random_range(-1.5f32..1.5)).collect())
    }

    #[test]
    fn native_step_matches_burn_forward() {
        let (d, h, t) = (5, 7, 40);
        #[allow(deprecated)]
        let device = Device::ndarray();
        let net = seeded_net(d, h, 3, &device);
        let x = random_matrix(t, d, 4);
        let xs = Tensor::<3>::from_data(TensorData::new(x.data.clone(), [1, t, d]), &device);
        let (out, _) = net.lstm.forward(xs, None);
        let probs = burn::tensor::activation::sigmoid(net.head.forward(out).reshape([t]));
        let burn_p = probs.into_data().try_to_vec::<f32>().unwrap();

        let model = LstmModel::export(&net, d, h);
        let mut state = vec![0f32; model.state_len()];
        for i in 0..t {
            let p = model.step(x.row(i), &mut state);
            assert!((p - burn_p[i]).abs() < 1e-4, "step {i}: native {p} vs burn {}", burn_p[i]);
        }
        // also the carried state: continue burn from a non-zero state
        let (out, st) = net.lstm.forward(
            Tensor::<3>::from_data(TensorData::new(x.data.clone(), [1, t, d]), &device),
            None,
        );
        drop(out);
        let hid = st.hidden.into_data().try_to_vec::<f32>().unwrap();
        let cell = st.cell.into_data().try_to_vec::<f32>().unwrap();
        for j in 0..h {
            assert!((hid[j] - state[j]).abs() < 1e-4 && (cell[j] - state[h + j]).abs() < 1e-4);
        }
        let json = serde_json::to_string(&model).unwrap();
        let back: LstmModel = serde_json::from_str(&json).unwrap();
        assert_eq!(back.score_sequences(&x, &[(0..t).collect()]), model.score_sequences(&x, &[(0..t).collect()]));
    }

    /// Label = 1 iff a pulse (feature 0 = 1) occurred in the previous 3 events; feature 1
    /// is noise. A per-row model sees nothing of the label in the current row.
    fn pulse_task(devices: usize, len: usize, seed: u64) -> (Matrix, Vec<bool>, Vec<Vec<usize>>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut x = Matrix::zeros(devices * len, 2);
        let mut y = vec![false; devices * len];
        let mut seqs = Vec::new();
        for dv in 0..devices {
            let mut last_pulse: Option<usize> = None;
            let mut seq = Vec::new();
            for t in 0..len {
                // interleave devices in row order, as a merged stream would
                let i = t * devices + dv;
                y[i] = last_pulse.is_some_and(|p| t - p <= 3);
                let pulse = rng.random_bool(0.1);
                x.row_mut(i)[0] = if pulse { 1.0 } else { 0.0 };
                x.row_mut(i)[1] = rng.random_range(-1.0f32..1.0);
                if pulse {
                    last_pulse = Some(t);
                }
                seq.push(i);
            }
            seqs.push(seq);
        }
        (x, y, seqs)
    }

    #[test]
    fn learns_sequential_pulse_task() {
        let (x, y, seqs) = pulse_task(2, 1500, 1);
        let p = LstmParams { hidden: 8, chunk_len: 16, streams: 8, epochs: 12, lr: 2e-2, ..LstmParams::default() };
        let mut losses = Vec::new();
        let model = LstmModel::fit(&x, &y, &seqs, &p, &mut |e, n, loss| {
            assert_eq!(n, 12);
            assert_eq!(e, losses.len() + 1);
            losses.push(loss);
        })
        .unwrap();
        assert!(losses.last().unwrap() < &(losses[0] * 0.7), "loss did not fall: {losses:?}");

        let (xt, yt, st) = pulse_task(3, 600, 2);
        let scores = model.score_sequences(&xt, &st);
        let acc = scores.iter().zip(&yt).filter(|(s, &t)| (**s > 0.5) == t).count() as f64 / yt.len() as f64;
        // best per-row classifier: majority label given the row's own pulse bit
        let mut cnt = [[0usize; 2]; 2];
        for i in 0..xt.rows {
            cnt[usize::from(xt.row(i)[0] > 0.5)][usize::from(yt[i])] += 1;
        }
        let per_row = (cnt[0][0].max(cnt[0][1]) + cnt[1][0].max(cnt[1][1])) as f64 / yt.len() as f64;
        assert!(acc > 0.95 && acc > per_row + 0.15, "lstm accuracy {acc}, best per-row {per_row}");
    }

    #[test]
    fn layout_covers_every_event_once() {
        let (x, y, seqs) = pulse_task(3, 100, 5);
        let p = LstmParams { chunk_len: 8, streams: 4, ..LstmParams::default() };
        let b = layout_batches(&x, &y, &seqs, &p);
        let w: f32 = b.chunks.iter().map(|c| c.weight_sum).sum();
        assert_eq!(w as usize, 300);
        assert_eq!(b.lanes, 4);
        assert!(b.chunks[0].keep.iter().all(|&k| k == 0.0));
    }

    #[test]
    fn rejects_bad_input() {
        let (x, y, seqs) = pulse_task(1, 20, 6);
        let p = LstmParams { epochs: 1, ..LstmParams::default() };
        let e = |r: Result<LstmModel, ModelError>| r.unwrap_err().to_string();
        assert!(e(LstmModel::fit(&x, &y, &[], &p, &mut |_, _, _| {})).contains("empty"));
        assert!(e(LstmModel::fit(&x, &y[1..], &seqs, &p, &mut |_, _, _| {})).contains("labels"));
        assert!(e(LstmModel::fit(&x, &y, &[vec![0, 99]], &p, &mut |_, _, _| {})).contains("row 99"));
        assert!(e(LstmModel::fit(&x, &[false; 20], &seqs, &p, &mut |_, _, _| {})).contains("one class"));
        assert!(e(LstmModel::fit(&x, &y, &seqs, &LstmParams { hidden: 0, ..p.clone() }, &mut |_, _, _| {})).contains("hidden"));
    }

}
