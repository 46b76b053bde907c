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

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Int32Array, Int64Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::collect;
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
/// The query is parsed, analysed and optimised once, against two in-memory tables
/// whose contents are swapped for every batch; each batch then costs only physical
/// planning and execution.
pub struct FeatureQuery {
    rt: tokio::runtime::Runtime,
    ctx: SessionContext,
    sql: String,
    names: Vec<String>,
    events_schema: SchemaRef,
    twin_schema: SchemaRef,
    events_table: Arc<MemTable>,
    twin_table: Arc<MemTable>,
    plan: LogicalPlan,
    out_schema: SchemaRef,
}

impl FeatureQuery {
    /// Plan `sql` against the two input schemas; errors name what is wrong with the
    /// query (syntax, unknown column, missing coordinates, non-numeric feature).
    pub fn new(sql: &str, events_schema: SchemaRef, twin_schema: SchemaRef) -> Result<Self, OperatorError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| OperatorError::Features(format!("cannot start the query runtime: {e}")))?;
        // One partition: a batch is small, and the work stays on the caller's thread.
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
        let df_err = |e: datafusion::error::DataFusionError| OperatorError::Features(e.to_string());
        let events_table = Arc::new(MemTable::try_new(events_schema.clone(), vec![Vec::new()]).map_err(df_err)?);
        let twin_table = Arc::new(MemTable::try_new(twin_schema.clone(), vec![Vec::new()]).map_err(df_err)?);
        ctx.register_table(EVENTS_TABLE, events_table.clone()).map_err(df_err)?;
        ctx.register_table(TWIN_TABLE, twin_table.clone()).map_err(df_err)?;
        let (plan, out_schema) = rt.block_on(async {
            let df = ctx.sql(sql).await.map_err(df_err)?;
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            Ok::<_, OperatorError>((df.into_optimized_plan().map_err(df_err)?, schema))
        })?;
        let mut q = FeatureQuery {
            rt,
            ctx,
            sql: sql.to_string(),
            names: Vec::new(),
            events_schema: events_schema.clone(),
            twin_schema: twin_schema.clone(),
            events_table,
            twin_table,
            plan,
            out_schema,
        };
        // Execute once on empty inputs: a query that plans but cannot run fails here.
        q.run(RecordBatch::new_empty(events_schema), RecordBatch::new_empty(twin_schema))?;
        let schema = q.out_schema.clone();
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

    /// The query text.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    fn run(&mut self, events: RecordBatch, twin: RecordBatch) -> Result<(SchemaRef, Vec<RecordBatch>), OperatorError> {
        let df_err = |e: datafusion::error::DataFusionError| OperatorError::Features(e.to_string());
        let (ctx, plan) = (&self.ctx, &self.plan);
        let (ev, tw) = (&self.events_table, &self.twin_table);
        let batches = self.rt.block_on(async move {
            *ev.batches[0].write().await = vec![events];
            *tw.batches[0].write().await = vec![twin];
            let state = ctx.state();
            let physical = state.query_planner().create_physical_plan(plan, &state).await.map_err(df_err)?;
            let out = collect(physical, ctx.task_ctx()).await.map_err(df_err);
            // Do not keep the batch alive until the next call.
            ev.batches[0].write().await.clear();
            tw.batches[0].write().await.clear();
            out
        })?;
        Ok((self.out_schema.clone(), batches))
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
        let (_, batches) = self.run(events.clone(), twin.clone())?;
        let mut seen = 0usize;
        for b in &batches {
            let p = cast(b.column(0), &DataType::Int32)?;
            let o = cast(b.column(1), &DataType::Int64)?;
            let p = p.as_any().downcast_ref::<Int32Array>().expect("cast to Int32");
            let o = o.as_any().downcast_ref::<Int64Array>().expect("cast to Int64");
            let feats: Vec<ArrayRef> =
                (2..b.num_columns()).map(|c| cast(b.column(c), &DataType::Float64)).collect::<Result<_, _>>()?;
            let feats: Vec<&arrow::array::Float64Array> =
                feats.iter().map(|a| a.as_any().downcast_ref().expect("cast to Float64")).collect();
            for r in 0..b.num_rows() {
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
