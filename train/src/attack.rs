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

pub mod constraints;
pub mod search;
pub use constraints::{Constraints, FamilyKnobs, Knob, Ordered};
use constraints::shaped;
pub use search::Method;

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
    /// Threat T3 ("boiling frog"): the attacked rows are the test split's attack
    /// rows in stream order (runs of consecutive events), and each event that
    /// evaded the first target is fed to its device's twin as the attacker sent
    /// it, so what passed as normal is learned into the baseline.
    pub feed_back: bool,
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
    /// Candidates scored until each evaded event first evaded (by the cheapest
    /// search), ascending: the robust DR at any smaller budget `b` is
    /// `(robust_detected + #{q > b}) / events` (every search is a prefix of
    /// itself with a larger budget).
    #[serde(default)]
    pub evasion_queries: Vec<usize>,
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
    /// T2: identities cloned; T3: evasions fed back through the twin.
    #[serde(default)]
    pub clone_identity: bool,
    #[serde(default)]
    pub feed_back: bool,
    /// T3: evasions fed to the twin as sent.
    #[serde(default)]
    pub fed_back: usize,
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
    let (mut candidates, mut refused, mut fed_back) = (0usize, 0usize, 0usize);
    let mut rows: Vec<Adversarial> = Vec::with_capacity(attacked.len());
    let mut next = 0usize;
    let feed = |det: &mut Detector, rows: std::ops::Range<usize>, sent: Option<&[u8]>| -> Result<(), TrainError> {
        let rows: Vec<usize> = rows.collect();
        for chunk in rows.chunks(512) {
            let raw: Vec<RawRecord<'_>> =
                chunk.iter().map(|&i| RawRecord { partition: 0, offset: i as i64, key: Some(records[i].0.as_bytes()), payload: Some(sent.unwrap_or(&records[i].1)) }).collect();
            det.detect(&decoder.decode(&raw, now)?.batch)?;
            det.twin_mut().drain_changelog();
        }
        Ok(())
    };
    for (done, (&i, class)) in attacked.iter().enumerate() {
        feed(&mut det, next..i, None)?;
        next = i + 1;
        let (device, payload) = &records[i];
        let event: Map<String, Value> = serde_json::from_slice(payload).map_err(|e| TrainError::Dataset { path: dataset.into(), reason: format!("record {i} is not a JSON event: {e}") })?;
        let family = artifact.family(class);
        let knobs = opts.constraints.knobs(&family);
        let x0: Vec<f64> = knobs.iter().map(|k| event.get(&k.field).and_then(Value::as_f64).unwrap_or(f64::NAN)).collect();
        let pre = det.twin().store().get(0, device).cloned();
        let original = Event { index: i, event: &event, pre: pre.as_ref(), knobs, x0: &x0, ordered: &opts.constraints.ordered };
        let ones = vec![1.0; knobs.len()];
        let (clean, _) = candidates_scored(&mut det, &decoder, now, &original, std::slice::from_ref(&ones))?;
        let clean = clean.into_iter().next().flatten();
        // T2: every candidate carries the identity the device's twin learned.
        let base = if opts.constraints.clone_identity { with_cloned_identity(schema, &event, pre.as_ref()) } else { event.clone() };
        let at = Event { event: &base, ..original };
        let mut evaluate = |fs: &[Vec<f64>]| -> Result<Vec<Option<(Verdict, Vec<f64>)>>, TrainError> {
            let (got, n_refused) = candidates_scored(&mut det, &decoder, now, &at, fs)?;
            candidates += fs.len();
            refused += n_refused;
            Ok(got)
        };
        // The identity clone alone, before any shaping (T2's first candidate).
        let cloned = if opts.constraints.clone_identity { evaluate(std::slice::from_ref(&ones))?.pop().flatten() } else { None };
        let mut sent: Option<Vec<u8>> = None;
        for (t, (target, thr)) in thresholds.iter().enumerate() {
            let rep = reports.get_mut(target).expect("one per target");
            let Some((clean, clean_row)) = &clean else { continue };
            let clean_score = score(clean, target);
            let detected = clean_score >= *thr;
            let clean_found = || match &cloned {
                Some((v, row)) if score(v, target) < clean_score => search::Found { score: score(v, target), factors: ones.clone(), row: row.clone(), used: 2 },
                _ => search::Found { score: clean_score, factors: ones.clone(), row: clean_row.clone(), used: 1 },
            };
            let seed = opts.seed ^ ((i as u64) << 8) ^ ((t as u64) << 4);
            let (found, used) = if detected && !knobs.is_empty() {
                let mut scored = |fs: &[Vec<f64>]| Ok(evaluate(fs)?.into_iter().map(|v| v.map(|(v, row)| (score(&v, target), row))).collect());
                best_of(opts, knobs, &x0, *thr, &clean_found, seed, &mut scored, rep)?
            } else {
                opts.methods.iter().for_each(|m| rep.by_method.entry(m.name().to_string()).or_default().add(detected, detected));
                (clean_found(), usize::MAX)
            };
            let search::Found { score: best, factors: best_f, row: best_row, .. } = found;
            let robust = best >= *thr;
            // The evading event as the attacker sends it (after repair).
            let evading = (detected && !robust).then(|| shaped(knobs, &x0, &best_f, &opts.constraints.ordered, &base));
            if t == 0 {
                rows.push(Adversarial { record: i, class: class.clone(), row: best_row, evaded: evading.is_some() });
                sent = evading.as_ref().filter(|_| opts.feed_back).map(|e| serde_json::to_vec(e).expect("serialises"));
            }
            rep.overall.add(detected, robust);
            rep.by_family.entry(family.clone()).or_default().add(detected, robust);
            if let Some(e) = &evading {
                queries.entry(target.clone()).or_default().push(used);
                record_changes(e, knobs, &x0, changes.entry(target.clone()).or_default());
            }
        }
        // T1: the twin sees the original event; T3: what the attacker sent.
        fed_back += usize::from(sent.is_some());
        feed(&mut det, i..i + 1, sent.as_deref())?;
        log(done + 1, attacked.len());
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
    };
    for (t, rep) in reports.iter_mut() {
        let mut q = queries.remove(t).unwrap_or_default();
        q.sort_unstable();
        rep.median_queries = median(q.iter().map(|&q| q as f64).collect());
        rep.evasion_queries = q;
        rep.median_change = changes.remove(t).unwrap_or_default().into_iter().map(|(f, v)| (f, median(v))).collect();
    }
    let report = AttackReport {
        model_version: artifact.version.clone(),
        dataset: dataset.to_string(),
        threat: opts.constraints.threat.clone(),
        clone_identity: opts.constraints.clone_identity,
        feed_back: opts.feed_back,
        fed_back,
        queries: opts.queries,
        targets: reports,
        candidates,
        candidates_refused: refused,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((report, rows))
}

/// The relative changes (new / original − 1) an evading event really carries
/// after repair, per changed field.
fn record_changes(sent: &Map<String, Value>, knobs: &[Knob], x0: &[f64], into: &mut BTreeMap<String, Vec<f64>>) {
    for (k, knob) in knobs.iter().enumerate() {
        let change = sent.get(&knob.field).and_then(Value::as_f64).unwrap_or(f64::NAN) / x0[k] - 1.0;
        if change.is_finite() && change.abs() > 1e-12 {
            into.entry(knob.field.clone()).or_default().push(change);
        }
    }
}

/// Every search of `opts.methods` against one target from `start` (each with the
/// whole budget, each counted in `rep.by_method`); the lowest-scoring candidate any
/// found, and the fewest candidates a search needed to evade (`usize::MAX`: none).
#[allow(clippy::too_many_arguments)]
fn best_of(
    opts: &AttackOptions,
    knobs: &[Knob],
    x0: &[f64],
    thr: f64,
    start: &dyn Fn() -> search::Found,
    seed: u64,
    scored: &mut search::Evaluate<'_>,
    rep: &mut TargetReport,
) -> Result<(search::Found, usize), TrainError> {
    let (mut found, mut used) = (start(), usize::MAX);
    for &m in &opts.methods {
        let s = search::Search { knobs, free: search::free_knobs(knobs, x0), thr, budget: opts.queries, batch: opts.batch, evaluate: &mut *scored, best: start() };
        let got = s.run(m, seed ^ m as u64)?;
        rep.by_method.entry(m.name().to_string()).or_default().add(true, got.score >= thr);
        if got.score < thr {
            used = used.min(got.used);
        }
        if got.score < found.score {
            found = got;
        }
    }
    Ok((found, used))
}

/// `event` with every identity-role field set to the first value `twin` learned
/// for it (threat T2: the attacker copies the device's MAC and address); fields
/// the twin has not bound are left as they were.
fn with_cloned_identity(schema: &EventSchema, event: &Map<String, Value>, twin: Option<&twinguard_operators::Twin>) -> Map<String, Value> {
    let mut e = event.clone();
    let identity: BTreeSet<&str> = schema.fields.iter().filter(|f| f.role == twinguard_schemas::Role::Identity).map(|f| f.name.as_str()).collect();
    for b in twin.map_or(&[][..], |t| &t.bindings[..]) {
        if let (true, Some(v)) = (identity.contains(b.field.as_str()), b.values.first()) {
            e.insert(b.field.to_string(), Value::from(v.as_str()));
        }
    }
    e
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
            t.device_id = id.as_str().into();
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
    let mut s = format!("attack on model {} ({}), {} queries per event and search at most\nthreat: {}{}\n", r.model_version, r.dataset, r.queries, r.threat, if r.feed_back { format!(" + T3: {} evasions fed back to the twins", r.fed_back) } else { String::new() });
    s.push_str(&format!("{:<10} {:<10} {:>7} {:>9} {:>10} {:>9}\n", "target", "family", "events", "clean DR", "robust DR", "queries"));
    for (t, rep) in &r.targets {
        let row = |fam: &str, f: &Figures, q: String| format!("{t:<10} {fam:<10} {:>7} {:>9.3} {:>10.3} {q:>9}\n", f.events, f.clean_dr, f.robust_dr);
        s.push_str(&row("all", &rep.overall, format!("{:.0}", rep.median_queries)));
        for (fam, f) in &rep.by_family {
            s.push_str(&row(fam, f, String::new()));
        }
        for (m, f) in &rep.by_method {
            s.push_str(&row(&format!("[{m}]"), f, String::new()));
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
    if opts.feed_back {
        // T3: runs of consecutive attack events, as the stream meets them.
        rows.sort_by_key(|&k| scores.offsets[k]);
    } else {
        rows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(opts.seed));
    }
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
        Knob { field: field.into(), min_factor: lo, max_factor: hi, min: None, max: None, follows: None, divided_by: None, adds: None }
    }

    /// The lab dataset, a small model on it, and its job.
    pub(crate) fn lab(dir: &Path) -> (Artifact, TrainJob) {
        let lab = crate::testkit::write_lab_dataset(dir, 2400, 1_760_000_000_000).unwrap();
        let job = crate::testkit::lab_job(&lab, 10, dir.join("model"));
        (run_train(&job, &mut |_| {}).unwrap().0, job)
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
        let constraints = |knobs: Vec<Knob>| Constraints { threat: "test".into(), family: BTreeMap::from([("default".into(), FamilyKnobs { knobs })]), ordered: vec![], clone_identity: false };
        let opts = |c: Constraints| AttackOptions { constraints: c, events: 80, queries: 60, methods: Method::ALL.to_vec(), feed_back: false, batch: 12, targets: vec!["ensemble".into(), "rf".into()], seed: 1 };

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

    /// T2 and T3 on a lab capture with spoofed flows (normal volumes from the
    /// attacker's own MAC) and the twin's identity drift among the features:
    /// shaping alone cannot hide a spoofed flow, cloning the MAC the device's twin
    /// learned hides it; T3 attacks in stream order and feeds every evasion back
    /// to the twin as sent.
    #[test]
    fn cloning_the_learned_identity_defeats_identity_drift_and_evasions_feed_back() {
        let dir = std::env::temp_dir().join(format!("twinguard-attack-t2-{}", std::process::id()));
        let lab = crate::testkit::write_lab_dataset(&dir, 2400, 1_760_000_000_000).unwrap();
        let csv = std::fs::read_to_string(&lab.csv).unwrap();
        let mut out = String::new();
        for (k, line) in csv.lines().enumerate() {
            let f: Vec<&str> = line.split(',').collect();
            // The "floods" become spoofed flows: normal volumes, the attacker's MAC
            // (WUSTL's spoofing: the MAC is the signal); every other row carries its
            // device's own MAC.
            match (k, f[5]) {
                (0, _) => out.push_str(&format!("{line},mac\n")),
                (_, "flood") => out.push_str(&format!("{},{},27.00,11000.0,1.0000,flood,ee:ee:ee:ee:ee:ee\n", f[0], f[1])),
                _ => out.push_str(&format!("{line},mac-of-{}\n", f[0])),
            }
        }
        std::fs::write(&lab.csv, out).unwrap();
        let schema = crate::testkit::LAB_SCHEMA.replace("[[fields]]\nname = \"label\"", "[[fields]]\nname = \"mac\"\ntype = \"string\"\nrole = \"identity\"\nsource_column = \"mac\"\n\n[[fields]]\nname = \"label\"");
        assert!(schema.contains("role = \"identity\""), "the MAC field is declared");
        std::fs::write(&lab.schema, schema).unwrap();
        std::fs::write(&lab.features, crate::testkit::LAB_FEATURES.replace("  t.behaviour_distance AS behaviour_distance", "  t.behaviour_distance AS behaviour_distance,\n  t.drift_count AS identity_drift")).unwrap();
        let mut job = crate::testkit::lab_job(&lab, 10, dir.join("model"));
        // In the file's time order: each device's warm-up (where the twin learns
        // its MACs) holds no flood, so the attacker's MAC is drift.
        job.dataset.shuffle_seed = None;
        let artifact = run_train(&job, &mut |_| {}).unwrap().0;
        let shrink = vec![knob("pkts", 0.02, 1.0), knob("bytes", 0.02, 1.0), knob("dur", 1.0, 1.5)];
        let constraints = |clone_identity| Constraints { threat: "test".into(), family: BTreeMap::from([("default".into(), FamilyKnobs { knobs: shrink.clone() })]), ordered: vec![], clone_identity };
        let opts = |c: Constraints, feed_back| AttackOptions { constraints: c, events: 60, queries: 40, methods: vec![Method::Random], feed_back, batch: 10, targets: vec!["ensemble".into(), "twin".into()], seed: 2 };
        let t1 = run_attack(&artifact, &opts(constraints(false), false), &dir.join("t1"), &mut |_| {}).unwrap();
        let t2 = run_attack(&artifact, &opts(constraints(true), false), &dir.join("t2"), &mut |_| {}).unwrap();
        for t in ["ensemble", "twin"] {
            eprintln!("{t}: T1 {:?}\nT2 {:?}", t1.targets[t].overall, t2.targets[t].overall);
        }
        let (a, b) = (&t1.targets["ensemble"].overall, &t2.targets["ensemble"].overall);
        assert_eq!(a.clean_detected, b.clean_detected, "the clean events are the same");
        assert!(a.clean_dr > 0.9 && b.robust_dr < a.robust_dr - 0.2, "T2 {} vs T1 {}", b.robust_dr, a.robust_dr);
        assert!(t2.clone_identity && t2.candidates_refused == 0);
        let t3 = run_attack(&artifact, &opts(constraints(true), true), &dir.join("t3"), &mut |_| {}).unwrap();
        let c = &t3.targets["ensemble"].overall;
        assert!(t3.feed_back && t3.fed_back > 0 && t3.fed_back == c.clean_detected - c.robust_detected, "{} fed back, {c:?}", t3.fed_back);
        let _ = std::fs::remove_dir_all(dir);
    }
}
