//! The tables SQL clients query: immutable Arrow snapshots of the twins, the recent
//! verdicts, alerts and commands, and the pipeline's status.
//!
//! The stream never waits for a query and a query never waits for the stream: the
//! core loop hands its changes over ([`SqlView::push_batch`], a short
//! lock on a staging area), a refresher thread folds them into its own copy every
//! `sql.refresh_ms` and publishes a new [`Tables`] behind an `Arc`; a query takes
//! that `Arc` and reads it for as long as it likes. The same view serves a running
//! instance (its own partitions) and `twinguard sql` (every twin, rebuilt from the
//! changelog topic): both feed it the same typed records.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMillisecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use twinguard_operators::{ChangelogRecord, Twin};
use twinguard_schemas::respond::{Alert, Command};
use twinguard_schemas::verdict::Verdict;
use twinguard_schemas::{EventSchema, Role};

use crate::config::Config;
use crate::engine::StateObserver;
use crate::obs::events::{RefreshLimitSet, SqlRefreshFailed, SqlSnapshotPublished, SqlViewTurned, TwinRowUndecodable};
use crate::obs::Metrics;
use crate::PipelineError;

/// The view as the engine's [`StateObserver`]: batches, restored twins and dropped
/// partitions go to the view's staging area; changelog bytes become rows on the
/// view's refresher thread, not the engine's.
pub struct ViewFeed {
    view: Arc<SqlView>,
    rows: Arc<RowMaker>,
}

impl ViewFeed {
    /// A feed into `view` for the pipeline `cfg` describes (its event schema, and
    /// `sql.expose_phi`).
    pub fn for_config(view: Arc<SqlView>, cfg: &Config) -> Result<Arc<dyn StateObserver>, PipelineError> {
        let schema = cfg.event_schema()?;
        Ok(Arc::new(ViewFeed { view, rows: Arc::new(RowMaker::new(&schema, cfg.sql.expose_phi)) }))
    }
}

impl StateObserver for ViewFeed {
    fn batch(&self, consumed: Option<Instant>, verdicts: &[Verdict], alerts: &[Alert], commands: &[Command], twins: &[ChangelogRecord]) {
        let twins = twins
            .iter()
            .map(|c| {
                let staged = c.value.as_ref().map(|bytes| StagedTwin::Encoded { partition: c.partition, bytes: bytes.clone(), rows: self.rows.clone() });
                (c.key.clone(), staged)
            })
            .collect();
        self.view.push_batch(consumed, verdicts, alerts, commands, twins);
    }

    fn restored(&self, twins: &[&Twin]) {
        self.view.push_twins(None, twins.iter().map(|t| (t.device_id.to_string(), Some(self.rows.row(t).into()))).collect());
    }

    fn partition_dropped(&self, partition: i32) {
        self.view.drop_partition(partition);
    }
}

/// Changes handed over by the stream since the last refresh.
#[derive(Default)]
struct Staged {
    twins: HashMap<String, Option<StagedTwin>>,
    dropped_partitions: Vec<i32>,
    verdicts: Vec<Verdict>,
    alerts: Vec<Alert>,
    commands: Vec<Command>,
    /// When the oldest staged change was consumed from Kafka.
    oldest: Option<Instant>,
}

/// Supplies the `status` row at every refresh.
pub type StatusFn = Box<dyn Fn() -> StatusRow + Send + Sync>;

/// The shared view: staging area (written by the stream) and the published snapshot
/// (read by queries).
pub struct SqlView {
    staged: Mutex<Staged>,
    published: RwLock<Arc<Tables>>,
    recent_rows: usize,
    /// Publications so far (tests wait on it).
    generation: std::sync::atomic::AtomicU64,
    /// For the last [`FRESHNESS_SAMPLES`] publications that carried changes: their
    /// oldest change's consumption to publication, in ms.
    freshness: Mutex<VecDeque<f64>>,
    /// Rows of the published `twins` table, and the bytes of its Arrow buffers.
    twins_rows: std::sync::atomic::AtomicU64,
    twins_bytes: std::sync::atomic::AtomicU64,
}

/// Freshness figures kept for [`SqlView::freshness_ms`].
const FRESHNESS_SAMPLES: usize = 10_000;

impl std::fmt::Debug for SqlView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlView").field("recent_rows", &self.recent_rows).finish_non_exhaustive()
    }
}

impl SqlView {
    pub fn new(recent_rows: usize) -> Arc<SqlView> {
        let empty = |t: Table| vec![RecordBatch::new_empty(t.schema())];
        Arc::new(SqlView {
            staged: Mutex::new(Staged::default()),
            published: RwLock::new(Arc::new(Tables {
                twins: empty(Table::Twins),
                verdicts: empty(Table::Verdicts),
                alerts: empty(Table::Alerts),
                commands: empty(Table::Commands),
                status: empty(Table::Status),
                published_ms: 0,
            })),
            recent_rows: recent_rows.max(1),
            generation: Default::default(),
            freshness: Mutex::new(VecDeque::new()),
            twins_rows: Default::default(),
            twins_bytes: Default::default(),
        })
    }

    /// The current snapshot (a pointer copy; never waits for the stream).
    pub fn snapshot(&self) -> Arc<Tables> {
        self.published.read().expect("snapshot lock").clone()
    }

    /// Recent freshness figures (ms, oldest first): for each publication that carried
    /// changes, its oldest change's consumption from Kafka until it was visible.
    pub fn freshness_ms(&self) -> Vec<f64> {
        self.freshness.lock().expect("freshness lock").iter().copied().collect()
    }

    /// Rows of the `twins` table as last published.
    pub fn twins_rows(&self) -> u64 {
        self.twins_rows.load(Ordering::Relaxed)
    }

    /// Bytes of the `twins` table's Arrow buffers as last published: the view's
    /// memory for the fleet (each twin is held once, in these buffers; changes
    /// waiting for the next refresh come on top).
    pub fn twins_bytes(&self) -> u64 {
        self.twins_bytes.load(Ordering::Relaxed)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn stage(&self, consumed: Option<Instant>, f: impl FnOnce(&mut Staged)) {
        let mut s = self.staged.lock().expect("staging lock");
        f(&mut s);
        if let Some(c) = consumed {
            s.oldest = Some(s.oldest.map_or(c, |o| o.min(c)));
        }
    }

    /// New or changed twins (`None` = the twin is gone).
    pub fn push_twins(&self, consumed: Option<Instant>, rows: Vec<(String, Option<StagedTwin>)>) {
        self.push_batch(consumed, &[], &[], &[], rows);
    }

    /// This instance no longer owns `partition`: its twins leave the view.
    pub fn drop_partition(&self, partition: i32) {
        self.stage(None, |s| {
            s.twins.retain(|_, r| r.as_ref().is_none_or(|r| r.partition() != partition));
            s.dropped_partitions.push(partition);
        });
    }

    /// One batch's outputs and twin changes, staged together: no snapshot shows
    /// part of a batch.
    pub fn push_batch(&self, consumed: Option<Instant>, verdicts: &[Verdict], alerts: &[Alert], commands: &[Command], twins: Vec<(String, Option<StagedTwin>)>) {
        if verdicts.is_empty() && alerts.is_empty() && commands.is_empty() && twins.is_empty() {
            return;
        }
        let cap = self.recent_rows;
        self.stage(consumed, |s| {
            s.twins.extend(twins);
            // Only the newest `cap` of each can survive the next refresh anyway.
            fn keep<T>(v: &mut Vec<T>, cap: usize) {
                if v.len() > cap {
                    v.drain(..v.len() - cap);
                }
            }
            s.verdicts.extend(verdicts.iter().rev().take(cap).rev().cloned());
            keep(&mut s.verdicts, cap);
            s.alerts.extend_from_slice(alerts);
            keep(&mut s.alerts, cap);
            s.commands.extend_from_slice(commands);
            keep(&mut s.commands, cap);
        });
    }

    /// Run the refresher on a thread of its own until `stop`: every `every`, fold the
    /// staged changes in and publish a new snapshot. A refresh that fails (panics) is
    /// reported ([`SqlRefreshFailed`]) and the next one tries again; each turn is a
    /// heartbeat in `metrics`, so `/healthz` fails if the thread stops turning.
    pub fn spawn_refresher(self: &Arc<Self>, every: Duration, status: StatusFn, metrics: Arc<Metrics>, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let view = self.clone();
        // A refresh of a large fleet takes a while: generous, but bounded.
        let limit = (every * 20).max(Duration::from_secs(60));
        RefreshLimitSet { millis: i64::try_from(limit.as_millis()).unwrap_or(i64::MAX) }.emit(&metrics);
        let beat = |m: &Metrics| SqlViewTurned.emit(m);
        beat(&metrics);
        std::thread::Builder::new().name("tg-sql-view".into()).spawn(move || {
            let mut r = Refresher::new(view.recent_rows);
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                view.refresh_reported(&mut r, &status, &metrics);
                beat(&metrics);
                std::thread::sleep(every.saturating_sub(started.elapsed()));
            }
        })
    }

    /// One refresh; a panic in it is caught and reported instead of ending the
    /// thread (the refresher's state stays usable: the tables are rebuilt whole).
    fn refresh_reported(&self, r: &mut Refresher, status: &StatusFn, metrics: &Metrics) {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.refresh(r, status))) {
            let error = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("panic");
            SqlRefreshFailed { error }.emit(metrics);
        }
    }

    fn refresh(&self, r: &mut Refresher, status: &StatusFn) {
        let staged = std::mem::take(&mut *self.staged.lock().expect("staging lock"));
        let prev = self.snapshot();
        let mut next = (*prev).clone();
        let now = chrono::Utc::now().timestamp_millis();
        if !staged.dropped_partitions.is_empty() || !staged.twins.is_empty() {
            for p in &staged.dropped_partitions {
                r.pending.retain(|_, t| t.as_ref().is_none_or(|t| t.partition != *p));
                r.twins.drop_partition(*p);
            }
            for (k, change) in staged.twins {
                // A tombstone, or a change that does not decode (logged in
                // `into_row`: better no row than a stale one), removes the row.
                let row = change.and_then(|t| t.into_row(&k));
                r.pending.insert(k, row);
            }
            r.twins_changed = true;
        }
        if !r.pending.is_empty() {
            // Taken only once folded in: a refresh that fails keeps them for the next.
            r.twins.apply(&r.pending);
            r.pending.clear();
        }
        // Still set if the last refresh failed after changing the rows.
        if r.twins_changed {
            next.twins = r.twins.batches();
            self.twins_rows.store(r.twins.rows() as u64, Ordering::Relaxed);
            self.twins_bytes.store(r.twins.mem_bytes() as u64, Ordering::Relaxed);
        }
        let cap = self.recent_rows;
        fn trim<T>(q: &mut VecDeque<T>, cap: usize) {
            while q.len() > cap {
                q.pop_front();
            }
        }
        if !staged.verdicts.is_empty() {
            r.verdicts.extend(staged.verdicts);
            trim(&mut r.verdicts, cap);
            next.verdicts = vec![verdicts_batch(&r.verdicts)];
        }
        if !staged.alerts.is_empty() {
            r.alerts.extend(staged.alerts);
            trim(&mut r.alerts, cap);
            next.alerts = vec![alerts_batch(&r.alerts)];
        }
        if !staged.commands.is_empty() {
            r.commands.extend(staged.commands);
            trim(&mut r.commands, cap);
            next.commands = vec![commands_batch(&r.commands)];
        }
        next.status = vec![status_batch(&status(), now)];
        next.published_ms = now;
        *self.published.write().expect("snapshot lock") = Arc::new(next);
        r.twins_changed = false;
        if let Some(o) = staged.oldest {
            let age = o.elapsed();
            SqlSnapshotPublished { age }.emit();
            let mut f = self.freshness.lock().expect("freshness lock");
            if f.len() == FRESHNESS_SAMPLES {
                f.pop_front();
            }
            f.push_back(age.as_secs_f64() * 1000.0);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// The refresher's own state (only its thread touches it).
struct Refresher {
    /// The `twins` table itself: the published batches are these chunks (shared, not
    /// copied), so a twin is held once, as Arrow columns.
    twins: TwinChunks,
    /// Row changes taken from staging and not yet folded into `twins`.
    pending: BTreeMap<String, Option<TwinRow>>,
    /// The rows changed since the `twins` table was last published.
    twins_changed: bool,
    verdicts: VecDeque<Verdict>,
    alerts: VecDeque<Alert>,
    commands: VecDeque<Command>,
}

impl Refresher {
    fn new(cap: usize) -> Self {
        let c = cap.min(1 << 16);
        Refresher {
            twins: TwinChunks::new(TWINS_BATCH_ROWS, TWINS_BATCH_BYTES),
            pending: BTreeMap::new(),
            twins_changed: false,
            verdicts: VecDeque::with_capacity(c),
            alerts: VecDeque::new(),
            commands: VecDeque::new(),
        }
    }
}

/// A table of the view for DataFusion: every scan reads the snapshot current at
/// planning time.
#[derive(Debug)]
pub struct ViewTable {
    pub view: Arc<SqlView>,
    pub table: Table,
    schema: SchemaRef,
}

impl ViewTable {
    pub fn new(view: Arc<SqlView>, table: Table) -> Self {
        ViewTable { view, table, schema: table.schema() }
    }
}

#[async_trait::async_trait]
impl datafusion::catalog::TableProvider for ViewTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn table_type(&self) -> datafusion::logical_expr::TableType {
        datafusion::logical_expr::TableType::Base
    }
    async fn scan(
        &self,
        _state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        _filters: &[datafusion::logical_expr::Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        let snap = self.view.snapshot();
        let batches = match self.table {
            Table::Twins => &snap.twins,
            Table::Verdicts => &snap.verdicts,
            Table::Alerts => &snap.alerts,
            Table::Commands => &snap.commands,
            Table::Status => &snap.status,
        };
        Ok(datafusion::catalog::memory::MemorySourceConfig::try_new_exec(&[batches.clone()], self.schema.clone(), projection.cloned())?)
    }
}

mod chunks;
mod rows;
mod tables;

use chunks::*;
pub use rows::*;
pub use tables::*;

#[cfg(test)]
mod tests;
