//! The command line's arguments: every subcommand, its flags and their help (clap).
//! `main.rs` carries them out.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use twinguard_schemas::EventSchema;

pub(crate) use crate::cli_attack::{AdversarialArgs, AttackArgs};
pub(crate) use crate::cli_model::ModelArgs;

/// twinguard: a Kafka-native security pipeline for connected medical devices.
///
/// Device telemetry is decoded into Arrow batches, applied to per-device digital
/// twins, scored against each device's own behaviour, and answered with verdicts on
/// a downstream topic. Bad records go to a dead-letter topic, never silently away.
#[derive(Parser)]
#[command(name = "twinguard", version, about, long_about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
        /// CSV file (plain or .gz), or a Zeek log (tab-separated, `#fields` header,
        /// `-` = missing).
        #[arg(long)]
        file: PathBuf,
        /// Schema of the events: a built-in name or a schema file (default: the
        /// configured one).
        #[arg(long)]
        schema: Option<String>,
        /// Column holding the device identity (default: rows spread over --devices ids).
        #[arg(long)]
        device_column: Option<String>,
        /// Dataset column with each row's event time: RFC 3339, integer ms since the
        /// epoch, or seconds with a fraction as Zeek's `ts` (default: rows
        /// --interval-ms apart, ending about now).
        #[arg(long)]
        time_column: Option<String>,
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
    Train {
        #[command(flatten)]
        args: TrainArgs,
        #[command(flatten)]
        adversarial: AdversarialArgs,
    },
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
        /// Score every row of `--dataset` as test rows (a labelled capture the model
        /// never saw, e.g. a hospital's own), instead of the training recipe's split.
        /// Thresholds stay those set at training.
        #[arg(long, requires = "dataset")]
        all: bool,
        /// Also write per-event scores as CSV: the file row, split, label, family,
        /// each member's score (rf, svm, lstm, twin, gbdt), the ensemble score,
        /// the verdict and the class.
        #[arg(long, value_name = "FILE")]
        scores: Option<PathBuf>,
        /// A federation's model: score at this site's own threshold (set from its
        /// own validation rows; `model.site` in a pipeline) instead of the
        /// federation's, e.g. a hospital evaluating its own capture.
        #[arg(long, value_name = "NAME")]
        site: Option<String>,
    },
    /// Constrained evasion: attackers who shape their own traffic (a constraint
    /// file per attack family) search, through the real detector, for versions of
    /// the model's attacked test events it lets pass; reports clean and robust
    /// detection rates per target and family (attack.json).
    Attack(AttackArgs),
    /// Federated training: hospitals train together and share model updates,
    /// never rows. `simulate` runs a whole federation in one process over one
    /// dataset's rows split into sites (for evaluation and CI).
    Federate {
        #[command(subcommand)]
        role: FederateRole,
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
pub(crate) enum AuditCommand {
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
        /// Also verify this federation's audit chain (its aggregator's key from
        /// the file) and that every `model_activated` record names a version and
        /// digest the federation published.
        #[arg(long, value_name = "FILE")]
        federation: Option<PathBuf>,
        /// Give up reading the topic after this long.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
}

/// Federation roles.
#[derive(Subcommand)]
pub(crate) enum FederateRole {
    /// A whole federation in one process: the dataset's training and validation
    /// rows split over --sites sites (per class Dirichlet(--alpha) shares, or
    /// --periods for one capture in time order), each site training on its own
    /// rows only; the aggregator pools trees, aggregates hyperplanes and LSTM
    /// weights with --rule, sums the stacker's Newton steps and the sites' score
    /// histograms. The test rows belong to no site: the model is evaluated on them
    /// through the detector, as `twinguard train` does. Writes the model, report,
    /// plots and federation.json (each site's share and the decision on each of its
    /// updates) into --out.
    ///
    ///   twinguard federate simulate --dataset ../shared/datasets/ciciomt2024/train_sample.csv.gz \
    ///     --schema ciciomt-flow-window/v1 --split stratified --sites 10 --alpha 0.5 \
    ///     --poison 3:invert --out out/fed-cic
    Simulate(SimulateArgs),
    /// The aggregator of a federation over Kafka (one per federation; it reads no
    /// dataset). Runs round 0 and every member's rounds with the sites named in
    /// the federation file, combines their signed answers with the plan's robust
    /// rules, writes the model and federation.json into --out, and publishes the
    /// artifact and the model pointer on the federation's topics. Start the sites
    /// before or after it: a site replays the run's tasks from the plan topic.
    ///
    ///   twinguard federate aggregate --config fed.toml --key aggregator.key \
    ///     --schema ciciomt-flow-window/v1 --out out/fed-model
    Aggregate(AggregateArgs),
    /// One hospital of a federation over Kafka: prepares its own labelled events
    /// (--dataset, as `twinguard train`), runs the label screen with --screen, and
    /// answers the aggregator's tasks from its training and validation rows until
    /// the run ends. Rows, labels, scores and twins never leave it.
    ///
    ///   twinguard federate site --config fed.toml --name hospital-a --key a.key \
    ///     --dataset capture.csv --schema ciciomt-flow-window/v1 --split stratified --out out/site-a
    Site(SiteArgs),
    /// Publish a model trained elsewhere (`twinguard train`, an earlier
    /// federation) as the federation's current version, signed with the
    /// aggregator's key; pipelines that follow the federation switch to it.
    Publish {
        #[command(flatten)]
        party: PartyArgs,
        /// The model (a `twinguard train` output directory or its model.json).
        #[arg(long)]
        model: PathBuf,
    },
    /// Point the federation back at the version the current one replaced;
    /// following pipelines switch back to it at their next batch.
    Rollback(PartyArgs),
}

/// Where a party finds its federation and key.
#[derive(clap::Args)]
pub(crate) struct PartyArgs {
    /// Federation file (TOML): id, brokers, the aggregator's and every site's
    /// public key, and the [plan]; every party reads the same file (its hash is
    /// in every message).
    #[arg(long, short)]
    pub(crate) config: PathBuf,
    /// This party's ed25519 signing key (`twinguard audit keygen --out FILE`
    /// writes one and prints its public key for the federation file).
    #[arg(long)]
    pub(crate) key: PathBuf,
}

#[derive(clap::Args)]
pub(crate) struct AggregateArgs {
    #[command(flatten)]
    pub(crate) party: PartyArgs,
    /// Event schema of the sites' events (built-in name or schema file).
    #[arg(long, default_value = "wustl-flow-vitals/v1")]
    pub(crate) schema: String,
    /// Feature SQL file (default: the schema's shipped query).
    #[arg(long, conflicts_with = "variant")]
    pub(crate) features: Option<PathBuf>,
    /// A shipped feature variant instead of the default, e.g. `identity`.
    #[arg(long)]
    pub(crate) variant: Option<String>,
    /// Output directory for the model artifact and federation.json.
    #[arg(long)]
    pub(crate) out: PathBuf,
    #[command(flatten)]
    pub(crate) model: ModelArgs,
}

#[derive(clap::Args)]
pub(crate) struct SiteArgs {
    #[command(flatten)]
    pub(crate) party: PartyArgs,
    /// This site's name in the federation file.
    #[arg(long)]
    pub(crate) name: String,
    /// Evaluation only: take the rows simulated site K of a Dirichlet(--alpha)
    /// split of --dataset gets (as `federate simulate`), instead of the split's
    /// training and validation rows.
    #[arg(long, value_name = "K")]
    pub(crate) carve: Option<usize>,
    /// Dirichlet concentration for --carve.
    #[arg(long, default_value_t = 0.5, requires = "carve")]
    pub(crate) alpha: f64,
    #[command(flatten)]
    pub(crate) train: TrainArgs,
    #[command(flatten)]
    pub(crate) adversarial: AdversarialArgs,
}

#[derive(clap::Args)]
pub(crate) struct SimulateArgs {
    #[command(flatten)]
    pub(crate) train: TrainArgs,
    /// Number of sites (hospitals).
    #[arg(long, default_value_t = 5)]
    pub(crate) sites: usize,
    /// Dirichlet concentration of the per-class shares: small = each site sees few
    /// classes (non-IID), large = the same mix everywhere.
    #[arg(long, default_value_t = 0.5, conflicts_with = "periods")]
    pub(crate) alpha: f64,
    /// Sites are contiguous periods of the rows instead (one capture, e.g. WUSTL).
    #[arg(long)]
    pub(crate) periods: bool,
    /// Poisoned sites (the last K) and their attack: K:invert, K:targeted,
    /// K:replace (inverted, boosted ×sites), K:little ("a little is enough"), K:fang,
    /// K:inflate (honest models, score histograms claiming high-scoring normal rows).
    #[arg(long)]
    pub(crate) poison: Option<String>,
    /// Rule for vector updates: clip-multi-krum (default), multi-krum, median,
    /// trimmed-mean, or mean (undefended: nothing is screened).
    #[arg(long, default_value = "clip-multi-krum")]
    pub(crate) rule: String,
    /// How the boosted member federates: cyclic (the model travels from site to
    /// site, each adding trees, a turn kept only if it does not lower the model's
    /// AUC on the other sites' rows) or bagging (each site boosts alone, the
    /// screened boosters averaged).
    #[arg(long, value_parser = ["cyclic", "bagging"], default_value = "cyclic")]
    pub(crate) gbdt: String,
    /// Whose false-positive rate the threshold holds: every-site (also the target
    /// on the own validation rows of each site whose normal rows show, by a
    /// binomial test, that they run above it at the pooled threshold; such a lift
    /// costs the other sites at most 1 point of validation DR) or pooled (on all
    /// sites' rows taken together only).
    #[arg(long, value_parser = ["every-site", "pooled"], default_value = "every-site")]
    pub(crate) threshold: String,
    /// LSTM rounds (FedAvg from the global weights).
    #[arg(long, default_value_t = 5)]
    pub(crate) lstm_rounds: usize,
    /// LSTM local epochs per round.
    #[arg(long, default_value_t = 3)]
    pub(crate) local_epochs: usize,
    /// Instead of a federation: every site trains the whole ensemble alone on its
    /// own rows (the arm a federation must beat), measured on the same test rows;
    /// writes local.json into --out.
    #[arg(long)]
    pub(crate) local_only: bool,
    #[command(flatten)]
    pub(crate) adversarial: AdversarialArgs,
    #[command(flatten)]
    pub(crate) dp: crate::cli_attack::DpArgs,
}

impl SimulateArgs {
    pub(crate) fn plan(&self) -> Result<twinguard_models::federated::simulate::FederationPlan> {
        use twinguard_models::federated::{robust::Rule, simulate::{FederationPlan, PoisonKind, Sites}};
        let (poisoned, poison) = match &self.poison {
            None => (0, PoisonKind::Invert),
            Some(p) => {
                let (k, kind) = p.split_once(':').ok_or_else(|| anyhow::anyhow!("--poison `{p}`: expected K:KIND, e.g. 3:invert"))?;
                let k: usize = k.parse().with_context(|| format!("--poison `{p}`: `{k}` is not a number of sites"))?;
                (k, PoisonKind::parse(kind)?)
            }
        };
        anyhow::ensure!(self.sites >= 2, "--sites must be at least 2");
        anyhow::ensure!(poisoned < self.sites, "--poison {poisoned} of --sites {} leaves no honest site", self.sites);
        if !self.periods && !(self.alpha > 0.0 && self.alpha.is_finite()) {
            anyhow::bail!("--alpha must be a positive number");
        }
        Ok(FederationPlan {
            sites: self.sites,
            split: if self.periods { Sites::Periods } else { Sites::Dirichlet { alpha: self.alpha } },
            rule: Rule::parse(&self.rule)?,
            poisoned,
            poison,
            gbdt: twinguard_models::federated::plan::GbdtMode::parse(&self.gbdt)?,
            lstm_rounds: self.lstm_rounds.max(1),
            lstm_local_epochs: self.local_epochs.max(1),
            seed: self.train.model.seed,
            dp: self.dp.plan()?,
            threshold: twinguard_models::federated::plan::ThresholdRule::parse(&self.threshold)?,
        })
    }
}

#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    /// Labelled dataset CSV (plain or .gz), e.g. ../shared/datasets/wustl-ehms-2020/train.csv.
    #[arg(long)]
    pub(crate) dataset: PathBuf,
    /// Event schema of the rows: a built-in one (`twinguard schemas` lists them) or a
    /// schema file (TOML; its `[labels]` table maps label values to classes and
    /// families; pass the feature SQL with --features). A model trained on a file
    /// carries its text.
    #[arg(long, default_value = "wustl-flow-vitals/v1")]
    pub(crate) schema: String,
    /// Dataset column holding each row's device id (default: --devices synthetic ids).
    #[arg(long)]
    pub(crate) device_column: Option<String>,
    /// Dataset column holding each row's event time: RFC 3339, integer ms since the
    /// epoch, or seconds with a fraction as Zeek's `ts` (default: rows --interval-ms
    /// apart).
    #[arg(long)]
    pub(crate) time_column: Option<String>,
    /// Feature SQL file (default: the schema's shipped query, schemas/features/<name>.v<N>.sql).
    #[arg(long, conflicts_with = "variant")]
    pub(crate) features: Option<PathBuf>,
    /// A shipped feature variant instead of the default, e.g. `identity` (adds the
    /// twin's identity-drift feature; WUSTL).
    #[arg(long)]
    pub(crate) variant: Option<String>,
    /// Output directory for the model artifact.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Split: temporal (stream order; for captures like WUSTL) or stratified
    /// (per class, seeded; rows are also replayed in a seeded random order).
    #[arg(long, value_enum, default_value = "temporal")]
    pub(crate) split: twinguard_train::SplitKind,
    /// Share of rows for training, then for validation (stacking and threshold); the rest is the test set.
    #[arg(long, default_value_t = 0.6)]
    pub(crate) train_frac: f64,
    #[arg(long, default_value_t = 0.2)]
    pub(crate) val_frac: f64,
    /// Devices the rows are spread over (round-robin; WUSTL is one monitored patient).
    #[arg(long, default_value_t = 1)]
    pub(crate) devices: usize,
    /// Event-time spacing of consecutive rows, in ms (as `twinguard replay`).
    #[arg(long, default_value_t = 100)]
    pub(crate) interval_ms: i64,
    /// Use at most this many rows.
    #[arg(long)]
    pub(crate) limit: Option<usize>,
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Poisoning experiment: flip this fraction of the training labels first.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) flip_labels: f64,
    /// Screen the training labels for poisoning (out-of-fold disagreement) and relabel suspects.
    #[arg(long)]
    pub(crate) screen: bool,
}

impl TrainArgs {
    pub(crate) fn job(self) -> Result<twinguard_train::TrainJob> {
        use twinguard_train::{DatasetSpec, SplitKind, SplitSpec, TrainJob};
        let schema = EventSchema::named_or_file(&self.schema)?;
        let feature_sql = feature_sql(&schema, self.features.as_ref(), self.variant.as_deref())?;
        if !(self.train_frac > 0.0 && self.val_frac > 0.0 && self.train_frac + self.val_frac < 1.0) {
            anyhow::bail!("--train-frac and --val-frac must be positive and leave rows for the test set");
        }
        if !(0.0..0.5).contains(&self.flip_labels) {
            anyhow::bail!("--flip-labels must be in [0, 0.5)");
        }
        let stratified = self.split == SplitKind::Stratified;
        Ok(TrainJob {
            dataset: DatasetSpec {
                file: self.dataset,
                schema: schema.id(),
                devices: self.devices.max(1),
                interval_ms: self.interval_ms,
                limit: self.limit,
                shuffle_seed: stratified.then_some(self.model.seed),
                device_column: self.device_column,
                time_column: self.time_column,
            },
            schema,
            feature_sql,
            twin: twinguard_operators::TwinConfig::default(),
            split: SplitSpec { kind: self.split, train: self.train_frac, validation: self.val_frac, seed: self.model.seed },
            opts: self.model.options(self.flip_labels, self.screen)?,
            out: self.out,
        })
    }
}

/// The feature SQL of a schema: a file, a shipped variant, or the schema's own.
pub(crate) fn feature_sql(schema: &EventSchema, features: Option<&PathBuf>, variant: Option<&str>) -> Result<String> {
    match (features, variant) {
        (Some(p), _) => std::fs::read_to_string(p).with_context(|| format!("reading feature SQL {}", p.display())),
        (None, v) => Ok(twinguard_schemas::builtin_feature_sql(&schema.id(), v)
            .ok_or_else(|| anyhow::anyhow!("schema `{}` ships no feature SQL{}: pass --features FILE", schema.id(), v.map_or(String::new(), |v| format!(" variant `{v}`"))))?
            .to_string()),
    }
}

/// The simulated hospital.
#[derive(clap::Args)]
pub(crate) struct SimArgs {
    /// Simulated devices (infusion pumps, monitors, oximeters, ventilators, ...).
    #[arg(long, default_value_t = 60)]
    pub(crate) devices: usize,
    /// Events to send in total.
    #[arg(long, default_value_t = 60_000)]
    pub(crate) events: usize,
    /// Random seed of the simulator (same seed, same devices and attacks).
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
}
