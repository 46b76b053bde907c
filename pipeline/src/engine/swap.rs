//! Model versions in a running pipeline (`model.follow`): each partition switches
//! to the version a [`ModelFeed`] offers at a batch boundary, and remembers from
//! which offset it scores with which version, durably, before it uses it.
//!
//! Contract:
//! - When the feed names a new version, every owned partition switches at once:
//!   the one whose batch is next from that batch's first offset, the others from
//!   their next unprocessed offset.
//! - An activation (partition, version, first offset) is written to the changelog
//!   (key [`ACTIVATIONS_KEY`], the partition's whole recent history in one compacted
//!   record) and, with an audit key, as `model_activated` to the partition's chain,
//!   and both are acknowledged before any event is scored with the version.
//! - An event is scored with the version of the last activation at or before its
//!   offset (before the first: the configured model, or the twin alone). So a replay
//!   after a crash scores every event with the version it had before, and its
//!   verdict is byte-identical (the LSTM state is reset on a version change by the
//!   detector, deterministically).
//! - A partition activates a new version only at an offset no earlier process can
//!   have scored: at or past the end its input had when the partition was assigned
//!   (`hold_until`), when it had been processed before (a committed offset or
//!   restored twins). A restart with a backlog finishes the backlog on the version
//!   it had.
//! - A version the detector refuses (another schema, other twin settings, features
//!   that do not plan) is never activated; it is reported once and the partitions
//!   keep their version.

use std::collections::HashMap;

use arrow::array::{Array, Int64Array, RecordBatch};
use serde::{Deserialize, Serialize};
use twinguard_models::Artifact;
use twinguard_schemas::fields;
use twinguard_schemas::respond::AuditKind;

use super::*;

/// Changelog key of a partition's activation history. Device ids never hold a
/// control character (the decoder refuses them), so no twin can collide with it.
pub const ACTIVATIONS_KEY: &str = "\u{1}twinguard/model-activations";
/// Activations kept per partition (older ones precede every offset still replayable).
const HISTORY: usize = 16;

/// One switch of a partition's model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activation {
    pub version: String,
    /// SHA-256 of the artifact as published.
    pub sha256: String,
    /// The first input offset scored with `version`.
    pub first_offset: i64,
}

/// The changelog value under [`ACTIVATIONS_KEY`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activations {
    pub v: u32,
    pub partition: i32,
    pub history: Vec<Activation>,
}

/// A model version a feed offers, verified.
#[derive(Debug, Clone)]
pub struct Published {
    pub version: String,
    pub sha256: String,
    pub artifact: Artifact,
}

/// Where a following pipeline learns of published versions (the federation's
/// model topic, in `app::follow`).
pub trait ModelFeed: Send + Sync {
    /// The version partitions should run now (None: nothing published yet).
    fn wanted(&self) -> Option<Arc<Published>>;
    /// A version the feed has seen (a restored partition's activation).
    fn get(&self, version: &str) -> Option<Arc<Published>>;
    /// What the feed reads, for messages.
    fn describe(&self) -> String;
}

/// A partition's activations and the offset before which it may not switch.
#[derive(Debug, Clone, Default)]
pub(super) struct Route {
    pub history: Vec<Activation>,
    pub hold_until: i64,
}

impl Route {
    /// The version of the last activation at or before `offset` (None: before the first).
    fn version_at(&self, offset: i64) -> Option<&str> {
        self.history.iter().rev().find(|a| a.first_offset <= offset).map(|a| a.version.as_str())
    }
}

/// Parse a changelog activation record.
pub fn parse_activations(value: &[u8]) -> Result<Activations, String> {
    let a: Activations = serde_json::from_slice(value).map_err(|e| format!("model activation record does not parse: {e}"))?;
    if a.v != 1 {
        return Err(format!("model activation record format v{} unsupported", a.v));
    }
    Ok(a)
}

impl Shared {
    /// Switch to the feed's wanted version when it differs from what `partition`
    /// runs: `partition` from `first` (its batch's first offset), and every other
    /// owned partition from its next unprocessed offset where that is known (the
    /// others at their next batch), each only where it may switch
    /// (`hold_until`); returns once the activations are durable. Switching every
    /// partition at once means a crash cannot leave some partitions to switch later,
    /// behind a restart's hold, than an uninterrupted run would have.
    pub(super) fn follow(&self, core: &mut Core, partition: i32, first: i64) -> Result<(), PipelineError> {
        let Some(feed) = &self.feed else { return Ok(()) };
        let Some(w) = feed.wanted() else { return Ok(()) };
        let runs = |core: &Core, p: i32| core.routes.get(&p).and_then(|r| r.history.last()).is_some_and(|a| a.version == w.version);
        if runs(core, partition) || core.refused.contains(&w.version) {
            return Ok(());
        }
        let mut at: Vec<(i32, i64)> = vec![(partition, first)];
        for &q in core.owned.iter().filter(|&&q| q != partition) {
            let buffered = core.buffers.get(&q).and_then(|b| b.records.first()).map(|r| r.offset);
            let next = match (buffered, core.expected.get(&q)) {
                (Some(b), Some(&e)) => Some(b.min(e)),
                (b, e) => b.or(e.copied()),
            };
            if let Some(o) = next.filter(|_| !runs(core, q)) {
                at.push((q, o));
            }
        }
        at.retain(|(q, o)| *o >= core.routes.get(q).map_or(0, |r| r.hold_until));
        if at.is_empty() {
            return Ok(());
        }
        if !core.op.has_model(&w.version) {
            if let Err(e) = core.op.add_model(w.artifact.clone()) {
                ev::ModelRefused { version: &w.version, reason: &e.to_string() }.emit();
                core.refused.insert(w.version.clone());
                return Ok(());
            }
        }
        let mut out = Vec::new();
        let mut done = Vec::new();
        for (q, o) in at {
            let route = core.routes.entry(q).or_default();
            let replaced = route.history.last().map(|a| a.version.clone()).or_else(|| core.op.model_version().map(str::to_string));
            route.history.push(Activation { version: w.version.clone(), sha256: w.sha256.clone(), first_offset: o });
            let drop = route.history.len().saturating_sub(HISTORY);
            route.history.drain(..drop);
            let record = Activations { v: 1, partition: q, history: route.history.clone() };
            out.push(OutRecord {
                topic: self.cfg.topics.changelog.as_str().into(),
                partition: Some(q),
                key: ACTIVATIONS_KEY.as_bytes().to_vec(),
                payload: Some(serde_json::to_vec(&record).expect("activations serialise")),
                headers: Vec::new(),
                probe: None,
            });
            if let Some(log) = core.resp.audit_mut().filter(|l| l.has_chain(q)) {
                let body = serde_json::json!({
                    "version": w.version, "sha256": w.sha256, "replaced": replaced, "first_offset": o,
                    "input": format!("{}:{q}", self.cfg.topics.input),
                });
                let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                for (_, bytes) in log.append_all(q, AuditKind::ModelActivated, now, None, body) {
                    out.push(OutRecord { topic: self.audit_topic.clone(), partition: Some(q), key: Vec::new(), payload: Some(bytes), headers: Vec::new(), probe: None });
                }
            }
            done.push((q, o, replaced));
        }
        let group = AckGroup::new(out.len());
        self.producer.send_all(&out, &group, &self.abort);
        group.wait(&self.abort).map_err(|e| PipelineError::Fatal(format!("recording the activation of model {}: {e}", w.version)))?;
        for (q, o, replaced) in &done {
            ev::ModelActivated { partition: *q, version: &w.version, first_offset: *o, replaced: replaced.as_deref() }.emit(&self.metrics);
        }
        failpoint("model_activated");
        Ok(())
    }

    /// Score `batch` (one partition's events in offset order) with the version each
    /// event's offset falls under; the verdict batch.
    pub(super) fn detect_routed(&self, core: &mut Core, partition: i32, batch: &RecordBatch) -> Result<RecordBatch, PipelineError> {
        let route = match core.routes.get(&partition) {
            Some(r) if !r.history.is_empty() => r.clone(),
            _ => return Ok(core.op.detect(batch)?.0),
        };
        let offsets = batch
            .column_by_name(fields::SRC_OFFSET)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            .ok_or_else(|| PipelineError::Internal("decoded batch without an offset column".into()))?;
        let default = core.op.model_version().map(str::to_string);
        let version_of = |i: usize| route.version_at(offsets.value(i)).map(str::to_string).or_else(|| default.clone());
        let mut outs = Vec::new();
        let mut start = 0;
        for i in 1..=batch.num_rows() {
            if i < batch.num_rows() && version_of(i) == version_of(start) {
                continue;
            }
            let version = version_of(start);
            if let Some(v) = &version {
                self.load(core, partition, v, offsets.value(start))?;
            }
            outs.push(core.op.detect_as(&batch.slice(start, i - start), version.as_deref())?.0);
            start = i;
        }
        match outs.len() {
            0 => Ok(core.op.detect(batch)?.0),
            1 => Ok(outs.pop().expect("one")),
            _ => arrow::compute::concat_batches(&outs[0].schema(), &outs).map_err(|e| PipelineError::Internal(format!("joining verdict batches: {e}"))),
        }
    }

    /// Make sure `version` is loaded (a restored partition's activation names it).
    fn load(&self, core: &mut Core, partition: i32, version: &str, offset: i64) -> Result<(), PipelineError> {
        if core.op.has_model(version) {
            return Ok(());
        }
        let feed = self.feed.as_ref().ok_or_else(|| PipelineError::config("model.follow", format!("partition {partition} scores offset {offset} with model {version} (its activation record on the changelog), but the pipeline follows no model topic")))?;
        let p = feed.get(version).ok_or_else(|| {
            PipelineError::Fatal(format!(
                "partition {partition} scores offset {offset} with model {version} (its activation record on the changelog), but {} does not hold that version",
                feed.describe()
            ))
        })?;
        core.op.add_model(p.artifact.clone()).map_err(|e| PipelineError::Fatal(format!("model {version}, activated on partition {partition}: {e}")))?;
        Ok(())
    }

    /// After `parts` were restored: the offset before which each may not switch
    /// (the input's end now, where it was processed before; nothing otherwise).
    pub(super) fn set_holds<C: ConsumerContext>(&self, core: &mut Core, consumer: &BaseConsumer<C>, parts: &[i32], committed: &HashMap<i32, i64>, deadline: Instant) {
        if self.feed.is_none() {
            return;
        }
        for &p in parts {
            // Processed before: a committed offset, restored twins, or an activation
            // history (the committed offsets may not have been read in time).
            let seen = committed.contains_key(&p)
                || core.routes.get(&p).is_some_and(|r| !r.history.is_empty())
                || core.op.twin().store().iter().any(|t| t.partition == p);
            let hold = if !seen {
                0
            } else {
                let wait = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(3));
                match consumer.fetch_watermarks(&self.cfg.topics.input, p, wait) {
                    Ok((_, high)) => high,
                    Err(e) => {
                        // Not knowing where replays end, never switch before the next assignment.
                        ev::AssignCheckSkipped { partition: Some(p), what: "the offset a new model may start at", why: &format!("input watermarks not read ({e}): partition keeps its model until it is assigned again") }.emit();
                        i64::MAX
                    }
                }
            };
            core.routes.entry(p).or_default().hold_until = hold;
        }
    }
}

/// A test hook: with `TWINGUARD_PAUSE_AT=<point>` the process stops at `point` and
/// waits to be killed (the crash tests SIGKILL it there). Off unless set.
pub(super) fn failpoint(point: &str) {
    if std::env::var("TWINGUARD_PAUSE_AT").is_ok_and(|p| p == point) {
        tracing::warn!(point, "paused at failpoint (TWINGUARD_PAUSE_AT)");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_scored_with_the_last_activation_at_or_before_it() {
        let a = |v: &str, o| Activation { version: v.into(), sha256: String::new(), first_offset: o };
        let r = Route { history: vec![a("v1", 10), a("v2", 20)], hold_until: 0 };
        assert_eq!([5, 10, 19, 20, 99].map(|o| r.version_at(o)), [None, Some("v1"), Some("v1"), Some("v2"), Some("v2")]);
        let rec = Activations { v: 1, partition: 3, history: r.history.clone() };
        assert_eq!(parse_activations(&serde_json::to_vec(&rec).unwrap()).unwrap().history, r.history);
        assert!(parse_activations(b"{\"v\":2,\"partition\":0,\"history\":[]}").unwrap_err().contains("v2"));
        assert!(ACTIVATIONS_KEY.chars().any(char::is_control), "no device id can be the activation key");
    }
}
