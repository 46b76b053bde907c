//! Issue 13's defects, each on a real broker: a poison control record, a
//! future-dated event, strings past their `max_len`, an undecodable changelog
//! record, and a member that was paused past its session (a zombie).

use std::collections::HashSet;

use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;
use twinguard::tools::sim::Truth;
use twinguard_schemas::fields;

use crate::harness::*;

fn header(m: &OwnedMessage, k: &str) -> Option<String> {
    let h = m.headers()?;
    h.iter().find(|x| x.key == k).and_then(|x| x.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Bytes the broker counts against its message size.
fn record_size(m: &OwnedMessage) -> usize {
    let headers = m.headers().map_or(0, |h| h.iter().map(|x| x.key.len() + x.value.map_or(0, <[u8]>::len)).sum());
    m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len) + headers
}

fn valid_coords(recs: &[twinguard::tools::sim::SimRecord], coords: &[(i32, i64)]) -> HashSet<(i32, i64)> {
    recs.iter().zip(coords).filter(|(r, _)| !matches!(r.truth, Truth::Malformed(_))).map(|(_, c)| *c).collect()
}

/// An event like `payload` with one field changed.
fn with_field(payload: &[u8], field: &str, value: serde_json::Value) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    v[field] = value;
    serde_json::to_vec(&v).unwrap()
}

/// The review's poison pill (defect 1): an ack or feedback record of about 1 MB whose
/// parse error quotes its value underflowed the dead-letter budget: a panic in the
/// dev profile, on every restart (feedback is re-read from the beginning). Now each
/// is dead-lettered under 1 MB with a reason of at most 1 KiB, and the stream goes on.
#[test]
fn a_megabyte_control_record_is_dead_lettered_and_the_stream_goes_on() {
    let Setup { dir, broker: _broker, cfg } = Setup::new("poison");
    let big = "x".repeat(950_000);
    let mid = "y".repeat(40_000);
    let control = |topic: &str, recs: Vec<(String, Vec<u8>)>| {
        let mut one = cfg.clone();
        one.kafka.producer.insert("batch.num.messages".into(), "1".into());
        twinguard::tools::produce::produce_all(&one, topic, recs, None, |_, _| {}).unwrap()
    };
    let feedback = control(
        &cfg.topics.feedback,
        vec![
            ("a".into(), format!(r#"{{"v":1,"ref":"r1","label":"{big}"}}"#).into_bytes()),
            ("b".into(), format!(r#"{{"v":1,"ref":"r2","label":"{mid}"}}"#).into_bytes()),
        ],
    );
    let recs = sim_records(4, 200, 21, 0.0);
    let acks = control(
        &cfg.topics.acks,
        vec![(recs[0].key.clone(), format!(r#"{{"v":1,"command_id":"c","device_id":"{}","status":"{big}"}}"#, recs[0].key).into_bytes())],
    );
    let coords = produce(&cfg, &recs);

    let mut p = PipelineProc::start(&dir, "pipeline", &write_config(&dir, "pipeline", &cfg));
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    verdicts.until("a verdict for every event", |r| verdicts_by_coords(r).len() >= coords.len());
    let mut dlq = Reader::new(&cfg, &cfg.topics.dlq);
    dlq.until("three dead letters", |r| r.len() >= 3);
    p.stop();

    let mut sources = HashSet::new();
    for m in &dlq.records {
        assert_eq!(header(m, fields::DLQ_CODE).as_deref(), Some("invalid_control_record"));
        let reason = header(m, fields::DLQ_REASON).unwrap();
        assert!(reason.len() <= 1024, "reason of {} bytes", reason.len());
        assert!(record_size(m) < 1_000_000, "dead letter of {} bytes", record_size(m));
        let topic = header(m, fields::DLQ_TOPIC).unwrap();
        sources.insert((topic, header(m, fields::DLQ_PARTITION).unwrap().parse::<i32>().unwrap(), header(m, fields::DLQ_OFFSET).unwrap().parse::<i64>().unwrap()));
    }
    let want: HashSet<_> = feedback
        .iter()
        .map(|c| (cfg.topics.feedback.clone(), c.0, c.1))
        .chain(acks.iter().map(|c| (cfg.topics.acks.clone(), c.0, c.1)))
        .collect();
    assert_eq!(sources, want, "one dead letter per bad control record");
}

/// Defect 2, the review's time attack: one valid event per partition dated now +
/// 23 h 50 m (inside the decoder's 24 h future window). It moved its partition's
/// watermark and the next idle sweeps removed every other twin there. Now no twin
/// goes, over several sweeps, and the devices keep their twins.
#[test]
fn a_future_dated_event_expires_no_other_twin() {
    let Setup { dir, broker: _broker, mut cfg } = Setup::new("time-attack");
    cfg.batch.expiry_interval_secs = 1;
    let recs = sim_records(12, 600, 31, 0.0);
    let coords = produce(&cfg, &recs);
    let devices: HashSet<&str> = recs.iter().map(|r| r.key.as_str()).collect();
    // One claimant per partition.
    let mut claimants: Vec<(String, Vec<u8>)> = Vec::new();
    let mut parts = HashSet::new();
    let future = chrono::Utc::now() + chrono::Duration::minutes(23 * 60 + 50);
    for (r, c) in recs.iter().zip(&coords) {
        if parts.insert(c.0) {
            let t = serde_json::Value::String(future.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
            claimants.push((r.key.clone(), with_field(&r.payload, fields::EVENT_TIME, t)));
        }
    }
    let mut one = cfg.clone();
    one.kafka.producer.insert("batch.num.messages".into(), "1".into());
    let claims = twinguard::tools::produce::produce_all(&one, &cfg.topics.input, claimants, None, |_, _| {}).unwrap();

    let mut p = PipelineProc::start(&dir, "pipeline", &write_config(&dir, "pipeline", &cfg));
    let http = p.wait_addr("serving /metrics");
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    verdicts.until("a verdict for every event and claim", |r| verdicts_by_coords(r).len() >= coords.len() + claims.len());
    // Three idle sweeps after the claims were applied.
    for _ in 0..3 {
        p.wait_log(&["status"]);
    }
    let (_, body) = crate::sql::http_get(&http, "/metrics");
    let (_, samples) = crate::sql::parse_prometheus(&body);
    let twins = crate::sql::sum(&samples, "twinguard_twins", &[]);
    p.stop();
    assert_eq!(twins, devices.len() as f64, "every device keeps its twin");
    let mut log = Reader::new(&cfg, &cfg.topics.changelog);
    log.drain_to_end(&cfg, &cfg.topics.changelog);
    let tombstones = log.records.iter().filter(|m| m.payload().is_none()).count();
    assert_eq!(tombstones, 0, "no twin was expired");
}

/// Defect 3: a string longer than its field's `max_len` (default 256 bytes) is an
/// `out_of_range` dead letter instead of growing a twin until its changelog record
/// is too large for the broker (fatal on every restart).
#[test]
fn strings_past_max_len_are_dead_lettered_and_twins_stay_small() {
    let Setup { dir, broker: _broker, cfg } = Setup::new("max-len");
    let mut recs = sim_records(3, 300, 41, 0.0);
    let mut long = Vec::new();
    for (i, r) in recs.iter_mut().enumerate().filter(|(i, _)| i % 10 == 5) {
        let field = ["src_addr", "src_mac", "dst_addr", "firmware_hash", "device_type"][i % 5];
        r.payload = with_field(&r.payload, field, serde_json::Value::String(format!("{i}{}", "z".repeat(20_000))));
        r.truth = Truth::Malformed("long_string");
        long.push(i);
    }
    let coords = produce(&cfg, &recs);
    let valid = valid_coords(&recs, &coords);
    let mut p = PipelineProc::start(&dir, "pipeline", &write_config(&dir, "pipeline", &cfg));
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    verdicts.until("a verdict for every valid event", |r| verdicts_by_coords(r).len() >= valid.len());
    let mut dlq = Reader::new(&cfg, &cfg.topics.dlq);
    dlq.until("a dead letter per long string", |r| r.len() >= long.len());
    p.stop();
    let by = verdicts_by_coords(&verdicts.records);
    assert!(long.iter().all(|i| !by.contains_key(&coords[*i])), "no verdict for an event with a string past max_len");
    for m in &dlq.records {
        assert_eq!(header(m, fields::DLQ_CODE).as_deref(), Some("out_of_range"), "{:?}", header(m, fields::DLQ_REASON));
        assert!(header(m, fields::DLQ_REASON).unwrap().contains("max_len"));
    }
    for (k, v) in changelog_twins(&cfg) {
        assert!(v.len() < 8 * 1024, "twin {k} encodes to {} bytes", v.len());
    }
}

/// Defect 3's restore half: a changelog record that does not decode stopped every
/// restore of its partition for good. Now it is quarantined (a dead letter with the
/// original bytes, code `quarantined_changelog`, and a metric) and the pipeline
/// serves the partition.
#[test]
fn an_undecodable_changelog_record_is_quarantined_and_the_partition_served() {
    let Setup { dir, broker: _broker, cfg } = Setup::new("quarantine");
    let garbage = b"{\"v\":1,\"schema\": not a twin".to_vec();
    let bad = twinguard::tools::produce::produce_all(&cfg, &cfg.topics.changelog, vec![("ghost-device".to_string(), garbage.clone())], None, |_, _| {}).unwrap();
    let recs = sim_records(4, 100, 51, 0.0);
    let coords = produce(&cfg, &recs);
    let mut p = PipelineProc::start(&dir, "pipeline", &write_config(&dir, "pipeline", &cfg));
    let http = p.wait_addr("serving /metrics");
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    verdicts.until("a verdict for every event", |r| verdicts_by_coords(r).len() >= coords.len());
    let mut dlq = Reader::new(&cfg, &cfg.topics.dlq);
    dlq.until("the quarantined record's dead letter", |r| !r.is_empty());
    let (_, body) = crate::sql::http_get(&http, "/metrics");
    let (_, samples) = crate::sql::parse_prometheus(&body);
    p.stop();
    let m = &dlq.records[0];
    assert_eq!(header(m, fields::DLQ_CODE).as_deref(), Some("quarantined_changelog"));
    assert_eq!(header(m, fields::DLQ_TOPIC).as_deref(), Some(cfg.topics.changelog.as_str()));
    assert_eq!(header(m, fields::DLQ_OFFSET).unwrap().parse::<i64>().unwrap(), bad[0].1);
    assert_eq!(m.payload().unwrap(), &garbage[..], "original bytes kept");
    assert_eq!(m.key().unwrap(), b"ghost-device");
    assert_eq!(crate::sql::sum(&samples, "twinguard_changelog_quarantined_total", &[]), 1.0);
}

/// Defect 6: a member paused past its session timeout (SIGSTOP) is evicted from the
/// group; when it runs again it must not keep writing changelog and audit records
/// for partitions another member may own. It stops writing (fail-stop of that run,
/// naming the lost assignment) and rejoins as a new member without exiting; after
/// that, every event has a verdict and the twins are exactly those of an
/// uninterrupted run (no twin moved backwards).
#[test]
fn a_member_paused_past_its_session_stops_writing_and_rejoins() {
    let Setup { dir, broker: _broker, cfg } = Setup::new("zombie");
    let recs = sim_records(4, 400, 61, 0.0);
    let (first, second) = recs.split_at(recs.len() / 2);
    let mut coords = produce(&cfg, first);
    let mut p = PipelineProc::start(&dir, "pipeline", &write_config(&dir, "pipeline", &cfg));
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    verdicts.until("a verdict for every event", |r| verdicts_by_coords(r).len() >= coords.len());
    let pid = p.child.as_ref().unwrap().id().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    // The session timeout is 6 s (the harness's config); a second member joining
    // while this one sleeps makes the coordinator rebalance without it.
    let mut other = PipelineProc::start(&dir, "other", &write_config(&dir, "other", &cfg));
    other.wait_log(&["twins restored"]);
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let line = p.wait_log(&["rejoining the group"]);
    assert!(line.contains("lost"), "it names the lost assignment: {line}");
    assert!(p.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the evicted member must rejoin, not exit; log:\n{}", p.log_text());
    // Rejoined: the group spreads the partitions over both members again.
    p.wait_log(&["twins restored"]);

    coords.extend(produce(&cfg, second));
    verdicts.until("a verdict for every event, before and after the rejoin", |r| verdicts_by_coords(r).len() >= coords.len());
    p.stop();
    other.stop();
    let by = verdicts_by_coords(&verdicts.records);
    assert!(by.values().all(|c| c.iter().all(|x| x == &c[0])), "duplicates only as exact repeats");
    assert_twins_equal(&reference_twins(&cfg, &recs, &coords), &changelog_twins(&cfg));
}

/// A broker paused mid-stream for 2 s (below the 6 s session timeout and the
/// delivery timeout: campaign C2a's short pause, in CI): the pipeline rides it out,
/// keeps running, and every event gets its verdict; the twins equal a reference
/// run's.
#[test]
fn a_broker_paused_mid_stream_is_ridden_out() {
    let Setup { dir, broker, mut cfg } = Setup::new("broker-pause");
    // Small batches and enough events that the pause lands while work remains.
    cfg.batch.max_records = 50;
    let recs = sim_records(30, 20_000, 67, 0.0);
    let coords = produce(&cfg, &recs);
    let mut p = PipelineProc::start(&dir, "pipeline", &write_config(&dir, "pipeline", &cfg));
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    verdicts.until("a third of the verdicts", |r| verdicts_by_coords(r).len() >= coords.len() / 3);
    let pid = broker.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let at_pause = verdicts_by_coords(&verdicts.records).len();
    assert!(at_pause < coords.len(), "the pause must land mid-stream ({at_pause} of {} verdicts read)", coords.len());
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    verdicts.until("a verdict for every event after the pause", |r| verdicts_by_coords(r).len() >= coords.len());
    assert!(p.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the pipeline must ride out a short broker pause; log:\n{}", p.log_text());
    p.stop();
    let by = verdicts_by_coords(&verdicts.records);
    assert!(by.values().all(|c| c.iter().all(|x| x == &c[0])), "duplicates only as exact repeats");
    assert_twins_equal(&reference_twins(&cfg, &recs, &coords), &changelog_twins(&cfg));
}

/// The input topic recreated under a deployment (here: the same changelog and group
/// behind a new, empty input topic): the restored twins claim offsets the partition
/// does not hold, and the pipeline says so at assignment, naming the partition,
/// instead of skipping the new events silently (issue 13, defect 8).
#[test]
fn twins_ahead_of_a_recreated_input_topic_are_reported() {
    let Setup { dir, broker: _broker, cfg } = Setup::new("ahead");
    let recs = sim_records(4, 400, 71, 0.0);
    let coords = produce(&cfg, &recs);
    let mut p = PipelineProc::start(&dir, "first", &write_config(&dir, "first", &cfg));
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    verdicts.until("a verdict for every event", |r| verdicts_by_coords(r).len() >= coords.len());
    p.stop();
    let mut recreated = cfg.clone();
    recreated.topics.input = format!("{}-recreated", cfg.topics.input);
    create_topics(&recreated);
    let mut p = PipelineProc::start(&dir, "second", &write_config(&dir, "second", &recreated));
    let line = p.wait_log(&["restored twins are ahead of their input partition"]);
    assert!(line.contains("partition"), "it names the partition: {line}");
    p.stop();
}
