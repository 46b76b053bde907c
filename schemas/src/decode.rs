//! JSON → Arrow decoding with per-record validation.
//!
//! [`Decoder::decode`] MUST account for every input record exactly once: either as a
//! row of the output batch (in input order) or as a [`Reject`] naming the reason. It
//! never fails as a whole because of one bad record.

use arrow::array::{
    ArrayRef, Float64Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow::record_batch::RecordBatch;
use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::event::{EventSchema, FieldDef, FieldKind};
use crate::{fields, SchemaError};

/// One Kafka record as the decoder sees it.
#[derive(Debug, Clone, Copy)]
pub struct RawRecord<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
}

/// Validation limits.
#[derive(Debug, Clone)]
pub struct DecodeLimits {
    /// Records larger than this are rejected unread.
    pub max_record_bytes: usize,
    /// Earliest accepted event time (ms since the epoch).
    pub min_event_time_ms: i64,
    /// How far in the future of the processing clock an event time may be (ms).
    pub max_future_ms: i64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_record_bytes: 64 * 1024,
            min_event_time_ms: 946_684_800_000, // 2000-01-01T00:00:00Z
            max_future_ms: 24 * 3600 * 1000,
        }
    }
}

/// Why a record was rejected; stable strings, used as DLQ header and metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectCode {
    Empty,
    Oversized,
    NotJson,
    NotObject,
    MissingField,
    WrongType,
    NonFinite,
    OutOfRange,
    BadTimestamp,
    TimestampOutOfRange,
    BadDeviceId,
    KeyMismatch,
    SchemaMismatch,
}

impl RejectCode {
    pub const ALL: [RejectCode; 13] = [
        RejectCode::Empty,
        RejectCode::Oversized,
        RejectCode::NotJson,
        RejectCode::NotObject,
        RejectCode::MissingField,
        RejectCode::WrongType,
        RejectCode::NonFinite,
        RejectCode::OutOfRange,
        RejectCode::BadTimestamp,
        RejectCode::TimestampOutOfRange,
        RejectCode::BadDeviceId,
        RejectCode::KeyMismatch,
        RejectCode::SchemaMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::Empty => "empty",
            RejectCode::Oversized => "oversized",
            RejectCode::NotJson => "not_json",
            RejectCode::NotObject => "not_object",
            RejectCode::MissingField => "missing_field",
            RejectCode::WrongType => "wrong_type",
            RejectCode::NonFinite => "non_finite",
            RejectCode::OutOfRange => "out_of_range",
            RejectCode::BadTimestamp => "bad_timestamp",
            RejectCode::TimestampOutOfRange => "timestamp_out_of_range",
            RejectCode::BadDeviceId => "bad_device_id",
            RejectCode::KeyMismatch => "key_mismatch",
            RejectCode::SchemaMismatch => "schema_mismatch",
        }
    }
}

/// A rejected record: its index in the input slice and a human-readable reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub index: usize,
    pub code: RejectCode,
    pub reason: String,
}

/// Result of decoding one micro-batch.
#[derive(Debug)]
pub struct DecodeOutput {
    /// Valid records, in input order, with [`EventSchema::arrow_schema`].
    pub batch: RecordBatch,
    /// Invalid records, in input order.
    pub rejects: Vec<Reject>,
}

/// Decodes JSON events of one schema into Arrow batches.
pub struct Decoder {
    schema: EventSchema,
    arrow: arrow::datatypes::SchemaRef,
    limits: DecodeLimits,
    id: String,
    /// JSON key → slot (see `SLOT_*`, then `FIRST_FIELD_SLOT + field index`).
    index: crate::decode_fast::KeyIndex,
}

const SLOT_SCHEMA: usize = 0;
const SLOT_DEVICE: usize = 1;
const SLOT_TIME: usize = 2;
const FIRST_FIELD_SLOT: usize = 3;

impl Decoder {
    pub fn new(schema: EventSchema, limits: DecodeLimits) -> Self {
        let arrow = schema.arrow_schema();
        let id = schema.id();
        let mut index: crate::decode_fast::KeyIndex = schema.fields.iter().enumerate().map(|(i, f)| (f.name.clone(), FIRST_FIELD_SLOT + i)).collect();
        index.insert(fields::SCHEMA.into(), SLOT_SCHEMA);
        index.insert(fields::DEVICE_ID.into(), SLOT_DEVICE);
        index.insert(fields::EVENT_TIME.into(), SLOT_TIME);
        Decoder { schema, arrow, limits, id, index }
    }

    pub fn schema(&self) -> &EventSchema {
        &self.schema
    }

    pub fn arrow_schema(&self) -> arrow::datatypes::SchemaRef {
        self.arrow.clone()
    }

    /// Decode a micro-batch. `now_ms` is the processing clock used for the
    /// future-skew check.
    pub fn decode(&self, records: &[RawRecord<'_>], now_ms: i64) -> Result<DecodeOutput, SchemaError> {
        let n = records.len();
        let mut dev = StringBuilder::with_capacity(n, n * 16);
        let mut time = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut part = Int32Builder::with_capacity(n);
        let mut off = Int64Builder::with_capacity(n);
        let mut cols: Vec<ColBuilder> = self
            .schema
            .fields
            .iter()
            .map(|f| match f.kind {
                FieldKind::F64 => ColBuilder::F(Float64Builder::with_capacity(n)),
                FieldKind::I64 => ColBuilder::I(Int64Builder::with_capacity(n)),
                FieldKind::String => ColBuilder::S(StringBuilder::with_capacity(n, n * 8)),
            })
            .collect();
        let mut rejects = Vec::new();
        // One slot per known key, reused record after record (no allocation each).
        let mut slots: Vec<Option<Value>> = vec![None; FIRST_FIELD_SLOT + self.schema.fields.len()];
        for (index, rec) in records.iter().enumerate() {
            match self.validate(rec, now_ms, &mut slots) {
                Ok((device, t)) => {
                    dev.append_value(&device);
                    time.append_value(t);
                    part.append_value(rec.partition);
                    off.append_value(rec.offset);
                    // Every field's value checked in its slot: append from there,
                    // leaving the slots empty for the next record.
                    for (b, v) in cols.iter_mut().zip(&mut slots[FIRST_FIELD_SLOT..]) {
                        b.append(v.take());
                    }
                    (slots[SLOT_SCHEMA], slots[SLOT_TIME]) = (None, None);
                }
                Err((code, reason)) => {
                    slots.fill(None);
                    rejects.push(Reject { index, code, reason: crate::dlq::bound_reason(&reason).into_owned() })
                }
            }
        }
        let mut arrays: Vec<ArrayRef> = vec![
            std::sync::Arc::new(dev.finish()),
            std::sync::Arc::new(time.finish()),
            std::sync::Arc::new(part.finish()),
            std::sync::Arc::new(off.finish()),
        ];
        arrays.extend(cols.iter_mut().map(ColBuilder::finish));
        let batch = RecordBatch::try_new(self.arrow.clone(), arrays)?;
        Ok(DecodeOutput { batch, rejects })
    }

    fn validate(
        &self,
        rec: &RawRecord<'_>,
        now_ms: i64,
        slots: &mut Vec<Option<Value>>,
    ) -> Result<(String, i64), (RejectCode, String)> {
        // `slots` come empty: a record's values are taken as they are appended,
        // and the caller empties them after a reject (tested: `tests.rs`).
        let bytes = match rec.payload {
            None | Some([]) => return Err((RejectCode::Empty, "record has no value".into())),
            Some(b) => b,
        };
        if bytes.len() > self.limits.max_record_bytes {
            return Err((
                RejectCode::Oversized,
                format!("record is {} bytes, limit is {}", bytes.len(), self.limits.max_record_bytes),
            ));
        }
        // One pass over the bytes: the values of known keys land in their slots,
        // unknown keys are skipped without building anything.
        // The common record through the fast scanner (`decode_fast.rs`); anything
        // else, and every reason for a reject, through serde_json.
        if !crate::decode_fast::object(bytes, &self.index, slots) {
            slots.fill(None);
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let parsed = ObjectSeed { index: &self.index, slots }
                .deserialize(&mut de)
                .and_then(|r| de.end().map(|()| r))
                .map_err(|e| classify_json_error(bytes, &e))?;
            if let Err(kind) = parsed {
                return Err((RejectCode::NotObject, format!("expected a JSON object, got {kind}")));
            }
        }
        if let Some(claim) = &slots[SLOT_SCHEMA] {
            let ok = matches!(claim, Value::String(s) if *s == self.id || *s == self.schema.name);
            if !ok {
                return Err((
                    RejectCode::SchemaMismatch,
                    format!("event claims schema {}, this pipeline reads `{}`", crate::dlq::clip(&claim.to_string(), 64), self.id),
                ));
            }
        }
        let device = match slots[SLOT_DEVICE].take() {
            None | Some(Value::Null) => {
                return Err((RejectCode::MissingField, format!("missing required field `{}`", fields::DEVICE_ID)))
            }
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err((
                    RejectCode::WrongType,
                    format!("field `{}` must be a string, got {}", fields::DEVICE_ID, kind_of(&other)),
                ))
            }
        };
        if device.is_empty() || device.len() > fields::MAX_DEVICE_ID_LEN || device.chars().any(char::is_control) {
            return Err((
                RejectCode::BadDeviceId,
                format!("`device_id` must be 1..={} bytes without control characters", fields::MAX_DEVICE_ID_LEN),
            ));
        }
        match rec.key {
            Some(k) if k == device.as_bytes() => {}
            Some(k) => {
                let shown: String = String::from_utf8_lossy(k).chars().take(fields::MAX_DEVICE_ID_LEN).collect();
                return Err((
                    RejectCode::KeyMismatch,
                    format!("record key {shown:?} differs from device_id {device:?}: records MUST be keyed by device id"),
                ))
            }
            None => {
                return Err((
                    RejectCode::KeyMismatch,
                    format!("record has no key: records MUST be keyed by device id ({device:?})"),
                ))
            }
        }
        let t = match &slots[SLOT_TIME] {
            None | Some(Value::Null) => {
                return Err((RejectCode::MissingField, format!("missing required field `{}`", fields::EVENT_TIME)))
            }
            Some(v) => parse_time(v)?,
        };
        if t < self.limits.min_event_time_ms || t > now_ms.saturating_add(self.limits.max_future_ms) {
            return Err((
                RejectCode::TimestampOutOfRange,
                format!(
                    "event_time {} is outside the accepted range [{}, now + {} s]",
                    fmt_ms(t),
                    fmt_ms(self.limits.min_event_time_ms),
                    self.limits.max_future_ms / 1000
                ),
            ));
        }
        for (f, v) in self.schema.fields.iter().zip(&slots[FIRST_FIELD_SLOT..]) {
            check_cell(f, v)?;
        }
        Ok((device, t))
    }
}

enum ColBuilder {
    F(Float64Builder),
    I(Int64Builder),
    S(StringBuilder),
}

impl ColBuilder {
    /// Append a value [`check_cell`] accepted for this column's field (null when
    /// absent).
    fn append(&mut self, v: Option<Value>) {
        match (self, v) {
            (ColBuilder::F(b), Some(Value::Number(n))) => b.append_value(n.as_f64().unwrap_or(f64::NAN)),
            (ColBuilder::I(b), Some(Value::Number(n))) => b.append_option(n.as_i64()),
            (ColBuilder::S(b), Some(Value::String(x))) => b.append_value(&x),
            (ColBuilder::F(b), _) => b.append_null(),
            (ColBuilder::I(b), _) => b.append_null(),
            (ColBuilder::S(b), _) => b.append_null(),
        }
    }
    fn finish(&mut self) -> ArrayRef {
        match self {
            ColBuilder::F(b) => std::sync::Arc::new(b.finish()),
            ColBuilder::I(b) => std::sync::Arc::new(b.finish()),
            ColBuilder::S(b) => std::sync::Arc::new(b.finish()),
        }
    }
}

/// Parses a JSON object, putting the values of known keys into their slots (last
/// occurrence wins, as in a JSON map) and skipping unknown ones. A JSON value that is
/// not an object yields `Ok(Err(kind))`.
pub(crate) struct ObjectSeed<'a> {
    pub(crate) index: &'a crate::decode_fast::KeyIndex,
    pub(crate) slots: &'a mut Vec<Option<Value>>,
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = Result<(), &'static str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_> {
    type Value = Result<(), &'static str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match self.index.get(k.as_ref()) {
                Some(slot) => self.slots[slot] = Some(map.next_value::<Value>()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Ok(()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err("an array"))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Err("null"))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err("a boolean"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Err("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Err("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Err("a number"))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Err("a string"))
    }
}

/// An object key, borrowed from the input unless it had escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Check a declared field's value where it lies (its slot) against its declaration:
/// present when required, of the field's kind, finite, within its range and length
/// (a PHI value is never quoted in the reason). The value stays in the slot for
/// [`ColBuilder::append`].
fn check_cell(f: &FieldDef, v: &Option<Value>) -> Result<(), (RejectCode, String)> {
    match v {
        None | Some(Value::Null) if f.required => Err((RejectCode::MissingField, format!("missing required field `{}`", f.name))),
        None | Some(Value::Null) => Ok(()),
        Some(v) => match (f.kind, v) {
            (FieldKind::F64, Value::Number(num)) => {
                let x = num.as_f64().unwrap_or(f64::NAN);
                if !x.is_finite() {
                    return Err((RejectCode::NonFinite, format!("field `{}` is not finite", f.name)));
                }
                check_range(f, x)
            }
            (FieldKind::I64, Value::Number(num)) => {
                let Some(x) = num.as_i64() else {
                    // A patient's vital sign is never quoted back (PHI).
                    let got = if f.phi { "a number that is not an integer (PHI, value withheld)".to_string() } else { num.to_string() };
                    return Err((RejectCode::WrongType, format!("field `{}` must be an integer, got {got}", f.name)));
                };
                check_range(f, x as f64)
            }
            (FieldKind::String, Value::String(s)) if s.len() > f.max_len() => Err((
                RejectCode::OutOfRange,
                format!("field `{}` is {} bytes, its max_len is {}", f.name, s.len(), f.max_len()),
            )),
            (FieldKind::String, Value::String(_)) => Ok(()),
            (kind, other) => Err((
                RejectCode::WrongType,
                format!("field `{}` must be {}, got {}", f.name, kind_name(kind), kind_of(other)),
            )),
        },
    }
}

/// A value outside its field's bounds. The reason never quotes the value of a PHI
/// field (a patient's vital sign): reasons travel with the device id into the DLQ,
/// logs and metrics, so it says only on which side of the range the value fell.
fn check_range(f: &crate::FieldDef, x: f64) -> Result<(), (RejectCode, String)> {
    let lo = f.min.unwrap_or(f64::NEG_INFINITY);
    let hi = f.max.unwrap_or(f64::INFINITY);
    if x < lo || x > hi {
        let name = &f.name;
        let reason = if f.phi {
            let side = if x < lo { "below" } else { "above" };
            format!("field `{name}` (PHI, value withheld) is {side} its range [{lo}, {hi}]")
        } else {
            format!("field `{name}` = {x} is outside [{lo}, {hi}]")
        };
        return Err((RejectCode::OutOfRange, reason));
    }
    Ok(())
}

/// Parse an event time: RFC 3339 string or integer milliseconds since the epoch.
pub fn parse_time(v: &Value) -> Result<i64, (RejectCode, String)> {
    match v {
        // The common form without chrono's general parser (the same millisecond).
        Value::String(s) => match crate::decode_fast::rfc3339_utc_ms(s) {
            Some(ms) => Ok(ms),
            None => chrono::DateTime::parse_from_rfc3339(s)
                .map(|d| d.timestamp_millis())
                .map_err(|e| (RejectCode::BadTimestamp, format!("event_time {:?} is not RFC 3339: {e}", crate::dlq::clip(s, 64)))),
        },
        Value::Number(n) => n.as_i64().ok_or_else(|| {
            (RejectCode::BadTimestamp, format!("event_time {n} is not an integer of milliseconds"))
        }),
        other => Err((
            RejectCode::BadTimestamp,
            format!("event_time must be an RFC 3339 string or epoch milliseconds, got {}", kind_of(other)),
        )),
    }
}

/// Format epoch milliseconds as RFC 3339 (UTC, millisecond precision).
pub fn fmt_ms(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(d) => d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => format!("{ms} ms"),
    }
}

fn classify_json_error(bytes: &[u8], e: &serde_json::Error) -> (RejectCode, String) {
    let text = String::from_utf8_lossy(bytes);
    let msg = e.to_string();
    if msg.contains("number out of range") {
        return (RejectCode::NonFinite, format!("a number overflows f64: {msg}"));
    }
    if ["NaN", "Infinity"].iter().any(|t| text.contains(t)) {
        return (RejectCode::NonFinite, format!("NaN/Infinity are not valid JSON numbers: {msg}"));
    }
    (RejectCode::NotJson, format!("not valid JSON: {msg}"))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn kind_name(k: FieldKind) -> &'static str {
    match k {
        FieldKind::F64 => "a number",
        FieldKind::I64 => "an integer",
        FieldKind::String => "a string",
    }
}

/// Convenience for producers and tests: the JSON object of an event.
pub fn event_object(device_id: &str, event_time_ms: i64, values: Map<String, Value>) -> Map<String, Value> {
    let mut m = Map::with_capacity(values.len() + 2);
    m.insert(fields::DEVICE_ID.into(), Value::String(device_id.into()));
    m.insert(fields::EVENT_TIME.into(), Value::String(fmt_ms(event_time_ms)));
    m.extend(values);
    m
}
