//! `twinguard demo`: the whole pipeline in one process on an embedded
//! Kafka-protocol broker (librdkafka's mock cluster), fed by the device simulator,
//! with a summary scored against the simulator's ground truth.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::mocking::MockCluster;
use rdkafka::{Message, Offset, TopicPartitionList};
use twinguard_schemas::fields;
use twinguard_schemas::respond::{Ack, AckStatus, Alert, Command, RESPONSE_VERSION};
use twinguard_schemas::verdict::Verdict;

use crate::sql::view::SqlView;
use crate::config::Config;
use crate::tools::sim::{AttackKind, SimConfig, Simulator, Truth};
use crate::obs::Metrics;
use crate::tools::produce;
use crate::{kafka, PipelineError};

/// Most records the demo's producer runs ahead of the pipeline.
const DEMO_WINDOW: usize = 8_000;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub devices: usize,
    pub events: usize,
    pub seed: u64,
    pub partitions: i32,
    /// Model to score with; when None the demo first trains a small one on
    /// simulator data (another seed than the run it then scores).
    pub model: Option<std::path::PathBuf>,
    /// Simulated events to train that model on.
    pub train_events: usize,
}

/// Train a small ensemble on labelled simulator traffic (seed `seed`); returns the
/// model directory.
pub fn train_demo_model(opts: &DemoOptions, seed: u64) -> Result<std::path::PathBuf, PipelineError> {
    use twinguard_train::{self as train, DatasetSpec, SplitKind, SplitSpec, TrainJob, TrainOptions};
    use twinguard_models::{forest::ForestParams, lstm::LstmParams, svm::SvmParams};
    let schema = twinguard_schemas::EventSchema::builtin(crate::config::DEFAULT_SCHEMA)?;
    // The deployment variant: flow, vitals, twin behaviour AND identity drift (a
    // binding or firmware hash the twin never saw for the device).
    let sql = twinguard_schemas::builtin_feature_sql(&schema.id(), Some("identity")).expect("the default schema ships feature SQL");
    let records: Vec<(String, Vec<u8>)> = Simulator::new(SimConfig::new(opts.devices, opts.train_events, seed))
        .filter_map(|r| {
            let label = match r.truth {
                Truth::Normal => twinguard_models::labels::NORMAL,
                Truth::Attack(k) => k.as_str(),
                Truth::Malformed(_) => return None,
            };
            let mut v: serde_json::Value = serde_json::from_slice(&r.payload).ok()?;
            v.as_object_mut()?.insert("label".into(), label.into());
            Some((r.key, serde_json::to_vec(&v).expect("json")))
        })
        .collect();
    let out = std::env::temp_dir().join(format!("twinguard-demo-model-{}", std::process::id()));
    let job = TrainJob {
        dataset: DatasetSpec { file: format!("simulator:seed={seed},events={}", opts.train_events).into(), schema: schema.id(), devices: opts.devices, interval_ms: 0, limit: None, shuffle_seed: None, device_column: None, time_column: None },
        schema,
        feature_sql: sql.to_string(),
        twin: Config::default().state,
        // Stratified: attack episodes are few and bunched in time, a temporal cut
        // could leave the validation rows without any.
        split: SplitSpec { kind: SplitKind::Stratified, train: 0.6, validation: 0.2, seed },
        opts: TrainOptions {
            target_fpr: 0.01,
            seed,
            forest: ForestParams { trees: 30, seed, ..Default::default() },
            // RBF: the demo's vitals tampering is a non-linear pattern a linear
            // machine misses; at demo scale its per-event cost does not matter.
            svm: SvmParams { max_train_rows: 1000, seed, kernel: twinguard_models::svm::Kernel::Rbf { gamma: 0.0 }, ..Default::default() },
            lstm: LstmParams { epochs: 3, seed, ..Default::default() },
            boost: twinguard_models::boost::BoostParams { seed, ..Default::default() },
            flip_labels: 0.0,
            screen: false,
            screen_threshold: 0.2,
            combine: Default::default(),
        },
        out: out.clone(),
    };
    eprintln!("twinguard demo: no --model given; training a small ensemble on {} simulated events (seed {seed})", records.len());
    let (a, r) = train::train_records(&job, &records, "simulator", Instant::now(), &mut |p| match p {
        train::Progress::Step(m) => eprintln!("  {m}"),
        train::Progress::Status(m) => eprint!("\r{m}"),
        train::Progress::StatusEnd => eprintln!(),
    })?;
    if let Some(m) = r.models.get("ensemble") {
        eprintln!(
            "  model {}: on its simulated held-out rows DR {:.3} at FPR {:.4}",
            a.version, m.at_threshold.detection_rate, m.at_threshold.fpr
        );
    }
    Ok(out)
}

/// What the demo measured.
#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub produced: usize,
    pub valid: usize,
    pub malformed: usize,
    pub verdicts: usize,
    pub dlq: usize,
    pub dlq_by_reason: BTreeMap<String, usize>,
    /// What judged the events (the model version, or the twin score alone).
    pub detector: String,
    pub twins: usize,
    pub twin_mem_bytes: usize,
    pub seconds: f64,
    /// Per attack kind: (injected events, flagged anomalous).
    pub attacks: BTreeMap<&'static str, (usize, usize)>,
    /// Normal events judged after warm-up: (count, flagged anomalous).
    pub normal_judged: (usize, usize),
    pub warming_up: usize,
    /// Alerts by the action taken.
    pub alerts_by_action: BTreeMap<String, usize>,
    pub alerts_for_humans: usize,
    pub commands: usize,
    pub acks: usize,
    /// Twins whose desired state equals what the device reports, of those commanded.
    pub reconciled: (usize, usize),
    /// Audit records verified (signature, hash chain), or why verification failed.
    pub audit: Option<Result<u64, String>>,
    /// The riskiest twins, queried with SQL over the live view before the stop.
    pub sql: Option<Result<String, String>>,
}

impl DemoSummary {
    pub fn detection_rate(&self) -> f64 {
        let (n, k) = self.attacks.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        if n == 0 { 0.0 } else { k as f64 / n as f64 }
    }
    pub fn false_positive_rate(&self) -> f64 {
        if self.normal_judged.0 == 0 { 0.0 } else { self.normal_judged.1 as f64 / self.normal_judged.0 as f64 }
    }

    pub fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out, "\n== twinguard demo summary ==")?;
        writeln!(out, "events produced      {:>9}  ({} valid, {} malformed)", self.produced, self.valid, self.malformed)?;
        writeln!(out, "verdicts             {:>9}  (one per valid event: {})", self.verdicts, yes(self.verdicts == self.valid))?;
        writeln!(out, "dead letters         {:>9}  (one per malformed record: {})", self.dlq, yes(self.dlq == self.malformed))?;
        for (reason, n) in &self.dlq_by_reason {
            writeln!(out, "    {reason:<24}{n:>6}")?;
        }
        let per_twin = if self.twins == 0 { 0 } else { self.twin_mem_bytes / self.twins };
        writeln!(out, "device twins         {:>9}  (~{per_twin} bytes each)", self.twins)?;
        writeln!(out, "throughput           {:>9.0}  events/s end to end ({:.1} s)", self.produced as f64 / self.seconds.max(1e-9), self.seconds)?;
        writeln!(out, "injected attacks, flagged by {}:", self.detector)?;
        for (kind, (n, k)) in &self.attacks {
            writeln!(out, "    {kind:<20}{k:>6} / {n:<6} {:>6.1} %", pct(*k, *n))?;
        }
        let (n, k) = self.normal_judged;
        let (n_all, k_all) = self.attacks.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        writeln!(out, "    {:<20}{k_all:>6} / {n_all:<6} {:>6.1} %", "all attacks", pct(k_all, n_all))?;
        writeln!(out, "normal events flagged (false positives): {k} / {n} = {:.2} %  ({} warm-up events not judged)", pct(k, n), self.warming_up)?;
        writeln!(out, "alerts               {:>9}  ({} for a human to decide)", self.alerts_by_action.values().sum::<usize>(), self.alerts_for_humans)?;
        for (action, n) in &self.alerts_by_action {
            writeln!(out, "    {action:<24}{n:>6}")?;
        }
        writeln!(out, "commands issued      {:>9}  ({} acknowledged by the simulated devices)", self.commands, self.acks)?;
        writeln!(out, "desired == reported  {:>9}  of {} commanded twins", self.reconciled.0, self.reconciled.1)?;
        match &self.audit {
            Some(Ok(n)) => writeln!(out, "audit trail          {n:>9}  records, signatures and hash chains verified")?,
            Some(Err(e)) => writeln!(out, "audit trail          FAILED: {e}")?,
            None => {}
        }
        match &self.sql {
            Some(Ok(table)) => writeln!(out, "\nSQL over the live twins ({DEMO_QUERY}):\n{table}")?,
            Some(Err(e)) => writeln!(out, "SQL over the twins   FAILED: {e}")?,
            None => {}
        }
        writeln!(out, "(simulated devices and attacks: this shows the machinery at work, not detection quality on real traffic)")?;
        Ok(())
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

fn pct(k: usize, n: usize) -> f64 {
    if n == 0 { 0.0 } else { 100.0 * k as f64 / n as f64 }
}

/// Reads a topic from the beginning on a background thread, feeding every record to `f`.
fn tail_topic(
    cfg: &Config,
    topic: &str,
    partitions: i32,
    stop: Arc<AtomicBool>,
    mut f: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, PipelineError> {
    let mut c = kafka::base_client(cfg);
    c.set("group.id", "twinguard-demo-reader").set("enable.auto.commit", "false");
    let consumer: BaseConsumer = c.create().map_err(|e| PipelineError::kafka("demo reader", e))?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).map_err(|e| PipelineError::kafka("assign", e))?;
    }
    consumer.assign(&tpl).map_err(|e| PipelineError::kafka("assign", e))?;
    std::thread::Builder::new()
        .name(format!("demo-{topic}"))
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    f(&m);
                }
            }
        })
        .map_err(|e| PipelineError::io("starting a reader thread", e))
}

/// The demo's configuration on the embedded broker `mock` (its topics created),
/// with the model to score with (trained on separate simulated devices unless
/// `--model` names one), and how the detector is described to the user.
fn embedded_config(opts: &DemoOptions, mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>) -> Result<(Config, String), PipelineError> {
    // Defaults plus TWINGUARD__* environment overrides (e.g. librdkafka debug flags).
    let mut cfg = Config::load(None, std::env::vars())?;
    cfg.model.path = Some(match &opts.model {
        Some(p) => p.clone(),
        None => train_demo_model(opts, opts.seed.wrapping_add(1_000_003))?,
    });
    let detector = match cfg.model.path.as_deref().map(twinguard_models::Artifact::load) {
        Some(Ok(a)) => format!("the ensemble (model {})", a.version),
        Some(Err(e)) => return Err(PipelineError::config("--model", e)),
        None => "the twin behaviour score".to_string(),
    };
    cfg.kafka.brokers = mock.bootstrap_servers();
    cfg.kafka.group_id = "twinguard-demo".into();
    cfg.topics.create = false;
    for (t, _) in cfg.topics.all() {
        mock.create_topic(t, opts.partitions, 1).map_err(|e| PipelineError::kafka(&format!("create topic {t}"), e))?;
    }
    Ok((cfg, detector))
}

/// Give the devices' acknowledgements (`acks_sent` of them) a few seconds to come
/// back and reconcile, and the SQL view two refreshes to publish the last changes.
fn settle(metrics: &Metrics, acks_sent: u64, view: &SqlView) {
    let settle = Instant::now() + Duration::from_secs(5);
    while Metrics::get(&metrics.acks_applied) < acks_sent && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(100));
    }
    let generation = view.generation();
    let settle = Instant::now() + Duration::from_secs(5);
    while view.generation() < generation + 2 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run the demo end to end; prints progress to stderr.
pub fn run(opts: &DemoOptions) -> Result<DemoSummary, PipelineError> {
    let mock = MockCluster::new(1).map_err(|e| PipelineError::kafka("start embedded broker", e))?;
    let (mut cfg, detector) = embedded_config(opts, &mock)?;
    eprintln!(
        "twinguard demo: embedded broker at {}, {} devices, {} events, {} partitions",
        cfg.kafka.brokers, opts.devices, opts.events, opts.partitions
    );
    let sim = Simulator::new(SimConfig::new(opts.devices, opts.events, opts.seed));
    let work = scratch_files(&mut cfg, &sim)?;
    let records: Vec<_> = sim.collect();
    let malformed = records.iter().filter(|r| matches!(r.truth, Truth::Malformed(_))).count();
    let valid = records.len() - malformed;

    let stop_readers = Arc::new(AtomicBool::new(false));
    let (seen, readers) = start_readers(&cfg, opts.partitions, &stop_readers)?;
    let Seen { verdicts, dlq_reasons, dlq_seen, alerts, commands_seen, acks_sent } = seen;

    let metrics = Arc::new(Metrics::default());
    let stop = Arc::new(AtomicBool::new(false));
    // The SQL tables `twinguard run` serves with `[sql] listen`, queried in-process here.
    let view = SqlView::new(cfg.sql.recent_rows);
    view.spawn_refresher(Duration::from_millis(cfg.sql.refresh_ms), crate::app::serve::status_fn(crate::app::serve::Mode::Pipeline, metrics.clone()), metrics.clone(), stop.clone())
        .map_err(|e| PipelineError::io("starting the SQL view refresher", e))?;
    let pipeline = {
        let feed = crate::sql::view::ViewFeed::for_config(view.clone(), &cfg)?;
        let (cfg, metrics, stop) = (cfg.clone(), metrics.clone(), stop.clone());
        std::thread::Builder::new()
            .name("tg-core".into())
            .spawn(move || crate::engine::run_with(&cfg, metrics, stop, Some(feed)))
            .map_err(|e| PipelineError::io("starting the pipeline thread", e))?
    };

    let started = Instant::now();
    let progress = |produced: usize, m: &Metrics, v: usize| {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        eprint!(
            "\r  produced {produced:>8}/{}  verdicts {v:>8}  dlq {:>5}  twins {:>5}  anomalies {:>6}  {:>7.0} events/s   ",
            records.len(),
            Metrics::get(&m.dlq_out),
            m.twins.load(Ordering::Relaxed),
            Metrics::get(&m.anomalies),
            Metrics::get(&m.records_in) as f64 / secs
        );
    };
    let mut last = Instant::now();
    let coords = produce::produce_all(
        &cfg,
        &cfg.topics.input,
        records.iter().map(|r| (r.key.clone(), r.payload.clone())),
        None,
        |sent, _| {
            // Flow control: the embedded broker keeps only ~5 MB per partition (older
            // records are dropped), so never run more than DEMO_WINDOW records ahead of
            // the pipeline.
            while sent.saturating_sub(Metrics::get(&metrics.records_in) as usize) > DEMO_WINDOW && !pipeline.is_finished() {
                std::thread::sleep(Duration::from_millis(10));
            }
            if last.elapsed() > Duration::from_millis(250) {
                last = Instant::now();
                progress(sent, &metrics, verdicts.lock().expect("lock").len());
            }
        },
    )?;
    // Wait until every valid event has its verdict and every bad record its dead letter.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let v = verdicts.lock().expect("lock").len();
        let d = dlq_seen.load(Ordering::Relaxed) as usize;
        progress(records.len(), &metrics, v);
        if v >= valid && d >= malformed {
            break;
        }
        if pipeline.is_finished() || Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!();
    settle(&metrics, acks_sent.load(Ordering::Relaxed), &view);
    // Ask the view what psql would.
    let sql = Some(query_view(&view, DEMO_QUERY));
    stop.store(true, Ordering::Relaxed);
    let report = pipeline.join().map_err(|_| PipelineError::Internal("the demo's pipeline thread panicked".into()))??;
    stop_readers.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.join();
    }

    let verdicts = verdicts.lock().expect("lock").clone();
    let mut s = DemoSummary {
        produced: records.len(),
        valid,
        malformed,
        verdicts: verdicts.len(),
        dlq: dlq_seen.load(Ordering::Relaxed) as usize,
        dlq_by_reason: dlq_reasons.lock().expect("lock").clone(),
        detector,
        twins: report.twins,
        twin_mem_bytes: report.twin_mem_bytes,
        seconds,
        commands: commands_seen.load(Ordering::Relaxed) as usize,
        acks: Metrics::get(&metrics.acks_applied) as usize,
        reconciled: report.reconciled,
        sql,
        ..Default::default()
    };
    for (action, human) in alerts.lock().expect("lock").iter() {
        *s.alerts_by_action.entry(action.clone()).or_default() += 1;
        s.alerts_for_humans += usize::from(*human);
    }
    s.audit = Some(verify_audit(&cfg));
    let _ = std::fs::remove_dir_all(&work);
    tally_truth(&mut s, &records, &coords, &verdicts);
    drop(mock);
    Ok(s)
}

/// The hospital's registry (the simulator's devices) and an audit signing key, in a
/// scratch directory that `cfg` now names; returns the directory.
fn scratch_files(cfg: &mut Config, sim: &Simulator) -> Result<std::path::PathBuf, PipelineError> {
    let work = std::env::temp_dir().join(format!("twinguard-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| PipelineError::io(format!("creating {}", work.display()), e))?;
    let registry: Vec<String> = sim
        .registry()
        .iter()
        .map(|e| toml::to_string(&std::collections::BTreeMap::from([("device", vec![e])])).expect("registry entry serialises"))
        .collect();
    std::fs::write(work.join("registry.toml"), registry.concat()).map_err(|e| PipelineError::io("writing the demo registry", e))?;
    let seed: [u8; 32] = rand::random();
    std::fs::write(work.join("audit.key"), twinguard_operators::audit::hex(&seed))
        .map_err(|e| PipelineError::io("writing the demo audit key", e))?;
    cfg.registry.file = Some(work.join("registry.toml"));
    // The demo pushes events as fast as the pipeline takes them, so input → command
    // includes seconds of queueing: the response-time gate would suspend automation
    // (benches/RESULTS.md measures response time at a sustainable rate instead).
    cfg.gating.max_response_ms = 60_000.0;
    cfg.audit.signing_key_file = Some(work.join("audit.key"));
    Ok(work)
}

/// What the demo's readers saw on the output topics.
struct Seen {
    verdicts: Arc<Mutex<HashMap<(i32, i64), (bool, bool)>>>,
    dlq_reasons: Arc<Mutex<BTreeMap<String, usize>>>,
    dlq_seen: Arc<AtomicU64>,
    alerts: Arc<Mutex<Vec<(String, bool)>>>,
    commands_seen: Arc<AtomicU64>,
    acks_sent: Arc<AtomicU64>,
}

/// The readers of verdicts, dead letters and alerts, and the devices' management
/// agents (they carry out every command and acknowledge it), until `stop`.
fn start_readers(cfg: &Config, partitions: i32, stop: &Arc<AtomicBool>) -> Result<(Seen, [std::thread::JoinHandle<()>; 4]), PipelineError> {
    let verdicts: Arc<Mutex<HashMap<(i32, i64), (bool, bool)>>> = Arc::default();
    let dlq_reasons: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let dlq_seen = Arc::new(AtomicU64::new(0));
    let alerts: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let (commands_seen, acks_sent) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readers = {
        let v = verdicts.clone();
        let r1 = tail_topic(cfg, &cfg.topics.verdicts, partitions, stop.clone(), move |m| {
            if let Some(Ok(verdict)) = m.payload().map(serde_json::from_slice::<Verdict>) {
                v.lock().expect("lock").insert((verdict.source.partition, verdict.source.offset), (verdict.anomalous, verdict.warming_up));
            }
        })?;
        let (d, n) = (dlq_reasons.clone(), dlq_seen.clone());
        let r2 = tail_topic(cfg, &cfg.topics.dlq, partitions, stop.clone(), move |m| {
            let code = m
                .headers()
                .and_then(|h| h.iter().find(|x| x.key == fields::DLQ_CODE).and_then(|x| x.value.map(|v| String::from_utf8_lossy(v).into_owned())))
                .unwrap_or_else(|| "?".into());
            *d.lock().expect("lock").entry(code).or_default() += 1;
            n.fetch_add(1, Ordering::Relaxed);
        })?;
        // The devices' management agents: carry out every command and acknowledge it.
        let acker = {
            let producer: rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
                kafka::producer_config(cfg).create().map_err(|e| PipelineError::kafka("device agent", e))?;
            let (acks_topic, n) = (cfg.topics.acks.clone(), acks_sent.clone());
            let c = commands_seen.clone();
            tail_topic(cfg, &cfg.topics.commands, partitions, stop.clone(), move |m| {
                let Some(Ok(cmd)) = m.payload().map(serde_json::from_slice::<Command>) else { return };
                c.fetch_add(1, Ordering::Relaxed);
                let ack = Ack { v: RESPONSE_VERSION, command_id: cmd.command_id, device_id: cmd.device_id.clone(), status: AckStatus::Applied, reported: cmd.desired, mac: None };
                let body = serde_json::to_vec(&ack).expect("ack serialises");
                let rec = rdkafka::producer::BaseRecord::to(&acks_topic).key(cmd.device_id.as_bytes()).payload(&body);
                if producer.send(rec).is_ok() {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            })?
        };
        let a = alerts.clone();
        let r3 = tail_topic(cfg, &cfg.topics.alerts, partitions, stop.clone(), move |m| {
            if let Some(Ok(alert)) = m.payload().map(serde_json::from_slice::<Alert>) {
                a.lock().expect("lock").push((alert.response.action.as_str().to_string(), alert.response.needs_human));
            }
        })?;
        [r1, r2, r3, acker]
    };

    Ok((Seen { verdicts, dlq_reasons, dlq_seen, alerts, commands_seen, acks_sent }, readers))
}

/// Per attack kind: events seen and flagged; normal events judged and flagged (and
/// those still warming up).
fn tally_truth(s: &mut DemoSummary, records: &[crate::tools::sim::SimRecord], coords: &[(i32, i64)], verdicts: &HashMap<(i32, i64), (bool, bool)>) {
    for k in AttackKind::ALL {
        s.attacks.insert(k.as_str(), (0, 0));
    }
    for (r, c) in records.iter().zip(coords) {
        let Some(&(anomalous, warming)) = verdicts.get(c) else { continue };
        match r.truth {
            Truth::Attack(k) => {
                let e = s.attacks.entry(k.as_str()).or_default();
                e.0 += 1;
                e.1 += usize::from(anomalous);
            }
            Truth::Normal if warming => s.warming_up += 1,
            Truth::Normal => {
                s.normal_judged.0 += 1;
                s.normal_judged.1 += usize::from(anomalous);
            }
            Truth::Malformed(_) => {}
        }
    }
}

/// What the demo asks the SQL view at the end.
const DEMO_QUERY: &str = "select device_id, device_type, criticality, events, anomalies, round(risk, 3) as risk, class, in_sync from twins order by anomalies desc, device_id limit 5";

/// Run one query over the view through DataFusion (as the SQL endpoint does) and
/// format the result as a table.
fn query_view(view: &Arc<SqlView>, sql: &str) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let ctx = crate::sql::server::session_context(view, 256 << 20).map_err(|e| e.to_string())?;
    let batches = rt.block_on(async { ctx.sql(sql).await?.collect().await }).map_err(|e| e.to_string())?;
    datafusion::arrow::util::pretty::pretty_format_batches(&batches).map(|t| t.to_string()).map_err(|e| e.to_string())
}

/// Verify the demo's audit trail the way `twinguard audit verify` does.
fn verify_audit(cfg: &Config) -> Result<u64, String> {
    let log = crate::engine::build::audit_log(&cfg).map_err(|e| e.to_string())?.ok_or("no audit key")?;
    let key = twinguard_operators::audit::parse_key_hex(&log.public_key_hex()).and_then(twinguard_operators::audit::verifying_key)?;
    let chains = kafka::read_all(cfg, &cfg.topics.audit, Duration::from_secs(60)).map_err(|e| e.to_string())?;
    let mut n = 0;
    for (p, recs) in &chains {
        n += twinguard_operators::audit::verify_chain(*p, recs, &key, false).map_err(|f| f.to_string())?.records;
    }
    Ok(n)
}
