//! Partitions coming and going: the consumer context's rebalance callbacks (revoke:
//! drain, commit, drop; assign: restore the twins from the changelog, then serve),
//! the restore itself with its quarantine rule, and the resume checks.

use super::*;

impl Shared {
    pub(super) fn restore(&self, core: &mut Core, parts: &[i32], deadline: Instant) -> Result<(), PipelineError> {
        let started = Instant::now();
        let left = || deadline.saturating_duration_since(Instant::now());
        // A long restore is progress, not a stall (/healthz).
        ev::Heartbeat.emit(&self.metrics);
        for &p in parts {
            core.op.twin_mut().store_mut().drop_partition(p);
            core.op.twin_mut().store_mut().ensure_partition(p);
            core.routes.remove(&p);
        }
        let op = &mut core.op;
        let routes = &mut core.routes;
        let cap = self.cfg.state.max_twin_bytes;
        let mut quarantined: Vec<OutRecord> = Vec::new();
        let changelog = self.cfg.topics.changelog.as_str();
        let read = kafka::read_changelog_at(&self.cfg, parts, left(), |p, offset, key, value| {
            if key == swap::ACTIVATIONS_KEY {
                // The partition's model activations (`model.follow`), not a twin.
                let history = match value.map(swap::parse_activations) {
                    None => Vec::new(),
                    Some(Ok(a)) => a.history,
                    Some(Err(reason)) => return Err(PipelineError::Fatal(format!("partition {p} of `{changelog}`, offset {offset}: {reason}"))),
                };
                routes.entry(p).or_default().history = history;
                return Ok(());
            }
            match restore_verdict(key, value, cap, |k, v| op.twin_mut().restore_record(p, k, v)) {
                Restore::Done => Ok(()),
                Restore::Fatal(e) => Err(PipelineError::from(e)),
                Restore::Quarantine(reason) => {
                    ev::ChangelogQuarantined { partition: p, offset, key, reason: &reason }.emit(&self.metrics);
                    // The device starts over; a twin it had is gone from memory.
                    op.twin_mut().restore_record(p, key, None).map_err(PipelineError::from)?;
                    quarantined.push(dead_letter(
                        &self.dlq_topic,
                        (changelog, p, offset),
                        Some(key.as_bytes().to_vec()),
                        value.map(<[u8]>::to_vec),
                        QUARANTINED_CHANGELOG,
                        &reason,
                        Some(self.schema_id.as_str()),
                    ));
                    Ok(())
                }
            }
        })?;
        if !quarantined.is_empty() {
            // Set aside before the partition is served: a crash now re-reads the
            // changelog and quarantines the same records again (at least once).
            let group = AckGroup::new(quarantined.len());
            self.producer.send_all(&quarantined, &group, &self.abort);
            group.wait(&self.abort).map_err(|e| PipelineError::Fatal(format!("dead letters for quarantined changelog records: {e}")))?;
            ev::QuarantineDeadLettered { records: quarantined.len() }.emit(&self.metrics);
        }
        if let Some(observer) = &self.observer {
            let restored: Vec<&Twin> = core.op.twin().store().iter().filter(|t| parts.contains(&t.partition)).collect();
            observer.restored(&restored);
        }
        for (p, n) in read {
            let twins = core.op.twin().store().iter().filter(|t| t.partition == p).count();
            ev::TwinsRestored { partition: p, twins, records_read: n, millis: started.elapsed().as_millis() }.emit(&self.metrics);
        }
        // The audit topic is its own durable head: continue each chain from the last
        // record acknowledged on its partition.
        if core.resp.audit_mut().is_some() {
            for &p in parts {
                ev::Heartbeat.emit(&self.metrics);
                let tail = kafka::read_tail(&self.cfg, &self.cfg.topics.audit, p, left())?;
                core.resp.continue_chain(p, tail.as_deref()).map_err(|e| {
                    PipelineError::Fatal(format!(
                        "audit chain of partition {p} of `{}` cannot be continued: its last record is {e}; run `twinguard audit verify`",
                        self.cfg.topics.audit
                    ))
                })?;
            }
        }
        Ok(())
    }
}

impl Shared {
    /// Compare the restored twins of `parts` with their input partitions' ends: a
    /// twin whose last applied offset is at or past the end claims events the
    /// partition does not hold (the input topic was recreated or truncated), and the
    /// replay guard would skip new events up to that offset. Reported loudly
    /// (`TwinsAheadOfInput`), never acted on silently.
    fn check_twins_against_input<C: ConsumerContext>(&self, core: &Core, consumer: &BaseConsumer<C>, parts: &[i32], deadline: Instant) {
        for &p in parts {
            let (n, max) = core
                .op
                .twin()
                .store()
                .iter()
                .filter(|t| t.partition == p)
                .fold((0usize, -1i64), |(n, m), t| (n + 1, m.max(t.last_offset)));
            if n == 0 {
                continue;
            }
            // Inside the callback's one deadline: at most 3 s a partition.
            let wait = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(3));
            if wait.is_zero() {
                ev::AssignCheckSkipped { partition: Some(p), what: "restored twins against the partition's end", why: "the assign callback's deadline passed" }.emit();
                continue;
            }
            match consumer.fetch_watermarks(&self.cfg.topics.input, p, wait) {
                Ok((_, high)) if max >= high => {
                    let twins = core.op.twin().store().iter().filter(|t| t.partition == p && t.last_offset >= high).count();
                    ev::TwinsAheadOfInput { partition: p, high_watermark: high, twins, max_last_offset: max }.emit(&self.metrics);
                }
                Ok(_) => {}
                Err(e) => ev::AssignCheckSkipped { partition: Some(p), what: "restored twins against the partition's end", why: &format!("input watermarks not read: {e}") }.emit(),
            }
        }
    }
}

impl Shared {
    /// Give up `parts` (input partitions). Normally: process their buffered
    /// records, wait until every output of theirs is acknowledged and its offset
    /// stored, `commit`, then drop their twins and buffers — the next owner starts
    /// exactly where this instance stopped. When the assignment was `lost` (this
    /// member was evicted: it stopped polling past max.poll.interval.ms, or its
    /// session timed out, e.g. a paused process), another member may own them
    /// already: fail-stop and drop what is still queued, so no late changelog or
    /// audit record of this zombie lands after the new owner's (a twin moving
    /// backwards, a forked audit chain). Offsets stay where delivery put them; the
    /// new owner replays from there.
    pub(super) fn revoke(&self, parts: &[i32], lost: bool, commit: impl FnOnce() -> Result<(), String>) {
        if lost {
            let msg = format!("assignment of partitions {parts:?} lost (evicted from the group: max.poll.interval.ms exceeded or session timed out); stopping so that only the new owner writes their state");
            if self.fatal.lock().expect("fatal lock").is_none() {
                self.lost.store(true, Ordering::SeqCst);
            }
            self.fail(msg);
            self.producer.purge();
            self.command_producer.purge();
        } else {
            self.closing.during("the revoke callback: flushing");
            let mut core = self.core.lock().expect("core lock");
            if let Err(e) = self.flush(&mut core, Some(parts)) {
                self.fail(format!("flushing revoked partitions: {e}"));
            }
        }
        self.closing.during("the revoke callback: waiting for outputs");
        self.drain(parts);
        // Closing after a final commit that succeeded: nothing was stored since.
        if !self.closing.committed() {
            self.closing.during("the revoke callback: committing");
            if let Err(e) = commit() {
                ev::CommitFailed { when: "on revoke", error: &e }.emit();
            }
        }
        self.closing.during("the revoke callback: dropping the partitions' twins");
        // The twins go with the partition: whoever owns it next (this instance
        // included) restores them from the changelog, which now holds all of them.
        let mut core = self.core.lock().expect("core lock");
        for p in parts {
            core.buffers.remove(p);
            core.expected.remove(p);
            core.expected_acks.remove(p);
            core.owned.remove(p);
            core.op.twin_mut().store_mut().drop_partition(*p);
            core.routes.remove(p);
            core.resp.drop_partition(*p);
            self.committed.lock().expect("committed lock").remove(p);
            if let Some(observer) = &self.observer {
                observer.partition_dropped(*p);
            }
        }
        ev::PartitionsReleased { owned: core.owned.iter().copied().collect() }.emit(&self.metrics);
    }
}

/// DLQ code of a changelog record that could not be restored.
pub const QUARANTINED_CHANGELOG: &str = "quarantined_changelog";

/// What restoring one changelog record came to.
pub enum Restore {
    Done,
    /// Set the record aside (dead letter + metric) and go on without it: it does not
    /// decode, or it is larger than `state.max_twin_bytes`.
    Quarantine(String),
    /// Stop: the changelog belongs to another schema or shape (a configuration
    /// error, not a bad record: quarantining would discard every twin).
    Fatal(twinguard_operators::OperatorError),
}

/// Restore one changelog record through `apply`, sorting failures into quarantine
/// (the record) and fatal (the configuration). The same rule serves `twinguard run`
/// and `twinguard sql`.
pub fn restore_verdict(
    key: &str,
    value: Option<&[u8]>,
    max_twin_bytes: usize,
    apply: impl FnOnce(&str, Option<&[u8]>) -> Result<(), twinguard_operators::OperatorError>,
) -> Restore {
    if let Some(v) = value.filter(|v| v.len() > max_twin_bytes) {
        return Restore::Quarantine(format!("changelog record is {} bytes, state.max_twin_bytes is {max_twin_bytes}", v.len()));
    }
    match apply(key, value) {
        Ok(()) => Restore::Done,
        Err(e @ twinguard_operators::OperatorError::Undecodable { .. }) => Restore::Quarantine(e.to_string()),
        Err(e) => Restore::Fatal(e),
    }
}

/// Consumer context: runs the rebalance protocol of the spine.
pub struct SourceContext {
    pub(super) shared: Arc<Shared>,
}

impl ClientContext for SourceContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): consumer lag of the
    /// owned input partitions, as librdkafka computes it from its fetch state.
    fn stats(&self, stats: rdkafka::Statistics) {
        let s = &self.shared;
        let Some(topic) = stats.topics.get(&s.cfg.topics.input) else { return };
        let owned = s.metrics.owned();
        let lag = topic.partitions.iter().filter(|(p, part)| owned.contains(p) && part.consumer_lag >= 0).map(|(p, part)| (*p, part.consumer_lag)).collect();
        ev::LagSampled { lag }.emit(&s.metrics);
    }
}

pub(super) fn input_partitions(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
    tpl.elements_for_topic(topic).iter().map(|e| e.partition()).collect()
}

impl ConsumerContext for SourceContext {
    /// Revoke: finish the revoked partitions' buffered records, wait until all their
    /// outputs are acknowledged and offsets stored, and commit, so the next owner
    /// starts exactly where this instance stopped.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let s = &self.shared;
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let parts = input_partitions(tpl, &s.cfg.topics.input);
        ev::Rebalanced { kind: "revoke", partitions: &parts }.emit(&s.metrics);
        let lost = consumer.assignment_lost();
        s.revoke(&parts, lost, || match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => Ok(()),
            Err(e) => Err(e.to_string()),
        });
    }

    /// Remember what the coordinator acknowledged: idle expiry only removes twins
    /// whose events lie below these offsets.
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        if result.is_err() {
            return;
        }
        let mut c = self.shared.committed.lock().expect("committed lock");
        for e in offsets.elements_for_topic(&self.shared.cfg.topics.input) {
            // A commit can succeed as a whole and fail for single partitions: only
            // what the coordinator accepted is durable.
            if e.error().is_err() {
                continue;
            }
            if let rdkafka::Offset::Offset(o) = e.offset() {
                c.insert(e.partition(), o);
            }
        }
    }

    /// Assign: restore the twins of newly owned partitions from the changelog before
    /// any of their records is processed.
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let s = &self.shared;
        let Rebalance::Assign(tpl) = rebalance else {
            if let Rebalance::Error(e) = rebalance {
                ev::RebalanceFailed { error: &e.to_string() }.emit();
            }
            return;
        };
        let parts = input_partitions(tpl, &s.cfg.topics.input);
        ev::Rebalanced { kind: "assign", partitions: &parts }.emit(&s.metrics);
        let mut core = s.core.lock().expect("core lock");
        let fresh: Vec<i32> = parts.iter().copied().filter(|p| !core.owned.contains(p)).collect();
        // One deadline for the whole callback (restore, audit tails, checks), below
        // max.poll.interval.ms (validated at start).
        let deadline = Instant::now() + Duration::from_secs(s.cfg.batch.restore_timeout_secs);
        if let Err(e) = s.restore(&mut core, &fresh, deadline) {
            s.fail(format!("restoring twins of partitions {fresh:?}: {e}"));
            return;
        }
        core.owned.extend(parts.iter().copied());
        let resume = resume_offsets(consumer, &s.cfg.topics.input, &fresh, deadline);
        s.check_twins_against_input(&core, consumer, &fresh, deadline);
        s.set_holds(&mut core, consumer, &fresh, &resume, deadline);
        core.expected.extend(resume);
        ev::PartitionsReady { owned: core.owned.iter().copied().collect(), twins: core.op.twin().store().len() }.emit(&s.metrics);
    }
}

/// The committed offsets `parts` of `topic` resume at (a broker round trip). Parts
/// without one (they start by `auto.offset.reset`) are left out, and so is
/// everything when the coordinator does not answer: this only feeds a warning.
pub(super) fn resume_offsets<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, parts: &[i32], deadline: Instant) -> HashMap<i32, i64> {
    if parts.is_empty() {
        return HashMap::new();
    }
    // Inside the callback's one deadline: at most 3 s, and nothing once it passed.
    let wait = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(3));
    if wait.is_zero() {
        ev::AssignCheckSkipped { partition: None, what: "resume gaps", why: "the assign callback's deadline passed: committed offsets not read" }.emit();
        return HashMap::new();
    }
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition(topic, *p);
    }
    // Runs inside the assign callback with the core lock held: keep the wait short.
    match consumer.committed_offsets(tpl, wait) {
        Ok(c) => c
            .elements_for_topic(topic)
            .iter()
            .filter_map(|e| if let rdkafka::Offset::Offset(o) = e.offset() { Some((e.partition(), o)) } else { None })
            .collect(),
        Err(e) => {
            ev::AssignCheckSkipped { partition: None, what: "resume gaps", why: &format!("committed offsets not read: {e}") }.emit();
            HashMap::new()
        }
    }
}
