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
pub mod encode;
pub mod event;
pub mod fields;
pub mod verdict;

pub use decode::{DecodeLimits, DecodeOutput, Decoder, RawRecord, Reject, RejectCode};
pub use event::{EventSchema, FieldDef, FieldKind, Role, Transform};

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
mod tests;
