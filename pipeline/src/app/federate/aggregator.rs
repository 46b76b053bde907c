//! `twinguard federate aggregate`: drives the federation's rounds over Kafka and
//! publishes the model. It reads no dataset and holds no row.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use twinguard_models::federated::aggregate::federate;
use twinguard_models::federated::plan::{FederationPlan, FederationReport};
use twinguard_models::federated::protocol::{decode, encode, Link, Reply, Task};
use twinguard_models::train::{Progress, TrainOptions};
use twinguard_models::{Artifact, ModelError, Provenance};
use twinguard_schemas::respond::AuditKind;

use super::follow::{digest, ModelTopics, Pointer};
use super::transport::Transport;
use super::{FederationFile, AGGREGATOR};

/// The aggregator's side of the link: a task is one round on the plan topic; the
/// addressed sites' answers are awaited on the updates and evaluations topics.
struct KafkaLink<'t> {
    t: &'t mut Transport,
    run: String,
    seq: u64,
    names: Vec<String>,
    timeout: Duration,
    bytes: Vec<BTreeMap<String, usize>>,
}

impl Link for KafkaLink<'_> {
    fn sites(&self) -> usize {
        self.names.len()
    }

    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn ask(&mut self, to: &[usize], task: &Task) -> Result<Vec<Reply>, ModelError> {
        self.seq += 1;
        let (run, seq) = (self.run.clone(), self.seq);
        let to_names: Vec<String> = to.iter().map(|&i| self.names[i].clone()).collect();
        let plan_topic = self.t.topics.plan.clone();
        self.t.send(&plan_topic, &run, seq, task.kind(), &to_names, &encode(task)).map_err(|e| ModelError::Train(format!("{e:#}")))?;
        let mut replies: Vec<Option<Reply>> = vec![None; to.len()];
        let deadline = Instant::now() + self.timeout;
        while replies.iter().any(Option::is_none) && Instant::now() < deadline {
            let mut accept = |m: &super::envelope::Meta| {
                if m.run != run {
                    Err(format!("run `{}` is not the current run `{run}`", m.run))
                } else if m.seq != seq {
                    Err(format!("round {} is not the current round {seq}", m.seq))
                } else if !to_names.contains(&m.from) {
                    Err(format!("`{}` was not asked in round {seq}", m.from))
                } else {
                    Ok(())
                }
            };
            let got = self.t.receive(deadline.saturating_duration_since(Instant::now()), &mut accept).map_err(|e| ModelError::Train(format!("{e:#}")))?;
            let Some((_, r)) = got else { break };
            let k = to_names.iter().position(|n| *n == r.meta.from).expect("accepted senders were asked");
            if replies[k].is_some() {
                continue; // a site that restarted answers again: the first answer stands
            }
            *self.bytes[to[k]].entry(task.kind().to_string()).or_default() += r.body.len();
            replies[k] = Some(decode::<Reply>(&r.body).unwrap_or_else(|e| Err(e.to_string())));
        }
        Ok(replies.into_iter().map(|r| r.unwrap_or_else(|| Err(format!("no answer within {} s", self.timeout.as_secs())))).collect())
    }

    fn bytes(&self) -> Vec<BTreeMap<String, usize>> {
        self.bytes.clone()
    }
}

/// What the aggregator needs besides the federation file.
pub struct AggregateJob {
    pub fed: FederationFile,
    pub key: SigningKey,
    pub schema: twinguard_schemas::EventSchema,
    pub feature_sql: String,
    pub opts: TrainOptions,
    pub plan: FederationPlan,
    pub out: PathBuf,
}

/// Run one training of the federation; writes the model and `federation.json`
/// into `job.out`, publishes the model ([`publish_model`]) and the end of the run.
pub fn aggregate(job: AggregateJob, log: &mut dyn FnMut(Progress<'_>)) -> Result<(Artifact, FederationReport)> {
    let fed = &job.fed;
    let mut t = Transport::connect(fed, AGGREGATOR, job.key.clone(), &[&fed.topics().updates, &fed.topics().evaluations], false)?;
    let run = format!("{}-{:08x}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"), rand::random::<u32>());
    log(Progress::Step(&format!("federation `{}` run {run}: {} sites, plan {}", fed.id, fed.sites.len(), &t.plan[..12])));
    let names: Vec<String> = fed.sites.iter().map(|s| s.name.clone()).collect();
    let twin = twinguard_operators::TwinConfig::default();
    let (ens, report, seq) = {
        let mut link = KafkaLink { t: &mut t, run: run.clone(), seq: 0, bytes: vec![BTreeMap::new(); names.len()], names: names.clone(), timeout: Duration::from_secs(fed.round_timeout_secs) };
        let (ens, report) = federate(&mut link, &job.plan, &job.opts, twin.anomaly_threshold, log)?;
        (ens, report, link.seq)
    };
    let mut artifact = twinguard_train::federate::federation_artifact(&job.schema, &job.feature_sql, &twin, ens, &job.opts, &report, &fed.id, &t.plan);
    artifact.provenance = Some(Provenance { dp: report.privacy.clone(), ..provenance(&t, &run, seq, report.decisions.clone()) });
    let path = artifact.save(&job.out)?;
    let fpath = job.out.join("federation.json");
    std::fs::write(&fpath, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", fpath.display()))?;
    let (bytes, _) = publish_model(&mut t, &run, seq + 1, &mut artifact)?;
    // The model.json written above and the published one differ only in `provenance.parent`.
    artifact.save(&job.out)?;
    t.send(&t.topics.plan.clone(), &run, seq + 3, "finish", &names, &encode(&Task::Finish { version: artifact.version.clone() }))?;
    log(Progress::Step(&format!(
        "model {} written to {} and published ({} bytes compressed on `{}`); {} messages refused",
        artifact.version,
        path.display(),
        bytes,
        t.topics.artifacts,
        t.refused
    )));
    Ok((artifact, report))
}

/// A published model's provenance (its parent is set when it is published).
fn provenance(t: &Transport, run: &str, rounds: u64, decisions: BTreeMap<String, Vec<twinguard_models::federated::robust::Decision>>) -> Provenance {
    Provenance {
        federation: t.fed.id.clone(),
        run: run.to_string(),
        rounds,
        parent: None,
        plan_hash: t.plan.clone(),
        aggregator_key: t.fed.aggregator_key.trim().to_string(),
        decisions,
        dp: None,
    }
}

/// Publish `artifact` as the federation's model: the artifact (`seq`), a
/// `model_published` record on the aggregator's audit chain, then the pointer
/// (`seq + 1`) — pipelines switch on the pointer, so every version they can run
/// is in the chain first. Sets `provenance.parent` to the version it replaces.
/// Returns the compressed bytes of the artifact and the pointer.
pub fn publish_model(t: &mut Transport, run: &str, seq: u64, artifact: &mut Artifact) -> Result<(usize, Pointer)> {
    let models = ModelTopics::read(&t.fed, Duration::from_secs(120))?;
    let parent = models.current().map(|p| p.version.clone());
    if let Some(existing) = models.versions.get(&artifact.version) {
        // Published before: point at that artifact again (a new digest for one
        // version would break every activation record that names the old one).
        let pointer = Pointer { version: existing.version.clone(), sha256: existing.sha256.clone(), run: run.to_string(), parent, rollback_of: None };
        point(t, seq + 1, &pointer)?;
        return Ok((0, pointer));
    }
    if let Some(p) = artifact.provenance.as_mut() {
        p.parent = parent.clone();
    }
    let body = serde_json::to_vec(&*artifact)?;
    let pointer = Pointer { version: artifact.version.clone(), sha256: digest(&body), run: run.to_string(), parent, rollback_of: None };
    let topics = t.topics.clone();
    let bytes = t.send(&topics.artifacts, run, seq, "artifact", &[], &body)?;
    point(t, seq + 1, &pointer)?;
    Ok((bytes, pointer))
}

/// Record `pointer` on the audit chain, then write it to the model topic.
fn point(t: &mut Transport, seq: u64, pointer: &Pointer) -> Result<()> {
    let body = serde_json::json!({
        "federation": t.fed.id, "plan": t.plan, "run": pointer.run, "version": pointer.version,
        "sha256": pointer.sha256, "parent": pointer.parent, "rollback_of": pointer.rollback_of,
    });
    t.append_audit(AuditKind::ModelPublished, body)?;
    let topics = t.topics.clone();
    t.send(&topics.model, &pointer.run, seq, "model", &[], &serde_json::to_vec(pointer)?)?;
    Ok(())
}

/// `twinguard federate publish`: a model trained elsewhere (`twinguard train`, a
/// federation's own output) becomes the federation's current version.
pub fn publish_file(fed: &FederationFile, key: SigningKey, model: &std::path::Path) -> Result<Pointer> {
    let mut artifact = Artifact::load(model)?;
    let mut t = Transport::connect(fed, AGGREGATOR, key, &[], false)?;
    let run = format!("publish-{}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"));
    if artifact.provenance.is_none() {
        artifact.provenance = Some(provenance(&t, &run, 0, BTreeMap::new()));
    }
    Ok(publish_model(&mut t, &run, 1, &mut artifact)?.1)
}

/// `twinguard federate rollback`: point the federation back at the version the
/// current one replaced (its artifact must still be on the artifacts topic).
pub fn rollback(fed: &FederationFile, key: SigningKey) -> Result<Pointer> {
    let mut t = Transport::connect(fed, AGGREGATOR, key, &[], false)?;
    let models = ModelTopics::read(fed, Duration::from_secs(120))?;
    let current = models.history.last().cloned().with_context(|| format!("nothing was published on `{}`: there is nothing to roll back", t.topics.model))?;
    // The version the current one replaced when it was first published (after a
    // rollback, the current version's own parent, not the version rolled back from).
    let parent = models.original_parent(&current.version).with_context(|| format!("version {} has no parent: it was the federation's first", current.version))?;
    let back = models
        .pointer_of(&parent)
        .cloned()
        .with_context(|| format!("the parent version {parent} has no verified artifact on `{}` (deleted by retention?)", t.topics.artifacts))?;
    let run = format!("rollback-{}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"));
    let pointer = Pointer { version: parent, sha256: back.sha256, run, parent: Some(current.version.clone()), rollback_of: Some(current.version) };
    point(&mut t, 1, &pointer)?;
    Ok(pointer)
}
