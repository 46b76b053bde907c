//! Scale and memory of the twins (issue 17): the twins of N simulated devices in
//! one operator (one stream worker's state), built by applying 4 N simulated events
//! through the real decoder and twin operator; then a restore of 100,000
//! twins from their changelog records, as a worker does on assignment (the broker
//! read excluded: the records are in memory).
//!
//! Reports per N: twins, the store's own accounting (`mem_bytes`, what the
//! `twin_mem_bytes` metric shows) per twin, the growth of the process's resident
//! memory per twin (glibc malloc, this machine), and the apply rate; then the
//! changelog size per twin and the restore time.
//!
//! Run (outside CI): `cargo bench --workspace --profile dev --bench scale`
//! (`TWINGUARD_SCALE_TWINS=10000,100000,1000000` sets the sizes, `TWINGUARD_SCALE_RESTORE`
//! the restored twins, default 100000).

use std::time::Instant;

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
/// record of each (what compaction keeps) when asked, and the seconds it took.
fn build(schema: &EventSchema, dec: &Decoder, n: usize, keep_changelog: bool) -> (TwinOperator, Vec<twinguard_operators::ChangelogRecord>, f64) {
    // Four events per device on average: nearly every device gets a twin.
    let mut sc = SimConfig::new(n, 4 * n, 17);
    sc.start_ms = 1_750_000_000_000;
    sc.malformed_rate = 0.0;
    sc.attacked_fraction = 0.0;
    let cfg = TwinConfig { max_twins: n.max(1), ..TwinConfig::default() };
    let mut op = TwinOperator::new(schema, cfg);
    let mut changelog = std::collections::BTreeMap::new();
    let mut sim = Simulator::new(sc);
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
    (op, changelog.into_values().collect(), secs)
}

fn main() {
    let schema = EventSchema::builtin("wustl-flow-vitals/v1").unwrap();
    let dec = Decoder::new(schema.clone(), DecodeLimits::default());
    println!("| twins | store mem_bytes per twin | resident memory growth | per twin | apply rate |");
    println!("| --- | --- | --- | --- | --- |");
    for n in sizes("TWINGUARD_SCALE_TWINS", "10000,100000,1000000") {
        let before = rss_kib();
        let (op, _, secs) = build(&schema, &dec, n, false);
        let grown = rss_kib().saturating_sub(before);
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
        let (_, records, _) = build(&schema, &dec, n, true);
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
}
