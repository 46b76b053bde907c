//! Bounds on what one query may build: functions whose output can grow are wrapped
//! to check their output size before they allocate (`Bounded`, `||` too), and the
//! session (`session_context`) has a memory pool, no table factories and no
//! `file://` object store.

use super::*;

/// Bytes one function call (or one `||`) may produce for one batch. The functions
/// served build values at most linear in their inputs, but linear steps chained (a
/// CTE doubling `s || s` after another) grow exponentially, allocated outside the
/// memory pool: each such step is checked before it allocates.
pub const MAX_VALUE_BATCH_BYTES: usize = 32 << 20;

// A function over the twins table's longest string columns stays within the bound.
const _: () = assert!(crate::sql::view::TWINS_BATCH_BYTES * 4 <= MAX_VALUE_BATCH_BYTES);

/// How much a function may grow its inputs: `Some(factor)` for the functions whose
/// output can be larger than their inputs (separators are counted where they
/// repeat); `None` for those whose output is at most their input or fixed-size.
pub(super) fn growth(name: &str) -> Option<usize> {
    match name {
        "concat" | "concat_ws" | "make_array" | "array_concat" | "array_append" | "array_prepend" | "array_union" | "flatten" | "array_to_string" => Some(1),
        "encode" => Some(2),
        "upper" | "lower" | "initcap" => Some(3),
        "translate" | "to_char" | "arrow_cast" => Some(4),
        "string_to_array" => Some(16),
        _ => None,
    }
}

/// Bytes of an argument for `rows` rows (a scalar is repeated per row).
pub(super) fn arg_bytes(v: &ColumnarValue, rows: usize) -> usize {
    match v {
        ColumnarValue::Array(a) => a.get_buffer_memory_size(),
        ColumnarValue::Scalar(s) => s.size().saturating_mul(rows.max(1)),
    }
}

/// An upper bound of what `name` builds from `args`.
pub(super) fn output_bound(name: &str, factor: usize, args: &[ColumnarValue], rows: usize) -> usize {
    let total: usize = args.iter().map(|a| arg_bytes(a, rows)).fold(0, usize::saturating_add);
    let extra = match (name, args) {
        // The separator (first argument) between every two values.
        ("concat_ws", [sep, rest @ ..]) => arg_bytes(sep, rows).saturating_mul(rest.len().saturating_sub(1)),
        // The separator (and null text) between the elements of every list.
        ("array_to_string", [list, seps @ ..]) => {
            let elements = match list {
                ColumnarValue::Array(a) => a.as_any().downcast_ref::<datafusion::arrow::array::ListArray>().map_or(a.len(), |l| l.values().len()),
                ColumnarValue::Scalar(s) => s.size().saturating_mul(rows.max(1)),
            };
            seps.iter().map(|s| arg_bytes(s, 1)).fold(0, usize::saturating_add).saturating_mul(elements)
        }
        _ => 0,
    };
    total.saturating_add(extra).saturating_mul(factor)
}

pub(super) fn check_growth(name: &str, bound: usize) -> datafusion::error::Result<()> {
    if bound > MAX_VALUE_BATCH_BYTES {
        return Err(datafusion::error::DataFusionError::ResourcesExhausted(format!(
            "`{name}` would build up to {bound} bytes in one batch, more than the endpoint's limit of {} MiB per value (values that grow step by step, e.g. `s || s` in one CTE after another, stop here)",
            MAX_VALUE_BATCH_BYTES >> 20
        )));
    }
    Ok(())
}

/// A served function whose output can outgrow its input, with its output bounded
/// before it is built ([`MAX_VALUE_BATCH_BYTES`]). Same name, signature and types
/// as the function it wraps; no `simplify` (a rewrite could bypass the check).
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct Bounded {
    pub(super) inner: Arc<ScalarUDF>,
    pub(super) factor: usize,
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }
    fn signature(&self) -> &Signature {
        self.inner.signature()
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> datafusion::error::Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }
    fn return_type(&self, arg_types: &[DataType]) -> datafusion::error::Result<DataType> {
        self.inner.inner().return_type(arg_types)
    }
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> datafusion::error::Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }
    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> datafusion::error::Result<ColumnarValue> {
        check_growth(self.name(), output_bound(self.name(), self.factor, &args.args, args.number_rows))?;
        self.inner.invoke_with_args(args)
    }
}

/// `l || r` with its output bounded before it is built: DataFusion's own
/// evaluation of the operator, behind the size check.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct BoundedStringConcat {
    pub(super) signature: Signature,
}

impl ScalarUDFImpl for BoundedStringConcat {
    fn name(&self) -> &str {
        "bounded_string_concat"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, arg_types: &[DataType]) -> datafusion::error::Result<DataType> {
        match arg_types {
            [l, r] => BinaryTypeCoercer::new(l, &Operator::StringConcat, r).get_result_type(),
            _ => datafusion::common::plan_err!("`||` takes two operands"),
        }
    }
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> datafusion::error::Result<FieldRef> {
        let types: Vec<DataType> = args.arg_fields.iter().map(|f| f.data_type().clone()).collect();
        let nullable = args.arg_fields.iter().any(|f| f.is_nullable());
        Ok(Arc::new(Field::new(self.name(), self.return_type(&types)?, nullable)))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> datafusion::error::Result<ColumnarValue> {
        use datafusion::physical_expr::expressions::{BinaryExpr as PhysicalBinary, Column};
        use datafusion::physical_expr::PhysicalExpr;
        check_growth("||", output_bound("||", 1, &args.args, args.number_rows))?;
        let scalar = args.args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let rows = if scalar { 1 } else { args.number_rows };
        let cols = args.args.iter().map(|a| a.to_array(rows)).collect::<datafusion::error::Result<Vec<_>>>()?;
        let fields: Vec<FieldRef> = args.arg_fields.iter().enumerate().map(|(i, f)| Arc::new(Field::new(format!("c{i}"), f.data_type().clone(), true))).collect();
        let batch = datafusion::arrow::record_batch::RecordBatch::try_new(Arc::new(datafusion::arrow::datatypes::Schema::new(fields)), cols)?;
        let expr = PhysicalBinary::new(Arc::new(Column::new("c0", 0)), Operator::StringConcat, Arc::new(Column::new("c1", 1)));
        let out = expr.evaluate(&batch)?;
        match (scalar, out) {
            (true, ColumnarValue::Array(a)) => Ok(ColumnarValue::Scalar(datafusion::common::ScalarValue::try_from_array(&a, 0)?)),
            (_, out) => Ok(out),
        }
    }
}

/// Puts every growing function call and every `||` behind its size check
/// ([`Bounded`], [`BoundedStringConcat`]), whether the call came from the registry
/// or from an expression planner. Runs after type coercion, before the optimiser
/// (whose constant folding evaluates calls).
#[derive(Debug)]
pub(super) struct BoundValues {
    pub(super) concat: Arc<ScalarUDF>,
}

impl BoundValues {
    pub(super) fn new() -> Self {
        BoundValues { concat: Arc::new(ScalarUDF::new_from_impl(BoundedStringConcat { signature: Signature::any(2, Volatility::Immutable) })) }
    }

    pub(super) fn rewrite(&self, e: Expr) -> datafusion::error::Result<Transformed<Expr>> {
        match e {
            Expr::BinaryExpr(b) if b.op == Operator::StringConcat => Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(self.concat.clone(), vec![*b.left, *b.right])))),
            Expr::ScalarFunction(f) if f.func.inner().as_ref().downcast_ref::<Bounded>().is_none() => match growth(f.func.name()) {
                Some(factor) => Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(Arc::new(ScalarUDF::new_from_impl(Bounded { inner: f.func, factor })), f.args)))),
                None => Ok(Transformed::no(Expr::ScalarFunction(f))),
            },
            e => Ok(Transformed::no(e)),
        }
    }
}

impl AnalyzerRule for BoundValues {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> datafusion::error::Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|node| {
            let names = NamePreserver::new(&node);
            node.map_expressions(|e| {
                let name = names.save(&e);
                Ok(e.transform_up(|e| self.rewrite(e))?.update_data(|e| name.restore(e)))
            })
        })
        .map(|t| t.data)
    }
    fn name(&self) -> &str {
        "twinguard_bound_values"
    }
}

/// A DataFusion context serving the view's tables, with `pg_catalog` and
/// `information_schema` for clients' catalog queries. Queries together may hold at
/// most `max_memory_bytes` for sorts, joins and aggregations; past it they fail
/// with a resources-exhausted error instead of growing the process.
///
/// Built from parts, not from DataFusion's defaults: no table factories (so no
/// `CREATE EXTERNAL TABLE`), no file formats, no table functions, no `file://`
/// object store, recursive CTEs off, and only the allowlisted functions
/// ([`ALLOWED_SCALAR`], [`ALLOWED_AGGREGATE`], [`ALLOWED_WINDOW`]) plus
/// `pg_catalog`'s.
pub fn session_context(view: &Arc<SqlView>, max_memory_bytes: usize) -> Result<Arc<SessionContext>, PipelineError> {
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(max_memory_bytes, 1.0)
        .build_arc()
        .map_err(|e| PipelineError::io("SQL runtime", e))?;
    // The default registry holds a local file system store: gone.
    runtime.deregister_object_store(ObjectStoreUrl::local_filesystem().as_ref()).map_err(|e| PipelineError::io("SQL runtime", e))?;
    let mut config = SessionConfig::new().with_information_schema(true);
    config.options_mut().execution.enable_recursive_ctes = false;
    let keep = |list: &[&str], name: &str| list.contains(&name);
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_expr_planners(SessionStateDefaults::default_expr_planners())
        .with_scalar_functions(SessionStateDefaults::default_scalar_functions().into_iter().filter(|f| keep(ALLOWED_SCALAR, f.name())).collect())
        .with_aggregate_functions(SessionStateDefaults::default_aggregate_functions().into_iter().filter(|f| keep(ALLOWED_AGGREGATE, f.name())).collect())
        .with_window_functions(SessionStateDefaults::default_window_functions().into_iter().filter(|f| keep(ALLOWED_WINDOW, f.name())).collect())
        .with_analyzer_rule(Arc::new(BoundValues::new()))
        .build();
    let ctx = SessionContext::new_with_state(state);
    for t in Table::ALL {
        ctx.register_table(t.name(), Arc::new(ViewTable::new(view.clone(), t))).map_err(|e| PipelineError::Internal(format!("registering SQL table {}: {e}", t.name())))?;
    }
    setup_pg_catalog(&ctx, "datafusion", EmptyContextProvider).map_err(|e| PipelineError::Internal(format!("setting up pg_catalog: {e}")))?;
    Ok(Arc::new(ctx))
}
