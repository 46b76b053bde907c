//! Field-name constants shared by every schema and encoder. Use these, never literals.

/// JSON key and Arrow column holding the device identity (the Kafka key).
pub const DEVICE_ID: &str = "device_id";
/// JSON key and Arrow column holding the event time.
pub const EVENT_TIME: &str = "event_time";
/// Optional JSON key naming the schema an event claims (`name/vN`).
pub const SCHEMA: &str = "schema";
/// Arrow metadata column: source partition of the record.
pub const SRC_PARTITION: &str = "_partition";
/// Arrow metadata column: source offset of the record.
pub const SRC_OFFSET: &str = "_offset";

/// Verdict columns.
pub const SCORE: &str = "score";
pub const DISTANCE: &str = "distance";
pub const ANOMALOUS: &str = "anomalous";
pub const WARMING_UP: &str = "warming_up";
pub const TOP_METRIC: &str = "top_metric";
pub const TOP_Z: &str = "top_z";
pub const DRIFT: &str = "identity_drift";
pub const LABEL: &str = "label";

/// Dead-letter headers (the record value is the original bytes, unchanged).
pub const DLQ_REASON: &str = "twinguard.dlq.reason";
pub const DLQ_CODE: &str = "twinguard.dlq.code";
pub const DLQ_TOPIC: &str = "twinguard.dlq.topic";
pub const DLQ_PARTITION: &str = "twinguard.dlq.partition";
pub const DLQ_OFFSET: &str = "twinguard.dlq.offset";
pub const DLQ_SCHEMA: &str = "twinguard.dlq.schema";
pub const DLQ_TRUNCATED: &str = "twinguard.dlq.truncated";
/// Set (to the original key length) when the dead letter's key was truncated.
pub const DLQ_TRUNCATED_KEY: &str = "twinguard.dlq.truncated_key";

/// Maximum length of a device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 128;
