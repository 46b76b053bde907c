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
