//! One partition's micro-batch through the stages: decode, detect (twins), respond,
//! then the outputs built and handed to the producer (`dispatch`), and the copies the
//! observer gets. Acks are processed here too (they change the twins' response state).

use super::*;

impl Shared {
    /// Decode a partition's records, apply them to the twins, and hand the outputs to
    /// the sink. MUST be called with the core lock held.
    pub(super) fn process(&self, core: &mut Core, partition: i32, recs: Vec<Rec>) -> Result<(), PipelineError> {
        let Some(last) = recs.last().map(|r| r.offset) else { return Ok(()) };
        let span = tracing::info_span!("batch", partition, records = recs.len(), first_offset = recs[0].offset, last_offset = last);
        let _entered = span.enter();
        let consumed = recs.iter().map(|r| r.consumed).min();
        self.follow(core, partition, recs[0].offset)?;
        let timer = Instant::now();
        let raw: Vec<RawRecord<'_>> = recs
            .iter()
            .map(|r| RawRecord { partition, offset: r.offset, key: r.key.as_deref(), payload: r.payload.as_deref() })
            .collect();
        let now = chrono::Utc::now().timestamp_millis();
        let decoded = tracing::info_span!("decode").in_scope(|| core.decoder.decode(&raw, now))?;
        ev::StageFinished { stage: "decode", elapsed: timer.elapsed() }.emit();
        let timer = Instant::now();
        let valid = decoded.batch.num_rows();
        let mut outputs: Vec<OutRecord> = Vec::with_capacity(valid + decoded.rejects.len());
        for rej in &decoded.rejects {
            let r = &recs[rej.index];
            ev::RecordRejected { partition, offset: r.offset, code: rej.code, reason: &rej.reason }.emit(&self.metrics);
            outputs.push(dead_letter(
                &self.dlq_topic,
                (self.cfg.topics.input.as_str(), partition, r.offset),
                r.key.clone(),
                r.payload.clone(),
                rej.code.as_str(),
                &rej.reason,
                Some(self.schema_id.as_str()),
            ));
        }
        let skipped_before = core.op.twin().skipped();
        let scored = tracing::info_span!("detect", events = valid).in_scope(|| self.detect_routed(core, partition, &decoded.batch))?;
        let mut verdicts: Vec<Verdict> = verdicts_from_batch(&scored, &self.cfg.topics.input);
        ev::StageFinished { stage: "detect", elapsed: timer.elapsed() }.emit();
        let timer = Instant::now();
        let respond_span = tracing::info_span!("respond").entered();
        let mut resp = Responses::default();
        let automation = {
            let g = self.gate.lock().expect("gate lock");
            if core.resp.gate_change_pending(partition, g.suspended()) {
                let status = serde_json::to_value(g.status()).expect("gate status serialises");
                core.resp.note_gate(partition, g.suspended(), &status, now, &mut resp);
            }
            !g.suspended()
        };
        let r = core.resp.respond(core.op.twin_mut(), &decoded.batch, &mut verdicts, automation, now);
        resp.alerts.extend(r.alerts);
        resp.commands.extend(r.commands);
        resp.audit.extend(r.audit);
        drop(respond_span);
        ev::StageFinished { stage: "respond", elapsed: timer.elapsed() }.emit();
        record_verdicts(core, &verdicts);
        let mut anomalies = 0;
        let verdict_count = verdicts.len();
        for v in &verdicts {
            anomalies += usize::from(v.anomalous);
            outputs.push(OutRecord {
                topic: self.verdicts_topic.clone(),
                partition: None,
                key: v.device_id.clone().into_bytes(),
                payload: Some(serde_json::to_vec(v).expect("verdict serialises")),
                headers: Vec::new(),
                probe: None,
            });
        }
        let command_ts: Vec<Option<(i64, Instant)>> = if resp.commands.is_empty() {
            Vec::new()
        } else {
            let ts: HashMap<i64, (i64, Instant)> = recs.iter().filter_map(|r| r.ts.map(|t| (r.offset, (t, r.consumed)))).collect();
            resp.commands.iter().map(|(_, off)| off.and_then(|o| ts.get(&o).copied())).collect()
        };
        let shown = self.emit_responses(resp, &mut outputs);
        ev::BatchProcessed {
            partition,
            records: recs.len(),
            valid,
            verdicts: verdict_count,
            anomalies,
            skipped: core.op.twin().skipped() - skipped_before,
        }
        .emit(&self.metrics);
        let changelog = core.op.twin_mut().drain_changelog();
        self.publish(consumed, &verdicts, shown, &changelog);
        // Twin count per batch (O(partitions)); memory is sampled at expiry ticks (O(twins)).
        ev::TwinsCounted { twins: core.op.twin().store().len() }.emit(&self.metrics);
        let oldest_ts = recs.iter().filter_map(|r| r.ts).min();
        self.dispatch(self.input_topic.clone(), Some(partition), Some(last + 1), outputs, changelog, command_ts, oldest_ts)
    }

    /// Hand one batch's changes to the observer at once (its verdicts, alerts,
    /// commands and changed or removed twins), so a snapshot never shows half of it.
    pub(super) fn publish(&self, consumed: Option<Instant>, verdicts: &[Verdict], shown: Shown, changelog: &[ChangelogRecord]) {
        if let Some(observer) = &self.observer {
            observer.batch(consumed, verdicts, &shown.alerts, &shown.commands, changelog);
        }
    }

    /// Turn responses into records: alerts and commands keyed by device id, audit
    /// records pinned to their chain's partition.
    /// Returns copies of the alerts and commands for the observer (when there is one).
    pub(super) fn emit_responses(&self, resp: Responses, outputs: &mut Vec<OutRecord>) -> Shown {
        let rec = |topic: &Arc<str>, partition, key: &str, payload: Vec<u8>| OutRecord {
            topic: topic.clone(),
            partition,
            key: key.as_bytes().to_vec(),
            payload: Some(payload),
            headers: Vec::new(),
            probe: None,
        };
        for a in &resp.alerts {
            ev::AlertRaised { alert: a }.emit(&self.metrics);
            outputs.push(rec(&self.alerts_topic, None, &a.device_id, serde_json::to_vec(a).expect("alert serialises")));
        }
        for (c, _) in &resp.commands {
            ev::CommandIssued { command: c }.emit(&self.metrics);
            outputs.push(rec(&self.commands_topic, None, &c.device_id, serde_json::to_vec(c).expect("command serialises")));
        }
        let shown = match &self.observer {
            Some(_) => Shown { alerts: resp.alerts.clone(), commands: resp.commands.iter().map(|(c, _)| c.clone()).collect() },
            None => Shown::default(),
        };
        for (chain, bytes) in resp.audit {
            ev::AuditWritten { chain }.emit(&self.metrics);
            outputs.push(rec(&self.audit_topic, Some(chain), "", bytes));
        }
        for (chain, kind) in resp.audit_unchained {
            ev::AuditUnchained { partition: chain, kind }.emit(&self.metrics);
        }
        shown
    }

    /// Apply one device acknowledgement (a record of the acks topic, partition
    /// `partition`): reconcile the twin's desired and reported state. A malformed
    /// ack, or one for a device this instance does not hold, goes to the DLQ.
    pub(super) fn process_ack(&self, core: &mut Core, partition: i32, rec: Rec) -> Result<(), PipelineError> {
        let now = chrono::Utc::now().timestamp_millis();
        let mut resp = Responses::default();
        let mut outputs = Vec::new();
        let parsed: Result<Ack, String> = parse_control::<Ack>(rec.payload.as_deref(), "an ack")
            .and_then(|a| if a.v == RESPONSE_VERSION { Ok(a) } else { Err(format!("ack version {} unsupported (expected {RESPONSE_VERSION})", a.v)) });
        let outcome = parsed.and_then(|ack| core.resp.apply_ack(core.op.twin_mut(), partition, &ack, now, &mut resp).map(|o| (ack, o)));
        match outcome {
            Ok((ack, o)) => ev::AckApplied { device: &ack.device_id, command: &ack.command_id, reconciled: o == AckOutcome::Reconciled }.emit(&self.metrics),
            Err(reason) => outputs.push(self.control_dead_letter(&self.acks_topic, partition, rec.offset, rec.key.clone(), rec.payload.clone(), &reason)),
        }
        let shown = self.emit_responses(resp, &mut outputs);
        let changelog = core.op.twin_mut().drain_changelog();
        self.publish(Some(rec.consumed), &[], shown, &changelog);
        self.dispatch(self.acks_topic.clone(), Some(partition), Some(rec.offset + 1), outputs, changelog, Vec::new(), None)
    }

    /// A dead letter for a record of a control topic (acks, feedback).
    pub(super) fn control_dead_letter(&self, topic: &Arc<str>, partition: i32, offset: i64, key: Option<Vec<u8>>, payload: Option<Vec<u8>>, reason: &str) -> OutRecord {
        let reason = &*bound_reason(reason);
        ev::ControlRejected { topic, partition, offset, reason }.emit(&self.metrics);
        dead_letter(&self.dlq_topic, (&**topic, partition, offset), key, payload, "invalid_control_record", reason, None)
    }

    pub(super) fn dispatch(
        &self,
        topic: Arc<str>,
        partition: Option<i32>,
        next_offset: Option<i64>,
        outputs: Vec<OutRecord>,
        changelog: Vec<ChangelogRecord>,
        command_ts: Vec<Option<(i64, Instant)>>,
        oldest_ts: Option<i64>,
    ) -> Result<(), PipelineError> {
        let phase1 = AckGroup::new(outputs.len());
        // Commands are acknowledged through probes, in the order they were emitted.
        let mut outputs = outputs;
        let mut commands = Vec::with_capacity(command_ts.len());
        let mut ts = command_ts.into_iter();
        for r in outputs.iter_mut().filter(|r| r.topic == self.commands_topic) {
            let probe = AckGroup::probe(&phase1);
            r.probe = Some(probe.clone());
            commands.push((ts.next().flatten(), probe));
        }
        if let Some(p) = partition {
            self.inflight_add(p);
        }
        if commands.is_empty() {
            self.producer.send_all(&outputs, &phase1, &self.abort);
        } else {
            let (cmds, rest): (Vec<OutRecord>, Vec<OutRecord>) = outputs.into_iter().partition(|r| r.topic == self.commands_topic);
            self.command_producer.send_all(&cmds, &phase1, &self.abort);
            self.producer.send_all(&rest, &phase1, &self.abort);
        }
        let tx = self.to_changelog.lock().expect("sender lock").clone();
        let job = Job { topic, partition, next_offset, phase1, changelog, oldest_ts, commands };
        match tx.map(|tx| tx.send(job)) {
            Some(Ok(())) => Ok(()),
            _ => {
                if let Some(p) = partition {
                    self.inflight_done(p);
                }
                Err(PipelineError::Fatal("the commit stages have stopped (after an earlier failure)".into()))
            }
        }
    }

    /// Process every buffered record of `parts` (all partitions when None).
    pub(super) fn flush(&self, core: &mut Core, parts: Option<&[i32]>) -> Result<(), PipelineError> {
        let keys: Vec<i32> = core.buffers.keys().copied().filter(|p| parts.is_none_or(|ps| ps.contains(p))).collect();
        for p in keys {
            if let Some(buf) = core.buffers.remove(&p) {
                self.process(core, p, buf.records)?;
            }
        }
        Ok(())
    }
}

/// Alerts and commands of one batch, copied for the observer.
#[derive(Default)]
pub(super) struct Shown {
    alerts: Vec<Alert>,
    commands: Vec<twinguard_schemas::respond::Command>,
}

/// Note each verdict's score on its twin (latest score, risk) and count verdicts by
/// class and scores per model.
pub(super) fn record_verdicts(core: &mut Core, verdicts: &[Verdict]) {
    for v in verdicts {
        core.op.twin_mut().note_verdict(v.source.partition, &v.device_id, v.score, v.attack_class.as_deref());
    }
    ev::VerdictsScored { verdicts }.emit();
}

/// A dead letter for the DLQ topic: the original key and bytes with the reason, a
/// stable code and the source coordinates in headers. It fits the broker's message
/// size whatever the input (see [`DeadLetter::build`]).
pub(super) fn dead_letter(
    dlq_topic: &Arc<str>,
    (topic, partition, offset): (&str, i32, i64),
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    code: &str,
    reason: &str,
    schema: Option<&str>,
) -> OutRecord {
    let dl = DeadLetter::build(Source { topic, partition, offset }, key, payload, code, reason, schema);
    OutRecord { topic: dlq_topic.clone(), partition: None, key: dl.key, payload: Some(dl.value), headers: dl.headers, probe: None }
}
