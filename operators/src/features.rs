//! Feature vectors by SQL: DataFusion runs a schema's feature query over the current
//! event batch (table `events`) joined with the per-event twin snapshot (table
//! `twin`, see [`TwinOperator::context_schema`](crate::TwinOperator::context_schema)).
//!
//! Contract:
//! - The query's first two output columns MUST be `_partition` and `_offset` (the
//!   event's coordinates); every other column is a numeric feature, in order.
//! - The SAME query computes training features offline and live features in the
//!   stream; nothing else shapes the vector (train/serve parity).
//! - A NULL or non-finite feature becomes NaN; the models' standardiser maps it to
//!   the training mean.

use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, Int32Array, Int64Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::{collect, ExecutionPlan, PhysicalExpr};
use datafusion::prelude::{SessionConfig, SessionContext};
use twinguard_schemas::fields;

use crate::OperatorError;

/// Name of the events table in feature SQL.
pub const EVENTS_TABLE: &str = "events";
/// Name of the twin-snapshot table in feature SQL.
pub const TWIN_TABLE: &str = "twin";

/// Feature vectors of one batch, row-major, aligned with the given coordinates.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureRows {
    pub partition: Vec<i32>,
    pub offset: Vec<i64>,
    pub cols: usize,
    pub values: Vec<f64>,
}

impl FeatureRows {
    pub fn len(&self) -> usize {
        self.offset.len()
    }
    pub fn is_empty(&self) -> bool {
        self.offset.is_empty()
    }
    pub fn row(&self, i: usize) -> &[f64] {
        &self.values[i * self.cols..(i + 1) * self.cols]
    }
}

/// Runs one feature query with DataFusion, batch after batch.
///
/// The query is parsed, analysed, optimised and physically planned once, against
/// two input tables that read a slot when executed; each batch puts its rows in the
/// slots, resets the plan's per-run state (a join's build side) and executes it.
/// Dynamic filters are off: a plan that uses them cannot be re-executed.
///
/// The plan's top projection (the feature expressions) is not executed as an
/// operator: its expressions are evaluated here on each batch its input yields.
/// The operator would, per execution, format every expression into a metrics
/// name and count the output's memory: about a third of a small batch's cost
/// (benches/RESULTS.md, "Feature SQL: buffers sized to the batch").
pub struct FeatureQuery {
    rt: tokio::runtime::Runtime,
    ctx: SessionContext,
    sql: String,
    names: Vec<String>,
    events_schema: SchemaRef,
    twin_schema: SchemaRef,
    events_slot: Arc<Mutex<Option<RecordBatch>>>,
    twin_slot: Arc<Mutex<Option<RecordBatch>>>,
    /// The plan below the top projection (the whole plan if it has none).
    plan: Arc<dyn ExecutionPlan>,
    /// The top projection's expressions over `plan`'s output, or `None` if the
    /// plan's output columns are the features as they are.
    exprs: Option<Vec<Arc<dyn PhysicalExpr>>>,
    /// One task context per output batch size (16, 32, ..., 2,048 rows), made on first use.
    tasks: [Option<Arc<TaskContext>>; OUTPUT_SIZES],
}

/// The join's output buffers: between these many rows, the batch's row count
/// rounded up to a power of two.
const MIN_OUTPUT_ROWS: usize = 16;
const MAX_OUTPUT_ROWS: usize = 2048;
const OUTPUT_SIZES: usize = (MAX_OUTPUT_ROWS / MIN_OUTPUT_ROWS).trailing_zeros() as usize + 1;

/// One input table of the feature query: yields the batch in its slot, if any.
#[derive(Debug)]
struct Slot {
    schema: SchemaRef,
    batch: Arc<Mutex<Option<RecordBatch>>>,
}

impl PartitionStream for Slot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }
    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batch = self.batch.lock().expect("slot lock").clone();
        let stream = MemoryStream::try_new(batch.into_iter().collect(), self.schema.clone(), None)
            .expect("a memory stream without a projection always builds");
        Box::pin(stream)
    }
}

impl FeatureQuery {
    /// Plan `sql` against the two input schemas; errors name what is wrong with the
    /// query (syntax, unknown column, missing coordinates, non-numeric feature).
    pub fn new(sql: &str, events_schema: SchemaRef, twin_schema: SchemaRef) -> Result<Self, OperatorError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| OperatorError::Features(format!("cannot start the query runtime: {e}")))?;
        // One partition: a batch is small, and the work stays on the caller's thread.
        let mut config = SessionConfig::new().with_target_partitions(1);
        config.options_mut().optimizer.enable_dynamic_filter_pushdown = false;
        let ctx = SessionContext::new_with_config(config);
        let df_err = |e: datafusion::error::DataFusionError| OperatorError::Features(e.to_string());
        let events_slot = Arc::new(Mutex::new(None));
        let twin_slot = Arc::new(Mutex::new(None));
        for (name, schema, slot) in [(EVENTS_TABLE, &events_schema, &events_slot), (TWIN_TABLE, &twin_schema, &twin_slot)] {
            let part: Arc<dyn PartitionStream> = Arc::new(Slot { schema: schema.clone(), batch: slot.clone() });
            let table = StreamingTable::try_new(schema.clone(), vec![part]).map_err(df_err)?;
            ctx.register_table(name, Arc::new(table)).map_err(df_err)?;
        }
        let (plan, out_schema) = rt.block_on(async {
            let df = ctx.sql(sql).await.map_err(df_err)?;
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            Ok::<_, OperatorError>((df.create_physical_plan().await.map_err(df_err)?, schema))
        })?;
        let (plan, exprs) = match plan.downcast_ref::<ProjectionExec>() {
            Some(p) => (p.input().clone(), Some(p.expr().iter().map(|e| e.expr.clone()).collect())),
            None => (plan, None),
        };
        let mut q = FeatureQuery {
            rt,
            ctx,
            sql: sql.to_string(),
            names: Vec::new(),
            events_schema: events_schema.clone(),
            twin_schema: twin_schema.clone(),
            events_slot,
            twin_slot,
            plan,
            exprs,
            tasks: Default::default(),
        };
        // Execute once on empty inputs: a query that plans but cannot run fails here.
        q.run(RecordBatch::new_empty(events_schema), RecordBatch::new_empty(twin_schema))?;
        let schema = out_schema;
        let cols: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        if cols.len() < 3 || cols[0] != fields::SRC_PARTITION || cols[1] != fields::SRC_OFFSET {
            return Err(OperatorError::Features(format!(
                "the query must select `{}`, `{}` first, then at least one feature; it selects {cols:?}",
                fields::SRC_PARTITION,
                fields::SRC_OFFSET
            )));
        }
        for f in schema.fields().iter().skip(2) {
            if !f.data_type().is_numeric() && f.data_type() != &DataType::Boolean {
                return Err(OperatorError::Features(format!(
                    "feature `{}` has type {}, not a number",
                    f.name(),
                    f.data_type()
                )));
            }
        }
        q.names = schema.fields().iter().skip(2).map(|f| f.name().clone()).collect();
        Ok(q)
    }

    /// Feature names, in vector order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether the plan's top projection is evaluated here (see the type's docs).
    #[cfg(test)]
    pub(crate) fn evaluates_projection(&self) -> bool {
        self.exprs.is_some()
    }

    /// The query text.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// Execute the query over one batch: each output batch's columns, in the order of
    /// the query's output schema.
    fn run(&mut self, events: RecordBatch, twin: RecordBatch) -> Result<Vec<Vec<ArrayRef>>, OperatorError> {
        let df_err = |e: datafusion::error::DataFusionError| OperatorError::Features(e.to_string());
        let rows = events.num_rows().clamp(MIN_OUTPUT_ROWS, MAX_OUTPUT_ROWS).next_power_of_two();
        *self.events_slot.lock().expect("slot lock") = Some(events);
        *self.twin_slot.lock().expect("slot lock") = Some(twin);
        let plan = reset_plan_states(self.plan.clone()).map_err(df_err);
        // The join coalesces its output into buffers of the session's batch size
        // (8,192 rows by default), allocated afresh per execution for every column:
        // sized to this batch instead (a power of two, at most 2,048 rows), they cost
        // 1.3 ms per 1,024 events instead of 3.7, and 0.5 ms per 64 instead of 1.0
        // (benches/RESULTS.md, "Feature SQL: buffers sized to the batch").
        let slot = (rows / MIN_OUTPUT_ROWS).trailing_zeros() as usize;
        let task = self.tasks[slot]
            .get_or_insert_with(|| {
                let mut state = self.ctx.state();
                *state.config_mut() = state.config().clone().with_batch_size(rows);
                Arc::new(TaskContext::from(&state))
            })
            .clone();
        let out = plan.and_then(|plan| self.rt.block_on(collect(plan, task)).map_err(df_err));
        // Do not keep the batch alive until the next call.
        self.events_slot.lock().expect("slot lock").take();
        self.twin_slot.lock().expect("slot lock").take();
        let batches = out?;
        let Some(exprs) = &self.exprs else {
            return Ok(batches.into_iter().map(|b| b.columns().to_vec()).collect());
        };
        let eval = |b: &RecordBatch| -> Result<Vec<ArrayRef>, datafusion::error::DataFusionError> {
            exprs.iter().map(|e| e.evaluate(b)?.into_array(b.num_rows())).collect()
        };
        batches.iter().map(|b| eval(b).map_err(df_err)).collect()
    }

    /// Compute the feature vectors of `events` (an event batch) given `twin` (its
    /// snapshot rows). Rows come back in the order of `twin`'s coordinates; an event
    /// without a snapshot row (a replay the twin skipped) has no vector.
    pub fn compute(&mut self, events: &RecordBatch, twin: &RecordBatch) -> Result<FeatureRows, OperatorError> {
        if events.schema().fields() != self.events_schema.fields() || twin.schema().fields() != self.twin_schema.fields() {
            return Err(OperatorError::Schema("feature query inputs do not match the schemas it was planned for".into()));
        }
        let n = twin.num_rows();
        let cols = self.names.len();
        let mut out = FeatureRows { partition: Vec::with_capacity(n), offset: Vec::with_capacity(n), cols, values: vec![f64::NAN; n * cols] };
        if n == 0 {
            return Ok(out);
        }
        let want_p = twin.column(1).as_any().downcast_ref::<Int32Array>().ok_or_else(|| OperatorError::Schema("twin _partition".into()))?;
        let want_o = twin.column(2).as_any().downcast_ref::<Int64Array>().ok_or_else(|| OperatorError::Schema("twin _offset".into()))?;
        let mut slot = std::collections::HashMap::with_capacity(n);
        for i in 0..n {
            out.partition.push(want_p.value(i));
            out.offset.push(want_o.value(i));
            slot.insert((want_p.value(i), want_o.value(i)), i);
        }
        let batches = self.run(events.clone(), twin.clone())?;
        let mut seen = 0usize;
        for b in &batches {
            let p = cast(&b[0], &DataType::Int32)?;
            let o = cast(&b[1], &DataType::Int64)?;
            let p = p.as_any().downcast_ref::<Int32Array>().expect("cast to Int32");
            let o = o.as_any().downcast_ref::<Int64Array>().expect("cast to Int64");
            let feats: Vec<ArrayRef> = b[2..].iter().map(|c| cast(c, &DataType::Float64)).collect::<Result<_, _>>()?;
            let feats: Vec<&arrow::array::Float64Array> =
                feats.iter().map(|a| a.as_any().downcast_ref().expect("cast to Float64")).collect();
            for r in 0..p.len() {
                let Some(&i) = slot.get(&(p.value(r), o.value(r))) else {
                    return Err(OperatorError::Features(format!(
                        "the query returned a row for ({}, {}) that is not an event of this batch",
                        p.value(r),
                        o.value(r)
                    )));
                };
                let dst = &mut out.values[i * cols..(i + 1) * cols];
                for (c, a) in feats.iter().enumerate() {
                    dst[c] = if a.is_null(r) { f64::NAN } else { a.value(r) };
                }
                seen += 1;
            }
        }
        if seen != n {
            return Err(OperatorError::Features(format!(
                "the query returned {seen} rows for {n} events: it must return exactly one row per event (no filters, inner join on coordinates)"
            )));
        }
        Ok(out)
    }
}
