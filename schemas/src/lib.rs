//! Event, verdict and dead-letter contracts of twinguard.
//!
//! This crate owns everything that crosses a topic boundary: the versioned telemetry
//! schemas devices send ([`EventSchema`]), their Arrow form, the JSON decoder that
//! validates every record ([`Decoder`]), and the verdict/DLQ encodings downstream
//! consumers read.
//!
//! Architecture Invariant: this crate does no I/O beyond reading a schema file it is
//! handed, and knows nothing of Kafka, tokio or DataFusion.

pub mod decode;
mod decode_fast;
pub mod dlq;
pub mod encode;
pub mod event;
pub mod fields;
mod key_index;
/// Fuzz-target properties (`fuzz/`), replayed over the committed corpora by the tests.
#[cfg(any(test, fuzzing))]
pub mod fuzz_check;
pub mod respond;
pub mod testing;
pub mod verdict;

pub use decode::{DecodeLimits, DecodeOutput, Decoder, RawRecord, Reject, RejectCode};
pub use event::{EventSchema, FieldDef, FieldKind, LabelMap, Role, Transform};

/// Feature SQL shipped for the built-in schemas (`schemas/features/`): the default
/// vector, and named variants (`identity`: adds the twin's identity-drift feature).
const FEATURE_SQL: &[(&str, Option<&str>, &str)] = &[
    ("wustl-flow-vitals/v1", None, include_str!("../features/wustl-flow-vitals.v1.sql")),
    ("wustl-flow-vitals/v1", Some("identity"), include_str!("../features/wustl-flow-vitals.v1.identity.sql")),
    ("ciciomt-flow-window/v1", None, include_str!("../features/ciciomt-flow-window.v1.sql")),
];

/// The shipped feature SQL of a built-in schema (`variant` None = the default).
pub fn builtin_feature_sql(schema_id: &str, variant: Option<&str>) -> Option<&'static str> {
    FEATURE_SQL.iter().find(|(id, v, _)| *id == schema_id && *v == variant).map(|(_, _, sql)| *sql)
}

/// Errors of the schema crate. Every message names the offending input.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("unknown built-in schema `{0}` (built-in: {1})")]
    UnknownBuiltin(String, String),
    #[error("cannot read schema file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("invalid schema definition {origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
}

#[cfg(test)]
mod contract_tests;
#[cfg(test)]
mod tests;
