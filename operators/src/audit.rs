//! The tamper-evident audit trail: one hash chain per audit-topic partition, every
//! record signed with ed25519.
//!
//! A record's `hash` is SHA-256 over its canonical JSON without `hash` and `sig`
//! (object keys sorted, no whitespace, numbers as serde_json writes them); `sig` is
//! the ed25519 signature of those 32 bytes; `prev` is the previous record's hash in
//! the same chain. Altering a record breaks its hash; re-hashing it breaks the
//! signature (the forger has no key); removing or reordering records breaks `seq`
//! and `prev`.
//!
//! Contract:
//! - A chain MUST be continued from its verified tail ([`AuditLog::continue_from`]):
//!   the audit topic itself is the durable head, so a restart (or the next owner of
//!   the partition) appends where the last acknowledged record left off.
//! - [`verify_chain`] names the FIRST record that fails and why; it never stops at
//!   "something is wrong".

use std::collections::HashMap;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde_json::Value;
use sha2::{Digest, Sha256};
use twinguard_schemas::respond::{AuditKind, AuditRecord, RESPONSE_VERSION};

/// `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Parse a 32-byte key or seed given as 64 hex characters (surrounding whitespace ignored).
pub fn parse_key_hex(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    let b = unhex(s).ok_or_else(|| "not hexadecimal".to_string())?;
    b.try_into().map_err(|b: Vec<u8>| format!("{} bytes, expected 32 (64 hex characters)", b.len()))
}

/// Canonical JSON: object keys sorted at every level, no whitespace.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).expect("string serialises"));
                out.push(':');
                write_canonical(&m[*k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&serde_json::to_string(other).expect("scalar serialises")),
    }
}

/// The hash a record must carry: SHA-256 of its canonical JSON without `hash`/`sig`.
pub fn record_hash(v: &Value) -> [u8; 32] {
    let mut v = v.clone();
    if let Value::Object(m) = &mut v {
        m.remove("hash");
        m.remove("sig");
    }
    Sha256::digest(canonical_json(&v).as_bytes()).into()
}

/// The signing side: one chain head per partition this instance appends to.
pub struct AuditLog {
    key: SigningKey,
    key_id: String,
    /// chain → (next seq, hash of the last record).
    heads: HashMap<i32, (u64, String)>,
}

impl AuditLog {
    /// A log signing with the ed25519 key whose 32-byte seed is `seed`.
    pub fn new(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let key_id = hex(&key.verifying_key().as_bytes()[..8]);
        AuditLog { key, key_id, heads: HashMap::new() }
    }

    /// The public key (hex) that verifies this log's records.
    pub fn public_key_hex(&self) -> String {
        hex(self.key.verifying_key().as_bytes())
    }

    /// Continue `chain` after `tail`, its last record on the topic (None: the chain is
    /// empty). The tail must verify with this log's key: a chain whose end was
    /// tampered with is not silently continued.
    pub fn continue_from(&mut self, chain: i32, tail: Option<&[u8]>) -> Result<(), String> {
        let head = match tail {
            None => (0, GENESIS.to_string()),
            Some(bytes) => {
                let rec = check_record(bytes, &self.key.verifying_key())?;
                if rec.chain != chain {
                    return Err(format!("the last record belongs to chain {}, not {chain}", rec.chain));
                }
                (rec.seq + 1, rec.hash)
            }
        };
        self.heads.insert(chain, head);
        Ok(())
    }

    /// Forget a chain (its partition was revoked).
    pub fn drop_chain(&mut self, chain: i32) {
        self.heads.remove(&chain);
    }

    /// Whether `chain` has a head (was continued).
    pub fn has_chain(&self, chain: i32) -> bool {
        self.heads.contains_key(&chain)
    }

    /// Append a record to `chain`; returns the record and its wire bytes.
    ///
    /// # Panics
    /// When the chain was never continued ([`continue_from`](Self::continue_from)):
    /// appending to an unknown head would fork the chain.
    pub fn append(&mut self, chain: i32, kind: AuditKind, at: String, device_id: Option<String>, body: Value) -> (AuditRecord, Vec<u8>) {
        let (seq, prev) = self.heads.get(&chain).cloned().expect("audit chain continued before appending");
        let mut rec = AuditRecord {
            v: RESPONSE_VERSION,
            chain,
            seq,
            prev,
            kind,
            at,
            device_id,
            body,
            key_id: self.key_id.clone(),
            hash: String::new(),
            sig: String::new(),
        };
        let h = record_hash(&serde_json::to_value(&rec).expect("audit record serialises"));
        rec.hash = hex(&h);
        rec.sig = hex(&self.key.sign(&h).to_bytes());
        self.heads.insert(chain, (seq + 1, rec.hash.clone()));
        let bytes = serde_json::to_vec(&rec).expect("audit record serialises");
        (rec, bytes)
    }
}

/// Check one record on its own: it parses, its hash matches its content, and its
/// signature is valid for `key`.
pub fn check_record(bytes: &[u8], key: &VerifyingKey) -> Result<AuditRecord, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("malformed: not JSON ({e})"))?;
    let rec: AuditRecord = serde_json::from_value(v.clone()).map_err(|e| format!("malformed: not an audit record ({e})"))?;
    let h = record_hash(&v);
    if rec.hash != hex(&h) {
        return Err("altered: its content does not match its hash".into());
    }
    let sig = unhex(&rec.sig)
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .map(|b| Signature::from_bytes(&b))
        .ok_or_else(|| "forged: its signature is not 64 hex bytes".to_string())?;
    key.verify(&h, &sig).map_err(|_| "forged: its signature does not verify with the audit public key".to_string())?;
    Ok(rec)
}

/// The verifying key from its 32 bytes.
pub fn verifying_key(bytes: [u8; 32]) -> Result<VerifyingKey, String> {
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an ed25519 public key: {e}"))
}

/// The first failure in a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFault {
    pub chain: i32,
    /// Topic offset of the offending record.
    pub offset: i64,
    /// Its `seq`, when it could be read.
    pub seq: Option<u64>,
    pub reason: String,
}

impl std::fmt::Display for AuditFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(s) => write!(f, "chain {} (partition {}), record at offset {} (seq {s}): {}", self.chain, self.chain, self.offset, self.reason),
            None => write!(f, "chain {} (partition {}), record at offset {}: {}", self.chain, self.chain, self.offset, self.reason),
        }
    }
}

/// What a verified chain holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChainSummary {
    pub records: u64,
    /// Hash of the last record (the head), if any.
    pub head: Option<String>,
}

/// Verify one partition's chain, records in offset order. `allow_truncated_start`
/// accepts a chain whose first surviving record is not seq 0 (older records deleted
/// by topic retention); otherwise that is reported as removal.
pub fn verify_chain(
    chain: i32,
    records: &[(i64, Vec<u8>)],
    key: &VerifyingKey,
    allow_truncated_start: bool,
) -> Result<ChainSummary, AuditFault> {
    let fault = |offset: i64, seq: Option<u64>, reason: String| AuditFault { chain, offset, seq, reason };
    // Parse what can be parsed first, so that a gap can be told apart from a reorder.
    let parsed: Vec<Option<AuditRecord>> = records
        .iter()
        .map(|(_, b)| serde_json::from_slice::<AuditRecord>(b).ok())
        .collect();
    let mut expect: Option<(u64, String)> = None;
    let mut seen: std::collections::HashSet<u64> = std::collections::HashSet::new();
    for (i, (offset, bytes)) in records.iter().enumerate() {
        let rec = check_record(bytes, key).map_err(|r| fault(*offset, parsed[i].as_ref().map(|r| r.seq), r))?;
        if rec.chain != chain {
            return Err(fault(*offset, Some(rec.seq), format!("moved: it belongs to chain {}, found in partition {chain}", rec.chain)));
        }
        let (want_seq, want_prev) = match &expect {
            Some(e) => e.clone(),
            None if allow_truncated_start => (rec.seq, rec.prev.clone()),
            None => (0, GENESIS.to_string()),
        };
        if rec.seq != want_seq {
            let later = parsed[i + 1..].iter().flatten().any(|r| r.seq == want_seq);
            let earlier = rec.seq < want_seq;
            let reason = if seen.contains(&rec.seq) {
                format!("duplicate: a second record with seq {} (a forked or replayed chain)", rec.seq)
            } else if earlier || later {
                format!("reordered: seq {} where seq {want_seq} was due", rec.seq)
            } else {
                format!("removed: seq {want_seq}..{} missing before it", rec.seq.saturating_sub(1))
            };
            return Err(fault(*offset, Some(rec.seq), reason));
        }
        if rec.prev != want_prev {
            return Err(fault(*offset, Some(rec.seq), "chain broken: `prev` is not the hash of the record before it".into()));
        }
        seen.insert(rec.seq);
        expect = Some((rec.seq + 1, rec.hash.clone()));
    }
    Ok(ChainSummary { records: records.len() as u64, head: expect.map(|e| e.1) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain(n: usize) -> (AuditLog, Vec<(i64, Vec<u8>)>) {
        let mut log = AuditLog::new([7; 32]);
        log.continue_from(3, None).unwrap();
        let recs = (0..n)
            .map(|i| {
                let (_, b) = log.append(3, AuditKind::Verdict, format!("2026-01-01T00:00:0{i}Z"), Some(format!("dev-{i}")), json!({"score": 0.9, "i": i}));
                (i as i64 * 2, b)
            })
            .collect();
        (log, recs)
    }

    fn key(log: &AuditLog) -> VerifyingKey {
        verifying_key(parse_key_hex(&log.public_key_hex()).unwrap()).unwrap()
    }

    #[test]
    fn intact_chain_verifies_and_continues_from_its_tail() {
        let (log, mut recs) = chain(5);
        let k = key(&log);
        let s = verify_chain(3, &recs, &k, false).unwrap();
        assert_eq!(s.records, 5);
        // A restarted log continues from the topic's tail.
        let mut again = AuditLog::new([7; 32]);
        again.continue_from(3, Some(&recs[4].1)).unwrap();
        let (r, b) = again.append(3, AuditKind::Command, "2026-01-01T00:00:09Z".into(), None, json!({}));
        assert_eq!(r.seq, 5);
        recs.push((10, b));
        assert_eq!(verify_chain(3, &recs, &k, false).unwrap().records, 6);
    }

    #[test]
    fn tampering_is_named() {
        let (log, recs) = chain(6);
        let k = key(&log);
        // Altered body.
        let mut t = recs.clone();
        let mut v: Value = serde_json::from_slice(&t[2].1).unwrap();
        v["body"]["score"] = json!(0.1);
        t[2].1 = serde_json::to_vec(&v).unwrap();
        let f = verify_chain(3, &t, &k, false).unwrap_err();
        assert_eq!((f.offset, f.seq), (4, Some(2)));
        assert!(f.reason.starts_with("altered"), "{f}");
        // Removed.
        let mut t = recs.clone();
        t.remove(3);
        let f = verify_chain(3, &t, &k, false).unwrap_err();
        assert_eq!(f.seq, Some(4));
        assert!(f.reason.starts_with("removed"), "{f}");
        // Reordered.
        let mut t = recs.clone();
        t.swap(1, 2);
        let f = verify_chain(3, &t, &k, false).unwrap_err();
        assert_eq!(f.seq, Some(2));
        assert!(f.reason.starts_with("reordered"), "{f}");
        // Forged: re-hashed after the change, signed with another key.
        let mut t = recs.clone();
        let mut v: Value = serde_json::from_slice(&t[1].1).unwrap();
        v["device_id"] = json!("someone-else");
        let h = record_hash(&v);
        v["hash"] = json!(hex(&h));
        v["sig"] = json!(hex(&SigningKey::from_bytes(&[9; 32]).sign(&h).to_bytes()));
        t[1].1 = serde_json::to_vec(&v).unwrap();
        let f = verify_chain(3, &t, &k, false).unwrap_err();
        assert_eq!(f.seq, Some(1));
        assert!(f.reason.starts_with("forged"), "{f}");
        // Dropping the first record is removal unless retention is allowed for.
        let t = recs[1..].to_vec();
        assert!(verify_chain(3, &t, &k, false).unwrap_err().reason.starts_with("removed"));
        assert_eq!(verify_chain(3, &t, &k, true).unwrap().records, 5);
        // A record copied in again (a forked chain).
        let mut t = recs.clone();
        t.insert(3, recs[1].clone());
        let f = verify_chain(3, &t, &k, false).unwrap_err();
        assert!(f.reason.starts_with("duplicate"), "{f}");
        // A record moved to another partition.
        assert!(verify_chain(4, &recs, &k, false).unwrap_err().reason.starts_with("moved"));
        // A tampered tail is not continued.
        let mut v: Value = serde_json::from_slice(&recs[5].1).unwrap();
        v["kind"] = json!("command");
        let mut again = AuditLog::new([7; 32]);
        assert!(again.continue_from(3, Some(&serde_json::to_vec(&v).unwrap())).unwrap_err().starts_with("altered"));
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let v = json!({"b": 1, "a": {"z": [1, {"y": 2, "x": 1.5}], "c": "s"}});
        assert_eq!(canonical_json(&v), r#"{"a":{"c":"s","z":[1,{"x":1.5,"y":2}]},"b":1}"#);
    }
}
