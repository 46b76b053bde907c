//! The response policy as configured: rules matched against a verdict and a
//! device (`PolicyConfig`, `Rule`, `Decision`), and the device registry (`Registry`).

use super::*;

/// One policy rule. Empty lists match anything; all given conditions must hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    /// Attack classes (case-insensitive) the rule applies to.
    #[serde(default)]
    pub classes: Vec<String>,
    /// Device types the rule applies to.
    #[serde(default)]
    pub device_types: Vec<String>,
    /// Criticalities the rule applies to.
    #[serde(default)]
    pub criticality: Vec<Criticality>,
    /// Lowest verdict score the rule applies to.
    #[serde(default)]
    pub min_score: Option<f64>,
    pub action: Action,
}

impl Rule {
    pub(super) fn matches(&self, score: f64, class: Option<&str>, device_type: Option<&str>, crit: Criticality) -> bool {
        (self.classes.is_empty() || class.is_some_and(|c| self.classes.iter().any(|x| x.eq_ignore_ascii_case(c))))
            && (self.device_types.is_empty() || device_type.is_some_and(|t| self.device_types.iter().any(|x| x == t)))
            && (self.criticality.is_empty() || self.criticality.contains(&crit))
            && self.min_score.is_none_or(|m| score >= m)
    }
}

/// The response policy (`[response]` in the pipeline config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Rules in order; the first match wins. No match: `notify`.
    pub rules: Vec<Rule>,
    /// Device types treated as life-critical when the registry does not say.
    pub life_critical_types: Vec<String>,
    /// Actions never taken automatically on a life-critical device (escalated).
    pub human_only: Vec<Action>,
    /// Criticality of devices neither the registry nor `life_critical_types` covers.
    pub default_criticality: Criticality,
    /// A command not acknowledged within this long (processing time) raises an alert.
    pub command_ttl_secs: u64,
    /// Alerts of a device closer than this in event time belong to one incident.
    pub incident_quiet_secs: u64,
    /// Metrics named in an alert (largest deviation first).
    pub top_features: usize,
    /// Environment variable holding the per-deployment ack secret (read by the
    /// pipeline). Set: every ack must carry a valid `mac` (HMAC-SHA256, see
    /// [`crate::audit::ack_mac`]); others are dead-lettered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_secret_env: Option<String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        let rule = |name: &str, classes: &[&str], min_score: Option<f64>, action| Rule {
            name: name.into(),
            classes: classes.iter().map(|c| (*c).to_string()).collect(),
            device_types: vec![],
            criticality: vec![],
            min_score,
            action,
        };
        PolicyConfig {
            rules: vec![
                rule("firmware-tamper", &[CLASS_FIRMWARE_TAMPER], None, Action::SafeMode),
                rule("identity-spoofing", &["spoofing", "arp_spoofing"], None, Action::Reauthenticate),
                rule("near-certain", &[], Some(0.98), Action::Isolate),
                rule("likely", &[], Some(0.9), Action::RateLimit),
                rule("default", &[], None, Action::Notify),
            ],
            life_critical_types: vec!["infusion_pump".into(), "ventilator".into(), "insulin_pump".into()],
            human_only: vec![Action::Isolate],
            default_criticality: Criticality::Medium,
            command_ttl_secs: 60,
            incident_quiet_secs: 600,
            top_features: 3,
            ack_secret_env: None,
        }
    }
}

/// What the policy decided for one verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub rule: String,
    pub action: Action,
    /// Why the rule's action was overridden, if it was.
    pub note: Option<String>,
}

impl PolicyConfig {
    /// The first matching rule's action, with the life-critical override applied.
    pub fn decide(&self, score: f64, class: Option<&str>, device_type: Option<&str>, crit: Criticality) -> Decision {
        self.decide_as(score, class, device_type, crit, true)
    }

    /// [`decide`](Self::decide) for a device that is (`registered`) or is not listed
    /// in a configured registry: an unlisted device's `human_only` actions are
    /// escalated like a life-critical device's, whatever type it reports.
    pub fn decide_as(&self, score: f64, class: Option<&str>, device_type: Option<&str>, crit: Criticality, registered: bool) -> Decision {
        let rule = self.rules.iter().find(|r| r.matches(score, class, device_type, crit));
        let (rule, action) = rule.map_or(("(no rule)".to_string(), Action::Notify), |r| (r.name.clone(), r.action));
        if self.human_only.contains(&action) {
            let why = if crit == Criticality::LifeCritical {
                Some("life-critical device")
            } else if !registered {
                Some("device not in the registry (counted as life-critical)")
            } else {
                None
            };
            if let Some(why) = why {
                let note = Some(format!("{why}: `{}` escalated to a human", action.as_str()));
                return Decision { rule, action: Action::Escalate, note };
            }
        }
        Decision { rule, action, note: None }
    }

    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.command_ttl_secs == 0 {
            return Err(InvalidSetting::new("command_ttl_secs", "must be at least 1"));
        }
        for (i, r) in self.rules.iter().enumerate() {
            if r.name.trim().is_empty() {
                return Err(InvalidSetting::new(format!("rules[{i}].name"), "is empty"));
            }
            if let Some(m) = r.min_score.filter(|m| !m.is_finite()) {
                return Err(InvalidSetting::new(format!("rules[{i}].min_score"), format!("must be a finite number, got {m} (rule `{}`)", r.name)));
            }
        }
        Ok(())
    }
}

/// The device registry: type, criticality and approved firmware per device.
/// [`Registry::default`] is no registry at all; [`Registry::new`] is a configured
/// one (possibly empty), whose unlisted devices never get `human_only` actions.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    pub(super) devices: HashMap<String, RegistryEntry>,
    pub(super) configured: bool,
}

impl Registry {
    /// A configured registry of `entries`; a device listed twice is an error naming it.
    pub fn new(entries: Vec<RegistryEntry>) -> Result<Self, String> {
        let mut devices = HashMap::with_capacity(entries.len());
        for mut e in entries {
            for h in &mut e.approved_firmware {
                *h = h.trim().to_ascii_lowercase();
            }
            let id = e.device_id.clone();
            if devices.insert(id.clone(), e).is_some() {
                return Err(format!("device `{id}` is listed twice"));
            }
        }
        Ok(Registry { devices, configured: true })
    }
    /// Whether a registry was configured (devices it does not list are suspect).
    pub fn is_configured(&self) -> bool {
        self.configured
    }
    pub fn get(&self, device: &str) -> Option<&RegistryEntry> {
        self.devices.get(device)
    }
    pub fn len(&self) -> usize {
        self.devices.len()
    }
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}
