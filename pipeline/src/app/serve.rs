//! Wires a long-running process (`twinguard run`, `twinguard sql`): telemetry, the
//! HTTP probes and metrics, the SQL view and its endpoint, and the `status` row.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::obs::export::{self, Telemetry};
use crate::obs::http;
use crate::sql::view::{SqlView, StatusFn, StatusRow};
use crate::obs::Metrics;
use crate::PipelineError;

/// Which process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A pipeline instance: its own partitions.
    Pipeline,
    /// `twinguard sql`: every twin, from the changelog.
    Global,
}

/// Register the metrics, bind `/metrics` and (when `sql_listen` is set) the SQL
/// endpoint with its view refresher; returns that view (the bound addresses are
/// logged). Runs on the Tokio runtime `telemetry` lives on.
pub async fn start(cfg: &Config, telemetry: &Telemetry, metrics: &Arc<Metrics>, mode: Mode, sql_listen: Option<&str>, stop: &Arc<AtomicBool>) -> Result<Option<Arc<SqlView>>, PipelineError> {
    export::observe(cfg, metrics);
    if !cfg.http.listen.is_empty() {
        http::serve_http(&cfg.http.listen, telemetry.registry.clone(), metrics.clone()).await?;
    }
    let Some(listen) = sql_listen else { return Ok(None) };
    let users = cfg.sql_users()?;
    let view = SqlView::new(cfg.sql.recent_rows);
    spawn_sql(cfg.sql.clone(), listen.to_string(), users, view.clone(), metrics.clone())?;
    view.spawn_refresher(Duration::from_millis(cfg.sql.refresh_ms), status_fn(mode, metrics.clone()), metrics.clone(), stop.clone())
        .map_err(|e| PipelineError::io("starting the SQL view refresher", e))?;
    Ok(Some(view))
}

/// Serve SQL on a Tokio runtime of its own: queries, however heavy, never starve
/// the probes, metrics and OTLP export on the process's main runtime.
fn spawn_sql(cfg: crate::config::SqlConfig, listen: String, users: Vec<(String, String)>, view: Arc<SqlView>, metrics: Arc<Metrics>) -> Result<std::net::SocketAddr, PipelineError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("tg-sql".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("tg-sql-worker").enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(PipelineError::io("SQL runtime", e)));
                    return;
                }
            };
            rt.block_on(async move {
                let bound = crate::sql::server::serve(&cfg, &listen, &users, view, metrics).await;
                let serving = bound.is_ok();
                let _ = tx.send(bound);
                if serving {
                    std::future::pending::<()>().await;
                }
            });
        })
        .map_err(|e| PipelineError::io("starting the SQL thread", e))?;
    rx.recv().map_err(|_| PipelineError::Internal("the SQL endpoint thread ended before it answered".into()))?
}

/// Records per second over the last ~10 s of status samples.
struct Rate(VecDeque<(Instant, u64)>);

impl Rate {
    fn sample(&mut self, n: u64) -> f64 {
        let now = Instant::now();
        self.0.push_back((now, n));
        while self.0.len() > 2 && self.0.front().is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(10)) {
            self.0.pop_front();
        }
        match self.0.front() {
            Some((t, first)) if now.duration_since(*t) > Duration::from_millis(100) => (n.saturating_sub(*first)) as f64 / now.duration_since(*t).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// The `status` row, read from the process's metrics at every refresh.
pub fn status_fn(mode: Mode, m: Arc<Metrics>) -> StatusFn {
    let instance = format!("{}:{}", hostname(), std::process::id());
    let started_ms = chrono::Utc::now().timestamp_millis();
    let rate = Mutex::new(Rate(VecDeque::new()));
    Box::new(move || {
        let lag = m.lag();
        let gate = m.gate.lock().expect("gate status lock").clone();
        // What this process consumes: input events, or (global) changelog records.
        let records_in = if mode == Mode::Global { m.changelog_in.load(Relaxed) } else { m.records_in.load(Relaxed) };
        let mut response = m.response_times();
        let p99 = (!response.is_empty()).then(|| {
            // Every refresh: a selection, not a sort, of up to 100,000 samples.
            let k = ((response.len() - 1) as f64 * 0.99).round() as usize;
            *response.select_nth_unstable_by(k, f64::total_cmp).1
        });
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        StatusRow {
            instance: instance.clone(),
            mode: match mode {
                Mode::Pipeline => "pipeline".into(),
                Mode::Global => "global".into(),
            },
            started_ms,
            ready: m.ready.load(Relaxed) == 1,
            partitions: m.owned().iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            lag: (!lag.is_empty()).then(|| lag.values().sum()),
            lag_by_partition: serde_json::to_string(&lag.iter().map(|(p, l)| (p.to_string(), *l)).collect::<std::collections::BTreeMap<_, _>>()).expect("lag serialises"),
            records_in: i(records_in),
            records_per_s: rate.lock().expect("rate lock").sample(records_in),
            verdicts_out: i(m.verdicts_out.load(Relaxed)),
            anomalies: i(m.anomalies.load(Relaxed)),
            alerts_out: i(m.alerts_out.load(Relaxed)),
            commands_out: i(m.commands_out.load(Relaxed)),
            dead_letters: i(m.dlq_out.load(Relaxed)),
            twins: m.twins.load(Relaxed),
            twin_mem_bytes: m.twin_mem_bytes.load(Relaxed),
            schema: m.schema_id.lock().expect("info lock").clone(),
            model_version: m.model_version.lock().expect("info lock").clone(),
            gate_suspended: gate.suspended,
            live_precision: gate.acting.precision,
            live_detection_rate: gate.acting.detection_rate,
            live_fpr: gate.acting.fpr,
            feedback_labels: i(gate.labels as u64),
            response_ms_p99: p99,
        }
    })
}

fn hostname() -> String {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string())).unwrap_or_else(|| "localhost".into())
}
