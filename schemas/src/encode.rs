//! Arrow → JSON encoding of event batches (the inverse of [`crate::Decoder`]).

use arrow::array::{Array, Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::record_batch::RecordBatch;
use serde_json::{Map, Value};

use crate::decode::fmt_ms;
use crate::event::{EventSchema, FieldKind};
use crate::fields;

/// Encode every row of a decoded event batch back to its JSON object. Null fields are
/// omitted; the source-coordinate columns are not part of the event.
pub fn events_to_json(schema: &EventSchema, batch: &RecordBatch) -> Vec<Map<String, Value>> {
    let dev = batch.column(0).as_any().downcast_ref::<StringArray>().expect("device_id is Utf8");
    let time = batch
        .column(1)
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .expect("event_time is Timestamp(ms)");
    (0..batch.num_rows())
        .map(|row| {
            let mut m = Map::new();
            m.insert(fields::DEVICE_ID.into(), Value::String(dev.value(row).into()));
            m.insert(fields::EVENT_TIME.into(), Value::String(fmt_ms(time.value(row))));
            for (i, f) in schema.fields.iter().enumerate() {
                let col = batch.column(EventSchema::FIRST_FIELD_COLUMN + i);
                if col.is_null(row) {
                    continue;
                }
                let v = match f.kind {
                    FieldKind::F64 => {
                        let x = col.as_any().downcast_ref::<Float64Array>().expect("f64 column").value(row);
                        serde_json::Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null)
                    }
                    FieldKind::I64 => {
                        Value::from(col.as_any().downcast_ref::<Int64Array>().expect("i64 column").value(row))
                    }
                    FieldKind::String => Value::String(
                        col.as_any().downcast_ref::<StringArray>().expect("utf8 column").value(row).into(),
                    ),
                };
                m.insert(f.name.clone(), v);
            }
            m
        })
        .collect()
}
