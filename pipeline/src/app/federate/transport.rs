//! One party's connection to the federation's topics: send signed envelopes and
//! wait for them, every acknowledged write confirmed, every refused message
//! dead-lettered with its reason.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ed25519_dalek::{SigningKey, VerifyingKey};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::envelope::{seal, Assembler, Meta, Refusal};
use super::{FederationFile, Topics};

/// A verified message: its envelope and body.
pub struct Received {
    pub meta: Meta,
    pub body: Vec<u8>,
}

pub struct Transport {
    pub fed: FederationFile,
    pub topics: Topics,
    pub me: String,
    pub plan: String,
    key: SigningKey,
    keys: BTreeMap<String, VerifyingKey>,
    producer: FutureProducer,
    consumer: BaseConsumer,
    assembler: Assembler,
    rt: tokio::runtime::Runtime,
    /// Bytes this party wrote, per kind.
    pub sent: BTreeMap<String, usize>,
    /// Messages refused (dead-lettered).
    pub refused: usize,
    /// A read-only pass (a site's scan of finished runs): refusals are skipped, not
    /// dead-lettered again.
    pub scan_only: bool,
}

/// A message's headers as text.
pub(super) fn headers_of(m: &impl Message) -> BTreeMap<String, String> {
    m.headers()
        .map(|h| h.iter().map(|x| (x.key.to_string(), String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned())).collect())
        .unwrap_or_default()
}

/// Refuse a message of another federation, plan or protocol before reassembling it.
pub(super) fn screen(headers: &BTreeMap<String, String>, federation: &str, plan: &str) -> Result<(), String> {
    if headers.get("tg-federation").map(String::as_str) != Some(federation) || headers.get("tg-plan").map(String::as_str) != Some(plan) {
        return Err(format!("federation/plan {:?}/{:?} is not this party's {federation}/{plan}", headers.get("tg-federation"), headers.get("tg-plan")));
    }
    let protocol = twinguard_models::federated::protocol::PROTOCOL;
    if headers.get("tg-protocol").map(String::as_str) != Some(&protocol.to_string()) {
        return Err(format!("protocol {:?} is not {protocol}", headers.get("tg-protocol")));
    }
    Ok(())
}

/// A consumer of the federation's topics that reads by assignment and commits
/// nothing; `purpose` names its group (`twinguard-fed-<purpose>`).
pub(super) fn reader(fed: &FederationFile, purpose: &str) -> Result<BaseConsumer> {
    client(fed)
        .set("group.id", format!("twinguard-fed-{purpose}"))
        .set("enable.auto.commit", "false")
        .create()
        .with_context(|| format!("creating the federation's consumer ({purpose})"))
}

pub(super) fn client(fed: &FederationFile) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &fed.brokers);
    for (k, v) in &fed.properties {
        c.set(k, v);
    }
    c
}

impl Transport {
    /// Connect as `me`, creating the federation's topics where missing, reading
    /// `read` (from its beginning when `from_start`, else from its current end).
    pub fn connect(fed: &FederationFile, me: &str, key: SigningKey, read: &[&str], from_start: bool) -> Result<Transport> {
        let topics = fed.topics();
        let keys = fed.keys()?;
        let producer: FutureProducer = client(fed)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.max.bytes", (1024 * 1024).to_string())
            .create()
            .context("creating the federation's producer")?;
        let consumer = reader(fed, me)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the transport's runtime")?;
        let t = Transport { fed: fed.clone(), plan: fed.plan_hash(), me: me.to_string(), topics, key, keys, producer, consumer, assembler: Assembler::default(), rt, sent: BTreeMap::new(), refused: 0, scan_only: false };
        t.create_topics()?;
        let mut tpl = TopicPartitionList::new();
        for topic in read {
            let offset = if from_start {
                Offset::Beginning
            } else {
                let (_, high) = t.consumer.fetch_watermarks(topic, 0, Duration::from_secs(30)).with_context(|| format!("reading the end of topic `{topic}`"))?;
                Offset::Offset(high)
            };
            tpl.add_partition_offset(topic, 0, offset).context("assigning")?;
        }
        t.consumer.assign(&tpl).context("assigning the federation's topics")?;
        Ok(t)
    }

    fn create_topics(&self) -> Result<()> {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> = client(&self.fed).create().context("creating the admin client")?;
        let t = &self.topics;
        let names = [&t.plan, &t.updates, &t.evaluations, &t.artifacts, &t.model, &t.dlq, &t.audit];
        // Kept for ever: a follower restarting must find every artifact its
        // partitions activated, and the audit chain its first record.
        let new: Vec<NewTopic<'_>> = names.iter().map(|n| NewTopic::new(n, 1, TopicReplication::Fixed(1)).set("retention.ms", "-1")).collect();
        let res = self.rt.block_on(admin.create_topics(&new, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))))).context("creating the federation's topics")?;
        for r in res {
            if let Err((name, code)) = r {
                if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                    anyhow::bail!("creating topic `{name}`: {code}");
                }
            }
        }
        // Every party reads partition 0 only, in order: a topic that already
        // existed with more partitions (created by hand, or auto-created by a
        // producer that came first) would leave the others' messages unseen and the
        // federation waiting for answers that never come.
        let md = self.consumer.fetch_metadata(None, Duration::from_secs(30)).context("reading the federation topics' metadata")?;
        for t in md.topics().iter().filter(|t| names.iter().any(|n| n.as_str() == t.name())) {
            if t.partitions().len() != 1 {
                anyhow::bail!(
                    "federation topic `{}` has {} partitions; every federation topic must have exactly one (delete it, or give the federation another topic_prefix)",
                    t.name(),
                    t.partitions().len()
                );
            }
        }
        Ok(())
    }

    /// The end (high watermark) of a topic's partition.
    pub fn end_of(&self, topic: &str) -> Result<i64> {
        Ok(self.consumer.fetch_watermarks(topic, 0, Duration::from_secs(30)).with_context(|| format!("reading the end of topic `{topic}`"))?.1)
    }

    /// The next offset this party reads of a topic (0 before the first read).
    pub fn position(&self, topic: &str) -> Result<i64> {
        let p = self.consumer.position().context("reading the consumer's position")?;
        Ok(p.find_partition(topic, 0).and_then(|e| e.offset().to_raw()).filter(|&o| o >= 0).unwrap_or(0))
    }

    /// Seal and write a body to `topic`; returns once the broker acknowledged every chunk.
    pub fn send(&mut self, topic: &str, run: &str, seq: u64, kind: &str, to: &[String], body: &[u8]) -> Result<usize> {
        let meta = Meta { federation: self.fed.id.clone(), plan: self.plan.clone(), run: run.into(), seq, from: self.me.clone(), kind: kind.into(), to: to.to_vec(), protocol: twinguard_models::federated::protocol::PROTOCOL };
        let chunks = seal(&meta, body, &self.key);
        let mut bytes = 0;
        for c in &chunks {
            let mut h = OwnedHeaders::new();
            for (k, v) in &c.headers {
                h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
            }
            bytes += c.payload.len();
            let rec = FutureRecord::to(topic).key(self.me.as_bytes()).payload(&c.payload).headers(h);
            self.rt.block_on(self.producer.send(rec, Duration::from_secs(60))).map_err(|(e, _)| anyhow::anyhow!("writing to `{topic}`: {e}"))?;
        }
        *self.sent.entry(kind.to_string()).or_default() += bytes;
        Ok(bytes)
    }

    /// Append a record to this party's audit chain (`<prefix>.audit`, one chain,
    /// signed with its key), continuing from the chain's verified tail; returns
    /// once the broker acknowledged it.
    pub fn append_audit(&mut self, kind: twinguard_schemas::respond::AuditKind, body: serde_json::Value) -> Result<()> {
        let topic = self.topics.audit.clone();
        let records = read_topic(&self.fed, &topic, Duration::from_secs(60))?;
        let mut log = twinguard_operators::audit::AuditLog::new(self.key.to_bytes());
        log.continue_from(0, records.last().map(|(_, b)| b.as_slice()))
            .map_err(|e| anyhow::anyhow!("the audit chain on `{topic}` cannot be continued: its last record is {e}; run `twinguard audit verify --federation`"))?;
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        for (_, bytes) in log.append_all(0, kind, at, None, body) {
            let rec = FutureRecord::to(&topic).key(self.me.as_bytes()).payload(&bytes).partition(0);
            self.rt.block_on(self.producer.send(rec, Duration::from_secs(60))).map_err(|(e, _)| anyhow::anyhow!("writing to `{topic}`: {e}"))?;
        }
        Ok(())
    }

    /// Write a refused message to the dead-letter topic with its reason.
    pub fn dead_letter(&mut self, from_topic: &str, headers: &BTreeMap<String, String>, payload: &[u8], reason: &str) -> Result<()> {
        self.refused += 1;
        if self.scan_only {
            return Ok(());
        }
        tracing::warn!(topic = from_topic, reason, "federation message refused (dead-lettered)");
        let mut h = OwnedHeaders::new().insert(Header { key: "tg-reason", value: Some(reason.as_bytes()) }).insert(Header { key: "tg-source-topic", value: Some(from_topic.as_bytes()) });
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
        }
        let dlq = self.topics.dlq.clone();
        let rec = FutureRecord::to(&dlq).key(self.me.as_bytes()).payload(payload).headers(h);
        self.rt.block_on(self.producer.send(rec, Duration::from_secs(60))).map_err(|(e, _)| anyhow::anyhow!("writing to `{dlq}`: {e}"))?;
        Ok(())
    }

    /// The next verified message of this federation and plan, waiting up to `wait`.
    /// Messages refused on the way are dead-lettered (and `accept` may refuse more:
    /// a stale round, a sender not addressed).
    pub fn receive(&mut self, wait: Duration, accept: &mut dyn FnMut(&Meta) -> Result<(), String>) -> Result<Option<(String, Received)>> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let Some(m) = self.consumer.poll(Duration::from_millis(200)) else { continue };
            let m = m.context("reading the federation's topics")?;
            let headers = headers_of(&m);
            let topic = m.topic().to_string();
            let payload = m.payload().unwrap_or_default().to_vec();
            drop(m);
            if let Err(reason) = screen(&headers, &self.fed.id, &self.plan) {
                self.dead_letter(&topic, &headers, &payload, &reason)?;
                continue;
            }
            match self.assembler.push(&headers, &payload, &self.keys) {
                None => continue,
                Some(Err(Refusal(reason))) => self.dead_letter(&topic, &headers, &payload, &reason)?,
                Some(Ok((meta, body))) => match accept(&meta) {
                    Ok(()) => return Ok(Some((topic, Received { meta, body }))),
                    Err(reason) => self.dead_letter(&topic, &headers, b"", &reason)?,
                },
            }
        }
        Ok(None)
    }
}

/// Every record of partition 0 of `topic` (offset, value), read to its end.
pub fn read_topic(fed: &FederationFile, topic: &str, timeout: Duration) -> Result<Vec<(i64, Vec<u8>)>> {
    let consumer = reader(fed, &format!("{}-read", fed.id))?;
    let (low, high) = consumer.fetch_watermarks(topic, 0, timeout).with_context(|| format!("reading the end of `{topic}`"))?;
    let mut out = Vec::new();
    if high <= low {
        return Ok(out);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low)).context("assigning")?;
    consumer.assign(&tpl).with_context(|| format!("assigning `{topic}`"))?;
    let deadline = Instant::now() + timeout;
    while out.last().is_none_or(|(o, _)| *o + 1 < high) {
        if Instant::now() > deadline {
            anyhow::bail!("reading `{topic}` to its end took over {} s", timeout.as_secs());
        }
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.with_context(|| format!("reading `{topic}`"))?;
            out.push((m.offset(), m.payload().unwrap_or_default().to_vec()));
        }
    }
    Ok(out)
}
