//! Semantic checks of a loaded configuration: every error names its key
//! ([`PipelineError::Config`]), including the librdkafka timing properties the
//! delivery guarantee and the rebalance bounds rest on.

use super::*;

impl Config {
    /// Semantic checks; the message names the key.
    pub fn validate(&self) -> Result<(), PipelineError> {
        let nonempty = [
            ("kafka.brokers", &self.kafka.brokers),
            ("kafka.group_id", &self.kafka.group_id),
            ("topics.input", &self.topics.input),
            ("topics.verdicts", &self.topics.verdicts),
            ("topics.dlq", &self.topics.dlq),
            ("topics.changelog", &self.topics.changelog),
            ("topics.alerts", &self.topics.alerts),
            ("topics.commands", &self.topics.commands),
            ("topics.acks", &self.topics.acks),
            ("topics.feedback", &self.topics.feedback),
            ("topics.audit", &self.topics.audit),
        ];
        for (k, v) in nonempty {
            if v.trim().is_empty() {
                return Err(PipelineError::config(k.to_string(), "must not be empty"));
            }
        }
        let t = &self.topics;
        let names = [&t.input, &t.verdicts, &t.dlq, &t.changelog, &t.alerts, &t.commands, &t.acks, &t.feedback, &t.audit];
        for (i, a) in names.iter().enumerate() {
            if names[i + 1..].contains(a) {
                return Err(PipelineError::config("topics", format!("`{a}` is used for two roles; every topic must be distinct")));
            }
        }
        if self.model.follow.is_some() && self.model.target_fpr.is_some() {
            return Err(PipelineError::config(
                "model.target_fpr",
                "applies to `model.path` only: a followed federation's threshold comes from its merged score histograms (no validation scores cross a site's boundary)",
            ));
        }
        if self.model.site.is_some() && self.model.target_fpr.is_some() {
            return Err(PipelineError::config("model.site", "and `model.target_fpr` cannot both be set: a site's own threshold is set for the model's target (its validation scores stay at the site)"));
        }
        if self.model.site.is_some() && self.model.path.is_none() && self.model.follow.is_none() {
            return Err(PipelineError::config("model.site", "needs a federation's model: set `model.path` or `model.follow`"));
        }
        if self.batch.max_records == 0 {
            return Err(PipelineError::config("batch.max_records", "must be at least 1"));
        }
        if let Some(n) = self.engine.workers {
            if n == 0 || n > super::MAX_WORKERS {
                return Err(PipelineError::config("engine.workers", format!("must be 1..={}, got {n}", super::MAX_WORKERS)));
            }
        }
        if self.engine.close_timeout_secs == 0 {
            return Err(PipelineError::config("engine.close_timeout_secs", "must be at least 1"));
        }
        if self.batch.max_inflight_batches == 0 {
            return Err(PipelineError::config("batch.max_inflight_batches", "must be at least 1"));
        }
        if self.topics.partitions < 1 || self.topics.replication < 1 {
            return Err(PipelineError::config("topics.partitions", "`topics.partitions` and `topics.replication` must be at least 1"));
        }
        if self.decode.max_record_bytes == 0 {
            return Err(PipelineError::config("decode.max_record_bytes", "must be at least 1"));
        }
        chrono::DateTime::parse_from_rfc3339(&self.decode.min_event_time)
            .map_err(|e| PipelineError::config("decode.min_event_time", format!("not RFC 3339: {e}")))?;
        if self.schema.name.is_some() && self.schema.file.is_some() {
            return Err(PipelineError::config("schema", "set only one of `schema.name` and `schema.file`"));
        }
        fn section(name: &'static str) -> impl Fn(twinguard_operators::InvalidSetting) -> PipelineError {
            move |e| PipelineError::config(format!("{name}.{}", e.key), e.reason)
        }
        self.state.validate().map_err(section("state"))?;
        if self.state.idle_ttl_secs <= self.decode.max_future_secs {
            return Err(PipelineError::config(
                "state.idle_ttl_secs",
                format!(
                    "{} must be greater than `decode.max_future_secs` ({}): an event dated as far ahead as the decoder accepts must not by itself make its device look idle",
                    self.state.idle_ttl_secs, self.decode.max_future_secs
                ),
            ));
        }
        self.validate_kafka()?;
        self.validate_sql()?;
        self.response.validate().map_err(section("response"))?;
        self.gating.validate().map_err(section("gating"))?;
        self.audit.validate()?;
        Ok(())
    }

    /// librdkafka properties: the managed ones are refused, the timing ones that
    /// the delivery guarantee and the rebalance bounds rest on are range-checked.
    fn validate_kafka(&self) -> Result<(), PipelineError> {
        for (section, props) in [("properties", &self.kafka.properties), ("consumer", &self.kafka.consumer), ("producer", &self.kafka.producer)] {
            for k in props.keys() {
                if MANAGED.contains(&k.as_str()) {
                    return Err(PipelineError::config(format!("kafka.{section}.\"{k}\""), "twinguard manages this property (it guards the delivery guarantees)"));
                }
            }
        }
        let ms = |section: &str, key: &str, v: &str| -> Result<u64, PipelineError> {
            v.trim().parse::<u64>().map_err(|_| PipelineError::config(format!("kafka.{section}.\"{key}\""), format!("`{v}` is not a whole number of milliseconds")))
        };
        let timeout = self.message_timeout_ms()?;
        if !(1_000..=900_000).contains(&timeout) {
            return Err(PipelineError::config(
                "message.timeout.ms",
                format!("{timeout} must be in 1000..=900000 (0 means \"retry forever\": a stop would wait forever for a delivery)"),
            ));
        }
        let poll = match self.kafka.consumer.get(MAX_POLL).or(self.kafka.properties.get(MAX_POLL)) {
            Some(v) => ms("consumer", MAX_POLL, v)?,
            None => self.max_poll_interval_ms(),
        };
        let needed = self.batch.restore_timeout_secs.saturating_mul(1000).saturating_add(timeout).saturating_add(MAX_POLL_MARGIN_MS);
        if poll < needed {
            return Err(PipelineError::config(
                MAX_POLL,
                format!(
                    "{poll} must exceed `batch.restore_timeout_secs` ({} s) + `message.timeout.ms` ({timeout}) + {} s: a member that spends longer in a rebalance callback or waiting for a delivery is evicted while it still writes",
                    self.batch.restore_timeout_secs,
                    MAX_POLL_MARGIN_MS / 1000
                ),
            ));
        }
        Ok(())
    }

    /// The sink producers' `message.timeout.ms` (configured, or the default).
    pub fn message_timeout_ms(&self) -> Result<u64, PipelineError> {
        match self.kafka.producer.get("message.timeout.ms").or(self.kafka.properties.get("message.timeout.ms")) {
            Some(v) => v.trim().parse::<u64>().map_err(|_| PipelineError::config("message.timeout.ms", format!("`{v}` is not a whole number of milliseconds"))),
            None => Ok(DEFAULT_MESSAGE_TIMEOUT_MS),
        }
    }

    /// The consumer's `max.poll.interval.ms`: configured, or twinguard's default
    /// (the restore timeout plus the delivery timeout plus a margin, at least 300 s).
    pub fn max_poll_interval_ms(&self) -> u64 {
        if let Some(v) = self.kafka.consumer.get(MAX_POLL).or(self.kafka.properties.get(MAX_POLL)).and_then(|v| v.trim().parse().ok()) {
            return v;
        }
        let t = self.message_timeout_ms().unwrap_or(DEFAULT_MESSAGE_TIMEOUT_MS);
        self.batch.restore_timeout_secs.saturating_mul(1000).saturating_add(t).saturating_add(MAX_POLL_MARGIN_MS).max(300_000)
    }

    /// The SQL, HTTP and OpenTelemetry sections.
    fn validate_sql(&self) -> Result<(), PipelineError> {
        let q = &self.sql;
        if q.listen.is_some() && q.users.is_empty() {
            return Err(PipelineError::config("sql.users", "the SQL endpoint needs at least one user (`[[sql.users]] name = ..., password_env = ...`)"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for u in &q.users {
            if u.name.trim().is_empty() {
                return Err(PipelineError::config("sql.users", "a user has an empty `name`"));
            }
            if !seen.insert(&u.name) {
                return Err(PipelineError::config("sql.users", format!("user `{}` is listed twice", u.name)));
            }
        }
        for (k, v) in [("sql.recent_rows", q.recent_rows), ("sql.max_rows", q.max_rows), ("sql.max_connections", q.max_connections), ("sql.max_memory_mb", q.max_memory_mb)] {
            if v == 0 {
                return Err(PipelineError::config(k.to_string(), "must be at least 1"));
            }
        }
        if q.query_timeout_ms == 0 || q.refresh_ms == 0 || q.login_timeout_ms == 0 {
            return Err(PipelineError::config("sql.query_timeout_ms", "`sql.query_timeout_ms`, `sql.refresh_ms` and `sql.login_timeout_ms` must be at least 1"));
        }
        if let Some(l) = &q.listen {
            l.parse::<std::net::SocketAddr>().map_err(|e| PipelineError::config("sql.listen", format!("`{l}` is not host:port ({e})")))?;
        }
        if !self.http.listen.is_empty() {
            self.http.listen.parse::<std::net::SocketAddr>().map_err(|e| PipelineError::config("http.listen", format!("`{}` is not host:port ({e})", self.http.listen)))?;
        }
        if let Some(e) = &self.otel.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(PipelineError::config("otel.endpoint", format!("`{e}` must start with http:// or https://")));
            }
        }
        if self.otel.export_interval_ms == 0 {
            return Err(PipelineError::config("otel.export_interval_ms", "must be at least 1"));
        }
        Ok(())
    }
}
