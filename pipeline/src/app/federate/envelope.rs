//! The federation's messages on Kafka: a body (MessagePack) deflated, signed with
//! the sender's ed25519 key, and cut into chunks of at most [`MAX_CHUNK`] bytes so
//! no broker limit has to change. Each chunk carries the envelope in its headers;
//! the receiver reassembles, checks the digest and the signature against the key
//! the federation's plan names for the sender, and only then decodes.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

/// Largest payload of one Kafka message: 512 KiB less room for the headers.
pub const MAX_CHUNK: usize = 512 * 1024 - 8 * 1024;
/// Version of the envelope (with the protocol's in the signed text).
const ENVELOPE: &str = "twinguard-fed/1";

/// Who sent what, for which federation, plan, run and round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub federation: String,
    /// SHA-256 of the plan every party must share.
    pub plan: String,
    /// The aggregator's run (one training of the federation).
    pub run: String,
    /// Round: the task's sequence number in its run.
    pub seq: u64,
    pub from: String,
    pub kind: String,
    /// Sites addressed (tasks only).
    pub to: Vec<String>,
    pub protocol: u32,
}

impl Meta {
    fn signed_text(&self, sha: &str) -> String {
        format!("{ENVELOPE}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{sha}", self.protocol, self.federation, self.plan, self.run, self.seq, self.from, self.kind, self.to.join(","))
    }
}

/// One Kafka message of an envelope.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub headers: Vec<(&'static str, String)>,
    pub payload: Vec<u8>,
}

/// Deflate, sign and cut a body.
pub fn seal(meta: &Meta, body: &[u8], key: &SigningKey) -> Vec<Chunk> {
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(body).expect("in-memory write");
    let packed = z.finish().expect("in-memory write");
    let sha = format!("{:x}", Sha256::digest(&packed));
    let sig = key.sign(meta.signed_text(&sha).as_bytes());
    let sig_hex: String = sig.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let pieces: Vec<&[u8]> = if packed.is_empty() { vec![&packed[..]] } else { packed.chunks(MAX_CHUNK).collect() };
    let n = pieces.len();
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, p)| Chunk {
            headers: vec![
                ("tg-protocol", meta.protocol.to_string()),
                ("tg-federation", meta.federation.clone()),
                ("tg-plan", meta.plan.clone()),
                ("tg-run", meta.run.clone()),
                ("tg-seq", meta.seq.to_string()),
                ("tg-from", meta.from.clone()),
                ("tg-kind", meta.kind.clone()),
                ("tg-to", meta.to.join(",")),
                ("tg-chunk", format!("{}/{n}", i + 1)),
                ("tg-sha256", sha.clone()),
                ("tg-signature", sig_hex.clone()),
            ],
            payload: p.to_vec(),
        })
        .collect()
}

/// Why a message was refused (the dead letter's reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

/// A chunk's envelope fields, read from its headers.
fn header<'h>(h: &'h BTreeMap<String, String>, k: &str) -> Result<&'h str, Refusal> {
    h.get(k).map(String::as_str).ok_or_else(|| Refusal(format!("header `{k}` missing")))
}

struct Partial {
    meta: Meta,
    sha: String,
    sig: String,
    parts: Vec<Option<Vec<u8>>>,
}

/// Reassembles chunks into verified bodies.
#[derive(Default)]
pub struct Assembler {
    open: BTreeMap<(String, String, u64, String), Partial>,
}

impl Assembler {
    /// Take one message; a whole envelope once its last chunk arrived: the verified,
    /// inflated body, or why it was refused.
    pub fn push(&mut self, headers: &BTreeMap<String, String>, payload: &[u8], keys: &BTreeMap<String, VerifyingKey>) -> Option<Result<(Meta, Vec<u8>), Refusal>> {
        let meta = match Self::meta(headers) {
            Ok(m) => m,
            Err(r) => return Some(Err(r)),
        };
        let (i, n) = match header(headers, "tg-chunk").ok().and_then(|c| c.split_once('/')).and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?))) {
            Some((i, n)) if i >= 1 && i <= n && n <= 4096 => (i, n),
            _ => return Some(Err(Refusal("header `tg-chunk` is not i/n".into()))),
        };
        let (sha, sig) = match (header(headers, "tg-sha256"), header(headers, "tg-signature")) {
            (Ok(a), Ok(b)) => (a.to_string(), b.to_string()),
            (Err(r), _) | (_, Err(r)) => return Some(Err(r)),
        };
        let id = (meta.from.clone(), meta.run.clone(), meta.seq, meta.kind.clone());
        let p = self.open.entry(id.clone()).or_insert_with(|| Partial { meta: meta.clone(), sha: sha.clone(), sig: sig.clone(), parts: vec![None; n] });
        let agrees = p.parts.len() == n && p.sha == sha && p.sig == sig && p.meta == meta;
        if agrees {
            p.parts[i - 1] = Some(payload.to_vec());
            if p.parts.iter().any(Option::is_none) {
                return None;
            }
        } else {
            self.open.remove(&id);
            return Some(Err(Refusal("chunks of one message disagree on their envelope".into())));
        }
        let p = self.open.remove(&id).expect("present");
        let packed: Vec<u8> = p.parts.into_iter().flatten().flatten().collect();
        Some(open(&p.meta, &p.sha, &p.sig, &packed, keys).map(|body| (p.meta, body)))
    }

    fn meta(h: &BTreeMap<String, String>) -> Result<Meta, Refusal> {
        Ok(Meta {
            protocol: header(h, "tg-protocol")?.parse().map_err(|_| Refusal("header `tg-protocol` is not a number".into()))?,
            federation: header(h, "tg-federation")?.to_string(),
            plan: header(h, "tg-plan")?.to_string(),
            run: header(h, "tg-run")?.to_string(),
            seq: header(h, "tg-seq")?.parse().map_err(|_| Refusal("header `tg-seq` is not a number".into()))?,
            from: header(h, "tg-from")?.to_string(),
            kind: header(h, "tg-kind")?.to_string(),
            to: header(h, "tg-to")?.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect(),
        })
    }
}

/// Check a whole envelope's digest and signature, and inflate it.
fn open(meta: &Meta, sha: &str, sig: &str, packed: &[u8], keys: &BTreeMap<String, VerifyingKey>) -> Result<Vec<u8>, Refusal> {
    let key = keys.get(&meta.from).ok_or_else(|| Refusal(format!("sender `{}` is not in the federation's plan", meta.from)))?;
    if format!("{:x}", Sha256::digest(packed)) != sha {
        return Err(Refusal("payload does not match its SHA-256 (altered or truncated)".into()));
    }
    let bytes: Vec<u8> = (0..sig.len() / 2).filter_map(|i| sig.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    let sig = Signature::from_slice(&bytes).map_err(|_| Refusal("signature is not 64 bytes of hex".into()))?;
    key.verify(meta.signed_text(sha).as_bytes(), &sig).map_err(|_| Refusal(format!("bad signature: not signed by `{}`'s key in the plan", meta.from)))?;
    let mut body = Vec::new();
    flate2::read::DeflateDecoder::new(packed).take(1 << 30).read_to_end(&mut body).map_err(|e| Refusal(format!("payload does not inflate: {e}")))?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta { federation: "f".into(), plan: "p".into(), run: "r".into(), seq: 3, from: "site-a".into(), kind: "forest".into(), to: vec![], protocol: 1 }
    }

    fn headers(c: &Chunk) -> BTreeMap<String, String> {
        c.headers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    fn keys() -> (SigningKey, BTreeMap<String, VerifyingKey>) {
        let k = SigningKey::from_bytes(&[7u8; 32]);
        (k.clone(), BTreeMap::from([("site-a".to_string(), k.verifying_key())]))
    }

    #[test]
    fn a_large_body_travels_in_chunks_under_the_limit_and_comes_back_whole() {
        let (k, keys) = keys();
        // Incompressible bytes: the chunking is exercised, not the deflate.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let body: Vec<u8> = (0..1_500_000).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        }).collect();
        let chunks = seal(&meta(), &body, &k);
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());
        assert!(chunks.iter().all(|c| c.payload.len() <= MAX_CHUNK));
        let mut a = Assembler::default();
        let mut got = None;
        // Out of order: the last chunk first.
        for c in chunks.iter().rev() {
            if let Some(r) = a.push(&headers(c), &c.payload, &keys) {
                got = Some(r);
            }
        }
        let (m, b) = got.expect("complete").expect("verified");
        assert_eq!(m, meta());
        assert!(b == body);
    }

    #[test]
    fn tampered_unsigned_or_unknown_messages_are_refused_with_the_reason() {
        let (k, keys) = keys();
        let c = seal(&meta(), b"hello", &k).remove(0);
        let refuse = |h: BTreeMap<String, String>, p: &[u8]| Assembler::default().push(&h, p, &keys).expect("one chunk").expect_err("refused").0;
        let mut p = c.payload.clone();
        p[0] ^= 1;
        assert!(refuse(headers(&c), &p).contains("SHA-256"));
        let mut h = headers(&c);
        h.insert("tg-seq".into(), "4".into());
        assert!(refuse(h, &c.payload).contains("bad signature"), "a replayed message re-labelled for another round");
        let other = SigningKey::from_bytes(&[9u8; 32]);
        let forged = seal(&meta(), b"hello", &other).remove(0);
        assert!(refuse(headers(&forged), &forged.payload).contains("bad signature"));
        let mut h = headers(&c);
        h.remove("tg-signature");
        assert!(refuse(h, &c.payload).contains("tg-signature"));
        let stranger = seal(&Meta { from: "site-z".into(), ..meta() }, b"hello", &k).remove(0);
        assert!(refuse(headers(&stranger), &stranger.payload).contains("not in the federation"));
    }
}
