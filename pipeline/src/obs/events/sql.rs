//! Events of SQL serving: logins, the view's refresher, and the fleet reader.

use super::*;

/// A SQL login was refused: a wrong password or an unknown user (`throttled` false:
/// the password was checked, `failures` from this address so far, and the back-off
/// that failure started), or a login from an address still backed off (`throttled`
/// true: refused unchecked, `backoff` left).
pub struct SqlLoginFailed<'a> {
    pub peer: std::net::IpAddr,
    pub user: &'a str,
    pub throttled: bool,
    pub failures: u32,
    pub backoff: Option<std::time::Duration>,
}

impl SqlLoginFailed<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("SqlLoginFailed");
        // A client chooses the name: at most 64 characters of it in the log.
        let user: String = self.user.chars().take(64).collect();
        let backoff_ms = self.backoff.map(|b| b.as_millis() as u64);
        if self.throttled {
            tracing::warn!(peer = %self.peer, user = %user, backoff_left_ms = ?backoff_ms, "SQL login refused: too many failed logins from this address");
            m.sql_throttled_logins.fetch_add(1, Relaxed);
        } else {
            tracing::warn!(peer = %self.peer, user = %user, failures = self.failures, backoff_ms = ?backoff_ms, "SQL login failed (wrong password or unknown user)");
            m.sql_failed_logins.fetch_add(1, Relaxed);
        }
    }
}

/// A refresh of the SQL view failed (a panic while building its tables): the last
/// snapshot stays published and the next refresh tries again.
pub struct SqlRefreshFailed<'a> {
    pub error: &'a str,
}

impl SqlRefreshFailed<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("SqlRefreshFailed");
        tracing::error!(error = self.error, "SQL view refresh failed: queries see the previous snapshot until a refresh succeeds");
        m.sql_refresh_failures.fetch_add(1, Relaxed);
    }
}

/// The SQL view published a snapshot; `age`: how old its newest staged change was.
pub struct SqlSnapshotPublished {
    pub age: std::time::Duration,
}

impl SqlSnapshotPublished {
    pub fn emit(&self) {
        note("SqlSnapshotPublished");
        Instruments::get().sql_freshness.record(self.age.as_secs_f64(), &[]);
    }
}

/// The SQL view's refresher turned (a heartbeat: `/healthz` fails if it stops).
pub struct SqlViewTurned;

impl SqlViewTurned {
    pub fn emit(&self, m: &Metrics) {
        note("SqlViewTurned");
        m.sql_refresh_beat_ms.store(chrono::Utc::now().timestamp_millis(), Relaxed);
    }
}

/// A twin change the stream encoded itself did not decode for the SQL view (a bug:
/// the twin is left out of the view; the stream is unaffected).
pub struct TwinRowUndecodable<'a> {
    pub device: &'a str,
    pub error: &'a str,
}

impl TwinRowUndecodable<'_> {
    pub fn emit(&self) {
        note("TwinRowUndecodable");
        tracing::error!(device = self.device, error = self.error, "twin change not shown in SQL: it does not decode");
    }
}

/// The SQL view's refresh bound (`/healthz` reports a view that stopped refreshing).
pub struct RefreshLimitSet {
    pub millis: i64,
}

impl RefreshLimitSet {
    pub fn emit(&self, m: &Metrics) {
        note("RefreshLimitSet");
        m.sql_refresh_limit_ms.store(self.millis, Relaxed);
    }
}

/// `twinguard sql` starts reading every twin from the changelog.
pub struct FleetReading<'a> {
    pub changelog: &'a str,
    pub partitions: &'a [i32],
    pub schema: &'a str,
    pub stall_limit_ms: i64,
}

impl FleetReading<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("FleetReading");
        tracing::info!(changelog = %self.changelog, partitions = self.partitions.len(), "materialising every twin from the changelog");
        *m.schema_id.lock().expect("info lock") = self.schema.to_string();
        m.set_owned(self.partitions.to_vec());
        m.stall_limit_ms.store(self.stall_limit_ms, Relaxed);
    }
}

/// `twinguard sql` shows every twin the changelog held at its start: ready.
pub struct FleetReady {
    pub twins: usize,
    /// Time from the start of the read; `None` when the changelog was empty.
    pub millis: Option<u64>,
    pub view_rows: u64,
    pub view_bytes: u64,
}

impl FleetReady {
    pub fn emit(&self, m: &Metrics) {
        note("FleetReady");
        tracing::info!(twins = self.twins, millis = self.millis, view_rows = self.view_rows, view_bytes = self.view_bytes, "every twin materialised; ready");
        m.set_ready(true);
    }
}

/// The fleet reader (`twinguard sql`) skipped a record it cannot read (a changelog
/// twin, or a verdict, alert or command of the recent windows). Nothing is
/// dead-lettered: the record stays where it is (a pipeline's restore quarantines
/// an unreadable twin).
pub struct FleetRecordSkipped<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub what: &'a str,
    pub error: &'a str,
}

impl FleetRecordSkipped<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("FleetRecordSkipped");
        tracing::warn!(topic = self.topic, partition = self.partition, offset = self.offset, error = self.error, "skipping a record that is not a {}", self.what);
        m.fleet_records_skipped.fetch_add(1, Relaxed);
    }
}

/// Changelog records were read (the fleet reader, one at a time).
pub struct ChangelogRead {
    pub records: u64,
}

impl ChangelogRead {
    pub fn emit(&self, m: &Metrics) {
        note("ChangelogRead");
        m.changelog_in.fetch_add(self.records, Relaxed);
    }
}

/// The SQL endpoint is listening.
pub struct SqlServing {
    pub addr: std::net::SocketAddr,
    pub tls: bool,
    pub channel_binding: bool,
    pub users: usize,
}

impl SqlServing {
    pub fn emit(&self) {
        note("SqlServing");
        tracing::info!(addr = %self.addr, tls = self.tls, channel_binding = self.channel_binding, users = self.users, "serving SQL (Postgres wire protocol, read-only)");
    }
}

/// SCRAM-SHA-256-PLUS (channel binding) is not offered: `detail` says why.
pub struct SqlChannelBindingUnavailable<'a> {
    pub detail: &'a str,
    pub error: &'a str,
}

impl SqlChannelBindingUnavailable<'_> {
    pub fn emit(&self) {
        note("SqlChannelBindingUnavailable");
        tracing::warn!(error = %self.error, "SQL endpoint: no SCRAM-SHA-256-PLUS channel binding {}", self.detail);
    }
}

/// Accepting a SQL connection failed (retried after 100 ms).
pub struct SqlAcceptFailed<'a> {
    pub error: &'a str,
}

impl SqlAcceptFailed<'_> {
    pub fn emit(&self) {
        note("SqlAcceptFailed");
        tracing::warn!(error = %self.error, "SQL endpoint: accept failed");
    }
}

/// A SQL connection was refused: `sql.max_connections` are open.
pub struct SqlConnectionRefused {
    pub peer: std::net::SocketAddr,
}

impl SqlConnectionRefused {
    pub fn emit(&self) {
        note("SqlConnectionRefused");
        tracing::warn!(peer = %self.peer, "SQL endpoint: too many connections (sql.max_connections); refused");
    }
}

/// A SQL connection was closed by the endpoint: on a protocol or I/O error, or
/// because no login came within `sql.login_timeout_ms`.
pub struct SqlConnectionClosed<'a> {
    pub peer: std::net::SocketAddr,
    /// `None`: the login timeout.
    pub error: Option<&'a str>,
    pub login_timeout_ms: u64,
}

impl SqlConnectionClosed<'_> {
    pub fn emit(&self) {
        note("SqlConnectionClosed");
        match self.error {
            Some(e) => tracing::info!(peer = %self.peer, error = %e, "SQL connection closed on an error"),
            None => tracing::warn!(peer = %self.peer, timeout_ms = self.login_timeout_ms, "SQL connection closed: no login in time (sql.login_timeout_ms)"),
        }
    }
}
