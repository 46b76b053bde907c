//! Confidence gating: live detection figures from analyst feedback, and the switch
//! that suspends automated responses while they are outside their thresholds.
//!
//! The gate is a pure function of the alerts, feedback and response times it is
//! shown, in the order shown. Every instance reads the alerts and feedback topics
//! from the start, so a restart rebuilds the label figures (the interleaving of
//! partitions, and so the exact window, may differ between instances); response
//! times are this instance's own and start empty.
//!
//! Figures over the last `window` labels:
//! - precision = TP / (TP + FP), from feedback on alerts;
//! - detection rate = TP / (TP + FN), FN being verdicts an analyst marked as missed;
//! - FPR = FP / (FP + TN), TN being non-alerting verdicts confirmed benign;
//! - response time = the `response_quantile` of the last `response_window` command
//!   response times (event entered the input topic → command acknowledged by the broker).
//!
//! A figure is judged only once its denominator holds `min_labels` labels (an
//! estimate from three labels would flap).
//!
//! Labels count once per `ref`: a later label of the same alert or verdict replaces
//! the earlier one (a correction), so repeating a label cannot outvote the others.
//! Every label is attributed: the gate counts the labels in its window per
//! `analyst` (unattributed ones under `(unattributed)`), and with a feedback secret
//! only feedback with a valid `mac` (HMAC-SHA256, [`crate::audit::feedback_mac`])
//! counts; the rest is refused for the caller to dead-letter. The acting detector (the one whose
//! decision raises alerts) drives the gate; per-member figures (RF, SVM, LSTM, twin)
//! are reported for alerts whose scores the gate has seen, for the analysts.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};
use twinguard_schemas::respond::{Alert, AlertKind, Feedback, FeedbackLabel};

use crate::audit::{feedback_mac, mac_matches};
use crate::InvalidSetting;

/// Thresholds and windows of the gate (`[gating]` in the pipeline config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatingConfig {
    /// Labels the figures are computed over (the most recent ones).
    pub window: usize,
    /// A figure is judged once its denominator has this many labels.
    pub min_labels: usize,
    pub min_precision: f64,
    pub min_detection_rate: f64,
    pub max_fpr: f64,
    /// Response time bound (milliseconds) at `response_quantile`.
    pub max_response_ms: f64,
    pub response_quantile: f64,
    /// Response times the quantile is computed over; judged once there are
    /// `min_labels` of them.
    pub response_window: usize,
    /// Response times older than this no longer count: while automation is
    /// suspended no command is issued and no new time is measured, so a
    /// suspension for slowness lifts once its evidence has aged out.
    pub response_max_age_secs: u64,
    /// Alerts remembered for joining feedback with per-member scores.
    pub remember_alerts: usize,
    /// Environment variable holding the per-deployment feedback secret (read by the
    /// pipeline). Set: only feedback with a valid `mac` counts; the rest is
    /// dead-lettered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback_secret_env: Option<String>,
}

impl Default for GatingConfig {
    fn default() -> Self {
        GatingConfig {
            window: 200,
            min_labels: 20,
            min_precision: 0.5,
            min_detection_rate: 0.7,
            max_fpr: 0.05,
            max_response_ms: 1000.0,
            response_quantile: 0.99,
            response_window: 500,
            response_max_age_secs: 300,
            remember_alerts: 100_000,
            feedback_secret_env: None,
        }
    }
}

impl GatingConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let frac = |k: &str, v: f64| if (0.0..=1.0).contains(&v) { Ok(()) } else { Err(InvalidSetting::new(k, format!("must be within [0, 1], got {v}"))) };
        frac("min_precision", self.min_precision)?;
        frac("min_detection_rate", self.min_detection_rate)?;
        frac("max_fpr", self.max_fpr)?;
        frac("response_quantile", self.response_quantile)?;
        if self.window == 0 || self.min_labels == 0 || self.response_window == 0 {
            return Err(InvalidSetting::new("window", "`window`, `min_labels` and `response_window` must be at least 1"));
        }
        if self.min_labels > self.window {
            return Err(InvalidSetting::new("min_labels", format!("{} exceeds `window` ({}): no figure could ever be judged", self.min_labels, self.window)));
        }
        if !(self.max_response_ms > 0.0) {
            return Err(InvalidSetting::new("max_response_ms", "must be positive"));
        }
        Ok(())
    }
}

/// Members whose decisions are tracked besides the acting detector.
pub const MEMBERS: [&str; 5] = ["rf", "svm", "lstm", "twin", "gbdt"];

/// Confusion counts and the figures derived from them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub tp: u32,
    pub fp: u32,
    pub fn_: u32,
    pub tn: u32,
    pub precision: Option<f64>,
    pub detection_rate: Option<f64>,
    pub fpr: Option<f64>,
}

impl Figures {
    fn add(&mut self, label: FeedbackLabel) {
        match label {
            FeedbackLabel::TruePositive => self.tp += 1,
            FeedbackLabel::FalsePositive => self.fp += 1,
            FeedbackLabel::FalseNegative => self.fn_ += 1,
            FeedbackLabel::TrueNegative => self.tn += 1,
        }
    }
    fn finish(mut self, min: usize) -> Self {
        let ratio = |a: u32, b: u32| ((a + b) as usize >= min && a + b > 0).then(|| f64::from(a) / f64::from(a + b));
        self.precision = ratio(self.tp, self.fp);
        self.detection_rate = ratio(self.tp, self.fn_);
        self.fpr = ratio(self.fp, self.tn);
        self
    }
}

/// The gate's state as the metrics and SQL show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GateStatus {
    /// Automated actions are suspended.
    pub suspended: bool,
    /// Why (empty when active).
    pub reasons: Vec<String>,
    /// Changes of `suspended` so far (0 = never changed).
    pub epoch: u64,
    /// The acting detector's figures.
    pub acting: Figures,
    /// Per-member figures (alerts whose scores the gate saw).
    pub members: Vec<(String, Figures)>,
    /// Response time at the configured quantile (ms), once judged.
    pub response_ms: Option<f64>,
    pub labels: usize,
    /// Feedback whose alert the gate never saw (members unknown; counted for the
    /// acting detector only).
    pub unmatched_feedback: u64,
    /// Labels in the window per analyst (who suspended automation, when it is).
    #[serde(default)]
    pub analysts: BTreeMap<String, usize>,
}

/// Analyst name counted for feedback without one.
pub const UNATTRIBUTED: &str = "(unattributed)";

/// One counted label.
#[derive(Debug, Clone)]
struct Label {
    reference: String,
    label: FeedbackLabel,
    decisions: Option<Decisions>,
    analyst: String,
}

/// A change of the gate.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Suspended(GateStatus),
    Resumed(GateStatus),
}

/// Member decisions of one alert (None: the member did not score it).
type Decisions = [Option<bool>; 5];

pub struct Gate {
    cfg: GatingConfig,
    labels: VecDeque<Label>,
    /// The refs in `labels` (each at most once).
    refs: HashSet<String>,
    /// The per-deployment secret feedback is authenticated with.
    secret: Option<Vec<u8>>,
    /// (when measured, ms)
    response: VecDeque<(i64, f64)>,
    alerts: HashMap<String, Decisions>,
    alert_order: VecDeque<String>,
    status: GateStatus,
}

impl Gate {
    pub fn new(cfg: GatingConfig) -> Self {
        Gate {
            cfg,
            labels: VecDeque::new(),
            refs: HashSet::new(),
            secret: None,
            response: VecDeque::new(),
            alerts: HashMap::new(),
            alert_order: VecDeque::new(),
            status: GateStatus::default(),
        }
    }

    pub fn config(&self) -> &GatingConfig {
        &self.cfg
    }

    /// Count only feedback carrying a valid `mac` keyed by `secret`.
    pub fn with_feedback_secret(mut self, secret: Vec<u8>) -> Self {
        self.secret = Some(secret);
        self
    }

    /// Remember an alert's member decisions, for feedback that refers to it.
    pub fn observe_alert(&mut self, alert: &Alert) {
        if alert.kind != AlertKind::Detection {
            return;
        }
        let d: Decisions = match &alert.scores {
            Some(s) => [Some(s.rf >= 0.5), Some(s.svm > 0.0), Some(s.lstm >= 0.5), Some(s.twin >= 0.5), s.gbdt.map(|g| g >= 0.5)],
            None => [None, None, None, Some(alert.score >= 0.5), None],
        };
        if self.alerts.insert(alert.alert_id.clone(), d).is_none() {
            self.alert_order.push_back(alert.alert_id.clone());
            while self.alert_order.len() > self.cfg.remember_alerts {
                if let Some(old) = self.alert_order.pop_front() {
                    self.alerts.remove(&old);
                }
            }
        }
    }

    /// Count one analyst label (replacing an earlier label of the same `ref`);
    /// returns a transition if the gate changed. `Err` names why the record does not
    /// count (with a feedback secret: no `mac`, or one that does not verify).
    pub fn observe_feedback(&mut self, fb: &Feedback) -> Result<Option<Transition>, String> {
        if let Some(secret) = &self.secret {
            let analyst = fb.analyst.as_deref().unwrap_or("");
            let Some(mac) = &fb.mac else {
                return Err("unsigned feedback: feedback must carry `mac` (a feedback secret is configured, `gating.feedback_secret_env`)".into());
            };
            let expected = feedback_mac(secret, fb.label.as_str(), analyst, &fb.reference);
            if !mac_matches(&expected, mac, !analyst.contains('\n')) {
                return Err(format!("feedback `mac` does not verify for ref `{}` (HMAC-SHA256 with the deployment's feedback secret)", fb.reference));
            }
        }
        let decisions = match fb.label {
            FeedbackLabel::TruePositive | FeedbackLabel::FalsePositive => {
                let d = self.alerts.get(&fb.reference).copied();
                if d.is_none() {
                    self.status.unmatched_feedback += 1;
                }
                d
            }
            _ => None,
        };
        if !self.refs.insert(fb.reference.clone()) {
            self.labels.retain(|l| l.reference != fb.reference);
        }
        let analyst = fb.analyst.clone().filter(|a| !a.is_empty()).unwrap_or_else(|| UNATTRIBUTED.to_string());
        self.labels.push_back(Label { reference: fb.reference.clone(), label: fb.label, decisions, analyst });
        while self.labels.len() > self.cfg.window {
            if let Some(old) = self.labels.pop_front() {
                self.refs.remove(&old.reference);
            }
        }
        Ok(self.evaluate())
    }

    /// Count one command response time (`ms`, measured at `now_ms`); returns a
    /// transition if the gate changed.
    pub fn observe_response_ms(&mut self, ms: f64, now_ms: i64) -> Option<Transition> {
        self.response.push_back((now_ms, ms));
        while self.response.len() > self.cfg.response_window {
            self.response.pop_front();
        }
        self.tick(now_ms)
    }

    /// Age out old response times (processing time `now_ms`) and re-evaluate.
    pub fn tick(&mut self, now_ms: i64) -> Option<Transition> {
        let max_age = i64::try_from(self.cfg.response_max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        while self.response.front().is_some_and(|(t, _)| now_ms.saturating_sub(*t) > max_age) {
            self.response.pop_front();
        }
        self.evaluate()
    }

    pub fn status(&self) -> &GateStatus {
        &self.status
    }

    pub fn suspended(&self) -> bool {
        self.status.suspended
    }

    fn evaluate(&mut self) -> Option<Transition> {
        let min = self.cfg.min_labels;
        let mut acting = Figures::default();
        let mut members: Vec<Figures> = vec![Figures::default(); MEMBERS.len()];
        let mut analysts: BTreeMap<String, usize> = BTreeMap::new();
        for Label { label, decisions: d, analyst, .. } in &self.labels {
            acting.add(*label);
            *analysts.entry(analyst.clone()).or_default() += 1;
            let Some(d) = d else { continue };
            for (m, fired) in members.iter_mut().zip(d) {
                let Some(fired) = *fired else { continue };
                // The label is about the alert; a member is judged by whether it fired.
                let l = match (label, fired) {
                    (FeedbackLabel::TruePositive, true) => FeedbackLabel::TruePositive,
                    (FeedbackLabel::TruePositive, false) => FeedbackLabel::FalseNegative,
                    (_, true) => FeedbackLabel::FalsePositive,
                    (_, false) => FeedbackLabel::TrueNegative,
                };
                m.add(l);
            }
        }
        let acting = acting.finish(min);
        let response_ms = (self.response.len() >= min).then(|| {
            let mut v: Vec<f64> = self.response.iter().map(|(_, ms)| *ms).collect();
            v.sort_by(f64::total_cmp);
            let i = ((v.len() as f64 - 1.0) * self.cfg.response_quantile).round() as usize;
            v[i.min(v.len() - 1)]
        });
        let mut reasons = Vec::new();
        let c = &self.cfg;
        if let Some(p) = acting.precision.filter(|p| *p < c.min_precision) {
            reasons.push(format!("precision {p:.3} < {}", c.min_precision));
        }
        if let Some(d) = acting.detection_rate.filter(|d| *d < c.min_detection_rate) {
            reasons.push(format!("detection rate {d:.3} < {}", c.min_detection_rate));
        }
        if let Some(f) = acting.fpr.filter(|f| *f > c.max_fpr) {
            reasons.push(format!("false-positive rate {f:.3} > {}", c.max_fpr));
        }
        if let Some(r) = response_ms.filter(|r| *r > c.max_response_ms) {
            reasons.push(format!("response time p{:.0} {r:.0} ms > {} ms", c.response_quantile * 100.0, c.max_response_ms));
        }
        let was = self.status.suspended;
        let now = !reasons.is_empty();
        self.status = GateStatus {
            suspended: now,
            reasons,
            epoch: self.status.epoch + u64::from(was != now),
            acting,
            members: MEMBERS.iter().zip(members).map(|(n, f)| ((*n).to_string(), f.finish(min))).collect(),
            response_ms,
            labels: self.labels.len(),
            unmatched_feedback: self.status.unmatched_feedback,
            analysts,
        };
        match (was, now) {
            (false, true) => Some(Transition::Suspended(self.status.clone())),
            (true, false) => Some(Transition::Resumed(self.status.clone())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinguard_schemas::respond::{AlertResponse, Action, RESPONSE_VERSION};
    use twinguard_schemas::verdict::ModelScores;

    fn fb(r: &str, label: FeedbackLabel) -> Feedback {
        Feedback { v: RESPONSE_VERSION, reference: r.into(), label, analyst: None, note: None, mac: None }
    }

    fn alert(id: &str, rf: f64) -> Alert {
        Alert {
            v: 1,
            alert_id: id.into(),
            kind: AlertKind::Detection,
            device_id: "d".into(),
            device_type: None,
            criticality: None,
            event_time: "2026-01-01T00:00:00Z".into(),
            source: None,
            detector: "ensemble".into(),
            score: 0.9,
            threshold: Some(0.5),
            scores: Some(ModelScores { ensemble: 0.9, rf, svm: 1.0, lstm: 0.9, twin: 0.1, gbdt: None }),
            attack_class: None,
            model_version: None,
            incident_id: "i".into(),
            incident_alerts: 1,
            features: vec![],
            identity_drift: vec![],
            response: AlertResponse { rule: "r".into(), action: Action::Notify, command_id: None, automated: false, suspended: false, needs_human: false, note: None },
            command_id: None,
        }
    }

    #[test]
    fn false_positives_suspend_and_confirmed_benign_resume() {
        let mut g = Gate::new(GatingConfig { window: 100, min_labels: 10, max_fpr: 0.2, min_precision: 0.0, ..Default::default() });
        // Fewer labels than min_labels: not judged, whatever they say.
        for i in 0..9 {
            assert_eq!(g.observe_feedback(&fb(&format!("a{i}"), FeedbackLabel::FalsePositive)), Ok(None));
        }
        assert!(!g.suspended());
        assert!(matches!(g.observe_feedback(&fb("a9", FeedbackLabel::FalsePositive)), Ok(Some(Transition::Suspended(_)))));
        assert!(g.status().reasons[0].starts_with("false-positive rate"), "{:?}", g.status().reasons);
        // FPR = 10 / (10 + TN): back under 0.2 at TN = 41.
        let mut resumed_at = None;
        for i in 0..60 {
            if let Ok(Some(Transition::Resumed(s))) = g.observe_feedback(&fb(&format!("v{i}"), FeedbackLabel::TrueNegative)) {
                resumed_at = Some((i, s));
                break;
            }
        }
        let (i, s) = resumed_at.expect("resumed");
        assert_eq!(i, 39, "FPR = 10 / (10 + 40) = 0.2 at the 40th confirmation");
        assert_eq!(s.epoch, 2);
        assert!(s.acting.fpr.unwrap() <= 0.2);
    }

    #[test]
    fn member_figures_come_from_the_alerts_seen() {
        let mut g = Gate::new(GatingConfig { min_labels: 2, ..Default::default() });
        g.observe_alert(&alert("x", 0.9));
        g.observe_alert(&alert("y", 0.2));
        g.observe_feedback(&fb("x", FeedbackLabel::TruePositive)).unwrap();
        g.observe_feedback(&fb("y", FeedbackLabel::FalsePositive)).unwrap();
        g.observe_feedback(&fb("unknown", FeedbackLabel::TruePositive)).unwrap();
        let s = g.status();
        assert_eq!((s.acting.tp, s.acting.fp), (2, 1));
        let rf = &s.members[0].1;
        // x: rf fired on an attack (TP); y: rf stayed quiet on a false alarm (TN).
        assert_eq!((rf.tp, rf.fp, rf.tn, rf.fn_), (1, 0, 1, 0));
        let svm = &s.members[1].1;
        assert_eq!((svm.tp, svm.fp), (1, 1));
        assert_eq!(s.unmatched_feedback, 1);
    }

    #[test]
    fn slow_responses_suspend() {
        let mut g = Gate::new(GatingConfig { min_labels: 5, max_response_ms: 100.0, response_window: 10, ..Default::default() });
        for i in 0..10 {
            assert!(g.observe_response_ms(20.0, i).is_none());
        }
        assert!(matches!(g.observe_response_ms(500.0, 10), Some(Transition::Suspended(_))));
        let mut resumed = false;
        for i in 0..10 {
            resumed |= matches!(g.observe_response_ms(20.0, 11 + i), Some(Transition::Resumed(_)));
        }
        assert!(resumed);
        // Suspended for slowness with no new commands: the evidence ages out.
        assert!(matches!(g.observe_response_ms(900.0, 100), Some(Transition::Suspended(_))));
        assert_eq!(g.tick(100 + 299_000), None, "still within response_max_age_secs");
        assert!(matches!(g.tick(100 + 301_000), Some(Transition::Resumed(_))));
    }

    #[test]
    fn feedback_on_one_ref_counts_once() {
        let mut g = Gate::new(GatingConfig { window: 100, min_labels: 5, max_fpr: 0.2, min_precision: 0.0, ..Default::default() });
        // One writer repeating a label on one alert is one label: never enough to judge.
        for _ in 0..50 {
            let _ = g.observe_feedback(&fb("a0", FeedbackLabel::FalsePositive));
        }
        assert!(!g.suspended(), "{:?}", g.status());
        assert_eq!((g.status().labels, g.status().acting.fp), (1, 1));
        // Distinct alerts count one each; the latest label of a ref replaces the earlier one.
        for i in 1..5 {
            let _ = g.observe_feedback(&fb(&format!("a{i}"), FeedbackLabel::FalsePositive));
        }
        assert!(g.suspended());
        let _ = g.observe_feedback(&fb("a0", FeedbackLabel::TruePositive));
        assert_eq!((g.status().labels, g.status().acting.fp, g.status().acting.tp), (5, 4, 1));
    }

    #[test]
    fn feedback_is_attributed_and_with_a_secret_must_be_signed() {
        let cfg = GatingConfig { window: 100, min_labels: 3, max_fpr: 0.2, min_precision: 0.0, ..Default::default() };
        let mut g = Gate::new(cfg.clone()).with_feedback_secret(b"soc-secret".to_vec());
        let signed = |r: &str, analyst: &str, key: &[u8]| Feedback {
            analyst: Some(analyst.into()),
            mac: Some(feedback_mac(key, "false_positive", analyst, r)),
            ..fb(r, FeedbackLabel::FalsePositive)
        };
        // Unsigned, wrongly signed, or signed for another analyst: refused, not counted.
        assert!(g.observe_feedback(&fb("a0", FeedbackLabel::FalsePositive)).unwrap_err().contains("unsigned feedback"));
        assert!(g.observe_feedback(&signed("a0", "mallory", b"guess")).unwrap_err().contains("does not verify"));
        let stolen = Feedback { analyst: Some("bob".into()), ..signed("a0", "alice", b"soc-secret") };
        assert!(g.observe_feedback(&stolen).unwrap_err().contains("does not verify"));
        assert_eq!(g.status().labels, 0);
        // Signed feedback counts, attributed to its analyst.
        for (i, who) in ["alice", "alice", "bob"].iter().enumerate() {
            g.observe_feedback(&signed(&format!("a{i}"), who, b"soc-secret")).unwrap();
        }
        assert!(g.suspended());
        assert_eq!(g.status().analysts, BTreeMap::from([("alice".to_string(), 2), ("bob".to_string(), 1)]));
        // Without a secret, unsigned feedback counts, unattributed if nobody is named.
        let mut open = Gate::new(cfg);
        open.observe_feedback(&fb("a0", FeedbackLabel::FalsePositive)).unwrap();
        assert_eq!(open.status().analysts, BTreeMap::from([(UNATTRIBUTED.to_string(), 1)]));
    }

    #[test]
    fn config_is_checked() {
        assert_eq!(GatingConfig { max_fpr: 2.0, ..Default::default() }.validate().unwrap_err().key, "max_fpr");
        assert_eq!(GatingConfig { min_labels: 500, ..Default::default() }.validate().unwrap_err().key, "min_labels");
        assert!(GatingConfig::default().validate().is_ok());
    }
}
