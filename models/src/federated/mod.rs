//! Federated training: the math a federation of hospitals needs, with no Kafka and
//! no clock (the Kafka transport and the roles live in the pipeline).
//!
//! A federation trains every member of the ensemble without moving a row:
//! - [`stats`]: round 0, pooled feature moments, so every site standardises alike;
//! - [`robust`]: robust rules for vector updates (SVM hyperplanes, LSTM weights,
//!   stacker weights) and the screen for tree updates (cross-site AUC);
//! - pooling for the trees ([`Forest::merge`](crate::forest::Forest::merge)) and
//!   bagging for the boosted member ([`Booster::average`](crate::boost::Booster::average));
//! - the stacker by summed Newton steps ([`Stacker::newton_sums`](crate::Stacker::newton_sums)),
//!   the same fit as on the union of the rows;
//! - [`any`]: the "any member" combination (`--combine any`) from merged
//!   per-member histograms, in place of the stacker;
//! - [`calibrate`]: the threshold from merged score histograms, so the artifact
//!   stores no site's scores;
//! - [`partition`]: how an evaluation splits one dataset into sites;
//! - [`local`]: each site alone, the arm a federation must beat;
//! - [`plan`]: a federation's settings and report;
//! - [`privacy`]: optional differential privacy of what is published, ε per member;
//! - [`protocol`]: what the aggregator asks and the sites answer (all that
//!   crosses a site's boundary), and the [`protocol::Link`] it travels over;
//! - [`aggregate`]: the aggregator's rounds over a link;
//! - [`worker`]: a site answering from its own rows;
//! - [`simulate`]: a whole federation in one process, sites poisoned or not.

pub mod aggregate;
pub mod any;
pub mod calibrate;
mod cyclic;
pub mod local;
pub mod partition;
pub mod plan;
pub mod privacy;
mod private_fit;
pub mod private_trees;
pub mod protocol;
pub mod robust;
pub mod simulate;
pub mod stacker;
pub mod stats;
pub mod worker;
