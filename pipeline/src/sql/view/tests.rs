use super::*;

#[test]
fn refresh_publishes_staged_rows_and_trims_the_recent_window() {
    let view = SqlView::new(3);
    let mut r = Refresher::new(3);
    let status: StatusFn = Box::new(|| StatusRow { instance: "t".into(), mode: "pipeline".into(), ..Default::default() });
    let v = |i: i64| Verdict {
        v: 1,
        device_id: format!("d{i}"),
        event_time: "2026-01-01T00:00:00Z".into(),
        source: twinguard_schemas::verdict::SourceCoords { topic: "in".into(), partition: 0, offset: i },
        detector: "twin".into(),
        score: 0.1,
        distance: 0.0,
        anomalous: false,
        warming_up: false,
        top_metric: None,
        top_z: None,
        identity_drift: vec![],
        label: None,
        model_version: None,
        threshold: None,
        scores: None,
        attack_class: None,
    };
    view.push_batch(Some(Instant::now()), &(0..5).map(v).collect::<Vec<_>>(), &[], &[], Vec::new());
    let row = |d: &str, p: i32| TwinRow {
        device_id: d.into(),
        partition: p,
        schema: "s/v1".into(),
        device_type: None,
        criticality: None,
        first_seen_ms: 0,
        last_seen_ms: 1,
        events: 1,
        anomalies: 0,
        rate_per_s: 0.0,
        score: Some(0.2),
        risk: 0.2,
        class: None,
        firmware: None,
        reported: "{}".into(),
        desired: "{}".into(),
        delta: "{}".into(),
        in_sync: true,
        pending_commands: 0,
        incident_id: None,
        latest: "{}".into(),
        baselines: "{}".into(),
        identity: "{}".into(),
        peers: 0,
        last_offset: 0,
    };
    view.push_twins(None, vec![("a".into(), Some(row("a", 0).into())), ("b".into(), Some(row("b", 1).into()))]);
    let before = view.snapshot();
    view.refresh(&mut r, &status);
    let snap = view.snapshot();
    // The old snapshot a query may still hold is untouched.
    assert_eq!(before.verdicts[0].num_rows(), 0);
    assert_eq!(snap.verdicts[0].num_rows(), 3, "window of 3 keeps the newest");
    let offsets = snap.verdicts[0].column(4).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap();
    assert_eq!(offsets.values(), &[2, 3, 4]);
    assert_eq!(snap.twins[0].num_rows(), 2);
    assert_eq!(snap.status[0].num_rows(), 1);
    view.drop_partition(1);
    view.push_twins(None, vec![("a".into(), None)]);
    view.refresh(&mut r, &status);
    assert_eq!(view.snapshot().twins[0].num_rows(), 0, "revoked partition and tombstone both leave");
    assert_eq!(view.generation(), 2);
}

/// The stream stages twins as their changelog bytes; the refresher decodes them
/// into rows equal to those built from the live twin. Bytes that do not decode
/// remove the device's row rather than leave a stale one.
#[test]
fn encoded_twins_become_the_same_rows_and_undecodable_ones_leave() {
    let (schema, mut op) = crate::tools::testkit::simulated_twins(3, 30, 11);
    let changelog = op.drain_changelog();
    assert_eq!(changelog.len(), 3, "one changelog record per device");
    let maker = Arc::new(RowMaker::new(&schema, false));
    let staged = changelog
        .iter()
        .map(|c| (c.key.clone(), c.value.as_ref().map(|b| StagedTwin::Encoded { partition: c.partition, bytes: b.clone(), rows: maker.clone() })))
        .collect();
    let view = SqlView::new(10);
    let mut r = Refresher::new(10);
    let status: StatusFn = Box::new(StatusRow::default);
    view.push_twins(Some(Instant::now()), staged);
    view.refresh(&mut r, &status);
    assert_eq!(view.snapshot().twins[0].num_rows(), 3);
    for t in op.store().iter() {
        let from_bytes = r.twins.get(&t.device_id).expect("a row per staged twin");
        assert_eq!(from_bytes, maker.row(t));
        assert_eq!(format!("{from_bytes:?}"), format!("{:?}", maker.row(t)), "{}: row from bytes = row from the twin", t.device_id);
    }
    let gone = changelog[0].key.clone();
    view.push_twins(None, vec![(gone.clone(), Some(StagedTwin::Encoded { partition: 0, bytes: b"{not a twin".to_vec(), rows: maker }))]);
    view.refresh(&mut r, &status);
    assert_eq!(view.snapshot().twins[0].num_rows(), 2, "the undecodable change removed its row");
    assert!(r.twins.get(&gone).is_none());
}

fn twin_row(device: &str, long: usize) -> TwinRow {
    TwinRow {
        device_id: device.into(),
        partition: 0,
        schema: "s/v1".into(),
        device_type: None,
        criticality: None,
        first_seen_ms: 0,
        last_seen_ms: 1,
        events: 1,
        anomalies: 0,
        rate_per_s: 0.0,
        score: None,
        risk: 0.0,
        class: None,
        firmware: None,
        reported: "{}".into(),
        desired: "{}".into(),
        delta: "{}".into(),
        in_sync: true,
        pending_commands: 0,
        incident_id: None,
        latest: "{}".into(),
        baselines: "x".repeat(long),
        identity: "{}".into(),
        peers: 0,
        last_offset: 0,
    }
}

/// The `twins` table comes in batches bounded in rows and in string bytes: one
/// batch for the whole fleet overflows its i32 string offsets (near 850 k
/// twins, or a few rows with very long strings), which killed the refresher.
#[test]
fn sql_twins_table_is_built_in_bounded_batches() {
    let view = SqlView::new(10);
    let mut r = Refresher::new(10);
    let status: StatusFn = Box::new(StatusRow::default);
    let n = TWINS_BATCH_ROWS * 2 + 100;
    view.push_twins(None, (0..n).map(|i| (format!("d{i:06}"), Some(twin_row(&format!("d{i:06}"), 8).into()))).collect());
    view.refresh(&mut r, &status);
    let twins = view.snapshot().twins.clone();
    assert_eq!(twins.iter().map(RecordBatch::num_rows).collect::<Vec<_>>(), vec![TWINS_BATCH_ROWS, TWINS_BATCH_ROWS, 100]);
    // Long strings: split by bytes long before 2 GiB (here, a few MiB per row).
    let long = TWINS_BATCH_BYTES / 3 + 1;
    view.push_twins(None, (0..5).map(|i| (format!("long{i}"), Some(twin_row(&format!("long{i}"), long).into()))).collect());
    view.refresh(&mut r, &status);
    let twins = view.snapshot().twins.clone();
    assert_eq!(twins.iter().map(RecordBatch::num_rows).sum::<usize>(), n + 5);
    for b in &twins {
        let bytes: usize = b.columns().iter().filter_map(|c| c.as_any().downcast_ref::<arrow::array::StringArray>()).map(|a| a.value_data().len()).sum();
        assert!(bytes <= TWINS_BATCH_BYTES, "a batch holds {bytes} string bytes");
    }
    assert!(twins.len() >= 5, "long rows split into several batches: {}", twins.len());
    assert!(TWINS_BATCH_BYTES < i32::MAX as usize / 2);
    // An empty table is one empty batch (its schema for DataFusion).
    assert_eq!(twins_batches(std::iter::empty(), TWINS_BATCH_ROWS, TWINS_BATCH_BYTES).len(), 1);
}

/// A refresh that panics is reported and the refresher goes on; a refresher
/// that stops turning fails `/healthz`.
#[test]
fn sql_refresher_survives_a_failed_refresh_and_its_death_fails_health() {
    let view = SqlView::new(10);
    let metrics = Arc::new(Metrics::default());
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c = calls.clone();
    let status: StatusFn = Box::new(move || {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("status failed once");
        }
        StatusRow::default()
    });
    view.push_twins(None, vec![("a".into(), Some(twin_row("a", 1).into()))]);
    let stop = Arc::new(AtomicBool::new(false));
    let h = view.spawn_refresher(Duration::from_millis(10), status, metrics.clone(), stop.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while view.generation() < 2 {
        assert!(Instant::now() < deadline, "the refresher stopped after a failed refresh");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(metrics.sql_refresh_failures.load(Ordering::Relaxed), 1);
    assert_eq!(view.snapshot().twins[0].num_rows(), 1, "the twin staged before the failed refresh is published after it");
    assert_eq!(metrics.health(), Ok(()));
    // A dead refresher: its heartbeat stops, and health fails past the limit.
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    RefreshLimitSet { millis: 1 }.emit(&metrics);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match metrics.health() {
            Err(why) => {
                assert!(why.contains("SQL view refresher"), "{why}");
                break;
            }
            Ok(()) => assert!(Instant::now() < deadline, "health never failed"),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Twins like C6c's: one simulated device's twin (a response state, identity
/// bindings, baselines for every metric) copied under `n` device ids.
fn realistic_fleet(n: usize) -> (Arc<RowMaker>, Vec<Twin>) {
    let (schema, op) = crate::tools::testkit::simulated_twins(4, 1200, 7);
    let tmpl = op.store().iter().max_by_key(|t| t.encode().len()).unwrap().clone();
    let maker = Arc::new(RowMaker::new(&schema, false));
    let twins = (0..n)
        .map(|i| {
            let mut t = tmpl.clone();
            t.device_id = format!("c6c-{i:07}").into();
            t.partition = (i % 4) as i32;
            t
        })
        .collect();
    (maker, twins)
}

fn rss_kb(what: &str) -> i64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find(|l| l.starts_with(what)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Memory per twin of the view, as `twinguard sql` fills it (run alone:
/// `cargo test -p twinguard --lib sql_view_memory_measure -- --ignored --nocapture`,
/// TG_MEASURE_TWINS=300000 for another size).
#[test]
#[ignore]
fn sql_view_memory_measure() {
    let n: usize = std::env::var("TG_MEASURE_TWINS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let (maker, _) = realistic_fleet(0);
    let (_, one) = realistic_fleet(1);
    let enc = one[0].encode();
    let row = maker.row(&one[0]);
    eprintln!("template: changelog {} B, row strings {} B (reported {}, desired {}, delta {}, latest {}, baselines {}, identity {})",
        enc.len(), row.string_bytes(), row.reported.len(), row.desired.len(), row.delta.len(), row.latest.len(), row.baselines.len(), row.identity.len());
    let view = SqlView::new(1000);
    let mut r = Refresher::new(1000);
    let status: StatusFn = Box::new(StatusRow::default);
    let base = rss_kb("VmRSS:");
    let t0 = Instant::now();
    let mut batch = Vec::new();
    for i in 0..n {
        let mut t = one[0].clone();
        t.device_id = format!("c6c-{i:07}").into();
        t.partition = (i % 4) as i32;
        batch.push((t.device_id.to_string(), Some(StagedTwin::from(maker.row(&t)))));
        if batch.len() == 2000 {
            view.push_twins(None, std::mem::take(&mut batch));
        }
        if i % 20_000 == 19_999 {
            view.refresh(&mut r, &status);
        }
    }
    view.push_twins(None, std::mem::take(&mut batch));
    view.refresh(&mut r, &status);
    let after = rss_kb("VmRSS:");
    let peak = rss_kb("VmHWM:");
    let rows: usize = view.snapshot().twins.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows, n);
    let arrow: usize = view.snapshot().twins.iter().map(RecordBatch::get_array_memory_size).sum();
    eprintln!("{n} twins in {:?}: RSS +{} B/twin (peak +{} B/twin), arrow tables {} B/twin",
        t0.elapsed(), (after - base) * 1024 / n as i64, (peak - base) * 1024 / n as i64, arrow / n);
    // A change to every twin (a steady-state refresh of the whole fleet).
    let t1 = Instant::now();
    for i in 0..n {
        let mut t = one[0].clone();
        t.device_id = format!("c6c-{i:07}").into();
        t.events += 1;
        batch.push((t.device_id.to_string(), Some(StagedTwin::from(maker.row(&t)))));
        if batch.len() == 2000 {
            view.push_twins(None, std::mem::take(&mut batch));
        }
    }
    view.push_twins(None, batch);
    view.refresh(&mut r, &status);
    eprintln!("all changed in {:?}: RSS +{} B/twin, peak +{} B/twin", t1.elapsed(), (rss_kb("VmRSS:") - base) * 1024 / n as i64, (rss_kb("VmHWM:") - base) * 1024 / n as i64);
}

/// The chunked `twins` table equals a sorted map of the rows under random
/// upserts, removals and dropped partitions: same rows, device order, bounds kept.
#[test]
fn sql_twin_chunks_match_a_sorted_map_under_random_changes() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let (max_rows, max_bytes) = (7, 300);
    let mut chunks = TwinChunks::new(max_rows, max_bytes);
    let mut model: BTreeMap<String, TwinRow> = BTreeMap::new();
    for round in 0..60 {
        let mut changes = BTreeMap::new();
        for _ in 0..rng.random_range(0..40) {
            let d = format!("d{:03}", rng.random_range(0..200));
            let row = rng.random_bool(0.8).then(|| {
                let mut r = twin_row(&d, rng.random_range(0..60));
                r.partition = rng.random_range(0..4);
                r.events = round;
                r.score = rng.random_bool(0.5).then_some(0.5);
                r.class = rng.random_bool(0.5).then(|| "dos".to_string());
                r
            });
            changes.insert(d, row);
        }
        for (k, v) in &changes {
            match v {
                Some(r) => model.insert(k.clone(), r.clone()),
                None => model.remove(k),
            };
        }
        chunks.apply(&changes);
        if round % 15 == 14 {
            let p = rng.random_range(0..4);
            model.retain(|_, r| r.partition != p);
            chunks.drop_partition(p);
        }
        let batches = chunks.batches();
        let got: Vec<TwinRow> = batches.iter().flat_map(|b| (0..b.num_rows()).map(move |i| row_at(b, i))).collect();
        let want: Vec<TwinRow> = model.values().cloned().collect();
        assert_eq!(got, want, "round {round}");
        assert_eq!(chunks.rows(), want.len());
        assert_eq!(chunks.mem_bytes(), batches.iter().map(RecordBatch::get_array_memory_size).sum::<usize>());
        for b in &batches {
            assert!(b.num_rows() <= max_rows);
            let bytes: usize = (0..b.num_rows()).map(|i| row_at(b, i).string_bytes()).sum();
            assert!(b.num_rows() == 1 || bytes <= max_bytes, "round {round}: a chunk of {bytes} string bytes");
        }
        for (k, r) in model.iter().take(5) {
            assert_eq!(chunks.get(k).as_ref(), Some(r));
        }
        assert_eq!(chunks.get("zzz"), None);
    }
}

/// Memory: the view holds each twin once, as exactly sized Arrow columns, and
/// nothing per row besides. Before, it held every row twice (row structs in the
/// refresher and the published tables, whose builders left up to half their
/// buffers unused): ~8.8 KB of RSS per C6c-like twin, which is why `twinguard
/// sql` over 1 M twins did not fit 8 GB. Counted bytes, not time or RSS.
#[test]
fn sql_view_memory_per_twin_stays_bounded() {
    let (maker, one) = realistic_fleet(1);
    let tmpl = maker.row(&one[0]);
    let strings = tmpl.string_bytes();
    assert!(strings > 1500, "a realistic twin's row: {strings} B of strings");
    let view = SqlView::new(10);
    let mut r = Refresher::new(10);
    let status: StatusFn = Box::new(StatusRow::default);
    let n = 50_000;
    let rows = |from: usize, to: usize, events: i64| -> Vec<(String, Option<StagedTwin>)> {
        (from..to)
            .map(|i| {
                let mut row = tmpl.clone();
                // Keys arrive interleaved over 4 partitions, as `twinguard sql` reads them.
                let i = (i % 4) * (n / 4) + i / 4;
                row.device_id = format!("c6c-{i:07}");
                row.partition = (i % 4) as i32;
                row.events = events;
                (row.device_id.clone(), Some(row.into()))
            })
            .collect()
    };
    for from in (0..n).step_by(5_000) {
        view.push_twins(None, rows(from, from + 5_000, 1));
        view.refresh(&mut r, &status);
    }
    // A change to every tenth twin: only the chunks they fall in are rebuilt.
    view.push_twins(None, rows(0, n, 2).into_iter().step_by(10).collect());
    view.refresh(&mut r, &status);
    let snap = view.snapshot();
    assert_eq!(snap.twins.iter().map(RecordBatch::num_rows).sum::<usize>(), n);
    assert_eq!(view.twins_rows(), n as u64);
    let table: usize = snap.twins.iter().map(RecordBatch::get_array_memory_size).sum();
    assert_eq!(view.twins_bytes() as usize, table);
    assert!(r.pending.is_empty(), "no rows kept beside the table");
    // The published batches are the refresher's chunks, not a copy of them.
    let held: Vec<RecordBatch> = r.twins.batches();
    assert_eq!(held.len(), snap.twins.len());
    for (a, b) in held.iter().zip(&snap.twins) {
        assert!(a.columns().iter().zip(b.columns()).all(|(x, y)| Arc::ptr_eq(x, y)), "a chunk is published shared, not copied");
    }
    let per_twin = table / n;
    eprintln!("{n} twins: {per_twin} B per twin in the table ({strings} B of strings per row)");
    // Strings, 13 offsets, 12 fixed-width values and validity: about 110 B more.
    assert!(per_twin <= strings + 256, "{per_twin} B per twin in the twins table ({strings} B of strings per row)");
    assert!(snap.twins.len() < n / 1000, "{} chunks", snap.twins.len());
}
