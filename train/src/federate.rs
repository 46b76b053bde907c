//! `twinguard federate simulate`: a federation of sites over one dataset's rows in
//! one process, evaluated on the held-out test rows through the detector exactly
//! as `twinguard train` evaluates a central model.

use std::time::Instant;

use twinguard_models::federated::local::{local_only, LocalResult};
use twinguard_models::federated::simulate::{fit_federated, test_sites, FederationPlan, FederationReport, SiteTest};
use twinguard_models::train::Progress;
use twinguard_models::Artifact;

use crate::dataset::sha256_file;
use crate::job::{train_records_with, TrainJob};
use crate::report::Report;
use crate::TrainError;

/// Train the ensemble as a simulated federation and evaluate it; writes the model,
/// its card, the report and plots into `job.out`, and `federation.json` (every
/// site's share, the decision on each of its updates, bytes sent).
pub fn run_federate(job: &TrainJob, plan: &FederationPlan, log: &mut dyn FnMut(Progress<'_>)) -> Result<(Artifact, Report, FederationReport), TrainError> {
    let started = Instant::now();
    let records = job.dataset.load(&job.schema)?;
    log(Progress::Step(&format!("{}: {} rows as `{}` events", job.dataset.file.display(), records.len(), job.schema.id())));
    let sha = sha256_file(&job.dataset.file)?;
    let mut fed: Option<FederationReport> = None;
    let mut shares = None;
    let mut fitter = |ds: &twinguard_models::train::Dataset<'_>, split: &twinguard_models::train::Split, log: &mut dyn FnMut(Progress<'_>)| {
        let (ens, rep) = fit_federated(ds, split, job.twin.anomaly_threshold, &job.opts, plan, log)?;
        fed = Some(rep);
        shares = test_sites(split, ds.classes, plan)?;
        Ok((ens, None))
    };
    let (mut artifact, report) = train_records_with(job, &records, &sha, started, &mut fitter, "fed-", log)?;
    let mut fed = fed.expect("the fitter ran");
    if let Some(shares) = shares {
        fed.site_tests = site_tests(&artifact, &report, &shares, &fed);
    }
    write_federation(job, &mut artifact, &fed)?;
    Ok((artifact, report, fed))
}

/// Each site's share of the test rows (positions in the report's test order) at
/// the federation's threshold and at the one the site scores at
/// ([`twinguard_models::Ensemble::use_site_threshold`]).
fn site_tests(artifact: &Artifact, report: &Report, shares: &[Vec<usize>], fed: &FederationReport) -> Vec<SiteTest> {
    let ensemble = &report.models["ensemble"].scores;
    let federation = artifact.ensemble.threshold;
    let sites = artifact.ensemble.combination.as_ref().map(|c| &c.site_thresholds);
    shares
        .iter()
        .enumerate()
        .map(|(i, rows)| {
            let (scores, truth): (Vec<f64>, Vec<bool>) = rows.iter().map(|&k| (ensemble[k], report.test_truth[k])).unzip();
            let at = |t: f64| {
                let b = twinguard_models::metrics::binary(&scores, &truth, t);
                (b.detection_rate, b.fpr)
            };
            let name = format!("site-{i}");
            let own = sites.and_then(|s| s.get(&name)).and_then(|s| s.threshold);
            let attacks = truth.iter().filter(|&&y| y).count();
            let poisoned = fed.sites.get(i).is_some_and(|s| s.poisoned);
            SiteTest { site: name, poisoned, normals: rows.len() - attacks, attacks, own: own.is_some(), federation: at(federation), site_threshold: at(own.unwrap_or(federation)) }
        })
        .collect()
}

/// The plan and the decisions travel with the model (its provenance): into the
/// card, the saved model and `federation.json`.
pub(crate) fn write_federation(job: &TrainJob, artifact: &mut Artifact, fed: &FederationReport) -> Result<(), TrainError> {
    if let serde_json::Value::Object(m) = &mut artifact.card.hyper_parameters {
        m.insert("federation".into(), serde_json::to_value(fed).expect("serialises"));
    }
    artifact.save(&job.out)?;
    let path = job.out.join("federation.json");
    std::fs::write(&path, serde_json::to_vec_pretty(fed).expect("serialises")).map_err(|e| TrainError::Io { path: path.clone(), reason: e.to_string() })
}

/// The artifact an aggregator publishes: the federated ensemble with the
/// federation's report as provenance (plan, every decision, bytes). The card holds
/// no dataset: the rows stayed at the sites, so `dataset_sha256` is the plan's hash
/// and there are no test metrics (each site evaluates on its own held-out rows).
pub fn federation_artifact(
    schema: &twinguard_schemas::EventSchema,
    feature_sql: &str,
    twin: &twinguard_operators::TwinConfig,
    ensemble: twinguard_models::Ensemble,
    opts: &twinguard_models::train::TrainOptions,
    fed: &FederationReport,
    federation: &str,
    plan_hash: &str,
) -> Artifact {
    let sum = |f: &dyn Fn(&twinguard_models::federated::plan::SiteSummary) -> usize| fed.sites.iter().map(f).sum::<usize>();
    let card = twinguard_models::ModelCard {
        dataset: format!("federation `{federation}`: {} sites' own rows (none left their site)", fed.sites.len()),
        dataset_sha256: plan_hash.to_string(),
        rows: sum(&|s| s.train_rows + s.validation_rows),
        split: "each site's own".into(),
        train_rows: sum(&|s| s.train_rows),
        validation_rows: sum(&|s| s.validation_rows),
        test_rows: 0,
        hyper_parameters: serde_json::json!({ "train": opts, "federation": fed }),
        target_fpr: opts.target_fpr,
        threshold: 0.0,
        test_metrics: serde_json::Value::Null,
        poisoning_screen: None,
        created_utc: chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        training_seconds: fed.seconds,
    };
    crate::job::new_artifact(schema, feature_sql, twin, &fed.features, ensemble, card, "fed-")
}

/// Every site of `plan` alone ([`local_only`]); writes `local.json` into `job.out`.
pub fn run_local_only(job: &TrainJob, plan: &FederationPlan, log: &mut dyn FnMut(Progress<'_>)) -> Result<Vec<LocalResult>, TrainError> {
    let records = job.dataset.load(&job.schema)?;
    let prep = crate::features::prepare(&job.schema, &job.twin, &job.feature_sql, &records, &mut |d, n| log(Progress::Status(&format!("  features: {d}/{n} events   "))))?;
    log(Progress::StatusEnd);
    let split = job.split.apply(&prep.classes);
    let results = local_only(&prep.dataset(), &split, job.twin.anomaly_threshold, &job.opts, plan, log)?;
    std::fs::create_dir_all(&job.out).map_err(|e| TrainError::Io { path: job.out.clone(), reason: e.to_string() })?;
    let path = job.out.join("local.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&results).expect("serialises")).map_err(|e| TrainError::Io { path: path.clone(), reason: e.to_string() })?;
    Ok(results)
}

/// The local-only arm as a table.
pub fn render_local(results: &[LocalResult]) -> String {
    let mut out = String::from("site  train  val-normal      DR     FPR  ROC-AUC  DR@1.5%\n");
    for r in results {
        match (&r.error, r.detection_rate, r.fpr, r.roc_auc, r.dr_at_1_5) {
            (None, Some(dr), Some(fpr), Some(auc), Some(d15)) => {
                out.push_str(&format!("{:>4} {:>6} {:>11}  {dr:.4}  {:>5.2} %  {auc:.4}   {d15:.4}\n", r.site, r.train_rows, r.validation_normal, 100.0 * fpr))
            }
            (e, ..) => out.push_str(&format!("{:>4} {:>6} {:>11}  cannot stand alone: {}\n", r.site, r.train_rows, r.validation_normal, e.as_deref().unwrap_or("?"))),
        }
    }
    out
}

/// A short text summary of the federation: per member, which sites were kept.
pub fn render_federation(f: &FederationReport) -> String {
    let mut out = format!(
        "federation: {} sites, {} poisoned ({}), rule {}, f = {}, {:.1} s\n",
        f.plan.sites,
        f.plan.poisoned,
        f.plan.poison.name(),
        f.plan.rule.name(),
        f.tolerated,
        f.seconds
    );
    if let Some(c) = &f.targeted_class {
        out.push_str(&format!("targeted class (relabelled normal at the poisoned sites): {c}\n"));
    }
    out.push_str("site  train  valid  normal  poisoned  KiB sent\n");
    for s in &f.sites {
        let kib = s.bytes.values().sum::<usize>() as f64 / 1024.0;
        out.push_str(&format!("{:>4} {:>6} {:>6} {:>7}  {:>8}  {:>8.1}\n", s.site, s.train_rows, s.validation_rows, s.validation_normal, if s.poisoned { "yes" } else { "no" }, kib));
    }
    for (m, ds) in &f.decisions {
        let kept: Vec<String> = ds.iter().filter(|d| d.accepted).map(|d| d.site.to_string()).collect();
        let out_: Vec<String> = ds.iter().filter(|d| !d.accepted).map(|d| d.site.to_string()).collect();
        out.push_str(&format!("{m:<10} kept [{}] excluded [{}]\n", kept.join(" "), out_.join(" ")));
    }
    if let Some(p) = &f.privacy {
        for (m, a) in &p.members {
            if a.releases == 0 {
                out.push_str(&format!("privacy {m:<9} ε = 0 ({})\n", a.mechanism));
            } else {
                out.push_str(&format!("privacy {m:<9} {}-level ε = {:.2} at δ = {:e} ({} release(s); {})\n", a.unit, a.epsilon, a.delta, a.releases, a.mechanism));
            }
        }
        out.push_str(&format!("published without DP: {}\n", p.not_private.keys().cloned().collect::<Vec<_>>().join(", ")));
    }
    if !f.site_tests.is_empty() {
        out.push_str(&render_site_tests(&f.site_tests));
    }
    let (honest_out, poisoned_in) = f.exclusions();
    out.push_str(&format!("honest sites excluded by some member: {honest_out}; poisoned sites accepted by some member: {poisoned_in}\n"));
    out
}

/// Each site's test rows at the federation's threshold and at its own, and the
/// honest sites taken together (each of its rows at its own site's threshold).
fn render_site_tests(tests: &[SiteTest]) -> String {
    let mut out = String::from("site test rows  normal  attack  threshold  federation DR (FPR)   site's DR (FPR)\n");
    let pct = |(dr, fpr): (f64, f64)| format!("{dr:.4} ({:.2} %)", 100.0 * fpr);
    for t in tests {
        let which = if t.own { "own" } else { "federation" };
        let mark = if t.poisoned { " poisoned" } else { "" };
        out.push_str(&format!("{:>7}{mark:<9} {:>7} {:>7}  {which:<10} {:>18}  {:>16}\n", t.site, t.normals, t.attacks, pct(t.federation), pct(t.site_threshold)));
    }
    let honest: Vec<&SiteTest> = tests.iter().filter(|t| !t.poisoned).collect();
    let pooled = |get: &dyn Fn(&SiteTest) -> (f64, f64)| {
        let (n, a) = (honest.iter().map(|t| t.normals).sum::<usize>().max(1) as f64, honest.iter().map(|t| t.attacks).sum::<usize>().max(1) as f64);
        let dr = honest.iter().map(|t| get(t).0 * t.attacks as f64).sum::<f64>() / a;
        let fpr = honest.iter().map(|t| get(t).1 * t.normals as f64).sum::<f64>() / n;
        (dr, fpr)
    };
    out.push_str(&format!("honest sites' test rows: federation's threshold {}, each site's {}\n", pct(pooled(&|t| t.federation)), pct(pooled(&|t| t.site_threshold))));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinguard_models::federated::simulate::Sites;

    /// The smoke federation: the hand-written lab dataset (files only, device ids
    /// and times from columns) over 4 sites in periods, one of them inverting its
    /// labels; the federated model is evaluated through the detector, carries its
    /// provenance, holds no site's scores, and `eval` reproduces its figures from
    /// the model directory alone.
    #[test]
    fn a_smoke_federation_trains_evaluates_and_records_its_decisions() {
        let dir = std::env::temp_dir().join(format!("twinguard-federate-{}", std::process::id()));
        let lab = crate::testkit::write_lab_dataset(&dir, 4000, 1_760_000_000_000).unwrap();
        let job = crate::testkit::lab_job(&lab, 20, dir.join("model"));
        let plan = FederationPlan { poisoned: 1, lstm_rounds: 2, lstm_local_epochs: 1, ..FederationPlan::clean(5, Sites::Dirichlet { alpha: 10.0 }, 3) };
        let (artifact, report, fed) = run_federate(&job, &plan, &mut |_| {}).unwrap();
        assert!(artifact.version.starts_with("fed-lab-flows-v1-"), "{}", artifact.version);
        let e = &report.models["ensemble"].at_threshold;
        assert!(e.detection_rate > 0.9 && e.fpr < 0.06, "federated ensemble on the test rows: {e:?}");
        assert!(artifact.ensemble.validation_normal.is_empty() && artifact.ensemble.calibration.is_some());
        assert!(artifact.card.hyper_parameters["federation"]["decisions"]["rf"].is_array(), "provenance in the card");
        for m in ["rf", "gbdt", "stacker", "threshold"] {
            assert!(!fed.decisions[m][4].accepted, "{m}: the inverting site is excluded: {:?}", fed.decisions[m][4]);
        }
        let on_disk: FederationReport = serde_json::from_slice(&std::fs::read(dir.join("model/federation.json")).unwrap()).unwrap();
        assert_eq!(on_disk.sites.len(), 5);
        // Each site's share of the test rows at the federation's threshold and at its own.
        assert_eq!(on_disk.site_tests.len(), 5);
        assert_eq!(on_disk.site_tests.iter().map(|t| t.normals + t.attacks).sum::<usize>(), report.rows["test"]);
        let own = &artifact.ensemble.combination.as_ref().unwrap().site_thresholds;
        assert_eq!(own.keys().cloned().collect::<Vec<_>>(), (0..5).map(|i| format!("site-{i}")).collect::<Vec<_>>());
        assert!(on_disk.site_tests.iter().all(|t| t.own == own[&t.site].threshold.is_some()));
        assert!(render_federation(&fed).contains("honest sites' test rows"), "{}", render_federation(&fed));
        let card = std::fs::read_to_string(dir.join("model/MODEL_CARD.md")).unwrap();
        assert!(card.contains("Each site's own threshold") && card.contains("`site-4`"), "{card}");
        // The model directory alone: eval rebuilds the split and gets the same figures.
        let loaded = Artifact::load(&dir.join("model")).unwrap();
        let twin = crate::twin_config_of(&loaded).unwrap();
        let opts = crate::EvalOptions { dataset: None, all: false, scores: None };
        let again = crate::run_eval(loaded, &opts, &twin, &dir.join("eval"), &mut |_| {}).unwrap();
        assert_eq!(again.models["ensemble"].at_threshold, *e);
        assert!(render_federation(&fed).contains("excluded [4]"), "{}", render_federation(&fed));
        let _ = std::fs::remove_dir_all(dir);
    }
}
