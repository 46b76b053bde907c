//! Export: the OpenTelemetry meter and tracer providers (a Prometheus reader
//! always, OTLP when `otel.endpoint` is set), the log subscriber, and the
//! observable counters and gauges over [`Metrics`].

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

use crate::config::{Config, OtelConfig};
use crate::obs::Metrics;
use crate::PipelineError;

/// What [`init`] set up; shut it down before the runtime goes.
pub struct Telemetry {
    pub registry: prometheus::Registry,
    meters: SdkMeterProvider,
    tracer: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flush and stop the exporters.
    pub fn shutdown(&self) {
        if let Some(tp) = &self.tracer {
            if let Err(e) = tp.shutdown_with_timeout(Duration::from_secs(5)) {
                tracing::warn!(error = %e, "trace export shutdown");
            }
        }
        if let Err(e) = self.meters.shutdown_with_timeout(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "metrics export shutdown");
        }
    }
}

/// Logs (and, with an OTLP endpoint, traces) for `default_filter` unless RUST_LOG
/// says otherwise. `TWINGUARD_LOG_FORMAT=json` writes one JSON object per line.
/// Every command logs through here; the long-running ones through [`init`].
pub fn init_logs(default_filter: &str, tracer: Option<&SdkTracerProvider>) -> Result<(), PipelineError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let json = std::env::var("TWINGUARD_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // RUST_LOG filters the log lines only; spans go to OTLP at info level whatever it says.
    let fmt = if json {
        tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_filter(filter).boxed()
    } else {
        tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr).with_filter(filter).boxed()
    };
    // The exporter's own gRPC stack must not feed spans back into itself.
    let otel = tracer.map(|tp| {
        tracing_opentelemetry::layer()
            .with_tracer(tp.tracer("twinguard"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                !["h2", "tonic", "hyper", "tower", "opentelemetry"].iter().any(|p| m.target().starts_with(p))
            }))
    });
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| PipelineError::io("installing the log subscriber", e))
}

/// Install the meter (and tracer) providers and the log subscriber. Must run inside
/// the Tokio runtime that outlives the returned [`Telemetry`] (the OTLP exporters'
/// channels live on it).
pub fn init(cfg: &OtelConfig, default_filter: &str) -> Result<Telemetry, PipelineError> {
    let resource = Resource::builder().with_service_name(cfg.service_name.clone()).build();
    let registry = prometheus::Registry::new();
    let prom = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()
        .map_err(|e| PipelineError::io("prometheus exporter", e))?;
    let mut builder = SdkMeterProvider::builder().with_resource(resource.clone()).with_reader(prom);
    let mut tracer = None;
    if let Some(endpoint) = &cfg.endpoint {
        let err = |what: &str, e: &dyn std::fmt::Display| PipelineError::config("otel.endpoint", format!("{endpoint}: {what}: {e}"));
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| err("metrics exporter", &e))?;
        builder = builder.with_reader(PeriodicReader::builder(exporter).with_interval(Duration::from_millis(cfg.export_interval_ms)).build());
        if cfg.traces {
            let spans = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint.clone()).build().map_err(|e| err("span exporter", &e))?;
            tracer = Some(SdkTracerProvider::builder().with_resource(resource).with_batch_exporter(spans).build());
        }
    }
    let meters = builder.build();
    opentelemetry::global::set_meter_provider(meters.clone());
    init_logs(default_filter, tracer.as_ref())?;
    if let Some(e) = &cfg.endpoint {
        tracing::info!(endpoint = %e, traces = cfg.traces, "exporting OpenTelemetry over OTLP");
    }
    Ok(Telemetry { registry, meters, tracer })
}

/// A topic and the counter of records read from or written to it.
type TopicCount = (String, fn(&Metrics) -> u64);

/// Register the gauges and counters that observe `metrics` (topic names from `cfg`).
/// Call once per process, after [`init`].
pub fn observe(cfg: &Config, metrics: &Arc<Metrics>) {
    let m = opentelemetry::global::meter("twinguard");
    let t = &cfg.topics;
    let inputs: Vec<TopicCount> = vec![
        (t.input.clone(), |m| m.records_in.load(Relaxed)),
        (t.acks.clone(), |m| m.acks_in.load(Relaxed)),
        (t.feedback.clone(), |m| m.feedback_in.load(Relaxed)),
        (t.changelog.clone(), |m| m.changelog_in.load(Relaxed)),
    ];
    let outputs: Vec<TopicCount> = vec![
        (t.verdicts.clone(), |m| m.verdicts_out.load(Relaxed)),
        (t.alerts.clone(), |m| m.alerts_out.load(Relaxed)),
        (t.commands.clone(), |m| m.commands_out.load(Relaxed)),
        (t.audit.clone(), |m| m.audit_out.load(Relaxed)),
        (t.changelog.clone(), |m| m.changelog_out.load(Relaxed)),
        (t.dlq.clone(), |m| m.dlq_out.load(Relaxed)),
    ];
    let per_topic = |name: &'static str, desc: &'static str, list: Vec<TopicCount>| {
        let mx = metrics.clone();
        m.u64_observable_counter(name)
            .with_description(desc)
            .with_callback(move |o| {
                for (topic, f) in &list {
                    o.observe(f(&mx), &[KeyValue::new("topic", topic.clone())]);
                }
            })
            .build();
    };
    per_topic("twinguard.records.in", "Records consumed, per topic", inputs);
    per_topic("twinguard.records.out", "Records produced, per topic", outputs);
    let mx = metrics.clone();
    m.u64_observable_counter("twinguard.dlq")
        .with_description("Records sent to the dead-letter topic, per reason")
        .with_callback(move |o| {
            for (code, n) in mx.dlq_by_reason() {
                o.observe(n, &[KeyValue::new("reason", code.as_str())]);
            }
            o.observe(mx.control_rejected.load(Relaxed), &[KeyValue::new("reason", "invalid_control_record")]);
        })
        .build();
    let mx = metrics.clone();
    m.u64_observable_counter("twinguard.input.gap.records")
        .with_description("Input offsets never delivered: between a resumed partition's committed offset and the first record fetched there (retention, compaction, a broker fault; transaction markers and aborted records with transactional producers)")
        .with_callback(move |o| o.observe(mx.input_gap_records.load(Relaxed), &[]))
        .build();
    let counters: [(&'static str, &'static str, fn(&Metrics) -> u64); 11] = [
        ("twinguard.rejoins", "Times this process rejoined its consumer group after its assignment was lost (evicted: a paused process or broker, a session timeout)", |m| m.rejoins.load(Relaxed)),
        ("twinguard.audit.unchained", "Audit records not written because their chain had no head (logged as errors)", |m| m.audit_unchained.load(Relaxed)),
        ("twinguard.control.gap.records", "Acks-topic offsets never delivered (a record arrived past the offset expected next)", |m| m.control_gap_records.load(Relaxed)),
        ("twinguard.offsets.rewound", "Times records arrived below the offset expected next on their partition (offset reset or seek)", |m| m.offsets_rewound.load(Relaxed)),
        ("twinguard.twins.ahead_of_input", "Restored twins whose last offset is at or past their input partition's end (input topic recreated?)", |m| m.twins_ahead_of_input.load(Relaxed)),
        ("twinguard.replays.skipped", "Records skipped because their twins had already applied them (replays)", |m| m.replays_skipped.load(Relaxed)),
        ("twinguard.twin.resets", "Twins reset at an event because their device was idle past state.idle_ttl_secs", |m| m.twin_resets.load(Relaxed)),
        ("twinguard.twins.shed", "Twins that shed learned strings to fit state.max_twin_bytes", |m| m.twins_shed.load(Relaxed)),
        ("twinguard.expiry.capped", "Idle twins a sweep left for later (state.max_expiries_per_sweep)", |m| m.expiry_capped.load(Relaxed)),
        ("twinguard.changelog.quarantined", "Changelog records that could not be restored (dead-lettered by the pipeline; twinguard sql only counts them)", |m| m.changelog_quarantined.load(Relaxed)),
        ("twinguard.sql.records_skipped", "Changelog records `twinguard sql` could not read and skipped (nothing dead-lettered: the pipeline's restore quarantines them)", |m| m.fleet_records_skipped.load(Relaxed)),
    ];
    for (name, desc, f) in counters {
        let mx = metrics.clone();
        m.u64_observable_counter(name).with_description(desc).with_callback(move |o| o.observe(f(&mx), &[])).build();
    }
    let mx = metrics.clone();
    m.u64_observable_counter("twinguard.sql.failed_logins")
        .with_description("SQL logins refused: `password` (wrong password or unknown user, checked) or `throttled` (the address is backed off after failed logins; not checked)")
        .with_callback(move |o| {
            o.observe(mx.sql_failed_logins.load(Relaxed), &[KeyValue::new("reason", "password")]);
            o.observe(mx.sql_throttled_logins.load(Relaxed), &[KeyValue::new("reason", "throttled")]);
        })
        .build();
    let mx = metrics.clone();
    m.u64_observable_counter("twinguard.sql.refresh_failures")
        .with_description("SQL view refreshes that failed (the previous snapshot stays published)")
        .with_callback(move |o| o.observe(mx.sql_refresh_failures.load(Relaxed), &[]))
        .build();
    let mx = metrics.clone();
    m.i64_observable_gauge("twinguard.consumer.lag")
        .with_description("Records between the committed position and the end of each owned input partition")
        .with_callback(move |o| {
            for (p, lag) in mx.lag() {
                o.observe(lag, &[KeyValue::new("partition", i64::from(p))]);
            }
        })
        .build();
    let gauge = |name: &'static str, unit: &'static str, desc: &'static str, f: fn(&Metrics) -> i64| {
        let mx = metrics.clone();
        let b = m.i64_observable_gauge(name).with_description(desc).with_callback(move |o| o.observe(f(&mx), &[]));
        if unit.is_empty() { b.build() } else { b.with_unit(unit).build() };
    };
    gauge("twinguard.twins", "", "Digital twins held", |m| m.twins.load(Relaxed));
    gauge("twinguard.twin.memory", "By", "Approximate memory held by the twins", |m| m.twin_mem_bytes.load(Relaxed));
    gauge("twinguard.ready", "", "1 once partitions are assigned and their state restored", |m| m.ready.load(Relaxed));
    gauge("twinguard.gate.suspended", "", "1 while confidence gating suspends automated responses", |m| m.gate_suspended.load(Relaxed));
    gauge("twinguard.partitions", "", "Input partitions owned", |m| m.partitions_owned());
    let mx = metrics.clone();
    m.f64_observable_gauge("twinguard.gate.figures")
        .with_description("Live detection figures from analyst feedback (precision, detection_rate, fpr)")
        .with_callback(move |o| {
            let g = mx.gate.lock().expect("gate status lock").clone();
            for (k, v) in [("precision", g.acting.precision), ("detection_rate", g.acting.detection_rate), ("fpr", g.acting.fpr)] {
                if let Some(v) = v {
                    o.observe(v, &[KeyValue::new("figure", k)]);
                }
            }
        })
        .build();
}
