//! What a logged-in user may run: statement and plan checks (read-only, no DDL, no
//! file access), the function allowlist (`Served`), size limits, and the query
//! handlers that execute the plan that was checked (`Guarded`).

use super::*;

pub(super) type DfStmt = (String, Option<(Statement, LogicalPlan)>);

/// The longest query text served (one statement or a simple-protocol batch):
/// clients' catalog queries are a few KB.
pub const MAX_QUERY_BYTES: usize = 256 * 1024;

/// Scalar functions served. Everything here builds values at most linear in its
/// inputs; what builds large values from small inputs (`repeat`, `lpad`, `rpad`,
/// `replace`, `regexp_replace`, `overlay`, `array_repeat`, `array_resize`, `range`,
/// `generate_series`, ...) and what reads files (`input_file_name`) is left out.
/// `pg_catalog`'s functions (for psql and BI tools' catalog queries) are added
/// to these when the session is built.
pub const ALLOWED_SCALAR: &[&str] = &[
    // math
    "abs", "acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil", "cos", "cosh", "cot", "degrees", "exp", "factorial", "floor",
    "gcd", "isnan", "iszero", "lcm", "ln", "log", "log10", "log2", "nanvl", "pi", "power", "radians", "random", "round", "signum", "sin", "sinh",
    "sqrt", "tan", "tanh", "trunc",
    // conditional, types, structs
    "arrow_cast", "arrow_try_cast", "arrow_typeof", "coalesce", "get_field", "greatest", "least", "named_struct", "nullif", "nvl", "nvl2", "struct",
    // strings (output at most linear in the inputs)
    "ascii", "bit_length", "btrim", "character_length", "chr", "concat", "concat_ws", "contains", "ends_with", "find_in_set", "initcap", "left",
    "lower", "ltrim", "octet_length", "reverse", "right", "rtrim", "split_part", "starts_with", "strpos", "substr", "substr_index", "to_hex",
    "translate", "upper", "uuid", "md5", "sha224", "sha256", "sha384", "sha512", "digest", "encode", "decode", "regexp_count", "regexp_instr",
    "regexp_like", "regexp_match",
    // dates and times
    "current_date", "current_time", "date_bin", "date_part", "date_trunc", "from_unixtime", "make_date", "make_time", "now", "to_char", "to_date",
    "to_local_time", "to_time", "to_timestamp", "to_timestamp_micros", "to_timestamp_millis", "to_timestamp_nanos", "to_timestamp_seconds",
    "to_unixtime",
    // arrays and maps (no constructor that repeats or resizes)
    "array_any_value", "array_append", "array_concat", "array_dims", "array_distinct", "array_element", "array_empty", "array_except", "array_has",
    "array_has_all", "array_has_any", "array_intersect", "array_length", "array_max", "array_min", "array_ndims", "array_pop_back",
    "array_pop_front", "array_position", "array_positions", "array_prepend", "array_remove", "array_remove_all", "array_remove_n",
    "array_reverse", "array_slice", "array_sort", "array_to_string", "array_union", "cardinality", "flatten", "make_array", "map", "map_entries",
    "map_extract", "map_keys", "map_values", "string_to_array",
];

/// Aggregate functions served (their state is charged to the memory pool).
pub const ALLOWED_AGGREGATE: &[&str] = &[
    "approx_distinct", "approx_median", "approx_percentile_cont", "approx_percentile_cont_with_weight", "array_agg", "avg", "bit_and", "bit_or",
    "bit_xor", "bool_and", "bool_or", "corr", "count", "covar_pop", "covar_samp", "first_value", "grouping", "last_value", "max", "median", "min",
    "nth_value", "percentile_cont", "regr_avgx", "regr_avgy", "regr_count", "regr_intercept", "regr_r2", "regr_slope", "regr_sxx", "regr_sxy",
    "regr_syy", "stddev", "stddev_pop", "string_agg", "sum", "var", "var_pop", "any_value",
];

/// Window functions served.
pub const ALLOWED_WINDOW: &[&str] = &["cume_dist", "dense_rank", "first_value", "lag", "last_value", "lead", "nth_value", "ntile", "percent_rank", "rank", "row_number"];

/// Session settings a client may change (per connection; psql and drivers send some).
pub(super) const SAFE_SET: &[&str] = &["statement_timeout", "datestyle", "bytea_output", "intervalstyle", "application_name", "extra_float_digits", "search_path", "client_encoding", "client_min_messages"];

/// Is the statement allowed? `Ok(true)`: allowed, and its plan must pass the
/// read-only plan check too.
pub(super) fn check_statement(s: &Statement) -> PgWireResult<bool> {
    match s {
        Statement::Query(_) | Statement::Explain { .. } => Ok(true),
        Statement::ExplainTable { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowStatus { .. }
        | Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. } => Ok(false),
        Statement::Set(Set::SingleAssignment { scope: None, hivevar: false, variable, .. })
            if SAFE_SET.contains(&variable.to_string().to_lowercase().as_str()) =>
        {
            Ok(false)
        }
        other => {
            let text = other.to_string();
            let verb: String = text.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
            Err(user_error("25006", format!("read-only endpoint: `{verb} ...` is not allowed; only SELECT, EXPLAIN and SHOW are")))
        }
    }
}

pub(super) fn check_plan(plan: &LogicalPlan) -> PgWireResult<()> {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(plan)
        .map_err(|e| user_error("25006", format!("read-only endpoint: {e}")))
}

/// The functions a session serves, by name (aliases included): what its registry
/// holds, which [`session_context`] limits to the allowlists.
#[derive(Debug, Clone, Default)]
pub struct Served(HashSet<String>);

impl Served {
    pub fn of(ctx: &SessionContext) -> Self {
        let state = ctx.state();
        let mut names: HashSet<String> = state.scalar_functions().keys().cloned().collect();
        names.extend(state.aggregate_functions().keys().cloned());
        names.extend(state.window_functions().keys().cloned());
        Served(names)
    }

    /// Every function the plan calls (subqueries included) must be served: the
    /// expression planners build some calls from syntax (`OVERLAY(...)`, array
    /// literals, `||` on arrays) without asking the registry.
    pub fn check(&self, plan: &LogicalPlan) -> PgWireResult<()> {
        let mut bad = None;
        let _ = plan.apply_with_subqueries(|node| {
            node.apply_expressions(|e| {
                e.apply(|e| {
                    let name = match e {
                        Expr::ScalarFunction(f) => Some(f.func.name()),
                        Expr::AggregateFunction(f) => Some(f.func.name()),
                        Expr::WindowFunction(f) => Some(f.fun.name()),
                        _ => None,
                    };
                    match name {
                        Some(n) if !self.0.contains(n) => {
                            bad = Some(n.to_string());
                            Ok(TreeNodeRecursion::Stop)
                        }
                        _ => Ok(TreeNodeRecursion::Continue),
                    }
                })
            })
        });
        match bad {
            Some(name) => Err(not_served(&name)),
            None => Ok(()),
        }
    }
}

/// datafusion-postgres's handler behind the read-only check and the limits.
pub(super) struct Guarded {
    pub(super) inner: DfSessionService,
    pub(super) ctx: Arc<SessionContext>,
    pub(super) parser: PostgresCompatibilityParser,
    /// The extended protocol's parser, behind the size and error checks.
    pub(super) extended: Arc<GuardedParser>,
    /// datafusion-postgres's answers to `SET`, `SHOW <variable>` and transaction
    /// statements (per connection, from the parsed statement: no query text).
    pub(super) hooks: Vec<Arc<dyn QueryHook>>,
    pub(super) served: Served,
    pub(super) timeout: Duration,
    pub(super) max_rows: usize,
}

impl Guarded {
    pub(super) fn new(ctx: Arc<SessionContext>, timeout: Duration, max_rows: usize) -> Self {
        let inner = DfSessionService::new(ctx.clone());
        let served = Served::of(&ctx);
        let extended = Arc::new(GuardedParser { inner: ExtendedQueryHandler::query_parser(&inner) });
        Guarded {
            inner,
            ctx,
            parser: PostgresCompatibilityParser::new(),
            extended,
            hooks: vec![Arc::new(SetShowHook), Arc::new(TransactionStatementHook)],
            served,
            timeout,
            max_rows,
        }
    }

    /// Wrap a result's row stream: stop it at the deadline or past the row limit
    /// (dropping the stream cancels DataFusion's execution).
    pub(super) fn limit(&self, r: Response, deadline: Instant) -> Response {
        let Response::Query(mut q) = r else { return r };
        let rows = std::mem::replace(&mut q.data_rows, Box::pin(stream::empty()));
        let (max, limit) = (self.max_rows, self.timeout);
        q.data_rows = Box::pin(stream::unfold(Some((rows, 0usize)), move |state| async move {
            let (mut rows, n) = state?;
            match timeout_at(deadline, rows.next()).await {
                Err(_) => Some((Err(timeout_error(limit)), None)),
                Ok(None) => None,
                Ok(Some(Err(e))) => Some((Err(e), None)),
                Ok(Some(Ok(_))) if n >= max => Some((
                    Err(user_error("54000", format!("query cancelled: it would return more than {max} rows (sql.max_rows); add a LIMIT or a filter"))),
                    None,
                )),
                Ok(Some(row)) => Some((row, Some((rows, n + 1)))),
            }
        }));
        Response::Query(q)
    }
}

#[async_trait]
impl SimpleQueryHandler for Guarded {
    /// Each statement is parsed once (Postgres dialect), checked, planned from that
    /// parse, its plan checked, and that very plan executed.
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if query.len() > MAX_QUERY_BYTES {
            return Err(too_long(query.len()));
        }
        let deadline = Instant::now() + self.timeout;
        let work = async {
            let statements = self.parser.parse(query).map_err(|e| user_error("42601", e.to_string()))?;
            if statements.is_empty() {
                return Ok::<_, PgWireError>(vec![Response::EmptyQuery]);
            }
            let mut out = Vec::with_capacity(statements.len());
            'stmt: for s in statements {
                let query_like = check_statement(&s)?;
                for hook in &self.hooks {
                    if let Some(r) = hook.handle_simple_query(&s, &self.ctx, client).await {
                        out.push(r?);
                        continue 'stmt;
                    }
                }
                let plan = self.ctx.state().statement_to_plan(DfStatement::Statement(Box::new(s))).await.map_err(|e| df_error(&e.to_string()))?;
                if query_like {
                    check_plan(&plan)?;
                }
                self.served.check(&plan)?;
                let df = self.ctx.execute_logical_plan(plan).await.map_err(|e| df_error(&e.to_string()))?;
                let format = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
                out.push(Response::Query(encode_dataframe(df, &Format::UnifiedText, Some(format)).await?));
            }
            Ok(out)
        };
        let responses = timeout_at(deadline, work).await.map_err(|_| timeout_error(self.timeout))??;
        Ok(responses.into_iter().map(|r| self.limit(r, deadline)).collect())
    }
}

/// Named prepared statements, and named portals, one connection may hold at once
/// (each holds a plan; unnamed ones replace each other).
pub const MAX_NAMED_PER_CONNECTION: usize = 256;

pub(super) const STATEMENTS_HELD: &str = "twinguard.statements_held";

pub(super) const PORTALS_HELD: &str = "twinguard.portals_held";

/// Count a named statement or portal in (`+1`, refused past the cap) or out (`-1`);
/// the count lives in the connection's metadata.
pub(super) fn count_named<C: ClientInfo + ?Sized>(client: &mut C, key: &str, delta: i64) -> PgWireResult<()> {
    let held: usize = client.metadata().get(key).and_then(|v| v.parse().ok()).unwrap_or(0);
    let next = if delta < 0 { held.saturating_sub(1) } else { held + 1 };
    if delta > 0 && held >= MAX_NAMED_PER_CONNECTION {
        let what = if key == STATEMENTS_HELD { "prepared statements" } else { "portals" };
        return Err(user_error("54000", format!("this connection holds {held} named {what}, the endpoint's limit: close some (Close, DEALLOCATE in your driver) first")));
    }
    client.metadata_mut().insert(key.to_owned(), next.to_string());
    Ok(())
}

/// datafusion-postgres's extended-protocol parser (it plans the parsed statement;
/// the plan is checked at execution), behind the query size limit and with
/// DataFusion's planning errors given their SQLSTATE.
pub(super) struct GuardedParser {
    pub(super) inner: Arc<Parser>,
}

#[async_trait]
impl QueryParser for GuardedParser {
    type Statement = DfStmt;

    async fn parse_sql<C>(&self, client: &C, sql: &str, types: &[Option<Type>]) -> PgWireResult<Option<DfStmt>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        if sql.len() > MAX_QUERY_BYTES {
            return Err(too_long(sql.len()));
        }
        self.inner.parse_sql(client, sql, types).await.map_err(|e| match e {
            PgWireError::ApiError(e) => df_error(&e.to_string()),
            e => e,
        })
    }

    fn get_parameter_types(&self, stmt: &DfStmt) -> PgWireResult<Vec<Type>> {
        self.inner.get_parameter_types(stmt)
    }

    fn get_result_schema(&self, stmt: &DfStmt, column_format: Option<&Format>) -> PgWireResult<Vec<FieldInfo>> {
        self.inner.get_result_schema(stmt, column_format)
    }
}

#[async_trait]
impl ExtendedQueryHandler for Guarded {
    type Statement = DfStmt;
    type QueryParser = GuardedParser;

    fn query_parser(&self) -> Arc<GuardedParser> {
        self.extended.clone()
    }

    /// pgwire's Parse, with the named statements a connection holds counted and
    /// capped ([`MAX_NAMED_PER_CONNECTION`]).
    async fn on_parse<C>(&self, client: &mut C, message: Parse) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = DfStmt>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = message.name.clone().unwrap_or_else(|| DEFAULT_NAME.to_owned());
        let new_named = name != DEFAULT_NAME && !name.is_empty() && client.portal_store().get_statement(&name).is_none();
        if new_named {
            count_named(client, STATEMENTS_HELD, 1)?;
        }
        let parsed = match StoredStatement::parse(client, &message, self.query_parser()).await {
            Ok(p) => p,
            Err(e) => {
                if new_named {
                    let _ = count_named(client, STATEMENTS_HELD, -1);
                }
                return Err(e);
            }
        };
        match parsed {
            Some(stmt) => client.portal_store().put_statement(Arc::new(stmt)),
            None => client.portal_store().put_empty_statement(&name),
        }
        client.send(PgWireBackendMessage::ParseComplete(ParseComplete::new())).await?;
        Ok(())
    }

    /// pgwire's Bind, with the named portals a connection holds counted and capped.
    async fn on_bind<C>(&self, client: &mut C, message: Bind) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = DfStmt>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statement_name = message.statement_name.as_deref().unwrap_or(DEFAULT_NAME);
        let portal_name = message.portal_name.as_deref().unwrap_or(DEFAULT_NAME);
        let portal_is_new = portal_name != DEFAULT_NAME && !portal_name.is_empty() && client.portal_store().get_portal(portal_name).is_none();
        match client.portal_store().get_statement(statement_name) {
            Some(Entry::Value(statement)) => {
                let portal = Portal::try_new(&message, statement)?;
                if portal_is_new {
                    count_named(client, PORTALS_HELD, 1)?;
                }
                client.portal_store().put_portal(Arc::new(portal));
            }
            Some(Entry::Empty) => {
                if !message.parameters.is_empty() {
                    return Err(user_error(
                        "08P01",
                        format!("bind message supplies {} parameters, but prepared statement {statement_name:?} requires 0", message.parameters.len()),
                    ));
                }
                if portal_is_new {
                    count_named(client, PORTALS_HELD, 1)?;
                }
                client.portal_store().put_empty_portal(portal_name);
            }
            None => return Err(PgWireError::StatementNotFound(statement_name.to_owned())),
        }
        client.send(PgWireBackendMessage::BindComplete(BindComplete::new())).await?;
        Ok(())
    }

    /// pgwire's Close, giving back the count of a named statement or portal.
    async fn on_close<C>(&self, client: &mut C, message: Close) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = DfStmt>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = message.name.as_deref().unwrap_or(DEFAULT_NAME);
        let named = name != DEFAULT_NAME && !name.is_empty();
        match message.target_type {
            TARGET_TYPE_BYTE_STATEMENT => {
                if named && client.portal_store().get_statement(name).is_some() {
                    count_named(client, STATEMENTS_HELD, -1)?;
                }
                client.portal_store().rm_statement(name);
            }
            TARGET_TYPE_BYTE_PORTAL => {
                if named && client.portal_store().get_portal(name).is_some() {
                    count_named(client, PORTALS_HELD, -1)?;
                }
                client.portal_store().rm_portal(name);
            }
            _ => {}
        }
        client.send(PgWireBackendMessage::CloseComplete(CloseComplete::new())).await?;
        Ok(())
    }

    async fn do_query<C>(&self, client: &mut C, portal: &Portal<DfStmt>, max_rows: usize) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = DfStmt>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match &portal.statement.statement {
            // The inner handler executes this plan (with the parameters bound).
            (_, Some((s, plan))) => {
                if check_statement(s)? {
                    check_plan(plan)?;
                }
                self.served.check(plan)?;
            }
            // An empty or unparsed statement: let the inner handler answer it.
            (_, None) => {}
        }
        let deadline = Instant::now() + self.timeout;
        let r = timeout_at(deadline, ExtendedQueryHandler::do_query(&self.inner, client, portal, max_rows))
            .await
            .map_err(|_| timeout_error(self.timeout))?
            .map_err(|e| match e {
                PgWireError::ApiError(e) => df_error(&e.to_string()),
                e => e,
            })?;
        Ok(self.limit(r, deadline))
    }
}
