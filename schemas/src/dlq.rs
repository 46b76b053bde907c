//! The dead-letter record: the original key and bytes of a rejected record with the
//! reason, a stable code and the source coordinates in headers.
//!
//! Contract: whatever the input (key, value and reason of any length), the record
//! [`DeadLetter::build`] returns MUST fit [`MAX_DEAD_LETTER_BYTES`] (key + headers +
//! value), below librdkafka's default `message.max.bytes` (1,000,000): a dead letter
//! the broker refuses would stop the pipeline on the very record it should set
//! aside. Oversized parts are cut and their original lengths recorded in headers;
//! when even the headers alone would not fit, the value is dropped entirely
//! (reason-only dead letter, `twinguard.dlq.truncated` = the original length).

use crate::fields;

/// Budget of a whole dead letter: key + header names and values + value.
pub const MAX_DEAD_LETTER_BYTES: usize = 900 * 1024;
/// Longest key kept in a dead letter.
pub const MAX_KEY_BYTES: usize = 16 * 1024;
/// Longest reason (bytes) in a dead letter, a log line or an error message derived
/// from untrusted input; longer ones are cut on a character boundary.
pub const MAX_REASON_BYTES: usize = 1024;
/// Largest control record (ack, feedback) parsed; larger ones are dead-lettered
/// unread, so a parser error can never quote a megabyte of input.
pub const MAX_CONTROL_RECORD_BYTES: usize = 64 * 1024;

/// `s` cut to at most `max` bytes on a character boundary, marked with `…` when cut
/// (the mark is counted in `max`).
pub fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    const MARK: &str = "…";
    let mut end = max.saturating_sub(MARK.len());
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &s[..end]).into()
}

/// A reason bounded to [`MAX_REASON_BYTES`].
pub fn bound_reason(reason: &str) -> std::borrow::Cow<'_, str> {
    clip(reason, MAX_REASON_BYTES)
}

/// Parse a control record (ack or feedback), refusing one larger than
/// [`MAX_CONTROL_RECORD_BYTES`] unread (the engine's ack and feedback path, and a fuzz target). The error is bounded and never quotes more
/// than a few bytes of the input.
pub fn parse_control<T: serde::de::DeserializeOwned>(payload: Option<&[u8]>, what: &str) -> Result<T, String> {
    let b = payload.ok_or_else(|| "empty record".to_string())?;
    if b.len() > MAX_CONTROL_RECORD_BYTES {
        return Err(format!("{what} record is {} bytes, limit is {MAX_CONTROL_RECORD_BYTES}: not parsed", b.len()));
    }
    serde_json::from_slice::<T>(b).map_err(|e| bound_reason(&format!("not {what}: {e}")).into_owned())
}

/// Where the rejected record came from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// A dead letter ready to produce (to the DLQ topic, partitioned by key).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

impl DeadLetter {
    /// Build the dead letter of a record. `schema` names the event schema for input
    /// records (absent for control records).
    pub fn build(src: Source<'_>, key: Option<Vec<u8>>, value: Option<Vec<u8>>, code: &str, reason: &str, schema: Option<&str>) -> DeadLetter {
        let mut value = value.unwrap_or_default();
        let mut key = key.unwrap_or_default();
        let mut headers: Vec<(&'static str, Vec<u8>)> = vec![
            (fields::DLQ_REASON, bound_reason(reason).as_bytes().to_vec()),
            (fields::DLQ_CODE, clip(code, 64).as_bytes().to_vec()),
            (fields::DLQ_TOPIC, clip(src.topic, 512).as_bytes().to_vec()),
            (fields::DLQ_PARTITION, src.partition.to_string().into_bytes()),
            (fields::DLQ_OFFSET, src.offset.to_string().into_bytes()),
        ];
        if let Some(s) = schema {
            headers.push((fields::DLQ_SCHEMA, clip(s, 512).as_bytes().to_vec()));
        }
        if key.len() > MAX_KEY_BYTES {
            headers.push((fields::DLQ_TRUNCATED_KEY, key.len().to_string().into_bytes()));
            key.truncate(MAX_KEY_BYTES);
        }
        // Room for the truncation header itself (name + a usize in decimal).
        let reserve = fields::DLQ_TRUNCATED.len() + 20;
        let used = key.len() + headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() + reserve;
        let budget = MAX_DEAD_LETTER_BYTES.saturating_sub(used);
        if value.len() > budget {
            headers.push((fields::DLQ_TRUNCATED, value.len().to_string().into_bytes()));
            value.truncate(budget);
        }
        DeadLetter { key, value, headers }
    }

    /// Bytes the broker counts against its message size (key, header names and
    /// values, value), without the record framing.
    pub fn size(&self) -> usize {
        self.key.len() + self.value.len() + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> Source<'static> {
        Source { topic: "acks", partition: 3, offset: 7 }
    }

    #[test]
    fn a_megabyte_reason_is_cut_and_the_letter_fits() {
        // The defect: a ~1 MB control record whose parse error quoted its value made
        // the budget subtraction underflow (panic in dev, wrap in release).
        let big = "x".repeat(1_000_000);
        let reason = format!("not an ack: unknown variant `{big}`");
        let dl = DeadLetter::build(src(), Some(vec![b'k'; 10]), Some(big.clone().into_bytes()), "invalid_control_record", &reason, None);
        assert!(dl.size() <= MAX_DEAD_LETTER_BYTES, "{}", dl.size());
        let r = dl.headers.iter().find(|(k, _)| *k == fields::DLQ_REASON).unwrap();
        assert!(r.1.len() <= MAX_REASON_BYTES);
        let t = dl.headers.iter().find(|(k, _)| *k == fields::DLQ_TRUNCATED).unwrap();
        assert_eq!(t.1, b"1000000");
    }

    #[test]
    fn every_size_combination_fits() {
        for &k in &[0, 1, MAX_KEY_BYTES, MAX_KEY_BYTES + 1, 2_000_000] {
            for &v in &[0, 100, MAX_DEAD_LETTER_BYTES - 10, MAX_DEAD_LETTER_BYTES, 5_000_000] {
                for &r in &[0, 10, MAX_REASON_BYTES, 3_000_000] {
                    let dl = DeadLetter::build(src(), Some(vec![1; k]), Some(vec![2; v]), "c", &"é".repeat(r / 2), Some(&"s".repeat(r)));
                    assert!(dl.size() <= MAX_DEAD_LETTER_BYTES, "k={k} v={v} r={r}: {}", dl.size());
                }
            }
        }
    }

    #[test]
    fn clip_cuts_on_a_character_boundary() {
        let s = "ab€€€"; // € is 3 bytes
        for max in 0..s.len() + 2 {
            let c = clip(s, max);
            assert!(c.len() <= max.max(3) + 3, "{max}: {c}");
            assert!(std::str::from_utf8(c.as_bytes()).is_ok());
        }
        assert_eq!(clip(s, 100), s);
        assert!(clip(&"€".repeat(1000), MAX_REASON_BYTES).len() <= MAX_REASON_BYTES);
    }

    #[test]
    fn small_letters_are_kept_whole() {
        let dl = DeadLetter::build(src(), Some(b"dev-1".to_vec()), Some(b"{}".to_vec()), "not_json", "why", Some("s/v1"));
        assert_eq!(dl.value, b"{}");
        assert_eq!(dl.key, b"dev-1");
        assert!(dl.headers.iter().all(|(k, _)| *k != fields::DLQ_TRUNCATED));
    }
}
