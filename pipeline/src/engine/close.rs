//! Leaving the consumer group at the end of a run, bounded in time.
//!
//! Once the stages have drained (every output acknowledged, every offset stored), a
//! worker commits its offsets, unsubscribes and closes its consumer; the close
//! serves the last revoke callback and sends LeaveGroup. Each of these is a broker
//! round trip that librdkafka does not bound: a synchronous commit waits for its
//! answer, and rdkafka's close polls until librdkafka says the group is left. A
//! close that never ended was seen here (two workers of one instance, SIGTERM just
//! after a rebalance against tansu: both logged the revoke, then nothing for
//! minutes), and close hangs of this kind are known in librdkafka
//! (confluentinc/librdkafka#4884). So the three steps run on a thread of their own
//! (`tg-close`) for at most `engine.close_timeout_secs`. Past that the worker gives
//! up on leaving cleanly, says which step it was stuck in and returns; the thread
//! is left behind (the process is ending). Nothing is lost: what the broker
//! acknowledged was already stored, and an uncommitted tail is replayed by the next
//! owner to byte-identical verdicts; the group notices the member gone after
//! `session.timeout.ms` instead of at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;

use super::{RunReport, Shared, SourceContext};
use crate::obs::events as ev;

/// Where a worker's close is (for the message when it times out).
#[derive(Default)]
pub(super) struct Closing {
    /// The step under way; empty until the close starts.
    step: Mutex<&'static str>,
    /// The final commit was acknowledged: the revoke callback the close serves has
    /// nothing left to commit (and does not make a second round trip).
    committed: AtomicBool,
}

impl Closing {
    fn enter(&self, step: &'static str) {
        *self.step.lock().expect("closing lock") = step;
    }

    /// Name `step` as the one under way, when the close has started (the revoke
    /// callback runs on ordinary rebalances too).
    pub(super) fn during(&self, step: &'static str) {
        let mut s = self.step.lock().expect("closing lock");
        if !s.is_empty() {
            *s = step;
        }
    }

    fn now(&self) -> &'static str {
        *self.step.lock().expect("closing lock")
    }

    /// The final commit already holds every stored offset.
    pub(super) fn committed(&self) -> bool {
        self.committed.load(Ordering::SeqCst)
    }
}

/// Commit, unsubscribe and close `consumer`, for at most
/// `engine.close_timeout_secs`; `report` records the step a timed-out close was
/// stuck in.
pub(super) fn leave_group(shared: &Arc<Shared>, consumer: Arc<BaseConsumer<SourceContext>>, report: &mut RunReport) {
    let secs = shared.cfg.engine.close_timeout_secs;
    let s = shared.clone();
    if !bounded(Duration::from_secs(secs), move || close(&s, consumer)) {
        let step = shared.closing.now();
        ev::CloseTimedOut { step, secs }.emit();
        report.close_timed_out = Some(step);
    }
}

fn close(s: &Shared, consumer: Arc<BaseConsumer<SourceContext>>) {
    s.closing.enter("the final commit");
    if !s.failed() {
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {
                s.closing.committed.store(true, Ordering::SeqCst);
            }
            Err(e) => ev::CommitFailed { when: "final", error: &e.to_string() }.emit(),
        }
    }
    s.closing.enter("unsubscribing");
    consumer.unsubscribe();
    // rdkafka's close: serves the revoke callback, then polls until the group is left.
    s.closing.enter("closing the consumer (revoke, leaving the group)");
    drop(consumer);
}

/// Run `work` on a thread of its own and wait for it at most `timeout`: false
/// when it did not finish in time (it goes on, detached).
pub(super) fn bounded(timeout: Duration, work: impl FnOnce() + Send + 'static) -> bool {
    let (tx, rx) = sync_channel::<()>(1);
    let spawned = std::thread::Builder::new().name("tg-close".into()).spawn(move || {
        work();
        let _ = tx.send(());
    });
    if spawned.is_err() {
        // No thread to be had: the work (and the consumer in it) was dropped, which
        // closes the consumer on this thread.
        return true;
    }
    // Disconnected: the work panicked, which is not a hang.
    !matches!(rx.recv_timeout(timeout), Err(RecvTimeoutError::Timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_that_finishes_is_waited_for_and_work_that_hangs_is_left_behind() {
        let (tx, rx) = sync_channel::<()>(1);
        assert!(bounded(Duration::from_secs(60), move || tx.send(()).unwrap()));
        assert!(rx.try_recv().is_ok(), "the work ran to its end before bounded returned");
        let (_keep, blocked) = sync_channel::<()>(1);
        assert!(!bounded(Duration::from_millis(200), move || {
            let _ = blocked.recv();
        }));
    }

    #[test]
    fn the_step_is_named_only_once_the_close_started() {
        let c = Closing::default();
        c.during("a revoke on an ordinary rebalance");
        assert_eq!(c.now(), "");
        c.enter("unsubscribing");
        c.during("the revoke callback");
        assert_eq!(c.now(), "the revoke callback");
    }
}
