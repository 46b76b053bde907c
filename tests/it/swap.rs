//! Hot swap: pipelines follow a federation's model topic. Two pipelines read the
//! same events on two brokers: one runs undisturbed, the other is SIGKILLed right
//! after it made a new version's activation durable, and restarted. Every event
//! then has exactly the undisturbed run's verdict (model version and LSTM state
//! included); the audit chains link each activation to a version the federation
//! published; a forged artifact is refused; a rollback switches back.

use std::path::{Path, PathBuf};
use std::process::Command;

use ed25519_dalek::SigningKey;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use twinguard::config::Config;
use twinguard_schemas::verdict::Verdict;

use crate::harness::*;

const ROWS: usize = 1500;
const HALF: usize = 600;
const UNTIL_ROLLBACK: usize = 1200;

fn twinguard(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_twinguard")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "twinguard {args:?} failed:\n{text}");
    text
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A key file for `seed` and its public key.
fn key(dir: &Path, name: &str, seed: u8) -> (String, String) {
    let path = dir.join(format!("{name}.key"));
    std::fs::write(&path, hex(&[seed; 32])).unwrap();
    (path.to_str().unwrap().to_string(), hex(SigningKey::from_bytes(&[seed; 32]).verifying_key().as_bytes()))
}

/// Rows `range` of the lab CSV as a CSV of their own.
fn rows(lab: &Path, range: std::ops::Range<usize>, out: PathBuf) -> PathBuf {
    let text = std::fs::read_to_string(lab).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let body: Vec<&str> = lines.skip(range.start).take(range.len()).collect();
    std::fs::write(&out, format!("{header}\n{}\n", body.join("\n"))).unwrap();
    out
}

fn replay(config: &Path, csv: &Path) {
    twinguard(&["replay", "--device-column", "device", "--time-column", "ts", "--config", config.to_str().unwrap(), "--file", csv.to_str().unwrap()]);
}

/// Verdicts by source coordinates (every copy of each).
fn verdicts(r: &Reader) -> std::collections::HashMap<(i32, i64), Vec<Vec<u8>>> {
    verdicts_by_coords(&r.records).into_iter().map(|(c, v)| (c, v.into_iter().map(|(_, p)| p).collect())).collect()
}

fn version_of(payload: &[u8]) -> String {
    serde_json::from_slice::<Verdict>(payload).unwrap().model_version.unwrap_or_default()
}

#[test]
fn a_kill_during_a_model_activation_changes_no_verdict_and_the_audit_links_hold() {
    let Setup { dir, broker, cfg: base } = Setup::new("swap");
    // The undisturbed reference: same topic names, its own broker.
    let ref_dir = dir.join("reference");
    std::fs::create_dir_all(&ref_dir).unwrap();
    let ref_broker = Broker::start(&ref_dir);
    let start = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let lab = twinguard_train::testkit::write_lab_dataset(&dir.join("lab"), ROWS, start).unwrap();
    let (schema, sql, csv) = (lab.schema.to_str().unwrap(), lab.features.to_str().unwrap(), lab.csv.to_str().unwrap());
    let train = |name: &str, seed: &str| {
        let out = dir.join(name);
        twinguard(&[
            "train", "--schema", schema, "--features", sql, "--dataset", csv, "--device-column", "device", "--time-column", "ts", "--trees", "10",
            "--svm-rows", "300", "--lstm-epochs", "1", "--lstm-hidden", "8", "--seed", seed, "--out", out.to_str().unwrap(),
        ]);
        (out, twinguard_models::Artifact::load(&dir.join(name)).unwrap().version)
    };
    let (m1, v1) = train("v1", "1");
    let (m2, v2) = train("v2", "2");
    assert_ne!(v1, v2);

    let (agg_key, agg_pub) = key(&dir, "aggregator", 1);
    let (_, site_a) = key(&dir, "site-a", 2);
    let (_, site_b) = key(&dir, "site-b", 3);
    let fed = dir.join("fed.toml");
    std::fs::write(
        &fed,
        format!(
            "id = \"swap\"\nbrokers = \"{}\"\ntopic_prefix = \"it-swap\"\naggregator_key = \"{agg_pub}\"\n[[sites]]\nname = \"a\"\npublic_key = \"{site_a}\"\n[[sites]]\nname = \"b\"\npublic_key = \"{site_b}\"\n",
            broker.bootstrap
        ),
    )
    .unwrap();
    let (fed_s, m1_s, m2_s) = (fed.to_str().unwrap(), m1.to_str().unwrap(), m2.to_str().unwrap());
    let (audit_key, audit_pub) = key(&dir, "audit", 4);
    let world = |cfg: &Config| {
        let mut c = cfg.clone();
        c.schema.name = None;
        c.schema.file = Some(lab.schema.clone());
        c.model.follow = Some(fed.clone());
        c.batch.max_records = 50;
        c.audit.signing_key_file = Some(PathBuf::from(&audit_key));
        c
    };
    let cfg = world(&base);
    let ref_cfg = world(&ref_broker.config("swap"));
    create_topics(&ref_cfg);
    let (path, ref_path) = (write_config(&dir, "pipeline", &cfg), write_config(&ref_dir, "pipeline", &ref_cfg));
    let parts = [rows(&lab.csv, 0..HALF, dir.join("a.csv")), rows(&lab.csv, HALF..UNTIL_ROLLBACK, dir.join("b.csv")), rows(&lab.csv, UNTIL_ROLLBACK..ROWS, dir.join("c.csv"))];
    let mut out = Reader::new(&cfg, &cfg.topics.verdicts);
    let mut reference = Reader::new(&ref_cfg, &ref_cfg.topics.verdicts);

    // v1 is published before the first run: both pipelines score the first part with it.
    assert!(twinguard(&["federate", "publish", "--config", fed_s, "--key", &agg_key, "--model", m1_s]).contains("replaces nothing"));
    replay(&path, &parts[0]);
    replay(&ref_path, &parts[0]);
    let mut p = PipelineProc::start(&dir, "run-1", &path);
    let mut r = PipelineProc::start(&ref_dir, "ref-1", &ref_path);
    out.until("verdicts of the first part", |m| verdicts_by_coords(m).len() >= HALF);
    reference.until("reference verdicts of the first part", |m| verdicts_by_coords(m).len() >= HALF);
    p.stop();
    r.stop();

    // v2 is published; both start again before the second part arrives, and the
    // first batch switches every partition. One process is killed right after the
    // switch is durable, before it scored anything with v2.
    assert!(twinguard(&["federate", "publish", "--config", fed_s, "--key", &agg_key, "--model", m2_s]).contains(&format!("replaces {v1}")));
    let mut p = PipelineProc::spawn(&dir, "run-2", &["run", "--config", path.to_str().unwrap()], &[("TWINGUARD_PAUSE_AT", "model_activated")]);
    let mut r = PipelineProc::start(&ref_dir, "ref-2", &ref_path);
    p.wait_log(&["partitions ready"]);
    r.wait_log(&["partitions ready"]);
    replay(&path, &parts[1]);
    replay(&ref_path, &parts[1]);
    p.wait_log(&["paused at failpoint"]);
    p.kill9();
    reference.until("reference verdicts of both parts", |m| verdicts_by_coords(m).len() >= UNTIL_ROLLBACK);
    r.stop();
    assert!(p.log_text().matches("model activated").count() >= 1, "{}", p.log_text());

    // The restart (a fresh group at the dead process's committed offsets, as in
    // crash.rs) scores the second part with v2, as the reference did.
    let mut cfg3 = cfg.clone();
    cfg3.kafka.group_id = format!("{}-restarted", cfg.kafka.group_id);
    copy_committed_offsets(&cfg, &cfg3);
    let path3 = write_config(&dir, "restarted", &cfg3);
    let mut p = PipelineProc::start(&dir, "run-3", &path3);
    out.until("verdicts of both parts", |m| verdicts_by_coords(m).len() >= UNTIL_ROLLBACK);
    let (got, want) = (verdicts(&out), verdicts(&reference));
    assert_eq!(got.len(), want.len(), "an event without a verdict, or a verdict without an event");
    let mut by_version = std::collections::BTreeMap::<String, usize>::new();
    for (c, copies) in &got {
        let w = &want.get(c).unwrap_or_else(|| panic!("{c:?} has no reference verdict"))[0];
        for x in copies {
            assert_eq!(String::from_utf8_lossy(x), String::from_utf8_lossy(w), "event {c:?}: the killed-and-restarted run differs from the undisturbed one");
        }
        *by_version.entry(version_of(w)).or_default() += 1;
    }
    assert_eq!(by_version.get(&v1), Some(&HALF), "{by_version:?}");
    assert_eq!(by_version.get(&v2), Some(&(UNTIL_ROLLBACK - HALF)), "{by_version:?}");

    // A forged artifact and pointer (signed by a site's key, not the aggregator's)
    // are refused; a rollback points the pipeline back at v1.
    forge(&broker.bootstrap, &fed, &m2);
    p.wait_log(&["published model refused", "bad signature"]);
    let back = twinguard(&["federate", "rollback", "--config", fed_s, "--key", &agg_key]);
    assert!(back.contains(&format!("rolled back from {v2} to {v1}")), "{back}");
    replay(&path3, &parts[2]);
    out.until("verdicts of the rolled-back part", |m| verdicts_by_coords(m).len() >= ROWS);
    p.stop();
    let late: Vec<String> = verdicts(&out).iter().filter(|(c, _)| !got.contains_key(c)).map(|(_, v)| version_of(&v[0])).collect();
    assert_eq!(late.len(), ROWS - UNTIL_ROLLBACK);
    assert!(late.iter().all(|v| *v == v1), "after the rollback every event is scored by {v1}: {late:?}");

    // Every activation links to a version the federation's audit chain published.
    let verify = twinguard(&["audit", "verify", "--config", path.to_str().unwrap(), "--public-key", &audit_pub, "--federation", fed_s]);
    // v1 and v2 (the rollback republishes v1); each partition with events switched
    // to v1, to v2 (durable before the kill, not repeated after it), back to v1.
    let fed_parts: std::collections::BTreeSet<i32> = got.keys().map(|c| c.0).collect();
    assert!(verify.contains(&format!("2 versions published; {} model activations link to them", 3 * fed_parts.len())), "{verify}");
}

/// An artifact and a pointer on the federation's topics that claim to come from
/// the aggregator, signed with another key.
fn forge(bootstrap: &str, fed: &Path, model: &Path) {
    use twinguard::app::federate::envelope::{seal, Meta};
    let file = twinguard::app::federate::FederationFile::load(fed).unwrap();
    let mut artifact = twinguard_models::Artifact::load(model).unwrap();
    artifact.version = "forged".into();
    let body = serde_json::to_vec(&artifact).unwrap();
    let sha = twinguard::app::federate::follow::digest(&body);
    let pointer = serde_json::json!({"version": "forged", "sha256": sha, "run": "forged"});
    let p: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let topics = file.topics();
    for (topic, kind, seq, body) in [(&topics.artifacts, "artifact", 1, body), (&topics.model, "model", 2, serde_json::to_vec(&pointer).unwrap())] {
        let meta = Meta { federation: file.id.clone(), plan: file.plan_hash(), run: "forged".into(), seq, from: "aggregator".into(), kind: kind.into(), to: vec![], protocol: twinguard_models::federated::protocol::PROTOCOL };
        for c in seal(&meta, &body, &SigningKey::from_bytes(&[2u8; 32])) {
            let mut h = rdkafka::message::OwnedHeaders::new();
            for (k, v) in &c.headers {
                h = h.insert(rdkafka::message::Header { key: k, value: Some(v.as_bytes()) });
            }
            p.send(BaseRecord::to(topic).key("aggregator").payload(&c.payload).headers(h)).map_err(|(e, _)| e).unwrap();
        }
    }
    p.flush(std::time::Duration::from_secs(30)).unwrap();
}
