//! Test and benchmark support: a real Kafka-compatible broker process (tansu) on a
//! free port. Used by the integration tests and the end-to-end bench; not by the
//! pipeline itself.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::Config;
use crate::kafka;

fn tansu_binary() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return p.into();
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':').map(PathBuf::from).chain(dirs_home_cargo()) {
        let p = dir.join("tansu");
        if p.is_file() {
            return p;
        }
    }
    panic!("the tansu broker is not installed: run scripts/test.sh (it installs tansu 0.6.0), or set TANSU_BIN");
}

fn dirs_home_cargo() -> Option<PathBuf> {
    std::env::var("HOME").ok().map(|h| Path::new(&h).join(".cargo/bin"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A tansu broker process with in-memory storage, killed on drop.
pub struct Broker {
    child: Child,
    pub bootstrap: String,
}

impl Broker {
    /// The broker's process id (fault tests pause it with SIGSTOP).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Start tansu (memory storage) on a free 127.0.0.1 port; its output goes to
    /// `dir/tansu.log`. Returns once it answers a metadata request.
    pub fn start(dir: &Path) -> Broker {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("tansu.log")).unwrap();
        let child = Command::new(tansu_binary())
            .env("RUST_LOG", std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".into()))
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", "memory://tansu/"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        let b = Broker { child, bootstrap: format!("127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(30);
        let cfg = b.config("probe");
        loop {
            let c: BaseConsumer = kafka::base_client(&cfg).create().unwrap();
            if c.fetch_metadata(None, Duration::from_secs(2)).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "tansu did not answer on {}", b.bootstrap);
            std::thread::sleep(Duration::from_millis(100));
        }
        b
    }

    /// A pipeline configuration for this broker with topics prefixed by `name`.
    pub fn config(&self, name: &str) -> Config {
        let mut c = Config::default();
        c.kafka.brokers = self.bootstrap.clone();
        c.kafka.group_id = format!("{name}-group");
        c.kafka.consumer.insert("session.timeout.ms".into(), "6000".into());
        c.topics.input = format!("{name}.telemetry");
        c.topics.verdicts = format!("{name}.verdicts");
        c.topics.dlq = format!("{name}.dlq");
        c.topics.changelog = format!("{name}.changelog");
        c.topics.alerts = format!("{name}.alerts");
        c.topics.commands = format!("{name}.commands");
        c.topics.acks = format!("{name}.acks");
        c.topics.feedback = format!("{name}.feedback");
        c.topics.audit = format!("{name}.audit");
        c.topics.partitions = 4;
        // One stream worker unless a test asks for more: the tests' expectations of
        // which member owns what are per worker.
        c.engine.workers = Some(1);
        c.batch.max_records = 200;
        c.batch.max_linger_ms = 10;
        // Tests run side by side: any free port (the log line names it).
        c.http.listen = "127.0.0.1:0".into();
        c
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The default schema's twins after `devices` simulated devices sent `events`
/// well-formed events (seed `seed`), all on partition 0 at offsets 0, 1, ...: a
/// real twin operator for tests of what is built from twins (the SQL view, the
/// fleet reader). A record the decoder rejects fails the test.
pub fn simulated_twins(devices: usize, events: usize, seed: u64) -> (twinguard_schemas::EventSchema, twinguard_operators::TwinOperator) {
    use twinguard_schemas::{DecodeLimits, Decoder, EventSchema, RawRecord};
    let schema = EventSchema::builtin(crate::config::DEFAULT_SCHEMA).expect("the default schema");
    let mut sc = crate::tools::sim::SimConfig::new(devices, events, seed);
    sc.malformed_rate = 0.0;
    let sim: Vec<_> = crate::tools::sim::Simulator::new(sc).collect();
    let raw: Vec<RawRecord<'_>> =
        sim.iter().enumerate().map(|(i, r)| RawRecord { partition: 0, offset: i as i64, key: Some(r.key.as_bytes()), payload: Some(&r.payload) }).collect();
    let decoded = Decoder::new(schema.clone(), DecodeLimits::default()).decode(&raw, chrono::Utc::now().timestamp_millis()).expect("decodes");
    assert!(decoded.rejects.is_empty(), "{:?}", decoded.rejects);
    let mut op = twinguard_operators::TwinOperator::new(&schema, twinguard_operators::TwinConfig::default());
    op.process_batch(decoded.batch).expect("the twins take the events");
    (schema, op)
}
