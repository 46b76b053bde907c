//! Events of the Kafka client side: the brokers at start, topics, client errors
//! librdkafka retries, commits and offset stores that failed, rebalance errors, and
//! resume checks that could not run.

use super::*;

/// The brokers did not answer at start; the pipeline waits and retries.
pub struct BrokersUnreachable<'a> {
    pub brokers: &'a str,
    pub attempt: u64,
    pub retry_in_secs: u64,
    pub error: &'a str,
}

impl BrokersUnreachable<'_> {
    pub fn emit(&self) {
        note("BrokersUnreachable");
        tracing::warn!(
            brokers = %self.brokers,
            attempt = self.attempt,
            retry_in_secs = self.retry_in_secs,
            error = %self.error,
            "Kafka brokers unreachable (key `kafka.brokers`); waiting for them, /readyz stays 503"
        );
    }
}

/// The brokers answered after the pipeline waited for them.
pub struct BrokersReachable<'a> {
    pub brokers: &'a str,
    pub waited_secs: u64,
}

impl BrokersReachable<'_> {
    pub fn emit(&self) {
        note("BrokersReachable");
        tracing::info!(brokers = %self.brokers, waited_secs = self.waited_secs, "Kafka brokers reachable; starting");
    }
}

/// A topic was created (`topics.create`).
pub struct TopicCreated<'a> {
    pub topic: &'a str,
}

impl TopicCreated<'_> {
    pub fn emit(&self) {
        note("TopicCreated");
        tracing::info!(topic = %self.topic, "topic created");
    }
}

/// A Kafka client reported an error. `retried`: librdkafka retries it by itself
/// (logged as a warning); otherwise it is an error of that client's reads.
pub struct KafkaClientError<'a> {
    /// Which client: `consumer`, `control consumer`, `sql reader`, `changelog reader`.
    pub client: &'static str,
    pub error: &'a str,
    pub retried: bool,
}

impl KafkaClientError<'_> {
    pub fn emit(&self) {
        note("KafkaClientError");
        if self.retried {
            tracing::warn!(client = self.client, error = %self.error, "{} error (librdkafka retries)", self.client);
        } else {
            tracing::error!(client = self.client, error = %self.error, "{} error", self.client);
        }
    }
}

/// A commit failed; the next owner may replay some records (at-least-once).
pub struct CommitFailed<'a> {
    /// `on revoke` or `final`.
    pub when: &'static str,
    pub error: &'a str,
}

impl CommitFailed<'_> {
    pub fn emit(&self) {
        note("CommitFailed");
        tracing::warn!(when = self.when, error = %self.error, "commit failed; the next owner may replay some records");
    }
}

/// An offset could not be stored (the partition was revoked meanwhile?).
pub struct OffsetStoreFailed<'a> {
    pub partition: i32,
    pub error: &'a str,
}

impl OffsetStoreFailed<'_> {
    pub fn emit(&self) {
        note("OffsetStoreFailed");
        tracing::warn!(partition = self.partition, error = %self.error, "cannot store offset (partition revoked?)");
    }
}

/// librdkafka reported a rebalance error.
pub struct RebalanceFailed<'a> {
    pub error: &'a str,
}

impl RebalanceFailed<'_> {
    pub fn emit(&self) {
        note("RebalanceFailed");
        tracing::warn!(error = %self.error, "rebalance error");
    }
}

/// A check at assignment could not run (its broker round trip failed, or the
/// callback's deadline had passed): what it guards goes unchecked this time.
pub struct AssignCheckSkipped<'a> {
    /// `None`: the whole assignment.
    pub partition: Option<i32>,
    /// What goes unchecked.
    pub what: &'static str,
    pub why: &'a str,
}

impl AssignCheckSkipped<'_> {
    pub fn emit(&self) {
        note("AssignCheckSkipped");
        tracing::warn!(partition = ?self.partition, why = %self.why, "{} unchecked for this assignment", self.what);
    }
}

/// A record of a topic this consumer did not subscribe to was ignored.
pub struct UnexpectedRecordIgnored<'a> {
    pub topic: &'a str,
}

impl UnexpectedRecordIgnored<'_> {
    pub fn emit(&self) {
        note("UnexpectedRecordIgnored");
        tracing::warn!(topic = self.topic, "record from an unexpected topic ignored");
    }
}
