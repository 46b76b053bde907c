//! `twinguard attack`: its flags, and the run.

use std::path::PathBuf;

use anyhow::Result;

/// Constrained evasion of a trained model (see `twinguard_train::attack`).
#[derive(clap::Args)]
pub(crate) struct AttackArgs {
    /// Model directory (or its model.json). Its card names the dataset and the
    /// split; the attacked events are attack rows of its test split.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Constraint file: what an attacker shaping its own traffic may change, per
    /// attack family (e.g. models/attack/ciciomt-flow-window.toml).
    #[arg(long)]
    pub(crate) constraints: PathBuf,
    /// Attacked events: a seeded sample of the test split's attack rows.
    #[arg(long, default_value_t = 500)]
    pub(crate) events: usize,
    /// Candidates scored per event at most (the query budget).
    #[arg(long, default_value_t = 300)]
    pub(crate) queries: usize,
    /// Candidates scored per detector call.
    #[arg(long, default_value_t = 20)]
    pub(crate) batch: usize,
    /// Scores attacked, each on its own against its threshold: ensemble and
    /// members (rf, svm, lstm, gbdt, twin).
    #[arg(long, value_delimiter = ',', default_value = "ensemble,rf,gbdt")]
    pub(crate) targets: Vec<String>,
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Where to write attack.json (default: the model directory).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

impl AttackArgs {
    pub(crate) fn run(self) -> Result<()> {
        crate::init_logs("warn");
        let artifact = twinguard_models::Artifact::load(&self.model)?;
        let recipe = twinguard_train::Recipe::from_card(&artifact)?;
        let schema = twinguard_train::job::schema_of(&artifact, &recipe)?;
        let constraints = twinguard_train::attack::Constraints::load(&self.constraints, &schema)?;
        anyhow::ensure!(self.batch > 0 && self.queries > 0, "--batch and --queries must be at least 1");
        let opts = twinguard_train::attack::AttackOptions { constraints, events: self.events, queries: self.queries, batch: self.batch, targets: self.targets, seed: self.seed };
        let out = self.out.unwrap_or_else(|| if self.model.is_dir() { self.model.clone() } else { self.model.parent().map(PathBuf::from).unwrap_or_default() });
        let report = twinguard_train::attack::run_attack(&artifact, &opts, &out, &mut crate::print_progress)?;
        println!("{}", twinguard_train::attack::render(&report));
        println!("attack.json written to {}", out.display());
        Ok(())
    }
}

/// `twinguard train` and `federate simulate` flags for adversarial training.
#[derive(clap::Args)]
pub(crate) struct AdversarialArgs {
    /// Adversarial training against this constraint file's threat model: after the
    /// fit, each round attacks training attack rows against the current model and
    /// adds the adversarial versions, labelled, to the training rows (in a
    /// federation: each site attacks its own rows against the global model).
    #[arg(long, value_name = "CONSTRAINTS")]
    pub(crate) adversarial: Option<PathBuf>,
    /// Rounds of adversarial training.
    #[arg(long, default_value_t = 2, requires = "adversarial")]
    pub(crate) adversarial_rounds: usize,
    /// Training attack rows attacked per round (in a federation: over all sites).
    #[arg(long, default_value_t = 2000, requires = "adversarial")]
    pub(crate) adversarial_events: usize,
    /// Candidates per attacked row.
    #[arg(long, default_value_t = 100, requires = "adversarial")]
    pub(crate) adversarial_queries: usize,
}

impl AdversarialArgs {
    /// The options, when --adversarial was given.
    pub(crate) fn options(&self, schema: &twinguard_schemas::EventSchema, seed: u64) -> Result<Option<twinguard_train::adversarial::AdversarialOptions>> {
        let Some(path) = &self.adversarial else { return Ok(None) };
        let constraints = twinguard_train::attack::Constraints::load(path, schema)?;
        anyhow::ensure!(self.adversarial_queries > 0, "--adversarial-queries must be at least 1");
        let attack = twinguard_train::attack::AttackOptions { constraints, events: self.adversarial_events, queries: self.adversarial_queries, batch: 20, targets: vec!["ensemble".into()], seed };
        Ok(Some(twinguard_train::adversarial::AdversarialOptions { attack, rounds: self.adversarial_rounds }))
    }
}
