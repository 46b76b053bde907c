//! Federated training over Kafka: `twinguard federate aggregate` ([`aggregator`])
//! and `twinguard federate site` ([`site`]) run the rounds of
//! `twinguard_models::federated::aggregate` between processes, each message a
//! signed, compressed, chunked envelope ([`envelope`]) on the federation's topics:
//!
//! | topic | written by | carries |
//! | --- | --- | --- |
//! | `<prefix>.plan` | aggregator | tasks (round 0, fits, global models, Newton weights) |
//! | `<prefix>.updates` | sites | model updates, moments, sums, histograms |
//! | `<prefix>.evaluations` | sites | cross-site AUCs |
//! | `<prefix>.artifacts` | aggregator | the published model |
//! | `<prefix>.model` | aggregator | the global-model pointer (version, digest) |
//! | `<prefix>.dlq` | both | refused messages, with the reason |
//! | `<prefix>.audit` | aggregator | its signed chain of `model_published` records |
//!
//! Pipelines that follow the federation (`model.follow`, [`follow`]) read the
//! model and artifacts topics and the audit topic; they write none of them.
//!
//! Every party reads the same federation file ([`FederationFile`]); the digest of
//! its shared part (id, keys, sites, plan) is the plan hash every message carries,
//! so a party with another plan is refused.

pub mod aggregator;
pub mod envelope;
pub mod follow;
pub mod links;
pub mod site;
mod transport;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The federation file: who takes part, where they meet, and the plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationFile {
    /// The federation's name (in every message).
    pub id: String,
    /// `bootstrap.servers` of the broker the parties meet on.
    pub brokers: String,
    /// Topic names start with this (default `twinguard.fed.<id>`).
    #[serde(default)]
    pub topic_prefix: Option<String>,
    /// How long the aggregator waits for a round's answers (a site silent that
    /// long is left out of the round, with the reason).
    #[serde(default = "default_timeout")]
    pub round_timeout_secs: u64,
    /// librdkafka properties for every client (`security.protocol`, SASL...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// The aggregator's public key (hex): it signs tasks and artifacts.
    pub aggregator_key: String,
    /// The sites, in order (a site's index seeds its forest); their public keys.
    pub sites: Vec<SiteEntry>,
    /// How the aggregator combines updates.
    #[serde(default)]
    pub plan: PlanSection,
}

fn default_timeout() -> u64 {
    1800
}

/// One site of the federation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteEntry {
    pub name: String,
    pub public_key: String,
}

/// The aggregation plan (the `[plan]` table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlanSection {
    /// Rule for vector updates: clip-multi-krum, multi-krum, median, trimmed-mean, mean.
    pub rule: String,
    /// Boosted member: cyclic or bagging.
    pub gbdt: String,
    pub lstm_rounds: usize,
    pub local_epochs: usize,
    /// Differential privacy of the published model (`[plan.dp]`: noise_multiplier,
    /// threshold_epsilon, moments_epsilon, classes_epsilon, trees_epsilon, svm_clip, lstm_clip, delta); none when absent (and then
    /// not in the plan hash, which stays what it was before this option).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dp: Option<twinguard_models::federated::privacy::DpPlan>,
    /// Whose false-positive rate the threshold holds: every-site (when absent) or
    /// pooled; absent, not in the plan hash (as before this option).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<String>,
}

impl Default for PlanSection {
    fn default() -> Self {
        PlanSection { rule: "clip-multi-krum".into(), gbdt: "cyclic".into(), lstm_rounds: 5, local_epochs: 3, dp: None, threshold: None }
    }
}

/// Topic names of a federation.
#[derive(Debug, Clone)]
pub struct Topics {
    pub plan: String,
    pub updates: String,
    pub evaluations: String,
    pub artifacts: String,
    pub model: String,
    pub dlq: String,
    /// The aggregator's audit chain (`model_published` records).
    pub audit: String,
}

/// The name the aggregator signs as.
pub const AGGREGATOR: &str = "aggregator";

impl FederationFile {
    /// Read and check a federation file; errors name the file and the field.
    pub fn load(path: &Path) -> Result<FederationFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading federation file {}", path.display()))?;
        let f: FederationFile = toml::from_str(&text).with_context(|| format!("federation file {}", path.display()))?;
        if f.sites.len() < 2 {
            anyhow::bail!("federation file {}: `sites` lists {} site(s); a federation needs at least 2", path.display(), f.sites.len());
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &f.sites {
            if s.name == AGGREGATOR || s.name.contains(',') || s.name.is_empty() || !seen.insert(&s.name) {
                anyhow::bail!("federation file {}: site name `{}` is empty, repeated, reserved or holds a comma", path.display(), s.name);
            }
        }
        f.keys().with_context(|| format!("federation file {}", path.display()))?;
        if let Some(dp) = &f.plan.dp {
            dp.validate().with_context(|| format!("federation file {}: [plan.dp]", path.display()))?;
        }
        if let Some(t) = &f.plan.threshold {
            twinguard_models::federated::plan::ThresholdRule::parse(t).with_context(|| format!("federation file {}: [plan] threshold", path.display()))?;
        }
        Ok(f)
    }

    /// The plan hash every party must agree on: SHA-256 of the id, topic prefix,
    /// keys, sites and plan as parsed. Brokers, client properties (each party's
    /// own credentials) and the round timeout may differ per party.
    pub fn plan_hash(&self) -> String {
        let shared = serde_json::json!([self.id, self.topic_prefix, self.aggregator_key, self.sites, self.plan]);
        format!("{:x}", Sha256::digest(serde_json::to_vec(&shared).expect("serialises")))
    }

    /// Every party's verifying key by name.
    pub fn keys(&self) -> Result<BTreeMap<String, VerifyingKey>> {
        let key = |who: &str, hex: &str| -> Result<VerifyingKey> {
            let bytes = twinguard_operators::audit::parse_key_hex(hex.trim()).map_err(|e| anyhow::anyhow!("public key of `{who}`: {e}"))?;
            twinguard_operators::audit::verifying_key(bytes).map_err(|e| anyhow::anyhow!("public key of `{who}`: {e}"))
        };
        let mut out = BTreeMap::from([(AGGREGATOR.to_string(), key(AGGREGATOR, &self.aggregator_key)?)]);
        for s in &self.sites {
            out.insert(s.name.clone(), key(&s.name, &s.public_key)?);
        }
        Ok(out)
    }

    pub fn topics(&self) -> Topics {
        let p = self.topic_prefix.clone().unwrap_or_else(|| format!("twinguard.fed.{}", self.id));
        Topics {
            plan: format!("{p}.plan"),
            updates: format!("{p}.updates"),
            evaluations: format!("{p}.evaluations"),
            artifacts: format!("{p}.artifacts"),
            model: format!("{p}.model"),
            dlq: format!("{p}.dlq"),
            audit: format!("{p}.audit"),
        }
    }
}

/// A signing key from a file holding its 32-byte seed as hex (`twinguard audit
/// keygen` writes one), checked against the public key the plan names for `who`.
pub fn signing_key(path: &PathBuf, who: &str, fed: &FederationFile) -> Result<SigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading signing key {}", path.display()))?;
    let seed = twinguard_operators::audit::parse_key_hex(text.trim()).map_err(|e| anyhow::anyhow!("signing key {}: {e}", path.display()))?;
    let key = SigningKey::from_bytes(&seed);
    let keys = fed.keys()?;
    match keys.get(who) {
        Some(k) if *k == key.verifying_key() => Ok(key),
        Some(_) => anyhow::bail!("signing key {} is not `{who}`'s: its public key differs from the federation file's", path.display()),
        None => anyhow::bail!("`{who}` is not in the federation file (sites: {})", fed.sites.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("twinguard-fedfile-{}-{}.toml", std::process::id(), rand::random::<u32>()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_example_federation_file_loads_and_its_plan_hash_is_stable() {
        let f = FederationFile::load(&twinguard_schemas::testing::manifest_dir().join("federation.example.toml")).unwrap();
        assert_eq!(f.sites.len(), 2);
        assert_eq!(f.plan.rule, "clip-multi-krum");
        assert_eq!(f.topics().dlq, "twinguard.fed.regional-iomt.dlq");
        assert_eq!(f.plan_hash(), f.clone().plan_hash());
        let mut g = f.clone();
        g.plan.rule = "mean".into();
        assert_ne!(f.plan_hash(), g.plan_hash(), "another plan is another hash");
        let mut h = f.clone();
        h.brokers = "other:9092".into();
        h.properties.insert("sasl.password".into(), "site-own".into());
        assert_eq!(f.plan_hash(), h.plan_hash(), "each party's own connection settings are not the plan");
    }

    #[test]
    fn a_bad_federation_file_is_refused_naming_the_fault() {
        let text = std::fs::read_to_string(twinguard_schemas::testing::manifest_dir().join("federation.example.toml")).unwrap();
        let one_site = text.split("[[sites]]").take(2).collect::<Vec<_>>().join("[[sites]]");
        let e = format!("{:#}", FederationFile::load(&write(&one_site)).unwrap_err());
        assert!(e.contains("needs at least 2"), "{e}");
        let twice = text.replace("hospital-b", "hospital-a");
        let e = format!("{:#}", FederationFile::load(&write(&twice)).unwrap_err());
        assert!(e.contains("repeated"), "{e}");
        let bad_key = text.replace("public_key = \"8e", "public_key = \"zz");
        let e = format!("{:#}", FederationFile::load(&write(&bad_key)).unwrap_err());
        assert!(e.contains("public key of `hospital-b`"), "{e}");
        let typo = text.replace("round_timeout_secs", "round_timeout_sec");
        let e = format!("{:#}", FederationFile::load(&write(&typo)).unwrap_err());
        assert!(e.contains("round_timeout_sec"), "{e}");
        // The threshold rule: pooled loads and is another plan; an unknown one is
        // refused, naming the key.
        let pooled = text.replace("local_epochs = 3\n", "local_epochs = 3\nthreshold = \"pooled\"\n");
        assert_ne!(FederationFile::load(&write(&pooled)).unwrap().plan_hash(), FederationFile::load(&write(&text)).unwrap().plan_hash());
        let e = format!("{:#}", FederationFile::load(&write(&pooled.replace("\"pooled\"", "\"median\""))).unwrap_err());
        assert!(e.contains("[plan] threshold") && e.contains("`median` is not a rule"), "{e}");
        // Differential privacy: a plan with it loads (and hashes differently); a
        // noise multiplier of 0 is refused, naming the table and the key.
        let dp = format!("{text}\n[plan.dp]\nnoise_multiplier = 1.0\nthreshold_epsilon = 2.0\n");
        let f = FederationFile::load(&write(&dp)).unwrap();
        assert_eq!(f.plan.dp.as_ref().map(|d| (d.noise_multiplier, d.lstm_clip)), Some((1.0, 1.0)));
        assert_ne!(f.plan_hash(), FederationFile::load(&write(&text)).unwrap().plan_hash());
        let e = format!("{:#}", FederationFile::load(&write(&dp.replace("noise_multiplier = 1.0", "noise_multiplier = 0.0"))).unwrap_err());
        assert!(e.contains("[plan.dp]") && e.contains("dp.noise_multiplier"), "{e}");
    }
}
