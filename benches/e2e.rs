//! End-to-end bench on the real broker (tansu, memory storage), in one run:
//!
//! 1. **passthrough**: a plain consume-and-produce loop (same client settings,
//!    idempotent producer) copies N events from one topic to another: the ceiling
//!    for this machine and broker;
//! 2. **pipeline, backlog**: the full pipeline drains the same N events (decode,
//!    twins, verdicts, changelog, offsets after acknowledgement): events/s;
//! 3. **pipeline, latency**: events produced live at half the pipeline's maximum
//!    throughput (its backlog drain rate from the first verdict on; the group join
//!    before it is start-up, not throughput; `TWINGUARD_BENCH_LOAD` sets another
//!    fraction) by a producer that is connected and has its idempotent producer id
//!    before the clock starts; verdict latency = verdict record timestamp − input record
//!    timestamp (both producer create times on this machine's clock), p50/p99; the
//!    verdicts are read once the phase is over (a reader fetching alongside would
//!    take CPU and broker time from the pipeline; the timestamps are the same);
//!    response time = input record timestamp → the command it caused acknowledged
//!    by the broker (the pipeline's own measurement: a probe on the command's
//!    delivery report), p50/p99. The phase's devices resume an hour after their
//!    last backlog event (new incidents, so new commands). The audit trail is on (signed) throughout.
//!    The SQL view is on throughout, as in `twinguard run` with `[sql] listen`:
//!    during this phase a probe writes one event of a new device (50 ms after the previous one was seen) and
//!    measures **SQL freshness** = its produce acknowledged → its row visible in
//!    the published `twins` snapshot; and a query loop runs `select count(*), max(risk)
//!    from twins` through DataFusion throughout, measuring query latency under load.
//!
//! Run (release build, outside CI): `cargo bench -p twinguard --bench e2e`
//! Events: `TWINGUARD_BENCH_EVENTS` (default 1,000,000). The pipeline consumer's
//! `fetch.wait.max.ms`: `TWINGUARD_BENCH_FETCH_WAIT_MS` (default 2).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer, DefaultProducerContext};
use rdkafka::{Message, Offset, TopicPartitionList};
use twinguard::config::Config;
use twinguard::kafka::{self, NewTopicSpec};
use twinguard::tools::sim::{SimConfig, Simulator};
use twinguard::tools::testkit::Broker;
use twinguard::tools::produce;
use twinguard::Metrics;

const PARTITIONS: i32 = 4;

fn topics(cfg: &Config, extra: &[&str]) {
    let mut specs: Vec<NewTopicSpec> = cfg
        .topics
        .all()
        .into_iter()
        .map(|(t, compact)| NewTopicSpec { name: t.clone(), partitions: PARTITIONS, compact })
        .collect();
    for t in extra {
        specs.push(NewTopicSpec { name: (*t).to_string(), partitions: PARTITIONS, compact: false });
    }
    kafka::create_topics(cfg, &specs).unwrap();
}

fn reader(cfg: &Config, topic: &str, group: &str) -> BaseConsumer {
    let mut c = kafka::base_client(cfg);
    c.set("group.id", group).set("enable.auto.commit", "false").set("fetch.wait.max.ms", "10");
    let consumer: BaseConsumer = c.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    consumer
}

fn passthrough(cfg: &Config, n: usize, out_topic: &str) -> f64 {
    let consumer = reader(cfg, &cfg.topics.input, "bench-passthrough");
    let producer: ThreadedProducer<DefaultProducerContext> = kafka::producer_config(cfg).create().unwrap();
    let started = Instant::now();
    let mut seen = 0;
    while seen < n {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let key = m.key().unwrap_or_default().to_vec();
            let payload = m.payload().unwrap_or_default().to_vec();
            loop {
                match producer.send(BaseRecord::to(out_topic).key(&key).payload(&payload)) {
                    Ok(()) => break,
                    Err((_, _)) => producer.poll(Duration::from_millis(1)),
                }
            }
            seen += 1;
        }
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

// Kept whole: the bench is one sequence of phases (backlog drain, paced latency
// phase, report) over one broker and one pipeline run, each phase reading the state
// the previous one left (metrics, the SQL view, the reader's position); one script
// keeps the order of the measurements visible.
fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let n: usize = std::env::var("TWINGUARD_BENCH_EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let dir = std::env::temp_dir().join(format!("twinguard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broker = Broker::start(&dir);
    let mut cfg = broker.config("bench");
    cfg.batch.max_records = 1000;
    cfg.batch.max_linger_ms = 20;
    // tansu 0.6 answers every fetch only once fetch.wait.max.ms has passed: it
    // reads, then sleeps out the rest of the wait, data or not (tansu-storage
    // `service/fetch.rs`). So the pipeline's consumer polls it briskly here: an event
    // that arrives during a fetch waits out the rest of it (a Kafka broker answers as
    // data arrives, and the default 500 ms is right there).
    cfg.kafka.consumer.insert("fetch.wait.max.ms".into(), std::env::var("TWINGUARD_BENCH_FETCH_WAIT_MS").unwrap_or_else(|_| "2".into()));
    let key = dir.join("audit.key");
    std::fs::write(&key, "11".repeat(32)).unwrap();
    cfg.audit.signing_key_file = Some(key);
    // Measure response time, do not gate on it (the backlog phase would suspend).
    cfg.gating.max_response_ms = 1e9;
    // TWINGUARD__* variables override any key, as for `twinguard run`.
    let layered = dir.join("bench.toml");
    std::fs::write(&layered, toml::to_string(&cfg).unwrap()).unwrap();
    let cfg = Config::load(Some(&layered), std::env::vars()).unwrap();
    topics(&cfg, &["bench.passthrough", "bench.warmup"]);

    let mut sc = SimConfig::new(200, n, 3);
    sc.malformed_rate = 0.0;
    let mut backlog_end_ms = i64::MIN;
    let recs: Vec<(String, Vec<u8>)> = Simulator::new(sc)
        .map(|r| {
            backlog_end_ms = backlog_end_ms.max(r.event_time_ms);
            (r.key, r.payload)
        })
        .collect();
    let bytes: usize = recs.iter().map(|r| r.1.len()).sum();
    eprintln!("producing {n} events ({} B avg) into tansu at {}", bytes / n, broker.bootstrap);
    let t = Instant::now();
    produce::produce_all(&cfg, &cfg.topics.input, recs, None, |_, _| {}).unwrap();
    let produce_rate = n as f64 / t.elapsed().as_secs_f64();

    eprintln!("passthrough...");
    let ceiling = passthrough(&cfg, n, "bench.passthrough");

    eprintln!("pipeline (backlog)...");
    let metrics = Arc::new(Metrics::default());
    let stop = Arc::new(AtomicBool::new(false));
    let view = twinguard::sql::view::SqlView::new(cfg.sql.recent_rows);
    view.spawn_refresher(
        Duration::from_millis(cfg.sql.refresh_ms),
        twinguard::app::serve::status_fn(twinguard::app::serve::Mode::Pipeline, metrics.clone()),
        metrics.clone(),
        stop.clone(),
    )
    .unwrap();
    let probe_view = view.clone();
    let freshness_view = view.clone();
    let started = Instant::now();
    let handle = {
        let (cfg, metrics, stop) = (cfg.clone(), metrics.clone(), stop.clone());
        let feed = twinguard::sql::view::ViewFeed::for_config(view, &cfg).unwrap();
        std::thread::spawn(move || twinguard::engine::run_with(&cfg, metrics, stop, Some(feed)))
    };
    let verdicts = reader(&cfg, &cfg.topics.verdicts, "bench-verdicts");
    let mut seen = 0usize;
    let mut first_verdict: Option<Instant> = None;
    while seen < n {
        if let Some(Ok(_)) = verdicts.poll(Duration::from_millis(100)) {
            first_verdict.get_or_insert_with(Instant::now);
            seen += 1;
        }
        assert!(!handle.is_finished(), "pipeline stopped early");
    }
    let total = started.elapsed().as_secs_f64();
    let steady = first_verdict.map_or(total, |f| f.elapsed().as_secs_f64());
    let rate = n as f64 / total;
    // The pipeline's maximum throughput: its drain rate once it runs (the group join
    // before the first verdict is start-up, not throughput). Latency is measured at
    // a fraction of it: half unless TWINGUARD_BENCH_LOAD says otherwise.
    let steady_rate = n as f64 / steady;
    let fraction: f64 = match std::env::var("TWINGUARD_BENCH_LOAD") {
        Err(_) => 0.5,
        Ok(s) => s.parse().ok().filter(|f| *f > 0.0 && *f <= 1.0).unwrap_or_else(|| panic!("TWINGUARD_BENCH_LOAD={s}: want a fraction in (0, 1]")),
    };
    let load = steady_rate * fraction;

    eprintln!("pipeline (latency at {:.0} % of its rate: {load:.0} events/s)...", fraction * 100.0);
    let lat_n = (load * 20.0) as usize; // ~20 s of traffic
    // The same devices (same seed: same identities and firmware) an hour after their
    // last backlog event in event time: their attacks are new incidents, so they
    // cause new commands, and no device's clock runs backwards.
    let mut sc = SimConfig::new(200, lat_n, 3);
    sc.malformed_rate = 0.0;
    sc.start_ms = backlog_end_ms + 3_600_000;
    let responses_before = metrics.response_times().len();
    let freshness_before = freshness_view.freshness_ms().len();
    let commands_before = Metrics::get(&metrics.commands_out);
    let recs: Vec<(String, Vec<u8>)> = Simulator::new(sc).map(|r| (r.key, r.payload)).collect();
    // The verdicts are read after the phase, not during it: their timestamps are the
    // pipeline's create times, so reading later measures the same latency, and a
    // reader fetching alongside would compete with the pipeline for the two cores and
    // for tansu (whose fetch lists every batch stored in the partition, so its cost
    // grows with the topic). The reader is paused before the phase's first event,
    // while its position is the end of the backlog's verdicts: a batch boundary, which
    // tansu can serve from on resume (it cannot from inside a stored batch).
    let assigned = verdicts.assignment().unwrap();
    verdicts.pause(&assigned).unwrap();
    let coords = {
        let cfg = cfg.clone();
        let target = load;
        std::thread::spawn(move || produce::produce_all(&cfg, &cfg.topics.input, recs, Some(target), |_, _| {}).unwrap())
    };
    let probes = {
        let (cfg, view, stop) = (cfg.clone(), probe_view.clone(), stop.clone());
        let template = Simulator::new(SimConfig::new(1, 1, 77)).next().unwrap();
        std::thread::spawn(move || sql_probes(&cfg, &view, &template, Duration::from_secs(18), &stop))
    };
    let queries = {
        let (view, stop) = (probe_view.clone(), stop.clone());
        std::thread::spawn(move || query_loop(&view, Duration::from_secs(18), &stop))
    };
    let coords = coords.join().unwrap();
    // The probes' events are input too: each has a verdict among the phase's.
    let (mut fresh, probe_events) = probes.join().unwrap();
    let phase_events = lat_n + probe_events;
    let expected = (n + phase_events) as u64;
    let (mut last, mut moved) = (0, Instant::now());
    loop {
        let out = Metrics::get(&metrics.verdicts_out);
        if out >= expected {
            break;
        }
        if out != last {
            (last, moved) = (out, Instant::now());
        }
        assert!(
            moved.elapsed() < Duration::from_secs(60),
            "verdicts stalled at {out} of {expected} for 60 s ({} input records skipped at a resume gap, {} rebalances)",
            Metrics::get(&metrics.input_gap_records),
            Metrics::get(&metrics.rebalances)
        );
        assert!(!handle.is_finished(), "pipeline stopped early");
        std::thread::sleep(Duration::from_millis(50));
    }
    verdicts.resume(&assigned).unwrap();
    let mut raw_verdicts: Vec<(Vec<u8>, i64)> = Vec::with_capacity(phase_events);
    let mut moved = Instant::now();
    while raw_verdicts.len() < phase_events {
        if let Some(Ok(m)) = verdicts.poll(Duration::from_millis(100)) {
            raw_verdicts.push((m.payload().unwrap().to_vec(), m.timestamp().to_millis().unwrap()));
            moved = Instant::now();
        }
        assert!(moved.elapsed() < Duration::from_secs(60), "verdict reader stalled at {} of {phase_events} for 60 s", raw_verdicts.len());
    }
    let lat_verdicts: HashMap<(i32, i64), i64> = raw_verdicts
        .into_iter()
        .map(|(p, ts)| {
            let v: twinguard_schemas::verdict::Verdict = serde_json::from_slice(&p).unwrap();
            ((v.source.partition, v.source.offset), ts)
        })
        .collect();
    let input = reader(&cfg, &cfg.topics.input, "bench-input");
    let acked = coords.len();
    let wanted: std::collections::HashSet<(i32, i64)> = coords.into_iter().collect();
    let mut lat = Vec::with_capacity(lat_n);
    let mut scanned = 0;
    while lat.len() < wanted.len() && scanned < n + phase_events {
        if let Some(Ok(m)) = input.poll(Duration::from_millis(100)) {
            scanned += 1;
            let c = (m.partition(), m.offset());
            if wanted.contains(&c) {
                if let Some(vt) = lat_verdicts.get(&c) {
                    lat.push((vt - m.timestamp().to_millis().unwrap()) as f64);
                }
            }
        }
    }
    let mut staged: Vec<f64> = freshness_view.freshness_ms().into_iter().skip(freshness_before).collect();
    let mut qlat = queries.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let report = handle.join().unwrap().unwrap();
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    let mut resp: Vec<f64> = metrics.response_times()[responses_before..].to_vec();
    let commands = Metrics::get(&metrics.commands_out) - commands_before;

    println!("\n== twinguard end-to-end bench (tansu 0.6.0 memory engine, {PARTITIONS} partitions) ==");
    println!("events                     {n}");
    println!("producer (load)            {produce_rate:>10.0} events/s");
    println!("passthrough ceiling        {ceiling:>10.0} events/s");
    println!("pipeline backlog drain     {rate:>10.0} events/s  ({:.0} % of passthrough) over {total:.1} s including the group join", 100.0 * rate / ceiling);
    println!("pipeline after 1st verdict {steady_rate:>10.0} events/s  ({:.0} % of passthrough)", 100.0 * steady_rate / ceiling);
    println!("config: max_records {}, max_linger_ms {}, max_inflight_batches {}", cfg.batch.max_records, cfg.batch.max_linger_ms, cfg.batch.max_inflight_batches);
    println!("verdict latency at {:.0} events/s: p50 {p50:.0} ms, p99 {p99:.0} ms ({} events)", load, lat.len());
    if resp.is_empty() {
        println!("response time: no commands issued during the latency phase");
    } else {
        let (r50, r99, rmax) = (pct(&mut resp, 0.5), pct(&mut resp, 0.99), pct(&mut resp, 1.0));
        println!(
            "response time (input → command acked) at {:.0} events/s: p50 {r50:.0} ms, p99 {r99:.0} ms, max {rmax:.0} ms ({} commands, {commands} issued)",
            load,
            resp.len()
        );
    }
    if !fresh.is_empty() {
        let (f50, f99, fmax) = (pct(&mut fresh, 0.5), pct(&mut fresh, 0.99), pct(&mut fresh, 1.0));
        println!("SQL freshness (probe event acked → row in `twins` snapshot): p50 {f50:.0} ms, p99 {f99:.0} ms, max {fmax:.0} ms ({} probes)", fresh.len());
    }
    if !staged.is_empty() {
        let (s50, s99, smax) = (pct(&mut staged, 0.5), pct(&mut staged, 0.99), pct(&mut staged, 1.0));
        println!("SQL freshness (event consumed → visible, every publication): p50 {s50:.0} ms, p99 {s99:.0} ms, max {smax:.0} ms ({} publications)", staged.len());
    }
    if !qlat.is_empty() {
        let (q50, q99) = (pct(&mut qlat, 0.5), pct(&mut qlat, 0.99));
        println!("SQL query under load (count, max over twins, DataFusion): p50 {q50:.1} ms, p99 {q99:.1} ms ({} queries)", qlat.len());
    }
    // Two acknowledgements with one coordinate would mean the broker stored one
    // record over another.
    println!("latency-phase input: {acked} records acknowledged at {} distinct coordinates, {} with a verdict", wanted.len(), lat.len());
    println!("rebalances {}  input records skipped at a resume gap {}", Metrics::get(&metrics.rebalances), Metrics::get(&metrics.input_gap_records));
    println!("alerts {}  commands {}  audit records {}", Metrics::get(&metrics.alerts_out), Metrics::get(&metrics.commands_out), Metrics::get(&metrics.audit_out));
    println!("twins {} (~{} bytes each)", report.twins, report.twin_mem_bytes / report.twins.max(1));
    println!("dlq {}  changelog records {}", Metrics::get(&metrics.dlq_out), Metrics::get(&metrics.changelog_out));
}

/// Every 50 ms (after the previous probe was seen) for `dur`: one event of a new device; the time from its produce
/// acknowledgement until the device's row is in the published `twins` snapshot (ms).
/// Returns those times and how many probe events were sent (each is an input event).
fn sql_probes(cfg: &Config, view: &twinguard::sql::view::SqlView, template: &twinguard::tools::sim::SimRecord, dur: Duration, stop: &AtomicBool) -> (Vec<f64>, usize) {
    let mut out = Vec::new();
    // One producer for every probe, warmed up on a topic the pipeline does not read:
    // a new idempotent producer holds its first record ~0.5 s for its producer id,
    // which would put that wait into the probe event's timestamp (and into the
    // response time of any command the probe device causes).
    let producer: ThreadedProducer<DefaultProducerContext> = kafka::producer_config(cfg).create().unwrap();
    producer.send(BaseRecord::<str, str>::to("bench.warmup").key("warmup").payload("")).map_err(|(e, _)| e).unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
    let end = Instant::now() + dur;
    let mut i = 0;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let id = format!("probe-{i:04}");
        i += 1;
        let payload = String::from_utf8(template.payload.clone()).unwrap().replace(&template.key, &id).into_bytes();
        producer.send(BaseRecord::to(&cfg.topics.input).key(&id).payload(&payload)).map_err(|(e, _)| e).unwrap();
        producer.flush(Duration::from_secs(30)).unwrap();
        let acked = Instant::now();
        let deadline = acked + Duration::from_secs(30);
        while Instant::now() < deadline {
            let snap = view.snapshot();
            let ids = snap.twins[0].column(0).as_any().downcast_ref::<arrow::array::StringArray>().unwrap();
            if ids.iter().any(|d| d == Some(id.as_str())) {
                out.push(acked.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (out, i)
}

/// Queries through DataFusion over the live view for `dur`: latency per query (ms).
fn query_loop(view: &Arc<twinguard::sql::view::SqlView>, dur: Duration, stop: &AtomicBool) -> Vec<f64> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ctx = twinguard::sql::server::session_context(view, 256 << 20).unwrap();
    let mut out = Vec::new();
    let end = Instant::now() + dur;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let batches = rt.block_on(async { ctx.sql("select count(*), max(risk) from twins").await.unwrap().collect().await.unwrap() });
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
        out.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(50));
    }
    out
}
