//! `twinguard attack`: its flags, and the run; the flags of adversarial training
//! (`train`, `federate simulate`) and of differential privacy (`federate simulate`).

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
    /// Searches, each with the query budget, on every detected event (it evades
    /// when one succeeds): random (A1, from the corners), gradient (A2,
    /// finite-difference sign steps with momentum), coordinate (A3, one knob at a
    /// time over a refining grid: the tree members' neighbouring leaves).
    #[arg(long, value_delimiter = ',', default_value = "random,gradient,coordinate")]
    pub(crate) methods: Vec<String>,
    /// Candidates scored per detector call.
    #[arg(long, default_value_t = 20)]
    pub(crate) batch: usize,
    /// Scores attacked, each on its own against its threshold: ensemble and
    /// members (rf, svm, lstm, gbdt, twin).
    #[arg(long, value_delimiter = ',', default_value = "ensemble,rf,gbdt")]
    pub(crate) targets: Vec<String>,
    /// Threat T3 ("boiling frog"): attack the test split's attack events in
    /// stream order, each evasion fed to the device's twin as sent (what passed as
    /// normal is learned into its baseline). Default T1: a seeded sample, the twin
    /// fed the original events. (T2, the identity clone, is `clone_identity = true`
    /// in the constraint file.)
    #[arg(long)]
    pub(crate) feed_back: bool,
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
        let methods = self.methods.iter().map(|m| twinguard_train::attack::Method::parse(m)).collect::<Result<Vec<_>, _>>()?;
        let opts = twinguard_train::attack::AttackOptions { constraints, events: self.events, queries: self.queries, methods, feed_back: self.feed_back, batch: self.batch, targets: self.targets, seed: self.seed };
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
        let attack = twinguard_train::attack::AttackOptions { constraints, events: self.adversarial_events, queries: self.adversarial_queries, methods: vec![twinguard_train::attack::Method::Random], feed_back: false, batch: 20, targets: vec!["ensemble".into()], seed };
        Ok(Some(twinguard_train::adversarial::AdversarialOptions { attack, rounds: self.adversarial_rounds }))
    }
}

/// `federate simulate` flags for differential privacy of the published model
/// (a federation over Kafka: `[plan.dp]` in the federation file).
#[derive(clap::Args)]
pub(crate) struct DpArgs {
    /// Differential privacy: the noise multiplier z of the site-level Gaussian
    /// mechanism on the SVM and each LSTM round (updates clipped to C, noise
    /// σ = z·C/m on their aggregate); ε per member goes to federation.json and the
    /// model card. The trees, the stacker and the class list stay non-private.
    #[arg(long, value_name = "Z")]
    pub(crate) dp_noise: Option<f64>,
    /// Record-level ε (δ = 1e-5) of the threshold and its published law.
    #[arg(long, default_value_t = 1.0, requires = "dp_noise")]
    pub(crate) dp_threshold_epsilon: f64,
    /// Record-level ε (δ = 1e-5) of the standardiser (noisy per-feature counts
    /// over a fixed grid instead of the sites' exact moments).
    #[arg(long, default_value_t = twinguard_models::federated::privacy::DEFAULT_MOMENTS_EPSILON, requires = "dp_noise")]
    pub(crate) dp_moments_epsilon: f64,
    /// Record-level ε of the class list (noisy per-class row counts; classes too
    /// rare to publish are left out), with --dp-noise.
    #[arg(long, default_value_t = twinguard_models::federated::privacy::DEFAULT_CLASSES_EPSILON, requires = "dp_noise")]
    pub(crate) dp_classes_epsilon: f64,
    /// Record-level ε of each tree member (forest, boosted trees): trees shaped
    /// without rows, leaves from the sites' summed counts with noise.
    #[arg(long, default_value_t = twinguard_models::federated::privacy::DEFAULT_TREES_EPSILON, requires = "dp_noise")]
    pub(crate) dp_trees_epsilon: f64,
    /// Clipping norm of a site's SVM hyperplane.
    #[arg(long, default_value_t = twinguard_models::federated::privacy::DEFAULT_SVM_CLIP, requires = "dp_noise")]
    pub(crate) dp_svm_clip: f64,
    /// Clipping norm of a site's LSTM change per round.
    #[arg(long, default_value_t = twinguard_models::federated::privacy::DEFAULT_LSTM_CLIP, requires = "dp_noise")]
    pub(crate) dp_lstm_clip: f64,
}

impl DpArgs {
    pub(crate) fn plan(&self) -> Result<Option<twinguard_models::federated::privacy::DpPlan>> {
        let Some(z) = self.dp_noise else { return Ok(None) };
        let dp = twinguard_models::federated::privacy::DpPlan { noise_multiplier: z, svm_clip: self.dp_svm_clip, lstm_clip: self.dp_lstm_clip, threshold_epsilon: self.dp_threshold_epsilon, moments_epsilon: self.dp_moments_epsilon, classes_epsilon: self.dp_classes_epsilon, trees_epsilon: self.dp_trees_epsilon, delta: twinguard_models::federated::privacy::DEFAULT_DELTA };
        dp.validate()?;
        Ok(Some(dp))
    }
}
