//! The federation's published models, read back: [`ModelTopics`] reads the model
//! pointer and artifacts topics in order, accepting only what the aggregator's key
//! signed for this federation and plan, and a pointer only with an artifact of its
//! digest and version; [`Follower`] serves it to a running pipeline
//! (`model.follow`) as the engine's [`ModelFeed`]. The aggregator reads the same
//! way to learn the version it publishes over (`parent`) or rolls back to.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ed25519_dalek::VerifyingKey;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::envelope::{Assembler, Refusal};
use super::transport::{headers_of, reader, screen};
use super::{FederationFile, Topics, AGGREGATOR};
use crate::config::Config;
use crate::engine::{ModelFeed, Published};
use crate::obs::events::{ModelRefused, SiteThresholdChosen};
use crate::PipelineError;

/// The global-model pointer (`<prefix>.model`): which version runs now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pointer {
    pub version: String,
    /// SHA-256 of the artifact's JSON as published.
    pub sha256: String,
    /// The run that published it (or `rollback`, `publish`).
    pub run: String,
    /// The version it replaces.
    #[serde(default)]
    pub parent: Option<String>,
    /// Set when this pointer rolls back from that version to `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<String>,
}

/// SHA-256 (hex) of an artifact's published bytes.
pub fn digest(body: &[u8]) -> String {
    format!("{:x}", Sha256::digest(body))
}

/// What the federation's model topics held, read in order.
pub struct ModelTopics {
    topics: Topics,
    federation: String,
    plan: String,
    keys: BTreeMap<String, VerifyingKey>,
    consumer: BaseConsumer,
    assembler: Assembler,
    /// Verified artifacts by digest.
    artifacts: HashMap<String, Arc<Published>>,
    /// Pointers in model-topic order, waiting for their artifact: the envelope's
    /// (run, round) and when it was read. Only the front may be accepted.
    pending: VecDeque<(Pointer, (String, u64), Instant)>,
    /// Envelopes (run, round) of the pointers accepted: a replayed one is refused.
    seen: HashSet<(String, u64)>,
    /// Accepted pointers, in order.
    pub history: Vec<Pointer>,
    /// Versions accepted, by version.
    pub versions: HashMap<String, Arc<Published>>,
    /// Why messages were refused, in order.
    pub refused: Vec<String>,
    /// This pipeline's site (`model.site`): each version scores at its threshold;
    /// a version that cannot is refused.
    pub site: Option<String>,
}

impl ModelTopics {
    /// Read `fed`'s model and artifacts topics from their beginning.
    pub fn open(fed: &FederationFile) -> Result<ModelTopics> {
        let topics = fed.topics();
        let keys: BTreeMap<String, VerifyingKey> = fed.keys()?.into_iter().filter(|(who, _)| who == AGGREGATOR).collect();
        let consumer = reader(fed, &format!("{}-models", fed.id))?;
        let mut tpl = TopicPartitionList::new();
        for t in [&topics.artifacts, &topics.model] {
            tpl.add_partition_offset(t, 0, Offset::Beginning).context("assigning")?;
        }
        consumer.assign(&tpl).context("assigning the federation's model topics")?;
        Ok(ModelTopics {
            topics,
            federation: fed.id.clone(),
            plan: fed.plan_hash(),
            keys,
            consumer,
            assembler: Assembler::default(),
            artifacts: HashMap::new(),
            pending: VecDeque::new(),
            seen: HashSet::new(),
            history: Vec::new(),
            versions: HashMap::new(),
            refused: Vec::new(),
            site: None,
        })
    }

    /// `fed`'s model topics read to the ends they have now (within `timeout`).
    pub fn read(fed: &FederationFile, timeout: Duration) -> Result<ModelTopics> {
        let mut t = ModelTopics::open(fed)?;
        t.catch_up(timeout)?;
        Ok(t)
    }

    /// The version the pointer names now.
    pub fn current(&self) -> Option<Arc<Published>> {
        self.history.last().and_then(|p| self.versions.get(&p.version).cloned())
    }

    /// The accepted pointer of `version` (its digest and parent), if any.
    pub fn pointer_of(&self, version: &str) -> Option<&Pointer> {
        self.history.iter().rev().find(|p| p.version == version)
    }

    fn refuse(&mut self, what: &str, reason: String) {
        ModelRefused { version: what, reason: &reason }.emit();
        self.refused.push(format!("{what}: {reason}"));
    }

    /// Read what arrives within `wait`; returns whether anything was read.
    pub fn poll(&mut self, wait: Duration) -> Result<bool> {
        let Some(m) = self.consumer.poll(wait) else {
            self.expire_pending();
            return Ok(false);
        };
        let m = m.context("reading the federation's model topics")?;
        let (headers, topic, offset) = (headers_of(&m), m.topic().to_string(), m.offset());
        let payload = m.payload().unwrap_or_default().to_vec();
        drop(m);
        let at = format!("`{topic}` offset {offset}");
        if let Err(reason) = screen(&headers, &self.federation, &self.plan) {
            self.refuse(&at, reason);
            return Ok(true);
        }
        match self.assembler.push(&headers, &payload, &self.keys) {
            None => {}
            Some(Err(Refusal(reason))) => self.refuse(&at, reason),
            Some(Ok((meta, body))) => match (topic == self.topics.artifacts, meta.kind.as_str()) {
                (true, "artifact") => match twinguard_models::Artifact::from_json(&body, &at) {
                    Ok(a) => {
                        let sha = digest(&body);
                        self.artifacts.insert(sha.clone(), Arc::new(Published { version: a.version.clone(), sha256: sha, artifact: a }));
                    }
                    Err(e) => self.refuse(&at, e.to_string()),
                },
                (false, "model") => match serde_json::from_slice::<Pointer>(&body) {
                    Ok(p) => self.pending.push_back((p, (meta.run.clone(), meta.seq), Instant::now())),
                    Err(e) => self.refuse(&at, format!("not a model pointer: {e}")),
                },
                (_, kind) => self.refuse(&at, format!("a `{kind}` message does not belong on `{topic}`")),
            },
        }
        self.resolve();
        Ok(true)
    }

    /// Accept pointers in model-topic order, each once its artifact has arrived: a
    /// later pointer never overtakes one still waiting (a rollback would be lost).
    fn resolve(&mut self) {
        while let Some((p, id, _)) = self.pending.front().cloned() {
            let Some(a) = self.artifacts.get(&p.sha256).cloned() else { break };
            self.pending.pop_front();
            match self.check(&p, &id, &a).and_then(|()| self.for_site(&a)) {
                Err(reason) => self.refuse(&p.version, reason),
                Ok(a) => {
                    self.seen.insert(id);
                    self.versions.insert(p.version.clone(), a);
                    self.history.push(p);
                }
            }
        }
    }

    /// `a` as this pipeline's site scores with it (`model.site`).
    fn for_site(&self, a: &Arc<Published>) -> Result<Arc<Published>, String> {
        let Some(site) = &self.site else { return Ok(a.clone()) };
        let mut own = Published { version: a.version.clone(), sha256: a.sha256.clone(), artifact: a.artifact.clone() };
        let chosen = own.artifact.ensemble.use_site_threshold(site).map_err(|e| format!("`model.site`: {e}"))?;
        SiteThresholdChosen { model: &a.version, site, chosen: &chosen }.emit();
        Ok(Arc::new(own))
    }

    /// A pointer is fresh: its artifact is the version it names, its envelope was
    /// not accepted before, and it replaces the current version (an old pointer
    /// replayed onto the topic would move the federation back).
    fn check(&self, p: &Pointer, id: &(String, u64), a: &Published) -> Result<(), String> {
        if a.version != p.version {
            return Err(format!("the pointer names version {} but its artifact (SHA-256 {}) is {}", p.version, p.sha256, a.version));
        }
        if self.seen.contains(id) {
            return Err(format!("replayed: the pointer of run {} round {} was accepted before", id.0, id.1));
        }
        let current = self.history.last().map(|h| h.version.as_str());
        if p.parent.as_deref() != current {
            return Err(format!("stale: it replaces {:?} but the current version is {current:?} (an old pointer replayed?)", p.parent));
        }
        Ok(())
    }

    /// The front pointer, waiting over a minute for its artifact (refused, or never
    /// written), is refused so the ones behind it can be read.
    fn expire_pending(&mut self) {
        while self.pending.front().is_some_and(|(_, _, t)| t.elapsed() > Duration::from_secs(60)) {
            let (p, _, _) = self.pending.pop_front().expect("front exists");
            self.refuse(&p.version, format!("no verified artifact with SHA-256 {} on `{}`", p.sha256, self.topics.artifacts));
            self.resolve();
        }
    }

    /// The version `version` replaced when it was first published (not a rollback to it).
    pub fn original_parent(&self, version: &str) -> Option<String> {
        self.history.iter().find(|p| p.version == version && p.rollback_of.is_none()).and_then(|p| p.parent.clone())
    }

    /// Read both topics to the ends they have now (within `timeout`).
    pub fn catch_up(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut ends = Vec::new();
        for t in [self.topics.artifacts.clone(), self.topics.model.clone()] {
            let (_, high) = self.consumer.fetch_watermarks(&t, 0, timeout).with_context(|| format!("reading the end of `{t}`"))?;
            ends.push((t, high));
        }
        loop {
            let pos = self.consumer.position().context("reading the model topics' position")?;
            let done = ends.iter().all(|(t, high)| *high == 0 || pos.find_partition(t, 0).and_then(|e| e.offset().to_raw()).is_some_and(|o| o >= *high));
            if done {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("reading `{}` and `{}` to their ends took over {} s", self.topics.artifacts, self.topics.model, timeout.as_secs());
            }
            self.poll(Duration::from_millis(200))?;
        }
        // Pointers still waiting now have no artifact before them.
        while let Some((p, _, _)) = self.pending.pop_front() {
            self.refuse(&p.version, format!("no verified artifact with SHA-256 {} on `{}`", p.sha256, self.topics.artifacts));
            self.resolve();
        }
        Ok(())
    }
}

/// What the follower's thread shares with the engine.
#[derive(Default)]
struct FeedState {
    current: Option<Arc<Published>>,
    versions: HashMap<String, Arc<Published>>,
}

/// A running pipeline's model feed: a thread reading the federation's model topics.
pub struct Follower {
    state: Arc<Mutex<FeedState>>,
    describe: String,
}

impl ModelFeed for Follower {
    fn wanted(&self) -> Option<Arc<Published>> {
        self.state.lock().expect("feed lock").current.clone()
    }
    fn get(&self, version: &str) -> Option<Arc<Published>> {
        self.state.lock().expect("feed lock").versions.get(version).cloned()
    }
    fn describe(&self) -> String {
        self.describe.clone()
    }
}

/// Start following `model.follow` (None when unset): reads the model topics to
/// their ends before returning, so the first batch already sees the newest
/// version, then follows them on a thread until `stop`.
pub fn start(cfg: &Config, stop: Arc<AtomicBool>) -> Result<Option<Arc<dyn ModelFeed>>, PipelineError> {
    let Some(path) = &cfg.model.follow else { return Ok(None) };
    let err = |e: anyhow::Error| PipelineError::config("model.follow", format!("{}: {e:#}", path.display()));
    let fed = FederationFile::load(path).map_err(err)?;
    let mut topics = ModelTopics::open(&fed).map_err(err)?;
    topics.site = cfg.model.site.clone();
    topics.catch_up(Duration::from_secs(cfg.batch.restore_timeout_secs)).map_err(err)?;
    let state = Arc::new(Mutex::new(FeedState::default()));
    let publish = |t: &ModelTopics, s: &Mutex<FeedState>| {
        let mut s = s.lock().expect("feed lock");
        s.current = t.current();
        s.versions = t.versions.clone();
    };
    publish(&topics, &state);
    let describe = format!("federation `{}` (`{}`)", fed.id, fed.topics().model);
    tracing::info!(federation = %fed.id, current = topics.current().map_or("none yet".to_string(), |p| p.version.clone()), "following the federation's model topic");
    let shared = state.clone();
    std::thread::Builder::new()
        .name("tg-follow".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match topics.poll(Duration::from_millis(500)) {
                    Ok(true) => publish(&topics, &shared),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "reading the federation's model topics");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        })
        .map_err(|e| PipelineError::io("starting the model follower", e))?;
    Ok(Some(Arc::new(Follower { state, describe })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small model (the lab dataset's), standing in for every version: trained
    /// once for all the tests here (they run at once and would share its directory).
    fn model() -> twinguard_models::Artifact {
        static MODEL: std::sync::OnceLock<twinguard_models::Artifact> = std::sync::OnceLock::new();
        MODEL
            .get_or_init(|| {
                let dir = std::env::temp_dir().join(format!("twinguard-follow-{}", std::process::id()));
                let lab = twinguard_train::testkit::write_lab_dataset(&dir, 600, 1_760_000_000_000).unwrap();
                let a = twinguard_train::run_train(&twinguard_train::testkit::lab_job(&lab, 3, dir.join("model")), &mut |_| {}).unwrap().0;
                let _ = std::fs::remove_dir_all(dir);
                a
            })
            .clone()
    }

    fn published(model: &twinguard_models::Artifact, version: &str, sha: &str) -> Arc<Published> {
        let mut artifact = model.clone();
        artifact.version = version.into();
        Arc::new(Published { version: version.into(), sha256: sha.into(), artifact })
    }

    /// The example federation's model topics, never connected.
    fn topics() -> ModelTopics {
        let text = std::fs::read_to_string(twinguard_schemas::testing::manifest_dir().join("federation.example.toml")).unwrap();
        let mut fed: FederationFile = toml::from_str(&text).unwrap();
        fed.brokers = "127.0.0.1:9".into();
        ModelTopics::open(&fed).unwrap()
    }

    fn pointer(version: &str, sha: &str, parent: Option<&str>, rollback_of: Option<&str>) -> Pointer {
        Pointer { version: version.into(), sha256: sha.into(), run: "r".into(), parent: parent.map(str::to_string), rollback_of: rollback_of.map(str::to_string) }
    }

    /// Pointers are accepted in topic order (a rollback read before the artifact of
    /// the version it rolls back from waits for it), once each, and only when they
    /// replace the current version: an old pointer replayed is refused.
    #[test]
    fn pointers_are_taken_in_order_once_and_only_fresh() {
        let mut t = topics();
        let m = model();
        t.artifacts.insert("a1".into(), published(&m, "v1", "a1"));
        let now = Instant::now();
        t.pending.push_back((pointer("v1", "a1", None, None), ("r".into(), 1), now));
        t.pending.push_back((pointer("v2", "a2", Some("v1"), None), ("r".into(), 2), now));
        t.pending.push_back((pointer("v1", "a1", Some("v2"), Some("v2")), ("rb".into(), 1), now));
        t.resolve();
        assert_eq!(t.history.len(), 1, "the rollback must wait behind v2's pointer");
        t.artifacts.insert("a2".into(), published(&m, "v2", "a2"));
        t.resolve();
        let order: Vec<&str> = t.history.iter().map(|p| p.version.as_str()).collect();
        assert_eq!(order, ["v1", "v2", "v1"]);
        assert_eq!(t.current().unwrap().version, "v1");
        // v2's pointer replayed: its envelope was seen, and it is stale.
        t.pending.push_back((pointer("v2", "a2", Some("v1"), None), ("r".into(), 2), now));
        t.resolve();
        assert_eq!(t.current().unwrap().version, "v1");
        assert!(t.refused.last().unwrap().contains("replayed"), "{:?}", t.refused);
        // A new envelope naming a parent that is not current.
        t.pending.push_back((pointer("v2", "a2", Some("v0"), None), ("r2".into(), 1), now));
        t.resolve();
        assert!(t.refused.last().unwrap().contains("stale"), "{:?}", t.refused);
        assert_eq!(t.original_parent("v1"), None);
        assert_eq!(t.original_parent("v2").as_deref(), Some("v1"));
    }

    /// With `model.site`, each version scores at that site's own threshold, and a
    /// version without one for the site is refused (the running one kept).
    #[test]
    fn a_site_follows_its_own_threshold_and_refuses_a_version_without_it() {
        let mut t = topics();
        t.site = Some("hospital-a".into());
        let central = model();
        let mut federated = central.clone();
        let law = twinguard_models::metrics::FprInterval { normals: 400, above: 3, expected: 0.01, low: 0.004, high: 0.02, level: 0.9 };
        let own = twinguard_models::federated::calibrate::SiteThreshold { threshold: Some(0.4242), fpr: law };
        federated.ensemble.combination.as_mut().unwrap().site_thresholds.insert("hospital-a".into(), own);
        t.artifacts.insert("a1".into(), published(&federated, "v1", "a1"));
        t.artifacts.insert("a2".into(), published(&central, "v2", "a2"));
        let now = Instant::now();
        t.pending.push_back((pointer("v1", "a1", None, None), ("r".into(), 1), now));
        t.pending.push_back((pointer("v2", "a2", Some("v1"), None), ("r".into(), 2), now));
        t.resolve();
        let current = t.current().unwrap();
        assert_eq!((current.version.as_str(), current.artifact.ensemble.threshold), ("v1", 0.4242));
        assert!(t.refused.last().unwrap().contains("model.site") && t.refused.last().unwrap().contains("hospital-a"), "{:?}", t.refused);
    }
}
