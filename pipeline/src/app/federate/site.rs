//! `twinguard federate site`: one hospital. It prepares its own labelled events
//! (the same decoder and feature SQL as `twinguard train`), runs the label screen,
//! then answers the aggregator's tasks from its own rows until the run ends (with
//! adversarial training, one run more per round, its rows grown in between).
//! Rows, labels, scores and twins never leave it: only the answers of
//! `twinguard_models::federated::protocol`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use twinguard_models::federated::protocol::{decode, encode, Reply, Task};
use twinguard_models::federated::worker::{log_screen, SiteWorker};
use twinguard_models::train::{class_index, Progress};

use super::transport::Transport;
use super::{FederationFile, AGGREGATOR};

/// Which of the dataset's rows are this site's.
pub enum Rows {
    /// The training and validation rows of the job's split (the test rows stay
    /// out, for the site's own evaluation).
    Own,
    /// For evaluation: the share simulation site `k` would get of a
    /// `sites`-way split of one dataset (the same rows, so a federation over
    /// Kafka can be compared with `federate simulate`).
    Carve { k: usize, plan: twinguard_models::federated::plan::FederationPlan },
}

/// How the site ended.
pub struct SiteRun {
    pub version: String,
    pub answered: usize,
    /// The published model on this site's held-out (test) rows.
    pub report: twinguard_train::Report,
    /// Runs served (1 + adversarial rounds).
    pub runs: usize,
}

/// Serve the federation as `name` until the aggregator finishes a run; with
/// `adversarial`, one run more per round: after each run the site attacks its own
/// training attack rows against the published model and trains on their
/// adversarial versions in the next run (they never leave the site).
pub fn serve(
    fed: &FederationFile,
    name: &str,
    key: SigningKey,
    job: &twinguard_train::TrainJob,
    rows: Rows,
    adversarial: Option<&twinguard_train::adversarial::AdversarialOptions>,
    log: &mut dyn FnMut(Progress<'_>),
) -> Result<SiteRun> {
    let index = fed.sites.iter().position(|s| s.name == name).with_context(|| format!("`{name}` is not a site of federation `{}`", fed.id))?;
    let records = job.dataset.load(&job.schema)?;
    let prep = twinguard_train::prepare(&job.schema, &job.twin, &job.feature_sql, &records, &mut |d, n| log(Progress::Status(&format!("  features: {d}/{n} events   "))))?;
    log(Progress::StatusEnd);
    let ds = prep.dataset();
    let split = job.split.apply(&prep.classes);
    let (train, validation) = match &rows {
        Rows::Own => (split.train.clone(), split.validation.clone()),
        Rows::Carve { k, plan } => twinguard_models::federated::simulate::site_rows(&split, &prep.classes, plan, *k)?,
    };
    log(Progress::Step(&format!("site `{name}` ({index}): {} training and {} validation rows, {} features", train.len(), validation.len(), prep.cols)));
    let mut adversary = adversarial.map(|o| twinguard_train::adversarial::Adversary::new(job, o, &records, &ds, std::slice::from_ref(&train))).transpose()?;
    let runs = 1 + adversarial.map_or(0, |o| o.rounds);
    let plan_topic = fed.topics().plan;
    let mut done = finished_runs(fed, name, key.clone())?;
    let mut t = Transport::connect(fed, name, key, &[&plan_topic], true)?;
    log(Progress::Step(&format!("waiting for the aggregator's next run on `{plan_topic}` ({} runs already finished there)", done.len())));
    let mut last = None;
    for k in 0..runs {
        let grown = adversary.as_ref().map(|a| a.dataset());
        let ds_k = grown.as_ref().unwrap_or(&ds);
        let train_k: Vec<usize> = train.iter().chain(adversary.as_ref().map_or(&[][..], |a| &a.extra[0][..])).copied().collect();
        let (classes, y) = class_index(ds_k.classes);
        let worker = || {
            let mut w = SiteWorker::new(index, ds_k, classes.clone(), y.clone(), train_k.clone(), validation.clone());
            if job.opts.screen {
                log_screen(index, w.screen(&job.opts), &mut |p| eprintln!("{p}"));
            }
            w
        };
        let (run, version, answered) = answer_run(&mut t, &done, name, &worker, log)?;
        done.insert(run);
        let (artifact, report) = evaluate_published(fed, name, &version, job, &records, log)?;
        if let (Some(a), true) = (adversary.as_mut(), k + 1 < runs) {
            a.round(&artifact.ensemble, log)?;
        }
        last = Some(SiteRun { version, answered, report, runs: k + 1 });
    }
    Ok(last.expect("at least one run"))
}

/// Answer one run's tasks (the next run on the plan topic not in `done`) with a
/// fresh worker for it; returns the run, its published version and the tasks
/// answered.
fn answer_run<'d>(t: &mut Transport, done: &BTreeSet<String>, name: &str, fresh: &dyn Fn() -> SiteWorker<'d>, log: &mut dyn FnMut(Progress<'_>)) -> Result<(String, String, usize)> {
    let mut worker: Option<SiteWorker<'d>> = None;
    let mut run: Option<String> = None;
    let mut answered = 0;
    loop {
        let mut from_aggregator = |m: &super::envelope::Meta| if m.from == AGGREGATOR { Ok(()) } else { Err(format!("`{}` may not write tasks", m.from)) };
        let Some((_, msg)) = t.receive(Duration::from_secs(5), &mut from_aggregator)? else { continue };
        let m = &msg.meta;
        if done.contains(&m.run) || !m.to.iter().any(|n| n == name) {
            continue;
        }
        let task: Task = match decode(&msg.body) {
            Ok(task) => task,
            Err(e) => {
                log(Progress::Step(&format!("round {}: undecodable task ({e})", m.seq)));
                continue;
            }
        };
        if matches!(task, Task::Describe) && run.as_deref() != Some(&m.run) {
            worker = Some(fresh());
            run = Some(m.run.clone());
            log(Progress::Step(&format!("run {} started", m.run)));
        }
        let (Some(w), true) = (worker.as_mut(), run.as_deref() == Some(&m.run)) else {
            continue; // a run this site did not see start
        };
        if let Task::Finish { version } = task {
            log(Progress::Step(&format!("run {} finished: model {version} ({answered} tasks answered)", m.run)));
            return Ok((m.run.clone(), version, answered));
        }
        let t0 = Instant::now();
        let reply: Reply = w.answer(&task);
        if matches!(task, Task::Standardise { .. }) && w.left_out() > 0 {
            log(Progress::Step(&format!("{} of this site's rows are of classes the federation's private class list does not publish: they are left out of its training and validation", w.left_out())));
        }
        let topic = if task.kind() == "evaluation" { t.topics.evaluations.clone() } else { t.topics.updates.clone() };
        let bytes = t.send(&topic, &m.run, m.seq, task.kind(), &[], &encode(&reply))?;
        answered += 1;
        log(Progress::Step(&format!(
            "round {}: {} {} in {:.1} s ({bytes} bytes)",
            m.seq,
            task.kind(),
            match &reply {
                Ok(_) => "answered".to_string(),
                Err(e) => format!("declined ({e})"),
            },
            t0.elapsed().as_secs_f64()
        )));
    }
}

/// Score the published model on this site's held-out rows, through the detector
/// as `twinguard eval` does; writes the report, model card and plots into
/// `<out>/published`. Nothing of it leaves the site.
fn evaluate_published(
    fed: &FederationFile,
    name: &str,
    version: &str,
    job: &twinguard_train::TrainJob,
    records: &[(String, Vec<u8>)],
    log: &mut dyn FnMut(Progress<'_>),
) -> Result<(twinguard_models::Artifact, twinguard_train::Report)> {
    let models = super::follow::ModelTopics::read(fed, Duration::from_secs(120))?;
    let published = models
        .versions
        .get(version)
        .with_context(|| format!("the run finished with model {version}, but `{}` holds no verified artifact of it", fed.topics().artifacts))?;
    // At the threshold this site's pipelines score at with `model.site`: its own
    // where it has the normal rows to set one (none in a private federation).
    let mut artifact = published.artifact.clone();
    match artifact.ensemble.use_site_threshold(name) {
        Ok(chosen) => log(Progress::Step(&format!("scoring at {chosen}"))),
        Err(e) => log(Progress::Step(&format!("scoring at the federation's threshold: {e}"))),
    }
    let scores = twinguard_train::score_stream(&job.schema, &job.twin, artifact.clone(), records, &mut |d, n| log(Progress::Status(&format!("  scoring the published model: {d}/{n} events   "))))?;
    log(Progress::StatusEnd);
    let test = job.split.apply(&scores.truth).test;
    let split = twinguard_train::Split { train: Vec::new(), validation: Vec::new(), test };
    let report = twinguard_models::eval::evaluate(&artifact, &scores, &split, &format!("site `{name}`'s held-out rows of {}", job.dataset.file.display()));
    let out = job.out.join("published");
    twinguard_train::write_outputs(&out, &artifact, &report)?;
    log(Progress::Step(&format!("model {version} on this site's {} held-out rows: report in {}", split.test.len(), out.display())));
    Ok((artifact, report))
}

/// Runs already finished on the plan topic (their tasks are not replayed).
fn finished_runs(fed: &FederationFile, name: &str, key: SigningKey) -> Result<BTreeSet<String>> {
    let plan_topic = fed.topics().plan;
    let mut t = Transport::connect(fed, name, key, &[&plan_topic], true)?;
    t.scan_only = true;
    let end = t.end_of(&plan_topic)?;
    let mut done = BTreeSet::new();
    while t.position(&plan_topic)? < end {
        let mut any = |_: &super::envelope::Meta| -> Result<(), String> { Ok(()) };
        if let Some((_, m)) = t.receive(Duration::from_secs(2), &mut any)? {
            if m.meta.kind == "finish" {
                done.insert(m.meta.run);
            }
        }
    }
    Ok(done)
}
