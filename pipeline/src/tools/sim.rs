//! A hospital of simulated medical devices sending flow + vitals telemetry
//! (`wustl-flow-vitals/v1`), with attacks and malformed records injected at known
//! places so detection can be scored against ground truth.
//!
//! Deterministic: the same [`SimConfig`] (seed and start time included) yields the
//! same records in the same order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use twinguard_schemas::decode::event_object;

/// Kinds of device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceType {
    InfusionPump,
    PatientMonitor,
    PulseOximeter,
    Ventilator,
    InsulinPump,
    EcgMonitor,
}

impl DeviceType {
    const ALL: [DeviceType; 6] = [
        DeviceType::PatientMonitor,
        DeviceType::InfusionPump,
        DeviceType::PulseOximeter,
        DeviceType::Ventilator,
        DeviceType::EcgMonitor,
        DeviceType::InsulinPump,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceType::InfusionPump => "infusion_pump",
            DeviceType::PatientMonitor => "patient_monitor",
            DeviceType::PulseOximeter => "pulse_oximeter",
            DeviceType::Ventilator => "ventilator",
            DeviceType::InsulinPump => "insulin_pump",
            DeviceType::EcgMonitor => "ecg_monitor",
        }
    }
    /// (period ms, packets, packet size, flow duration s)
    fn profile(self) -> (f64, f64, f64, f64) {
        match self {
            DeviceType::InfusionPump => (5000.0, 8.0, 180.0, 0.05),
            DeviceType::PatientMonitor => (1000.0, 14.0, 310.0, 0.02),
            DeviceType::PulseOximeter => (2000.0, 6.0, 120.0, 0.01),
            DeviceType::Ventilator => (1000.0, 12.0, 260.0, 0.015),
            DeviceType::InsulinPump => (10000.0, 6.0, 150.0, 0.08),
            DeviceType::EcgMonitor => (500.0, 20.0, 420.0, 0.01),
        }
    }
}

/// Injected attacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttackKind {
    Flooding,
    Spoofing,
    VitalsTampering,
    Scanning,
    FirmwareChange,
}

impl AttackKind {
    pub const ALL: [AttackKind; 5] =
        [AttackKind::Flooding, AttackKind::Spoofing, AttackKind::VitalsTampering, AttackKind::Scanning, AttackKind::FirmwareChange];
    pub fn as_str(self) -> &'static str {
        match self {
            AttackKind::Flooding => "flooding",
            AttackKind::Spoofing => "spoofing",
            AttackKind::VitalsTampering => "vitals_tampering",
            AttackKind::Scanning => "scanning",
            AttackKind::FirmwareChange => "firmware_change",
        }
    }
}

/// Ground truth of one simulated record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truth {
    Normal,
    Attack(AttackKind),
    /// A record the pipeline MUST dead-letter.
    Malformed(&'static str),
}

/// One record for the input topic.
#[derive(Debug, Clone)]
pub struct SimRecord {
    pub key: String,
    pub payload: Vec<u8>,
    pub truth: Truth,
    pub event_time_ms: i64,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub devices: usize,
    pub events: usize,
    pub seed: u64,
    /// Event time of the first event (ms since the epoch).
    pub start_ms: i64,
    /// Fraction of devices that suffer one attack episode.
    pub attacked_fraction: f64,
    /// Probability that a record is replaced by a malformed one.
    pub malformed_rate: f64,
}

impl SimConfig {
    /// `events` spread over `devices`, starting far enough in the past that the whole
    /// run lies before now.
    pub fn new(devices: usize, events: usize, seed: u64) -> Self {
        let devices = devices.max(1);
        // Mean rate ~0.9 events/s per device; leave a margin.
        let span_ms = (events as f64 / devices as f64 * 1100.0 * 2.0) as i64 + 60_000;
        SimConfig {
            devices,
            events,
            seed,
            start_ms: chrono::Utc::now().timestamp_millis() - span_ms,
            attacked_fraction: 0.4,
            malformed_rate: 0.003,
        }
    }
}

struct Episode {
    kind: AttackKind,
    after_events: u64,
    remaining: u32,
}

struct Device {
    id: String,
    kind: DeviceType,
    period: f64,
    pkts: f64,
    pkt_size: f64,
    dur: f64,
    mac: String,
    addr: String,
    server: String,
    port: i64,
    firmware: String,
    vitals: Vitals,
    /// The patient's own normal, which the readings drift around.
    vitals_base: Vitals,
    sent: u64,
    episode: Option<Episode>,
}

#[derive(Clone, Default)]
struct Vitals {
    temp: f64,
    spo2: f64,
    pulse: f64,
    sys: f64,
    dia: f64,
    resp: f64,
    st: f64,
}

/// The simulator: an iterator of records in event-time order.
pub struct Simulator {
    cfg: SimConfig,
    rng: StdRng,
    devices: Vec<Device>,
    queue: BinaryHeap<Reverse<(i64, usize)>>,
    produced: usize,
}

fn hex(rng: &mut StdRng, bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rng.random::<u8>())).collect()
}

fn mac(rng: &mut StdRng) -> String {
    (0..6).map(|_| format!("{:02x}", rng.random::<u8>())).collect::<Vec<_>>().join(":")
}

impl Simulator {
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let wards = ["icu", "ward3", "ward5", "er", "onc"];
        let mut devices = Vec::with_capacity(cfg.devices);
        let mut queue = BinaryHeap::new();
        for i in 0..cfg.devices {
            let kind = DeviceType::ALL[i % DeviceType::ALL.len()];
            let (period, pkts, size, dur) = kind.profile();
            let f = |rng: &mut StdRng| rng.random_range(0.8..1.2);
            let attacked = rng.random_bool(cfg.attacked_fraction.clamp(0.0, 1.0));
            let episode = attacked.then(|| {
                let kind = AttackKind::ALL[rng.random_range(0..AttackKind::ALL.len())];
                Episode { kind, after_events: rng.random_range(80..160), remaining: if kind == AttackKind::Flooding { 40 } else { 15 } }
            });
            let mut d = Device {
                id: format!("{}-{}-{:03}", wards[i % wards.len()], kind.as_str().replace('_', "-"), i),
                kind,
                period: period * f(&mut rng),
                pkts: pkts * f(&mut rng),
                pkt_size: size * f(&mut rng),
                dur: dur * f(&mut rng),
                mac: mac(&mut rng),
                addr: format!("10.{}.{}.{}", 10 + i / 250 % 200, 1 + i / 50 % 200, 2 + i % 250),
                server: format!("10.0.1.{}", 150 + i % 3),
                port: 1111 + (i % 3) as i64,
                firmware: hex(&mut rng, 32),
                vitals: Vitals {
                    temp: rng.random_range(36.2..37.4),
                    spo2: rng.random_range(95.0..99.0),
                    pulse: rng.random_range(62.0..88.0),
                    sys: rng.random_range(108.0..132.0),
                    dia: rng.random_range(68.0..84.0),
                    resp: rng.random_range(12.0..18.0),
                    st: rng.random_range(-0.1..0.1),
                },
                sent: 0,
                episode,
                vitals_base: Vitals::default(),
            };
            d.vitals_base = d.vitals.clone();
            let first = cfg.start_ms + rng.random_range(0..d.period as i64);
            queue.push(Reverse((first, i)));
            devices.push(d);
        }
        Simulator { cfg, rng, devices, queue, produced: 0 }
    }

    /// Device ids and types, for summaries.
    pub fn devices(&self) -> Vec<(String, &'static str)> {
        self.devices.iter().map(|d| (d.id.clone(), d.kind.as_str())).collect()
    }

    /// The hospital's device registry: each device's type, criticality and the
    /// firmware it shipped with (the only approved image).
    pub fn registry(&self) -> Vec<twinguard_schemas::respond::RegistryEntry> {
        use twinguard_schemas::respond::{Criticality, RegistryEntry};
        self.devices
            .iter()
            .map(|d| RegistryEntry {
                device_id: d.id.clone(),
                device_type: d.kind.as_str().to_string(),
                criticality: match d.kind {
                    DeviceType::InfusionPump | DeviceType::Ventilator | DeviceType::InsulinPump => Criticality::LifeCritical,
                    DeviceType::PatientMonitor | DeviceType::EcgMonitor => Criticality::High,
                    DeviceType::PulseOximeter => Criticality::Medium,
                },
                approved_firmware: vec![d.firmware.clone()],
            })
            .collect()
    }

    fn event(&mut self, i: usize, t: i64) -> (Map<String, Value>, Truth) {
        let rng = &mut self.rng;
        let d = &mut self.devices[i];
        let active = d.episode.as_ref().filter(|e| d.sent >= e.after_events && e.remaining > 0).map(|e| e.kind);
        if let (Some(_), Some(e)) = (active, d.episode.as_mut()) {
            e.remaining -= 1;
        }
        d.sent += 1;
        let ln = |rng: &mut StdRng, s: f64| (s * (rng.random::<f64>() * 2.0 - 1.0) * 1.7).exp();
        let (mut pkts, mut size, mut dur) = (
            (d.pkts * ln(rng, 0.15)).round().max(2.0),
            d.pkt_size * ln(rng, 0.04),
            d.dur * ln(rng, 0.25),
        );
        let mut dst = d.server.clone();
        let mut port = d.port;
        let mut src_mac = d.mac.clone();
        let mut firmware = d.firmware.clone();
        match active {
            Some(AttackKind::Flooding) => {
                pkts *= rng.random_range(15.0..30.0);
                size = size.max(900.0) * rng.random_range(1.0..1.5);
                dur *= rng.random_range(1.0..2.0);
            }
            Some(AttackKind::Scanning) => {
                pkts = rng.random_range(1..3) as f64;
                size = 60.0;
                dur = rng.random_range(0.0001..0.0005);
                dst = format!("10.0.{}.{}", rng.random_range(0..4), rng.random_range(1..255));
                port = rng.random_range(1..1024);
            }
            Some(AttackKind::Spoofing) => src_mac = format!("d8:9e:f3:{}", &mac(rng)[9..]),
            Some(AttackKind::FirmwareChange) => firmware = format!("{}{}", &d.firmware[..8], &hex(rng, 28)),
            _ => {}
        }
        let src_pkts = (pkts * 0.6).round().max(1.0);
        let dst_pkts = (pkts - src_pkts).max(1.0);
        let src_bytes = (src_pkts * size).round();
        let dst_bytes = (dst_pkts * 66.0).round();
        let loss = if rng.random_bool(0.004) { 1.0 } else { 0.0 };
        let r = |x: f64, n: i32| (x * 10f64.powi(n)).round() / 10f64.powi(n);
        let sip = dur * 1000.0 / src_pkts;
        let dip = dur * 1000.0 / dst_pkts;
        let mut m = Map::new();
        m.insert("device_type".into(), json!(d.kind.as_str()));
        m.insert("src_addr".into(), json!(d.addr));
        m.insert("src_mac".into(), json!(src_mac));
        m.insert("dst_addr".into(), json!(dst));
        m.insert("dst_port".into(), json!(port));
        m.insert("firmware_hash".into(), json!(firmware));
        let flow = [
            ("src_bytes", src_bytes),
            ("dst_bytes", dst_bytes),
            ("src_load", r(src_bytes * 8.0 / dur, 0)),
            ("dst_load", r(dst_bytes * 8.0 / dur, 0)),
            ("src_gap", 0.0),
            ("dst_gap", 0.0),
            ("src_int_pkt", r(sip, 4)),
            ("dst_int_pkt", r(dip, 4)),
            ("src_int_pkt_act", 0.0),
            ("dst_int_pkt_act", 0.0),
            ("src_jitter", r(sip * rng.random_range(0.2..0.6), 4)),
            ("dst_jitter", r(dip * rng.random_range(0.2..0.6), 4)),
            ("s_max_pkt_sz", r(size * 1.1, 0)),
            ("d_max_pkt_sz", 66.0),
            ("s_min_pkt_sz", 60.0),
            ("d_min_pkt_sz", 60.0),
            ("dur", r(dur, 6)),
            ("trans", 1.0),
            ("tot_pkts", src_pkts + dst_pkts),
            ("tot_bytes", src_bytes + dst_bytes),
            ("load", r((src_bytes + dst_bytes) * 8.0 / dur, 0)),
            ("loss", loss),
            ("p_loss", r(loss * 100.0 / (src_pkts + dst_pkts), 4)),
            ("p_src_loss", r(loss * 100.0 / src_pkts, 4)),
            ("p_dst_loss", 0.0),
            ("rate", r((src_pkts + dst_pkts) / dur, 3)),
        ];
        for (k, v) in flow {
            m.insert(k.into(), json!(v));
        }
        // Vitals drift slowly (a random walk pulled back to the patient's baseline).
        let v = &mut d.vitals;
        let b = &d.vitals_base;
        let walk = |rng: &mut StdRng, x: &mut f64, base: f64, sd: f64| *x += 0.05 * (base - *x) + rng.random_range(-sd..sd);
        walk(rng, &mut v.pulse, b.pulse, 1.0);
        walk(rng, &mut v.spo2, b.spo2, 0.3);
        walk(rng, &mut v.sys, b.sys, 1.0);
        walk(rng, &mut v.resp, b.resp, 0.3);
        let mut shown = v.clone();
        if active == Some(AttackKind::VitalsTampering) {
            // Man-in-the-middle alteration: plausible-looking but false readings.
            shown.spo2 = rng.random_range(82.0..87.0);
            shown.pulse += rng.random_range(35.0..55.0);
            shown.sys += rng.random_range(35.0..50.0);
        }
        let vit = |m: &mut Map<String, Value>, k: &str, x: f64, n: i32| {
            m.insert(k.into(), json!(r(x, n)));
        };
        match d.kind {
            DeviceType::PatientMonitor | DeviceType::EcgMonitor => {
                vit(&mut m, "temp", shown.temp, 1);
                vit(&mut m, "spo2", shown.spo2.min(100.0), 0);
                vit(&mut m, "pulse_rate", shown.pulse, 0);
                vit(&mut m, "heart_rate", shown.pulse + 1.0, 0);
                vit(&mut m, "sys", shown.sys, 0);
                vit(&mut m, "dia", shown.dia, 0);
                vit(&mut m, "resp_rate", shown.resp, 0);
                vit(&mut m, "st", shown.st, 2);
            }
            DeviceType::PulseOximeter => {
                vit(&mut m, "spo2", shown.spo2.min(100.0), 0);
                vit(&mut m, "pulse_rate", shown.pulse, 0);
            }
            DeviceType::Ventilator => vit(&mut m, "resp_rate", shown.resp, 0),
            DeviceType::InfusionPump | DeviceType::InsulinPump => {}
        }
        let truth = active.map_or(Truth::Normal, Truth::Attack);
        (event_object(&d.id, t, m), truth)
    }

    fn malform(&mut self, key: &str, mut obj: Map<String, Value>) -> (String, Vec<u8>, &'static str) {
        const KINDS: [&str; 8] =
            ["not_json", "missing_device_id", "nan", "wrong_type", "absurd_timestamp", "oversized", "key_mismatch", "out_of_range"];
        let kind = KINDS[self.rng.random_range(0..KINDS.len())];
        let mut key = key.to_string();
        let bytes = match kind {
            "not_json" => {
                let s = serde_json::to_string(&obj).expect("json");
                s[..s.len() / 2].as_bytes().to_vec()
            }
            "missing_device_id" => {
                obj.remove("device_id");
                serde_json::to_vec(&obj).expect("json")
            }
            "nan" => serde_json::to_string(&obj).expect("json").replacen("\"src_bytes\":", "\"src_bytes\":NaN,\"x\":", 1).into_bytes(),
            "wrong_type" => {
                obj.insert("src_bytes".into(), json!("lots"));
                serde_json::to_vec(&obj).expect("json")
            }
            "absurd_timestamp" => {
                obj.insert("event_time".into(), json!("2999-01-01T00:00:00Z"));
                serde_json::to_vec(&obj).expect("json")
            }
            "oversized" => {
                obj.insert("padding".into(), json!("x".repeat(70_000)));
                serde_json::to_vec(&obj).expect("json")
            }
            "key_mismatch" => {
                key = format!("{key}-other");
                serde_json::to_vec(&obj).expect("json")
            }
            _ => {
                obj.insert("rate".into(), json!(-5.0));
                serde_json::to_vec(&obj).expect("json")
            }
        };
        (key, bytes, kind)
    }
}

impl Iterator for Simulator {
    type Item = SimRecord;

    fn next(&mut self) -> Option<SimRecord> {
        if self.produced >= self.cfg.events {
            return None;
        }
        let Reverse((t, i)) = self.queue.pop()?;
        let (obj, truth) = self.event(i, t);
        let d = &self.devices[i];
        let step = match truth {
            Truth::Attack(AttackKind::Flooding) => d.period / 25.0,
            Truth::Attack(AttackKind::Scanning) => d.period / 5.0,
            Truth::Attack(AttackKind::Spoofing) => d.period / 2.0,
            _ => d.period,
        };
        let next = t + (step * self.rng.random_range(0.9..1.1)).max(1.0) as i64;
        self.queue.push(Reverse((next, i)));
        let key = d.id.clone();
        self.produced += 1;
        // Malformed records replace normal events only, so attack counts stay exact.
        if truth == Truth::Normal && self.rng.random_bool(self.cfg.malformed_rate.clamp(0.0, 1.0)) {
            let (key, payload, kind) = self.malform(&key, obj);
            return Some(SimRecord { key, payload, truth: Truth::Malformed(kind), event_time_ms: t });
        }
        Some(SimRecord { key, payload: serde_json::to_vec(&obj).expect("json"), truth, event_time_ms: t })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinguard_schemas::{Decoder, EventSchema, RawRecord};

    #[test]
    fn deterministic_and_decodable() {
        let mut cfg = SimConfig::new(12, 3000, 7);
        cfg.start_ms = 1_700_000_000_000;
        let a: Vec<SimRecord> = Simulator::new(cfg.clone()).collect();
        let b: Vec<SimRecord> = Simulator::new(cfg).collect();
        assert_eq!(a.len(), 3000);
        assert!(a.iter().zip(&b).all(|(x, y)| x.payload == y.payload && x.key == y.key));
        let dec = Decoder::new(EventSchema::builtin("wustl-flow-vitals/v1").unwrap(), Default::default());
        let raw: Vec<RawRecord<'_>> = a
            .iter()
            .enumerate()
            .map(|(i, r)| RawRecord { partition: 0, offset: i as i64, key: Some(r.key.as_bytes()), payload: Some(&r.payload) })
            .collect();
        let out = dec.decode(&raw, 1_800_000_000_000).unwrap();
        let malformed: Vec<usize> =
            a.iter().enumerate().filter(|(_, r)| matches!(r.truth, Truth::Malformed(_))).map(|(i, _)| i).collect();
        let rejected: Vec<usize> = out.rejects.iter().map(|r| r.index).collect();
        assert_eq!(rejected, malformed, "exactly the malformed records are rejected: {:?}", out.rejects);
        assert!(a.iter().any(|r| matches!(r.truth, Truth::Attack(_))));
    }
}
