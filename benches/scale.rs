//! Scale and memory of the twins (issue 17): the twins of N simulated devices in
//! one operator (one stream worker's state), built by applying 4 N simulated events
//! through the real decoder and twin operator; then a restore of 100,000
//! twins from their changelog records, as a worker does on assignment (the broker
//! read excluded: the records are in memory).
//!
//! Reports per N: twins, the store's own accounting (`mem_bytes`, what the
//! `twin_mem_bytes` metric shows) per twin, the growth of the process's resident
//! memory per twin (glibc malloc, this machine) while the twins are built (from
//! after the simulator set up its N devices: ~0.5 KB each, which a pipeline does
//! not hold), and the apply rate; then the
//! changelog size per twin and the restore time.
//!
//! Then SQL over the twins of `TWINGUARD_SCALE_SQL` devices (default 1,000,000): the
//! operator's twins handed to the SQL view as a restore hands them, the time until
//! the view publishes them all, its Arrow size, and the latency of two queries
//! through the same DataFusion session the SQL endpoint serves.
//!
//! Run (outside CI): `cargo bench --workspace --profile dev --bench scale`
//! (`TWINGUARD_SCALE_TWINS=10000,100000,1000000` sets the sizes, `TWINGUARD_SCALE_RESTORE`
//! the restored twins, default 100000).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use twinguard::tools::sim::{SimConfig, Simulator};
use twinguard_operators::{TwinConfig, TwinOperator};
use twinguard_schemas::{DecodeLimits, Decoder, EventSchema, RawRecord};

const NOW: i64 = 1_900_000_000_000;
const CHUNK: usize = 4096;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

fn sizes(var: &str, default: &str) -> Vec<usize> {
    std::env::var(var).unwrap_or_else(|_| default.into()).split(',').filter(|s| !s.is_empty()).map(|s| s.trim().parse().expect("a number of twins")).collect()
}

/// An operator holding the twins of `n` simulated devices, the newest changelog
/// record of each (what compaction keeps) when asked, the seconds it took, and the
/// growth of resident memory (KiB) while the twins were built: measured from after
/// the simulator set up its `n` devices, which a pipeline does not hold.
fn build(schema: &EventSchema, dec: &Decoder, n: usize, keep_changelog: bool) -> (TwinOperator, Vec<twinguard_operators::ChangelogRecord>, f64, u64) {
    // Four events per device on average: nearly every device gets a twin.
    let mut sc = SimConfig::new(n, 4 * n, 17);
    sc.start_ms = 1_750_000_000_000;
    sc.malformed_rate = 0.0;
    sc.attacked_fraction = 0.0;
    let cfg = TwinConfig { max_twins: n.max(1), ..TwinConfig::default() };
    let mut op = TwinOperator::new(schema, cfg);
    let mut changelog = std::collections::BTreeMap::new();
    let mut sim = Simulator::new(sc);
    let rss0 = rss_kib();
    let started = Instant::now();
    let mut offset = 0i64;
    loop {
        let chunk: Vec<_> = sim.by_ref().take(CHUNK).collect();
        if chunk.is_empty() {
            break;
        }
        let raw: Vec<RawRecord<'_>> = chunk
            .iter()
            .enumerate()
            .map(|(i, r)| RawRecord { partition: 0, offset: offset + i as i64, key: Some(r.key.as_bytes()), payload: Some(&r.payload) })
            .collect();
        offset += chunk.len() as i64;
        let batch = dec.decode(&raw, NOW).expect("decode").batch;
        op.process_batch(batch).expect("apply");
        let records = op.drain_changelog();
        if keep_changelog {
            changelog.extend(records.into_iter().map(|r| ((r.partition, r.key.clone()), r)));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let grown = rss_kib().saturating_sub(rss0);
    (op, changelog.into_values().collect(), secs, grown)
}

fn main() {
    let schema = EventSchema::builtin("wustl-flow-vitals/v1").unwrap();
    let dec = Decoder::new(schema.clone(), DecodeLimits::default());
    println!("| twins | store mem_bytes per twin | resident memory growth | per twin | apply rate |");
    println!("| --- | --- | --- | --- | --- |");
    for n in sizes("TWINGUARD_SCALE_TWINS", "10000,100000,1000000") {
        let (op, _, secs, grown) = build(&schema, &dec, n, false);
        let twins = op.store().len();
        println!(
            "| {twins} | {} B | {:.1} MiB | {} B | {:.0} events/s |",
            op.store().mem_bytes() / twins.max(1),
            grown as f64 / 1024.0,
            grown * 1024 / twins.max(1) as u64,
            4.0 * n as f64 / secs
        );
        drop(op);
    }
    for n in sizes("TWINGUARD_SCALE_RESTORE", "100000") {
        let (_, records, _, _) = build(&schema, &dec, n, true);
        let bytes: usize = records.iter().map(|r| r.value.as_ref().map_or(0, Vec::len)).sum();
        let mut fresh = TwinOperator::new(&schema, TwinConfig { max_twins: n.max(1), ..TwinConfig::default() });
        let started = Instant::now();
        for r in &records {
            fresh.restore_record(r.partition, &r.key, r.value.as_deref()).expect("restore");
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "restore: {} twins from their newest changelog records ({} records, {} B per twin) in {:.2} s ({:.0} twins/s)",
            fresh.store().len(),
            records.len(),
            bytes / records.len().max(1),
            secs,
            fresh.store().len() as f64 / secs
        );
    }
    for n in sizes("TWINGUARD_SCALE_SQL", "1000000") {
        sql_over(&schema, &dec, n);
    }
}

/// The twins of `n` devices in the SQL view: publication time, size, query latency.
fn sql_over(schema: &EventSchema, dec: &Decoder, n: usize) {
    let (op, _, _, _) = build(schema, dec, n, false);
    let mut cfg = twinguard::config::Config::default();
    cfg.schema.name = Some(schema.id());
    let view = twinguard::sql::view::SqlView::new(cfg.sql.recent_rows);
    let feed = twinguard::sql::view::ViewFeed::for_config(view.clone(), &cfg).expect("view feed");
    let metrics = Arc::new(twinguard::Metrics::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let twins: Vec<_> = op.store().iter().collect();
    for chunk in twins.chunks(CHUNK) {
        feed.restored(chunk);
    }
    let status = twinguard::app::serve::status_fn(twinguard::app::serve::Mode::Pipeline, metrics.clone());
    let refresher = view.spawn_refresher(Duration::from_millis(100), status, metrics, stop.clone()).expect("refresher");
    while view.twins_rows() < twins.len() as u64 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let published = started.elapsed().as_secs_f64();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ctx = twinguard::sql::server::session_context(&view, 4 << 30).expect("session");
    let timed = |q: &str| {
        let mut ms: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                rt.block_on(async { ctx.sql(q).await.unwrap().collect().await.unwrap() });
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        ms[2]
    };
    let count = timed("select count(*), max(risk) from twins");
    let top = timed("select device_id, risk from twins order by risk desc limit 10");
    println!(
        "sql: {} twins published in {:.1} s ({:.0} MiB of Arrow); median of 5: count + max {:.1} ms, top 10 by risk {:.1} ms",
        view.twins_rows(),
        published,
        view.twins_bytes() as f64 / (1 << 20) as f64,
        count,
        top
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = refresher.join();
}
