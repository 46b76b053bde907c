//! Observability: OpenTelemetry metrics and traces, the Prometheus `/metrics`
//! endpoint, `/healthz` and `/readyz`.
//!
//! One set of instruments: the SDK meter provider has a Prometheus reader (scraped
//! over HTTP, always on) and, when `otel.endpoint` is set, an OTLP reader pushing the
//! same figures. Counters and gauges observe [`Metrics`] (the pipeline's own atomic
//! counters, also used by its status line and the SQL `status` table); histograms
//! and labelled counters are recorded where the work happens ([`Instruments`]).
//! Spans (`batch`, `decode`, `detect`, `respond`) reach the OTLP endpoint through
//! tracing-opentelemetry.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram, Meter};
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
use crate::telemetry::Metrics;
use crate::PipelineError;

/// Instruments recorded on the hot path. Until [`init`] installs a provider they are
/// no-ops (unit tests, the demo), so recording is always safe and cheap.
#[derive(Debug, Clone)]
pub struct Instruments {
    pub batch_records: Histogram<u64>,
    pub operator_latency: Histogram<f64>,
    pub e2e_latency: Histogram<f64>,
    pub response_time: Histogram<f64>,
    pub score: Histogram<f64>,
    pub sql_freshness: Histogram<f64>,
    pub verdicts: Counter<u64>,
    pub alerts: Counter<u64>,
    pub commands: Counter<u64>,
}

impl Instruments {
    fn new(m: &Meter) -> Self {
        let secs = vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        Instruments {
            batch_records: m
                .u64_histogram("twinguard.batch.records")
                .with_description("Records per micro-batch")
                .with_boundaries(vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0])
                .build(),
            operator_latency: m
                .f64_histogram("twinguard.operator.latency")
                .with_unit("s")
                .with_description("Time an operator spent on one micro-batch (decode, detect, respond)")
                .with_boundaries(secs.clone())
                .build(),
            e2e_latency: m
                .f64_histogram("twinguard.e2e.latency")
                .with_unit("s")
                .with_description("Event appended to the input topic -> its verdict acknowledged by the broker (oldest event of each batch)")
                .with_boundaries(secs.clone())
                .build(),
            response_time: m
                .f64_histogram("twinguard.response.time")
                .with_unit("s")
                .with_description("Event appended to the input topic -> its command acknowledged by the broker")
                .with_boundaries(secs.clone())
                .build(),
            sql_freshness: m
                .f64_histogram("twinguard.sql.freshness")
                .with_unit("s")
                .with_description("A change consumed from Kafka -> visible to SQL queries (oldest change of each published snapshot)")
                .with_boundaries(secs)
                .build(),
            score: m
                .f64_histogram("twinguard.score")
                .with_description("Distribution of scores per model (ensemble, rf, svm, lstm, twin)")
                .with_boundaries(vec![-1.0, 0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0])
                .build(),
            verdicts: m.u64_counter("twinguard.verdicts").with_description("Verdicts by class (benign, anomaly, or the attack class)").build(),
            alerts: m.u64_counter("twinguard.alerts").with_description("Alerts by attack class").build(),
            commands: m.u64_counter("twinguard.commands").with_description("Response commands by action").build(),
        }
    }

    /// The process-wide instruments (from the global meter provider, no-ops until
    /// [`init`] ran).
    pub fn get() -> &'static Instruments {
        static I: OnceLock<Instruments> = OnceLock::new();
        I.get_or_init(|| Instruments::new(&opentelemetry::global::meter("twinguard")))
    }
}

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
        .map_err(|e| PipelineError::Io(format!("installing the log subscriber: {e}")))
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
        .map_err(|e| PipelineError::Io(format!("prometheus exporter: {e}")))?;
    let mut builder = SdkMeterProvider::builder().with_resource(resource.clone()).with_reader(prom);
    let mut tracer = None;
    if let Some(endpoint) = &cfg.endpoint {
        let err = |what: &str, e: &dyn std::fmt::Display| PipelineError::Config(format!("key `otel.endpoint` ({endpoint}): {what}: {e}"));
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
    let counters: [(&'static str, &'static str, fn(&Metrics) -> u64); 10] = [
        ("twinguard.rejoins", "Times this process rejoined its consumer group after its assignment was lost (evicted: a paused process or broker, a session timeout)", |m| m.rejoins.load(Relaxed)),
        ("twinguard.audit.unchained", "Audit records not written because their chain had no head (logged as errors)", |m| m.audit_unchained.load(Relaxed)),
        ("twinguard.control.gap.records", "Acks-topic offsets never delivered (a record arrived past the offset expected next)", |m| m.control_gap_records.load(Relaxed)),
        ("twinguard.offsets.rewound", "Times records arrived below the offset expected next on their partition (offset reset or seek)", |m| m.offsets_rewound.load(Relaxed)),
        ("twinguard.twins.ahead_of_input", "Restored twins whose last offset is at or past their input partition's end (input topic recreated?)", |m| m.twins_ahead_of_input.load(Relaxed)),
        ("twinguard.replays.skipped", "Records skipped because their twins had already applied them (replays)", |m| m.replays_skipped.load(Relaxed)),
        ("twinguard.twin.resets", "Twins reset at an event because their device was idle past state.idle_ttl_secs", |m| m.twin_resets.load(Relaxed)),
        ("twinguard.twins.shed", "Twins that shed learned strings to fit state.max_twin_bytes", |m| m.twins_shed.load(Relaxed)),
        ("twinguard.expiry.capped", "Idle twins a sweep left for later (state.max_expiries_per_sweep)", |m| m.expiry_capped.load(Relaxed)),
        ("twinguard.changelog.quarantined", "Changelog records that could not be restored (dead-lettered)", |m| m.changelog_quarantined.load(Relaxed)),
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

/// Bounds on the HTTP endpoint's clients (one process shares its file descriptors
/// and memory between the stream and this endpoint).
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// A request's headers must arrive within this (slowloris).
    pub header_read_timeout: Duration,
    /// A connection is closed after this, whatever it does (idle keep-alive included).
    pub connection_timeout: Duration,
    /// Connections served at once. At the limit, a new connection closes the
    /// oldest open one (a slow or idle client, since a probe's request takes
    /// milliseconds), so slow clients cannot starve `/healthz`.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits { header_read_timeout: Duration::from_secs(10), connection_timeout: Duration::from_secs(60), max_connections: 64 }
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `listen` until the runtime stops.
/// Returns the bound address (port 0 picks a free one).
pub async fn serve_http(listen: &str, registry: prometheus::Registry, metrics: Arc<Metrics>) -> Result<std::net::SocketAddr, PipelineError> {
    serve_http_with(listen, registry, metrics, HttpLimits::default()).await
}

/// [`serve_http`] with explicit limits.
pub async fn serve_http_with(listen: &str, registry: prometheus::Registry, metrics: Arc<Metrics>, limits: HttpLimits) -> Result<std::net::SocketAddr, PipelineError> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| PipelineError::Config(format!("key `http.listen` ({listen}): {e}")))?;
    let addr = listener.local_addr().map_err(|e| PipelineError::Io(e.to_string()))?;
    tracing::info!(%addr, max_connections = limits.max_connections, "serving /metrics, /healthz and /readyz");
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    // Open connections by age (ids ascend): at the limit the oldest is told to close.
    let open: Arc<Mutex<BTreeMap<u64, Arc<tokio::sync::Notify>>>> = Arc::default();
    tokio::spawn(async move {
        let mut next_id = 0u64;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // e.g. out of file descriptors: back off rather than spin.
                    tracing::warn!(error = %e, "HTTP endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let permit = match slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    // At the limit: close the oldest connection and take its slot. A
                    // slowloris or idle client is always older than a probe's
                    // millisecond request, so it goes first; a flood costs accepts.
                    let oldest = open.lock().expect("http conns lock").pop_first();
                    if let Some((_, close)) = oldest {
                        close.notify_one();
                    }
                    match tokio::time::timeout(Duration::from_secs(1), slots.clone().acquire_owned()).await {
                        Ok(Ok(p)) => p,
                        _ => {
                            tracing::debug!(%peer, "HTTP endpoint: connection limit reached; closed");
                            drop(stream);
                            continue;
                        }
                    }
                }
            };
            let id = next_id;
            next_id += 1;
            let close = Arc::new(tokio::sync::Notify::new());
            open.lock().expect("http conns lock").insert(id, close.clone());
            let (registry, metrics, open) = (registry.clone(), metrics.clone(), open.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (code, ctype, body) = respond_http(req.method(), req.uri().path(), &registry, &metrics);
                    async move {
                        hyper::Response::builder()
                            .status(code)
                            .header(hyper::header::CONTENT_TYPE, ctype)
                            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                // Dropping the connection future closes the socket.
                tokio::select! {
                    r = tokio::time::timeout(limits.connection_timeout, conn) => {
                        if r.is_err() {
                            tracing::debug!(%peer, "HTTP connection closed: connection timeout");
                        }
                    }
                    _ = close.notified() => tracing::debug!(%peer, "HTTP connection closed: the oldest, at the connection limit"),
                }
                open.lock().expect("http conns lock").remove(&id);
                drop(permit);
            });
        }
    });
    Ok(addr)
}

fn respond_http(method: &hyper::Method, path: &str, registry: &prometheus::Registry, m: &Metrics) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != hyper::Method::GET && method != hyper::Method::HEAD {
        return (405, TEXT, "only GET\n".into());
    }
    match path {
        "/metrics" => match prometheus::TextEncoder::new().encode_to_string(&registry.gather()) {
            Ok(text) => (200, prometheus::TEXT_FORMAT, text),
            Err(e) => (500, TEXT, format!("encoding metrics: {e}\n")),
        },
        "/healthz" => match m.health() {
            Ok(()) => (200, TEXT, "ok\n".into()),
            Err(why) => (503, TEXT, format!("unhealthy: {why}\n")),
        },
        "/readyz" => {
            if m.ready.load(Relaxed) == 1 {
                (200, TEXT, "ready\n".into())
            } else {
                (503, TEXT, "not ready: partitions not assigned or state not restored yet\n".into())
            }
        }
        _ => (404, TEXT, "not found: try /metrics, /healthz or /readyz\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    use super::*;

    fn get(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
        let mut s = TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    }

    /// The HTTP endpoint bounds its clients: a slowloris connection (one header byte
    /// a second) is closed at the header-read timeout, and with more slow
    /// connections open than it serves at once, the endpoint still answers a probe
    /// at once (the oldest connection is closed to make room), well before any
    /// timeout would free a slot.
    #[test]
    fn http_endpoint_closes_slowloris_and_answers_past_slow_connections() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let limits = HttpLimits { header_read_timeout: Duration::from_secs(2), connection_timeout: Duration::from_secs(30), max_connections: 8 };
        let addr = rt.block_on(serve_http_with("127.0.0.1:0", prometheus::Registry::new(), Arc::new(Metrics::default()), limits)).unwrap();
        assert_eq!(get(addr, "/healthz"), Some(200));

        // Slowloris: a header that never ends, one byte a second.
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.set_read_timeout(Some(Duration::from_millis(900))).unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut sent = 0;
        let closed = loop {
            let mut buf = [0u8; 256];
            match slow.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => break true, // an error response (408), then the close
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => break true,
            }
            if slow.write_all(b"X").is_err() {
                break true;
            }
            sent += 1;
            if Instant::now() > deadline {
                break false;
            }
        };
        assert!(closed, "the slowloris connection is still open after {sent} bytes");

        // More idle connections than slots, on an endpoint whose header timeout is
        // far away: each new connection past the limit closes the oldest, so the
        // endpoint answers at once and never holds more than its limit.
        let patient = HttpLimits { header_read_timeout: Duration::from_secs(300), connection_timeout: Duration::from_secs(300), max_connections: 8 };
        let addr = rt.block_on(serve_http_with("127.0.0.1:0", prometheus::Registry::new(), Arc::new(Metrics::default()), patient)).unwrap();
        let mut idle: Vec<TcpStream> = Vec::new();
        for _ in 0..patient.max_connections * 3 {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            idle.push(s);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(get(addr, "/healthz"), Some(200), "a probe past {} slow connections", idle.len());
        // The oldest were closed by the server; at most `max_connections` stay open.
        std::thread::sleep(Duration::from_millis(500));
        let still_open = idle
            .iter_mut()
            .filter(|s| {
                let s: &TcpStream = s;
                s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                let mut buf = [0u8; 64];
                matches!((&mut &*s).read(&mut buf), Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
            })
            .count();
        assert!(still_open <= patient.max_connections, "{still_open} slow connections still open, limit {}", patient.max_connections);
        assert!(still_open > 0, "the newest slow connections should still be served");
    }
}
