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

/// Baselines learn a value at most this many standard deviations from their mean
/// (winsorised): a normal event's level and spread, a flagged event's spread only
/// ([`Baseline::widen`](state::Baseline::widen)).
const WINSOR_SD: f64 = 4.0;

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

mod columns;
mod state;
mod store;

use columns::*;
pub use state::*;
pub use store::*;

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
                t.class = class.map(Str::from);
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
            let Some(t) = self.store.partitions.get_mut(&p).and_then(|m| m.get_mut(key.as_str())) else { continue };
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
            idle.extend(map.iter().filter(|(_, t)| t.last_seen_ms < cutoff && removable(*p, t)).map(|(k, t)| (t.last_seen_ms, *p, k.to_string())));
        }
        idle.sort();
        let capped = idle.len().saturating_sub(self.cfg.max_expiries_per_sweep);
        idle.truncate(self.cfg.max_expiries_per_sweep);
        let mut removed = 0;
        for (_, p, k) in idle {
            if let Some(m) = self.store.partitions.get_mut(&p) {
                m.remove(k.as_str());
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
                .map(|t| (t.last_seen_ms, t.partition, t.device_id.to_string()))
                .collect();
            all.sort();
            for (_, p, k) in all.into_iter().take(total - self.cfg.max_twins) {
                if let Some(m) = self.store.partitions.get_mut(&p) {
                    m.remove(k.as_str());
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
            None => map.entry(device.into()).or_insert_with(|| {
                Box::new(Twin::new(&self.schema_id, device, partition, t, n_metrics, layout.properties.len()))
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
            **twin = Twin::new(&self.schema_id, device, partition, t, n_metrics, layout.properties.len());
            twin.response = response;
            self.resets += 1;
        }
        // Calibrating (after warm-up, before the device has its own threshold): not
        // judged, its distance recorded instead.
        let own = twin.calibration.as_ref().and_then(|c| c.threshold);
        let calibrating = cfg.calibration_events > 0 && own.is_none() && twin.events >= cfg.warmup_events;
        let warming = twin.events < cfg.warmup_events || calibrating;
        let threshold = own.map_or(cfg.anomaly_threshold, f64::from);

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
        let k = zs.len().min(cfg.top_k);
        largest_first(&mut zs, k);
        let mut distance =
            if k == 0 { 0.0 } else { (zs[..k].iter().map(|(z, _)| z * z).sum::<f64>() / k as f64).sqrt() };

        let drift = identity_drift(twin, b, row, layout, cfg, warming);
        let behaviour = distance;
        if calibrating {
            calibrate(twin, behaviour, cfg);
        }
        if !drift.is_empty() {
            distance = distance.max(2.0 * threshold);
        }
        let anomalous = !warming && distance >= threshold;
        let th2 = threshold * threshold;
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

        // The baselines skip outliers: judged anomalous, or, while calibrating (not
        // judged), past the fixed threshold, so they learn from the same kind of
        // events before and after calibration.
        let outlier = if calibrating { distance >= cfg.anomaly_threshold } else { anomalous };
        if anomalous {
            twin.anomalies += 1;
        }
        learn(twin, b, row, layout, cfg, &values, &peer_vals, gap, outlier);
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

/// Identity drift of one row: the binding fields and firmware hashes the twin never
/// saw for this device. While it warms up, new binding values are learned instead
/// (up to `max_bindings_per_field`); the first firmware hash is always learned.
fn identity_drift<'l>(twin: &mut Twin, b: &BatchCols<'_>, row: usize, layout: &'l Layout, cfg: &TwinConfig, warming: bool) -> Vec<&'l str> {
    let mut drift: Vec<&'l str> = Vec::new();
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
                        // Exact growth here and below: these lists are short, filled
                        // once, and kept for the device's life (a doubling Vec would
                        // hold room for 4 where 1 is typical).
                        twin.bindings.reserve_exact(1);
                        twin.bindings.push(Binding { field: name.as_str().into(), values: Vec::new() });
                        twin.bindings.last_mut().expect("just pushed")
                    }
                };
                if bd.values.len() < cfg.max_bindings_per_field {
                    bd.values.reserve_exact(1);
                    bd.values.push(v.into());
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
            None => twin.firmware = Some(a.value(row).into()),
            Some(h) if h != a.value(row) => drift.push("firmware_hash"),
            Some(_) => {}
        }
    }
    drift
}

/// Puts the `k` z-scores of largest magnitude first, largest first (ties by feature
/// index: a total order, so the same prefix, bit for bit, as sorting them all).
/// Selecting them and sorting only those: a full stable sort of the ~36 scores per
/// event was a fifth of the twin stage's time (perf, the `twin` bench).
pub(crate) fn largest_first(zs: &mut [(f64, usize)], k: usize) {
    let order = |a: &(f64, usize), b: &(f64, usize)| b.0.abs().total_cmp(&a.0.abs()).then(a.1.cmp(&b.1));
    if k == 0 {
        return;
    }
    if k < zs.len() {
        zs.select_nth_unstable_by(k - 1, order);
    }
    zs[..k].sort_unstable_by(order);
}

/// Record a calibration event's distance; with the last one, set the device's own
/// threshold (conformal: just above the k-th highest, k = ⌊fpr·(n+1)⌋, at least 1).
fn calibrate(twin: &mut Twin, distance: f64, cfg: &TwinConfig) {
    let c = twin.calibration.get_or_insert_with(Default::default);
    c.distances.push(distance as f32);
    if (c.distances.len() as u64) < cfg.calibration_events {
        return;
    }
    let mut d = std::mem::take(&mut c.distances);
    d.sort_by(|a, b| b.total_cmp(a));
    let k = ((cfg.calibration_fpr * (d.len() + 1) as f64).floor() as usize).clamp(1, d.len());
    c.threshold = Some(d[k - 1].next_up().max(f32::MIN_POSITIVE));
}

/// Fold one row into the twin. Baselines learn their level only from events judged
/// normal, winsorised, so an attack cannot drag the device's notion of normal
/// towards itself; a flagged event widens their spread (clipped), so a benign shift
/// is absorbed instead of flagged for ever. The rate, latest values, window and
/// properties follow every event.
#[allow(clippy::too_many_arguments)]
fn learn(twin: &mut Twin, b: &BatchCols<'_>, row: usize, layout: &Layout, cfg: &TwinConfig, values: &[Option<f64>], peer_vals: &[&str], gap: Option<f64>, outlier: bool) {
    let n_metrics = layout.metrics.len();
    if outlier {
        for (i, v) in values.iter().enumerate() {
            if let Some(x) = *v {
                twin.baselines[i].widen(x, cfg.ewma_alpha, WINSOR_SD, cfg);
            }
        }
    } else {
        for (i, v) in values.iter().enumerate() {
            let Some(x) = *v else { continue };
            let bl = &mut twin.baselines[i];
            let x = if bl.n >= cfg.warmup_events as u32 {
                let sd = bl.sd(cfg);
                x.clamp(bl.mean() - WINSOR_SD * sd, bl.mean() + WINSOR_SD * sd)
            } else {
                x
            };
            bl.update(x, cfg.ewma_alpha);
        }
        for p in peer_vals {
            if !twin.peers.iter().any(|k| k == p) && twin.peers.len() < cfg.max_peers {
                twin.peers.reserve_exact(1);
                twin.peers.push((*p).into());
            }
        }
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
    for (w, v) in twin.window.iter_mut().zip(values) {
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
            FieldKind::String => a.as_any().downcast_ref::<StringArray>().expect("utf8").value(row).into(),
            // Display's text (as `to_string` gives), without a heap string.
            FieldKind::I64 => compact_str::format_compact!("{}", a.as_any().downcast_ref::<Int64Array>().expect("i64").value(row)),
            FieldKind::F64 => compact_str::format_compact!("{}", a.as_any().downcast_ref::<Float64Array>().expect("f64").value(row)),
        });
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

