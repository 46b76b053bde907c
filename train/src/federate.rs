//! `twinguard federate simulate`: a federation of sites over one dataset's rows in
//! one process, evaluated on the held-out test rows through the detector exactly
//! as `twinguard train` evaluates a central model.

use std::time::Instant;

use twinguard_models::federated::simulate::{fit_federated, FederationPlan, FederationReport};
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
    let mut fitter = |ds: &twinguard_models::train::Dataset<'_>, split: &twinguard_models::train::Split, log: &mut dyn FnMut(Progress<'_>)| {
        let (ens, rep) = fit_federated(ds, split, job.twin.anomaly_threshold, &job.opts, plan, log)?;
        fed = Some(rep);
        Ok((ens, None))
    };
    let (mut artifact, report) = train_records_with(job, &records, &sha, started, &mut fitter, "fed-", log)?;
    let fed = fed.expect("the fitter ran");
    // The plan and the decisions travel with the model (its provenance).
    if let serde_json::Value::Object(m) = &mut artifact.card.hyper_parameters {
        m.insert("federation".into(), serde_json::to_value(&fed).expect("serialises"));
    }
    artifact.save(&job.out)?;
    let path = job.out.join("federation.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&fed).expect("serialises")).map_err(|e| TrainError::Io { path: path.clone(), reason: e.to_string() })?;
    Ok((artifact, report, fed))
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
    let (honest_out, poisoned_in) = f.exclusions();
    out.push_str(&format!("honest sites excluded by some member: {honest_out}; poisoned sites accepted by some member: {poisoned_in}\n"));
    out
}
