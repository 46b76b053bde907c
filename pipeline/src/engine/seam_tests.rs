//! The engine's core without a broker: the real core loop and commit stages (the
//! same `drive` that `run` uses) between an in-memory source and sink that log
//! what happens, in order. Batching, the acknowledgement order (outputs →
//! changelog → offset) and revoke are checked here; the broker integration tests
//! (`tests/it`) check the same against tansu.

use std::collections::VecDeque;

use super::*;
use crate::tools::sim::{SimConfig, Simulator};

/// What the fakes saw, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// A record handed to the sink (topic; the input offset for verdicts).
    Sent(String),
    /// A record acknowledged (or refused) by the sink.
    Acked(String),
    Purged,
    /// An offset stored on the source: (partition, next record to read).
    Stored(i32, i64),
    Committed,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn seen(log: &Log) -> Vec<Seen> {
    log.lock().unwrap().clone()
}

fn stored(log: &Log) -> Vec<(i32, i64)> {
    seen(log).into_iter().filter_map(|s| if let Seen::Stored(p, o) = s { Some((p, o)) } else { None }).collect()
}

fn sent(log: &Log, topic: &str) -> usize {
    seen(log).iter().filter(|s| **s == Seen::Sent(topic.into())).count()
}

/// Wait (up to 10 s) until `f` holds over the log.
fn wait_until(log: &Log, what: &str, f: impl Fn(&[Seen]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f(&seen(log)) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; log: {:?}", seen(log));
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An in-memory sink: acknowledges each record at once, holds the
/// acknowledgements until [`FakeSink::release`], or refuses one topic.
struct FakeSink {
    log: Log,
    hold: AtomicBool,
    refuse: Option<String>,
    held: Mutex<Vec<(String, Arc<AckGroup>)>>,
}

impl FakeSink {
    fn new(log: &Log) -> Arc<FakeSink> {
        Arc::new(FakeSink { log: log.clone(), hold: AtomicBool::new(false), refuse: None, held: Mutex::new(Vec::new()) })
    }

    /// A sink that holds every acknowledgement until [`FakeSink::release`].
    fn holding(log: &Log) -> Arc<FakeSink> {
        let s = FakeSink::new(log);
        s.hold.store(true, Ordering::SeqCst);
        s
    }

    /// Acknowledge everything held so far, in the order it was sent.
    fn release(&self) {
        for (topic, g) in std::mem::take(&mut *self.held.lock().unwrap()) {
            self.log.lock().unwrap().push(Seen::Acked(topic));
            g.ack(None);
        }
    }
}

impl RecordSink for FakeSink {
    fn send_all(&self, records: &[OutRecord], group: &Arc<AckGroup>, _abort: &AtomicBool) {
        for r in records {
            let topic = r.topic.to_string();
            let g = r.probe.clone().unwrap_or_else(|| group.clone());
            self.log.lock().unwrap().push(Seen::Sent(topic.clone()));
            if self.refuse.as_deref() == Some(topic.as_str()) {
                self.log.lock().unwrap().push(Seen::Acked(topic.clone()));
                g.ack(Some(format!("cannot produce to {topic}: refused by the test")));
            } else if self.hold.load(Ordering::SeqCst) {
                self.held.lock().unwrap().push((topic, g));
            } else {
                self.log.lock().unwrap().push(Seen::Acked(topic));
                g.ack(None);
            }
        }
    }

    fn purge(&self) {
        self.held.lock().unwrap().clear();
        self.log.lock().unwrap().push(Seen::Purged);
    }
}

/// One step of a scripted source.
enum Step {
    /// An input record on a partition (offsets count up per partition).
    Input(i32),
    /// A poll that finds nothing.
    Idle,
    /// Run inside the poll, as librdkafka runs rebalance callbacks.
    Call(Box<dyn FnOnce() + Send>),
}

struct FakeSource {
    log: Log,
    steps: Mutex<VecDeque<Step>>,
    next: Mutex<HashMap<i32, i64>>,
    events: Mutex<Simulator>,
    stop: Arc<AtomicBool>,
}

impl RecordSource for FakeSource {
    fn poll(&self, _timeout: Duration) -> Option<Result<Polled, String>> {
        let step = self.steps.lock().unwrap().pop_front();
        match step {
            Some(Step::Input(partition)) => {
                let offset = {
                    let mut next = self.next.lock().unwrap();
                    let o = next.entry(partition).or_insert(0);
                    *o += 1;
                    *o - 1
                };
                let ev = self.events.lock().unwrap().next().expect("simulated event");
                Some(Ok(Polled {
                    origin: Origin::Input,
                    partition,
                    offset,
                    ts: Some(chrono::Utc::now().timestamp_millis()),
                    key: Some(ev.key.into_bytes()),
                    payload: Some(ev.payload),
                }))
            }
            Some(Step::Call(f)) => {
                f();
                None
            }
            Some(Step::Idle) => None,
            None => {
                // The script is done: stop (graceful: buffered records are processed).
                self.stop.store(true, Ordering::SeqCst);
                None
            }
        }
    }

    fn store_offset(&self, _topic: &str, partition: i32, offset: i64) -> Result<(), String> {
        self.log.lock().unwrap().push(Seen::Stored(partition, offset + 1));
        Ok(())
    }
}

struct Rig {
    shared: Arc<Shared>,
    rx: Option<Receiver<Job>>,
    sink: Arc<FakeSink>,
    log: Log,
    stop: Arc<AtomicBool>,
}

fn rig(max_records: usize, flush_when_idle: bool, sink: impl FnOnce(&Log) -> Arc<FakeSink>) -> Rig {
    let mut cfg = Config::default();
    cfg.batch.max_records = max_records;
    cfg.batch.max_linger_ms = 60_000;
    cfg.batch.flush_when_idle = flush_when_idle;
    let schema = cfg.event_schema().unwrap();
    let log: Log = Arc::default();
    let sink = sink(&log);
    let stop = Arc::new(AtomicBool::new(false));
    let detector = build::detector(&cfg, &schema).unwrap();
    let responder = build::responder(&cfg, &schema).unwrap();
    let (shared, rx) = Shared::new(&cfg, &schema, detector, responder, Arc::new(Metrics::default()), stop.clone(), (None, None), sink.clone(), sink.clone()).unwrap();
    Rig { shared, rx: Some(rx), sink, log, stop }
}

impl Rig {
    /// Own `parts` as an assignment with an empty changelog leaves them.
    fn own(&self, parts: &[i32]) {
        let mut core = self.shared.core.lock().unwrap();
        for &p in parts {
            core.op.twin_mut().store_mut().ensure_partition(p);
            core.owned.insert(p);
        }
    }

    /// Drive the real core loop and stages through `steps`, then stop.
    fn drive(&mut self, steps: Vec<Step>) -> Result<(), PipelineError> {
        let mut sc = SimConfig::new(4, 1000, 7);
        sc.malformed_rate = 0.0;
        let source = Arc::new(FakeSource {
            log: self.log.clone(),
            steps: Mutex::new(steps.into()),
            next: Mutex::default(),
            events: Mutex::new(Simulator::new(sc)),
            stop: self.stop.clone(),
        });
        drive(&self.shared, self.rx.take().expect("driven once"), source)?;
        self.shared.outcome()
    }

    fn verdicts(&self) -> String {
        self.shared.cfg.topics.verdicts.clone()
    }

    fn changelog(&self) -> String {
        self.shared.cfg.topics.changelog.clone()
    }
}

fn inputs(partition: i32, n: usize) -> impl Iterator<Item = Step> {
    (0..n).map(move |_| Step::Input(partition))
}

#[test]
fn batches_close_at_max_records_and_when_the_source_runs_dry() {
    let mut r = rig(3, true, FakeSink::new);
    r.own(&[0]);
    let steps = inputs(0, 7).chain([Step::Idle, Step::Idle, Step::Idle]).collect();
    r.drive(steps).unwrap();
    // Two full batches of 3, then the 7th record alone once two polls came back empty.
    assert_eq!(stored(&r.log), vec![(0, 3), (0, 6), (0, 7)]);
    assert_eq!(sent(&r.log, &r.verdicts()), 7, "one verdict per event");
}

#[test]
fn without_idle_flush_a_partial_batch_waits_for_linger_or_shutdown() {
    let mut r = rig(3, false, FakeSink::new);
    r.own(&[0]);
    let (log, verdicts) = (r.log.clone(), r.verdicts());
    let check = Box::new(move || {
        wait_until(&log, "both full batches stored", |s| s.contains(&Seen::Stored(0, 6)));
        // The 7th record stays buffered: linger (60 s) has not passed.
        assert_eq!(sent(&log, &verdicts), 6);
        assert_eq!(stored(&log), vec![(0, 3), (0, 6)]);
    });
    let steps = inputs(0, 7).chain([Step::Idle, Step::Idle, Step::Idle, Step::Call(check)]).collect();
    r.drive(steps).unwrap();
    // A graceful stop processes it.
    assert_eq!(stored(&r.log), vec![(0, 3), (0, 6), (0, 7)]);
    assert_eq!(sent(&r.log, &r.verdicts()), 7);
}

#[test]
fn outputs_are_acknowledged_before_the_changelog_and_the_changelog_before_the_offset() {
    let mut r = rig(3, true, FakeSink::holding);
    r.own(&[0]);
    let (log, sink, verdicts, changelog) = (r.log.clone(), r.sink.clone(), r.verdicts(), r.changelog());
    let check = Box::new(move || {
        wait_until(&log, "the batch's verdicts handed to the sink", |s| s.iter().filter(|e| **e == Seen::Sent(verdicts.clone())).count() == 3);
        std::thread::sleep(Duration::from_millis(200));
        // Verdicts unacknowledged: no changelog write and no offset yet.
        assert_eq!(sent(&log, &changelog), 0, "{:?}", seen(&log));
        assert!(stored(&log).is_empty());
        sink.release();
        wait_until(&log, "the changelog write", |s| s.contains(&Seen::Sent(changelog.clone())));
        std::thread::sleep(Duration::from_millis(200));
        // Changelog unacknowledged: still no offset.
        assert!(stored(&log).is_empty(), "{:?}", seen(&log));
        sink.release();
        wait_until(&log, "the offset", |s| s.contains(&Seen::Stored(0, 3)));
    });
    let steps = inputs(0, 3).chain([Step::Call(check)]).collect();
    r.drive(steps).unwrap();
    let log = seen(&r.log);
    let last = |e: &Seen| log.iter().rposition(|x| x == e).unwrap();
    let first = |e: &Seen| log.iter().position(|x| x == e).unwrap();
    assert!(last(&Seen::Acked(r.verdicts())) < first(&Seen::Sent(r.changelog())), "{log:?}");
    assert!(last(&Seen::Acked(r.changelog())) < first(&Seen::Stored(0, 3)), "{log:?}");
}

#[test]
fn a_refused_output_fails_the_run_and_stores_no_offset() {
    let mut r = rig(3, true, |log| {
        let verdicts = Config::default().topics.verdicts;
        Arc::new(FakeSink { log: log.clone(), hold: AtomicBool::new(false), refuse: Some(verdicts), held: Mutex::new(Vec::new()) })
    });
    r.own(&[0]);
    let steps = inputs(0, 6).chain([Step::Idle, Step::Idle]).collect();
    match r.drive(steps) {
        Err(PipelineError::Fatal(msg)) => assert!(msg.contains("refused by the test"), "{msg}"),
        other => panic!("expected a fatal error, got {other:?}"),
    }
    assert!(stored(&r.log).is_empty(), "{:?}", seen(&r.log));
    assert_eq!(sent(&r.log, &r.changelog()), 0, "no twin state is written past a refused verdict");
}

#[test]
fn revoke_finishes_the_partitions_records_and_waits_for_their_offsets_before_committing() {
    let mut r = rig(100, false, FakeSink::new);
    r.own(&[0, 1]);
    let (log, shared) = (r.log.clone(), r.shared.clone());
    let revoke = Box::new(move || {
        let l = log.clone();
        shared.revoke(&[0], false, || {
            l.lock().unwrap().push(Seen::Committed);
            Ok(())
        });
        // Partition 0's buffered records were processed, acknowledged and their
        // offset stored before the commit; its twins are gone with it.
        let s = seen(&log);
        let at = |e: &Seen| s.iter().position(|x| x == e);
        assert!(at(&Seen::Stored(0, 2)).unwrap() < at(&Seen::Committed).unwrap(), "{s:?}");
        assert_eq!(stored(&log), vec![(0, 2)], "partition 1 is not touched");
        let core = shared.core.lock().unwrap();
        assert!(!core.owned.contains(&0) && core.owned.contains(&1));
        assert!(core.op.twin().store().iter().all(|t| t.partition != 0));
        assert_eq!(core.buffers.get(&1).map(|b| b.records.len()), Some(2), "partition 1's batch stays open");
    });
    let steps = [Step::Input(0), Step::Input(1), Step::Input(0), Step::Input(1), Step::Call(revoke)].into_iter().collect();
    r.drive(steps).unwrap();
    assert_eq!(stored(&r.log), vec![(0, 2), (1, 2)]);
}

#[test]
fn a_lost_assignment_fails_stop_purges_and_stores_nothing() {
    let mut r = rig(3, true, FakeSink::holding);
    r.own(&[0]);
    let (log, shared) = (r.log.clone(), r.shared.clone());
    let lose = Box::new(move || {
        wait_until(&log, "the batch handed to the sink", |s| s.iter().any(|e| matches!(e, Seen::Sent(_))));
        let l = log.clone();
        shared.revoke(&[0], true, || {
            l.lock().unwrap().push(Seen::Committed);
            Ok(())
        });
    });
    let steps = inputs(0, 3).chain([Step::Call(lose)]).collect();
    match r.drive(steps) {
        Err(PipelineError::AssignmentLost(msg)) => assert!(msg.contains("lost"), "{msg}"),
        other => panic!("expected AssignmentLost, got {other:?}"),
    }
    assert!(seen(&r.log).contains(&Seen::Purged));
    assert!(stored(&r.log).is_empty(), "{:?}", seen(&r.log));
    assert_eq!(sent(&r.log, &r.changelog()), 0);
}
