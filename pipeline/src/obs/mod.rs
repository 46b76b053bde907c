//! Internal observability (the pipeline's own health, not the devices' telemetry):
//! typed events ([`events`]) are the route to logs and metrics; [`Metrics`] holds
//! the instance's counters and gauges, [`Instruments`] its histograms and labelled
//! counters; [`export`] sets up OpenTelemetry (a Prometheus reader always, OTLP
//! when `otel.endpoint` is set; spans `batch`, `decode`, `detect`, `respond` through
//! tracing-opentelemetry) and the log subscriber; [`http`] serves `/metrics`,
//! `/healthz` and `/readyz`.
//!
//! Imports: `config` only (and the operators' and schemas' types).

pub mod events;
pub mod export;
pub mod http;
pub mod instruments;
pub mod metrics;

pub use instruments::Instruments;
pub use metrics::{set_worker, Metrics};
