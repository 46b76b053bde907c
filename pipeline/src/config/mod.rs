//! Pipeline configuration: one TOML file, layered as defaults → file → environment.
//!
//! Environment overrides use `TWINGUARD__SECTION__KEY=value` (double underscores
//! separate levels; keys are lower-cased), e.g. `TWINGUARD__KAFKA__BROKERS=host:9092`
//! or `TWINGUARD__BATCH__MAX_RECORDS=500`. librdkafka properties pass through
//! `[kafka.properties]` (both clients), `[kafka.consumer]` and `[kafka.producer]`, so
//! TLS and SASL are plain configuration. Every error names the offending key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use twinguard_operators::audit::parse_key_hex;
use twinguard_operators::{GatingConfig, PolicyConfig, TwinConfig};
use twinguard_schemas::respond::RegistryEntry;
use twinguard_schemas::{DecodeLimits, EventSchema};

use crate::PipelineError;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "TWINGUARD__";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    /// Stream workers of this instance.
    pub engine: EngineConfig,
    pub batch: BatchConfig,
    pub schema: SchemaConfig,
    pub decode: DecodeConfig,
    pub state: TwinConfig,
    pub model: ModelConfig,
    /// Response policy: rules, life-critical handling, command expiry.
    pub response: PolicyConfig,
    /// Confidence gating of automated actions by analyst feedback.
    pub gating: GatingConfig,
    pub registry: RegistryConfig,
    pub audit: AuditConfig,
    /// The Postgres-wire SQL endpoint over the twins.
    pub sql: SqlConfig,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub http: HttpConfig,
    /// OpenTelemetry export (OTLP).
    pub otel: OtelConfig,
}

/// The SQL endpoint (Postgres wire protocol). Served when `listen` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqlConfig {
    /// Address to serve on, e.g. `127.0.0.1:5433`; unset: no SQL endpoint (`twinguard
    /// sql` defaults to 127.0.0.1:5433).
    pub listen: Option<String>,
    /// Users allowed in (SCRAM-SHA-256 password authentication). Required when
    /// `listen` is set.
    pub users: Vec<SqlUser>,
    /// TLS for the endpoint (optional; clients then may use `sslmode=require`).
    pub tls: Option<TlsConfig>,
    /// Rows kept in each of `verdicts`, `alerts` and `commands` (newest).
    pub recent_rows: usize,
    /// A query returning more rows than this is cancelled with an error.
    pub max_rows: usize,
    /// A query running longer than this is cancelled with an error.
    pub query_timeout_ms: u64,
    /// How often the tables' snapshot is republished.
    pub refresh_ms: u64,
    /// Show patient vital signs (schema fields marked `phi`) in `twins.latest` and
    /// `twins.baselines`; off by default (data minimisation).
    pub expose_phi: bool,
    /// Most concurrent client connections.
    pub max_connections: usize,
    /// A connection that has not logged in after this long is closed (its slot
    /// freed).
    pub login_timeout_ms: u64,
    /// Memory all running queries together may use for sorts, joins and
    /// aggregations; a query needing more fails with an error.
    pub max_memory_mb: usize,
}

impl Default for SqlConfig {
    fn default() -> Self {
        SqlConfig {
            listen: None,
            users: Vec::new(),
            tls: None,
            recent_rows: 10_000,
            max_rows: 100_000,
            query_timeout_ms: 30_000,
            refresh_ms: 250,
            expose_phi: false,
            max_connections: 64,
            login_timeout_ms: 10_000,
            max_memory_mb: 512,
        }
    }
}

/// A SQL user. The password comes from the file, or (better) from an environment
/// variable named by `password_env`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlUser {
    pub name: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
}

impl SqlUser {
    /// The user's password, read from its environment variable when so configured.
    pub fn secret(&self) -> Result<String, String> {
        match (&self.password, &self.password_env) {
            (Some(_), Some(_)) => Err(format!("sql user `{}`: set only one of `password` and `password_env`", self.name)),
            (Some(p), None) => Ok(p.clone()),
            (None, Some(var)) => std::env::var(var).map_err(|_| format!("sql user `{}`: environment variable `{var}` (password_env) is not set", self.name)),
            (None, None) => Err(format!("sql user `{}`: set `password_env` (or `password`)", self.name)),
        }
        .and_then(|p| if p.is_empty() { Err(format!("sql user `{}`: empty password", self.name)) } else { Ok(p) })
    }
}

/// TLS certificate chain and private key (PEM files, relative to the config file).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The HTTP endpoint for Prometheus and health probes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`; empty string: off.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: "127.0.0.1:9464".into() }
    }
}

/// OpenTelemetry export.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelConfig {
    /// OTLP gRPC endpoint (e.g. `http://otel-collector:4317`) for metrics and traces;
    /// unset: nothing is pushed (metrics stay scrapeable on `/metrics`).
    pub endpoint: Option<String>,
    /// `service.name` of the exported telemetry.
    pub service_name: String,
    /// Metrics push interval.
    pub export_interval_ms: u64,
    /// Export traces (spans of batches and their operators) too.
    pub traces: bool,
}

impl Default for OtelConfig {
    fn default() -> Self {
        OtelConfig { endpoint: None, service_name: "twinguard".into(), export_interval_ms: 5_000, traces: true }
    }
}

/// The device registry file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// TOML file of `[[device]]` entries (device_id, device_type, criticality,
    /// approved_firmware), relative to the config file. Unset: no registry (types
    /// come from telemetry, no firmware check).
    pub file: Option<PathBuf>,
}

/// The signed audit trail.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// File holding the ed25519 signing key's 32-byte seed as 64 hex characters
    /// (`twinguard audit keygen` writes one), relative to the config file. Unset:
    /// no audit trail is written (a warning says so at start).
    pub signing_key_file: Option<PathBuf>,
    /// After rotating the signing key: the file of the key it replaced. A chain
    /// whose last record that key signed is handed over to the new key by a
    /// `key_rotation` record signed by the old one; an empty chain begun while it is
    /// set opens with that hand-over too (keep it while verifiers pin the old key).
    pub previous_signing_key_file: Option<PathBuf>,
    /// The pinned public key (64 hex characters) `twinguard audit verify` checks
    /// chains against: the key of each chain's FIRST record (later keys follow from
    /// `key_rotation` records). Never derived from a signing key.
    pub public_key: Option<String>,
    /// A file holding the pinned public key as hex (instead of `public_key`).
    pub public_key_file: Option<PathBuf>,
}

/// Shortest per-deployment secret accepted for acks and feedback (bytes).
pub const MIN_SECRET_BYTES: usize = 16;

/// A per-deployment secret from the environment variable `var`, named by `key`.
pub(crate) fn secret_from_env(key: &str, var: &str) -> Result<Vec<u8>, PipelineError> {
    let v = std::env::var(var).map_err(|_| PipelineError::config(key, format!("environment variable `{var}` is not set")))?;
    if v.len() < MIN_SECRET_BYTES {
        return Err(PipelineError::config(key, format!("the secret in `{var}` is {} bytes; at least {MIN_SECRET_BYTES} are required", v.len())));
    }
    Ok(v.into_bytes())
}

impl AuditConfig {
    fn validate(&self) -> Result<(), PipelineError> {
        if self.public_key.is_some() && self.public_key_file.is_some() {
            return Err(PipelineError::config("audit.public_key", "set only one of `audit.public_key` and `audit.public_key_file`"));
        }
        if let Some(k) = &self.public_key {
            parse_key_hex(k).map_err(|e| PipelineError::config("audit.public_key", e))?;
        }
        if self.previous_signing_key_file.is_some() && self.signing_key_file.is_none() {
            return Err(PipelineError::config("audit.previous_signing_key_file", "is set without `audit.signing_key_file`"));
        }
        Ok(())
    }
}

/// The registry file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegistryFile {
    #[serde(default)]
    pub(crate) device: Vec<RegistryEntry>,
}

/// The trained detector to score with.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Model artifact (a `twinguard train` output directory or its `model.json`),
    /// relative to the config file. Unset: the twin's behavioural score alone.
    pub path: Option<PathBuf>,
    /// Re-derive the model's decision threshold for this false-positive rate (from
    /// the validation scores it stores); unset: the threshold it was trained with.
    /// Applies to `path` only (a federation's threshold comes from its merged histograms).
    pub target_fpr: Option<f64>,
    /// A federation file (`twinguard federate`): follow its model topic and switch
    /// each partition to every version its aggregator publishes, at a batch
    /// boundary, recording the switch durably first. Relative to the config file.
    /// Before the first version is published: `path`, or the twin alone.
    pub follow: Option<PathBuf>,
    /// This instance's site in the federation whose models it scores with
    /// (`path` or `follow`): score at the threshold the site set from its own
    /// validation rows (every federated model carries one per site that has the
    /// normal rows for it), which what other sites report cannot move. Unset:
    /// the federation's threshold. A model that does not know the site is refused.
    pub site: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group of the pipeline instances.
    pub group_id: String,
    /// librdkafka properties for every client (e.g. `security.protocol`).
    #[serde(deserialize_with = "scalar_map")]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only.
    #[serde(deserialize_with = "scalar_map")]
    pub consumer: BTreeMap<String, String>,
    /// librdkafka properties for the producer only.
    #[serde(deserialize_with = "scalar_map")]
    pub producer: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "twinguard".into(),
            properties: BTreeMap::new(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Device telemetry (JSON events keyed by device id).
    pub input: String,
    /// One verdict per valid event.
    pub verdicts: String,
    /// Dead letters: the original bytes with the reason in headers.
    pub dlq: String,
    /// Compacted twin changelog, partitioned like `input`.
    pub changelog: String,
    /// Alerts (keyed by device id).
    pub alerts: String,
    /// Response commands (keyed by device id).
    pub commands: String,
    /// Device acknowledgements of commands, keyed by device id and partitioned like
    /// `input` (read by the instance owning the device).
    pub acks: String,
    /// Analyst feedback on alerts and verdicts (read by every instance).
    pub feedback: String,
    /// Signed, hash-chained audit records, partitioned like `input` (one chain per
    /// partition).
    pub audit: String,
    /// Create missing topics at start (changelog compacted).
    pub create: bool,
    /// Partitions for topics created at start.
    pub partitions: i32,
    /// Replication factor for topics created at start.
    pub replication: i32,
}

impl TopicsConfig {
    /// Every topic the pipeline reads or writes, with whether it is compacted. All
    /// are partitioned like `input` when twinguard creates them.
    pub fn all(&self) -> [(&String, bool); 9] {
        [
            (&self.input, false),
            (&self.verdicts, false),
            (&self.dlq, false),
            (&self.changelog, true),
            (&self.alerts, false),
            (&self.commands, false),
            (&self.acks, false),
            (&self.feedback, false),
            (&self.audit, false),
        ]
    }
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            input: "iomt.telemetry".into(),
            verdicts: "iomt.verdicts".into(),
            dlq: "iomt.telemetry.dlq".into(),
            changelog: "twinguard.twins.changelog".into(),
            alerts: "iomt.alerts".into(),
            commands: "iomt.commands".into(),
            acks: "iomt.commands.acks".into(),
            feedback: "iomt.alerts.feedback".into(),
            audit: "twinguard.audit".into(),
            create: true,
            partitions: 6,
            replication: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// A partition's micro-batch closes at this many records...
    pub max_records: usize,
    /// ...or this long after its first record arrived...
    pub max_linger_ms: u64,
    /// ...or, when true, as soon as the consumer has no further record ready: a
    /// batch then holds what one fetch brought, so latency stays low at moderate
    /// load while batches still fill up to `max_records` under backlog. False waits
    /// out `max_linger_ms` (larger batches at low load, higher latency).
    pub flush_when_idle: bool,
    /// Batches whose outputs await acknowledgement (the backpressure bound). Memory
    /// in flight is at most about `max_inflight_batches × max_records` records and
    /// their verdicts (~130 MB at the defaults with ~1 KB events).
    pub max_inflight_batches: usize,
    /// Give up restoring twins from the changelog after this long.
    pub restore_timeout_secs: u64,
    /// How often idle twins are expired (processing time).
    pub expiry_interval_secs: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: 1000,
            max_linger_ms: 20,
            flush_when_idle: true,
            max_inflight_batches: 64,
            restore_timeout_secs: 120,
            expiry_interval_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaConfig {
    /// Built-in schema (`wustl-flow-vitals/v1` when unset, `ciciomt-flow-window/v1`).
    pub name: Option<String>,
    /// Or a schema definition file (relative to the config file).
    pub file: Option<PathBuf>,
}

impl Default for SchemaConfig {
    fn default() -> Self {
        SchemaConfig { name: None, file: None }
    }
}

/// The schema read when neither `schema.name` nor `schema.file` is set.
pub const DEFAULT_SCHEMA: &str = "wustl-flow-vitals/v1";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    /// Records larger than this go to the DLQ unread.
    pub max_record_bytes: usize,
    /// Event times earlier than this (RFC 3339) are rejected.
    pub min_event_time: String,
    /// Event times further than this ahead of the clock are rejected.
    pub max_future_secs: u64,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        DecodeConfig { max_record_bytes: 64 * 1024, min_event_time: "2000-01-01T00:00:00Z".into(), max_future_secs: 86_400 }
    }
}

impl Config {
    /// Defaults, then `path` (if any), then `TWINGUARD__*` variables from `env`.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, PipelineError> {
        let origin = path.map_or_else(|| "defaults".to_string(), |p| p.display().to_string());
        let mut value = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| PipelineError::config_file(format!("cannot read config file {}: {e}", p.display())))?;
                toml::from_str::<toml::Table>(&text)
                    .map_err(|e| PipelineError::config_file(format!("{}: {e}", p.display())))?
            }
            None => toml::Table::new(),
        };
        for (k, v) in env {
            let Some(rest) = k.strip_prefix(ENV_PREFIX) else { continue };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(String::is_empty) {
                return Err(PipelineError::config(k.clone(), "empty key segment in the environment variable"));
            }
            set_path(&mut value, &path, &v).map_err(|e| PipelineError::config(k.clone(), e))?;
        }
        let mut cfg: Config =
            serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| PipelineError::config(e.path().to_string(), format!("{} (in {origin})", e.inner())))?;
        if let (Some(p), Some(f)) = (path, cfg.model.path.as_ref()) {
            if f.is_relative() {
                cfg.model.path = Some(p.parent().unwrap_or(Path::new(".")).join(f));
            }
        }
        if let Some(p) = path {
            let base = p.parent().unwrap_or(Path::new("."));
            let a = &mut cfg.audit;
            for f in [&mut cfg.schema.file, &mut cfg.registry.file, &mut cfg.model.follow, &mut a.signing_key_file, &mut a.previous_signing_key_file, &mut a.public_key_file] {
                if let Some(rel) = f.as_ref().filter(|f| f.is_relative()) {
                    *f = Some(base.join(rel));
                }
            }
            if let Some(tls) = cfg.sql.tls.as_mut() {
                for f in [&mut tls.cert_file, &mut tls.key_file] {
                    if f.is_relative() {
                        *f = base.join(&*f);
                    }
                }
            }
        }
        cfg.validate().map_err(|e| match e {
            PipelineError::Config { key, reason } => PipelineError::Config { key, reason: format!("{reason} (in {origin})") },
            e => e,
        })?;
        cfg.event_schema()?;
        Ok(cfg)
    }

    /// The SQL users with their passwords (read from the environment where so
    /// configured); an error names the user whose password is missing.
    pub fn sql_users(&self) -> Result<Vec<(String, String)>, PipelineError> {
        self.sql.users.iter().map(|u| u.secret().map(|p| (u.name.clone(), p))).collect::<Result<_, _>>().map_err(|e| PipelineError::config("sql.users", e))
    }

    /// The event schema this pipeline reads.
    pub fn event_schema(&self) -> Result<EventSchema, PipelineError> {
        let s = match (&self.schema.name, &self.schema.file) {
            (Some(_), Some(_)) => return Err(PipelineError::config("schema", "set only one of `schema.name` and `schema.file`")),
            (None, Some(f)) => EventSchema::from_file(f),
            (Some(n), None) => EventSchema::builtin(n),
            (None, None) => EventSchema::builtin(DEFAULT_SCHEMA),
        };
        s.map_err(|e| PipelineError::config("schema", e))
    }

    /// The pinned public key (hex) chains are verified against: `audit.public_key`
    /// or the content of `audit.public_key_file`; None when neither is set.
    pub fn audit_public_key(&self) -> Result<Option<String>, PipelineError> {
        match (&self.audit.public_key, &self.audit.public_key_file) {
            (Some(k), _) => Ok(Some(k.trim().to_string())),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|e| PipelineError::config("audit.public_key_file", format!("{}: {e}", f.display()))),
            (None, None) => Ok(None),
        }
    }

    pub fn decode_limits(&self) -> DecodeLimits {
        let min = chrono::DateTime::parse_from_rfc3339(&self.decode.min_event_time).map_or(0, |d| d.timestamp_millis());
        DecodeLimits {
            max_record_bytes: self.decode.max_record_bytes,
            min_event_time_ms: min,
            max_future_ms: i64::try_from(self.decode.max_future_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
        }
    }
}

/// librdkafka properties twinguard sets itself: overriding them would break
/// at-least-once delivery (`auto.offset.reset=latest` skips input, auto-commit or a
/// different isolation level commits or reads past what was processed), ordering
/// (`enable.gapless.guarantee`), or fencing (a transactional id or static
/// membership would let a zombie or a twin instance keep a member's identity).
pub const MANAGED: &[&str] = &[
    "enable.auto.offset.store",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "acks",
    "group.id",
    "bootstrap.servers",
    "partition.assignment.strategy",
    "auto.offset.reset",
    "enable.auto.commit",
    "isolation.level",
    "transactional.id",
    "group.instance.id",
];

/// The consumer property bounding how long a member may go without polling.
pub const MAX_POLL: &str = "max.poll.interval.ms";
/// What `max.poll.interval.ms` must exceed beyond the restore and delivery timeouts.
pub const MAX_POLL_MARGIN_MS: u64 = 30_000;
/// The sink producers' delivery timeout unless configured.
pub const DEFAULT_MESSAGE_TIMEOUT_MS: u64 = 120_000;

fn set_path(table: &mut toml::Table, path: &[String], raw: &str) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut t = table;
    for seg in parents {
        let entry = t.entry(seg.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry.as_table_mut().ok_or_else(|| format!("`{seg}` is not a section"))?;
    }
    // A raw value is read as a TOML scalar when it parses as one ("500", "true",
    // "0.5"), otherwise as a string ("127.0.0.1:9092").
    let v = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut m| m.remove("v"))
        .filter(|v| !v.is_table())
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    t.insert(last.clone(), v);
    Ok(())
}

/// A map of librdkafka properties: scalars of any TOML type become strings.
fn scalar_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, toml::Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            let s = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(serde::de::Error::custom(format!("property `{k}` must be a scalar, got {}", other.type_str())))
                }
            };
            Ok((k, s))
        })
        .collect()
}

mod engine;
mod validate;

pub use engine::{EngineConfig, MAX_WORKERS};

#[cfg(test)]
mod tests;
