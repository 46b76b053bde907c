//! The `twinguard` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use twinguard::config::Config;
use twinguard::demo::{self, DemoOptions};
use twinguard::replay::{self, ReplayOptions};
use twinguard::sim::{SimConfig, Simulator};
use twinguard::{produce, Metrics};
use twinguard_schemas::EventSchema;

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
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long)]
        topic: Option<String>,
    },
    /// List the built-in event schemas, or print one's definition.
    Schemas {
        /// Print this schema's fields.
        name: Option<String>,
    },
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
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
        Command::Demo { sim: SimArgs { devices, events, seed }, partitions } => {
            // Dead letters are counted in the summary; per-record lines would bury the progress.
            init_logs("warn,twinguard::telemetry=error");
            let summary = demo::run(&DemoOptions { devices, events, seed, partitions })?;
            summary.print(&mut std::io::stdout())?;
            if summary.verdicts != summary.valid || summary.dlq != summary.malformed {
                anyhow::bail!("the demo lost track of records: see the summary above");
            }
            Ok(())
        }
        Command::Run { config, check_config } => {
            init_logs("info");
            let cfg = load_config(config.as_ref())?;
            if check_config {
                println!("configuration OK (schema {})", cfg.event_schema()?.id());
                return Ok(());
            }
            run_until_signal(cfg)
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
        Command::Replay { config, file, schema, device_column, devices, interval_ms, limit, rate, topic } => {
            init_logs("warn");
            let cfg = load_config(config.as_ref())?;
            let schema = match schema {
                Some(s) => EventSchema::builtin(&s)?,
                None => cfg.event_schema()?,
            };
            let topic = topic.unwrap_or_else(|| cfg.topics.input.clone());
            let start_ms = chrono::Utc::now().timestamp_millis() - limit.unwrap_or(200_000) as i64 * interval_ms - 60_000;
            let opts = ReplayOptions { file: file.clone(), device_column, devices, start_ms, interval_ms, limit };
            let (recs, stats) = replay::load(&schema, &opts).with_context(|| format!("reading {}", file.display()))?;
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

fn run_until_signal(cfg: Config) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(Metrics::default());
        let mut pipeline = {
            let (stop, metrics) = (stop.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || twinguard::run(&cfg, metrics, stop))
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = &mut pipeline => return Ok(r??).map(|_| ()),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping after in-flight batches"),
            _ = term.recv() => tracing::info!("SIGTERM: stopping after in-flight batches"),
        }
        stop.store(true, Ordering::Relaxed);
        let report = pipeline.await??;
        tracing::info!(twins = report.twins, twin_mem_bytes = report.twin_mem_bytes, "stopped cleanly");
        Ok(())
    })
}
