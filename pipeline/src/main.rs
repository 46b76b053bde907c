//! The `twinguard` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use twinguard::app::serve::Mode;
use twinguard::config::Config;
use twinguard::app::demo::{self, DemoOptions};
use twinguard::tools::sim::{SimConfig, Simulator};
use twinguard::tools::produce;
use twinguard::Metrics;
use twinguard_schemas::EventSchema;
use twinguard_train::{self as train, ReplayOptions};

/// twinguard: a Kafka-native security pipeline for connected medical devices.
///
/// Device telemetry is decoded into Arrow batches, applied to per-device digital
/// twins, scored against each device's own behaviour, and answered with verdicts on
/// a downstream topic. Bad records go to a dead-letter topic, never silently away.
#[derive(Parser)]
#[command(name = "twinguard", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything in one process on an embedded broker with simulated devices
    /// and injected attacks; ends with a summary.
    Demo {
        #[command(flatten)]
        sim: SimArgs,
        /// Partitions of the demo topics.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// Score with this trained model (a `twinguard train` output directory);
        /// default: train a small one on simulated traffic first.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Simulated events to train the demo model on.
        #[arg(long, default_value_t = 30_000)]
        train_events: usize,
    },
    /// Run the pipeline against a Kafka cluster until SIGINT/SIGTERM.
    Run {
        /// Configuration file (TOML); TWINGUARD__SECTION__KEY variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only load and validate the configuration, then exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Serve SQL (Postgres wire protocol) over EVERY twin of a deployment: a
    /// query-only process that reads the compacted changelog topic (and the newest
    /// verdicts, alerts and commands), owns no partition and writes nothing. Tables:
    /// twins, verdicts, alerts, commands, status. Also serves /metrics, /healthz
    /// and /readyz (ready once the changelog was read to its end).
    ///
    ///   twinguard sql --config twinguard.toml --brokers kafka-1:9092
    ///   PGPASSWORD=... psql -h 127.0.0.1 -p 5433 -U analyst -c 'select count(*) from twins'
    Sql {
        /// Configuration file (TOML): topics, schema, `[sql]` users, TLS and limits.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Kafka bootstrap servers (overrides `kafka.brokers`).
        #[arg(long)]
        brokers: Option<String>,
        /// Address to serve SQL on (default: `sql.listen`, else 127.0.0.1:5433).
        #[arg(long)]
        listen: Option<String>,
        /// Address of /metrics, /healthz and /readyz (default: `http.listen`); set it
        /// when a pipeline instance on the same host already uses that port.
        #[arg(long)]
        http_listen: Option<String>,
        /// Only load and validate the configuration (users' passwords included), then exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Write simulated device telemetry (with attacks) into the input topic.
    Simulate {
        /// Configuration file (TOML): brokers and the input topic.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[command(flatten)]
        sim: SimArgs,
        /// Records per second (default: as fast as the broker takes them).
        #[arg(long)]
        rate: Option<f64>,
        /// Topic to write (default: the configured input topic).
        #[arg(long)]
        topic: Option<String>,
        /// Probability of a malformed record (they must land in the DLQ).
        #[arg(long, default_value_t = 0.003)]
        malformed_rate: f64,
    },
    /// Stream a dataset CSV (e.g. ../shared/datasets/wustl-ehms-2020/train.csv) into
    /// the input topic as events of the configured schema.
    Replay {
        /// Configuration file (TOML): brokers, input topic and schema.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// CSV file, plain or .gz.
        #[arg(long)]
        file: PathBuf,
        /// Schema of the events (default: the configured one).
        #[arg(long)]
        schema: Option<String>,
        /// Column holding the device identity (default: rows spread over --devices ids).
        #[arg(long)]
        device_column: Option<String>,
        #[arg(long, default_value_t = 1)]
        devices: usize,
        /// Event-time spacing of consecutive rows, in ms.
        #[arg(long, default_value_t = 100)]
        interval_ms: i64,
        /// Replay at most this many rows.
        #[arg(long)]
        limit: Option<usize>,
        /// Replay the rows in a seeded random order (as `train --split stratified` does).
        #[arg(long)]
        shuffle_seed: Option<u64>,
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long)]
        topic: Option<String>,
    },
    /// Train the detector ensemble (random forest, SVM, LSTM, stacked with the twin's
    /// behavioural score) on a labelled dataset; writes a versioned model artifact,
    /// model card, held-out report and plots into --out.
    ///
    /// Features come from the schema's feature SQL (schemas/features/<schema>.sql),
    /// run by DataFusion over each event batch joined with the twin snapshot: the
    /// same query the stream runs. The held-out figures are computed by scoring the
    /// test rows with the detector itself.
    Train(TrainArgs),
    /// Evaluate a trained model on its dataset's held-out rows (same split as in
    /// training): per model and for the ensemble, detection rate, FPR, precision, F1,
    /// ROC-AUC, PR-AUC, confusion matrix, per-class recall; writes report.json and
    /// ROC / PR / confusion PNGs.
    Eval {
        /// Model directory (or its model.json).
        #[arg(long)]
        model: PathBuf,
        /// Dataset file (default: the one the model was trained on).
        #[arg(long)]
        dataset: Option<PathBuf>,
        /// Where to write report.json and the plots (default: the model directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The signed audit trail: create a signing key, or verify the audit topic.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// List the built-in event schemas, or print one's definition.
    Schemas {
        /// Print this schema's fields.
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Write a new ed25519 signing key (its 32-byte seed as hex, file mode 0600) for
    /// `[audit] signing_key_file`, and print the public key that verifies it.
    Keygen {
        /// File to create (refused if it exists).
        #[arg(long)]
        out: PathBuf,
    },
    /// Read the audit topic and prove every partition's hash chain intact: hashes,
    /// signatures, sequence and links, from a PINNED public key (the key of each
    /// chain's first record; `key_rotation` records hand over to later keys). On
    /// failure, names the first record that was altered, removed, reordered or
    /// forged, and exits with status 1. Refuses to run without a pinned key: one
    /// derived from the signing key would prove nothing (every host holds it).
    Verify {
        /// Configuration file (brokers, `topics.audit`, `audit.public_key`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Audit topic to read (default: `topics.audit`).
        #[arg(long)]
        topic: Option<String>,
        /// Pinned public key (64 hex characters); default: `audit.public_key` or
        /// `audit.public_key_file` from the configuration.
        #[arg(long, conflicts_with = "public_key_file")]
        public_key: Option<String>,
        /// File holding the pinned public key as hex.
        #[arg(long)]
        public_key_file: Option<PathBuf>,
        /// Accept chains whose oldest records were deleted by topic retention.
        #[arg(long)]
        allow_truncated_start: bool,
        /// Give up reading the topic after this long.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Labelled dataset CSV (plain or .gz), e.g. ../shared/datasets/wustl-ehms-2020/train.csv.
    #[arg(long)]
    dataset: PathBuf,
    /// Event schema of the rows (`twinguard schemas` lists them).
    #[arg(long, default_value = "wustl-flow-vitals/v1")]
    schema: String,
    /// Feature SQL file (default: the schema's shipped query, schemas/features/<name>.v<N>.sql).
    #[arg(long, conflicts_with = "variant")]
    features: Option<PathBuf>,
    /// A shipped feature variant instead of the default, e.g. `identity` (adds the
    /// twin's identity-drift feature; WUSTL).
    #[arg(long)]
    variant: Option<String>,
    /// Output directory for the model artifact.
    #[arg(long)]
    out: PathBuf,
    /// Split: temporal (stream order; for captures like WUSTL) or stratified
    /// (per class, seeded; rows are also replayed in a seeded random order).
    #[arg(long, value_enum, default_value = "temporal")]
    split: twinguard_train::SplitKind,
    /// Share of rows for training, then for validation (stacking and threshold); the rest is the test set.
    #[arg(long, default_value_t = 0.6)]
    train_frac: f64,
    #[arg(long, default_value_t = 0.2)]
    val_frac: f64,
    /// Target false-positive rate: the decision threshold is set for it on validation normal rows.
    #[arg(long, default_value_t = 0.01)]
    target_fpr: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Devices the rows are spread over (round-robin; WUSTL is one monitored patient).
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Event-time spacing of consecutive rows, in ms (as `twinguard replay`).
    #[arg(long, default_value_t = 100)]
    interval_ms: i64,
    /// Use at most this many rows.
    #[arg(long)]
    limit: Option<usize>,
    /// Random-forest trees.
    #[arg(long, default_value_t = 100)]
    trees: usize,
    /// Weight the forest's classes inversely to their frequency.
    #[arg(long)]
    balanced: bool,
    /// Smallest number of training rows in a forest leaf.
    #[arg(long, default_value_t = 1)]
    min_samples_leaf: usize,
    /// SVM kernel: linear (default; cheap to score) or rbf (γ = 1/features; costs
    /// support vectors × features per event).
    #[arg(long, value_parser = ["linear", "rbf"], default_value = "linear")]
    svm_kernel: String,
    /// Largest SVM training sample (stratified subsample).
    #[arg(long, default_value_t = 3000)]
    svm_rows: usize,
    /// LSTM training epochs.
    #[arg(long, default_value_t = 15)]
    lstm_epochs: usize,
    /// LSTM hidden units.
    #[arg(long, default_value_t = 16)]
    lstm_hidden: usize,
    /// Poisoning experiment: flip this fraction of the training labels first.
    #[arg(long, default_value_t = 0.0)]
    flip_labels: f64,
    /// Screen the training labels for poisoning (out-of-fold disagreement) and relabel suspects.
    #[arg(long)]
    screen: bool,
}

impl TrainArgs {
    fn job(self) -> Result<twinguard_train::TrainJob> {
        use twinguard_train::{DatasetSpec, SplitKind, SplitSpec, TrainJob, TrainOptions};
        let schema = EventSchema::builtin(&self.schema)?;
        let feature_sql = match (&self.features, &self.variant) {
            (Some(p), _) => std::fs::read_to_string(p).with_context(|| format!("reading feature SQL {}", p.display()))?,
            (None, v) => twinguard_schemas::builtin_feature_sql(&schema.id(), v.as_deref())
                .ok_or_else(|| anyhow::anyhow!("schema `{}` ships no feature SQL{}: pass --features FILE", schema.id(), v.as_ref().map_or(String::new(), |v| format!(" variant `{v}`"))))?
                .to_string(),
        };
        if !(self.train_frac > 0.0 && self.val_frac > 0.0 && self.train_frac + self.val_frac < 1.0) {
            anyhow::bail!("--train-frac and --val-frac must be positive and leave rows for the test set");
        }
        if !(0.0..0.5).contains(&self.flip_labels) {
            anyhow::bail!("--flip-labels must be in [0, 0.5)");
        }
        if !(self.target_fpr > 0.0 && self.target_fpr < 1.0) {
            anyhow::bail!("--target-fpr must be in (0, 1)");
        }
        let stratified = self.split == SplitKind::Stratified;
        Ok(TrainJob {
            dataset: DatasetSpec {
                file: self.dataset,
                schema: schema.id(),
                devices: self.devices.max(1),
                interval_ms: self.interval_ms,
                limit: self.limit,
                shuffle_seed: stratified.then_some(self.seed),
            },
            schema,
            feature_sql,
            twin: twinguard_operators::TwinConfig::default(),
            split: SplitSpec { kind: self.split, train: self.train_frac, validation: self.val_frac, seed: self.seed },
            opts: TrainOptions {
                target_fpr: self.target_fpr,
                seed: self.seed,
                forest: twinguard_models::forest::ForestParams {
                    trees: self.trees,
                    seed: self.seed,
                    balanced: self.balanced,
                    min_samples_leaf: self.min_samples_leaf.max(1),
                    ..Default::default()
                },
                svm: twinguard_models::svm::SvmParams {
                    max_train_rows: self.svm_rows,
                    seed: self.seed,
                    kernel: if self.svm_kernel == "rbf" {
                        twinguard_models::svm::Kernel::Rbf { gamma: 0.0 }
                    } else {
                        twinguard_models::svm::Kernel::Linear
                    },
                    ..Default::default()
                },
                lstm: twinguard_models::lstm::LstmParams { epochs: self.lstm_epochs, hidden: self.lstm_hidden, seed: self.seed, ..Default::default() },
                flip_labels: self.flip_labels,
                screen: self.screen,
                screen_threshold: 0.2,
            },
            out: self.out,
        })
    }
}

/// Training's progress on stderr: steps as lines, the running status of a long step
/// rewritten in place.
fn print_progress(p: train::Progress<'_>) {
    match p {
        train::Progress::Step(m) => eprintln!("{m}"),
        train::Progress::Status(m) => eprint!("\r{m}"),
        train::Progress::StatusEnd => eprintln!(),
    }
}

/// The simulated hospital.
#[derive(clap::Args)]
struct SimArgs {
    /// Simulated devices (infusion pumps, monitors, oximeters, ventilators, ...).
    #[arg(long, default_value_t = 60)]
    devices: usize,
    /// Events to send in total.
    #[arg(long, default_value_t = 60_000)]
    events: usize,
    /// Random seed of the simulator (same seed, same devices and attacks).
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn init_logs(default: &str) {
    // A second subscriber cannot be installed; the first one stays (never fatal).
    let _ = twinguard::obs::export::init_logs(default, None);
}

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    Ok(Config::load(path.map(PathBuf::as_path), std::env::vars())?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo { sim: SimArgs { devices, events, seed }, partitions, model, train_events } => {
            // Dead letters are counted in the summary; per-record lines would bury the progress.
            init_logs("warn,twinguard::obs::events=error");
            let summary = demo::run(&DemoOptions { devices, events, seed, partitions, model, train_events })?;
            summary.print(&mut std::io::stdout())?;
            if summary.verdicts != summary.valid || summary.dlq != summary.malformed {
                anyhow::bail!("the demo lost track of records: see the summary above");
            }
            Ok(())
        }
        Command::Run { config, check_config } => {
            let cfg = load_config(config.as_ref())?;
            if check_config {
                init_logs("info");
                let schema = cfg.event_schema()?;
                // Loads the model too: a missing or incompatible artifact fails here.
                let detector = twinguard::engine::build::detector(&cfg, &schema)?;
                // ...and the registry and the audit key.
                let registry = twinguard::engine::build::registry(&cfg)?;
                let audit = twinguard::engine::build::audit_log(&cfg)?;
                // ...and the SQL users' passwords, when the endpoint is on.
                let users = if cfg.sql.listen.is_some() { cfg.sql_users()? } else { Vec::new() };
                println!(
                    "configuration OK (schema {}, model {}, {} registered devices, {} response rules, audit {}, sql {}, metrics {})",
                    schema.id(),
                    detector.model_version().unwrap_or("none: twin behaviour score only"),
                    registry.len(),
                    cfg.response.rules.len(),
                    audit.map_or("off (no signing key)".to_string(), |a| format!("signed, public key {}", a.public_key_hex())),
                    cfg.sql.listen.as_ref().map_or("off".to_string(), |l| format!("on {l} for {} users", users.len())),
                    if cfg.http.listen.is_empty() { "off".to_string() } else { format!("on http://{}/metrics", cfg.http.listen) }
                );
                return Ok(());
            }
            run_until_signal(cfg, Mode::Pipeline, None)
        }
        Command::Sql { config, brokers, listen, http_listen, check_config } => {
            let mut cfg = load_config(config.as_ref())?;
            if let Some(b) = brokers {
                cfg.kafka.brokers = b;
            }
            if let Some(h) = http_listen {
                h.parse::<std::net::SocketAddr>().map_err(|e| anyhow::anyhow!("--http-listen `{h}` is not host:port: {e}"))?;
                cfg.http.listen = h;
            }
            let listen = listen.or_else(|| cfg.sql.listen.clone()).unwrap_or_else(|| "127.0.0.1:5433".to_string());
            listen.parse::<std::net::SocketAddr>().map_err(|e| anyhow::anyhow!("--listen `{listen}` is not host:port: {e}"))?;
            if cfg.sql.users.is_empty() {
                anyhow::bail!("no SQL users configured: add `[[sql.users]] name = \"analyst\"  password_env = \"TWINGUARD_SQL_PASSWORD\"` to the config");
            }
            let users = cfg.sql_users()?;
            let schema = cfg.event_schema()?;
            if check_config {
                println!(
                    "configuration OK (query-only SQL on {listen}, schema {}, {} users, tls {}, changelog `{}` on {})",
                    schema.id(),
                    users.len(),
                    if cfg.sql.tls.is_some() { "on" } else { "off" },
                    cfg.topics.changelog,
                    cfg.kafka.brokers
                );
                return Ok(());
            }
            run_until_signal(cfg, Mode::Global, Some(listen))
        }
        Command::Simulate { config, sim: SimArgs { devices, events, seed }, rate, topic, malformed_rate } => {
            init_logs("warn");
            let cfg = load_config(config.as_ref())?;
            let topic = topic.unwrap_or_else(|| cfg.topics.input.clone());
            let mut sc = SimConfig::new(devices, events, seed);
            sc.malformed_rate = malformed_rate;
            let recs: Vec<_> = Simulator::new(sc).map(|r| (r.key, r.payload)).collect();
            let total = recs.len();
            produce::produce_all(&cfg, &topic, recs, rate, |sent, acked| eprint!("\r  sent {sent}/{total}, acknowledged {acked}   "))?;
            eprintln!("\nwrote {total} simulated events to `{topic}`");
            Ok(())
        }
        Command::Replay { config, file, schema, device_column, devices, interval_ms, limit, shuffle_seed, rate, topic } => {
            init_logs("warn");
            let cfg = load_config(config.as_ref())?;
            let schema = match schema {
                Some(s) => EventSchema::builtin(&s)?,
                None => cfg.event_schema()?,
            };
            let topic = topic.unwrap_or_else(|| cfg.topics.input.clone());
            let start_ms = chrono::Utc::now().timestamp_millis() - limit.unwrap_or(200_000) as i64 * interval_ms - 60_000;
            let opts = ReplayOptions { file: file.clone(), device_column, devices, start_ms, interval_ms, limit, shuffle_seed };
            let (recs, stats) = train::load(&schema, &opts).with_context(|| format!("reading {}", file.display()))?;
            let total = recs.len();
            produce::produce_all(&cfg, &topic, recs, rate, |sent, acked| eprint!("\r  sent {sent}/{total}, acknowledged {acked}   "))?;
            eprintln!(
                "\nreplayed {} rows of {} into `{topic}` as `{}` events ({} values sent absent: empty, non-finite or 0 = missing)",
                stats.rows,
                file.display(),
                schema.id(),
                stats.values_absent
            );
            Ok(())
        }
        Command::Train(args) => {
            init_logs("warn");
            let job = args.job()?;
            let (artifact, report) = twinguard_train::run_train(&job, &mut print_progress)?;
            println!("{}", twinguard_train::render(&report));
            println!("model {} in {}", artifact.version, job.out.display());
            Ok(())
        }
        Command::Eval { model, dataset, out } => {
            init_logs("warn");
            let artifact = twinguard_models::Artifact::load(&model)?;
            let twin = twinguard_train::twin_config_of(&artifact)?;
            let out = out.unwrap_or_else(|| if model.is_dir() { model.clone() } else { model.parent().map(PathBuf::from).unwrap_or_default() });
            let report = twinguard_train::run_eval(artifact, dataset, &twin, &out, &mut print_progress)?;
            println!("{}", twinguard_train::render(&report));
            println!("report.json, roc.png, pr.png, confusion.png written to {}", out.display());
            Ok(())
        }
        Command::Audit { command } => audit(command),
        Command::Schemas { name } => {
            match name {
                None => {
                    for id in EventSchema::builtin_names() {
                        let s = EventSchema::builtin(id)?;
                        println!("{id:<26} {} fields  {}", s.fields.len(), s.description);
                    }
                }
                Some(n) => {
                    let s = EventSchema::builtin(&n)?;
                    println!("{} — {}", s.id(), s.description);
                    println!("  device_id   string  required  device identity (MUST equal the record key)");
                    println!("  event_time  string  required  RFC 3339, or integer epoch milliseconds");
                    for f in &s.fields {
                        println!("  {:<16} {:<7} {:<9} {:<9} {}", f.name, format!("{:?}", f.kind).to_lowercase(), format!("{:?}", f.role).to_lowercase(), if f.required { "required" } else { "optional" }, f.description);
                    }
                }
            }
            Ok(())
        }
    }
}

fn audit(command: AuditCommand) -> Result<()> {
    use twinguard_operators::audit::{parse_key_hex, verify_chain, verifying_key, AuditLog};
    /// Why `audit verify` never falls back to the signing key.
    const NO_PINNED_KEY: &str = "no pinned public key to verify the audit trail with: pass `--public-key HEX` (or `--public-key-file FILE`), or configure `audit.public_key` (or `audit.public_key_file`) with the public key `twinguard audit keygen` printed for the chain's first signing key; it is never derived from the signing key, which every pipeline host holds";
    match command {
        AuditCommand::Keygen { out } => {
            use rand::Rng;
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let seed: [u8; 32] = rand::rng().random();
            let hex = twinguard_operators::audit::hex(&seed);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| format!("creating {} (an existing key is never overwritten)", out.display()))?;
            writeln!(f, "{hex}")?;
            println!("signing key written to {} (keep it secret)", out.display());
            println!("public key: {}", AuditLog::new(seed).public_key_hex());
            Ok(())
        }
        AuditCommand::Verify { config, topic, public_key, public_key_file, allow_truncated_start, timeout_secs } => {
            init_logs("warn");
            let cfg = load_config(config.as_ref())?;
            let topic = topic.unwrap_or_else(|| cfg.topics.audit.clone());
            let key_hex = match (public_key, public_key_file) {
                (Some(k), _) => k,
                (None, Some(f)) => std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?,
                (None, None) => cfg.audit_public_key()?.ok_or_else(|| anyhow::anyhow!(NO_PINNED_KEY))?,
            };
            let key = parse_key_hex(&key_hex).and_then(verifying_key).map_err(|e| anyhow::anyhow!("public key: {e}"))?;
            let chains = twinguard::kafka::read_all(&cfg, &topic, std::time::Duration::from_secs(timeout_secs))?;
            let mut total = 0;
            for (p, records) in &chains {
                match verify_chain(*p, records, &key, allow_truncated_start) {
                    Ok(s) => {
                        total += s.records;
                        let rotated = if s.rotations > 0 { format!(", {} key rotation(s), now signed by {}", s.rotations, s.key) } else { String::new() };
                        println!("partition {p}: {} records, chain intact{rotated}{}", s.records, s.head.map_or(String::new(), |h| format!(", head {h}")));
                    }
                    Err(fault) => {
                        println!("partition {p}: FAILED");
                        anyhow::bail!("audit trail of `{topic}` does not verify: {fault}");
                    }
                }
            }
            println!("audit trail of `{topic}` verified: {total} records in {} chains", chains.len());
            Ok(())
        }
    }
}

/// Run a long-lived process (a pipeline instance, or the query-only SQL process)
/// until SIGINT/SIGTERM, with its telemetry, `/metrics` and SQL endpoint.
fn run_until_signal(cfg: Config, mode: Mode, sql_listen: Option<String>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // The OTLP exporters live on this runtime: set up inside it, shut down before it.
    let telemetry = {
        let _guard = rt.enter();
        twinguard::obs::export::init(&cfg.otel, "info")?
    };
    let result = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(Metrics::default());
        let sql_listen = sql_listen.or_else(|| if mode == Mode::Pipeline { cfg.sql.listen.clone() } else { None });
        let view = twinguard::app::serve::start(&cfg, &telemetry, &metrics, mode, sql_listen.as_deref(), &stop).await?;
        let mut work = {
            let (stop, metrics, cfg) = (stop.clone(), metrics.clone(), cfg.clone());
            tokio::task::spawn_blocking(move || -> Result<Option<twinguard::RunReport>, twinguard::PipelineError> {
                match mode {
                    Mode::Pipeline => {
                        let observer = view.map(|v| twinguard::sql::view::ViewFeed::for_config(v, &cfg)).transpose()?;
                        twinguard::engine::run_rejoining(&cfg, metrics, stop, observer).map(Some)
                    }
                    Mode::Global => {
                        let view = view.expect("the query-only process serves SQL");
                        twinguard::sql::fleet::run(&cfg, metrics, view, stop).map(|()| None)
                    }
                }
            })
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = &mut work => {
                r??;
                return Ok::<(), anyhow::Error>(());
            }
            _ = tokio::signal::ctrl_c() => twinguard::obs::events::StopRequested { signal: "SIGINT" }.emit(),
            _ = term.recv() => twinguard::obs::events::StopRequested { signal: "SIGTERM" }.emit(),
        }
        stop.store(true, Ordering::Relaxed);
        if let Some(report) = work.await?? {
            twinguard::obs::events::StoppedCleanly { twins: report.twins, twin_mem_bytes: report.twin_mem_bytes }.emit();
        }
        Ok(())
    });
    telemetry.shutdown();
    result
}
