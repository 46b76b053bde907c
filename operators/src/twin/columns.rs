//! Column plumbing of the twin operator: where the schema's fields are (`Layout`),
//! the input columns of a batch, and the builders of the verdict and per-event
//! snapshot (context) batches.

use super::*;

/// Derived baselines after the metrics: inter-arrival time, peer novelty.
pub(super) const DERIVED: usize = 2;

pub(super) const INTERARRIVAL: &str = "_interarrival_ms";

pub(super) const NEW_PEER: &str = "_new_peer";

/// Peer novelty is a 0/1 signal; a single new peer alone stays below the threshold.
pub(super) const NEW_PEER_MIN_SD: f64 = 0.25;

/// Column indices resolved once from the schema.
pub(super) struct Layout {
    pub(super) metrics: Vec<(usize, String, Transform)>,
    pub(super) identities: Vec<(usize, String)>,
    pub(super) peers: Vec<usize>,
    pub(super) firmware: Vec<usize>,
    pub(super) properties: Vec<(usize, FieldKind)>,
    pub(super) label: Option<usize>,
}

/// Typed views of the input batch's columns.
pub(super) struct BatchCols<'a> {
    pub(super) batch: &'a RecordBatch,
    pub(super) device: &'a StringArray,
    pub(super) time: &'a TimestampMillisecondArray,
    pub(super) partition: &'a Int32Array,
    pub(super) offset: &'a Int64Array,
    pub(super) f64s: Vec<&'a Float64Array>,
    pub(super) f64_cols: Vec<usize>,
}

impl<'a> BatchCols<'a> {
    pub(super) fn str_col(&self, c: usize) -> Option<&'a StringArray> {
        self.batch.column(c).as_any().downcast_ref::<StringArray>()
    }
}

pub(super) struct VerdictBuilder {
    pub(super) device: StringBuilder,
    pub(super) time: TimestampMillisecondBuilder,
    pub(super) partition: Int32Builder,
    pub(super) offset: Int64Builder,
    pub(super) score: Float64Builder,
    pub(super) distance: Float64Builder,
    pub(super) anomalous: BooleanBuilder,
    pub(super) warming: BooleanBuilder,
    pub(super) top: StringBuilder,
    pub(super) top_z: Float64Builder,
    pub(super) drift: StringBuilder,
    pub(super) label: StringBuilder,
}

impl VerdictBuilder {
    pub(super) fn new(n: usize) -> Self {
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
    pub(super) fn push(
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
    pub(super) fn finish(mut self, schema: SchemaRef) -> Result<RecordBatch, OperatorError> {
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

/// Column-name suffixes of the per-metric snapshot columns, in order.
pub const CONTEXT_METRIC_SUFFIXES: [&str; 5] = ["__x", "__mean", "__sd", "__prev", "__win"];

pub(super) fn context_arrow_schema(metric_names: &[String]) -> SchemaRef {
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
pub(super) struct ContextBuilder {
    pub(super) device: StringBuilder,
    pub(super) partition: Int32Builder,
    pub(super) offset: Int64Builder,
    /// Per metric, one builder per [`CONTEXT_METRIC_SUFFIXES`] entry.
    pub(super) metrics: Vec<[Float64Builder; 5]>,
    /// gap x/mean/sd, rate.
    pub(super) gap: [Float64Builder; 4],
    pub(super) events: Int64Builder,
    /// new_peer, drift_count, behaviour_distance, twin_distance, twin_score.
    pub(super) tail: [Float64Builder; 5],
    pub(super) warming: BooleanBuilder,
}

impl ContextBuilder {
    pub(super) fn new(n_metrics: usize, n: usize) -> Self {
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
    pub(super) fn push(
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

    pub(super) fn finish(mut self, schema: SchemaRef) -> Result<RecordBatch, OperatorError> {
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
