//! `twinguard train --adversarial FILE`: adversarial training. After the usual fit,
//! each round attacks a seeded sample of the training split's attack rows against
//! the current model (`attack::attack_rows`, the constraint file's threat model),
//! adds the best adversarial version of each, labelled with its class, to the
//! training rows (each as a device of its own, so no LSTM sequence is spliced),
//! and refits. Validation and test rows are never attacked or added: the threshold
//! is calibrated on clean validation rows and the test figures stay clean.

use std::collections::BTreeMap;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use twinguard_models::federated::plan::{FederationPlan, FederationReport};
use twinguard_models::federated::simulate::{fit_federated, fit_federated_with, site_rows};
use twinguard_models::train::{fit, Dataset, Progress, Split};
use twinguard_models::{Artifact, ModelError};

use crate::attack::{attack_rows, AttackOptions};
use crate::job::{new_artifact, train_records_with, write_outputs};
use crate::{sha256_file, Report, TrainError, TrainJob};

/// How hard to train against the attack.
#[derive(Debug, Clone)]
pub struct AdversarialOptions {
    /// The attack (its constraints, query budget, batch, seed); its first target is
    /// the one attacked.
    pub attack: AttackOptions,
    pub rounds: usize,
}

/// One round, for the model card.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    pub round: usize,
    pub attacked: usize,
    /// Attacked rows the current model detected clean and missed after the attack.
    pub evaded: usize,
    pub rows_added: usize,
    pub seconds: f64,
}

/// Train as `twinguard train` does, with `opts.rounds` rounds of adversarial
/// training; writes the same outputs, the rounds in the card's hyper-parameters.
pub fn run_adversarial_train(job: &TrainJob, opts: &AdversarialOptions, log: &mut dyn FnMut(Progress<'_>)) -> Result<(Artifact, Report), TrainError> {
    let started = Instant::now();
    let records = job.dataset.load(&job.schema)?;
    let sha = sha256_file(&job.dataset.file)?;
    let mut rounds: Vec<Round> = Vec::new();
    let mut fitter = |ds: &Dataset<'_>, split: &Split, log: &mut dyn FnMut(Progress<'_>)| {
        let (first, mut screen) = fit(ds, split, job.twin.anomaly_threshold, &job.opts, log)?;
        let pools = vec![split.train.clone()];
        let mut refit = |grown: &Dataset<'_>, extra: &[Vec<usize>], log: &mut dyn FnMut(Progress<'_>)| {
            let train: Vec<usize> = split.train.iter().chain(&extra[0]).copied().collect();
            let (e, sc) = fit(grown, &Split { train, validation: split.validation.clone(), test: split.test.clone() }, job.twin.anomaly_threshold, &job.opts, log)?;
            screen = sc;
            Ok(e)
        };
        let (ensemble, r) = adversarial_rounds(job, opts, &records, ds, &pools, first, &mut refit, log)?;
        rounds = r;
        Ok((ensemble, screen))
    };
    let (mut artifact, report) = train_records_with(job, &records, &sha, started, &mut fitter, "", log)?;
    record_rounds(&mut artifact, opts, &rounds);
    artifact.save(&job.out)?;
    write_outputs(&job.out, &artifact, &report)?;
    Ok((artifact, report))
}

/// `federate simulate --adversarial`: federated adversarial training. After each
/// federated fit, every site attacks its own training attack rows against the
/// global model and trains on the adversarial versions from then on; rows never
/// leave their site (in the simulation: they join that site's rows only).
pub fn run_federate_adversarial(
    job: &TrainJob,
    plan: &FederationPlan,
    opts: &AdversarialOptions,
    log: &mut dyn FnMut(Progress<'_>),
) -> Result<(Artifact, Report, FederationReport), TrainError> {
    let started = Instant::now();
    let records = job.dataset.load(&job.schema)?;
    let sha = sha256_file(&job.dataset.file)?;
    let mut rounds: Vec<Round> = Vec::new();
    let mut fed: Option<FederationReport> = None;
    let mut fitter = |ds: &Dataset<'_>, split: &Split, log: &mut dyn FnMut(Progress<'_>)| {
        let (first, rep) = fit_federated(ds, split, job.twin.anomaly_threshold, &job.opts, plan, log)?;
        fed = Some(rep);
        let pools: Vec<Vec<usize>> = (0..plan.sites).map(|k| site_rows(split, ds.classes, plan, k).map(|(train, _)| train)).collect::<Result<_, _>>()?;
        let mut refit = |grown: &Dataset<'_>, extra: &[Vec<usize>], log: &mut dyn FnMut(Progress<'_>)| {
            let (e, rep) = fit_federated_with(grown, split, job.twin.anomaly_threshold, &job.opts, plan, extra, log)?;
            fed = Some(rep);
            Ok(e)
        };
        let (ensemble, r) = adversarial_rounds(job, opts, &records, ds, &pools, first, &mut refit, log)?;
        rounds = r;
        Ok((ensemble, None))
    };
    let (mut artifact, report) = train_records_with(job, &records, &sha, started, &mut fitter, "fed-", log)?;
    let fed = fed.expect("the fitter ran");
    record_rounds(&mut artifact, opts, &rounds);
    crate::federate::write_federation(job, &mut artifact, &fed)?;
    write_outputs(&job.out, &artifact, &report)?;
    Ok((artifact, report, fed))
}

/// A dataset growing with adversarial rows: the attack pools (training attack
/// rows, one pool per site, or one for central training) and the rows added to
/// each so far. A `federate site` over Kafka keeps one between its runs.
pub struct Adversary<'a> {
    job: &'a TrainJob,
    opts: &'a AdversarialOptions,
    records: &'a [(String, Vec<u8>)],
    record_of: Vec<usize>,
    names: &'a [String],
    cols: usize,
    values: Vec<f64>,
    classes: Vec<String>,
    devices: Vec<String>,
    pools: Vec<Vec<usize>>,
    /// Per pool, the rows added (indices into the grown dataset).
    pub extra: Vec<Vec<usize>>,
    pub rounds: Vec<Round>,
}

impl<'a> Adversary<'a> {
    /// Over `ds` (the prepared `records`), attacking the attack rows of `pools`.
    pub fn new(job: &'a TrainJob, opts: &'a AdversarialOptions, records: &'a [(String, Vec<u8>)], ds: &Dataset<'a>, pools: &[Vec<usize>]) -> Result<Adversary<'a>, TrainError> {
        let record_of = decoded_records(&job.schema, records)?;
        if ds.rows() != record_of.len() {
            return Err(TrainError::Model(ModelError::Train(format!("{} prepared rows but {} decoded records", ds.rows(), record_of.len()))));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(opts.attack.seed);
        let pools: Vec<Vec<usize>> = pools
            .iter()
            .map(|p| {
                let mut p: Vec<usize> = p.iter().copied().filter(|&k| ds.classes[k] != twinguard_models::labels::NORMAL).collect();
                p.shuffle(&mut rng);
                p
            })
            .collect();
        let extra = vec![Vec::new(); pools.len()];
        Ok(Adversary { job, opts, records, record_of, names: ds.names, cols: ds.cols, values: ds.values.to_vec(), classes: ds.classes.to_vec(), devices: ds.devices.to_vec(), pools, extra, rounds: Vec::new() })
    }

    /// The dataset with every adversarial row added so far.
    pub fn dataset(&self) -> Dataset<'_> {
        Dataset { names: self.names, cols: self.cols, values: &self.values, classes: &self.classes, devices: &self.devices }
    }

    /// One round against `ensemble`: up to `opts.attack.events` attack rows (spread
    /// evenly over the pools, a fresh sample each round) attacked, the best
    /// adversarial version of each added to its pool's rows.
    pub fn round(&mut self, ensemble: &twinguard_models::Ensemble, log: &mut dyn FnMut(Progress<'_>)) -> Result<Round, TrainError> {
        let t0 = Instant::now();
        let round = self.rounds.len() + 1;
        let artifact = new_artifact(&self.job.schema, &self.job.feature_sql, &self.job.twin, self.names, ensemble.clone(), placeholder_card(self.job), "adv-");
        let per_pool = self.opts.attack.events.div_ceil(self.pools.len().max(1));
        let (mut attacked_n, mut evaded, mut added) = (0, 0, 0);
        for (g, pool) in self.pools.iter().enumerate() {
            // A fresh sample each round (the pool cycles when it runs out).
            let take = per_pool.min(pool.len());
            let start = ((round - 1) * take) % pool.len().max(1);
            let attacked: BTreeMap<usize, String> = (0..take).map(|j| pool[(start + j) % pool.len()]).map(|k| (self.record_of[k], self.classes[k].clone())).collect();
            let (_, adv) = attack_rows(&self.job.schema, &self.job.twin, &artifact, self.records, &attacked, "training rows", &self.opts.attack, &mut |d, n| {
                log(Progress::Status(&format!("  adversarial round {round}, group {g}: attacking {d}/{n} training rows   ")))
            })?;
            attacked_n += attacked.len();
            evaded += adv.iter().filter(|a| a.evaded).count();
            for (j, a) in adv.iter().enumerate() {
                self.extra[g].push(self.classes.len());
                self.values.extend_from_slice(&a.row);
                self.classes.push(a.class.clone());
                self.devices.push(format!("adversarial-{round}-{g}-{j}"));
                added += 1;
            }
        }
        log(Progress::StatusEnd);
        let r = Round { round, attacked: attacked_n, evaded, rows_added: added, seconds: t0.elapsed().as_secs_f64() };
        log(Progress::Step(&format!("adversarial round {round}: {} of {} attacked training rows evaded the model; {} adversarial rows added", r.evaded, r.attacked, r.rows_added)));
        self.rounds.push(r.clone());
        Ok(r)
    }
}

/// The rounds: each grows the dataset against the current model and refits with
/// `refit` (given the grown dataset and the rows added per pool so far).
#[allow(clippy::too_many_arguments)]
fn adversarial_rounds(
    job: &TrainJob,
    opts: &AdversarialOptions,
    records: &[(String, Vec<u8>)],
    ds: &Dataset<'_>,
    pools: &[Vec<usize>],
    mut ensemble: twinguard_models::Ensemble,
    refit: &mut dyn FnMut(&Dataset<'_>, &[Vec<usize>], &mut dyn FnMut(Progress<'_>)) -> Result<twinguard_models::Ensemble, ModelError>,
    log: &mut dyn FnMut(Progress<'_>),
) -> Result<(twinguard_models::Ensemble, Vec<Round>), ModelError> {
    let mut adv = Adversary::new(job, opts, records, ds, pools).map_err(|e| ModelError::Train(e.to_string()))?;
    for _ in 0..opts.rounds {
        adv.round(&ensemble, log).map_err(|e| ModelError::Train(e.to_string()))?;
        ensemble = refit(&adv.dataset(), &adv.extra, log)?;
    }
    Ok((ensemble, adv.rounds))
}

/// The rounds in the card's hyper-parameters (what the model was hardened against).
fn record_rounds(artifact: &mut Artifact, opts: &AdversarialOptions, rounds: &[Round]) {
    artifact.card.hyper_parameters["adversarial"] = serde_json::json!({
        "threat": opts.attack.constraints.threat,
        "constraints": opts.attack.constraints,
        "queries": opts.attack.queries,
        "events_per_round": opts.attack.events,
        "rounds": rounds,
    });
}

/// Indices of the records the schema's decoder accepts, in order.
fn decoded_records(schema: &twinguard_schemas::EventSchema, records: &[(String, Vec<u8>)]) -> Result<Vec<usize>, TrainError> {
    use arrow::array::{Array, Int64Array};
    let mut out = Vec::with_capacity(records.len());
    crate::features::for_each_batch(
        schema,
        records,
        |batch| {
            let offsets = batch.column_by_name(twinguard_schemas::fields::SRC_OFFSET).and_then(|c| c.as_any().downcast_ref::<Int64Array>()).expect("decoded batches carry their offsets");
            out.extend(offsets.iter().flatten().map(|o| o as usize));
            Ok(())
        },
        &mut |_, _| {},
    )?;
    Ok(out)
}

/// The card of a round's interim model (it only scores the attack's candidates).
fn placeholder_card(job: &TrainJob) -> twinguard_models::ModelCard {
    twinguard_models::ModelCard {
        dataset: job.dataset.file.display().to_string(),
        dataset_sha256: String::new(),
        rows: 0,
        split: job.split.describe(),
        train_rows: 0,
        validation_rows: 0,
        test_rows: 0,
        hyper_parameters: serde_json::Value::Null,
        target_fpr: job.opts.target_fpr,
        threshold: 0.0,
        test_metrics: serde_json::Value::Null,
        poisoning_screen: None,
        created_utc: String::new(),
        training_seconds: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::tests::{knob, lab};
    use crate::attack::{run_attack, Constraints, FamilyKnobs};

    /// The lab's threat: a flood may shrink to a tenth of its packets and bytes;
    /// measured with all three searches (training uses the random one, as the CLI).
    fn shrunk_floods() -> AttackOptions {
        let constraints = Constraints {
            threat: "test".into(),
            family: BTreeMap::from([("default".into(), FamilyKnobs { knobs: vec![knob("pkts", 0.1, 1.0), knob("bytes", 0.1, 1.0)] })]),
            ordered: vec![],
            clone_identity: false,
        };
        AttackOptions { constraints, events: 150, queries: 60, methods: crate::attack::Method::ALL.to_vec(), feed_back: false, batch: 12, targets: vec!["ensemble".into()], seed: 5 }
    }

    /// A flood may shrink to a tenth of its packets and bytes: still far from
    /// normal traffic, but where the plain model never saw an attack. Adversarial
    /// training makes the model detect most of what evaded it, on test rows it
    /// never trained on, and keeps its clean detection.
    #[test]
    fn adversarial_training_recovers_the_attacked_detection_at_its_clean_fpr() {
        let dir = std::env::temp_dir().join(format!("twinguard-advtrain-{}", std::process::id()));
        let (plain, mut job) = lab(&dir.join("plain"));
        let attack = shrunk_floods();
        let before = run_attack(&plain, &attack, &dir.join("a0"), &mut |_| {}).unwrap().targets["ensemble"].overall.clone();
        job.out = dir.join("hardened");
        let (hardened, report) = run_adversarial_train(&job, &AdversarialOptions { attack: AttackOptions { events: 400, methods: vec![crate::attack::Method::Random], ..attack.clone() }, rounds: 3 }, &mut |_| {}).unwrap();
        let after = run_attack(&hardened, &attack, &dir.join("a1"), &mut |_| {}).unwrap().targets["ensemble"].overall.clone();
        eprintln!("before {before:?}\nafter {after:?}");
        let lost = before.clean_dr - before.robust_dr;
        assert!(lost > 0.15, "the attack must work on the plain model: {before:?}");
        assert!(after.robust_dr - before.robust_dr >= lost / 2.0, "adversarial training must win back at least half of what the attack took: {before:?} -> {after:?}");
        let clean = &report.models["ensemble"].at_threshold;
        assert!(clean.detection_rate > 0.9 && clean.fpr < 0.05, "clean detection and FPR (target 0.02) kept: {clean:?}");
        let round = &hardened.card.hyper_parameters["adversarial"]["rounds"][0];
        assert!(round["rows_added"].as_u64() > Some(0) && round["rows_added"] == round["attacked"], "{round}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// In a simulated federation every site attacks its own rows against the
    /// global model; the hardened federated model wins back detection too.
    #[test]
    fn federated_adversarial_training_hardens_the_global_model() {
        use twinguard_models::federated::plan::Sites;
        let dir = std::env::temp_dir().join(format!("twinguard-fedadv-{}", std::process::id()));
        let lab = crate::testkit::write_lab_dataset(&dir, 2400, 1_760_000_000_000).unwrap();
        let mut job = crate::testkit::lab_job(&lab, 12, dir.join("plain"));
        let plan = FederationPlan { lstm_rounds: 1, lstm_local_epochs: 1, ..FederationPlan::clean(3, Sites::Dirichlet { alpha: 10.0 }, 3) };
        let (plain, _, _) = crate::run_federate(&job, &plan, &mut |_| {}).unwrap();
        let attack = shrunk_floods();
        let before = run_attack(&plain, &attack, &dir.join("a0"), &mut |_| {}).unwrap().targets["ensemble"].overall.clone();
        job.out = dir.join("hardened");
        let (hardened, _, fed) = run_federate_adversarial(&job, &plan, &AdversarialOptions { attack: AttackOptions { events: 400, methods: vec![crate::attack::Method::Random], ..attack.clone() }, rounds: 2 }, &mut |_| {}).unwrap();
        let after = run_attack(&hardened, &attack, &dir.join("a1"), &mut |_| {}).unwrap().targets["ensemble"].overall.clone();
        eprintln!("federated: before {before:?}\nafter {after:?}");
        assert_eq!(fed.sites.len(), 3);
        assert!(hardened.version.starts_with("fed-"));
        let rounds = hardened.card.hyper_parameters["adversarial"]["rounds"].as_array().unwrap().clone();
        assert_eq!(rounds.len(), 2);
        assert!(rounds.iter().all(|r| r["rows_added"].as_u64() > Some(0)));
        let lost = before.clean_dr - before.robust_dr;
        assert!(lost > 0.15, "the attack must work on the plain federated model: {before:?}");
        assert!(after.robust_dr - before.robust_dr >= lost / 2.0, "federated adversarial training must win back at least half: {before:?} -> {after:?}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
