//! The SQL endpoint: the Postgres wire protocol (pgwire, with datafusion-postgres's
//! query handling and `pg_catalog` so psql and BI tools work) over the tables of a
//! [`SqlView`].
//!
//! Safety, on top of datafusion-postgres:
//! - SCRAM-SHA-256 password authentication against the configured users (a wrong
//!   password is refused with SQLSTATE 28P01). A name that is not a user gets a
//!   salt and verifier derived from the name under a per-process secret
//!   (PostgreSQL's mock salt): stable per name, so the salt does not tell which
//!   names exist. After [`FREE_FAILURES`] failed logins from one address (an IPv6
//!   /64), logins from there are refused (28000) for an exponentially growing,
//!   capped back-off; every failure is counted (`twinguard_sql_failed_logins_total`).
//!   TLS when configured (a TLS set-up error stops the start, never falls back to
//!   plaintext; with TLS configured a client that does not negotiate it is refused),
//!   with SCRAM-SHA-256-PLUS channel binding (`tls-server-end-point`);
//! - read-only: only queries, EXPLAIN, SHOW and a few session settings pass; DDL,
//!   DML, COPY, cursors and other statements get SQLSTATE 25006 with the reason;
//!   every plan is also checked by DataFusion's `SQLOptions` (no DDL, DML or
//!   statements anywhere, subqueries included), and the plan checked is the plan
//!   executed, on both protocols (query text is never handed to `SessionContext::sql`);
//! - no files: the session has no table factories (`CREATE EXTERNAL TABLE`), no file
//!   formats, no table functions and no `file://` object store;
//! - bounded functions: only functions on an allowlist are served (scalar, aggregate
//!   and window; [`ALLOWED_SCALAR`]); those that build large values from small
//!   inputs (`repeat`, `lpad`, `replace`, `array_resize`, ...) are not, and a query
//!   naming one gets SQLSTATE 42883 naming it. Recursive queries are refused (0A000);
//! - limits: a query that runs past `sql.query_timeout_ms` is cancelled (57014), one
//!   returning more than `sql.max_rows` rows is cut off with an error (54000); all
//!   queries together hold at most `sql.max_memory_mb` for sorts, joins and
//!   aggregations (then they fail with 53200, not the process); query text is at most
//!   [`MAX_QUERY_BYTES`];
//! - a malformed client message closes that client's connection only (pgwire ends
//!   that socket's task); at most `sql.max_connections` connections at once.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::Array;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::execution::SessionStateDefaults;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::type_coercion::binary::BinaryTypeCoercer;
use datafusion::logical_expr::{ColumnarValue, Expr, LogicalPlan, Operator, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility};
use datafusion::optimizer::AnalyzerRule;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{Set, Statement};
use datafusion_postgres::arrow_pg::datatypes::df::encode_dataframe;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::setup_pg_catalog;
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::pgwire::api::auth::sasl::scram::{gen_salted_password, ScramAuth, SCRAM_ITERATIONS};
use datafusion_postgres::pgwire::api::auth::sasl::SASLAuthStartupHandler;
use datafusion_postgres::pgwire::api::auth::{AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler};
use datafusion_postgres::pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use datafusion_postgres::pgwire::api::portal::{Format, Portal};
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::results::{FieldInfo, Response};
use datafusion_postgres::pgwire::api::stmt::{QueryParser, StoredStatement};
use datafusion_postgres::pgwire::api::store::{Entry, PortalStore};
use datafusion_postgres::pgwire::api::{ClientInfo, ClientPortalStore, ConnectionManager, PgWireConnectionState, PgWireServerHandlers, Type, DEFAULT_NAME};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::extendedquery::{Bind, BindComplete, Close, CloseComplete, Parse, ParseComplete, TARGET_TYPE_BYTE_PORTAL, TARGET_TYPE_BYTE_STATEMENT};
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use datafusion_postgres::pgwire::tokio::tokio_rustls::rustls::pki_types::pem::PemObject;
use datafusion_postgres::pgwire::tokio::tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use datafusion_postgres::pgwire::tokio::tokio_rustls::rustls::{self, ServerConfig};
use datafusion_postgres::pgwire::tokio::{process_socket, TlsAcceptor};
use datafusion_postgres::pgwire::types::format::FormatOptions;
use datafusion_postgres::{DfSessionService, Parser, QueryHook};
use futures::{stream, Sink, SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::time::{timeout_at, Instant};
use twinguard_operators::audit::hmac_sha256;

use crate::config::SqlConfig;
use crate::sql::view::{SqlView, Table, ViewTable};
use crate::obs::events::SqlLoginFailed;
use crate::obs::Metrics;
use crate::PipelineError;

type DfStmt = (String, Option<(Statement, LogicalPlan)>);

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

fn user_error(code: &str, msg: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".into(), code.into(), msg.into())))
}

fn timeout_error(limit: Duration) -> PgWireError {
    user_error("57014", format!("canceling statement: it ran longer than the endpoint's limit of {} ms (sql.query_timeout_ms)", limit.as_millis()))
}

fn not_served(name: &str) -> PgWireError {
    user_error("42883", format!("function `{name}` is not served by this endpoint: only functions on its allowlist are (those that build large values from small inputs, or read files, are not)"))
}

/// A planning or execution error from DataFusion, with the SQLSTATE a client can act on.
fn df_error(msg: &str) -> PgWireError {
    if let Some(rest) = msg.split("Invalid function '").nth(1) {
        return not_served(rest.split('\'').next().unwrap_or(rest));
    }
    if msg.contains("Recursive CTEs are not enabled") {
        return user_error("0A000", "recursive queries (WITH RECURSIVE) are not served by this endpoint: they can grow without bound");
    }
    if msg.contains("Resources exhausted") {
        return user_error("53200", format!("query cancelled: it needs more memory than the endpoint allows (sql.max_memory_mb): {msg}"));
    }
    user_error("42000", msg)
}

fn too_long(len: usize) -> PgWireError {
    user_error("54000", format!("query text of {len} bytes is longer than the endpoint's limit of {MAX_QUERY_BYTES} bytes"))
}

/// The configured users as SCRAM verifiers (salted once at start; the passwords
/// themselves are not kept).
#[derive(Debug)]
struct Users {
    known: HashMap<String, (Vec<u8>, Vec<u8>)>,
    /// Keys the mock salts and verifiers of names that are not users.
    secret: [u8; 32],
}

impl Users {
    fn new(users: &[(String, String)]) -> Self {
        let verifier = |p: &str| {
            let salt: [u8; 16] = rand::random();
            (salt.to_vec(), gen_salted_password(p, &salt, SCRAM_ITERATIONS))
        };
        Users { known: users.iter().map(|(u, p)| (u.clone(), verifier(p))).collect(), secret: rand::random() }
    }

    /// A name that is not a user: a salt (as long as a real one) and a verifier no
    /// password matches, both derived from the name, as PostgreSQL's
    /// `scram_mock_salt` does. The same name gets the same salt at every attempt,
    /// and two names get different ones, exactly as for real users; the login fails
    /// at the same step as a wrong password, after the same work.
    fn mock(&self, user: &str) -> (Vec<u8>, Vec<u8>) {
        let salt = hmac_sha256(&self.secret, format!("twinguard-scram-mock-salt\0{user}").as_bytes());
        let verifier = hmac_sha256(&self.secret, format!("twinguard-scram-mock-verifier\0{user}").as_bytes());
        (salt[..16].to_vec(), verifier.to_vec())
    }

    fn verifier(&self, user: &str) -> (Vec<u8>, Vec<u8>) {
        self.known.get(user).cloned().unwrap_or_else(|| self.mock(user))
    }
}

#[async_trait]
impl AuthSource for Users {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let (salt, salted) = self.verifier(login.user().unwrap_or_default());
        Ok(Password::new(Some(salt), salted))
    }
}

/// Refused connections (past `sql.max_connections`) told why at once; more are
/// closed on accept.
pub const REFUSALS_AT_ONCE: usize = 16;

/// Failed logins allowed from one address before the back-off starts.
pub const FREE_FAILURES: u32 = 5;
/// The first back-off; each further failure doubles it, up to [`BACKOFF_CAP`].
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// An address with no failure for this long starts over.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Addresses tracked at most (stale ones are dropped first; past this, the oldest).
const MAX_TRACKED: usize = 100_000;

/// Failed logins per peer address, and the back-off they earn: after
/// [`FREE_FAILURES`] failures, each failure refuses every login from that address
/// for `BACKOFF_BASE · 2^(failures − FREE_FAILURES − 1)`, capped at [`BACKOFF_CAP`].
/// Refused attempts do not count as failures (their password is never checked).
/// IPv6 addresses count per /64 (one host usually holds a whole /64).
#[derive(Debug, Default)]
pub struct LoginThrottle {
    peers: Mutex<HashMap<IpAddr, Peer>>,
}

#[derive(Debug, Clone, Copy)]
struct Peer {
    failures: u32,
    last: std::time::Instant,
    until: Option<std::time::Instant>,
}

impl LoginThrottle {
    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
            },
            v4 => v4,
        }
    }

    /// `Err(wait)` while logins from `ip` are backed off.
    pub fn check(&self, ip: IpAddr, now: std::time::Instant) -> Result<(), Duration> {
        let mut peers = self.peers.lock().expect("throttle lock");
        let key = Self::key(ip);
        match peers.get(&key).copied() {
            Some(p) if now.saturating_duration_since(p.last) > FORGET_AFTER => {
                peers.remove(&key);
                Ok(())
            }
            Some(Peer { until: Some(until), .. }) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Count a failed login from `ip`: (failures so far, the back-off it starts).
    pub fn failed(&self, ip: IpAddr, now: std::time::Instant) -> (u32, Option<Duration>) {
        let mut peers = self.peers.lock().expect("throttle lock");
        if peers.len() >= MAX_TRACKED {
            peers.retain(|_, p| now.saturating_duration_since(p.last) <= FORGET_AFTER);
            if peers.len() >= MAX_TRACKED {
                if let Some(oldest) = peers.iter().min_by_key(|(_, p)| p.last).map(|(k, _)| *k) {
                    peers.remove(&oldest);
                }
            }
        }
        let p = peers.entry(Self::key(ip)).or_insert(Peer { failures: 0, last: now, until: None });
        if now.saturating_duration_since(p.last) > FORGET_AFTER {
            p.failures = 0;
        }
        p.failures = p.failures.saturating_add(1);
        p.last = now;
        let backoff = (p.failures > FREE_FAILURES).then(|| {
            let doublings = (p.failures - FREE_FAILURES - 1).min(16);
            (BACKOFF_BASE * (1u32 << doublings)).min(BACKOFF_CAP)
        });
        p.until = backoff.map(|b| now + b);
        (p.failures, backoff)
    }
}

/// Session settings a client may change (per connection; psql and drivers send some).
const SAFE_SET: &[&str] = &["statement_timeout", "datestyle", "bytea_output", "intervalstyle", "application_name", "extra_float_digits", "search_path", "client_encoding", "client_min_messages"];

/// Is the statement allowed? `Ok(true)`: allowed, and its plan must pass the
/// read-only plan check too.
fn check_statement(s: &Statement) -> PgWireResult<bool> {
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

fn check_plan(plan: &LogicalPlan) -> PgWireResult<()> {
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
struct Guarded {
    inner: DfSessionService,
    ctx: Arc<SessionContext>,
    parser: PostgresCompatibilityParser,
    /// The extended protocol's parser, behind the size and error checks.
    extended: Arc<GuardedParser>,
    /// datafusion-postgres's answers to `SET`, `SHOW <variable>` and transaction
    /// statements (per connection, from the parsed statement: no query text).
    hooks: Vec<Arc<dyn QueryHook>>,
    served: Served,
    timeout: Duration,
    max_rows: usize,
}

impl Guarded {
    fn new(ctx: Arc<SessionContext>, timeout: Duration, max_rows: usize) -> Self {
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
    fn limit(&self, r: Response, deadline: Instant) -> Response {
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
const STATEMENTS_HELD: &str = "twinguard.statements_held";
const PORTALS_HELD: &str = "twinguard.portals_held";

/// Count a named statement or portal in (`+1`, refused past the cap) or out (`-1`);
/// the count lives in the connection's metadata.
fn count_named<C: ClientInfo + ?Sized>(client: &mut C, key: &str, delta: i64) -> PgWireResult<()> {
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
struct GuardedParser {
    inner: Arc<Parser>,
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

/// SCRAM authentication, refusing clients that did not negotiate TLS when the
/// endpoint has it (otherwise a client could just skip it), and clients whose
/// address is backed off after failed logins.
struct Startup {
    inner: SASLAuthStartupHandler<DefaultServerParameterProvider>,
    require_tls: bool,
    /// Set once this connection has logged in (the login timeout stops then).
    logged_in: Arc<std::sync::atomic::AtomicBool>,
    throttle: Arc<LoginThrottle>,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(&self, client: &mut C, message: PgWireFrontendMessage) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let fatal = |code: &str, msg: String| PgWireError::UserError(Box::new(ErrorInfo::new("FATAL".into(), code.into(), msg)));
        if self.require_tls && !client.is_secure() {
            return Err(fatal("28000", "this endpoint requires TLS: connect with sslmode=require (or verify-full)".into()));
        }
        let peer = client.socket_addr().ip();
        // Checked at the start and again before a password is verified (a burst of
        // connections opened together must not all get their guess checked).
        if let Err(wait) = self.throttle.check(peer, std::time::Instant::now()) {
            let user = client.metadata().get("user").cloned().unwrap_or_default();
            SqlLoginFailed { peer, user: &user, throttled: true, failures: 0, backoff: Some(wait) }.emit(&self.metrics);
            return Err(fatal(
                "28000",
                format!("too many failed logins from this address: try again in {} s", wait.as_secs().max(1)),
            ));
        }
        match self.inner.on_startup(client, message).await {
            Err(PgWireError::InvalidPassword(user)) => {
                let (failures, backoff) = self.throttle.failed(peer, std::time::Instant::now());
                // The startup message's user (SCRAM's own user field is usually empty).
                let name = client.metadata().get("user").cloned().unwrap_or_default();
                SqlLoginFailed { peer, user: &name, throttled: false, failures, backoff }.emit(&self.metrics);
                Err(PgWireError::InvalidPassword(user))
            }
            Err(e) => Err(e),
            Ok(()) => {
                if matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
                    self.logged_in.store(true, std::sync::atomic::Ordering::Release);
                }
                Ok(())
            }
        }
    }
}

struct Handlers {
    query: Arc<Guarded>,
    require_tls: bool,
    logged_in: Arc<std::sync::atomic::AtomicBool>,
    users: Arc<Users>,
    /// The server certificate (PEM) for SCRAM-SHA-256-PLUS channel binding.
    channel_binding: Option<Arc<Vec<u8>>>,
    throttle: Arc<LoginThrottle>,
    metrics: Arc<Metrics>,
    params: Arc<DefaultServerParameterProvider>,
    connections: Arc<ConnectionManager>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.query.clone()
    }
    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.query.clone()
    }
    /// A fresh handler per connection: it holds that connection's SASL state.
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        let mut scram = ScramAuth::new(self.users.clone());
        if let Some(pem) = &self.channel_binding {
            // Checked once at start (`serve`): this certificate is accepted.
            if let Err(e) = scram.configure_certificate(pem) {
                tracing::warn!(error = %e, "SQL endpoint: channel binding not offered on this connection");
            }
        }
        Arc::new(Startup {
            inner: SASLAuthStartupHandler::new(self.params.clone()).with_scram(scram).with_connection_manager(self.connections.clone()),
            require_tls: self.require_tls,
            logged_in: self.logged_in.clone(),
            throttle: self.throttle.clone(),
            metrics: self.metrics.clone(),
        })
    }
    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        Arc::new(DefaultCancelHandler::new(self.connections.clone()))
    }
}

fn load_tls(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("key `sql.tls.cert_file` ({}): {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("key `sql.tls.cert_file` ({}): no certificate in the file", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key `sql.tls.key_file` ({}): {e}", key.display()))?;
    let cfg = ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).map_err(|e| format!("section `sql.tls`: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// A FATAL ErrorResponse: too many connections (SQLSTATE 53300).
fn too_many_connections() -> Vec<u8> {
    let mut fields = Vec::new();
    for (code, text) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', "53300"), (b'M', "too many connections to the twinguard SQL endpoint (sql.max_connections); try again later")] {
        fields.push(code);
        fields.extend_from_slice(text.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&u32::try_from(fields.len() + 4).unwrap_or(u32::MAX).to_be_bytes());
    msg.extend_from_slice(&fields);
    msg
}

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
fn growth(name: &str) -> Option<usize> {
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
fn arg_bytes(v: &ColumnarValue, rows: usize) -> usize {
    match v {
        ColumnarValue::Array(a) => a.get_buffer_memory_size(),
        ColumnarValue::Scalar(s) => s.size().saturating_mul(rows.max(1)),
    }
}

/// An upper bound of what `name` builds from `args`.
fn output_bound(name: &str, factor: usize, args: &[ColumnarValue], rows: usize) -> usize {
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

fn check_growth(name: &str, bound: usize) -> datafusion::error::Result<()> {
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
struct Bounded {
    inner: Arc<ScalarUDF>,
    factor: usize,
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
struct BoundedStringConcat {
    signature: Signature,
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
struct BoundValues {
    concat: Arc<ScalarUDF>,
}

impl BoundValues {
    fn new() -> Self {
        BoundValues { concat: Arc::new(ScalarUDF::new_from_impl(BoundedStringConcat { signature: Signature::any(2, Volatility::Immutable) })) }
    }

    fn rewrite(&self, e: Expr) -> datafusion::error::Result<Transformed<Expr>> {
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

/// Bind the endpoint and serve it on the current Tokio runtime until it stops.
/// Returns the bound address (port 0 picks a free one).
pub async fn serve(cfg: &SqlConfig, listen: &str, users: &[(String, String)], view: Arc<SqlView>, metrics: Arc<Metrics>) -> Result<std::net::SocketAddr, PipelineError> {
    let tls = match &cfg.tls {
        Some(t) => Some(load_tls(&t.cert_file, &t.key_file).map_err(|e| PipelineError::config("sql.tls", e))?),
        None => None,
    };
    // SCRAM-SHA-256-PLUS with TLS: the certificate's hash binds the login to this
    // TLS session (a relaying man in the middle holds another certificate).
    let channel_binding = match &cfg.tls {
        Some(t) => {
            let pem = std::fs::read(&t.cert_file).map_err(|e| PipelineError::config("sql.tls.cert_file", format!("{}: {e}", t.cert_file.display())))?;
            match ScramAuth::new(Arc::new(Users::new(&[]))).configure_certificate(&pem) {
                Ok(()) => Some(Arc::new(pem)),
                Err(e) => {
                    tracing::warn!(cert = %t.cert_file.display(), error = %e, "SQL endpoint: no SCRAM-SHA-256-PLUS channel binding for this certificate (its signature algorithm); plain SCRAM-SHA-256 over TLS");
                    None
                }
            }
        }
        None => None,
    };
    let ctx = session_context(&view, cfg.max_memory_mb.saturating_mul(1 << 20))?;
    let mut params = DefaultServerParameterProvider::default();
    params.default_transaction_read_only = true;
    params.is_superuser = false;
    let timeout = Duration::from_millis(cfg.query_timeout_ms);
    let query = Arc::new(Guarded::new(ctx, timeout, cfg.max_rows));
    let (users, params, connections) = (Arc::new(Users::new(users)), Arc::new(params), Arc::new(ConnectionManager::new()));
    let throttle = Arc::new(LoginThrottle::default());
    let require_tls = tls.is_some();
    let login_timeout = Duration::from_millis(cfg.login_timeout_ms);
    let listener = TcpListener::bind(listen).await.map_err(|e| PipelineError::config("sql.listen", format!("{listen}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| PipelineError::io(format!("the SQL endpoint on {listen}"), e))?;
    tracing::info!(%addr, tls = tls.is_some(), channel_binding = channel_binding.is_some(), users = users.known.len(), "serving SQL (Postgres wire protocol, read-only)");
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let refusals = Arc::new(tokio::sync::Semaphore::new(REFUSALS_AT_ONCE));
    tokio::spawn(async move {
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "SQL endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // Telling a refused client why takes a task and its socket for a few
                // seconds: at most REFUSALS_AT_ONCE of those; past them, a flood of
                // connections is closed on accept (no task, no descriptor kept).
                let Ok(courtesy) = refusals.clone().try_acquire_owned() else {
                    drop(socket);
                    continue;
                };
                tracing::warn!(%peer, "SQL endpoint: too many connections (sql.max_connections); refused");
                // Tell the client why (a protocol ErrorResponse, SQLSTATE 53300), then close.
                tokio::spawn(async move {
                    let _courtesy = courtesy;
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut socket = socket;
                    let mut buf = [0u8; 1024];
                    // Answer its first message (SSL or startup request), and read what it
                    // sends until it closes: closing with unread data would reset the
                    // connection and lose the message.
                    let first = tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buf)).await;
                    // An SSL or GSS encryption request is declined first ('N'): clients do
                    // not show errors sent during that exchange.
                    if let Ok(Ok(8)) = first {
                        if buf[..6] == [0, 0, 0, 8, 0x04, 0xd2] && matches!(buf[6..8], [0x16, 0x2f] | [0x16, 0x30]) {
                            let _ = socket.write_all(b"N").await;
                            let _ = tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buf)).await;
                        }
                    }
                    let _ = socket.write_all(&too_many_connections()).await;
                    let _ = socket.shutdown().await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
                    })
                    .await;
                });
                continue;
            };
            let logged_in = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let h = Arc::new(Handlers {
                query: query.clone(),
                require_tls,
                logged_in: logged_in.clone(),
                users: users.clone(),
                channel_binding: channel_binding.clone(),
                throttle: throttle.clone(),
                metrics: metrics.clone(),
                params: params.clone(),
                connections: connections.clone(),
            });
            let tls = tls.clone();
            tokio::spawn(async move {
                // A client gets `login_timeout` to log in; then the slot is freed.
                let deadline = async {
                    tokio::time::sleep(login_timeout).await;
                    if logged_in.load(std::sync::atomic::Ordering::Acquire) {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    r = process_socket(socket, tls, h) => {
                        if let Err(e) = r {
                            tracing::info!(%peer, error = %e, "SQL connection closed on an error");
                        }
                    }
                    () = deadline => tracing::warn!(%peer, timeout_ms = login_timeout.as_millis() as u64, "SQL connection closed: no login in time (sql.login_timeout_ms)"),
                }
                drop(permit);
            });
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests;
