//! [`Metrics`]: one instance's own counters and gauges (atomics, cheap to read at
//! any time), which the exporters observe and the status line and the SQL `status`
//! table read. The events in [`crate::obs::events`] write them (a few call sites
//! still add to them directly).

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;


use crate::obs::Instruments;

use twinguard_schemas::RejectCode;

/// Response times kept for the quantiles the metrics report.
const RESPONSE_SAMPLES: usize = 100_000;

thread_local! {
    /// The stream worker the current thread belongs to (`engine.workers`).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the calling thread as stream worker `id`: the gauges it sets (owned
/// partitions, lag, twins, memory, readiness, heartbeat) are its own, and the
/// instance's figures combine every worker's. Threads never marked are worker 0.
pub fn set_worker(id: usize) {
    WORKER.with(|w| w.set(id));
}

/// One stream worker's own gauges.
#[derive(Debug, Default, Clone)]
struct WorkerGauges {
    owned: Vec<i32>,
    lag: BTreeMap<i32, i64>,
    twins: i64,
    mem: i64,
    ready: bool,
    beat: i64,
}

/// Counters and gauges of one pipeline instance. Cheap to read at any time.
/// Counters are shared by the stream workers; the gauges each worker sets are
/// kept per worker and combined (sums, the union of partitions, ready when every
/// worker is, the oldest heartbeat so that one stalled worker fails `/healthz`).
#[derive(Debug, Default)]
pub struct Metrics {
    pub records_in: AtomicU64,
    pub events_valid: AtomicU64,
    pub verdicts_out: AtomicU64,
    pub anomalies: AtomicU64,
    pub dlq_out: AtomicU64,
    pub(crate) dlq_by_reason: [AtomicU64; RejectCode::ALL.len()],
    pub replays_skipped: AtomicU64,
    pub batches: AtomicU64,
    pub changelog_out: AtomicU64,
    pub offsets_stored: AtomicU64,
    pub twins: AtomicI64,
    pub twin_mem_bytes: AtomicI64,
    pub twins_restored: AtomicU64,
    pub twins_expired: AtomicU64,
    pub rebalances: AtomicU64,
    /// Input records never delivered between a resumed partition's committed offset
    /// and the first record fetched there (see [`InputGap`](crate::obs::events::InputGap)).
    pub input_gap_records: AtomicU64,
    /// Acks-topic offsets never delivered (see [`ControlGap`](crate::obs::events::ControlGap)).
    pub control_gap_records: AtomicU64,
    /// Records whose offset lies below the one expected next on their partition
    /// (the consumer went back: a seek or an offset reset); see [`OffsetsRewound`](crate::obs::events::OffsetsRewound).
    pub offsets_rewound: AtomicU64,
    /// Restored twins whose last applied offset is at or past their input
    /// partition's end (the input topic was recreated or truncated).
    pub twins_ahead_of_input: AtomicU64,
    /// Twins reset at an event because their device was idle past `idle_ttl_secs`.
    pub twin_resets: AtomicU64,
    /// Twins that shed learned strings to fit `state.max_twin_bytes`.
    pub twins_shed: AtomicU64,
    /// Idle twins a sweep left for later (`state.max_expiries_per_sweep`).
    pub expiry_capped: AtomicU64,
    /// Changelog records that could not be restored (dead-lettered, skipped).
    pub changelog_quarantined: AtomicU64,
    /// 1 once partitions are assigned and their twins restored.
    pub ready: AtomicI64,
    pub alerts_out: AtomicU64,
    pub commands_out: AtomicU64,
    pub audit_out: AtomicU64,
    pub acks_applied: AtomicU64,
    /// Acks or feedback records sent to the DLQ.
    pub control_rejected: AtomicU64,
    /// Changelog records `twinguard sql` could not read and skipped (not dead
    /// letters: they stay on the changelog; see [`FleetRecordSkipped`](crate::obs::events::FleetRecordSkipped)).
    pub fleet_records_skipped: AtomicU64,
    /// Times this process rejoined its group after losing its assignment.
    pub rejoins: AtomicU64,
    /// Audit records not written because their chain had no head (see [`AuditUnchained`](crate::obs::events::AuditUnchained)).
    pub audit_unchained: AtomicU64,
    pub feedback_in: AtomicU64,
    /// 1 while confidence gating suspends automated actions.
    pub gate_suspended: AtomicI64,
    /// Most recent command response times (ms): input → command acknowledged.
    response_ms: Mutex<VecDeque<f64>>,
    /// The confidence gate's latest figures (refreshed at every status tick).
    pub gate: Mutex<twinguard_operators::GateStatus>,
    /// Acknowledgement records consumed.
    pub acks_in: AtomicU64,
    /// Changelog records read (restores; all of them in `twinguard sql`).
    pub changelog_in: AtomicU64,
    /// Input records behind the end of each owned partition (refreshed about every second).
    lag: Mutex<BTreeMap<i32, i64>>,
    /// Partitions owned (input) or read (changelog, `twinguard sql`).
    owned: Mutex<Vec<i32>>,
    /// Version of the model scoring the events (none: twin behaviour only).
    pub model_version: Mutex<Option<String>>,
    /// The event schema read (`name/vN`).
    pub schema_id: Mutex<String>,
    /// Last turn of the core loop (ms since the epoch; 0 = not started).
    pub heartbeat_ms: AtomicI64,
    /// How long the core loop may go without a turn before `/healthz` fails (ms).
    pub stall_limit_ms: AtomicI64,
    /// Set when the pipeline stops on a fatal error.
    pub failed: Mutex<Option<String>>,
    /// Per stream worker: the gauges it set (combined into the fields above).
    workers: Mutex<BTreeMap<usize, WorkerGauges>>,
    /// SQL logins refused: a wrong password or unknown user (checked), or an
    /// address backed off after failed logins (not checked); see [`SqlLoginFailed`](crate::obs::events::SqlLoginFailed).
    pub sql_failed_logins: AtomicU64,
    pub sql_throttled_logins: AtomicU64,
    /// SQL view refreshes that failed (see [`SqlRefreshFailed`](crate::obs::events::SqlRefreshFailed)).
    pub sql_refresh_failures: AtomicU64,
    /// Last turn of the SQL view's refresher thread (ms since the epoch; 0 = none).
    pub sql_refresh_beat_ms: AtomicI64,
    /// How long the refresher may go without a turn before `/healthz` fails (ms).
    pub sql_refresh_limit_ms: AtomicI64,
    /// Last turn of the control thread (alerts and feedback; ms since the epoch;
    /// 0 = none). `/healthz` fails past `stall_limit_ms` without one.
    pub control_beat_ms: AtomicI64,
}

impl Metrics {
    pub fn dlq_by_reason(&self) -> Vec<(RejectCode, u64)> {
        RejectCode::ALL.iter().zip(&self.dlq_by_reason).map(|(c, n)| (*c, n.load(Relaxed))).filter(|(_, n)| *n > 0).collect()
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
    /// Change this thread's worker's gauges with `f`, then recompute from every
    /// worker's the instance gauge it touched with `combine` (only that one: the
    /// heartbeat is set on every turn of the core loop).
    fn worker_set(&self, f: impl FnOnce(&mut WorkerGauges), combine: impl FnOnce(&Self, &BTreeMap<usize, WorkerGauges>)) {
        let mut w = self.workers.lock().expect("workers lock");
        f(w.entry(WORKER.with(Cell::get)).or_default());
        combine(self, &w);
    }
    fn combine_ready(&self, w: &BTreeMap<usize, WorkerGauges>) {
        self.ready.store(i64::from(w.values().all(|g| g.ready)), Relaxed);
    }
    fn combine_beat(&self, w: &BTreeMap<usize, WorkerGauges>) {
        self.heartbeat_ms.store(w.values().map(|g| g.beat).min().unwrap_or(0), Relaxed);
    }
    /// An instance of `n` stream workers: not ready, and not beating, until each of them is.
    pub fn expect_workers(&self, n: usize) {
        let mut w = self.workers.lock().expect("workers lock");
        for id in 0..n {
            w.entry(id).or_default();
        }
        self.combine_ready(&w);
        self.combine_beat(&w);
    }
    /// The partitions this worker owns (input) or reads (changelog, `twinguard sql`).
    pub fn set_owned(&self, parts: Vec<i32>) {
        self.worker_set(
            |g| g.owned = parts,
            |m, w| {
                let owned: BTreeSet<i32> = w.values().flat_map(|g| g.owned.iter().copied()).collect();
                *m.owned.lock().expect("owned lock") = owned.into_iter().collect();
            },
        );
    }
    /// This worker's twins and their memory (`None`: unchanged).
    pub fn set_twins(&self, twins: usize, mem_bytes: Option<usize>) {
        self.worker_set(
            |g| {
                g.twins = twins as i64;
                if let Some(b) = mem_bytes {
                    g.mem = b as i64;
                }
            },
            |m, w| {
                m.twins.store(w.values().map(|g| g.twins).sum(), Relaxed);
                m.twin_mem_bytes.store(w.values().map(|g| g.mem).sum(), Relaxed);
            },
        );
    }
    /// This worker is ready (its partitions assigned and restored) or not.
    pub fn set_ready(&self, ready: bool) {
        self.worker_set(|g| g.ready = ready, Self::combine_ready);
    }
    /// This worker made progress now (liveness).
    pub fn beat(&self) {
        let now = chrono::Utc::now().timestamp_millis();
        self.worker_set(|g| g.beat = now, Self::combine_beat);
    }
    pub fn owned(&self) -> Vec<i32> {
        self.owned.lock().expect("owned lock").clone()
    }
    pub fn partitions_owned(&self) -> i64 {
        self.owned.lock().expect("owned lock").len() as i64
    }
    /// Replace this worker's per-partition lag figures.
    pub fn set_lag(&self, lag: BTreeMap<i32, i64>) {
        self.worker_set(
            |g| g.lag = lag,
            |m, w| *m.lag.lock().expect("lag lock") = w.values().flat_map(|g| g.lag.iter().map(|(p, l)| (*p, *l))).collect(),
        );
    }
    pub fn lag(&self) -> BTreeMap<i32, i64> {
        self.lag.lock().expect("lag lock").clone()
    }
    /// Healthy unless the pipeline failed or its core loop stalled.
    pub fn health(&self) -> Result<(), String> {
        if let Some(why) = self.failed.lock().expect("failed lock").clone() {
            return Err(why);
        }
        let now = chrono::Utc::now().timestamp_millis();
        let limit = self.stall_limit_ms.load(Relaxed);
        let threads = [
            ("the core loop", self.heartbeat_ms.load(Relaxed), limit),
            ("the control thread (alerts, feedback)", self.control_beat_ms.load(Relaxed), limit),
            ("the SQL view refresher", self.sql_refresh_beat_ms.load(Relaxed), self.sql_refresh_limit_ms.load(Relaxed)),
        ];
        for (what, beat, limit) in threads {
            let idle = now - beat;
            if beat > 0 && limit > 0 && idle > limit {
                return Err(format!("{what} has not turned for {} s", idle / 1000));
            }
        }
        Ok(())
    }
    pub fn record_response_ms(&self, ms: f64) {
        Instruments::get().response_time.record(ms / 1000.0, &[]);
        let mut v = self.response_ms.lock().expect("response lock");
        if v.len() == RESPONSE_SAMPLES {
            v.pop_front();
        }
        v.push_back(ms);
    }
    /// The recorded command response times (ms), oldest first.
    pub fn response_times(&self) -> Vec<f64> {
        self.response_ms.lock().expect("response lock").iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two stream workers set their own gauges; the instance's combine them.
    #[test]
    fn workers_gauges_combine() {
        let m = std::sync::Arc::new(Metrics::default());
        m.expect_workers(2);
        let on = |id: usize, f: fn(&Metrics)| {
            let m = m.clone();
            std::thread::spawn(move || {
                set_worker(id);
                f(&m);
            })
            .join()
            .unwrap();
        };
        on(0, |m| {
            m.set_owned(vec![0, 2]);
            m.set_twins(10, Some(1000));
            m.set_ready(true);
            m.set_lag(BTreeMap::from([(0, 5), (2, 1)]));
        });
        assert_eq!(m.ready.load(Relaxed), 0, "not ready while worker 1 is not");
        on(1, |m| {
            m.set_owned(vec![1, 3]);
            m.set_twins(7, Some(700));
            m.set_ready(true);
            m.set_lag(BTreeMap::from([(1, 2)]));
        });
        assert_eq!(m.ready.load(Relaxed), 1);
        assert_eq!(m.owned(), vec![0, 1, 2, 3]);
        assert_eq!((m.twins.load(Relaxed), m.twin_mem_bytes.load(Relaxed)), (17, 1700));
        assert_eq!(m.lag(), BTreeMap::from([(0, 5), (1, 2), (2, 1)]));
        // The oldest heartbeat counts: a stalled worker is not hidden by a busy one.
        on(0, |m| m.beat());
        assert_eq!(m.heartbeat_ms.load(Relaxed), 0, "worker 1 has not turned yet");
        on(1, |m| m.beat());
        assert!(m.heartbeat_ms.load(Relaxed) > 0);
        on(1, |m| m.set_owned(vec![]));
        assert_eq!(m.owned(), vec![0, 2]);
    }
}
