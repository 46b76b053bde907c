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
//! - Verification starts from a PINNED public key, the key of the chain's first
//!   record, given by whoever verifies; it is never derived from a signing key (every
//!   pipeline host holds that). The key changes only through a `key_rotation` record
//!   signed by the key it replaces and naming the new public key.
//!
//! Architecture Invariant: a chain's signing key changes only through a signed
//! hand-over. A log whose chain tail was signed by its previous key (configured as
//! such) first appends a `key_rotation` record signed by that previous key; it never
//! continues a chain whose tail no configured key signed.

use std::collections::HashMap;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde_json::Value;
use sha2::{Digest, Sha256};
use twinguard_schemas::respond::{AuditKind, AuditRecord, RESPONSE_VERSION};

/// `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Largest `seq` a record may carry (no chain reaches 2^63 records): a signed record
/// beyond it is reported as malformed, and a chain is not continued from it, so no
/// `seq + 1` can overflow (a panic: overflow checks are on in every profile).
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    // `from_str_radix` alone would also take a sign ("+f").
    if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
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

/// Where a chain continues.
#[derive(Debug, Clone)]
struct Head {
    seq: u64,
    prev: String,
    /// The tail was signed by the previous key: the next append first writes a
    /// `key_rotation` record signed by it.
    rotate: bool,
}

/// The first 8 bytes (hex) of a public key: a record's `key_id`.
fn key_id(key: &VerifyingKey) -> String {
    hex(&key.as_bytes()[..8])
}

/// The signing side: one chain head per partition this instance appends to.
pub struct AuditLog {
    key: SigningKey,
    key_id: String,
    /// The key this one replaced, while chains it signed may still need a hand-over.
    previous: Option<SigningKey>,
    heads: HashMap<i32, Head>,
}

impl AuditLog {
    /// A log signing with the ed25519 key whose 32-byte seed is `seed`.
    pub fn new(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let key_id = key_id(&key.verifying_key());
        AuditLog { key, key_id, previous: None, heads: HashMap::new() }
    }

    /// The key this log's key replaces (seed of the previous signing key): a chain
    /// whose tail it signed is continued after a `key_rotation` record it signs.
    pub fn with_previous(mut self, seed: [u8; 32]) -> Result<Self, String> {
        let previous = SigningKey::from_bytes(&seed);
        if previous.verifying_key() == self.key.verifying_key() {
            return Err("the previous signing key is the signing key itself".into());
        }
        self.previous = Some(previous);
        Ok(self)
    }

    /// The public key (hex) that verifies this log's records.
    pub fn public_key_hex(&self) -> String {
        hex(self.key.verifying_key().as_bytes())
    }

    /// Continue `chain` after `tail`, its last record on the topic (None: the chain is
    /// empty). The tail must verify with this log's key, or with its previous key
    /// (then the chain is handed over to this key by a `key_rotation` record at the
    /// next append): a chain whose end was tampered with is not silently continued.
    /// An empty chain begun while a previous key is configured opens with that
    /// hand-over too, so the key pinned before the rotation verifies every chain.
    pub fn continue_from(&mut self, chain: i32, tail: Option<&[u8]>) -> Result<(), String> {
        let head = match tail {
            None => Head { seq: 0, prev: GENESIS.to_string(), rotate: self.previous.is_some() },
            Some(bytes) => {
                let (rec, rotate) = match check_record(bytes, &self.key.verifying_key()) {
                    Ok(rec) => (rec, false),
                    Err(e) if e.starts_with("forged") => {
                        let signer = serde_json::from_slice::<AuditRecord>(bytes).map(|r| r.key_id).unwrap_or_default();
                        let Some(previous) = &self.previous else {
                            return Err(format!(
                                "{e} (it was signed by key id {signer}, this instance signs with {}; after rotating the signing key, set `audit.previous_signing_key_file` to the old key)",
                                self.key_id
                            ));
                        };
                        let rec = check_record(bytes, &previous.verifying_key()).map_err(|e| {
                            format!("{e}; it does not verify with the previous key either (it was signed by key id {signer})")
                        })?;
                        // A tail that already hands the chain over to this key.
                        let handed_over = rec.kind == AuditKind::KeyRotation && rec.body["public_key"].as_str() == Some(self.public_key_hex().as_str());
                        (rec, !handed_over)
                    }
                    Err(e) => return Err(e),
                };
                if rec.chain != chain {
                    return Err(format!("the last record belongs to chain {}, not {chain}", rec.chain));
                }
                if rec.seq >= MAX_SEQ {
                    return Err(format!("the last record has seq {}: no record can follow it (the largest is {MAX_SEQ})", rec.seq));
                }
                Head { seq: rec.seq + 1, prev: rec.hash, rotate }
            }
        };
        self.heads.insert(chain, head);
        Ok(())
    }

    /// Whether the next append to `chain` first hands it over to this log's key.
    pub fn rotation_due(&self, chain: i32) -> bool {
        self.heads.get(&chain).is_some_and(|h| h.rotate)
    }

    /// Forget a chain (its partition was revoked).
    pub fn drop_chain(&mut self, chain: i32) {
        self.heads.remove(&chain);
    }

    /// Whether `chain` has a head (was continued).
    pub fn has_chain(&self, chain: i32) -> bool {
        self.heads.contains_key(&chain)
    }

    /// Append a record to `chain`; returns what must be written, in order: a
    /// `key_rotation` record first when the chain is handed over to this log's key
    /// ([`rotation_due`](Self::rotation_due)), then the record.
    ///
    /// # Panics
    /// When the chain was never continued ([`continue_from`](Self::continue_from)):
    /// appending to an unknown head would fork the chain.
    pub fn append_all(&mut self, chain: i32, kind: AuditKind, at: String, device_id: Option<String>, body: Value) -> Vec<(AuditRecord, Vec<u8>)> {
        let mut out = Vec::with_capacity(1);
        if self.rotation_due(chain) {
            let previous = self.previous.clone().expect("a rotation is due only with a previous key");
            let body = serde_json::json!({"public_key": self.public_key_hex(), "key_id": self.key_id});
            out.push(self.sign_next(chain, AuditKind::KeyRotation, at.clone(), None, body, &previous));
            if let Some(h) = self.heads.get_mut(&chain) {
                h.rotate = false;
            }
        }
        let key = self.key.clone();
        out.push(self.sign_next(chain, kind, at, device_id, body, &key));
        out
    }

    /// Append one record to `chain`; returns the record and its wire bytes.
    ///
    /// # Panics
    /// When the chain was never continued, or when a key rotation is due (use
    /// [`append_all`](Self::append_all), which writes it).
    pub fn append(&mut self, chain: i32, kind: AuditKind, at: String, device_id: Option<String>, body: Value) -> (AuditRecord, Vec<u8>) {
        assert!(!self.rotation_due(chain), "a key rotation is due on chain {chain}: append with append_all");
        self.append_all(chain, kind, at, device_id, body).pop().expect("one record")
    }

    fn sign_next(&mut self, chain: i32, kind: AuditKind, at: String, device_id: Option<String>, body: Value, key: &SigningKey) -> (AuditRecord, Vec<u8>) {
        let head = self.heads.get_mut(&chain).expect("audit chain continued before appending");
        let mut rec = AuditRecord {
            v: RESPONSE_VERSION,
            chain,
            seq: head.seq,
            prev: head.prev.clone(),
            kind,
            at,
            device_id,
            body,
            key_id: key_id(&key.verifying_key()),
            hash: String::new(),
            sig: String::new(),
        };
        let h = record_hash(&serde_json::to_value(&rec).expect("audit record serialises"));
        rec.hash = hex(&h);
        rec.sig = hex(&key.sign(&h).to_bytes());
        head.seq += 1;
        head.prev = rec.hash.clone();
        let bytes = serde_json::to_vec(&rec).expect("audit record serialises");
        (rec, bytes)
    }
}

/// HMAC-SHA256 (RFC 2104) of `msg` keyed by `key`.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| block.iter().map(|k| k ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(msg).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

/// The `mac` an ack carries: HMAC-SHA256 (hex) over
/// `twinguard-ack-v1\n<command_id>\n<status>\n<device_id>`.
pub fn ack_mac(secret: &[u8], command_id: &str, status: &str, device_id: &str) -> String {
    hex(&hmac_sha256(secret, format!("twinguard-ack-v1\n{command_id}\n{status}\n{device_id}").as_bytes()))
}

/// The `mac` a feedback record carries: HMAC-SHA256 (hex) over
/// `twinguard-feedback-v1\n<label>\n<analyst or empty>\n<ref>`.
pub fn feedback_mac(secret: &[u8], label: &str, analyst: &str, reference: &str) -> String {
    hex(&hmac_sha256(secret, format!("twinguard-feedback-v1\n{label}\n{analyst}\n{reference}").as_bytes()))
}

/// Whether `given` is the MAC `expected` (hex), compared in constant time. Fields
/// before the last one of a MAC'd message must not hold a line break (the message
/// would be ambiguous): `unambiguous` says whether they do not.
pub fn mac_matches(expected: &str, given: &str, unambiguous: bool) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y.to_ascii_lowercase()));
    diff == 0 && unambiguous
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
    // Exactly the writer's spelling (lowercase hex): a record whose bytes differ
    // from what was signed and written must not verify, even where the signature
    // it decodes to is the same (found by fuzzing: "...2E4c..." for "...2e4c...").
    let sig = unhex(&rec.sig)
        .filter(|b| hex(b) == rec.sig)
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .map(|b| Signature::from_bytes(&b))
        .ok_or_else(|| "forged: its signature is not 128 lowercase hex characters".to_string())?;
    // Strict verification also refuses a non-canonical signature scalar and small-order keys.
    key.verify_strict(&h, &sig)
        .map_err(|_| format!("forged: its signature does not verify with the audit public key (key id {})", key_id(key)))?;
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
    /// `key_rotation` records followed.
    pub rotations: u64,
    /// The public key (hex) that signs the chain's newest records.
    pub key: String,
}

/// Verify one partition's chain, records in offset order, starting from `key`, the
/// pinned public key of the chain's first record; a `key_rotation` record signed by
/// the current key hands verification over to the key it names. `allow_truncated_start`
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
    let mut key = *key;
    let mut rotations = 0;
    for (i, (offset, bytes)) in records.iter().enumerate() {
        let rec = check_record(bytes, &key).map_err(|r| fault(*offset, parsed[i].as_ref().map(|r| r.seq), r))?;
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
        if rec.kind == AuditKind::KeyRotation {
            key = rec.body["public_key"]
                .as_str()
                .ok_or_else(|| "no `body.public_key`".to_string())
                .and_then(parse_key_hex)
                .and_then(verifying_key)
                .map_err(|e| fault(*offset, Some(rec.seq), format!("malformed key rotation: {e}")))?;
            rotations += 1;
        }
        seen.insert(rec.seq);
        if rec.seq > MAX_SEQ {
            return Err(fault(*offset, Some(rec.seq), format!("malformed: seq {} is beyond any chain (the largest is {MAX_SEQ})", rec.seq)));
        }
        expect = Some((rec.seq + 1, rec.hash.clone()));
    }
    Ok(ChainSummary { records: records.len() as u64, head: expect.map(|e| e.1), rotations, key: hex(key.as_bytes()) })
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
        // The same signature spelt in upper case is not what was written (found by fuzzing).
        let mut t = recs.clone();
        let mut v: Value = serde_json::from_slice(&t[2].1).unwrap();
        let upper = v["sig"].as_str().unwrap().to_uppercase();
        assert_ne!(v["sig"], json!(upper), "a signature with a hex letter");
        v["sig"] = json!(upper);
        t[2].1 = serde_json::to_vec(&v).unwrap();
        let f = verify_chain(3, &t, &k, false).unwrap_err();
        assert_eq!(f.seq, Some(2));
        assert!(f.reason.starts_with("forged"), "{f}");
        // A sign is not a hex digit either.
        assert_eq!(unhex("+f0f"), None);
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
    fn a_rotated_key_takes_over_the_chain_through_a_record_the_old_key_signs() {
        let (old, mut recs) = chain(3);
        let pinned = key(&old);
        // The new key alone cannot continue a chain the old key signed (it says how).
        let mut new = AuditLog::new([8; 32]);
        let e = new.continue_from(3, Some(&recs[2].1)).unwrap_err();
        assert!(e.starts_with("forged") && e.contains("previous_signing_key_file"), "{e}");
        // With the old key as its previous key it hands the chain over.
        let mut new = AuditLog::new([8; 32]).with_previous([7; 32]).unwrap();
        new.continue_from(3, Some(&recs[2].1)).unwrap();
        assert!(new.rotation_due(3));
        let out = new.append_all(3, AuditKind::Verdict, "2026-01-01T00:00:10Z".into(), Some("dev-9".into()), json!({}));
        assert_eq!(out.len(), 2);
        let (rot, rec) = (&out[0].0, &out[1].0);
        assert_eq!((rot.kind, rot.seq, rot.key_id.as_str()), (AuditKind::KeyRotation, 3, old.key_id.as_str()));
        assert_eq!(rot.body["public_key"].as_str(), Some(new.public_key_hex().as_str()));
        assert_eq!((rec.seq, rec.prev.as_str(), rec.key_id.as_str()), (4, rot.hash.as_str(), new.key_id.as_str()));
        recs.extend(out.into_iter().enumerate().map(|(i, (_, b))| (10 + i as i64, b)));
        // Verified from the pinned first key, across the hand-over.
        let s = verify_chain(3, &recs, &pinned, false).unwrap();
        assert_eq!((s.records, s.rotations, s.key.as_str()), (5, 1, new.public_key_hex().as_str()));
        // The new key is not the chain's key: pinning it fails at the first record.
        assert!(verify_chain(3, &recs, &key(&new), false).unwrap_err().reason.starts_with("forged"));
        // A restart continues after the hand-over without a second rotation, from
        // either tail: the new key's record, or the rotation record itself.
        for tail in [&recs[4].1, &recs[3].1] {
            let mut again = AuditLog::new([8; 32]).with_previous([7; 32]).unwrap();
            again.continue_from(3, Some(tail)).unwrap();
            assert!(!again.rotation_due(3));
        }
        // After the hand-over the old key cannot sign on: a record it signs is forged.
        let mut stale = AuditLog::new([7; 32]);
        stale.continue_from(3, Some(&recs[3].1)).unwrap();
        let (_, b) = stale.append(3, AuditKind::Verdict, "2026-01-01T00:00:11Z".into(), None, json!({}));
        let mut forked = recs[..4].to_vec();
        forked.push((12, b));
        let f = verify_chain(3, &forked, &pinned, false).unwrap_err();
        assert_eq!(f.seq, Some(4));
        assert!(f.reason.starts_with("forged"), "{f}");
        // A rotation naming no usable key is reported as such.
        let mut bad = AuditLog::new([7; 32]);
        bad.continue_from(3, Some(&recs[2].1)).unwrap();
        let (_, b) = bad.append(3, AuditKind::KeyRotation, "2026-01-01T00:00:12Z".into(), None, json!({"public_key": "zz"}));
        let mut t = recs[..3].to_vec();
        t.push((13, b));
        assert!(verify_chain(3, &t, &pinned, false).unwrap_err().reason.starts_with("malformed key rotation"));
        assert!(AuditLog::new([7; 32]).with_previous([7; 32]).is_err());
        // A chain begun after the rotation opens with the hand-over, so the key pinned
        // before it verifies every chain.
        let mut fresh = AuditLog::new([8; 32]).with_previous([7; 32]).unwrap();
        fresh.continue_from(5, None).unwrap();
        let recs: Vec<(i64, Vec<u8>)> = fresh
            .append_all(5, AuditKind::Verdict, "2026-01-01T00:00:13Z".into(), None, json!({}))
            .into_iter()
            .enumerate()
            .map(|(i, (_, b))| (i as i64, b))
            .collect();
        let s = verify_chain(5, &recs, &pinned, false).unwrap();
        assert_eq!((s.records, s.rotations), (2, 1));
    }

    #[test]
    fn a_signed_record_with_the_largest_seq_is_a_fault_not_an_overflow() {
        // Found by the audit_verify fuzz target: `seq + 1` overflowed (a panic, since
        // overflow checks are on in every profile) in verify_chain, continue_from and
        // the append after continuing from a tail of seq u64::MAX - 1.
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut rec = AuditRecord {
            v: RESPONSE_VERSION,
            chain: 0,
            seq: u64::MAX,
            prev: GENESIS.into(),
            kind: AuditKind::Verdict,
            at: "2026-01-01T00:00:00Z".into(),
            device_id: None,
            body: json!({}),
            key_id: key_id(&key.verifying_key()),
            hash: String::new(),
            sig: String::new(),
        };
        let h = record_hash(&serde_json::to_value(&rec).unwrap());
        rec.hash = hex(&h);
        rec.sig = hex(&key.sign(&h).to_bytes());
        let b = serde_json::to_vec(&rec).unwrap();
        let f = verify_chain(0, &[(5, b.clone())], &key.verifying_key(), true).unwrap_err();
        assert_eq!((f.offset, f.seq), (5, Some(u64::MAX)));
        assert!(f.reason.starts_with("malformed"), "{f}");
        assert!(AuditLog::new([7; 32]).continue_from(0, Some(&b)).unwrap_err().contains("no record can follow"));
        for seq in [MAX_SEQ, u64::MAX - 1] {
            rec.seq = seq;
            let h = record_hash(&serde_json::to_value(&rec).unwrap());
            rec.hash = hex(&h);
            rec.sig = hex(&key.sign(&h).to_bytes());
            let b = serde_json::to_vec(&rec).unwrap();
            assert!(AuditLog::new([7; 32]).continue_from(0, Some(&b)).unwrap_err().contains("no record can follow"));
        }
        rec.seq = MAX_SEQ - 1;
        let h = record_hash(&serde_json::to_value(&rec).unwrap());
        rec.hash = hex(&h);
        rec.sig = hex(&key.sign(&h).to_bytes());
        let b = serde_json::to_vec(&rec).unwrap();
        assert_eq!(verify_chain(0, &[(0, b.clone())], &key.verifying_key(), true).unwrap().records, 1);
        let mut log = AuditLog::new([7; 32]);
        log.continue_from(0, Some(&b)).unwrap();
        assert_eq!(log.append(0, AuditKind::Verdict, "2026-01-01T00:00:01Z".into(), None, json!({})).0.seq, MAX_SEQ);
    }

    #[test]
    fn hmac_matches_rfc_4231_and_macs_bind_every_field() {
        // RFC 4231, test case 2.
        assert_eq!(hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hex(&hmac_sha256(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        let m = ack_mac(b"secret", "c1", "applied", "dev-1");
        assert!(mac_matches(&m, &m, true) && mac_matches(&m, &m.to_uppercase(), true));
        assert!(!mac_matches(&m, &m, false), "an ambiguous message never verifies");
        for other in [ack_mac(b"secret2", "c1", "applied", "dev-1"), ack_mac(b"secret", "c2", "applied", "dev-1"), ack_mac(b"secret", "c1", "failed", "dev-1"), ack_mac(b"secret", "c1", "applied", "dev-2")] {
            assert!(!mac_matches(&other, &m, true));
        }
        assert!(!mac_matches(&m, &m[..63], true));
        let f = feedback_mac(b"s", "false_positive", "alice", "t:0:1");
        assert_ne!(f, feedback_mac(b"s", "false_positive", "bob", "t:0:1"));
        assert_ne!(f, feedback_mac(b"s", "true_positive", "alice", "t:0:1"));
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let v = json!({"b": 1, "a": {"z": [1, {"y": 2, "x": 1.5}], "c": "s"}});
        assert_eq!(canonical_json(&v), r#"{"a":{"c":"s","z":[1,{"x":1.5,"y":2}]},"b":1}"#);
    }
}
