//! `twinguard audit verify --federation`: the links between the aggregator's audit
//! chain (`model_published`) and the pipelines' chains (`model_activated`). Every
//! activation must name a version, with its artifact's digest, that the aggregator's
//! verified chain published; every publication's parent must have been published
//! before it.

use std::collections::{BTreeMap, HashMap};

use ed25519_dalek::VerifyingKey;
use twinguard_operators::audit::verify_chain;
use twinguard_schemas::respond::{AuditKind, AuditRecord};

/// What the links came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Links {
    pub published: usize,
    pub activations: usize,
}

/// Read `fed`'s audit topic and check it and the links of `chains` ([`check_links`]).
pub fn verify(fed: &super::FederationFile, chains: &BTreeMap<i32, Vec<(i64, Vec<u8>)>>, timeout: std::time::Duration) -> anyhow::Result<Links> {
    let key = *fed.keys()?.get(super::AGGREGATOR).expect("the federation file names the aggregator's key");
    let topic = fed.topics().audit;
    let published = super::transport::read_topic(fed, &topic, timeout)?;
    check_links(&published, &key, chains).map_err(|e| anyhow::anyhow!("`{topic}`: {e}"))
}

/// Check `published` (the federation's audit topic, one chain, offset order) with
/// the aggregator's pinned key, then every `model_activated` record of `chains`
/// (already verified as chains) against it. The error names the first record that
/// fails and why.
pub fn check_links(published: &[(i64, Vec<u8>)], aggregator: &VerifyingKey, chains: &BTreeMap<i32, Vec<(i64, Vec<u8>)>>) -> Result<Links, String> {
    verify_chain(0, published, aggregator, false).map_err(|f| format!("the federation's audit chain does not verify: {f}"))?;
    let mut versions: HashMap<String, String> = HashMap::new();
    for (offset, bytes) in published {
        let r: AuditRecord = serde_json::from_slice(bytes).map_err(|e| format!("federation audit record at offset {offset}: {e}"))?;
        if r.kind != AuditKind::ModelPublished {
            continue;
        }
        let field = |k: &str| r.body[k].as_str().map(str::to_string);
        let (Some(version), Some(sha)) = (field("version"), field("sha256")) else {
            return Err(format!("federation audit record at offset {offset} (seq {}): `model_published` without version and sha256", r.seq));
        };
        if let Some(parent) = field("parent").filter(|p| !versions.contains_key(p)) {
            return Err(format!("federation audit record at offset {offset} (seq {}): version {version} names parent {parent}, which was never published before it", r.seq));
        }
        if versions.get(&version).is_some_and(|s| *s != sha) {
            return Err(format!("federation audit record at offset {offset} (seq {}): version {version} published again with another digest", r.seq));
        }
        versions.insert(version, sha);
    }
    let mut activations = 0;
    for (p, records) in chains {
        for (offset, bytes) in records {
            let Ok(r) = serde_json::from_slice::<AuditRecord>(bytes) else { continue };
            if r.kind != AuditKind::ModelActivated {
                continue;
            }
            let version = r.body["version"].as_str().unwrap_or_default();
            let sha = r.body["sha256"].as_str().unwrap_or_default();
            match versions.get(version) {
                Some(s) if s == sha => activations += 1,
                Some(s) => return Err(format!("partition {p}, record at offset {offset} (seq {}): activated version {version} with digest {sha}, the federation published {s}", r.seq)),
                None => return Err(format!("partition {p}, record at offset {offset} (seq {}): activated version {version}, which the federation's audit chain never published", r.seq)),
            }
        }
    }
    Ok(Links { published: versions.len(), activations })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use serde_json::json;
    use twinguard_operators::audit::AuditLog;

    fn chain(seed: u8, chain: i32, records: &[(AuditKind, serde_json::Value)]) -> Vec<(i64, Vec<u8>)> {
        let mut log = AuditLog::new([seed; 32]);
        log.continue_from(chain, None).unwrap();
        records.iter().enumerate().map(|(i, (k, b))| (i as i64, log.append(chain, *k, "2026-12-06T00:00:00Z".into(), None, b.clone()).1)).collect()
    }

    #[test]
    fn activations_must_name_a_published_version_and_digest() {
        let agg = SigningKey::from_bytes(&[1; 32]).verifying_key();
        let published = chain(1, 0, &[
            (AuditKind::ModelPublished, json!({"version": "v1", "sha256": "aa", "parent": null})),
            (AuditKind::ModelPublished, json!({"version": "v2", "sha256": "bb", "parent": "v1"})),
        ]);
        let act = |v: &str, sha: &str| json!({"version": v, "sha256": sha, "first_offset": 0});
        let good = BTreeMap::from([(3, chain(9, 3, &[(AuditKind::ModelActivated, act("v1", "aa")), (AuditKind::ModelActivated, act("v2", "bb"))]))]);
        assert_eq!(check_links(&published, &agg, &good).unwrap(), Links { published: 2, activations: 2 });

        let unknown = BTreeMap::from([(3, chain(9, 3, &[(AuditKind::ModelActivated, act("v3", "cc"))]))]);
        assert!(check_links(&published, &agg, &unknown).unwrap_err().contains("never published"));
        let digest = BTreeMap::from([(3, chain(9, 3, &[(AuditKind::ModelActivated, act("v2", "aa"))]))]);
        assert!(check_links(&published, &agg, &digest).unwrap_err().contains("with digest aa"));
        // A chain signed by another key is not the aggregator's.
        let forged = chain(2, 0, &[(AuditKind::ModelPublished, json!({"version": "v3", "sha256": "cc", "parent": null}))]);
        assert!(check_links(&forged, &agg, &good).unwrap_err().contains("does not verify"));
        // A parent that was never published.
        let orphan = chain(1, 0, &[(AuditKind::ModelPublished, json!({"version": "v2", "sha256": "bb", "parent": "v1"}))]);
        assert!(check_links(&orphan, &agg, &BTreeMap::new()).unwrap_err().contains("never published before it"));
    }
}
