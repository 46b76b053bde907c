//! The `twinguard` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use twinguard::app::serve::Mode;
use twinguard::config::Config;
use twinguard::app::demo::{self, DemoOptions};
use twinguard::tools::sim::{SimConfig, Simulator};
use twinguard::tools::produce;
use twinguard::Metrics;
use twinguard_schemas::EventSchema;
use twinguard_train::{self as train, ReplayOptions};

mod cli;
mod cli_attack;
mod cli_model;

use cli::{AuditCommand, Cli, Command, FederateRole, SimArgs};

/// Training's progress on stderr: steps as lines, the running status of a long step
/// rewritten in place.
fn print_progress(p: train::Progress<'_>) {
    match p {
        train::Progress::Step(m) => eprintln!("{m}"),
        train::Progress::Status(m) => eprint!("\r{m}"),
        train::Progress::StatusEnd => eprintln!(),
    }
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
                return print_run_config(&cfg);
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
        Command::Replay { config, file, schema, device_column, time_column, devices, interval_ms, limit, shuffle_seed, rate, topic } => {
            init_logs("warn");
            let cfg = load_config(config.as_ref())?;
            let schema = match schema {
                Some(s) => EventSchema::named_or_file(&s)?,
                None => cfg.event_schema()?,
            };
            let topic = topic.unwrap_or_else(|| cfg.topics.input.clone());
            let start_ms = chrono::Utc::now().timestamp_millis() - limit.unwrap_or(200_000) as i64 * interval_ms - 60_000;
            let opts = ReplayOptions { file: file.clone(), device_column, time_column, devices, start_ms, interval_ms, limit, shuffle_seed };
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
        Command::Train { args, adversarial } => {
            init_logs("warn");
            let job = args.job()?;
            let (artifact, report) = match adversarial.options(&job.schema, job.opts.seed)? {
                None => twinguard_train::run_train(&job, &mut print_progress)?,
                Some(adv) => twinguard_train::adversarial::run_adversarial_train(&job, &adv, &mut print_progress)?,
            };
            println!("{}", twinguard_train::render(&report));
            println!("model {} in {}", artifact.version, job.out.display());
            Ok(())
        }
        Command::Eval { model, dataset, out, all, scores, site } => {
            init_logs("warn");
            let mut artifact = twinguard_models::Artifact::load(&model)?;
            if let Some(site) = &site {
                println!("{}", artifact.ensemble.use_site_threshold(site)?);
            }
            let twin = twinguard_train::twin_config_of(&artifact)?;
            let out = out.unwrap_or_else(|| if model.is_dir() { model.clone() } else { model.parent().map(PathBuf::from).unwrap_or_default() });
            let opts = twinguard_train::EvalOptions { dataset, all, scores: scores.clone() };
            let report = twinguard_train::run_eval(artifact, &opts, &twin, &out, &mut print_progress)?;
            println!("{}", twinguard_train::render(&report));
            println!("report.json, roc.png, pr.png, confusion.png written to {}", out.display());
            if let Some(f) = scores {
                println!("per-event scores written to {}", f.display());
            }
            Ok(())
        }
        Command::Attack(args) => args.run(),
        Command::Federate { role } => federate(role),
        Command::Audit { command } => audit(command),
        Command::Schemas { name } => print_schemas(name),
    }
}

/// `twinguard federate ...`.
fn federate(role: FederateRole) -> Result<()> {
    init_logs("warn");
    match role {
        FederateRole::Simulate(args) => {
            let plan = args.plan()?;
            let local_only = args.local_only;
            let job = args.train.job()?;
            if local_only {
                let results = twinguard_train::run_local_only(&job, &plan, &mut print_progress)?;
                println!("{}", twinguard_train::render_local(&results));
                println!("local.json written to {}", job.out.display());
                return Ok(());
            }
            let (artifact, report, fed) = match args.adversarial.options(&job.schema, job.opts.seed)? {
                None => twinguard_train::run_federate(&job, &plan, &mut print_progress)?,
                Some(adv) => twinguard_train::adversarial::run_federate_adversarial(&job, &plan, &adv, &mut print_progress)?,
            };
            println!("{}", twinguard_train::render(&report));
            println!("{}", twinguard_train::render_federation(&fed));
            println!("model {} and federation.json in {}", artifact.version, job.out.display());
            Ok(())
        }
        FederateRole::Aggregate(args) => {
            use twinguard::app::federate::{self as fed, aggregator};
            use twinguard_models::federated::{plan::{FederationPlan, GbdtMode, Sites, ThresholdRule}, robust::Rule};
            let file = fed::FederationFile::load(&args.party.config)?;
            let key = fed::signing_key(&args.party.key, fed::AGGREGATOR, &file)?;
            let schema = EventSchema::named_or_file(&args.schema)?;
            let feature_sql = cli::feature_sql(&schema, args.features.as_ref(), args.variant.as_deref())?;
            let opts = args.model.options(0.0, false)?;
            let plan = FederationPlan {
                rule: Rule::parse(&file.plan.rule).with_context(|| format!("{}: [plan] rule", args.party.config.display()))?,
                gbdt: GbdtMode::parse(&file.plan.gbdt).with_context(|| format!("{}: [plan] gbdt", args.party.config.display()))?,
                lstm_rounds: file.plan.lstm_rounds.max(1),
                lstm_local_epochs: file.plan.local_epochs.max(1),
                dp: file.plan.dp.clone(),
                threshold: ThresholdRule::parse(file.plan.threshold.as_deref().unwrap_or("every-site")).with_context(|| format!("{}: [plan] threshold", args.party.config.display()))?,
                ..FederationPlan::clean(file.sites.len(), Sites::Own, args.model.seed)
            };
            let job = aggregator::AggregateJob { fed: file, key, schema, feature_sql, opts, plan, out: args.out };
            let (artifact, report) = aggregator::aggregate(job, &mut print_progress)?;
            println!("{}", twinguard_train::render_federation(&report));
            println!("model {} published", artifact.version);
            Ok(())
        }
        FederateRole::Publish { party, model } => {
            use twinguard::app::federate::{self as fed, aggregator};
            let file = fed::FederationFile::load(&party.config)?;
            let key = fed::signing_key(&party.key, fed::AGGREGATOR, &file)?;
            let p = aggregator::publish_file(&file, key, &model)?;
            println!("model {} published on `{}` (SHA-256 {}, replaces {})", p.version, file.topics().model, p.sha256, p.parent.as_deref().unwrap_or("nothing"));
            Ok(())
        }
        FederateRole::Rollback(party) => {
            use twinguard::app::federate::{self as fed, aggregator};
            let file = fed::FederationFile::load(&party.config)?;
            let key = fed::signing_key(&party.key, fed::AGGREGATOR, &file)?;
            let p = aggregator::rollback(&file, key)?;
            println!("federation `{}` rolled back from {} to {}", file.id, p.rollback_of.as_deref().unwrap_or("?"), p.version);
            Ok(())
        }
        FederateRole::Site(args) => {
            use twinguard::app::federate::{self as fed, site};
            use twinguard_models::federated::plan::{FederationPlan, Sites};
            let file = fed::FederationFile::load(&args.party.config)?;
            let key = fed::signing_key(&args.party.key, &args.name, &file)?;
            let job = args.train.job()?;
            let rows = match args.carve {
                None => site::Rows::Own,
                Some(k) => site::Rows::Carve {
                    k,
                    // Only the split, the site count and the seed decide the rows.
                    plan: FederationPlan::clean(file.sites.len(), Sites::Dirichlet { alpha: args.alpha }, job.opts.seed),
                },
            };
            let adversarial = args.adversarial.options(&job.schema, job.opts.seed)?;
            let run = site::serve(&file, &args.name, key, &job, rows, adversarial.as_ref(), &mut print_progress)?;
            println!("site {}: {} run(s) finished, the last with model {} ({} tasks answered)", args.name, run.runs, run.version, run.answered);
            println!("the published model on this site's held-out rows:\n{}", twinguard_train::render(&run.report));
            Ok(())
        }
    }
}

/// `twinguard run --check-config`: everything the configuration names is loaded
/// (schema, model, registry, audit key, SQL passwords) and summarised.
fn print_run_config(cfg: &Config) -> Result<()> {
    init_logs("info");
    let schema = cfg.event_schema()?;
    // Loads the model too: a missing or incompatible artifact fails here.
    let detector = twinguard::engine::build::detector(cfg, &schema)?;
    // ...and the registry and the audit key.
    let registry = twinguard::engine::build::registry(cfg)?;
    let audit = twinguard::engine::build::audit_log(cfg)?;
    // ...and the SQL users' passwords, when the endpoint is on.
    let users = if cfg.sql.listen.is_some() { cfg.sql_users()? } else { Vec::new() };
    // ...and the federation file a followed model comes from.
    let follow = match &cfg.model.follow {
        None => String::new(),
        Some(f) => {
            let fed = twinguard::app::federate::FederationFile::load(f).with_context(|| "model.follow".to_string())?;
            format!(", following federation `{}` on `{}`", fed.id, fed.topics().model)
        }
    };
    println!(
        "configuration OK (schema {}, model {}{follow}, {} registered devices, {} response rules, audit {}, sql {}, metrics {})",
        schema.id(),
        detector.model_version().unwrap_or("none: twin behaviour score only"),
        registry.len(),
        cfg.response.rules.len(),
        audit.map_or("off (no signing key)".to_string(), |a| format!("signed, public key {}", a.public_key_hex())),
        cfg.sql.listen.as_ref().map_or("off".to_string(), |l| format!("on {l} for {} users", users.len())),
        if cfg.http.listen.is_empty() { "off".to_string() } else { format!("on http://{}/metrics", cfg.http.listen) }
    );
    Ok(())
}

/// `twinguard schemas [NAME]`: the built-in schemas, or one schema's fields.
fn print_schemas(name: Option<String>) -> Result<()> {
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
        AuditCommand::Verify { config, topic, public_key, public_key_file, allow_truncated_start, federation, timeout_secs } => {
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
            if let Some(f) = federation {
                let fed = twinguard::app::federate::FederationFile::load(&f)?;
                let links = twinguard::app::federate::links::verify(&fed, &chains, std::time::Duration::from_secs(timeout_secs))?;
                println!(
                    "federation `{}`: audit chain intact, {} versions published; {} model activations link to them",
                    fed.id, links.published, links.activations
                );
            }
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
                        let feed = twinguard::app::federate::follow::start(&cfg, stop.clone())?;
                        twinguard::engine::run_workers(&cfg, metrics, stop, observer, feed).map(Some)
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
