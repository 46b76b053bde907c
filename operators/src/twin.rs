//! Device twins: keyed per-device state kept current by the device's own events, and
//! the behavioural anomaly score computed from it.
//!
//! Contract:
//! - A twin MUST be updated at most once per source record: it remembers the last
//!   applied `(partition, offset)`, and a record at or below it is skipped (no state
//!   change, no verdict), which makes replays after a crash idempotent.
//! - Twin state MUST be a pure function of the events applied, in order (event time
//!   only, never the processing clock), so a replayed run rebuilds identical twins.
//! - A twin idle for longer than `idle_ttl_secs` (the gap between the device's own
//!   newest event time and its next event) is reset when that next event is
//!   applied: a pure function of the device's events, never of other devices'
//!   clocks or of when the idle sweep ran.
//! - Memory is bounded: strings are capped by the schema (`max_len`), bindings and
//!   peers are capped, the encoded twin is capped (`max_twin_bytes`), idle twins are
//!   swept from memory, and the store holds at most `max_twins` twins (least
//!   recently seen evicted first).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{
    Array, BooleanBuilder, Float64Array, Float64Builder, Int32Array, Int32Builder, Int64Array, Int64Builder,
    StringArray, StringBuilder, TimestampMillisecondArray, TimestampMillisecondBuilder,
};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};
use twinguard_schemas::verdict::verdict_arrow_schema;
use twinguard_schemas::{EventSchema, FieldKind, Role, Transform};

use crate::response_state::ResponseState;
use crate::{InvalidSetting, OperatorError};

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
        if !(4096..=900 * 1024).contains(&self.max_twin_bytes) {
            return bad("max_twin_bytes", "must be in 4096..=921600 (below the broker's 1 MB message size)");
        }
        Ok(())
    }
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
    fn sd(&self, cfg: &TwinConfig) -> f64 {
        f64::from(self.var).sqrt().max(cfg.min_sd_abs).max(cfg.min_sd_rel * self.mean().abs())
    }
    fn z(&self, x: f64, cfg: &TwinConfig) -> f64 {
        (x - self.mean()) / self.sd(cfg)
    }
    fn mean(&self) -> f64 {
        f64::from(self.mean)
    }
    /// Update; weight is `1/n` until that falls below `alpha` (exact mean/variance
    /// while warming up, exponential forgetting afterwards).
    fn update(&mut self, x: f64, alpha: f64) {
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
}

/// Learned values of one identity field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    pub field: String,
    pub values: Vec<String>,
}

/// Weight of the newest verdict in a twin's [`Twin::risk`].
pub const RISK_ALPHA: f32 = 0.2;

/// The digital twin of one device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Twin {
    /// Changelog encoding version.
    pub v: u32,
    /// Event schema (`name/vN`) the twin's vectors are laid out for.
    pub schema: String,
    pub device_id: String,
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
    pub peers: Vec<String>,
    /// Firmware hash as first reported.
    pub firmware: Option<String>,
    /// Latest reported properties, aligned with the schema's property fields.
    pub properties: Vec<Option<String>>,
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
    pub class: Option<String>,
    /// Response state: open incident, desired and reported state, commands awaiting
    /// acknowledgement (absent until the device was first responded to).
    /// Boxed: most twins never need one, and an absent state costs 8 bytes.
    #[serde(default, skip_serializing_if = "no_response")]
    pub response: Option<Box<ResponseState>>,
}

fn no_response(r: &Option<Box<ResponseState>>) -> bool {
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
    fn new(schema: &str, device_id: &str, partition: i32, t: i64, n_metrics: usize, n_props: usize) -> Self {
        Twin {
            v: TWIN_FORMAT_VERSION,
            schema: schema.to_string(),
            device_id: device_id.to_string(),
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
            score: None,
            risk: 0.0,
            class: None,
            response: None,
        }
    }

    /// Approximate heap + inline bytes held by this twin.
    pub fn mem_bytes(&self) -> usize {
        let s = |x: &String| x.capacity();
        std::mem::size_of::<Self>()
            + s(&self.schema)
            + s(&self.device_id)
            + self.bindings.capacity() * std::mem::size_of::<Binding>()
            + self.bindings.iter().map(|b| s(&b.field) + b.values.capacity() * 24 + b.values.iter().map(s).sum::<usize>()).sum::<usize>()
            + self.peers.capacity() * 24
            + self.peers.iter().map(s).sum::<usize>()
            + self.firmware.as_ref().map_or(0, s)
            + self.properties.capacity() * 24
            + self.properties.iter().flatten().map(s).sum::<usize>()
            + self.latest.capacity() * std::mem::size_of::<f64>()
            + self.baselines.capacity() * std::mem::size_of::<Baseline>()
            + self.window.capacity() * std::mem::size_of::<f32>()
            + self.lstm.capacity() * std::mem::size_of::<f32>()
            + self.class.as_ref().map_or(0, s)
            + self.response.as_ref().map_or(0, |r| std::mem::size_of::<ResponseState>() + r.mem_bytes())
    }

    /// Make the encoding fit `cap` bytes by dropping what was learned from strings:
    /// peers first, then all but the first value of every binding, then reported
    /// properties. Deterministic (a function of the twin), so replays agree.
    fn shed(&mut self, cap: usize) {
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
        let t: Twin = serde_json::from_slice(bytes)
            .map_err(|e| OperatorError::Undecodable { key: twinguard_schemas::dlq::clip(key, 128).into_owned(), reason: e.to_string() })?;
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

/// Derived baselines after the metrics: inter-arrival time, peer novelty.
const DERIVED: usize = 2;
const INTERARRIVAL: &str = "_interarrival_ms";
const NEW_PEER: &str = "_new_peer";
/// Peer novelty is a 0/1 signal; a single new peer alone stays below the threshold.
const NEW_PEER_MIN_SD: f64 = 0.25;

/// What one [`TwinOperator::expire`] call removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expiry {
    /// Idle twins swept.
    pub expired: usize,
    /// Twins evicted by `max_twins`.
    pub evicted: usize,
    /// Idle twins left for a later sweep by `max_expiries_per_sweep`.
    pub capped: usize,
}

/// One changelog write: the twin's new state, or a tombstone (`None`) when it expired.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangelogRecord {
    pub partition: i32,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// Twins of the partitions this instance owns.
#[derive(Debug, Default)]
pub struct TwinStore {
    partitions: HashMap<i32, HashMap<String, Twin>>,
}

impl TwinStore {
    pub fn len(&self) -> usize {
        self.partitions.values().map(HashMap::len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn get(&self, partition: i32, device: &str) -> Option<&Twin> {
        self.partitions.get(&partition)?.get(device)
    }
    /// Mutable access for the operators that keep per-device state inside the twin
    /// (the LSTM's recurrent state). The caller MUST only touch a twin whose event
    /// it is processing in the same batch (it is then already marked for the changelog).
    pub fn get_mut(&mut self, partition: i32, device: &str) -> Option<&mut Twin> {
        self.partitions.get_mut(&partition)?.get_mut(device)
    }
    /// Every twin, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Twin> {
        self.partitions.values().flat_map(HashMap::values)
    }
    pub fn partitions(&self) -> BTreeSet<i32> {
        self.partitions.keys().copied().collect()
    }
    /// Forget a partition's twins (it was revoked; its changelog keeps them).
    pub fn drop_partition(&mut self, partition: i32) -> usize {
        self.partitions.remove(&partition).map_or(0, |m| m.len())
    }
    /// Make a partition known (possibly empty) after its restore.
    pub fn ensure_partition(&mut self, partition: i32) {
        self.partitions.entry(partition).or_default();
    }
    /// Install a twin read from the changelog (`None` = tombstone).
    pub fn restore(&mut self, partition: i32, key: &str, twin: Option<Twin>) {
        let map = self.partitions.entry(partition).or_default();
        match twin {
            Some(t) => {
                map.insert(key.to_string(), t);
            }
            None => {
                map.remove(key);
            }
        }
    }
    /// Total approximate memory of all twins.
    pub fn mem_bytes(&self) -> usize {
        self.iter().map(Twin::mem_bytes).sum()
    }
}

/// Column indices resolved once from the schema.
struct Layout {
    metrics: Vec<(usize, String, Transform)>,
    identities: Vec<(usize, String)>,
    peers: Vec<usize>,
    firmware: Vec<usize>,
    properties: Vec<(usize, FieldKind)>,
    label: Option<usize>,
}

/// Applies events to twins and scores each against its device's own baseline.
///
/// Input: decoded event batches ([`EventSchema::arrow_schema`]). Output: one verdict
/// row per applied event ([`verdict_arrow_schema`]); replayed events (at or below
/// the twin's last applied offset) produce nothing.
pub struct TwinOperator {
    cfg: TwinConfig,
    schema_id: String,
    in_schema: SchemaRef,
    out_schema: SchemaRef,
    ctx_schema: SchemaRef,
    layout: Layout,
    store: TwinStore,
    dirty: BTreeSet<(i32, String)>,
    tombstones: Vec<(i32, String)>,
    skipped: u64,
    resets: u64,
    shed: u64,
}

impl TwinOperator {
    pub fn new(schema: &EventSchema, cfg: TwinConfig) -> Self {
        let col = |i: usize| EventSchema::FIRST_FIELD_COLUMN + i;
        let f = &schema.fields;
        let layout = Layout {
            metrics: schema.indices_of(Role::Metric).into_iter().map(|i| (col(i), f[i].name.clone(), f[i].transform)).collect(),
            identities: schema.indices_of(Role::Identity).into_iter().map(|i| (col(i), f[i].name.clone())).collect(),
            peers: schema.indices_of(Role::Peer).into_iter().map(col).collect(),
            firmware: schema.indices_of(Role::Firmware).into_iter().map(col).collect(),
            properties: schema.indices_of(Role::Property).into_iter().map(|i| (col(i), f[i].kind)).collect(),
            label: schema.indices_of(Role::Label).first().map(|&i| col(i)),
        };
        TwinOperator {
            cfg,
            schema_id: schema.id(),
            in_schema: schema.arrow_schema(),
            out_schema: verdict_arrow_schema(),
            ctx_schema: context_arrow_schema(&layout.metrics.iter().map(|m| m.1.clone()).collect::<Vec<_>>()),
            layout,
            store: TwinStore::default(),
            dirty: BTreeSet::new(),
            tombstones: Vec::new(),
            skipped: 0,
            resets: 0,
            shed: 0,
        }
    }

    pub fn config(&self) -> &TwinConfig {
        &self.cfg
    }
    pub fn store(&self) -> &TwinStore {
        &self.store
    }
    pub fn store_mut(&mut self) -> &mut TwinStore {
        &mut self.store
    }
    /// Mark a twin changed outside event processing (responses, acks): its new state
    /// goes out with the next [`drain_changelog`](Self::drain_changelog).
    pub fn touch(&mut self, partition: i32, device: &str) {
        if self.store.get(partition, device).is_some() {
            self.dirty.insert((partition, device.to_string()));
        }
    }

    /// Record a verdict's decision score (and attack class) on the device's twin:
    /// the latest score and the smoothed risk the SQL `twins` table shows.
    pub fn note_verdict(&mut self, partition: i32, device: &str, score: f64, class: Option<&str>) {
        if let Some(t) = self.store.get_mut(partition, device) {
            let x = if score.is_finite() { score as f32 } else { return };
            t.risk = if t.score.is_none() { x } else { t.risk + RISK_ALPHA * (x - t.risk) };
            t.score = Some(x);
            if t.class.as_deref() != class {
                t.class = class.map(str::to_string);
            }
            self.dirty.insert((partition, device.to_string()));
        }
    }

    /// The `k` metrics of a twin furthest from its baselines (latest reported value,
    /// after the metric's transform), largest |z| first: `(name, z, value, mean, sd)`.
    /// Metrics still warming up or never reported are left out.
    pub fn explain(&self, twin: &Twin, k: usize) -> Vec<(String, f64, f64, f64, f64)> {
        let mut out: Vec<(String, f64, f64, f64, f64)> = Vec::new();
        for (i, (_, name, tr)) in self.layout.metrics.iter().enumerate() {
            let (Some(x), Some(bl)) = (twin.latest.get(i).copied(), twin.baselines.get(i)) else { continue };
            if x.is_nan() || bl.n < self.cfg.warmup_events as u32 {
                continue;
            }
            let v = tr.apply(x);
            let sd = bl.sd(&self.cfg);
            out.push((name.clone(), (v - bl.mean()) / sd, v, bl.mean(), sd));
        }
        out.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then_with(|| a.0.cmp(&b.0)));
        out.truncate(k);
        out
    }

    /// Events skipped because their twin had already applied them (replays).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Twins reset because their device was idle past `idle_ttl_secs`.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Twins that shed learned strings to fit `max_twin_bytes`.
    pub fn shed(&self) -> u64 {
        self.shed
    }

    /// Install a changelog record for `partition` (restore path). A twin written for
    /// another schema is refused with an error naming it.
    pub fn restore_record(&mut self, partition: i32, key: &str, value: Option<&[u8]>) -> Result<(), OperatorError> {
        let twin = match value {
            None => None,
            Some(b) => {
                let t = Twin::decode(key, b)?;
                if t.schema != self.schema_id {
                    return Err(OperatorError::Restore {
                        key: key.into(),
                        reason: format!("written for schema `{}`, this pipeline reads `{}`", t.schema, self.schema_id),
                    });
                }
                let m = self.layout.metrics.len();
                let shape = (t.latest.len(), t.baselines.len(), t.properties.len());
                if shape != (m, m + DERIVED, self.layout.properties.len()) || !(t.window.is_empty() || t.window.len() == m) {
                    return Err(OperatorError::Restore {
                        key: key.into(),
                        reason: format!("its vectors {shape:?} do not fit schema `{}`", self.schema_id),
                    });
                }
                Some(t)
            }
        };
        self.store.restore(partition, key, twin);
        Ok(())
    }

    /// Changelog records for every twin changed since the last call, then tombstones
    /// for expired twins, in a deterministic order.
    pub fn drain_changelog(&mut self) -> Vec<ChangelogRecord> {
        let mut out = Vec::with_capacity(self.dirty.len() + self.tombstones.len());
        let cap = self.cfg.max_twin_bytes;
        for (p, key) in std::mem::take(&mut self.dirty) {
            let Some(t) = self.store.partitions.get_mut(&p).and_then(|m| m.get_mut(&key)) else { continue };
            let mut bytes = t.encode();
            if bytes.len() > cap {
                t.shed(cap);
                self.shed += 1;
                bytes = t.encode();
            }
            out.push(ChangelogRecord { partition: p, key, value: Some(bytes) });
        }
        for (p, key) in self.tombstones.drain(..) {
            out.push(ChangelogRecord { partition: p, key, value: None });
        }
        out
    }

    /// Sweep idle twins out of memory, then evict the least recently seen twins
    /// above `max_twins`. Returns what was removed; tombstones come out of the next
    /// [`drain_changelog`](Self::drain_changelog).
    ///
    /// The sweep only reclaims memory: it never changes what an event produces.
    /// A twin goes once its device has been silent for `2 × idle_ttl` before the
    /// partition's *reference time* (the median last-seen time of the partition's
    /// twins, and never later than `now_ms`, the processing clock). Its device's
    /// next event then lies more than `idle_ttl` after its last one, and resets the
    /// twin on apply whether or not it was swept; the one exception is an event
    /// dated more than `idle_ttl` before that reference time (late data). The
    /// reference is a median, so no device's claimed event time, however far in the
    /// future, can sweep other devices' twins.
    ///
    /// `durable` maps each partition this instance owns to its committed offset (the
    /// next record a restart would read). Only those partitions are touched, and only
    /// twins whose last applied event lies below that offset. At most
    /// `max_expiries_per_sweep` idle twins go per call (oldest first).
    pub fn expire(&mut self, durable: &HashMap<i32, i64>, now_ms: i64) -> Expiry {
        let ttl = i64::try_from(self.cfg.idle_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        // A twin awaiting a command's acknowledgement stays: its expiry alert and the
        // reconciliation need it (an isolated device goes quiet by design).
        let removable =
            |p: i32, t: &Twin| durable.get(&p).is_some_and(|&next| t.last_offset < next) && t.response().pending.is_empty();
        let mut idle: Vec<(i64, i32, String)> = Vec::new();
        for (p, map) in &self.store.partitions {
            if map.is_empty() || !durable.contains_key(p) {
                continue;
            }
            let mut seen: Vec<i64> = map.values().map(|t| t.last_seen_ms).collect();
            let mid = seen.len() / 2;
            let median = *seen.select_nth_unstable(mid).1;
            let cutoff = median.min(now_ms).saturating_sub(ttl.saturating_mul(2));
            idle.extend(map.iter().filter(|(_, t)| t.last_seen_ms < cutoff && removable(*p, t)).map(|(k, t)| (t.last_seen_ms, *p, k.clone())));
        }
        idle.sort();
        let capped = idle.len().saturating_sub(self.cfg.max_expiries_per_sweep);
        idle.truncate(self.cfg.max_expiries_per_sweep);
        let mut removed = 0;
        for (_, p, k) in idle {
            if let Some(m) = self.store.partitions.get_mut(&p) {
                m.remove(&k);
            }
            self.dirty.remove(&(p, k.clone()));
            self.tombstones.push((p, k));
            removed += 1;
        }
        let expired = removed;
        let total = self.store.len();
        if total > self.cfg.max_twins {
            let mut all: Vec<(i64, i32, String)> = self
                .store
                .iter()
                .filter(|t| removable(t.partition, t))
                .map(|t| (t.last_seen_ms, t.partition, t.device_id.clone()))
                .collect();
            all.sort();
            for (_, p, k) in all.into_iter().take(total - self.cfg.max_twins) {
                if let Some(m) = self.store.partitions.get_mut(&p) {
                    m.remove(&k);
                }
                self.dirty.remove(&(p, k.clone()));
                self.tombstones.push((p, k));
                removed += 1;
            }
        }
        Expiry { expired, evicted: removed - expired, capped }
    }

    fn apply_row(&mut self, b: &BatchCols<'_>, row: usize, out: &mut VerdictBuilder, ctx: Option<&mut ContextBuilder>) {
        let device = b.device.value(row);
        let partition = b.partition.value(row);
        let offset = b.offset.value(row);
        let t = b.time.value(row);
        let cfg = &self.cfg;
        let layout = &self.layout;
        let n_metrics = layout.metrics.len();
        let map = self.store.partitions.entry(partition).or_default();
        let twin = match map.get_mut(device) {
            Some(tw) => tw,
            None => map.entry(device.to_string()).or_insert_with(|| {
                Twin::new(&self.schema_id, device, partition, t, n_metrics, layout.properties.len())
            }),
        };
        if twin.partition == partition && offset <= twin.last_offset {
            self.skipped += 1;
            return;
        }
        let ttl = i64::try_from(cfg.idle_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        if twin.events > 0 && t.saturating_sub(twin.last_seen_ms) > ttl {
            // Silent past the TTL: the device starts over (warm-up again), exactly as
            // if the sweep had removed its twin. The sweep never removes a twin with
            // commands awaiting acknowledgement; such a twin keeps its response state.
            let response = twin.response.take().filter(|r| !r.pending.is_empty());
            *twin = Twin::new(&self.schema_id, device, partition, t, n_metrics, layout.properties.len());
            twin.response = response;
            self.resets += 1;
        }
        let warming = twin.events < cfg.warmup_events;

        // Score: z-score of every present metric against the device's own baseline.
        let mut zs: Vec<(f64, usize)> = Vec::with_capacity(n_metrics + DERIVED);
        let mut values: Vec<Option<f64>> = Vec::with_capacity(n_metrics + DERIVED);
        for (i, (c, _, tr)) in layout.metrics.iter().enumerate() {
            let col = b.f64s[i];
            debug_assert_eq!(*c, b.f64_cols[i]);
            let v = (!col.is_null(row)).then(|| col.value(row));
            values.push(v.map(|x| tr.apply(x)));
        }
        let gap = if twin.events == 0 { None } else { Some(((t - twin.last_seen_ms).max(0)) as f64) };
        values.push(gap.map(f64::ln_1p));
        let peer_vals: Vec<&str> =
            layout.peers.iter().filter_map(|&c| b.str_col(c)).filter(|a| !a.is_null(row)).map(|a| a.value(row)).collect();
        let new_peer = peer_vals.iter().any(|p| !twin.peers.iter().any(|k| k == p));
        values.push((!peer_vals.is_empty()).then_some(if new_peer { 1.0 } else { 0.0 }));
        for (i, v) in values.iter().enumerate() {
            let (Some(x), bl) = (v, &twin.baselines[i]) else { continue };
            if bl.n < cfg.warmup_events as u32 {
                continue;
            }
            let z = if i == n_metrics + 1 {
                (x - bl.mean()) / bl.sd(cfg).max(NEW_PEER_MIN_SD)
            } else {
                bl.z(*x, cfg)
            };
            zs.push((z, i));
        }
        zs.sort_by(|a, b| b.0.abs().total_cmp(&a.0.abs()).then(a.1.cmp(&b.1)));
        let k = zs.len().min(cfg.top_k);
        let mut distance =
            if k == 0 { 0.0 } else { (zs[..k].iter().map(|(z, _)| z * z).sum::<f64>() / k as f64).sqrt() };

        // Identity drift: a binding or firmware hash the twin never saw for this device.
        let mut drift: Vec<&str> = Vec::new();
        for (c, name) in &layout.identities {
            let Some(a) = b.str_col(*c) else { continue };
            if a.is_null(row) {
                continue;
            }
            let v = a.value(row);
            let known = twin.bindings.iter().find(|bd| bd.field == *name);
            let seen = known.is_some_and(|bd| bd.values.iter().any(|x| x == v));
            if !seen {
                if warming {
                    let bd = match twin.bindings.iter_mut().position(|bd| bd.field == *name) {
                        Some(i) => &mut twin.bindings[i],
                        None => {
                            twin.bindings.push(Binding { field: name.clone(), values: Vec::new() });
                            twin.bindings.last_mut().expect("just pushed")
                        }
                    };
                    if bd.values.len() < cfg.max_bindings_per_field {
                        bd.values.push(v.to_string());
                    }
                } else {
                    drift.push(name);
                }
            }
        }
        for &c in &layout.firmware {
            let Some(a) = b.str_col(c) else { continue };
            if a.is_null(row) {
                continue;
            }
            match &twin.firmware {
                None => twin.firmware = Some(a.value(row).to_string()),
                Some(h) if h != a.value(row) => drift.push("firmware_hash"),
                Some(_) => {}
            }
        }
        let behaviour = distance;
        if !drift.is_empty() {
            distance = distance.max(2.0 * cfg.anomaly_threshold);
        }
        let anomalous = !warming && distance >= cfg.anomaly_threshold;
        let th2 = cfg.anomaly_threshold * cfg.anomaly_threshold;
        let score = distance * distance / (distance * distance + th2);
        let top = zs.first().filter(|_| k > 0).map(|&(z, i)| {
            let name = if i < n_metrics {
                layout.metrics[i].1.as_str()
            } else if i == n_metrics {
                INTERARRIVAL
            } else {
                NEW_PEER
            };
            (name, z)
        });

        if let Some(cb) = ctx {
            cb.push(device, partition, offset, twin, &layout.metrics, &values, cfg, n_metrics, drift.len(), [behaviour, distance, score], warming);
        }

        // Update the twin. Baselines learn only from events judged normal, winsorised,
        // so an attack cannot drag the device's notion of normal towards itself.
        if !anomalous {
            for (i, v) in values.iter().enumerate() {
                let Some(x) = *v else { continue };
                let bl = &mut twin.baselines[i];
                let x = if bl.n >= cfg.warmup_events as u32 {
                    let sd = bl.sd(cfg);
                    x.clamp(bl.mean() - 4.0 * sd, bl.mean() + 4.0 * sd)
                } else {
                    x
                };
                bl.update(x, cfg.ewma_alpha);
            }
            for p in &peer_vals {
                if !twin.peers.iter().any(|k| k == p) && twin.peers.len() < cfg.max_peers {
                    twin.peers.push((*p).to_string());
                }
            }
        } else {
            twin.anomalies += 1;
        }
        if let Some(g) = gap {
            let inst = 1000.0 / g.max(1.0);
            twin.rate_per_s = if twin.events == 1 { inst } else { twin.rate_per_s + cfg.ewma_alpha * (inst - twin.rate_per_s) };
        }
        for (i, _) in layout.metrics.iter().enumerate() {
            let col = b.f64s[i];
            if !col.is_null(row) {
                twin.latest[i] = col.value(row);
            }
        }
        if twin.window.len() != n_metrics {
            twin.window = vec![f32::NAN; n_metrics];
        }
        for (w, v) in twin.window.iter_mut().zip(&values) {
            if let Some(x) = *v {
                *w = if w.is_nan() { x as f32 } else { (f64::from(*w) + cfg.window_alpha * (x - f64::from(*w))) as f32 };
            }
        }
        for (i, (c, kind)) in layout.properties.iter().enumerate() {
            let a = b.batch.column(*c);
            if a.is_null(row) {
                continue;
            }
            twin.properties[i] = Some(match kind {
                FieldKind::String => a.as_any().downcast_ref::<StringArray>().expect("utf8").value(row).to_string(),
                FieldKind::I64 => a.as_any().downcast_ref::<Int64Array>().expect("i64").value(row).to_string(),
                FieldKind::F64 => a.as_any().downcast_ref::<Float64Array>().expect("f64").value(row).to_string(),
            });
        }
        twin.partition = partition;
        twin.last_offset = offset;
        twin.events += 1;
        twin.first_seen_ms = twin.first_seen_ms.min(t);
        twin.last_seen_ms = twin.last_seen_ms.max(t);
        self.dirty.insert((partition, device.to_string()));

        let label = layout.label.and_then(|c| b.str_col(c)).filter(|a| !a.is_null(row)).map(|a| a.value(row));
        out.push(device, t, partition, offset, score, distance, anomalous, warming, top, &drift, label);
    }
}

/// Typed views of the input batch's columns.
struct BatchCols<'a> {
    batch: &'a RecordBatch,
    device: &'a StringArray,
    time: &'a TimestampMillisecondArray,
    partition: &'a Int32Array,
    offset: &'a Int64Array,
    f64s: Vec<&'a Float64Array>,
    f64_cols: Vec<usize>,
}

impl<'a> BatchCols<'a> {
    fn str_col(&self, c: usize) -> Option<&'a StringArray> {
        self.batch.column(c).as_any().downcast_ref::<StringArray>()
    }
}

struct VerdictBuilder {
    device: StringBuilder,
    time: TimestampMillisecondBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
    score: Float64Builder,
    distance: Float64Builder,
    anomalous: BooleanBuilder,
    warming: BooleanBuilder,
    top: StringBuilder,
    top_z: Float64Builder,
    drift: StringBuilder,
    label: StringBuilder,
}

impl VerdictBuilder {
    fn new(n: usize) -> Self {
        VerdictBuilder {
            device: StringBuilder::with_capacity(n, n * 16),
            time: TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC"),
            partition: Int32Builder::with_capacity(n),
            offset: Int64Builder::with_capacity(n),
            score: Float64Builder::with_capacity(n),
            distance: Float64Builder::with_capacity(n),
            anomalous: BooleanBuilder::with_capacity(n),
            warming: BooleanBuilder::with_capacity(n),
            top: StringBuilder::with_capacity(n, n * 8),
            top_z: Float64Builder::with_capacity(n),
            drift: StringBuilder::new(),
            label: StringBuilder::new(),
        }
    }
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        device: &str,
        t: i64,
        partition: i32,
        offset: i64,
        score: f64,
        distance: f64,
        anomalous: bool,
        warming: bool,
        top: Option<(&str, f64)>,
        drift: &[&str],
        label: Option<&str>,
    ) {
        self.device.append_value(device);
        self.time.append_value(t);
        self.partition.append_value(partition);
        self.offset.append_value(offset);
        self.score.append_value(score);
        self.distance.append_value(distance);
        self.anomalous.append_value(anomalous);
        self.warming.append_value(warming);
        self.top.append_option(top.map(|x| x.0));
        self.top_z.append_option(top.map(|x| x.1));
        if drift.is_empty() {
            self.drift.append_null();
        } else {
            self.drift.append_value(drift.join(","));
        }
        self.label.append_option(label);
    }
    fn finish(mut self, schema: SchemaRef) -> Result<RecordBatch, OperatorError> {
        Ok(RecordBatch::try_new(
            schema,
            vec![
                Arc::new(self.device.finish()),
                Arc::new(self.time.finish()),
                Arc::new(self.partition.finish()),
                Arc::new(self.offset.finish()),
                Arc::new(self.score.finish()),
                Arc::new(self.distance.finish()),
                Arc::new(self.anomalous.finish()),
                Arc::new(self.warming.finish()),
                Arc::new(self.top.finish()),
                Arc::new(self.top_z.finish()),
                Arc::new(self.drift.finish()),
                Arc::new(self.label.finish()),
            ],
        )?)
    }
}

impl TwinOperator {
    /// The verdict schema of [`process_batch`](Self::process_batch)'s output.
    pub fn output_schema(&self) -> SchemaRef {
        self.out_schema.clone()
    }

    /// Apply a batch of events (the decoder's schema): one verdict row per event,
    /// in order (the twin alone scores them).
    pub fn process_batch(&mut self, batch: RecordBatch) -> Result<RecordBatch, OperatorError> {
        Ok(self.run_batch(&batch, false)?.0)
    }

    /// Apply a batch and also return, for every applied event, the snapshot of its
    /// twin as it was before the event ([`context_schema`](Self::context_schema)):
    /// the `twin` table of the feature SQL. Rows align with the verdict rows.
    pub fn process_with_context(&mut self, batch: &RecordBatch) -> Result<(RecordBatch, RecordBatch), OperatorError> {
        let (v, c) = self.run_batch(batch, true)?;
        Ok((v, c.expect("context requested")))
    }

    /// Arrow schema of the per-event twin snapshot: `device_id`, `_partition`,
    /// `_offset`; per metric `<m>__x` (this event's transformed value), `<m>__mean`,
    /// `<m>__sd` (the device's baseline, null while it warms up), `<m>__prev` (the
    /// device's previous value), `<m>__win` (its short-window average); then the
    /// inter-arrival time `gap__x/__mean/__sd` (log1p ms), `rate_per_s`,
    /// `events_seen`, `new_peer` (0/1), `drift_count`, `behaviour_distance` (the
    /// metric-only distance, blind to identity), `twin_distance` (raised by identity
    /// drift), `twin_score`, `warming_up`.
    pub fn context_schema(&self) -> SchemaRef {
        self.ctx_schema.clone()
    }

    fn run_batch(&mut self, batch: &RecordBatch, with_ctx: bool) -> Result<(RecordBatch, Option<RecordBatch>), OperatorError> {
        if batch.schema().fields() != self.in_schema.fields() {
            return Err(OperatorError::Schema(format!("expected the `{}` event schema", self.schema_id)));
        }
        let down = |c: usize| -> Result<&Float64Array, OperatorError> {
            batch.column(c).as_any().downcast_ref::<Float64Array>().ok_or_else(|| OperatorError::Schema(format!("column {c} is not Float64")))
        };
        let f64_cols: Vec<usize> = self.layout.metrics.iter().map(|m| m.0).collect();
        let cols = BatchCols {
            batch: &batch,
            device: batch.column(0).as_any().downcast_ref().ok_or_else(|| OperatorError::Schema("device_id".into()))?,
            time: batch.column(1).as_any().downcast_ref().ok_or_else(|| OperatorError::Schema("event_time".into()))?,
            partition: batch.column(2).as_any().downcast_ref().ok_or_else(|| OperatorError::Schema("_partition".into()))?,
            offset: batch.column(3).as_any().downcast_ref().ok_or_else(|| OperatorError::Schema("_offset".into()))?,
            f64s: f64_cols.iter().map(|&c| down(c)).collect::<Result<_, _>>()?,
            f64_cols,
        };
        let mut vb = VerdictBuilder::new(batch.num_rows());
        let mut cb = with_ctx.then(|| ContextBuilder::new(self.layout.metrics.len(), batch.num_rows()));
        for row in 0..batch.num_rows() {
            self.apply_row(&cols, row, &mut vb, cb.as_mut());
        }
        let verdicts = vb.finish(self.out_schema.clone())?;
        let ctx = cb.map(|c| c.finish(self.ctx_schema.clone())).transpose()?;
        Ok((verdicts, ctx))
    }
}

/// Column-name suffixes of the per-metric snapshot columns, in order.
pub const CONTEXT_METRIC_SUFFIXES: [&str; 5] = ["__x", "__mean", "__sd", "__prev", "__win"];

fn context_arrow_schema(metric_names: &[String]) -> SchemaRef {
    use arrow::datatypes::{DataType, Field, Schema};
    use twinguard_schemas::fields;
    let mut f = vec![
        Field::new(fields::DEVICE_ID, DataType::Utf8, false),
        Field::new(fields::SRC_PARTITION, DataType::Int32, false),
        Field::new(fields::SRC_OFFSET, DataType::Int64, false),
    ];
    for m in metric_names {
        for suf in CONTEXT_METRIC_SUFFIXES {
            f.push(Field::new(format!("{m}{suf}"), DataType::Float64, true));
        }
    }
    for name in ["gap__x", "gap__mean", "gap__sd", "rate_per_s"] {
        f.push(Field::new(name, DataType::Float64, true));
    }
    f.push(Field::new("events_seen", DataType::Int64, false));
    for name in ["new_peer", "drift_count", "behaviour_distance", "twin_distance", "twin_score"] {
        f.push(Field::new(name, DataType::Float64, true));
    }
    f.push(Field::new(fields::WARMING_UP, DataType::Boolean, false));
    Arc::new(Schema::new(f))
}

/// Builds the per-event twin snapshot batch.
struct ContextBuilder {
    device: StringBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
    /// Per metric, one builder per [`CONTEXT_METRIC_SUFFIXES`] entry.
    metrics: Vec<[Float64Builder; 5]>,
    /// gap x/mean/sd, rate.
    gap: [Float64Builder; 4],
    events: Int64Builder,
    /// new_peer, drift_count, behaviour_distance, twin_distance, twin_score.
    tail: [Float64Builder; 5],
    warming: BooleanBuilder,
}

impl ContextBuilder {
    fn new(n_metrics: usize, n: usize) -> Self {
        let fb = || Float64Builder::with_capacity(n);
        ContextBuilder {
            device: StringBuilder::with_capacity(n, n * 16),
            partition: Int32Builder::with_capacity(n),
            offset: Int64Builder::with_capacity(n),
            metrics: (0..n_metrics).map(|_| std::array::from_fn(|_| fb())).collect(),
            gap: std::array::from_fn(|_| fb()),
            events: Int64Builder::with_capacity(n),
            tail: std::array::from_fn(|_| fb()),
            warming: BooleanBuilder::with_capacity(n),
        }
    }

    /// Record the twin as it is before the event (`values`: the event's transformed
    /// metrics, then gap, then peer novelty).
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        device: &str,
        partition: i32,
        offset: i64,
        twin: &Twin,
        metrics: &[(usize, String, Transform)],
        values: &[Option<f64>],
        cfg: &TwinConfig,
        n_metrics: usize,
        drift: usize,
        scores: [f64; 3],
        warming: bool,
    ) {
        let warm = cfg.warmup_events as u32;
        let fin = |x: f64| x.is_finite().then_some(x);
        self.device.append_value(device);
        self.partition.append_value(partition);
        self.offset.append_value(offset);
        for (i, b) in self.metrics.iter_mut().enumerate() {
            let bl = &twin.baselines[i];
            let ready = bl.n >= warm;
            b[0].append_option(values[i]);
            b[1].append_option(ready.then(|| bl.mean()));
            b[2].append_option(ready.then(|| bl.sd(cfg)));
            b[3].append_option(fin(twin.latest[i]).map(|x| metrics[i].2.apply(x)));
            b[4].append_option(twin.window.get(i).map(|&w| f64::from(w)).and_then(fin));
        }
        let g = &twin.baselines[n_metrics];
        let ready = g.n >= warm;
        self.gap[0].append_option(values[n_metrics]);
        self.gap[1].append_option(ready.then(|| g.mean()));
        self.gap[2].append_option(ready.then(|| g.sd(cfg)));
        self.gap[3].append_value(twin.rate_per_s);
        self.events.append_value(i64::try_from(twin.events).unwrap_or(i64::MAX));
        self.tail[0].append_option(values[n_metrics + 1]);
        self.tail[1].append_value(drift as f64);
        for (b, x) in self.tail[2..].iter_mut().zip(scores) {
            b.append_value(x);
        }
        self.warming.append_value(warming);
    }

    fn finish(mut self, schema: SchemaRef) -> Result<RecordBatch, OperatorError> {
        let mut cols: Vec<arrow::array::ArrayRef> =
            vec![Arc::new(self.device.finish()), Arc::new(self.partition.finish()), Arc::new(self.offset.finish())];
        for b in &mut self.metrics {
            for x in b.iter_mut() {
                cols.push(Arc::new(x.finish()));
            }
        }
        for x in &mut self.gap {
            cols.push(Arc::new(x.finish()));
        }
        cols.push(Arc::new(self.events.finish()));
        for x in &mut self.tail {
            cols.push(Arc::new(x.finish()));
        }
        cols.push(Arc::new(self.warming.finish()));
        Ok(RecordBatch::try_new(schema, cols)?)
    }
}
