//! Criterion benches per stage: JSON → Arrow decode, and the twin update (apply +
//! score), on batches of 1,024 seeded simulator events.
//!
//! Run: `cargo bench -p twinguard --bench stages` (results in benches/RESULTS.md).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use twinguard::tools::sim::{SimConfig, Simulator};
use twinguard_operators::{TwinConfig, TwinOperator};
use twinguard_schemas::{DecodeLimits, Decoder, EventSchema, RawRecord};

const BATCH: usize = 1024;
const NOW: i64 = 1_900_000_000_000;

fn fixture() -> Vec<(String, Vec<u8>)> {
    let mut sc = SimConfig::new(64, BATCH * 8, 1);
    sc.start_ms = 1_750_000_000_000;
    sc.malformed_rate = 0.0;
    Simulator::new(sc).map(|r| (r.key, r.payload)).collect()
}

fn raw(recs: &[(String, Vec<u8>)], base: i64) -> Vec<RawRecord<'_>> {
    recs.iter()
        .enumerate()
        .map(|(i, (k, v))| RawRecord { partition: 0, offset: base + i as i64, key: Some(k.as_bytes()), payload: Some(v) })
        .collect()
}

fn benches(c: &mut Criterion) {
    let schema = EventSchema::builtin("wustl-flow-vitals/v1").unwrap();
    let recs = fixture();
    let dec = Decoder::new(schema.clone(), DecodeLimits::default());
    let bytes: usize = recs[..BATCH].iter().map(|r| r.1.len()).sum();

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(format!("json_to_arrow/{BATCH} events ({} B avg)", bytes / BATCH), |b| {
        let r = raw(&recs[..BATCH], 0);
        b.iter(|| dec.decode(&r, NOW).unwrap())
    });
    g.finish();

    // Warm twins on the first 7 batches, then measure applying the 8th.
    let warm = dec.decode(&raw(&recs[..BATCH * 7], 0), NOW).unwrap().batch;
    let last = dec.decode(&raw(&recs[BATCH * 7..], (BATCH * 7) as i64), NOW).unwrap().batch;
    let mut g = c.benchmark_group("twin");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(format!("apply_and_score/{BATCH} events, 64 devices"), |b| {
        b.iter_batched(
            || {
                let mut op = TwinOperator::new(&schema, TwinConfig::default());
                op.process_batch(warm.clone()).unwrap();
                op
            },
            |mut op| {
                let out = op.process_batch(last.clone()).unwrap();
                (op, out)
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("changelog_encode/64 twins", |b| {
        b.iter_batched(
            || {
                let mut op2 = TwinOperator::new(&schema, TwinConfig::default());
                op2.process_batch(warm.clone()).unwrap();
                op2
            },
            |mut op2| op2.drain_changelog(),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(stages, benches);
criterion_main!(stages);
