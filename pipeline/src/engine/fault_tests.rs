//! Fault injection on the embedded mock cluster: when the broker refuses the
//! pipeline's outputs, the pipeline stops without storing offsets past them, and a
//! restart delivers every verdict.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::Config;
use crate::tools::sim::{SimConfig, Simulator};
use crate::tools::produce;
use crate::{engine, kafka, Metrics, PipelineError};

fn committed(cfg: &Config, partitions: i32) -> Vec<Offset> {
    let mut c = kafka::base_client(cfg);
    c.set("group.id", &cfg.kafka.group_id);
    let consumer: BaseConsumer = c.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(&cfg.topics.input, p);
    }
    consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap().elements().iter().map(|e| e.offset()).collect()
}

#[test]
fn refused_outputs_stop_the_pipeline_without_committing_and_a_restart_delivers_all() {
    let mock = MockCluster::new(1).unwrap();
    let mut cfg = Config::default();
    cfg.kafka.brokers = mock.bootstrap_servers();
    cfg.kafka.group_id = "fault".into();
    cfg.kafka.producer.insert("message.timeout.ms".into(), "5000".into());
    cfg.topics.create = false;
    cfg.batch.max_records = 50;
    for (t, _) in cfg.topics.all() {
        mock.create_topic(t, 2, 1).unwrap();
    }
    let mut sc = SimConfig::new(8, 400, 3);
    sc.malformed_rate = 0.0;
    let recs: Vec<(String, Vec<u8>)> = Simulator::new(sc).map(|r| (r.key, r.payload)).collect();
    let coords: HashSet<(i32, i64)> = produce::produce_all(&cfg, &cfg.topics.input, recs, None, |_, _| {}).unwrap().into_iter().collect();

    // Every produce request from now on is refused (not retriable).
    mock.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 200]);
    let r = engine::run(&cfg, Arc::new(Metrics::default()), Arc::new(AtomicBool::new(false)));
    match r {
        Err(PipelineError::Fatal(msg)) => assert!(msg.contains("delivery") || msg.contains("produce"), "{msg}"),
        other => panic!("expected a fatal delivery error, got {other:?}"),
    }
    assert!(committed(&cfg, 2).iter().all(|o| !matches!(o, Offset::Offset(_))), "no offset may be committed past a refused output");

    // The broker recovers: a restart delivers a verdict for every event.
    mock.clear_request_errors(RDKafkaApiKey::Produce);
    let metrics = Arc::new(Metrics::default());
    let stop = Arc::new(AtomicBool::new(false));
    let handle = {
        let (cfg, metrics, stop) = (cfg.clone(), metrics.clone(), stop.clone());
        std::thread::spawn(move || engine::run(&cfg, metrics, stop))
    };
    let mut c = kafka::base_client(&cfg);
    c.set("group.id", "fault-reader");
    let reader: BaseConsumer = c.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset(&cfg.topics.verdicts, p, Offset::Beginning).unwrap();
    }
    reader.assign(&tpl).unwrap();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < coords.len() {
        assert!(Instant::now() < deadline, "only {} of {} verdicts after the restart", seen.len(), coords.len());
        assert!(!handle.is_finished(), "pipeline stopped early");
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(100)) {
            let v: twinguard_schemas::verdict::Verdict = serde_json::from_slice(m.payload().unwrap()).unwrap();
            seen.insert((v.source.partition, v.source.offset));
        }
    }
    assert_eq!(seen, coords);
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap().unwrap();
    assert!(committed(&cfg, 2).iter().all(|o| matches!(o, Offset::Offset(_))), "offsets committed after a clean stop");
}

/// Started while its broker is down, the pipeline waits (and stays alive: its
/// heartbeat runs) instead of exiting, starts once the broker answers, and a stop
/// ends the wait.
#[test]
fn an_unreachable_broker_is_waited_for_not_an_exit() {
    let mock = MockCluster::new(1).unwrap();
    let mut cfg = Config::default();
    cfg.kafka.brokers = mock.bootstrap_servers();
    mock.broker_down(1).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let beats = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let waiter = {
        let (cfg, stop, beats) = (cfg.clone(), stop.clone(), beats.clone());
        std::thread::spawn(move || kafka::wait_for_brokers(&cfg, &stop, || {
            beats.fetch_add(1, Ordering::Relaxed);
        }))
    };
    // Several failed tries (5 s metadata timeout each, then the back-off) go by
    // without an exit while the heartbeat keeps running.
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        assert!(!waiter.is_finished(), "wait_for_brokers returned while the broker was down: {:?}", waiter.join());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(beats.load(Ordering::Relaxed) >= 2, "no heartbeat while waiting");
    mock.broker_up(1).unwrap();
    let until = Instant::now() + Duration::from_secs(120);
    while !waiter.is_finished() {
        assert!(Instant::now() < until, "still waiting 120 s after the broker came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(waiter.join().unwrap().unwrap(), "the wait ended without the broker");

    // Down again: a stop ends the wait with `false`.
    mock.broker_down(1).unwrap();
    let waiter = {
        let (cfg, stop) = (cfg.clone(), stop.clone());
        std::thread::spawn(move || kafka::wait_for_brokers(&cfg, &stop, || {}))
    };
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    assert!(!waiter.join().unwrap().unwrap(), "a stop during the wait must return false");
}

/// The engine reports through its events (the only route to metrics and logs):
/// a run over good and malformed records emits the main ones, and this run's
/// `Metrics` add up (every record is a verdict or a dead letter).
/// A running pipeline on a fresh mock cluster (2-partition topics, batches of
/// 40) over `devices` simulated devices' `events` events (`malformed` of them
/// malformed): the cluster, the configuration (`tweak`ed), the records produced,
/// the metrics, the stop flag and the run's thread.
#[allow(clippy::type_complexity)]
fn running(
    group: &str,
    (devices, events, seed, malformed): (usize, usize, u64, f64),
    tweak: impl FnOnce(&mut Config),
) -> (MockCluster<'static, rdkafka::producer::DefaultProducerContext>, Config, u64, Arc<Metrics>, Arc<AtomicBool>, std::thread::JoinHandle<Result<engine::RunReport, PipelineError>>) {
    let mock = MockCluster::new(1).unwrap();
    let mut cfg = Config::default();
    cfg.kafka.brokers = mock.bootstrap_servers();
    cfg.kafka.group_id = group.into();
    cfg.topics.create = false;
    cfg.batch.max_records = 40;
    tweak(&mut cfg);
    for (t, _) in cfg.topics.all() {
        mock.create_topic(t, 2, 1).unwrap();
    }
    let mut sc = SimConfig::new(devices, events, seed);
    sc.malformed_rate = malformed;
    let recs: Vec<(String, Vec<u8>)> = Simulator::new(sc).map(|r| (r.key, r.payload)).collect();
    let n = produce::produce_all(&cfg, &cfg.topics.input, recs, None, |_, _| {}).unwrap().len() as u64;
    let metrics = Arc::new(Metrics::default());
    let stop = Arc::new(AtomicBool::new(false));
    let handle = {
        let (cfg, metrics, stop) = (cfg.clone(), metrics.clone(), stop.clone());
        std::thread::spawn(move || engine::run(&cfg, metrics, stop))
    };
    (mock, cfg, n, metrics, stop, handle)
}

/// Wait until every one of the `n` records got a verdict or a dead letter and an
/// offset was stored.
fn wait_answered<T>(metrics: &Metrics, n: u64, handle: &std::thread::JoinHandle<T>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let answered = |m: &Metrics| m.verdicts_out.load(Ordering::Relaxed) + m.dlq_out.load(Ordering::Relaxed);
    while answered(metrics) < n || metrics.offsets_stored.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "{} of {n} records answered", answered(metrics));
        assert!(!handle.is_finished(), "pipeline stopped early");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_engine_reports_through_its_events() {
    let (_mock, cfg, n, metrics, stop, handle) = running("events", (6, 300, 5, 0.05), |_| {});
    wait_answered(&metrics, n, &handle);
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap().unwrap();
    let answered = |m: &Metrics| m.verdicts_out.load(Ordering::Relaxed) + m.dlq_out.load(Ordering::Relaxed);
    let m = &metrics;
    assert_eq!(m.records_in.load(Ordering::Relaxed), n);
    assert_eq!(answered(m), n, "one verdict or one dead letter per record");
    assert!(m.dlq_out.load(Ordering::Relaxed) > 0, "malformed records were dead-lettered");
    assert!(m.changelog_out.load(Ordering::Relaxed) > 0 && m.batches.load(Ordering::Relaxed) > 0);
    assert!(m.heartbeat_ms.load(Ordering::Relaxed) > 0 && m.stall_limit_ms.load(Ordering::Relaxed) > 0);
    assert_eq!(*m.schema_id.lock().unwrap(), cfg.event_schema().unwrap().id());
    crate::obs::events::testing::assert_emitted(&[
        "PipelineConfigured",
        "PipelineStarted",
        "StallLimitSet",
        "Heartbeat",
        "ControlHeartbeat",
        "Rebalanced",
        "TwinsRestored",
        "PartitionsReady",
        "StageFinished",
        "RecordRejected",
        "VerdictsScored",
        "BatchProcessed",
        "TwinsCounted",
        "ChangelogWritten",
        "OutputsAcknowledged",
        "OffsetsStored",
    ]);
}

/// Offsets are checked on every record, not only at resume (issue 13, defect 8):
/// the next offset expected per partition, a gap (records never delivered) and a
/// rewind (a seek or reset) told apart.
#[test]
fn offset_contiguity_is_tracked_mid_stream() {
    let mut expected = std::collections::HashMap::new();
    assert_eq!(engine::check_contiguity(&mut expected, 0, 10), None, "the first record sets the expectation");
    assert_eq!(engine::check_contiguity(&mut expected, 0, 11), None);
    assert_eq!(engine::check_contiguity(&mut expected, 0, 15), Some(Ok(12)), "a gap: 12..=14 never delivered");
    assert_eq!(engine::check_contiguity(&mut expected, 0, 3), Some(Err(16)), "a rewind below 16");
    assert_eq!(engine::check_contiguity(&mut expected, 1, 0), None, "partitions are independent");
    assert_eq!(expected.get(&0), Some(&4));
}

/// A changelog record larger than `state.max_twin_bytes` or one that does not
/// decode is quarantined (the partition is served without it); a twin of another
/// schema is a configuration error (issue 13, defect 3).
#[test]
fn oversized_and_undecodable_changelog_records_are_quarantined() {
    use twinguard_operators::OperatorError;
    let big = vec![b'{'; 5000];
    let never = |_: &str, _: Option<&[u8]>| -> Result<(), OperatorError> { panic!("an oversized record is not decoded") };
    match engine::restore_verdict("dev", Some(&big), 4096, never) {
        engine::Restore::Quarantine(why) => assert!(why.contains("5000 bytes") && why.contains("max_twin_bytes"), "{why}"),
        _ => panic!("oversized: quarantine expected"),
    }
    let undecodable = |k: &str, _: Option<&[u8]>| Err(OperatorError::Undecodable { key: k.into(), reason: "not JSON".into() });
    assert!(matches!(engine::restore_verdict("dev", Some(b"xx"), 4096, undecodable), engine::Restore::Quarantine(_)));
    let foreign = |k: &str, _: Option<&[u8]>| Err(OperatorError::Restore { key: k.into(), reason: "schema other/v1".into() });
    assert!(matches!(engine::restore_verdict("dev", Some(b"{}"), 4096, foreign), engine::Restore::Fatal(_)));
    assert!(matches!(engine::restore_verdict("dev", None, 4096, |_, _| Ok(())), engine::Restore::Done), "a tombstone restores");
}

/// A broker that stops answering while a worker leaves the group (a close hang
/// was seen against tansu): the worker stops within `engine.close_timeout_secs`
/// naming the step it was stuck in, instead of waiting on librdkafka, whose
/// synchronous commit and close are not bounded.
#[test]
fn leaving_the_group_is_bounded_when_the_broker_stops_answering() {
    let (mock, _cfg, n, metrics, stop, handle) = running("close", (4, 120, 9, 0.0), |c| c.engine.close_timeout_secs = 2);
    wait_answered(&metrics, n, &handle);
    // Every answer from the broker now takes ten minutes.
    mock.broker_round_trip_time(1, Duration::from_secs(600)).unwrap();
    stop.store(true, Ordering::Relaxed);
    // Unbounded, the final commit alone would wait out socket.timeout.ms (60 s)
    // and the close after it longer still.
    let deadline = Instant::now() + Duration::from_secs(45);
    while !handle.is_finished() {
        assert!(Instant::now() < deadline, "the worker did not stop: leaving the group is not bounded");
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = handle.join().unwrap().unwrap();
    assert_eq!(report.close_timed_out, Some("the final commit"), "{report:?}");
    assert_eq!(report.twins, 4, "the report is taken before the close drops the partitions");
    std::mem::forget(mock); // the left-behind close still talks to it
}
