//! The engine's one outward hook besides Kafka: a [`StateObserver`] sees what each
//! batch changed, so that a view of the twins (the SQL view) can follow the stream
//! without the engine knowing what it is.

use std::time::Instant;

use twinguard_operators::{ChangelogRecord, Twin};
use twinguard_schemas::respond::{Alert, Command};
use twinguard_schemas::verdict::Verdict;

/// Watches the engine's state, batch by batch (`sql::view::ViewFeed` is one).
///
/// Contract: the engine calls it on its core thread, in batch order, after a
/// batch's outputs were built and before they are sent; an implementation hands
/// the data off and returns (it must not block on I/O or on the engine). What one
/// call carries belongs together: a view must never show part of it.
pub trait StateObserver: Send + Sync {
    /// One batch: its verdicts, alerts and commands, and the changelog records of
    /// the twins it changed (a `None` value removes that device's twin).
    /// `consumed`: when the batch's oldest record was read (for freshness).
    fn batch(&self, consumed: Option<Instant>, verdicts: &[Verdict], alerts: &[Alert], commands: &[Command], twins: &[ChangelogRecord]);
    /// The twins of newly assigned partitions, once restored from the changelog.
    fn restored(&self, twins: &[&Twin]);
    /// This instance no longer owns `partition` (revoked or lost): its twins go.
    fn partition_dropped(&self, partition: i32);
}
