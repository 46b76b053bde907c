//! The OpenTelemetry instruments recorded where the work happens: histograms and
//! labelled counters (the counters and gauges that mirror [`crate::obs::Metrics`]
//! are registered by [`crate::obs::export::observe`]).

use std::sync::OnceLock;

use opentelemetry::metrics::{Counter, Histogram, Meter};

/// Instruments recorded on the hot path. Until [`init`](crate::obs::export::init) installs a provider they are
/// no-ops (unit tests, the demo), so recording is always safe and cheap.
#[derive(Debug, Clone)]
pub struct Instruments {
    pub batch_records: Histogram<u64>,
    pub operator_latency: Histogram<f64>,
    pub e2e_latency: Histogram<f64>,
    pub response_time: Histogram<f64>,
    pub response_in_pipeline: Histogram<f64>,
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
            response_in_pipeline: m
                .f64_histogram("twinguard.response.in_pipeline")
                .with_unit("s")
                .with_description("Event consumed by the pipeline -> its command acknowledged by the broker (the response time less the producer's, the broker's and the fetch's wait before it)")
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
                .with_description("Distribution of scores per model (ensemble, rf, svm, lstm, twin, gbdt)")
                .with_boundaries(vec![-1.0, 0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0])
                .build(),
            verdicts: m.u64_counter("twinguard.verdicts").with_description("Verdicts by class (benign, anomaly, or the attack class)").build(),
            alerts: m.u64_counter("twinguard.alerts").with_description("Alerts by attack class").build(),
            commands: m.u64_counter("twinguard.commands").with_description("Response commands by action").build(),
        }
    }

    /// The process-wide instruments (from the global meter provider, no-ops until
    /// [`init`](crate::obs::export::init) ran).
    pub fn get() -> &'static Instruments {
        static I: OnceLock<Instruments> = OnceLock::new();
        I.get_or_init(|| Instruments::new(&opentelemetry::global::meter("twinguard")))
    }
}
