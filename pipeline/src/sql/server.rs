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
use crate::obs::events::{SqlAcceptFailed, SqlChannelBindingUnavailable, SqlConnectionClosed, SqlConnectionRefused, SqlLoginFailed, SqlServing};
use crate::obs::Metrics;
use crate::PipelineError;

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
                SqlChannelBindingUnavailable { detail: "on this connection", error: &e.to_string() }.emit();
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
                    SqlChannelBindingUnavailable { detail: &format!("for the certificate {} (its signature algorithm); plain SCRAM-SHA-256 over TLS", t.cert_file.display()), error: &e.to_string() }.emit();
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
    SqlServing { addr, tls: tls.is_some(), channel_binding: channel_binding.is_some(), users: users.known.len() }.emit();
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let refusals = Arc::new(tokio::sync::Semaphore::new(REFUSALS_AT_ONCE));
    tokio::spawn(async move {
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    SqlAcceptFailed { error: &e.to_string() }.emit();
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
                SqlConnectionRefused { peer }.emit();
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
                            SqlConnectionClosed { peer, error: Some(&e.to_string()), login_timeout_ms: login_timeout.as_millis() as u64 }.emit();
                        }
                    }
                    () = deadline => SqlConnectionClosed { peer, error: None, login_timeout_ms: login_timeout.as_millis() as u64 }.emit(),
                }
                drop(permit);
            });
        }
    });
    Ok(addr)
}

mod auth;
mod bounds;
mod guard;

pub use auth::*;
pub use bounds::*;
pub use guard::*;

#[cfg(test)]
mod tests;
