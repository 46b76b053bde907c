//! Criterion benches of the detectors, on batches of 1,024 WUSTL-EHMS-2020 events:
//! the feature SQL (DataFusion, events ⋈ twin snapshot; also on a batch of 64, as
//! at low load), each model alone, and the whole ensemble (standardise + RF + SVM +
//! one LSTM step + twin score + stacking). One thread: criterion runs on the
//! calling thread; DataFusion is configured with one partition.
//!
//! The model is trained first on the WUSTL training split with the default
//! `twinguard train` settings (its training time is printed).
//!
//! Run: `cargo bench -p twinguard --bench detect` (results in benches/RESULTS.md);
//! `TWINGUARD_BENCH_MODEL=DIR` scores with the model in `DIR` instead of training one.

use std::path::Path;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use twinguard_train::{self as train, DatasetSpec, SplitKind, SplitSpec, TrainJob, TrainOptions};
use twinguard_models::ensemble::{Prepared, Scratch};
use twinguard_operators::features::FeatureQuery;
use twinguard_operators::{TwinConfig, TwinOperator};
use twinguard_schemas::{DecodeLimits, Decoder, EventSchema, RawRecord};

const BATCH: usize = 1024;
const SMALL: usize = 64;

fn benches(c: &mut Criterion) {
    let schema = EventSchema::builtin("wustl-flow-vitals/v1").unwrap();
    let sql = twinguard_schemas::builtin_feature_sql(&schema.id(), None).unwrap().to_string();
    let out = std::env::temp_dir().join(format!("twinguard-bench-model-{}", std::process::id()));
    let job = TrainJob {
        dataset: DatasetSpec {
            file: twinguard_schemas::testing::manifest_dir().join("../../shared/datasets/wustl-ehms-2020/train.csv"),
            schema: schema.id(),
            devices: 1,
            interval_ms: 100,
            limit: None,
            shuffle_seed: None,
            device_column: None,
            time_column: None,
        },
        schema: schema.clone(),
        feature_sql: sql.clone(),
        twin: TwinConfig::default(),
        split: SplitSpec { kind: SplitKind::Temporal, train: 0.6, validation: 0.2, seed: 42 },
        opts: TrainOptions {
            target_fpr: 0.01,
            seed: 42,
            forest: Default::default(),
            svm: Default::default(),
            lstm: Default::default(),
            boost: twinguard_models::boost::BoostParams { seed: 42, ..Default::default() },
            flip_labels: 0.0,
            screen: false,
            screen_threshold: 0.2,
            combine: Default::default(),
        },
        out: out.clone(),
    };
    // `TWINGUARD_BENCH_MODEL=DIR`: score with a model trained before (its
    // `model.json`) instead of training one here (3–4 minutes).
    let artifact = match std::env::var_os("TWINGUARD_BENCH_MODEL") {
        Some(dir) => twinguard_models::artifact::Artifact::load(Path::new(&dir)).unwrap(),
        None => {
            let t0 = Instant::now();
            let (artifact, _) = train::run_train(&job, &mut |p| match p {
                train::Progress::Step(m) => eprintln!("{m}"),
                train::Progress::Status(m) => eprint!("\r{m}"),
                train::Progress::StatusEnd => eprintln!(),
            })
            .unwrap();
            eprintln!("training + held-out scoring took {:.1} s", t0.elapsed().as_secs_f64());
            artifact
        }
    };
    let e = &artifact.ensemble;

    // Events 4096..5120 after 4096 events of warm twins; their twin snapshot.
    let records = job.dataset.load(&schema).unwrap();
    let dec = Decoder::new(schema.clone(), DecodeLimits::default());
    let raw = |from: usize, to: usize| -> Vec<RawRecord<'_>> {
        (from..to).map(|i| RawRecord { partition: 0, offset: i as i64, key: Some(records[i].0.as_bytes()), payload: Some(&records[i].1) }).collect()
    };
    let now = chrono::Utc::now().timestamp_millis();
    let mut twin = TwinOperator::new(&schema, TwinConfig::default());
    twin.process_with_context(&dec.decode(&raw(0, 4 * BATCH), now).unwrap().batch).unwrap();
    let events = dec.decode(&raw(4 * BATCH, 5 * BATCH), now).unwrap().batch;
    let (_, ctx) = twin.process_with_context(&events).unwrap();
    let mut query = FeatureQuery::new(&sql, schema.arrow_schema(), twin.context_schema()).unwrap();
    let feats = query.compute(&events, &ctx).unwrap();
    let x = e.standardizer.apply_all(&feats.values);
    // A small batch, as `flush_when_idle` closes them at low load: the next 64 events.
    let small = dec.decode(&raw(5 * BATCH, 5 * BATCH + SMALL), now).unwrap().batch;
    let (_, small_ctx) = twin.process_with_context(&small).unwrap();

    let mut g = c.benchmark_group("features");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(format!("datafusion_sql/{BATCH} events, {} features", feats.cols), |b| b.iter(|| query.compute(&events, &ctx).unwrap()));
    g.throughput(Throughput::Elements(SMALL as u64));
    g.bench_function(format!("datafusion_sql/{SMALL} events, {} features", feats.cols), |b| b.iter(|| query.compute(&small, &small_ctx).unwrap()));
    g.finish();

    let mut g = c.benchmark_group("models");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(format!("random_forest/{} trees", job.opts.forest.trees), |b| {
        let mut p = vec![0.0f32; e.forest.n_classes()];
        b.iter(|| (0..BATCH).map(|i| { e.forest.predict_proba_row(x.row(i), &mut p); p[0] }).sum::<f32>())
    });
    if let Some(boost) = &e.boost {
        g.bench_function(format!("gbdt/{} rounds", boost.rounds()), |b| b.iter(|| (0..BATCH).map(|i| boost.predict_row(x.row(i))).sum::<f32>()));
    }
    g.bench_function(format!("svm/{} support vectors", e.svm.support_vectors()), |b| {
        b.iter(|| (0..BATCH).map(|i| e.svm.decision_row(x.row(i))).sum::<f32>())
    });
    g.bench_function("lstm_step/one step per event", |b| {
        let mut state = vec![0.0f32; e.lstm.state_len()];
        b.iter(|| (0..BATCH).map(|i| e.lstm.step(x.row(i), &mut state)).sum::<f32>())
    });
    g.bench_function("random_forest_batch/tree by tree over the batch", |b| {
        let mut p = vec![0.0f32; BATCH * e.forest.n_classes()];
        b.iter(|| { e.forest.predict_proba_rows(&x.data, &mut p); p[0] })
    });
    if let Some(boost) = &e.boost {
        g.bench_function("gbdt_batch/tree by tree over the batch", |b| {
            let mut p = vec![0.0f32; BATCH];
            b.iter(|| { boost.predict_rows(&x.data, &mut p); p[0] })
        });
    }
    g.bench_function("ensemble/standardise + rf + gbdt + svm + lstm step + twin + stacking", |b| {
        let mut s = Scratch::default();
        let mut state = Vec::new();
        b.iter(|| (0..BATCH).map(|i| e.score(feats.row(i), &mut state, &mut s).ensemble).sum::<f64>())
    });
    // What the pipeline runs: the batch's stateless work once, then per event.
    g.bench_function("ensemble_batch/prepare the batch + per event svm + lstm step + twin + stacking", |b| {
        let mut p = Prepared::default();
        let mut state = Vec::new();
        b.iter(|| {
            e.prepare(&feats.values, &mut p);
            (0..BATCH).map(|i| e.score_prepared(i, feats.row(i), &mut state, &p).ensemble).sum::<f64>()
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(out);
}

criterion_group!(detect, benches);
criterion_main!(detect);
