//! What a configuration builds: the stages' runtime objects (detector, responder
//! with its registry and audit log, confidence gate) from the settings and the
//! files they name. `config` holds the settings and checks them; building lives
//! here, next to the engine that runs what it builds.

use std::path::Path;

use twinguard_operators::audit::{parse_key_hex, AuditLog};
use twinguard_operators::{Detector, Gate, Registry, Responder};
use twinguard_schemas::EventSchema;

use crate::config::{secret_from_env, Config, RegistryFile};
use crate::obs::events::{SiteThresholdChosen, ThresholdRecalibrated};
use crate::PipelineError;

/// The detector this configuration asks for: the twin alone, or twin + model.
pub fn detector(cfg: &Config, schema: &EventSchema) -> Result<Detector, PipelineError> {
    match &cfg.model.path {
        None => Ok(Detector::twin_only(schema, cfg.state.clone())),
        Some(p) => {
            let mut a = twinguard_models::Artifact::load(p).map_err(|e| PipelineError::config("model.path", e))?;
            if let Some(t) = cfg.model.target_fpr {
                a.ensemble.recalibrate(t).map_err(|e| PipelineError::config("model.target_fpr", e))?;
                ThresholdRecalibrated { model: &a.version, target_fpr: t, threshold: a.ensemble.threshold }.emit();
            }
            if let Some(site) = &cfg.model.site {
                let chosen = a.ensemble.use_site_threshold(site).map_err(|e| PipelineError::config("model.site", format!("{}: {e}", p.display())))?;
                SiteThresholdChosen { model: &a.version, site, chosen: &chosen }.emit();
            }
            Detector::with_model(schema, cfg.state.clone(), a)
                .map_err(|e| PipelineError::config("model.path", e))
        }
    }
}

/// The device registry (empty without `registry.file`).
pub fn registry(cfg: &Config) -> Result<Registry, PipelineError> {
    let Some(f) = &cfg.registry.file else { return Ok(Registry::default()) };
    let err = |m: String| PipelineError::config("registry.file", format!("{}: {m}", f.display()));
    let text = std::fs::read_to_string(f).map_err(|e| err(e.to_string()))?;
    let file: RegistryFile = serde_path_to_error::deserialize(toml::Deserializer::parse(&text).map_err(|e| err(e.to_string()))?)
        .map_err(|e| err(format!("`{}`: {}", e.path(), e.inner())))?;
    Registry::new(file.device).map_err(err)
}

/// The audit log, when a signing key is configured (with the key it replaced,
/// when `audit.previous_signing_key_file` is set).
pub fn audit_log(cfg: &Config) -> Result<Option<AuditLog>, PipelineError> {
    let seed = |key: &str, f: &Path| -> Result<[u8; 32], PipelineError> {
        let err = |m: String| PipelineError::config(key, format!("{}: {m}", f.display()));
        let text = std::fs::read_to_string(f).map_err(|e| err(e.to_string()))?;
        parse_key_hex(&text).map_err(err)
    };
    let Some(f) = &cfg.audit.signing_key_file else { return Ok(None) };
    let log = AuditLog::new(seed("audit.signing_key_file", f)?);
    Ok(Some(match &cfg.audit.previous_signing_key_file {
        None => log,
        Some(p) => log
            .with_previous(seed("audit.previous_signing_key_file", p)?)
            .map_err(|e| PipelineError::config("audit.previous_signing_key_file", format!("{}: {e}", p.display())))?,
    }))
}

/// The respond operator this configuration asks for (with the ack secret read
/// from `response.ack_secret_env`, when set).
pub fn responder(cfg: &Config, schema: &EventSchema) -> Result<Responder, PipelineError> {
    let r = Responder::new(schema, cfg.response.clone(), registry(cfg)?, audit_log(cfg)?);
    Ok(match &cfg.response.ack_secret_env {
        Some(var) => r.with_ack_secret(secret_from_env("response.ack_secret_env", var)?),
        None => r,
    })
}

/// The confidence gate this configuration asks for (with the feedback secret
/// read from `gating.feedback_secret_env`, when set).
pub fn gate(cfg: &Config) -> Result<Gate, PipelineError> {
    let g = Gate::new(cfg.gating.clone());
    Ok(match &cfg.gating.feedback_secret_env {
        Some(var) => g.with_feedback_secret(secret_from_env("gating.feedback_secret_env", var)?),
        None => g,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_control_secrets_must_be_set() {
        // A configured secret must be set, and long enough.
        let mut c = Config::default();
        c.response.ack_secret_env = Some("TWINGUARD_TEST_UNSET_ACK_SECRET".into());
        let schema = c.event_schema().unwrap();
        let e = responder(&c, &schema).err().unwrap().to_string();
        assert!(e.contains("response.ack_secret_env") && e.contains("TWINGUARD_TEST_UNSET_ACK_SECRET"), "{e}");
        c.gating.feedback_secret_env = Some("TWINGUARD_TEST_UNSET_FEEDBACK_SECRET".into());
        assert!(gate(&c).err().unwrap().to_string().contains("gating.feedback_secret_env"));
    }
}
