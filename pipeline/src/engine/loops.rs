//! The engine's threads: the core loop (poll, batch, process, tick), the changelog
//! and offsets stages that follow each batch's acknowledgements in order, and the
//! control loop (acks and feedback topics).

use super::*;

/// The core loop's longest consumer poll: how soon it notices `stop`.
pub(super) const POLL_MAX: Duration = Duration::from_millis(100);

pub(super) fn core_loop(s: &Arc<Shared>, source: &dyn RecordSource) -> Result<(), PipelineError> {
    let linger = Duration::from_millis(s.cfg.batch.max_linger_ms);
    let flush_when_idle = s.cfg.batch.flush_when_idle;
    let mut empty_polls = 0u32;
    let max = s.cfg.batch.max_records;
    let expiry_every = Duration::from_secs(s.cfg.batch.expiry_interval_secs.max(1));
    let mut last_expiry = Instant::now();
    let input = s.cfg.topics.input.clone();
    ev::StallLimitSet { millis: ((s.cfg.batch.restore_timeout_secs + 60) * 1000) as i64 }.emit(&s.metrics);
    while !s.stop.load(Ordering::Relaxed) && !s.failed() {
        ev::Heartbeat.emit(&s.metrics);
        let timeout = {
            let core = s.core.lock().expect("core lock");
            match core.buffers.values().map(|b| linger.saturating_sub(b.opened.elapsed())).min() {
                // Something is buffered: with `flush_when_idle`, only take what is
                // ready now (empty polls close the open batches below).
                Some(_) if flush_when_idle => Duration::ZERO,
                // Capped like the idle wait: the loop must see `stop` (SIGTERM)
                // within 100 ms, whatever the linger.
                Some(left) => left.clamp(Duration::from_millis(1), POLL_MAX),
                None => POLL_MAX,
            }
        };
        let polled = source.poll(timeout);
        // A zero-timeout poll also comes back empty after serving a statistics or
        // commit event: only two empty polls in a row mean nothing is ready.
        empty_polls = if polled.is_none() { empty_polls + 1 } else { 0 };
        let drained = empty_polls >= 2;
        if s.failed() {
            // A callback inside poll failed (e.g. a restore): process nothing more.
            break;
        }
        let mut core = s.core.lock().expect("core lock");
        match polled {
            None => {}
            Some(Err(e)) => ev::KafkaClientError { client: "consumer", error: &e, retried: true }.emit(),
            Some(Ok(m)) => match m.origin {
                Origin::Input => {
                    let p = m.partition;
                    match check_contiguity(&mut core.expected, p, m.offset) {
                        Some(Ok(at)) => ev::InputGap { partition: p, resumed_at: at, first_offset: m.offset }.emit(&s.metrics),
                        Some(Err(at)) => ev::OffsetsRewound { topic: &input, partition: p, expected: at, offset: m.offset }.emit(&s.metrics),
                        None => {}
                    }
                    let buf = core.buffers.entry(p).or_insert_with(|| PartBuf { records: Vec::with_capacity(max.min(64)), opened: Instant::now() });
                    buf.records.push(Rec { offset: m.offset, ts: m.ts, key: m.key, payload: m.payload, consumed: Instant::now() });
                    if buf.records.len() >= max {
                        let recs = core.buffers.remove(&p).map(|b| b.records).unwrap_or_default();
                        s.process(&mut core, p, recs)?;
                    }
                }
                Origin::Acks => {
                    let p = m.partition;
                    ev::ControlRecordRead { ack: true }.emit(&s.metrics);
                    match check_contiguity(&mut core.expected_acks, p, m.offset) {
                        Some(Ok(at)) => ev::ControlGap { topic: &s.acks_topic, partition: p, expected: at, offset: m.offset }.emit(&s.metrics),
                        Some(Err(at)) => ev::OffsetsRewound { topic: &s.acks_topic, partition: p, expected: at, offset: m.offset }.emit(&s.metrics),
                        None => {}
                    }
                    let rec = Rec { offset: m.offset, ts: None, key: m.key, payload: m.payload, consumed: Instant::now() };
                    s.process_ack(&mut core, p, rec)?;
                }
                Origin::Other(topic) => ev::UnexpectedRecordIgnored { topic: &topic }.emit(),
            },
        }
        let due: Vec<i32> = core
            .buffers
            .iter()
            .filter(|(_, b)| (drained && flush_when_idle) || b.opened.elapsed() >= linger)
            .map(|(p, _)| *p)
            .collect();
        for p in due {
            let recs = core.buffers.remove(&p).map(|b| b.records).unwrap_or_default();
            s.process(&mut core, p, recs)?;
        }
        if last_expiry.elapsed() >= expiry_every {
            last_expiry = Instant::now();
            let durable: HashMap<i32, i64> = {
                let c = s.committed.lock().expect("committed lock");
                core.owned.iter().filter_map(|p| c.get(p).map(|o| (*p, *o))).collect()
            };
            let now_ms = chrono::Utc::now().timestamp_millis();
            let e = core.op.twin_mut().expire(&durable, now_ms);
            if e.capped > 0 {
                ev::ExpiryCapped { expired: e.expired, left: e.capped }.emit(&s.metrics);
            }
            let expired = e.expired + e.evicted;
            ev::TwinResetsCounted { resets: core.op.twin().resets(), shed: core.op.twin().shed() }.emit(&s.metrics);
            // Commands whose device never acknowledged them.
            let now = chrono::Utc::now().timestamp_millis();
            {
                let mut g = s.gate.lock().expect("gate lock");
                if let Some(t) = g.tick(now) {
                    ev::GateChanged { transition: &t }.emit(&s.metrics);
                }
                ev::GateSampled { status: g.status().clone() }.emit(&s.metrics);
            }
            ev::StateSampled { twins: core.op.twin().store().len(), mem_bytes: core.op.twin().store().mem_bytes(), expired }.emit(&s.metrics);
            let Core { op, resp, .. } = &mut *core;
            let unacked = resp.expire_commands(op.twin_mut(), now);
            // One job per partition, counted in flight like a batch, so a revoke waits
            // for its tombstones and expiry alerts too.
            let mut by_partition: BTreeMap<i32, (Responses, Vec<ChangelogRecord>)> =
                unacked.into_iter().map(|(p, r)| (p, (r, Vec::new()))).collect();
            for rec in core.op.twin_mut().drain_changelog() {
                by_partition.entry(rec.partition).or_default().1.push(rec);
            }
            for (p, (resp, recs)) in by_partition {
                let mut outputs = Vec::new();
                let shown = s.emit_responses(resp, &mut outputs);
                s.publish(None, &[], shown, &recs);
                s.dispatch(s.input_topic.clone(), Some(p), None, outputs, recs, Vec::new(), None)?;
            }
        }
    }
    Ok(())
}

pub(super) fn changelog_stage(s: &Shared, rx: Receiver<Job>, tx: SyncSender<(Job, Arc<AckGroup>)>) {
    let topic: Arc<str> = s.cfg.topics.changelog.as_str().into();
    for job in rx {
        if let Err(e) = job.phase1.wait(&s.abort) {
            s.fail(e);
            break;
        }
        if let Some(ts) = job.oldest_ts {
            let ms = (chrono::Utc::now().timestamp_millis() - ts).max(0) as u64;
            ev::OutputsAcknowledged { latency: Duration::from_millis(ms) }.emit();
        }
        if !job.commands.is_empty() {
            // Response time: the event entered the input topic → its command was
            // acknowledged by the broker (the probe's delivery report).
            let now = chrono::Utc::now().timestamp_millis();
            let mut gate = s.gate.lock().expect("gate lock");
            for (origin, probe) in &job.commands {
                let (Some((ts, consumed)), Some(acked)) = (origin, probe.acked_at_ms()) else { continue };
                let consumed_ms = now - i64::try_from(consumed.elapsed().as_millis()).unwrap_or(i64::MAX).min(now);
                let observed = ev::ResponseTimeObserved { event_ms: *ts, consumed_ms, acked_ms: acked };
                observed.emit(&s.metrics);
                if let Some(t) = gate.observe_response_ms(observed.millis(), now) {
                    ev::GateChanged { transition: &t }.emit(&s.metrics);
                }
            }
        }
        let records: Vec<OutRecord> = job
            .changelog
            .iter()
            .map(|c| OutRecord {
                topic: topic.clone(),
                partition: Some(c.partition),
                key: c.key.clone().into_bytes(),
                payload: c.value.clone(),
                headers: Vec::new(),
                probe: None,
            })
            .collect();
        let group = AckGroup::new(records.len());
        s.producer.send_all(&records, &group, &s.abort);
        ev::ChangelogWritten { records: records.len() }.emit(&s.metrics);
        if tx.send((job, group)).is_err() {
            break;
        }
    }
}

pub(super) fn offsets_stage(s: &Shared, source: &dyn RecordSource, rx: Receiver<(Job, Arc<AckGroup>)>) {
    for (job, group) in rx {
        if let Err(e) = group.wait(&s.abort) {
            s.fail(e);
            break;
        }
        if let (Some(p), Some(next)) = (job.partition, job.next_offset) {
            // rd_kafka_offset_store takes the last processed offset and stores
            // `offset + 1`, the next record to read.
            match source.store_offset(&job.topic, p, next - 1) {
                Ok(()) => ev::OffsetsStored { partition: p, next_offset: next }.emit(&s.metrics),
                Err(e) => ev::OffsetStoreFailed { partition: p, error: &e }.emit(),
            }
        }
        if let Some(p) = job.partition {
            s.inflight_done(p);
        }
    }
}

/// The control thread: reads the alerts and feedback topics (every partition, from
/// the beginning) into the confidence gate, so every instance computes the same
/// figures and a restart rebuilds them. Malformed feedback goes to the DLQ.
pub(super) fn control_loop(s: &Shared) {
    let consumer = match kafka::assign_all(&s.cfg, &[&s.cfg.topics.alerts, &s.cfg.topics.feedback], "control") {
        Ok(c) => c,
        Err(e) => {
            s.fail(format!("control consumer (alerts, feedback): {e}"));
            return;
        }
    };
    let feedback_topic: Arc<str> = s.cfg.topics.feedback.as_str().into();
    // Caught up once every partition was read up to the end it had at start.
    let mut pending: HashMap<(String, i32), i64> = HashMap::new();
    let assigned: Vec<(String, i32)> = consumer
        .assignment()
        .map(|a| a.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect())
        .unwrap_or_default();
    for (topic, p) in assigned {
        match consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)) {
            Ok((low, high)) if high > low => {
                pending.insert((topic, p), high);
            }
            Ok(_) => {}
            Err(err) => {
                s.fail(format!("watermarks of `{topic}` [{p}]: {err}"));
                return;
            }
        }
    }
    if pending.is_empty() {
        s.gate_caught_up.store(true, Ordering::SeqCst);
    }
    while !s.stop.load(Ordering::Relaxed) && !s.failed() {
        // Liveness for `/healthz` (a control thread that stops turning fails it).
        ev::ControlHeartbeat.emit(&s.metrics);
        let Some(polled) = consumer.poll(Duration::from_millis(100)) else { continue };
        let m = match polled {
            Ok(m) => m,
            Err(e) => {
                ev::KafkaClientError { client: "control consumer", error: &e.to_string(), retried: true }.emit();
                continue;
            }
        };
        if !pending.is_empty() {
            let k = (m.topic().to_string(), m.partition());
            if pending.get(&k).is_some_and(|end| m.offset() + 1 >= *end) {
                pending.remove(&k);
                if pending.is_empty() {
                    s.gate_caught_up.store(true, Ordering::SeqCst);
                }
            }
        }
        let payload = m.payload().unwrap_or_default();
        if m.topic() == s.cfg.topics.alerts {
            // Alerts are written by the pipeline itself; one that does not parse is
            // not ours to judge (a newer version): skip it.
            if let Ok(a) = serde_json::from_slice::<Alert>(payload) {
                s.gate.lock().expect("gate lock").observe_alert(&a);
            }
            continue;
        }
        let parsed = parse_control::<Feedback>(m.payload(), "a feedback")
            .and_then(|f| if f.v == RESPONSE_VERSION { Ok(f) } else { Err(format!("feedback version {} unsupported", f.v)) })
            // Unsigned or wrongly signed feedback (with a feedback secret) is refused.
            .and_then(|f| s.gate.lock().expect("gate lock").observe_feedback(&f));
        match parsed {
            Ok(t) => {
                ev::ControlRecordRead { ack: false }.emit(&s.metrics);
                if let Some(t) = t {
                    ev::GateChanged { transition: &t }.emit(&s.metrics);
                }
            }
            Err(reason) => {
                let dl = s.control_dead_letter(&feedback_topic, m.partition(), m.offset(), m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec), &reason);
                let group = AckGroup::new(1);
                s.producer.send_all(&[dl], &group, &s.abort);
                if let Err(e) = group.wait(&s.abort) {
                    s.fail(format!("dead letter for feedback: {e}"));
                }
            }
        }
    }
}
