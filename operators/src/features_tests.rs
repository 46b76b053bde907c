//! Feature query tests: `FeatureQuery` (plan once, buffers sized to the batch,
//! the top projection evaluated directly) against a stock DataFusion run.

use std::collections::HashMap;

use arrow::array::{Array, Float64Array, Int32Array, Int64Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

use crate::features::FeatureQuery;
use crate::tests::{batch, event, schema};
use crate::{TwinConfig, TwinOperator};

/// The same SQL run by a stock DataFusion session (default 8,192-row batches,
/// the projection executed as an operator): `(partition, offset)` → values.
fn reference(sql: &str, events: &RecordBatch, twin: &RecordBatch) -> HashMap<(i32, i64), Vec<f64>> {
    let ctx = SessionContext::new();
    ctx.register_table("events", std::sync::Arc::new(MemTable::try_new(events.schema(), vec![vec![events.clone()]]).unwrap())).unwrap();
    ctx.register_table("twin", std::sync::Arc::new(MemTable::try_new(twin.schema(), vec![vec![twin.clone()]]).unwrap())).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let batches = rt.block_on(async { ctx.sql(sql).await.unwrap().collect().await.unwrap() });
    let mut out = HashMap::new();
    for b in &batches {
        let p = cast(b.column(0), &DataType::Int32).unwrap();
        let o = cast(b.column(1), &DataType::Int64).unwrap();
        let (p, o) = (p.as_any().downcast_ref::<Int32Array>().unwrap(), o.as_any().downcast_ref::<Int64Array>().unwrap());
        let cols: Vec<_> = (2..b.num_columns()).map(|c| cast(b.column(c), &DataType::Float64).unwrap()).collect();
        for r in 0..b.num_rows() {
            let row = cols
                .iter()
                .map(|c| {
                    let c = c.as_any().downcast_ref::<Float64Array>().unwrap();
                    if c.is_null(r) { f64::NAN } else { c.value(r) }
                })
                .collect();
            out.insert((p.value(r), o.value(r)), row);
        }
    }
    out
}

/// Batches of 5,000 events (output in several 2,048-row pieces) and of 3: the
/// shipped query (its projection evaluated by `FeatureQuery`) and a query of
/// plain columns (the projection folded into the join, no expressions to
/// evaluate) give exactly what a stock DataFusion session gives.
#[test]
fn features_equal_a_stock_datafusion_run_for_large_and_small_batches() {
    let s = schema();
    let shipped = twinguard_schemas::builtin_feature_sql(&s.id(), None).unwrap().to_string();
    let plain = "SELECT e._partition, e._offset, e.spo2, e.heart_rate FROM events e JOIN twin t ON e._partition = t._partition AND e._offset = t._offset".to_string();
    for (sql, projected) in [(shipped, true), (plain, false)] {
        let mut twin = TwinOperator::new(&s, TwinConfig::default());
        let mut q = FeatureQuery::new(&sql, s.arrow_schema(), twin.context_schema()).unwrap();
        assert_eq!(q.evaluates_projection(), projected, "{sql}");
        for (from, n) in [(0i64, 5_000i64), (5_000, 3)] {
            let evs: Vec<_> = (from..from + n).map(|i| ((i % 3) as i32, i, event(&format!("d{}", i % 40), i, 1.0))).collect();
            let events = batch(&evs);
            let (_, ctx) = twin.process_with_context(&events).unwrap();
            let want = reference(&sql, &events, &ctx);
            let got = q.compute(&events, &ctx).unwrap();
            assert_eq!(got.len(), n as usize);
            assert_eq!(want.len(), n as usize);
            for i in 0..got.len() {
                let w = &want[&(got.partition[i], got.offset[i])];
                let same = w.iter().zip(got.row(i)).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
                assert!(same, "row {i} ({}, {}) of a batch of {n}: {:?} vs {:?}", got.partition[i], got.offset[i], got.row(i), w);
            }
        }
    }
}
