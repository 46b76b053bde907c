//! A federation over Kafka: an aggregator and three site processes on tansu,
//! each site carving the rows `federate simulate` would give it, so the model
//! published over the broker can be checked against the one-process simulation
//! of the same plan. A forged task on the plan topic is dead-lettered by the
//! sites with its reason, and never answered. Then adversarial training over
//! Kafka: each site attacks its own training rows against the published model and
//! serves a second run on its grown rows.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use rdkafka::message::Headers;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::Message;

use crate::harness::{scratch, Broker, PipelineProc, Reader};

const SITES: usize = 3;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A party's key file and its public key.
fn key(dir: &std::path::Path, name: &str, seed: u8) -> (String, String) {
    let k = SigningKey::from_bytes(&[seed; 32]);
    let path = dir.join(format!("{name}.key"));
    std::fs::write(&path, hex(&[seed; 32])).unwrap();
    (path.to_str().unwrap().to_string(), hex(k.verifying_key().as_bytes()))
}

/// The model flags both roles and the simulation share (a small, quick model).
const MODEL: [&str; 12] = ["--seed", "3", "--trees", "20", "--svm-rows", "300", "--lstm-epochs", "1", "--target-fpr", "0.02", "--lstm-hidden", "8"];

#[test]
fn an_aggregator_and_three_sites_federate_over_kafka_as_the_simulation_does() {
    let dir = scratch("federate");
    let broker = Broker::start(&dir);
    let lab = twinguard_train::testkit::write_lab_dataset(&dir, 3000, 1_760_000_000_000).unwrap();
    let (agg_key, agg_pub) = key(&dir, "aggregator", 1);
    let mut toml = format!(
        "id = \"it\"\nbrokers = \"{}\"\ntopic_prefix = \"it-fed\"\nround_timeout_secs = 600\naggregator_key = \"{agg_pub}\"\n[plan]\nlstm_rounds = 2\nlocal_epochs = 1\n",
        broker.bootstrap
    );
    let mut site_keys = Vec::new();
    for i in 0..SITES {
        let (k, p) = key(&dir, &format!("site-{i}"), 10 + i as u8);
        toml.push_str(&format!("[[sites]]\nname = \"site-{i}\"\npublic_key = \"{p}\"\n"));
        site_keys.push(k);
    }
    let fed = dir.join("fed.toml");
    std::fs::write(&fed, &toml).unwrap();
    let (csv, schema, sql) = (lab.csv.to_str().unwrap(), lab.schema.to_str().unwrap(), lab.features.to_str().unwrap());
    // Adversarial training over Kafka: after the first run every site attacks its
    // own training floods against the published model and trains on their shrunk
    // versions in a second run.
    let threat = dir.join("lab-threat.toml");
    std::fs::write(&threat, "threat = \"floods shrink\"\n[family.default]\nknobs = [{ field = \"pkts\", min_factor = 0.05, max_factor = 1.0 }, { field = \"bytes\", min_factor = 0.05, max_factor = 1.0 }]\n").unwrap();

    // The sites first: they create the topics and wait for a run.
    let mut sites: Vec<PipelineProc> = (0..SITES)
        .map(|i| {
            let (name, out, carve) = (format!("site-{i}"), dir.join(format!("site-{i}")), i.to_string());
            let mut args = vec![
                "federate", "site", "--config", fed.to_str().unwrap(), "--name", &name, "--key", &site_keys[i], "--carve", &carve, "--alpha", "10",
                "--dataset", csv, "--schema", schema, "--features", sql, "--device-column", "device", "--time-column", "ts", "--split", "stratified", "--out",
                out.to_str().unwrap(), "--adversarial", threat.to_str().unwrap(), "--adversarial-rounds", "1", "--adversarial-events", "40", "--adversarial-queries", "20",
            ]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<String>>();
            args.extend(MODEL.iter().map(|s| s.to_string()));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            PipelineProc::spawn(&dir, &name, &refs, &[])
        })
        .collect();
    // A forged task: signed by a key that is not the aggregator's. Sent once every
    // site reads the plan topic (the sites create the topics, with one partition).
    for s in &mut sites {
        s.wait_log(&["waiting for the aggregator's next run"]);
    }
    forge_task(&broker.bootstrap, &toml);

    let out = dir.join("model");
    let mut args: Vec<&str> = vec!["federate", "aggregate", "--config", fed.to_str().unwrap(), "--key", &agg_key, "--schema", schema, "--features", sql, "--out", out.to_str().unwrap()];
    args.extend(MODEL);
    let mut agg = PipelineProc::spawn(&dir, "aggregator", &args, &[]);
    let st = agg.wait_exit(Duration::from_secs(900));
    assert!(st.success(), "aggregator failed:\n{}", agg.log_text());
    for s in &mut sites {
        s.wait_log(&["finished: model fed-"]);
        s.wait_log(&["adversarial round 1:"]);
    }
    // The second run: the sites' rows now hold their adversarial floods.
    let out2 = dir.join("model-2");
    let mut args2: Vec<&str> = vec!["federate", "aggregate", "--config", fed.to_str().unwrap(), "--key", &agg_key, "--schema", schema, "--features", sql, "--out", out2.to_str().unwrap()];
    args2.extend(MODEL);
    let mut agg2 = PipelineProc::spawn(&dir, "aggregator-2", &args2, &[]);
    assert!(agg2.wait_exit(Duration::from_secs(900)).success(), "second aggregator run failed:\n{}", agg2.log_text());
    for s in &mut sites {
        let st = s.wait_exit(Duration::from_secs(120));
        assert!(st.success(), "site failed:\n{}", s.log_text());
        assert_eq!(s.log_text().matches("finished: model fed-").count(), 2, "{}", s.log_text());
    }
    let (first, second) = (twinguard_models::Artifact::load(&out).unwrap(), twinguard_models::Artifact::load(&out2).unwrap());
    assert_eq!(second.provenance.as_ref().and_then(|p| p.parent.clone()), Some(first.version.clone()), "run 2 replaces run 1's model");
    let grown: twinguard_models::federated::plan::FederationReport = serde_json::from_slice(&std::fs::read(out2.join("federation.json")).unwrap()).unwrap();
    let before: twinguard_models::federated::plan::FederationReport = serde_json::from_slice(&std::fs::read(out.join("federation.json")).unwrap()).unwrap();
    for (a, b) in grown.sites.iter().zip(&before.sites) {
        assert!(a.train_rows > b.train_rows, "site {}: {} training rows in run 2, {} in run 1", a.site, a.train_rows, b.train_rows);
    }
    // Each site scored the published model on its own held-out rows.
    for i in 0..SITES {
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(format!("site-{i}/published/report.json"))).unwrap()).unwrap();
        assert!(r["rows"]["test"].as_u64().unwrap() > 0 && r["rows"]["train"].as_u64() == Some(0), "site {i}: {}", r["rows"]);
        assert_eq!(r["model_version"].as_str(), Some(second.version.as_str()));
    }

    // The published model is the simulation's: same rows per site, same tasks.
    let artifact = twinguard_models::Artifact::load(&out).unwrap();
    let report: twinguard_models::federated::plan::FederationReport = serde_json::from_slice(&std::fs::read(out.join("federation.json")).unwrap()).unwrap();
    assert_eq!(report.sites.len(), SITES);
    assert!(report.decisions["rf"].iter().all(|d| d.accepted), "{:?}", report.decisions["rf"]);
    assert!(report.sites.iter().all(|s| s.bytes.values().sum::<usize>() > 0));
    let simulated = simulate(&lab, &dir);
    let (a, b) = (&artifact.ensemble, &simulated.ensemble);
    assert_eq!(serde_json::to_value(&a.forest).unwrap(), serde_json::to_value(&b.forest).unwrap(), "the pooled forest differs from the simulation's");
    assert_eq!(serde_json::to_value(&a.boost).unwrap(), serde_json::to_value(&b.boost).unwrap(), "the cyclic booster differs");
    assert_eq!(a.standardizer, b.standardizer);
    assert!((a.threshold - b.threshold).abs() < 1e-9, "threshold {} over Kafka vs {} simulated", a.threshold, b.threshold);
    for (x, y) in a.stacker.weights.iter().zip(&b.stacker.weights) {
        assert!((x - y).abs() < 1e-9, "stacker {:?} vs {:?}", a.stacker, b.stacker);
    }
    // Each site's own threshold, under its name in the federation file.
    let own = |e: &twinguard_models::Ensemble| e.combination.as_ref().unwrap().site_thresholds.clone();
    assert_eq!(own(a), own(b));
    assert_eq!(own(a).keys().cloned().collect::<Vec<_>>(), (0..SITES).map(|i| format!("site-{i}")).collect::<Vec<_>>());

    // The forged task went to the dead-letter topic with its reason; the pointer names the model.
    let mut cfg = broker.config("federate");
    cfg.kafka.brokers = broker.bootstrap.clone();
    let mut dlq = Reader::new(&cfg, "it-fed.dlq");
    let mut reasons = Vec::new();
    dlq.until("a dead letter for the forged task", |msgs| {
        reasons = msgs.iter().filter_map(|m| m.headers().and_then(|h| h.iter().find(|x| x.key == "tg-reason").and_then(|x| x.value.map(|v| String::from_utf8_lossy(v).into_owned())))).collect();
        reasons.iter().any(|r| r.contains("bad signature"))
    });
    let mut pointer = Reader::new(&cfg, "it-fed.model");
    pointer.until("the model pointer", |msgs| !msgs.is_empty());
    assert!(sites.iter().all(|s| !s.log_text().contains("run forged")), "a site served the forged run");
}

/// A task on the plan topic that claims to come from the aggregator, signed by another key.
fn forge_task(bootstrap: &str, toml: &str) {
    use twinguard::app::federate::envelope::{seal, Meta};
    let file: twinguard::app::federate::FederationFile = toml::from_str(toml).unwrap();
    let meta = Meta {
        federation: file.id.clone(),
        plan: file.plan_hash(),
        run: "forged".into(),
        seq: 1,
        from: "aggregator".into(),
        kind: "describe".into(),
        to: file.sites.iter().map(|s| s.name.clone()).collect(),
        protocol: twinguard_models::federated::protocol::PROTOCOL,
    };
    let body = twinguard_models::federated::protocol::encode(&twinguard_models::federated::protocol::Task::Describe);
    let p: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    for c in seal(&meta, &body, &SigningKey::from_bytes(&[99u8; 32])) {
        let mut h = rdkafka::message::OwnedHeaders::new();
        for (k, v) in &c.headers {
            h = h.insert(rdkafka::message::Header { key: k, value: Some(v.as_bytes()) });
        }
        p.send(BaseRecord::to("it-fed.plan").key("aggregator").payload(&c.payload).headers(h)).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// `federate simulate` of the same plan in this process.
fn simulate(lab: &twinguard_train::testkit::LabDataset, dir: &std::path::Path) -> twinguard_models::Artifact {
    use twinguard_models::federated::plan::{FederationPlan, Sites};
    let schema = twinguard_schemas::EventSchema::named_or_file(lab.schema.to_str().unwrap()).unwrap();
    let job = twinguard_train::TrainJob {
        dataset: twinguard_train::DatasetSpec {
            file: lab.csv.clone(),
            schema: schema.id(),
            devices: 1,
            interval_ms: 100,
            limit: None,
            shuffle_seed: Some(3),
            device_column: Some("device".into()),
            time_column: Some("ts".into()),
        },
        feature_sql: std::fs::read_to_string(&lab.features).unwrap(),
        schema,
        twin: twinguard_operators::TwinConfig::default(),
        split: twinguard_train::SplitSpec { kind: twinguard_train::SplitKind::Stratified, train: 0.6, validation: 0.2, seed: 3 },
        opts: twinguard_train::TrainOptions {
            target_fpr: 0.02,
            seed: 3,
            forest: twinguard_models::forest::ForestParams { trees: 20, seed: 3, ..Default::default() },
            svm: twinguard_models::svm::SvmParams { max_train_rows: 300, seed: 3, ..Default::default() },
            lstm: twinguard_models::lstm::LstmParams { epochs: 1, hidden: 8, seed: 3, ..Default::default() },
            boost: twinguard_models::boost::BoostParams { seed: 3, ..Default::default() },
            flip_labels: 0.0,
            screen: false,
            screen_threshold: 0.2,
            combine: Default::default(),
        },
        out: dir.join("simulated"),
    };
    let plan = FederationPlan { lstm_rounds: 2, lstm_local_epochs: 1, ..FederationPlan::clean(SITES, Sites::Dirichlet { alpha: 10.0 }, 3) };
    twinguard_train::run_federate(&job, &plan, &mut |_| {}).unwrap().0
}
