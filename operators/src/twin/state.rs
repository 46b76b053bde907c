//! A device's twin as data: its settings (`TwinConfig`), baselines, identity
//! bindings, response state, and its changelog encoding (`Twin::encode`/`decode`).

use super::*;

/// Version of the twin's changelog encoding.
pub const TWIN_FORMAT_VERSION: u32 = 1;

/// Twin and detector settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwinConfig {
    /// Events a twin must see before it judges (bindings are learned meanwhile).
    pub warmup_events: u64,
    /// Weight of a new observation in the exponentially weighted baselines.
    pub ewma_alpha: f64,
    /// Behavioural distance at which an event is anomalous (score 0.5).
    pub anomaly_threshold: f64,
    /// The distance is the RMS of the `top_k` largest metric z-scores.
    pub top_k: usize,
    /// Smallest standard deviation assumed for a metric, absolute.
    pub min_sd_abs: f64,
    /// Smallest standard deviation assumed for a metric, relative to its mean.
    pub min_sd_rel: f64,
    /// Distinct values learned per identity field.
    pub max_bindings_per_field: usize,
    /// Distinct peers remembered.
    pub max_peers: usize,
    /// A twin whose device was silent for longer than this (event time, the gap
    /// between two of its own events) starts over at its next event. The idle sweep
    /// reclaims the memory of twins silent for twice as long.
    pub idle_ttl_secs: u64,
    /// Most idle twins one sweep removes (the rest wait for the next sweep; a
    /// warning and `twinguard_expiry_capped_total` say so).
    pub max_expiries_per_sweep: usize,
    /// Largest encoded twin (changelog value, bytes). A twin over it sheds its
    /// learned peers, then all but its first binding per identity field, then its
    /// reported properties (counted: `twinguard_twins_shed_total`); the rest of a
    /// twin is fixed-size per schema. Must stay below the broker's message size.
    pub max_twin_bytes: usize,
    /// Upper bound on twins held by one instance.
    pub max_twins: usize,
    /// Weight of a new observation in the short window (recent-behaviour) averages
    /// that feed the feature SQL (`<metric>__win`).
    pub window_alpha: f64,
    /// Per-device calibration: after warm-up, a device's next `calibration_events`
    /// events are not judged; their behavioural distances set the device's own
    /// threshold for `calibration_fpr` (conformally: just above the k-th highest,
    /// k = ⌊fpr·(n+1)⌋), which then replaces `anomaly_threshold` for it. 0 = off:
    /// every device is judged against `anomaly_threshold`.
    pub calibration_events: u64,
    /// Target false-positive rate of a calibrated device (on behaviour like its
    /// calibration events).
    pub calibration_fpr: f64,
}

impl Default for TwinConfig {
    fn default() -> Self {
        TwinConfig {
            warmup_events: 30,
            ewma_alpha: 0.02,
            anomaly_threshold: 6.0,
            top_k: 3,
            min_sd_abs: 0.05,
            min_sd_rel: 0.01,
            max_bindings_per_field: 4,
            max_peers: 16,
            idle_ttl_secs: 72 * 3600,
            max_expiries_per_sweep: 50_000,
            max_twin_bytes: 64 * 1024,
            max_twins: 1_000_000,
            window_alpha: 0.3,
            calibration_events: 0,
            calibration_fpr: 0.01,
        }
    }
}

impl TwinConfig {
    /// Check the settings; the error names the offending key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let bad = |k: &str, why: &str| Err(InvalidSetting::new(k, why));
        if !(self.ewma_alpha > 0.0 && self.ewma_alpha < 1.0) {
            return bad("ewma_alpha", "must be in (0, 1)");
        }
        if !(self.window_alpha > 0.0 && self.window_alpha <= 1.0) {
            return bad("window_alpha", "must be in (0, 1]");
        }
        if !(self.anomaly_threshold > 0.0 && self.anomaly_threshold.is_finite()) {
            return bad("anomaly_threshold", "must be a positive number");
        }
        if self.top_k == 0 {
            return bad("top_k", "must be at least 1");
        }
        if !(self.min_sd_abs > 0.0) || !(self.min_sd_rel >= 0.0) {
            return bad("min_sd_abs", "must be > 0 (and `min_sd_rel` >= 0)");
        }
        if self.max_twins == 0 {
            return bad("max_twins", "must be at least 1");
        }
        if self.idle_ttl_secs == 0 {
            return bad("idle_ttl_secs", "must be at least 1");
        }
        if self.max_expiries_per_sweep == 0 {
            return bad("max_expiries_per_sweep", "must be at least 1");
        }
        if !(self.calibration_fpr > 0.0 && self.calibration_fpr < 0.5) {
            return bad("calibration_fpr", "must be in (0, 0.5)");
        }
        if self.calibration_events > 10_000 {
            return bad("calibration_events", "must be at most 10000 (the distances are kept in the twin until calibrated)");
        }
        if !(4096..=900 * 1024).contains(&self.max_twin_bytes) {
            return bad("max_twin_bytes", "must be in 4096..=921600 (below the broker's 1 MB message size)");
        }
        Ok(())
    }
}

/// A device's calibration: the distances of its calibration events until there are
/// enough, then its own threshold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub distances: Vec<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
}

/// Exponentially weighted mean and variance of one (transformed) metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Mean, stored as f32 (7 significant digits are ample for a baseline; a
    /// typical twin stays under 2 KiB with its windows and LSTM state).
    pub mean: f32,
    /// Variance, stored as f32 (precision is ample for a spread; saves memory).
    pub var: f32,
    pub n: u32,
}

impl Baseline {
    pub(super) fn sd(&self, cfg: &TwinConfig) -> f64 {
        f64::from(self.var).sqrt().max(cfg.min_sd_abs).max(cfg.min_sd_rel * self.mean().abs())
    }
    pub(super) fn z(&self, x: f64, cfg: &TwinConfig) -> f64 {
        (x - self.mean()) / self.sd(cfg)
    }
    pub(super) fn mean(&self) -> f64 {
        f64::from(self.mean)
    }
    /// Update; weight is `1/n` until that falls below `alpha` (exact mean/variance
    /// while warming up, exponential forgetting afterwards).
    pub(super) fn update(&mut self, x: f64, alpha: f64) {
        if !x.is_finite() {
            return;
        }
        self.n = self.n.saturating_add(1);
        let a = alpha.max(1.0 / f64::from(self.n));
        let d = x - self.mean();
        let mean = self.mean() + a * d;
        self.mean = if mean.is_finite() { mean.clamp(-f64::from(f32::MAX), f64::from(f32::MAX)) as f32 } else { self.mean };
        // Kept finite (f32 range): a non-finite baseline could not round-trip the
        // changelog and would block every restore.
        let var = (1.0 - a) * (f64::from(self.var) + a * d * d);
        self.var = if var.is_finite() { var.min(f64::from(f32::MAX)) as f32 } else { f32::MAX };
    }
    /// Learn an outlier's spread, not its level: the variance takes the deviation
    /// clipped at `clip` standard deviations, the mean stays. Without this a
    /// baseline that skips every flagged event only sees the events inside its
    /// threshold, so its spread shrinks and it flags ever more of the device's
    /// normal traffic; with it each flagged event can widen the spread by at most
    /// a factor (1 − α)(1 + α·clip²) on the variance, and cannot move the mean.
    pub(super) fn widen(&mut self, x: f64, alpha: f64, clip: f64, cfg: &TwinConfig) {
        if !x.is_finite() {
            return;
        }
        let c = clip * self.sd(cfg);
        let d = (x - self.mean()).clamp(-c, c);
        let var = (1.0 - alpha) * (f64::from(self.var) + alpha * d * d);
        self.var = if var.is_finite() { var.min(f64::from(f32::MAX)) as f32 } else { f32::MAX };
    }
}

/// A twin's strings (identifiers, addresses, property values, names): up to 24
/// bytes in place, longer ones on the heap. Most are short (a MAC address, an IP,
/// a device id, the schema's name), so a twin holds a handful of allocations
/// instead of one per string; the changelog encoding is a JSON string either way.
pub type Str = compact_str::CompactString;

/// Heap bytes a [`Str`] holds (none when it fits in place).
fn heap(s: &Str) -> usize {
    if s.is_heap_allocated() {
        s.capacity()
    } else {
        0
    }
}

/// Bytes a list of [`Str`]s holds: its slots and the strings on the heap.
fn strs(v: &Vec<Str>) -> usize {
    v.capacity() * std::mem::size_of::<Str>() + v.iter().map(heap).sum::<usize>()
}

/// Learned values of one identity field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    pub field: Str,
    pub values: Vec<Str>,
}

/// Weight of the newest verdict in a twin's [`Twin::risk`].
pub const RISK_ALPHA: f32 = 0.2;

/// The digital twin of one device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Twin {
    /// Changelog encoding version.
    pub v: u32,
    /// Event schema (`name/vN`) the twin's vectors are laid out for.
    pub schema: Str,
    pub device_id: Str,
    /// Source partition and offset of the last applied event.
    pub partition: i32,
    pub last_offset: i64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub events: u64,
    pub anomalies: u64,
    /// Exponentially weighted event rate (events/s).
    pub rate_per_s: f64,
    /// Identity bindings as learned during warm-up.
    pub bindings: Vec<Binding>,
    /// Communication peers seen in normal behaviour (bounded).
    pub peers: Vec<Str>,
    /// Firmware hash as first reported.
    pub firmware: Option<Str>,
    /// Latest reported properties, aligned with the schema's property fields.
    pub properties: Vec<Option<Str>>,
    /// Latest reported metric values (raw), aligned with the schema's metrics; NaN
    /// = never reported (null in the changelog).
    #[serde(with = "nan_as_null")]
    pub latest: Vec<f64>,
    /// Baselines: one per metric, then inter-arrival time, then peer novelty.
    pub baselines: Vec<Baseline>,
    /// Short-window average of each (transformed) metric over the device's recent
    /// events, attacks included; NaN = never reported. Empty in twins written
    /// before windows existed (filled on their next event).
    #[serde(with = "nan_as_null_f32", default, skip_serializing_if = "Vec::is_empty")]
    pub window: Vec<f32>,
    /// Recurrent state of the LSTM detector (hidden ++ cell), stepped once per
    /// event; empty until a model with an LSTM scores this device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lstm: Vec<f32>,
    /// Tag of the model version whose LSTM stepped `lstm` ([`version_tag`]; 0: not
    /// tagged, a twin written before tags existed): another version starts the state
    /// from zero ([`crate::Detector::detect_as`]). A 4-byte tag, not the version
    /// string, keeps the twin within 2 KiB.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lstm_model: u32,
    /// Decision score of the device's latest verdict (the ensemble probability with a
    /// model, the behavioural score without); absent before the first verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    /// Risk: exponentially weighted mean of the decision scores (weight
    /// [`RISK_ALPHA`] on the newest), so one odd event moves it less than a run.
    #[serde(default)]
    pub risk: f32,
    /// Attack class of the latest verdict, when it was judged an attack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<Str>,
    /// Per-device calibration (`state.calibration_events`): absent without it.
    /// Boxed: a twin without it pays 8 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Box<Calibration>>,
    /// Response state: open incident, desired and reported state, commands awaiting
    /// acknowledgement (absent until the device was first responded to).
    /// Boxed: most twins never need one, and an absent state costs 8 bytes.
    #[serde(default, skip_serializing_if = "no_response")]
    pub response: Option<Box<ResponseState>>,
}

fn is_zero(x: &u32) -> bool {
    *x == 0
}

/// The 4-byte tag of a model version (FNV-1a, never 0) a twin's LSTM state carries.
pub fn version_tag(version: &str) -> u32 {
    let h = version.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    h.max(1)
}

pub(super) fn no_response(r: &Option<Box<ResponseState>>) -> bool {
    r.as_ref().is_none_or(|r| r.is_empty())
}

static NO_RESPONSE: ResponseState = ResponseState::EMPTY;

/// Twins are equal when their changelog encodings are (NaN-safe).
impl PartialEq for Twin {
    fn eq(&self, other: &Self) -> bool {
        self.encode() == other.encode()
    }
}

impl Twin {
    pub(super) fn new(schema: &str, device_id: &str, partition: i32, t: i64, n_metrics: usize, n_props: usize) -> Self {
        Twin {
            v: TWIN_FORMAT_VERSION,
            schema: schema.into(),
            device_id: device_id.into(),
            partition,
            last_offset: -1,
            first_seen_ms: t,
            last_seen_ms: t,
            events: 0,
            anomalies: 0,
            rate_per_s: 0.0,
            bindings: Vec::new(),
            peers: Vec::new(),
            firmware: None,
            properties: vec![None; n_props],
            latest: vec![f64::NAN; n_metrics],
            baselines: vec![Baseline::default(); n_metrics + DERIVED],
            window: vec![f32::NAN; n_metrics],
            lstm: Vec::new(),
            lstm_model: 0,
            score: None,
            risk: 0.0,
            class: None,
            calibration: None,
            response: None,
        }
    }

    /// Approximate heap + inline bytes held by this twin (its map slot and the
    /// allocator's own overhead not included).
    pub fn mem_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + heap(&self.schema)
            + heap(&self.device_id)
            + self.bindings.capacity() * std::mem::size_of::<Binding>()
            + self.bindings.iter().map(|b| heap(&b.field) + strs(&b.values)).sum::<usize>()
            + strs(&self.peers)
            + self.firmware.as_ref().map_or(0, heap)
            + self.properties.capacity() * std::mem::size_of::<Option<Str>>()
            + self.properties.iter().flatten().map(heap).sum::<usize>()
            + self.latest.capacity() * std::mem::size_of::<f64>()
            + self.calibration.as_ref().map_or(0, |c| std::mem::size_of::<Calibration>() + c.distances.capacity() * std::mem::size_of::<f32>())
            + self.baselines.capacity() * std::mem::size_of::<Baseline>()
            + self.window.capacity() * std::mem::size_of::<f32>()
            + self.lstm.capacity() * std::mem::size_of::<f32>()
            + self.class.as_ref().map_or(0, heap)
            + self.response.as_ref().map_or(0, |r| std::mem::size_of::<ResponseState>() + r.mem_bytes())
    }

    /// Make the encoding fit `cap` bytes by dropping what was learned from strings:
    /// peers first, then all but the first value of every binding, then reported
    /// properties. Deterministic (a function of the twin), so replays agree.
    pub(super) fn shed(&mut self, cap: usize) {
        self.peers.clear();
        if self.encode().len() <= cap {
            return;
        }
        for b in &mut self.bindings {
            b.values.truncate(1);
        }
        if self.encode().len() <= cap {
            return;
        }
        self.properties.iter_mut().for_each(|p| *p = None);
        self.class = None;
    }

    /// The response state (empty until the device was first responded to).
    pub fn response(&self) -> &ResponseState {
        self.response.as_deref().unwrap_or(&NO_RESPONSE)
    }

    /// The response state, created on first use.
    pub fn response_mut(&mut self) -> &mut ResponseState {
        self.response.get_or_insert_with(Default::default)
    }

    /// Changelog value of this twin.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("twin serialises")
    }

    /// Parse a changelog value.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Twin, OperatorError> {
        let mut t: Twin = serde_json::from_slice(bytes)
            .map_err(|e| OperatorError::Undecodable { key: twinguard_schemas::dlq::clip(key, 128).into_owned(), reason: e.to_string() })?;
        // Parsed lists grow by doubling: keep only what the twin holds (a restore
        // brings back every twin of a partition at once).
        t.bindings.shrink_to_fit();
        t.bindings.iter_mut().for_each(|b| b.values.shrink_to_fit());
        t.peers.shrink_to_fit();
        t.properties.shrink_to_fit();
        t.latest.shrink_to_fit();
        t.baselines.shrink_to_fit();
        t.window.shrink_to_fit();
        t.lstm.shrink_to_fit();
        if t.v != TWIN_FORMAT_VERSION {
            return Err(OperatorError::Restore { key: key.into(), reason: format!("format v{} unsupported", t.v) });
        }
        Ok(t)
    }
}

/// Serialises NaN as JSON null and back (JSON has no NaN).
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        v.iter().map(|x| (!x.is_nan()).then_some(*x)).collect::<Vec<_>>().serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<Option<f64>>::deserialize(d)?.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
    }
}

/// Serialises NaN as JSON null and back, for f32 vectors.
mod nan_as_null_f32 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        v.iter().map(|x| (!x.is_nan()).then_some(*x)).collect::<Vec<_>>().serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        Ok(Vec::<Option<f32>>::deserialize(d)?.into_iter().map(|x| x.unwrap_or(f32::NAN)).collect())
    }
}
