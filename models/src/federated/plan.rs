//! A federation's settings and what it reports (the provenance of its model).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::robust::{Decision, Rule};
use crate::ModelError;

/// What a poisoned site does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoisonKind {
    /// Normal rows labelled attack and attack rows normal.
    Invert,
    /// The most frequent attack class labelled normal (a targeted flip).
    Targeted,
    /// Inverted labels, and every vector update boosted ×(number of sites).
    Replace,
    /// "A little is enough": vector updates at the honest mean − 1.5 sd per
    /// coordinate; trees and histograms as `invert`.
    Little,
    /// Fang et al. (2020), full knowledge: vector updates at `base − λ·s` (s the
    /// sign of the honest mean's change), λ as large as the rule still selects;
    /// trees and histograms as `invert`.
    Fang,
    /// Honest labels and models, lying score histograms: ten times its normal
    /// rows claimed besides its own, a tenth of them at the top of the scale, to
    /// raise the threshold (the histogram screen passes it: most of its claimed
    /// normal rows score low).
    Inflate,
}

impl PoisonKind {
    pub const ALL: [PoisonKind; 6] = [PoisonKind::Invert, PoisonKind::Targeted, PoisonKind::Replace, PoisonKind::Little, PoisonKind::Fang, PoisonKind::Inflate];
    pub fn name(self) -> &'static str {
        match self {
            PoisonKind::Invert => "invert",
            PoisonKind::Targeted => "targeted",
            PoisonKind::Replace => "replace",
            PoisonKind::Little => "little",
            PoisonKind::Fang => "fang",
            PoisonKind::Inflate => "inflate",
        }
    }
    pub fn parse(s: &str) -> Result<PoisonKind, ModelError> {
        PoisonKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| ModelError::Param {
            name: "poison",
            why: format!("`{s}` is not an attack; one of {}", PoisonKind::ALL.map(PoisonKind::name).join(", ")),
        })
    }
}

/// How the rows become sites.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sites {
    /// Per class, Dirichlet(α) shares over the sites.
    Dirichlet { alpha: f64 },
    /// Contiguous periods of the (time-ordered) rows.
    Periods,
    /// Each site's own rows (a federation over Kafka: nothing to split).
    Own,
}

/// A federation's settings (recorded in the model card).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FederationPlan {
    pub sites: usize,
    pub split: Sites,
    /// Rule for the vector members; trees, stacker and histograms are screened
    /// unless the rule is `mean` (the undefended federation).
    pub rule: Rule,
    /// Poisoned sites (the last ones) and their attack.
    pub poisoned: usize,
    pub poison: PoisonKind,
    /// How the boosted member federates.
    #[serde(default)]
    pub gbdt: GbdtMode,
    /// LSTM rounds (FedAvg from the global weights) and local epochs per round.
    pub lstm_rounds: usize,
    pub lstm_local_epochs: usize,
    pub seed: u64,
    /// Differential privacy of what is published (none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<super::privacy::DpPlan>,
    /// Whose false-positive rate the threshold holds (a plan recorded before this
    /// field existed was calibrated on the pooled histograms).
    #[serde(default = "ThresholdRule::recorded_before")]
    pub threshold: ThresholdRule,
}

impl FederationPlan {
    /// A clean federation of `sites` split by `split` under the defaults (rule
    /// clip-multi-krum, cyclic boosting, 5 LSTM rounds of 3 local epochs, no
    /// poisoned site, no differential privacy): the base others change a field of.
    pub fn clean(sites: usize, split: Sites, seed: u64) -> FederationPlan {
        FederationPlan { sites, split, rule: Rule::ClipMultiKrum, poisoned: 0, poison: PoisonKind::Invert, gbdt: GbdtMode::Cyclic, lstm_rounds: 5, lstm_local_epochs: 3, seed, dp: None, threshold: ThresholdRule::EverySite }
    }
}

/// Whose false-positive rate the federation's threshold holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ThresholdRule {
    /// The target on the sites' validation rows taken together: a site whose
    /// normal traffic scores higher than the others' (another period, another
    /// mix of devices) can run far above it.
    Pooled,
    /// The default: also the target on the own validation rows of each site whose
    /// normal rows show, by a binomial test, that they run above it at the pooled
    /// threshold (`calibrate::every_site_threshold`). Never below the pooled
    /// threshold. A private federation uses the pooled one.
    #[default]
    EverySite,
}

impl ThresholdRule {
    fn recorded_before() -> ThresholdRule {
        ThresholdRule::Pooled
    }
    pub fn parse(s: &str) -> Result<ThresholdRule, ModelError> {
        match s {
            "pooled" => Ok(ThresholdRule::Pooled),
            "every-site" => Ok(ThresholdRule::EverySite),
            _ => Err(ModelError::Param { name: "threshold", why: format!("`{s}` is not a rule; one of every-site, pooled") }),
        }
    }
}

/// How the boosted member federates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GbdtMode {
    /// Every site boosts on its own rows; the screened boosters are averaged in
    /// log-odds (Flower's FedXgbBagging).
    Bagging,
    /// The default: the model travels from site to site (two passes); each adds
    /// trees boosted on its own rows from the current model's scores, kept only
    /// when they do not lower the model's AUC on the other sites' rows by more than
    /// 0.01 (Flower's FedXgbCyclic).
    #[default]
    Cyclic,
}

impl GbdtMode {
    pub fn parse(s: &str) -> Result<GbdtMode, ModelError> {
        match s {
            "bagging" => Ok(GbdtMode::Bagging),
            "cyclic" => Ok(GbdtMode::Cyclic),
            _ => Err(ModelError::Param { name: "gbdt", why: format!("`{s}` is not a mode; one of bagging, cyclic") }),
        }
    }
}

/// One site's share and status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteSummary {
    pub site: usize,
    pub train_rows: usize,
    pub validation_rows: usize,
    pub validation_normal: usize,
    pub poisoned: bool,
    /// Bytes of each update this site sent, JSON-encoded (a binary encoding
    /// would send fewer).
    pub bytes: BTreeMap<String, usize>,
}

/// What the federation did: per member, the decision on every site's update.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FederationReport {
    pub plan: FederationPlan,
    pub tolerated: usize,
    /// The class a `targeted` attack relabelled normal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targeted_class: Option<String>,
    pub sites: Vec<SiteSummary>,
    /// The federation's feature names (round 0).
    #[serde(default)]
    pub features: Vec<String>,
    pub decisions: BTreeMap<String, Vec<Decision>>,
    /// With differential privacy: ε per member and what was published without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<super::privacy::PrivacyReport>,
    pub seconds: f64,
    /// A simulation's test rows shared out as its validation rows were, each
    /// site's share at the federation's threshold and at the site's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub site_tests: Vec<SiteTest>,
}

/// One site's share of the held-out test rows at the federation's threshold and
/// at the threshold the site scores at (its own, where it could set one).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteTest {
    pub site: String,
    pub poisoned: bool,
    pub normals: usize,
    pub attacks: usize,
    /// Whether the site set its own threshold (else it scores at the federation's).
    pub own: bool,
    /// (detection rate, false-positive rate) at the federation's threshold.
    pub federation: (f64, f64),
    /// The same at the threshold the site scores at.
    pub site_threshold: (f64, f64),
}

impl FederationReport {
    /// Honest sites some member excluded, and poisoned sites some member accepted.
    pub fn exclusions(&self) -> (usize, usize) {
        let poisoned: BTreeSet<usize> = self.sites.iter().filter(|s| s.poisoned).map(|s| s.site).collect();
        let mut honest_out = BTreeSet::new();
        let mut poisoned_in = BTreeSet::new();
        for d in self.decisions.values().flatten() {
            if !d.accepted && !poisoned.contains(&d.site) {
                honest_out.insert(d.site);
            }
            if d.accepted && poisoned.contains(&d.site) {
                poisoned_in.insert(d.site);
            }
        }
        (honest_out.len(), poisoned_in.len())
    }
}

