//! Internal events: each event struct both logs (tracing) and counts ([`Metrics`],
//! [`Instruments`]); no metric names are scattered through the code. Named
//! `<Noun><Verb>`, grouped by where they happen: `stream.rs` (a batch through the
//! stages), `lifecycle.rs` (start, liveness, rebalance, restore), `control.rs` (acks,
//! feedback, the gate), `kafka.rs` (the client side: brokers, topics, client errors,
//! commits), `sql.rs` (logins, connections, the view, the fleet reader).

use std::sync::atomic::Ordering::Relaxed;

use opentelemetry::KeyValue;

use crate::obs::{Instruments, Metrics};

use twinguard_operators::Transition;
use twinguard_schemas::respond::{Alert, Command};
use twinguard_schemas::RejectCode;

mod control;
mod kafka;
mod lifecycle;
mod sql;
mod stream;

pub use control::*;
pub use kafka::*;
pub use lifecycle::*;
pub use sql::*;
pub use stream::*;

/// Test support: which events were emitted in this process (unit tests only;
/// release code pays nothing). Vector's `assert_transform_compliance`, in small.
#[cfg(test)]
pub mod testing {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    pub(super) static EMITTED: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());

    /// The names of the events emitted so far by any test in this process.
    pub fn emitted() -> BTreeSet<&'static str> {
        EMITTED.lock().expect("events lock").clone()
    }

    /// Fails naming the events of `names` that were never emitted.
    pub fn assert_emitted(names: &[&str]) {
        let seen = emitted();
        let missing: Vec<&str> = names.iter().copied().filter(|n| !seen.contains(n)).collect();
        assert!(missing.is_empty(), "events never emitted: {missing:?} (emitted: {seen:?})");
    }
}

/// Records that the event `name` was emitted (for [`testing`]; nothing outside tests).
#[inline]
fn note(_name: &'static str) {
    #[cfg(test)]
    testing::EMITTED.lock().expect("events lock").insert(_name);
}

#[cfg(test)]
mod tests {
    /// `/healthz` fails when any of the three threads stops turning: the core loop,
    /// the control thread (acks, feedback) and the SQL view's refresher (issue 13,
    /// 7.c); a thread that never started is not judged.
    #[test]
    fn a_stalled_thread_fails_health() {
        use std::sync::atomic::Ordering::Relaxed;
        let m = super::Metrics::default();
        assert!(m.health().is_ok(), "nothing started yet");
        super::StallLimitSet { millis: 60_000 }.emit(&m);
        super::RefreshLimitSet { millis: 60_000 }.emit(&m);
        super::Heartbeat.emit(&m);
        super::ControlHeartbeat.emit(&m);
        super::SqlViewTurned.emit(&m);
        assert!(m.health().is_ok());
        let old = chrono::Utc::now().timestamp_millis() - 120_000;
        for (beat, name) in [(&m.control_beat_ms, "control thread"), (&m.sql_refresh_beat_ms, "SQL view refresher"), (&m.heartbeat_ms, "core loop")] {
            let was = beat.swap(old, Relaxed);
            let e = m.health().unwrap_err();
            assert!(e.contains(name) && e.contains("has not turned for 120 s"), "{e}");
            beat.store(was, Relaxed);
        }
        assert!(m.health().is_ok());
    }

    /// Capped sweeps and skipped replays are counted (issue 13: 2.d and 8.c); each
    /// event also logs (a WARN for the cap, the batch line for the skips).
    #[test]
    fn capped_sweeps_and_skipped_replays_are_counted() {
        use std::sync::atomic::Ordering::Relaxed;
        let m = super::Metrics::default();
        super::ExpiryCapped { expired: 100, left: 37 }.emit(&m);
        super::BatchProcessed { partition: 0, records: 10, valid: 9, verdicts: 6, anomalies: 1, skipped: 3 }.emit(&m);
        assert_eq!(m.expiry_capped.load(Relaxed), 37);
        assert_eq!(m.replays_skipped.load(Relaxed), 3);
    }

    #[test]
    #[should_panic(expected = "events never emitted: [\"NoSuchEvent\"]")]
    fn assert_emitted_names_what_was_never_emitted() {
        super::Heartbeat.emit(&super::Metrics::default());
        super::testing::assert_emitted(&["Heartbeat", "NoSuchEvent"]);
    }
}
