//! Crash: SIGKILL the pipeline mid-stream, restart it → the twins equal those of an
//! uninterrupted run, every valid event has a verdict, and duplicates are only exact
//! repeats (same key, same bytes) of the same source coordinates. Once with one
//! stream worker, once with two (`engine.workers`: each its own group member).

use std::collections::HashSet;
use std::time::Duration;

use twinguard::tools::sim::Truth;

use crate::harness::*;

#[test]
fn kill_9_mid_stream_then_restart_loses_nothing() {
    kill_9_then_restart("crash", 1);
}

#[test]
fn kill_9_of_two_workers_then_restart_with_two_loses_nothing() {
    kill_9_then_restart("crash-workers", 2);
}

fn kill_9_then_restart(name: &str, workers: usize) {
    let Setup { dir, broker: _broker, mut cfg } = Setup::new(name);
    cfg.engine.workers = Some(workers);
    // Small batches: many commit points, so the kill lands between and inside them.
    cfg.batch.max_records = 50;
    let recs = sim_records(30, 60_000, 5, 0.01);
    let coords = produce(&cfg, &recs);
    let valid: HashSet<(i32, i64)> =
        recs.iter().zip(&coords).filter(|(r, _)| !matches!(r.truth, Truth::Malformed(_))).map(|(_, c)| *c).collect();
    let path = write_config(&dir, "pipeline", &cfg);

    let mut p = PipelineProc::start(&dir, "first", &path);
    if workers > 1 {
        p.wait_log(&["starting stream workers", &format!("workers={workers}")]);
    }
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    // Kill early, on a long stream: 20,000 events took the pipeline about a second,
    // and the reader sees verdicts only after a poll, so "a third done" (and once
    // even "200 done") was already all of it by the time the signal landed.
    verdicts.until("the first verdicts", |r| r.len() >= 200);
    p.kill9();
    verdicts.drain_to_end(&cfg, &cfg.topics.verdicts);
    let at_kill = verdicts_by_coords(&verdicts.records).len();
    assert!(at_kill < valid.len(), "the kill must land mid-stream ({at_kill} of {} verdicts done)", valid.len());

    // tansu 0.6 does not always evict a SIGKILLed member from its group (the
    // restarted process can sit with an empty assignment for minutes). So the restart
    // joins a fresh group that starts from exactly the offsets the dead process
    // committed: the same resume point a real broker would hand it.
    let mut cfg2 = cfg.clone();
    cfg2.kafka.group_id = format!("{}-restarted", cfg.kafka.group_id);
    copy_committed_offsets(&cfg, &cfg2);
    let path = write_config(&dir, "restarted", &cfg2);
    let mut p = PipelineProc::start(&dir, "second", &path);
    let complete = verdicts.try_until(WAIT, |r| verdicts_by_coords(r).keys().filter(|c| valid.contains(c)).count() == valid.len());
    if !complete {
        let by = verdicts_by_coords(&verdicts.records);
        let mut missing: Vec<_> = valid.iter().filter(|c| !by.contains_key(c)).copied().collect();
        missing.sort();
        let c: rdkafka::consumer::BaseConsumer = twinguard::kafka::base_client(&cfg).create().unwrap();
        let parts: Vec<String> = (0..cfg.topics.partitions)
            .map(|p| {
                let read = verdicts.records.iter().filter(|m| rdkafka::Message::partition(*m) == p).map(rdkafka::Message::offset).max();
                let wm = rdkafka::consumer::Consumer::fetch_watermarks(&c, &cfg.topics.verdicts, p, Duration::from_secs(10));
                format!("verdicts[{p}]: read up to {read:?}, watermarks {wm:?}")
            })
            .collect();
        panic!("{} valid events lack a verdict after the restart; first: {:?}; {}", missing.len(), &missing[..missing.len().min(20)], parts.join("; "));
    }
    p.stop();
    verdicts.drain_to_end(&cfg, &cfg.topics.verdicts);

    let by = verdicts_by_coords(&verdicts.records);
    assert_eq!(by.len(), valid.len(), "verdicts exist only for valid events");
    let mut duplicated = 0;
    for (c, copies) in &by {
        assert!(copies.iter().all(|x| x == &copies[0]), "duplicates of {c:?} must be exact repeats");
        duplicated += usize::from(copies.len() > 1);
    }
    eprintln!("crash test ({workers} workers): {at_kill} verdicts before the kill, {duplicated} events re-emitted after it");

    let expected = reference_twins(&cfg, &recs, &coords);
    let got = changelog_twins(&cfg);
    assert_eq!(got.len(), expected.len(), "same devices");
    assert_twins_equal(&expected, &got);
}
