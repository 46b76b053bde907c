//! The models' flags (`ModelArgs`), shared by `train` and the `federate` roles, and
//! the training options they give.

use anyhow::Result;

/// The models' settings (shared by `train`, `federate simulate`, `federate site`
/// and `federate aggregate`).
#[derive(clap::Args)]
pub(crate) struct ModelArgs {
    /// Target false-positive rate: the decision threshold is set for it on validation normal rows.
    #[arg(long, default_value_t = 0.01)]
    pub(crate) target_fpr: f64,
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Random-forest trees.
    #[arg(long, default_value_t = 100)]
    pub(crate) trees: usize,
    /// Weight the forest's classes inversely to their frequency.
    #[arg(long)]
    pub(crate) balanced: bool,
    /// Smallest number of training rows in a forest leaf.
    #[arg(long, default_value_t = 1)]
    pub(crate) min_samples_leaf: usize,
    /// SVM kernel: linear (default; cheap to score) or rbf (γ = 1/features; costs
    /// support vectors × features per event).
    #[arg(long, value_parser = ["linear", "rbf"], default_value = "linear")]
    pub(crate) svm_kernel: String,
    /// Largest SVM training sample (stratified subsample).
    #[arg(long, default_value_t = 3000)]
    pub(crate) svm_rows: usize,
    /// LSTM training epochs.
    #[arg(long, default_value_t = 15)]
    pub(crate) lstm_epochs: usize,
    /// LSTM hidden units.
    #[arg(long, default_value_t = 16)]
    pub(crate) lstm_hidden: usize,
    /// How the members' scores become the ensemble's: auto (the stacker, or the
    /// best member alone when stacking does not beat it out of fold) or any (each
    /// member against its own threshold, the most suspicious decides: an attacker
    /// must evade every member at once; a little less clean detection). In a
    /// federation the members' thresholds come from merged per-member histograms
    /// (with --dp-noise: the forest and the boosted trees, each threshold a DP
    /// quantile).
    #[arg(long, value_parser = ["auto", "any"], default_value = "auto")]
    pub(crate) combine: String,
}

impl ModelArgs {
    /// The training options these flags give.
    pub(crate) fn options(&self, flip_labels: f64, screen: bool) -> Result<twinguard_train::TrainOptions> {
        if !(self.target_fpr > 0.0 && self.target_fpr < 1.0) {
            anyhow::bail!("--target-fpr must be in (0, 1)");
        }
        Ok(twinguard_train::TrainOptions {
            target_fpr: self.target_fpr,
            seed: self.seed,
            forest: twinguard_models::forest::ForestParams {
                trees: self.trees,
                seed: self.seed,
                balanced: self.balanced,
                min_samples_leaf: self.min_samples_leaf.max(1),
                ..Default::default()
            },
            svm: twinguard_models::svm::SvmParams {
                max_train_rows: self.svm_rows,
                seed: self.seed,
                kernel: if self.svm_kernel == "rbf" {
                    twinguard_models::svm::Kernel::Rbf { gamma: 0.0 }
                } else {
                    twinguard_models::svm::Kernel::Linear
                },
                ..Default::default()
            },
            lstm: twinguard_models::lstm::LstmParams { epochs: self.lstm_epochs, hidden: self.lstm_hidden, seed: self.seed, ..Default::default() },
            boost: twinguard_models::boost::BoostParams { seed: self.seed, ..Default::default() },
            flip_labels,
            screen,
            screen_threshold: 0.2,
            combine: if self.combine == "any" { twinguard_models::combine::CombineMode::Any } else { twinguard_models::combine::CombineMode::Auto },
        })
    }
}
