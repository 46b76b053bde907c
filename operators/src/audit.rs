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
mod tests;
