//! What the aggregator asks of a site and what a site answers: the only things
//! that cross a site's boundary. A federation is the aggregator's rounds of
//! [`Task`]s over a [`Link`] to its sites: in one process for `federate simulate`
//! ([`super::simulate`]), over Kafka for `federate aggregate` / `federate site`
//! (the pipeline crate's transport). The same [`super::worker::SiteWorker`]
//! answers on both, so the two run the same code.
//!
//! Answers carry model parameters, moments, sums, histograms and AUCs; never a
//! row, a score of a row, a label or a twin.

use serde::{Deserialize, Serialize};

use super::calibrate::ScoreHistogram;
use super::private_trees::Shapes;
use super::stats::{Grid, Moments};
use crate::boost::{BoostParams, Booster};
use crate::ensemble::{NewtonSums, Stacker};
use crate::forest::{Forest, ForestParams};
use crate::lstm::{LstmModel, LstmParams};
use crate::svm::SvmParams;
use crate::{Ensemble, ModelError, Standardizer};

/// Version of the protocol's messages; a message of another version is refused.
pub const PROTOCOL: u32 = 4;

/// Rows of a class, and normal rows, a site needs to report that class's AUC.
pub const MIN_CLASS_ROWS: usize = 5;

/// Which of a site's validation rows a stacker step or count covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fold {
    /// All of them.
    All,
    /// Those outside out-of-fold fold `k` (row `i` of the site's validation rows is
    /// in fold `i % OOF_FOLDS`).
    Without(usize),
}

/// A model the sites score on their own validation rows (the cross-site screen).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Scorer {
    Forest(Forest),
    Booster(Booster),
    Lstm(LstmModel),
    /// Scored on the member scores of the global members (after [`Task::Members`]).
    Stacker(Stacker),
}

/// What the aggregator asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Task {
    /// Round 0: feature names, classes, moments and row counts.
    Describe,
    /// The global standardiser and class list; every later task uses them.
    Standardise { standardizer: Standardizer, classes: Vec<String> },
    /// Fit a forest on the site's training rows (its seed is derived from the site).
    FitForest(ForestParams),
    /// Fit a boosted model on the site's training rows (bagging).
    FitBooster(BoostParams),
    /// Add trees boosted on the site's rows to `model` (cyclic boosting).
    BoostTurn { model: Option<Booster>, params: BoostParams },
    /// Fit a linear SVM; answer its hyperplane.
    FitSvm(SvmParams),
    /// Local LSTM epochs from `global`; answer the updated weights.
    LstmRound { global: LstmModel, params: LstmParams },
    /// AUC of each model on the site's validation rows (`None`: skip), overall
    /// and per attack class.
    Auc(Vec<Option<Scorer>>),
    /// The global members: the site scores its validation rows with them.
    Members(Box<Ensemble>),
    /// Fit a stacker on the site's own member scores (for the screen).
    FitStacker,
    /// Attack rows and all rows of a fold (the global class weights).
    Counts(Fold),
    /// Gradient and Hessian sums of the stacker at `w` over a fold.
    Newton { w: Vec<f64>, class_weights: (f64, f64), fold: Fold },
    /// Histograms of the out-of-fold ensemble scores (row `i` scored by
    /// `folds[i % folds.len()]`, in log-odds) and of each member's scores.
    Histograms { folds: Vec<Stacker> },
    /// Histograms of each member's stacking input (log-odds; the SVM's margin, as
    /// [`crate::ensemble::MemberScores::inputs`]) per out-of-fold fold: what the
    /// "any member" combination's offsets are set on.
    MemberHistograms,
    /// Class counts of the site's training rows in the leaves of trees drawn
    /// without rows (the private forest).
    LeafCounts(Shapes),
    /// Log-loss gradient and Hessian sums of the site's training rows at
    /// `model`'s scores in the leaves of `shapes` (a private boosting round).
    LeafGradients { shapes: Shapes, model: Option<Booster> },
    /// The federation is over; `version` is the published model.
    Finish { version: String },
}

impl Task {
    /// Short name (bytes accounting, logs, dead letters).
    pub fn kind(&self) -> &'static str {
        match self {
            Task::Describe => "describe",
            Task::Standardise { .. } => "standardise",
            Task::FitForest(_) | Task::LeafCounts(_) => "forest",
            Task::FitBooster(_) | Task::BoostTurn { .. } | Task::LeafGradients { .. } => "gbdt",
            Task::FitSvm(_) => "svm",
            Task::LstmRound { .. } => "lstm",
            Task::Auc(_) => "evaluation",
            Task::Members(_) => "members",
            Task::FitStacker | Task::Counts(_) | Task::Newton { .. } => "stacker",
            Task::Histograms { .. } | Task::MemberHistograms => "histograms",
            Task::Finish { .. } => "finish",
        }
    }
}

/// Round 0's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Description {
    pub names: Vec<String>,
    /// The classes of the site's rows (normal first).
    pub classes: Vec<String>,
    /// Training rows per class of `classes` (what a private class list is drawn from).
    #[serde(default)]
    pub class_rows: Vec<u64>,
    pub moments: Moments,
    /// Per feature, its training rows' counts over the fixed grid (for a
    /// differentially private standardiser).
    #[serde(default)]
    pub grid: Grid,
    pub train_rows: usize,
    pub validation_rows: usize,
    pub validation_normal: usize,
}

/// What a site answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Answer {
    Description(Description),
    Ack,
    Forest(Forest),
    Booster(Booster),
    Vector(Vec<f64>),
    /// Per model of a [`Task::Auc`]: its ROC-AUC on the site's validation rows
    /// (`all`), and per federation class `c` on the rows of class `c` against
    /// the normal rows (`by_class[m][c]`; `None` for normal, and where the site
    /// has fewer than [`MIN_CLASS_ROWS`] of either).
    Aucs { all: Vec<Option<f64>>, by_class: Vec<Vec<Option<f64>>> },
    Stacker(Stacker),
    Counts { attack: usize, total: usize },
    Sums(NewtonSums),
    Histograms { oof: ScoreHistogram, members: Vec<ScoreHistogram> },
    /// Per fold (row `i` of the validation rows is in fold `i % OOF_FOLDS`), per
    /// member in [`crate::ensemble::MEMBERS`] order: its inputs' histogram.
    MemberHistograms(Vec<Vec<ScoreHistogram>>),
    /// Per tree of a [`Task::LeafCounts`], its non-zero `(leaf · classes + class, rows)` cells.
    LeafCounts(Vec<Vec<(u32, u32)>>),
    /// Per tree and leaf of a [`Task::LeafGradients`], (Σg, Σ4h).
    LeafSums(Vec<f64>),
}

/// A site's reply: its answer, or why it has none (its rows hold one class, a
/// fit failed, it did not answer in time, its message was refused).
pub type Reply = Result<Answer, String>;

/// How the aggregator reaches its sites.
pub trait Link {
    /// Number of sites in the plan.
    fn sites(&self) -> usize;
    /// Ask the sites `to` the same task; one reply per site of `to`, in order.
    fn ask(&mut self, to: &[usize], task: &Task) -> Result<Vec<Reply>, ModelError>;
    /// Bytes each site sent so far, per task kind (encoded as on the wire).
    fn bytes(&self) -> Vec<std::collections::BTreeMap<String, usize>>;
    /// The sites' names, in plan order (a simulation's: `site-0`, `site-1`, ...).
    fn names(&self) -> Vec<String> {
        (0..self.sites()).map(|i| format!("site-{i}")).collect()
    }
}

/// The binary encoding of every message (MessagePack, self-describing: a
/// message from an older build still decodes or fails with a clear error).
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("protocol messages serialise")
}

/// Decode a message; the error names what failed.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ModelError> {
    rmp_serde::from_slice(bytes).map_err(|e| ModelError::Data(format!("undecodable federation message: {e}")))
}

/// An answer of the expected kind, or the reason it is not one.
pub fn expect<T>(reply: &Reply, what: &str, pick: impl Fn(&Answer) -> Option<T>) -> Result<T, String> {
    match reply {
        Ok(a) => pick(a).ok_or_else(|| format!("answered something other than {what}")),
        Err(e) => Err(e.clone()),
    }
}
