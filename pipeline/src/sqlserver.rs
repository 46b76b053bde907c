//! The SQL endpoint: the Postgres wire protocol (pgwire, with datafusion-postgres's
//! query handling and `pg_catalog` so psql and BI tools work) over the tables of a
//! [`SqlView`].
//!
//! Safety, on top of datafusion-postgres:
//! - SCRAM-SHA-256 password authentication against the configured users (a wrong
//!   password is refused with SQLSTATE 28P01); TLS when configured (a TLS set-up
//!   error stops the start, never falls back to plaintext; with TLS configured a
//!   client that does not negotiate it is refused);
//! - read-only: only queries, EXPLAIN, SHOW and a few session settings pass; DDL,
//!   DML, COPY, cursors and other statements get SQLSTATE 25006 with the reason;
//!   every plan is also checked by DataFusion's `SQLOptions` (no DDL, DML or
//!   statements anywhere, subqueries included);
//! - limits: a query that runs past `sql.query_timeout_ms` is cancelled (57014), one
//!   returning more than `sql.max_rows` rows is cut off with an error (54000); all
//!   queries together hold at most `sql.max_memory_mb` (then they fail, not the process);
//! - a malformed client message closes that client's connection only (pgwire ends
//!   that socket's task); at most `sql.max_connections` connections at once.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{Set, Statement};
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::setup_pg_catalog;
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use datafusion_postgres::pgwire::api::auth::sasl::scram::{gen_salted_password, ScramAuth, SCRAM_ITERATIONS};
use datafusion_postgres::pgwire::api::auth::sasl::SASLAuthStartupHandler;
use datafusion_postgres::pgwire::api::auth::{AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler};
use datafusion_postgres::pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use datafusion_postgres::pgwire::api::portal::Portal;
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::results::Response;
use datafusion_postgres::pgwire::api::store::PortalStore;
use datafusion_postgres::pgwire::api::{ClientInfo, ClientPortalStore, ConnectionManager, PgWireConnectionState, PgWireServerHandlers};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use datafusion_postgres::pgwire::tokio::tokio_rustls::rustls::pki_types::pem::PemObject;
use datafusion_postgres::pgwire::tokio::tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use datafusion_postgres::pgwire::tokio::tokio_rustls::rustls::{self, ServerConfig};
use datafusion_postgres::pgwire::tokio::{process_socket, TlsAcceptor};
use datafusion_postgres::{DfSessionService, Parser};
use futures::{stream, Sink, StreamExt};
use tokio::net::TcpListener;
use tokio::time::{timeout_at, Instant};

use crate::config::SqlConfig;
use crate::sqlview::{SqlView, Table, ViewTable};
use crate::PipelineError;

type DfStmt = (String, Option<(Statement, LogicalPlan)>);

fn user_error(code: &str, msg: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".into(), code.into(), msg.into())))
}

fn timeout_error(limit: Duration) -> PgWireError {
    user_error("57014", format!("canceling statement: it ran longer than the endpoint's limit of {} ms (sql.query_timeout_ms)", limit.as_millis()))
}

/// The configured users as SCRAM verifiers (salted once at start; the passwords
/// themselves are not kept).
#[derive(Debug)]
struct Users {
    known: HashMap<String, (Vec<u8>, Vec<u8>)>,
    /// A verifier no password matches, for unknown users: they fail at the same step
    /// as a wrong password, so a client cannot tell which user names exist.
    decoy: (Vec<u8>, Vec<u8>),
}

impl Users {
    fn new(users: &[(String, String)]) -> Self {
        let verifier = |p: &str| {
            let salt: [u8; 16] = rand::random();
            (salt.to_vec(), gen_salted_password(p, &salt, SCRAM_ITERATIONS))
        };
        let secret: [u8; 32] = rand::random();
        Users { known: users.iter().map(|(u, p)| (u.clone(), verifier(p))).collect(), decoy: verifier(&hex(&secret)) }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[async_trait]
impl AuthSource for Users {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        let (salt, salted) = self.known.get(user).unwrap_or(&self.decoy);
        Ok(Password::new(Some(salt.clone()), salted.clone()))
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

/// datafusion-postgres's handler behind the read-only check and the limits.
struct Guarded {
    inner: DfSessionService,
    ctx: Arc<SessionContext>,
    parser: PostgresCompatibilityParser,
    timeout: Duration,
    max_rows: usize,
}

impl Guarded {
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
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let deadline = Instant::now() + self.timeout;
        let work = async {
            for s in self.parser.parse(query).map_err(|e| user_error("42601", e.to_string()))? {
                if check_statement(&s)? {
                    let plan = self.ctx.state().statement_to_plan(DfStatement::Statement(Box::new(s))).await.map_err(|e| user_error("42000", e.to_string()))?;
                    check_plan(&plan)?;
                }
            }
            SimpleQueryHandler::do_query(&self.inner, client, query).await
        };
        let responses = timeout_at(deadline, work).await.map_err(|_| timeout_error(self.timeout))??;
        Ok(responses.into_iter().map(|r| self.limit(r, deadline)).collect())
    }
}

#[async_trait]
impl ExtendedQueryHandler for Guarded {
    type Statement = DfStmt;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        ExtendedQueryHandler::query_parser(&self.inner)
    }

    async fn do_query<C>(&self, client: &mut C, portal: &Portal<DfStmt>, max_rows: usize) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = DfStmt>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match &portal.statement.statement {
            (_, Some((s, plan))) => {
                if check_statement(s)? {
                    check_plan(plan)?;
                }
            }
            // An empty or unparsed statement: let the inner handler answer it.
            (_, None) => {}
        }
        let deadline = Instant::now() + self.timeout;
        let r = timeout_at(deadline, ExtendedQueryHandler::do_query(&self.inner, client, portal, max_rows))
            .await
            .map_err(|_| timeout_error(self.timeout))??;
        Ok(self.limit(r, deadline))
    }
}

/// SCRAM authentication, refusing clients that did not negotiate TLS when the
/// endpoint has it (otherwise a client could just skip it).
struct Startup {
    inner: SASLAuthStartupHandler<DefaultServerParameterProvider>,
    require_tls: bool,
    /// Set once this connection has logged in (the login timeout stops then).
    logged_in: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(&self, client: &mut C, message: PgWireFrontendMessage) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if self.require_tls && !client.is_secure() {
            return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "FATAL".into(),
                "28000".into(),
                "this endpoint requires TLS: connect with sslmode=require (or verify-full)".into(),
            ))));
        }
        self.inner.on_startup(client, message).await?;
        if matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            self.logged_in.store(true, std::sync::atomic::Ordering::Release);
        }
        Ok(())
    }
}

struct Handlers {
    query: Arc<Guarded>,
    require_tls: bool,
    logged_in: Arc<std::sync::atomic::AtomicBool>,
    users: Arc<Users>,
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
        Arc::new(Startup {
            inner: SASLAuthStartupHandler::new(self.params.clone())
                .with_scram(ScramAuth::new(self.users.clone()))
                .with_connection_manager(self.connections.clone()),
            require_tls: self.require_tls,
            logged_in: self.logged_in.clone(),
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

/// A DataFusion context serving the view's tables, with `pg_catalog` and
/// `information_schema` for clients' catalog queries. Queries together may hold at
/// most `max_memory_bytes` for sorts, joins and aggregations; past it they fail
/// with a resources-exhausted error instead of growing the process.
pub fn session_context(view: &Arc<SqlView>, max_memory_bytes: usize) -> Result<Arc<SessionContext>, PipelineError> {
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(max_memory_bytes, 1.0)
        .build_arc()
        .map_err(|e| PipelineError::Io(format!("SQL runtime: {e}")))?;
    let ctx = SessionContext::new_with_config_rt(SessionConfig::new().with_information_schema(true), runtime);
    for t in Table::ALL {
        ctx.register_table(t.name(), Arc::new(ViewTable::new(view.clone(), t))).map_err(|e| PipelineError::Io(format!("registering table {}: {e}", t.name())))?;
    }
    setup_pg_catalog(&ctx, "datafusion", EmptyContextProvider).map_err(|e| PipelineError::Io(format!("pg_catalog: {e}")))?;
    // Functions that build huge values from tiny inputs allocate outside the memory
    // pool (e.g. `repeat('x', 2000000000)`): not served.
    for f in ["repeat", "lpad", "rpad", "array_repeat", "range", "generate_series"] {
        ctx.deregister_udf(f);
    }
    for f in ["range", "generate_series"] {
        ctx.deregister_udtf(f);
    }
    Ok(Arc::new(ctx))
}

/// Bind the endpoint and serve it on the current Tokio runtime until it stops.
/// Returns the bound address (port 0 picks a free one).
pub async fn serve(cfg: &SqlConfig, listen: &str, users: &[(String, String)], view: Arc<SqlView>) -> Result<std::net::SocketAddr, PipelineError> {
    let tls = match &cfg.tls {
        Some(t) => Some(load_tls(&t.cert_file, &t.key_file).map_err(PipelineError::Config)?),
        None => None,
    };
    let ctx = session_context(&view, cfg.max_memory_mb.saturating_mul(1 << 20))?;
    let mut params = DefaultServerParameterProvider::default();
    params.default_transaction_read_only = true;
    params.is_superuser = false;
    let timeout = Duration::from_millis(cfg.query_timeout_ms);
    let query = Arc::new(Guarded { inner: DfSessionService::new(ctx.clone()), ctx, parser: PostgresCompatibilityParser::new(), timeout, max_rows: cfg.max_rows });
    let (users, params, connections) = (Arc::new(Users::new(users)), Arc::new(params), Arc::new(ConnectionManager::new()));
    let require_tls = tls.is_some();
    let login_timeout = Duration::from_millis(cfg.login_timeout_ms);
    let listener = TcpListener::bind(listen).await.map_err(|e| PipelineError::Config(format!("key `sql.listen` ({listen}): {e}")))?;
    let addr = listener.local_addr().map_err(|e| PipelineError::Io(e.to_string()))?;
    tracing::info!(%addr, tls = tls.is_some(), users = users.known.len(), "serving SQL (Postgres wire protocol, read-only)");
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
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
                tracing::warn!(%peer, "SQL endpoint: too many connections (sql.max_connections); refused");
                // Tell the client why (a protocol ErrorResponse, SQLSTATE 53300), then close.
                tokio::spawn(async move {
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
