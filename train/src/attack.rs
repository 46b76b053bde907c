//! `twinguard attack`: constrained evasion of a trained model by attackers who
//! shape their own traffic. A constraint file says, per attack family, which raw
//! event fields the attacker controls and how far (factors of the original value,
//! absolute bounds, fields that must stay ordered, fields that follow another's
//! factor); every adversarial event is re-decoded by the schema's decoder, so its
//! validation holds.
//!
//! Every attack goes through the real `Detector`: the dataset is streamed through
//! it in order, and at each attacked test event the device's twin as it stood
//! before the event is cloned once per candidate (each clone under its own device
//! id), so a whole batch of candidates is scored in one call, each against exactly
//! the state the real event meets. Each search of [`search`] (A1 random, A2
//! gradient, A3 coordinate; `../shared/FEDERATED.md` §3.4) keeps the candidate with
//! the lowest score of the target (the ensemble, or one member against its own
//! threshold) until it falls below the threshold or its query budget is spent; an
//! event is robustly detected only when every search fails (the best attack per
//! event). The stream then goes on with the original event (threat T1: each event
//! shaped on its own; the twin is not fed the adversarial events).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use twinguard_models::Artifact;
use twinguard_operators::{Detector, TwinConfig};
use twinguard_schemas::verdict::{verdicts_from_batch, Verdict};
use twinguard_schemas::{DecodeLimits, Decoder, EventSchema, RawRecord};

use crate::TrainError;

pub mod search;
pub use search::Method;

/// One field an attacker may change: its new value is the original times a factor
/// in `[min_factor, max_factor]`, clamped to `[min, max]`; or, with `follows`, the
/// original times the factor another knob drew (a derived field recomputed, e.g. a
/// window's byte sum when every packet is padded).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Knob {
    pub field: String,
    #[serde(default = "one")]
    pub min_factor: f64,
    #[serde(default = "one")]
    pub max_factor: f64,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default)]
    pub follows: Option<String>,
}

fn one() -> f64 {
    1.0
}

/// A family's knobs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FamilyKnobs {
    pub knobs: Vec<Knob>,
}

/// Fields kept in ascending order after a change (e.g. min ≤ avg ≤ max).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ordered {
    pub fields: Vec<String>,
}

/// A constraint file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    /// What the threat model is, in words (reported).
    pub threat: String,
    /// Per family (`default` for families not listed); an empty list: nothing can change.
    pub family: BTreeMap<String, FamilyKnobs>,
    #[serde(default)]
    pub ordered: Vec<Ordered>,
}

impl Constraints {
    /// Read and check a constraint file against the schema's metric fields.
    pub fn load(path: &Path, schema: &EventSchema) -> Result<Constraints, TrainError> {
        let err = |reason: String| TrainError::Config { key: format!("--constraints {}", path.display()), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let c: Constraints = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let metrics: BTreeSet<String> = schema.metric_indices().into_iter().map(|i| schema.fields[i].name.clone()).collect();
        for (fam, k) in &c.family {
            let own: BTreeSet<&str> = k.knobs.iter().map(|k| k.field.as_str()).collect();
            for knob in &k.knobs {
                if !metrics.contains(&knob.field) {
                    return Err(err(format!("family `{fam}`: `{}` is not a metric of schema {}", knob.field, schema.id())));
                }
                if !(knob.min_factor > 0.0 && knob.min_factor <= knob.max_factor) {
                    return Err(err(format!("family `{fam}`, `{}`: need 0 < min_factor <= max_factor", knob.field)));
                }
                if let Some(f) = knob.follows.as_deref().filter(|f| !own.contains(f)) {
                    return Err(err(format!("family `{fam}`, `{}` follows `{f}`, which is not one of the family's knobs", knob.field)));
                }
            }
        }
        for o in &c.ordered {
            if let Some(f) = o.fields.iter().find(|f| !metrics.contains(*f)) {
                return Err(err(format!("ordered: `{f}` is not a metric of schema {}", schema.id())));
            }
        }
        if !c.family.contains_key("default") {
            return Err(err("no `[family.default]` (the knobs of families not listed)".into()));
        }
        Ok(c)
    }

    fn knobs(&self, family: &str) -> &[Knob] {
        &self.family.get(family).or_else(|| self.family.get("default")).expect("checked at load").knobs
    }
}

/// What to attack and how hard.
#[derive(Debug, Clone)]
pub struct AttackOptions {
    pub constraints: Constraints,
    /// Attacked events (attack rows of the test split, the first ones in a seeded shuffle).
    pub events: usize,
    /// Candidates scored per event and search at most.
    pub queries: usize,
    /// The searches run on every detected event (an event evades when one succeeds).
    pub methods: Vec<Method>,
    /// Candidates per step (one detector call).
    pub batch: usize,
    /// `ensemble` and/or members (`rf`, `svm`, `lstm`, `gbdt`, `twin`), each attacked on its own.
    pub targets: Vec<String>,
    pub seed: u64,
}

/// Detection of the attacked events before and after the attack.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Figures {
    pub events: usize,
    pub clean_detected: usize,
    pub robust_detected: usize,
    pub clean_dr: f64,
    pub robust_dr: f64,
}

impl Figures {
    fn add(&mut self, clean: bool, robust: bool) {
        self.events += 1;
        self.clean_detected += usize::from(clean);
        self.robust_detected += usize::from(robust);
        self.clean_dr = self.clean_detected as f64 / self.events as f64;
        self.robust_dr = self.robust_detected as f64 / self.events as f64;
    }
}

/// One target's results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TargetReport {
    pub threshold: f64,
    pub overall: Figures,
    pub by_family: BTreeMap<String, Figures>,
    /// Each search on its own (`random`, `gradient`, `coordinate`).
    #[serde(default)]
    pub by_method: BTreeMap<String, Figures>,
    /// Median candidates scored per evaded event (by the cheapest search that evaded).
    pub median_queries: f64,
    /// Per changed field, the median relative change (new / original − 1) of the
    /// evading events, as they were sent (after repair).
    pub median_change: BTreeMap<String, f64>,
}

/// The attack report (`attack.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttackReport {
    pub model_version: String,
    pub dataset: String,
    pub threat: String,
    pub queries: usize,
    pub targets: BTreeMap<String, TargetReport>,
    /// Candidates scored, and those the schema's decoder refused (constraint
    /// satisfaction: must be 0).
    pub candidates: usize,
    pub candidates_refused: usize,
    pub seconds: f64,
}

/// The score a target is judged on, and its threshold.
fn target_of(artifact: &Artifact, name: &str) -> Result<f64, TrainError> {
    if name == "ensemble" {
        return Ok(artifact.ensemble.threshold);
    }
    artifact
        .ensemble
        .combination
        .as_ref()
        .and_then(|c| c.member_thresholds.get(name).copied())
        .ok_or_else(|| TrainError::Config { key: "--targets".into(), reason: format!("model {} stores no threshold for member `{name}` (targets: ensemble, rf, svm, lstm, gbdt, twin)", artifact.version) })
}

fn score(v: &Verdict, name: &str) -> f64 {
    let s = v.scores.as_ref().expect("a model scores every event");
    match name {
        "ensemble" => s.ensemble,
        "rf" => s.rf,
        "svm" => s.svm,
        "lstm" => s.lstm,
        "twin" => s.twin,
        _ => s.gbdt.unwrap_or(0.5),
    }
}

/// The event with `knobs` set by factors `f` of the original values `x0`, repaired:
/// each clamped to its bounds, then `ordered` groups raised so each field is at
/// least the one before it (within every field's bounds when the original was
/// ordered and the group's factors and caps agree), then each `follows` field
/// scaled by its lead's final ratio (a derived field recomputed).
fn shaped(knobs: &[Knob], x0: &[f64], f: &[f64], ordered: &[Ordered], event: &Map<String, Value>) -> Map<String, Value> {
    let mut e = event.clone();
    let clamp = |knob: &Knob, x: f64, v: f64| {
        let v = knob.min.map_or(v, |lo| v.max(lo.min(x)));
        knob.max.map_or(v, |hi| v.min(hi.max(x)))
    };
    for (k, knob) in knobs.iter().enumerate() {
        if knob.follows.is_none() && !x0[k].is_nan() {
            e.insert(knob.field.clone(), Value::from(clamp(knob, x0[k], x0[k] * f[k])));
        }
    }
    for o in ordered {
        let mut floor = f64::NEG_INFINITY;
        for field in &o.fields {
            if let Some(v) = e.get(field).and_then(Value::as_f64) {
                floor = floor.max(v);
                e.insert(field.clone(), Value::from(floor));
            }
        }
    }
    for (k, knob) in knobs.iter().enumerate() {
        let Some(lead) = &knob.follows else { continue };
        let ratio = knobs
            .iter()
            .position(|l| &l.field == lead)
            .filter(|&j| x0[j].is_finite() && x0[j] != 0.0)
            .and_then(|j| e.get(lead).and_then(Value::as_f64).map(|v| v / x0[j]))
            .unwrap_or(1.0);
        if !x0[k].is_nan() {
            e.insert(knob.field.clone(), Value::from(clamp(knob, x0[k], x0[k] * ratio)));
        }
    }
    e
}

/// Attack `artifact` on `records` (the dataset in stream order; `attacked` the
/// record indices to attack, with their fine class). `log` gets progress.
#[allow(clippy::too_many_arguments)]
pub fn attack(
    schema: &EventSchema,
    twin: &TwinConfig,
    artifact: &Artifact,
    records: &[(String, Vec<u8>)],
    attacked: &BTreeMap<usize, String>,
    dataset: &str,
    opts: &AttackOptions,
    log: &mut dyn FnMut(usize, usize),
) -> Result<AttackReport, TrainError> {
    Ok(attack_rows(schema, twin, artifact, records, attacked, dataset, opts, log)?.0)
}

/// The best adversarial version found for one attacked event (against the first
/// target), as the feature row the detector computed for it.
#[derive(Debug, Clone)]
pub struct Adversarial {
    pub record: usize,
    pub class: String,
    pub row: Vec<f64>,
    /// It was detected clean and is not after the attack.
    pub evaded: bool,
}

/// [`attack`], also returning each attacked event's best adversarial feature row
/// (adversarial training adds them to the training rows).
#[allow(clippy::too_many_arguments)]
pub fn attack_rows(
    schema: &EventSchema,
    twin: &TwinConfig,
    artifact: &Artifact,
    records: &[(String, Vec<u8>)],
    attacked: &BTreeMap<usize, String>,
    dataset: &str,
    opts: &AttackOptions,
    log: &mut dyn FnMut(usize, usize),
) -> Result<(AttackReport, Vec<Adversarial>), TrainError> {
    let started = std::time::Instant::now();
    let thresholds: Vec<(String, f64)> = opts.targets.iter().map(|t| Ok((t.clone(), target_of(artifact, t)?))).collect::<Result<_, TrainError>>()?;
    let mut det = Detector::with_model(schema, twin.clone(), artifact.clone())?;
    let decoder = Decoder::new(schema.clone(), DecodeLimits::default());
    let now = chrono::Utc::now().timestamp_millis();
    let mut reports: BTreeMap<String, TargetReport> = thresholds.iter().map(|(t, thr)| (t.clone(), TargetReport { threshold: *thr, ..Default::default() })).collect();
    let mut queries: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut changes: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    let (mut candidates, mut refused) = (0usize, 0usize);
    let mut rows: Vec<Adversarial> = Vec::with_capacity(attacked.len());
    let mut next = 0usize;
    let feed = |det: &mut Detector, rows: std::ops::Range<usize>| -> Result<(), TrainError> {
        let rows: Vec<usize> = rows.collect();
        for chunk in rows.chunks(512) {
            let raw: Vec<RawRecord<'_>> = chunk.iter().map(|&i| RawRecord { partition: 0, offset: i as i64, key: Some(records[i].0.as_bytes()), payload: Some(&records[i].1) }).collect();
            det.detect(&decoder.decode(&raw, now)?.batch)?;
            det.twin_mut().drain_changelog();
        }
        Ok(())
    };
    for (done, (&i, class)) in attacked.iter().enumerate() {
        feed(&mut det, next..i)?;
        next = i + 1;
        let (device, payload) = &records[i];
        let event: Map<String, Value> = serde_json::from_slice(payload).map_err(|e| TrainError::Dataset { path: dataset.into(), reason: format!("record {i} is not a JSON event: {e}") })?;
        let family = artifact.family(class);
        let knobs = opts.constraints.knobs(&family);
        let x0: Vec<f64> = knobs.iter().map(|k| event.get(&k.field).and_then(Value::as_f64).unwrap_or(f64::NAN)).collect();
        let pre = det.twin().store().get(0, device).cloned();
        let at = Event { index: i, event: &event, pre: pre.as_ref(), knobs, x0: &x0, ordered: &opts.constraints.ordered };
        let mut evaluate = |fs: &[Vec<f64>]| -> Result<Vec<Option<(Verdict, Vec<f64>)>>, TrainError> {
            let (got, n_refused) = candidates_scored(&mut det, &decoder, now, &at, fs)?;
            candidates += fs.len();
            refused += n_refused;
            Ok(got)
        };
        let ones = vec![1.0; knobs.len()];
        let clean = evaluate(std::slice::from_ref(&ones))?.pop().flatten();
        for (t, (target, thr)) in thresholds.iter().enumerate() {
            let rep = reports.get_mut(target).expect("one per target");
            let Some((clean, clean_row)) = &clean else { continue };
            let clean_score = score(clean, target);
            let detected = clean_score >= *thr;
            let clean_found = || search::Found { score: clean_score, factors: ones.clone(), row: clean_row.clone(), used: 1 };
            let mut found = clean_found();
            let mut used = usize::MAX;
            for &m in &opts.methods {
                let got = if detected && !knobs.is_empty() {
                    let mut scored = |fs: &[Vec<f64>]| Ok(evaluate(fs)?.into_iter().map(|v| v.map(|(v, row)| (score(&v, target), row))).collect());
                    let s = search::Search { knobs, free: search::free_knobs(knobs, &x0), thr: *thr, budget: opts.queries, batch: opts.batch, evaluate: &mut scored, best: clean_found() };
                    s.run(m, opts.seed ^ ((i as u64) << 8) ^ ((t as u64) << 4) ^ m as u64)?
                } else {
                    clean_found()
                };
                rep.by_method.entry(m.name().to_string()).or_default().add(detected, got.score >= *thr);
                if got.score < *thr {
                    used = used.min(got.used);
                }
                if got.score < found.score {
                    found = got;
                }
            }
            let search::Found { score: best, factors: best_f, row: best_row, .. } = found;
            let robust = best >= *thr;
            if t == 0 {
                rows.push(Adversarial { record: i, class: class.clone(), row: best_row, evaded: detected && !robust });
            }
            rep.overall.add(detected, robust);
            rep.by_family.entry(family.clone()).or_default().add(detected, robust);
            if detected && !robust {
                queries.entry(target.clone()).or_default().push(used);
                // The changes the evading event really carries (after repair).
                let final_event = shaped(knobs, &x0, &best_f, &opts.constraints.ordered, &event);
                for (k, knob) in knobs.iter().enumerate() {
                    let now = final_event.get(&knob.field).and_then(Value::as_f64).unwrap_or(f64::NAN);
                    let change = now / x0[k] - 1.0;
                    if change.is_finite() && change.abs() > 1e-12 {
                        changes.entry(target.clone()).or_default().entry(knob.field.clone()).or_default().push(change);
                    }
                }
            }
        }
        feed(&mut det, i..i + 1)?;
        log(done + 1, attacked.len());
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
    };
    for (t, rep) in reports.iter_mut() {
        rep.median_queries = median(queries.remove(t).unwrap_or_default().into_iter().map(|q| q as f64).collect());
        rep.median_change = changes.remove(t).unwrap_or_default().into_iter().map(|(f, v)| (f, median(v))).collect();
    }
    let report = AttackReport {
        model_version: artifact.version.clone(),
        dataset: dataset.to_string(),
        threat: opts.constraints.threat.clone(),
        queries: opts.queries,
        targets: reports,
        candidates,
        candidates_refused: refused,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((report, rows))
}

/// One attacked event and what the attacker may do to it.
struct Event<'a> {
    index: usize,
    event: &'a Map<String, Value>,
    /// The device's twin before the event (None: its first event).
    pre: Option<&'a twinguard_operators::Twin>,
    knobs: &'a [Knob],
    x0: &'a [f64],
    ordered: &'a [Ordered],
}

/// Score candidates (factor vectors) for `at`, each on its own clone of the
/// device's twin under its own device id, in one detector call; the clones are
/// removed afterwards. Returns each candidate's verdict and feature row (None when
/// the decoder refused it), and how many the decoder refused.
fn candidates_scored(det: &mut Detector, decoder: &Decoder, now: i64, at: &Event<'_>, fs: &[Vec<f64>]) -> Result<(Vec<Option<(Verdict, Vec<f64>)>>, usize), TrainError> {
    let events: Vec<(String, Vec<u8>)> = fs
        .iter()
        .enumerate()
        .map(|(c, f)| {
            // Short whatever the device id's length (ids are capped at 128 bytes);
            // no feature reads the id, only the twin it names.
            let id = format!("adv~{}~{c}", at.index);
            let mut e = shaped(at.knobs, at.x0, f, at.ordered, at.event);
            e.insert("device_id".into(), Value::from(id.clone()));
            (id, serde_json::to_vec(&e).expect("serialises"))
        })
        .collect();
    for (id, _) in &events {
        let clone = at.pre.cloned().map(|mut t| {
            t.device_id = id.clone();
            t
        });
        det.twin_mut().store_mut().restore(0, id, clone);
    }
    // Distinct offsets (the feature query joins event and twin on them), each past
    // the clone's last one: no feature reads the offset itself.
    let raw: Vec<RawRecord<'_>> =
        events.iter().enumerate().map(|(c, (id, p))| RawRecord { partition: 0, offset: (at.index + c) as i64, key: Some(id.as_bytes()), payload: Some(p) }).collect();
    let out = decoder.decode(&raw, now)?;
    let (v, feats) = det.detect(&out.batch)?;
    let feats = feats.expect("a model computes features");
    let mut by_id: BTreeMap<String, (Verdict, Vec<f64>)> =
        verdicts_from_batch(&v, "attack").into_iter().enumerate().map(|(j, v)| (v.device_id.clone(), (v, feats.row(j).to_vec()))).collect();
    for (id, _) in &events {
        det.twin_mut().store_mut().restore(0, id, None);
    }
    det.twin_mut().drain_changelog();
    Ok((events.iter().map(|(id, _)| by_id.remove(id)).collect(), out.rejects.len()))
}

/// The report as a text table.
pub fn render(r: &AttackReport) -> String {
    let mut s = format!("attack on model {} ({}), {} queries per event at most\nthreat: {}\n", r.model_version, r.dataset, r.queries, r.threat);
    s.push_str(&format!("{:<10} {:<10} {:>7} {:>9} {:>10} {:>9}\n", "target", "family", "events", "clean DR", "robust DR", "queries"));
    for (t, rep) in &r.targets {
        let row = |fam: &str, f: &Figures, q: String| format!("{t:<10} {fam:<10} {:>7} {:>9.3} {:>10.3} {q:>9}\n", f.events, f.clean_dr, f.robust_dr);
        s.push_str(&row("all", &rep.overall, format!("{:.0}", rep.median_queries)));
        for (fam, f) in &rep.by_family {
            s.push_str(&row(fam, f, String::new()));
        }
    }
    s.push_str(&format!("{} candidates scored, {} refused by the schema's decoder, {:.1} s\n", r.candidates, r.candidates_refused, r.seconds));
    s
}

/// `twinguard attack`: attack `opts.events` attack rows of the model's own test
/// split (its card's dataset and split), write `attack.json` into `out`.
pub fn run_attack(artifact: &Artifact, opts: &AttackOptions, out: &Path, log: &mut dyn FnMut(crate::Progress<'_>)) -> Result<AttackReport, TrainError> {
    let recipe = crate::Recipe::from_card(artifact)?;
    let schema = crate::job::schema_of(artifact, &recipe)?;
    let twin = crate::twin_config_of(artifact)?;
    let records = recipe.dataset.load(&schema)?;
    let scores = crate::score_stream(&schema, &twin, artifact.clone(), &records, &mut |d, n| log(crate::Progress::Status(&format!("  scoring: {d}/{n} events   "))))?;
    log(crate::Progress::StatusEnd);
    let split = recipe.split.apply(&scores.truth);
    let mut rows: Vec<usize> = split.test.iter().copied().filter(|&k| scores.truth[k] != twinguard_models::labels::NORMAL).collect();
    rows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(opts.seed));
    rows.truncate(opts.events);
    let attacked: BTreeMap<usize, String> = rows.iter().map(|&k| (scores.offsets[k] as usize, scores.truth[k].clone())).collect();
    let name = recipe.dataset.file.display().to_string();
    let report = attack(&schema, &twin, artifact, &records, &attacked, &name, opts, &mut |d, n| log(crate::Progress::Status(&format!("  attacking: {d}/{n} events   "))))?;
    log(crate::Progress::StatusEnd);
    std::fs::create_dir_all(out).map_err(|e| TrainError::Io { path: out.to_path_buf(), reason: e.to_string() })?;
    let path = out.join("attack.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report).expect("serialises")).map_err(|e| TrainError::Io { path, reason: e.to_string() })?;
    Ok(report)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{run_train, TrainJob};

    pub(crate) fn knob(field: &str, lo: f64, hi: f64) -> Knob {
        Knob { field: field.into(), min_factor: lo, max_factor: hi, min: None, max: None, follows: None }
    }

    /// The lab dataset, a small model on it, and its job.
    pub(crate) fn lab(dir: &Path) -> (Artifact, TrainJob) {
        let lab = crate::testkit::write_lab_dataset(dir, 2400, 1_760_000_000_000).unwrap();
        let job = crate::testkit::lab_job(&lab, 10, dir.join("model"));
        (run_train(&job, &mut |_| {}).unwrap().0, job)
    }

    /// Repair: ordered fields raised to at least the one before, a follower scaled
    /// by its lead's final ratio, caps held.
    #[test]
    fn shaping_keeps_fields_ordered_derived_fields_consistent_and_caps() {
        let mut cap = knob("max", 1.0, 2.0);
        cap.max = Some(1514.0);
        let knobs = vec![knob("min", 1.0, 2.0), knob("avg", 1.0, 2.0), cap, Knob { follows: Some("avg".into()), ..knob("tot_sum", 1.0, 1.0) }];
        let event: Map<String, Value> = serde_json::from_str(r#"{"min": 60.0, "avg": 100.0, "max": 1000.0, "tot_sum": 1000.0}"#).unwrap();
        let x0 = [60.0, 100.0, 1000.0, 1000.0];
        let ordered = [Ordered { fields: vec!["min".into(), "avg".into(), "max".into()] }];
        let e = shaped(&knobs, &x0, &[2.0, 1.0, 2.0, 1.0], &ordered, &event);
        let v = |f: &str| e[f].as_f64().unwrap();
        assert_eq!((v("min"), v("avg"), v("max")), (120.0, 120.0, 1514.0), "min padded past avg lifts avg; max capped");
        assert_eq!(v("tot_sum"), 1200.0, "the byte sum follows avg's final ratio (1.2), not its drawn factor (1.0)");
    }

    /// The clones see exactly the state the real events meet (with nothing
    /// mutable, the attack's clean scores are the stream's and nothing evades);
    /// with loose knobs floods evade, every candidate still decodes, and the
    /// evading events changed only what the constraints allow.
    #[test]
    fn the_attack_scores_candidates_on_the_real_state_and_keeps_to_its_constraints() {
        let dir = std::env::temp_dir().join(format!("twinguard-attack-{}", std::process::id()));
        let (artifact, job) = lab(&dir);
        let records = job.dataset.load(&job.schema).unwrap();
        let scores = crate::score_stream(&job.schema, &job.twin, artifact.clone(), &records, &mut |_, _| {}).unwrap();
        let split = job.split.apply(&scores.truth);
        let attacked: BTreeMap<usize, String> =
            split.test.iter().filter(|&&k| scores.truth[k] != "normal").take(80).map(|&k| (scores.offsets[k] as usize, scores.truth[k].clone())).collect();
        let thr = artifact.ensemble.threshold;
        let stream_detected = split.test.iter().filter(|&&k| attacked.contains_key(&(scores.offsets[k] as usize)) && scores.ensemble[k] >= thr).count();
        let constraints = |knobs: Vec<Knob>| Constraints { threat: "test".into(), family: BTreeMap::from([("default".into(), FamilyKnobs { knobs })]), ordered: vec![] };
        let opts = |c: Constraints| AttackOptions { constraints: c, events: 80, queries: 60, methods: Method::ALL.to_vec(), batch: 12, targets: vec!["ensemble".into(), "rf".into()], seed: 1 };

        let fixed = attack(&job.schema, &job.twin, &artifact, &records, &attacked, "lab", &opts(constraints(vec![])), &mut |_, _| {}).unwrap();
        let e = &fixed.targets["ensemble"].overall;
        assert_eq!((e.events, e.clean_detected), (attacked.len(), stream_detected), "a clone's clean score must be the stream's");
        assert!(fixed.targets.values().all(|t| t.overall.robust_detected == t.overall.clean_detected));

        let loose = constraints(vec![knob("pkts", 0.02, 1.0), knob("bytes", 0.02, 1.0), knob("dur", 1.0, 1.5)]);
        let r = attack(&job.schema, &job.twin, &artifact, &records, &attacked, "lab", &opts(loose), &mut |_, _| {}).unwrap();
        eprintln!("{}", render(&r));
        assert_eq!(r.candidates_refused, 0, "every adversarial event passes the decoder");
        let e = &r.targets["ensemble"];
        assert_eq!(e.overall.clean_detected, stream_detected);
        assert!(e.overall.robust_dr < e.overall.clean_dr - 0.3, "loose knobs must let floods evade: {:?}", e.overall);
        // An event evades when any search does: the overall robust count is at
        // most each search's own.
        for m in Method::ALL {
            let f = &e.by_method[m.name()];
            assert!(f.clean_detected == e.overall.clean_detected && f.robust_detected >= e.overall.robust_detected, "{m:?}: {f:?} vs {:?}", e.overall);
        }
        for (field, change) in &e.median_change {
            let (lo, hi) = if field == "dur" { (0.0, 0.5) } else { (-0.98, 0.0) };
            assert!((lo - 1e-9..=hi + 1e-9).contains(change), "{field} changed by {change}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
