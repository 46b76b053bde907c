//! Test harness: a real broker process (tansu), pipeline processes, topic readers,
//! and the offline reference the pipeline's twins must match.
//!
//! Waiting is always for a condition (a port answering, a record count, a log line)
//! with a deadline; never a bare sleep standing in for synchronisation.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use twinguard::config::Config;
pub use twinguard::tools::testkit::Broker;
use twinguard::kafka::{self, NewTopicSpec};
use twinguard::tools::sim::{SimConfig, SimRecord, Simulator};
use twinguard_operators::{TwinConfig, TwinOperator};
use twinguard_schemas::{DecodeLimits, Decoder, EventSchema, RawRecord};

/// How long any single wait may take before the test fails (generous: the machine
/// is shared and debug builds are slow).
pub const WAIT: Duration = Duration::from_secs(180);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A directory for one test's files (configs, logs); kept for post-mortems.
pub fn scratch(name: &str) -> PathBuf {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("twinguard-it-{}-{name}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One test's world: a scratch directory, its own broker, and a pipeline
/// configuration (topics prefixed by the test's name) whose topics exist.
pub struct Setup {
    pub dir: PathBuf,
    pub broker: Broker,
    pub cfg: Config,
}

impl Setup {
    pub fn new(name: &str) -> Setup {
        let dir = scratch(name);
        let broker = Broker::start(&dir);
        let cfg = broker.config(name);
        create_topics(&cfg);
        Setup { dir, broker, cfg }
    }
}

/// Create the pipeline's topics (all partitioned like the input; changelog compacted).
pub fn create_topics(cfg: &Config) {
    let n = cfg.topics.partitions;
    let specs: Vec<NewTopicSpec> = cfg
        .topics
        .all()
    .into_iter()
    .map(|(t, compact)| NewTopicSpec { name: t.clone(), partitions: n, compact })
    .collect();
    kafka::create_topics(cfg, &specs).unwrap();
}

/// Write `cfg` as a TOML file the `twinguard` binary can read.
pub fn write_config(dir: &Path, name: &str, cfg: &Config) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, toml::to_string(cfg).unwrap()).unwrap();
    p
}

/// A `twinguard run` process.
pub struct PipelineProc {
    pub child: Option<Child>,
    pub log: PathBuf,
    /// Log lines already consumed by [`wait_log`](Self::wait_log).
    cursor: usize,
}

impl PipelineProc {
    pub fn start(dir: &Path, name: &str, config: &Path) -> PipelineProc {
        Self::spawn(dir, name, &["run", "--config", config.to_str().unwrap()], &[])
    }

    /// Any long-running `twinguard` command (e.g. `sql`), logging to `<name>.log`.
    pub fn spawn(dir: &Path, name: &str, args: &[&str], envs: &[(&str, &str)]) -> PipelineProc {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        // TWINGUARD_IT_BIN runs the tests against another build (e.g. an older one,
        // to show a new test failing there).
        let bin = std::env::var_os("TWINGUARD_IT_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_twinguard").into());
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", std::env::var("TWINGUARD_IT_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("start twinguard");
        PipelineProc { child: Some(child), log, cursor: 0 }
    }

    /// The address a listener logged (`<needle> ... addr=host:port`), e.g. the
    /// `/metrics` or SQL endpoint bound to port 0.
    pub fn wait_addr(&mut self, needle: &str) -> String {
        let line = self.wait_log(&[needle, "addr="]);
        let rest = &line[line.find("addr=").unwrap() + 5..];
        rest.split_whitespace().next().unwrap().to_string()
    }

    /// SIGKILL: no chance to flush or commit.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let ok = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap().success();
            assert!(ok, "could not signal the pipeline");
            let deadline = Instant::now() + WAIT;
            loop {
                if let Some(status) = c.try_wait().unwrap() {
                    assert!(status.success(), "pipeline exited with {status}; log: {}", self.log_text());
                    return;
                }
                assert!(Instant::now() < deadline, "pipeline did not stop; log: {}", self.log_text());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Wait for the process to exit on its own; its exit status.
    pub fn wait_exit(&mut self, wait: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + wait;
        let c = self.child.as_mut().expect("process running");
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(Instant::now() < deadline, "process did not exit; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for the next log line (after the ones already returned) containing every
    /// needle; returns it.
    pub fn wait_log(&mut self, needles: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.log_text();
            let found = text.lines().enumerate().skip(self.cursor).find(|(_, l)| needles.iter().all(|n| l.contains(n)));
            if let Some((i, line)) = found {
                self.cursor = i + 1;
                return line.to_string();
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait().unwrap() {
                    panic!("pipeline exited ({st}) while waiting for {needles:?}; log:\n{}", self.log_text());
                }
            }
            assert!(Instant::now() < deadline, "no log line with {needles:?}; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PipelineProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads a topic from the beginning (all partitions).
pub struct Reader {
    consumer: BaseConsumer,
    topic: String,
    pub records: Vec<OwnedMessage>,
    /// Per partition: the next offset to read, and since when it has not moved.
    progress: HashMap<i32, (i64, Instant)>,
    last_check: Instant,
}

/// A partition the broker serves nothing of, below its high watermark, for this long
/// is stepped past one offset (see [`Reader::try_until`]).
const STALL: Duration = Duration::from_secs(20);

impl Reader {
    pub fn new(cfg: &Config, topic: &str) -> Reader {
        let n = kafka::partition_count(cfg, topic).unwrap().unwrap_or_else(|| panic!("topic {topic} missing"));
        let mut c = kafka::base_client(cfg);
        c.set("group.id", "it-reader").set("enable.auto.commit", "false").set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer = c.create().unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..n as i32 {
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        Reader { consumer, topic: topic.to_string(), records: Vec::new(), progress: HashMap::new(), last_check: Instant::now() }
    }

    /// tansu 0.6 was seen (after a SIGKILLed producer, rarely) to serve nothing from
    /// an offset below a partition's high watermark, forever. A partition stuck like
    /// that for [`STALL`] is stepped past one offset, loudly. This cannot make a test
    /// pass wrongly: a record really at that offset would then be missing and the
    /// test's completeness checks fail.
    fn unstick(&mut self) {
        if self.last_check.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.last_check = Instant::now();
        let mut next: HashMap<i32, i64> = HashMap::new();
        for r in &self.records {
            let e = next.entry(r.partition()).or_insert(0);
            *e = (*e).max(r.offset() + 1);
        }
        let parts: Vec<i32> = self.consumer.assignment().unwrap().elements().iter().map(|e| e.partition()).collect();
        for p in parts {
            let at = self.consumer.position().ok().and_then(|tpl| {
                tpl.find_partition(&self.topic, p).and_then(|e| if let Offset::Offset(o) = e.offset() { Some(o) } else { None })
            });
            let n = at.unwrap_or(0).max(next.get(&p).copied().unwrap_or(0));
            let entry = self.progress.entry(p).or_insert((n, Instant::now()));
            if entry.0 != n {
                *entry = (n, Instant::now());
                continue;
            }
            if entry.1.elapsed() < STALL {
                continue;
            }
            let Ok((_, high)) = self.consumer.fetch_watermarks(&self.topic, p, Duration::from_secs(10)) else { continue };
            if high > n {
                eprintln!("reader: broker served nothing of {}[{p}] at offset {n} (high watermark {high}) for {STALL:?}: stepping past it", self.topic);
                if self.consumer.seek(&self.topic, p, Offset::Offset(n + 1), Duration::from_secs(10)).is_ok() {
                    *entry = (n + 1, Instant::now());
                }
            }
        }
    }

    /// Poll until `done(records)` holds; panics after [`WAIT`].
    pub fn until(&mut self, what: &str, done: impl FnMut(&[OwnedMessage]) -> bool) {
        assert!(self.try_until(WAIT, done), "timed out waiting for {what} ({} records read)", self.records.len());
    }

    /// Poll until `done(records)` holds (true) or `wait` passes (false). The condition
    /// is evaluated once per drained burst of records, not per record.
    pub fn try_until(&mut self, wait: Duration, mut done: impl FnMut(&[OwnedMessage]) -> bool) -> bool {
        let deadline = Instant::now() + wait;
        while !done(&self.records) {
            if Instant::now() > deadline {
                return false;
            }
            self.unstick();
            let mut timeout = Duration::from_millis(100);
            for _ in 0..10_000 {
                match self.consumer.poll(timeout) {
                    Some(Ok(r)) => self.records.push(r.detach()),
                    Some(Err(e)) => eprintln!("reader: {e}"),
                    None => break,
                }
                timeout = Duration::ZERO;
            }
        }
        true
    }

    /// Read everything up to the current end of every partition.
    pub fn drain_to_end(&mut self, cfg: &Config, topic: &str) {
        let n = kafka::partition_count(cfg, topic).unwrap().unwrap();
        let mut ends = HashMap::new();
        for p in 0..n as i32 {
            ends.insert(p, self.consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1);
        }
        self.until("the end of the topic", |recs| {
            ends.iter().all(|(p, hi)| *hi == 0 || recs.iter().any(|r| r.partition() == *p && r.offset() + 1 >= *hi))
        });
    }
}

/// A simulator configuration whose events start two days ago on a whole hour (the
/// same bytes for the whole of a test run, and inside the decoder's time bounds).
pub fn sim_config(devices: usize, events: usize, seed: u64) -> SimConfig {
    let mut sc = SimConfig::new(devices, events, seed);
    sc.start_ms = chrono::Utc::now().timestamp_millis() / 3_600_000 * 3_600_000 - 2 * 86_400_000;
    sc
}

/// Simulated records with a fixed start time (same bytes every run).
pub fn sim_records(devices: usize, events: usize, seed: u64, malformed_rate: f64) -> Vec<SimRecord> {
    let mut sc = sim_config(devices, events, seed);
    sc.malformed_rate = malformed_rate;
    Simulator::new(sc).collect()
}

/// Produce test input one record per broker batch.
///
/// tansu 0.6 serves a fetch that starts inside a stored batch from the *next*
/// batch, so the rest of that batch is never delivered (its memory engine keeps only
/// batches whose base offset is at or past the fetch offset: `tansu-storage`
/// `dynostore.rs`, `fetch`). A pipeline that resumes at a committed offset inside a
/// batch, after a crash, a restart or a handover, would lose those records at the
/// broker. A Kafka broker returns the whole batch and the client skips ahead. With
/// one record per batch every offset starts a batch, so the tests measure the
/// pipeline, not this broker fault. The pipeline reports such a gap when it meets
/// one (`e2e::a_resume_gap_at_the_broker_is_reported_with_the_records_skipped`).
pub fn produce(cfg: &Config, recs: &[SimRecord]) -> Vec<(i32, i64)> {
    let mut one = cfg.clone();
    one.kafka.producer.insert("batch.num.messages".into(), "1".into());
    produce_batched(&one, recs)
}

/// Produce test input in batches as large as the producer makes them.
pub fn produce_batched(cfg: &Config, recs: &[SimRecord]) -> Vec<(i32, i64)> {
    twinguard::tools::produce::produce_all(cfg, &cfg.topics.input, recs.iter().map(|r| (r.key.clone(), r.payload.clone())), None, |_, _| {}).unwrap()
}

/// Commit `offset` of input partition `partition` for `cfg`'s group.
pub fn commit_input_offset(cfg: &Config, partition: i32, offset: i64) {
    use rdkafka::consumer::CommitMode;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&cfg.topics.input, partition, Offset::Offset(offset)).unwrap();
    let mut c = kafka::base_client(cfg);
    c.set("group.id", &cfg.kafka.group_id).set("enable.auto.commit", "false");
    let consumer: BaseConsumer = c.create().unwrap();
    consumer.commit(&tpl, CommitMode::Sync).unwrap();
}

/// The twins an uninterrupted, offline run over the same records produces, as
/// changelog bytes per device.
pub fn reference_twins(cfg: &Config, recs: &[SimRecord], coords: &[(i32, i64)]) -> BTreeMap<String, Vec<u8>> {
    let schema: EventSchema = cfg.event_schema().unwrap();
    let dec = Decoder::new(schema.clone(), DecodeLimits::default());
    let mut op = TwinOperator::new(&schema, TwinConfig::default());
    let mut order: Vec<usize> = (0..recs.len()).collect();
    order.sort_by_key(|&i| coords[i]);
    let raw: Vec<RawRecord<'_>> = order
        .iter()
        .map(|&i| RawRecord { partition: coords[i].0, offset: coords[i].1, key: Some(recs[i].key.as_bytes()), payload: Some(&recs[i].payload) })
        .collect();
    let out = dec.decode(&raw, chrono::Utc::now().timestamp_millis()).unwrap();
    let verdicts = op.process_batch(out.batch).unwrap();
    // The pipeline notes each verdict's score on its twin (latest score, risk).
    for b in [verdicts] {
        for v in twinguard_schemas::verdict::verdicts_from_batch(&b, &cfg.topics.input) {
            op.note_verdict(v.source.partition, &v.device_id, v.score, v.attack_class.as_deref());
        }
    }
    op.store().iter().map(|t| (t.device_id.to_string(), t.encode())).collect()
}

/// Latest changelog value per key.
pub fn changelog_twins(cfg: &Config) -> BTreeMap<String, Vec<u8>> {
    let mut r = Reader::new(cfg, &cfg.topics.changelog);
    r.drain_to_end(cfg, &cfg.topics.changelog);
    let mut m = BTreeMap::new();
    for rec in &r.records {
        let k = String::from_utf8(rec.key().unwrap().to_vec()).unwrap();
        if let Some(v) = rec.payload() {
            let twin: serde_json::Value = serde_json::from_slice(v).unwrap();
            assert_eq!(twin["partition"], rec.partition(), "changelog record of {k} at {}/{} sits in the wrong partition", rec.partition(), rec.offset());
        }
        match rec.payload() {
            Some(v) => m.insert(k, v.to_vec()),
            None => m.remove(&k),
        };
    }
    m
}

/// `(partition, offset)` → verdict payloads seen for it.
pub fn verdicts_by_coords(recs: &[OwnedMessage]) -> HashMap<(i32, i64), Vec<(Vec<u8>, Vec<u8>)>> {
    let mut m: HashMap<(i32, i64), Vec<(Vec<u8>, Vec<u8>)>> = HashMap::new();
    for r in recs {
        let v: twinguard_schemas::verdict::Verdict = serde_json::from_slice(r.payload().unwrap()).unwrap();
        m.entry((v.source.partition, v.source.offset)).or_default().push((r.key().unwrap().to_vec(), r.payload().unwrap().to_vec()));
    }
    m
}

pub fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Commit, for `to`'s group, the input offsets `from`'s group has committed.
pub fn copy_committed_offsets(from: &Config, to: &Config) -> usize {
    use rdkafka::consumer::CommitMode;
    let n = kafka::partition_count(from, &from.topics.input).unwrap().unwrap() as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..n {
        tpl.add_partition(&from.topics.input, p);
    }
    let mut c = kafka::base_client(from);
    c.set("group.id", &from.kafka.group_id).set("enable.auto.commit", "false");
    let old: BaseConsumer = c.create().unwrap();
    let committed = old.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let mut keep = TopicPartitionList::new();
    for e in committed.elements() {
        if let Offset::Offset(o) = e.offset() {
            keep.add_partition_offset(e.topic(), e.partition(), Offset::Offset(o)).unwrap();
        }
    }
    let mut c = kafka::base_client(to);
    c.set("group.id", &to.kafka.group_id).set("enable.auto.commit", "false");
    let new: BaseConsumer = c.create().unwrap();
    if keep.count() > 0 {
        new.commit(&keep, CommitMode::Sync).unwrap();
    }
    keep.count()
}

/// Compare twins (changelog bytes per device); on mismatch, name every differing
/// device with its partition, event counts and last offsets.
/// Twins equal byte for byte, apart from their response state: that holds
/// processing-time values (command issue and expiry times) and depends on the
/// confidence gate, so a replay may differ there by design (ARCHITECTURE.md). The
/// offline reference has none.
pub fn assert_twins_equal(expected: &BTreeMap<String, Vec<u8>>, got: &BTreeMap<String, Vec<u8>>) {
    let strip = |m: &BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
        m.iter()
            .map(|(k, b)| {
                let mut t = twinguard_operators::Twin::decode(k, b).unwrap();
                t.response = None;
                (k.clone(), t.encode())
            })
            .collect()
    };
    let (expected, got) = (&strip(expected), &strip(got));
    let summary = |b: &[u8]| {
        let v: serde_json::Value = serde_json::from_slice(b).unwrap();
        format!("partition {} events {} last_offset {}", v["partition"], v["events"], v["last_offset"])
    };
    let mut diffs = Vec::new();
    for (k, v) in expected {
        match got.get(k) {
            None => diffs.push(format!("{k}: missing (expected {})", summary(v))),
            Some(g) if g != v => diffs.push(format!("{k}: got {} / expected {}", summary(g), summary(v))),
            Some(_) => {}
        }
    }
    for k in got.keys().filter(|k| !expected.contains_key(*k)) {
        diffs.push(format!("{k}: unexpected twin"));
    }
    assert!(diffs.is_empty(), "{} of {} twins differ from the uninterrupted reference:\n{}", diffs.len(), expected.len(), diffs.join("\n"));
}
