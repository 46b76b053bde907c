//! SQL over the live twins (psql, the real client, against a running pipeline on
//! the real broker), the Prometheus `/metrics` endpoint and the health probes, and
//! the query-only global view of a two-instance deployment.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::Message;
use twinguard::config::SqlUser;
use twinguard::tools::sim::Truth;
use twinguard_schemas::respond::{Alert, Command as TgCommand};

use crate::harness::*;

pub(crate) const PASSWORD: &str = "s3cret-for-tests";

/// Run one statement with psql; Ok(rows as `a|b|c` lines) or Err(stderr).
pub(crate) fn psql(addr: &str, user: &str, password: &str, sql: &str) -> Result<Vec<String>, String> {
    // `prefer`: TLS when the endpoint offers it, plaintext otherwise.
    psql_ssl(addr, user, password, sql, "prefer")
}

pub(crate) fn psql_ssl(addr: &str, user: &str, password: &str, sql: &str, sslmode: &str) -> Result<Vec<String>, String> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let out = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=1", "-h", host, "-p", port, "-U", user, "-d", "twinguard", "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "20")
        .env("PGSSLMODE", sslmode)
        .output()
        .expect("psql must be installed (scripts/test.sh installs postgresql-client)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).filter(|l| !l.is_empty()).collect())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

pub(crate) fn query(addr: &str, sql: &str) -> Vec<String> {
    psql(addr, "analyst", PASSWORD, sql).unwrap_or_else(|e| panic!("query `{sql}` failed: {e}"))
}

pub(crate) fn scalar(addr: &str, sql: &str) -> i64 {
    let rows = query(addr, sql);
    assert_eq!(rows.len(), 1, "`{sql}` returns one row: {rows:?}");
    rows[0].trim().parse().unwrap_or_else(|_| panic!("`{sql}` returned `{}`", rows[0]))
}

/// Poll `sql` until it returns `want` (the snapshot is republished every refresh).
pub(crate) fn wait_scalar(addr: &str, sql: &str, want: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = scalar(addr, sql);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "`{sql}` returned {got}, expected {want}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// GET over plain HTTP/1.1: (status, body).
pub(crate) fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    // hyper answers small bodies with Content-Length; chunked would show hex sizes.
    assert!(!text.to_ascii_lowercase().contains("transfer-encoding: chunked"), "unexpected chunked body");
    (status, body)
}

/// Prometheus text exposition, checked line by line: `(family types, samples)`
/// where a sample is keyed by name and its sorted labels.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

pub(crate) fn parse_prometheus(text: &str) -> (BTreeMap<String, String>, Samples) {
    let mut types = BTreeMap::new();
    let mut samples = Samples::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: `{line}`", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{}", at());
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{}", at()));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value, {}", at())),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels, {}", at()));
                let mut labels = BTreeMap::new();
                // Label values here never contain `",`; split on it.
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label `{pair}`, {}", at()));
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name.to_string(), labels)
            }
        };
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad metric name, {}", at());
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram")));
        let family = family.unwrap_or(&name);
        assert!(types.contains_key(family), "sample without a # TYPE line, {}", at());
        samples.insert((name.clone(), labels), value);
    }
    (types, samples)
}

/// Sum of a metric's samples whose labels include `with`.
pub(crate) fn sum(samples: &Samples, name: &str, with: &[(&str, &str)]) -> f64 {
    samples.iter().filter(|((n, l), _)| n == name && with.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))).map(|(_, v)| v).sum()
}

/// The extended query protocol (Parse/Bind/Execute, as drivers use it): a
/// parameterised query works; DDL, DML, settings and cursors are refused there too.
pub(crate) fn extended_protocol(addr: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (host, port) = addr.rsplit_once(':').unwrap();
        let params = format!("host={host} port={port} user=analyst password={PASSWORD} dbname=twinguard connect_timeout=20");
        let (client, conn) = tokio_postgres::connect(&params, tokio_postgres::NoTls).await.expect("driver connects with SCRAM");
        tokio::spawn(conn);
        let rows = client.query("select count(*) from twins where device_id = $1", &[&"fresh-device-1"]).await.expect("parameterised query");
        let n: i64 = rows[0].get(0);
        assert_eq!(n, 1);
        for stmt in ["create table x (a int)", "insert into twins (device_id) values ('y')", "set datafusion.execution.batch_size = 1", "declare c cursor for select * from twins"] {
            let e = client.query(stmt, &[]).await.expect_err(stmt);
            let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
            assert!(msg.contains("read-only endpoint"), "`{stmt}` refused over the extended protocol: {msg}");
        }
        let wrong = format!("host={host} port={port} user=analyst password=nope dbname=twinguard connect_timeout=20");
        assert!(tokio_postgres::connect(&wrong, tokio_postgres::NoTls).await.is_err(), "wrong password refused");
    });
}

pub(crate) fn sql_user() -> Vec<SqlUser> {
    vec![SqlUser { name: "analyst".into(), password: None, password_env: Some("TG_IT_SQL_PASSWORD".into()) }]
}

// Kept whole: one running pipeline, queried step by step as a user would (psql,
// metrics, probes); later steps read what earlier ones caused.
#[test]
fn psql_queries_metrics_and_probes_on_a_running_pipeline() {
    let Setup { dir, broker: _broker, mut cfg } = Setup::new("sql");
    cfg.sql.listen = Some("127.0.0.1:0".into());
    cfg.sql.users = sql_user();
    cfg.sql.max_rows = 500;
    cfg.sql.query_timeout_ms = 6_000;
    let path = write_config(&dir, "pipeline", &cfg);
    let envs = [("TG_IT_SQL_PASSWORD", PASSWORD)];
    let mut p = PipelineProc::spawn(&dir, "pipeline", &["run", "--config", path.to_str().unwrap()], &envs);
    let http = p.wait_addr("serving /metrics");
    let sql = p.wait_addr("serving SQL");
    p.wait_log(&["rebalance", "assign", "partitions=[0, 1, 2, 3]"]);

    let recs = sim_records(20, 3_000, 21, 0.02);
    let coords = produce(&cfg, &recs);
    let valid = recs.iter().filter(|r| !matches!(r.truth, Truth::Malformed(_))).count();
    let malformed = recs.len() - valid;
    assert!(malformed > 0 && valid > cfg.sql.max_rows);
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    verdicts.until("a verdict per valid event", |r| r.len() >= valid);
    let expected = reference_twins(&cfg, &recs, &coords);
    let mut alerts = Reader::new(&cfg, &cfg.topics.alerts);
    alerts.drain_to_end(&cfg, &cfg.topics.alerts);
    let mut commands = Reader::new(&cfg, &cfg.topics.commands);
    commands.drain_to_end(&cfg, &cfg.topics.commands);
    let alerts: Vec<Alert> = alerts.records.iter().map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap()).collect();
    let commands: Vec<TgCommand> = commands.records.iter().map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap()).collect();
    assert!(!alerts.is_empty(), "the simulated attacks raise alerts");

    // Counts, filters, aggregates and a join: what the topics say was produced.
    wait_scalar(&sql, "select count(*) from verdicts", valid as i64);
    wait_scalar(&sql, "select count(*) from alerts", alerts.len() as i64);
    wait_scalar(&sql, "select count(*) from commands", commands.len() as i64);
    wait_scalar(&sql, "select count(*) from twins", expected.len() as i64);
    wait_scalar(&sql, "select sum(events) from twins", valid as i64);
    let anomalous = verdicts.records.iter().filter(|m| String::from_utf8_lossy(m.payload().unwrap()).contains("\"anomalous\":true")).count();
    assert_eq!(scalar(&sql, "select count(*) from verdicts where anomalous"), anomalous as i64);
    assert_eq!(scalar(&sql, "select sum(anomalies) from twins"), anomalous as i64);
    let mut per_device: BTreeMap<String, usize> = BTreeMap::new();
    for a in &alerts {
        *per_device.entry(a.device_id.clone()).or_default() += 1;
    }
    let joined = query(&sql, "select t.device_id, count(a.alert_id) from twins t join alerts a on a.device_id = t.device_id group by t.device_id order by t.device_id");
    let want: Vec<String> = per_device.iter().map(|(d, n)| format!("{d}|{n}")).collect();
    assert_eq!(joined, want, "twins joined with alerts");
    let types: BTreeSet<String> = query(&sql, "select distinct device_type from twins where device_type is not null").into_iter().collect();
    for t in &types {
        let n = scalar(&sql, &format!("select count(*) from twins where device_type = '{t}'"));
        assert!(n > 0, "filter on device_type {t}");
    }
    let status = query(&sql, "select mode, ready, partitions, records_in from status");
    assert_eq!(status, vec![format!("pipeline|t|0,1,2,3|{}", recs.len())]);
    // psql's own catalog queries work: \dt lists the tables, \d describes one.
    let listing = query(&sql, "\\dt").join("\n");
    for t in ["twins", "verdicts", "alerts", "commands", "status"] {
        assert!(listing.contains(t), "\\dt lists {t}: {listing}");
    }
    let described = query(&sql, "\\d twins").join("\n");
    assert!(described.contains("device_id") && described.contains("risk"), "\\d twins describes the columns: {described}");

    // Freshness: one event of a new device, visible in `twins` (measured, not asserted
    // against a wall-clock bound: the benchmark reports the figure).
    let fresh = recs.iter().find(|r| matches!(r.truth, Truth::Normal)).unwrap();
    let mut rec = fresh.clone();
    let payload = String::from_utf8(rec.payload.clone()).unwrap().replace(&rec.key, "fresh-device-1");
    rec.key = "fresh-device-1".into();
    rec.payload = payload.into_bytes();
    let sent = Instant::now();
    produce(&cfg, std::slice::from_ref(&rec));
    let acked = sent.elapsed();
    wait_scalar(&sql, "select count(*) from twins where device_id = 'fresh-device-1'", 1);
    eprintln!("freshness: event acknowledged after {acked:?}, visible in `twins` after {:?}", sent.elapsed());

    // Safety: wrong password, unknown user, DDL and DML refused, oversized result and
    // a long query cancelled, each with a clear error.
    let e = psql(&sql, "analyst", "wrong", "select 1").unwrap_err();
    assert!(e.to_lowercase().contains("password authentication failed"), "wrong password refused: {e}");
    let e = psql(&sql, "mallory", PASSWORD, "select 1").unwrap_err();
    assert!(e.to_lowercase().contains("password authentication failed"), "unknown user refused: {e}");
    for stmt in ["create table x (a int)", "insert into twins (device_id) values ('x')", "drop table twins", "delete from alerts", "copy twins to '/tmp/x.csv'", "set datafusion.execution.batch_size = 1"] {
        let e = psql(&sql, "analyst", PASSWORD, stmt).unwrap_err();
        assert!(e.contains("read-only endpoint"), "`{stmt}` refused: {e}");
    }
    // Functions that make huge values from tiny inputs are not served.
    let e = psql(&sql, "analyst", PASSWORD, "select repeat('x', 2000000000)").unwrap_err();
    assert!(e.contains("repeat"), "repeat() is not served: {e}");
    let e = psql(&sql, "analyst", PASSWORD, "select * from verdicts").unwrap_err();
    assert!(e.contains("more than 500 rows"), "oversized result cancelled: {e}");
    // Recursive queries are not served (they can grow without bound).
    let recursive = "with recursive t(n) as (select 1 union all select n + 1 from t where n < 1000000000) select count(*) from t";
    let e = psql(&sql, "analyst", PASSWORD, recursive).unwrap_err();
    assert!(e.contains("recursive queries"), "recursive query refused: {e}");
    // A query that would take minutes, in constant memory (the filter keeps
    // DataFusion from answering the count from statistics).
    let slow = "select count(*) from verdicts a, verdicts b, verdicts c where a.score < 2";
    let e = psql(&sql, "analyst", PASSWORD, slow).unwrap_err();
    assert!(e.contains("ran longer than"), "long query cancelled: {e}");
    extended_protocol(&sql);
    // A malformed client message closes that connection only.
    let mut s = TcpStream::connect(&sql).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&[0, 0, 0, 8, 0xde, 0xad, 0xbe, 0xef, b'x', b'y', b'z']).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf); // the server closes it
    assert_eq!(scalar(&sql, "select count(*) from twins where device_id = 'fresh-device-1'"), 1, "the endpoint still serves");

    // /metrics: valid Prometheus text whose counters match what was sent.
    let (code, body) = http_get(&http, "/metrics");
    assert_eq!(code, 200);
    let (types, samples) = parse_prometheus(&body);
    let total = (recs.len() + 1) as f64;
    assert_eq!(sum(&samples, "twinguard_records_in_total", &[("topic", &cfg.topics.input)]), total);
    assert_eq!(sum(&samples, "twinguard_records_out_total", &[("topic", &cfg.topics.verdicts)]), (valid + 1) as f64);
    assert_eq!(sum(&samples, "twinguard_records_out_total", &[("topic", &cfg.topics.alerts)]), alerts.len() as f64);
    assert_eq!(sum(&samples, "twinguard_dlq_total", &[]), malformed as f64);
    assert_eq!(sum(&samples, "twinguard_verdicts_total", &[]), (valid + 1) as f64);
    assert_eq!(sum(&samples, "twinguard_twins", &[]), (expected.len() + 1) as f64);
    assert_eq!(sum(&samples, "twinguard_ready", &[]), 1.0);
    assert_eq!(sum(&samples, "twinguard_input_gap_records_total", &[]), 0.0, "no input gap in a clean run");
    assert!(sum(&samples, "twinguard_operator_latency_seconds_count", &[("operator", "detect")]) > 0.0);
    assert_eq!(types.get("twinguard_e2e_latency_seconds").map(String::as_str), Some("histogram"));
    // Every command's response time, and the part of it after the pipeline read
    // the event (never longer).
    let responses = sum(&samples, "twinguard_response_time_seconds_count", &[]);
    assert!(commands.is_empty() || responses > 0.0, "{} commands, no response time", commands.len());
    assert_eq!(sum(&samples, "twinguard_response_in_pipeline_seconds_count", &[]), responses);
    assert!(sum(&samples, "twinguard_response_in_pipeline_seconds_sum", &[]) <= sum(&samples, "twinguard_response_time_seconds_sum", &[]) + 1e-3 * responses);
    // Every metric the Grafana dashboard charts is exposed.
    let dash = std::fs::read_to_string(twinguard_schemas::testing::manifest_dir().join("../compose/grafana/dashboards/twinguard.json")).unwrap();
    let mut charted = BTreeSet::new();
    for (i, _) in dash.match_indices("twinguard_") {
        let name: String = dash[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name).to_string();
        charted.insert(family);
    }
    assert!(charted.len() >= 8, "the dashboard charts the pipeline: {charted:?}");
    for f in &charted {
        assert!(types.contains_key(f), "dashboard metric `{f}` is not exposed on /metrics");
    }
    assert_eq!(http_get(&http, "/healthz").0, 200);
    assert_eq!(http_get(&http, "/readyz").0, 200);

    // /readyz after a restart: not ready until the partitions are assigned and their
    // twins restored; when it first answers ready, every twin is back.
    p.stop();
    // This time also push OpenTelemetry over OTLP (gRPC) to a listener of ours: the
    // exporter connects and speaks HTTP/2 to it.
    let otlp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", otlp.local_addr().unwrap());
    let envs2 = [("TG_IT_SQL_PASSWORD", PASSWORD), ("TWINGUARD__OTEL__ENDPOINT", endpoint.as_str()), ("TWINGUARD__OTEL__EXPORT_INTERVAL_MS", "500")];
    let mut p = PipelineProc::spawn(&dir, "pipeline-2", &["run", "--config", path.to_str().unwrap()], &envs2);
    let http = p.wait_addr("serving /metrics");
    let (mut saw_unready, deadline) = (false, Instant::now() + WAIT);
    loop {
        let (code, _) = http_get(&http, "/readyz");
        if code == 200 {
            break;
        }
        assert_eq!(code, 503);
        saw_unready = true;
        assert!(Instant::now() < deadline, "never ready: {}", p.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(saw_unready, "/readyz answered 503 before the partitions were assigned");
    let (_, body) = http_get(&http, "/metrics");
    let (_, samples) = parse_prometheus(&body);
    assert_eq!(sum(&samples, "twinguard_twins", &[]), (expected.len() + 1) as f64, "every twin restored when ready");
    p.log_text().lines().filter(|l| l.contains("twins restored from changelog")).count().eq(&4).then_some(()).expect("4 partitions restored");
    otlp.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + WAIT;
    let mut conn = loop {
        match otlp.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the OTLP exporter never connected: {}", p.log_text());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut preface = [0u8; 24];
    conn.read_exact(&mut preface).unwrap();
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "the OTLP exporter speaks gRPC (HTTP/2) to the endpoint");
    drop(conn);
    p.stop();
}

#[test]
fn query_only_process_serves_every_twin_of_two_instances() {
    let Setup { dir, broker: _broker, mut cfg } = Setup::new("global");
    cfg.sql.listen = Some("127.0.0.1:0".into());
    cfg.sql.users = sql_user();
    let path = write_config(&dir, "pipeline", &cfg);
    let envs = [("TG_IT_SQL_PASSWORD", PASSWORD)];
    let cfg_arg = path.to_str().unwrap();
    let mut a = PipelineProc::spawn(&dir, "a", &["run", "--config", cfg_arg], &envs);
    let sql_a = a.wait_addr("serving SQL");
    a.wait_log(&["rebalance", "assign", "partitions=[0, 1, 2, 3]"]);
    // The first half while `a` owns every partition: it then hands some partitions,
    // and their twins, to `b`, and must stop showing those.
    let recs = sim_records(24, 4_000, 5, 0.0);
    let mut coords = produce(&cfg, &recs[..2_000]);
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    verdicts.until("a verdict per event of the first half", |r| verdicts_by_coords(r).len() >= 2_000);
    wait_scalar(&sql_a, "select count(*) from twins", reference_twins(&cfg, &recs[..2_000], &coords).len() as i64);
    let mut b = PipelineProc::spawn(&dir, "b", &["run", "--config", cfg_arg], &envs);
    let sql_b = b.wait_addr("serving SQL");
    b.wait_log(&["rebalance", "assign", "partitions=["]);
    a.wait_log(&["rebalance", "assign", "partitions=["]);

    coords.extend(produce(&cfg, &recs[2_000..]));
    verdicts.until("a verdict per event", |r| verdicts_by_coords(r).len() >= recs.len());
    let expected: BTreeSet<String> = reference_twins(&cfg, &recs, &coords).into_keys().collect();

    // Each instance serves only the twins of its own partitions...
    let parts = |addr: &str| query(addr, "select partitions from status").first().cloned().unwrap_or_default(); // none between assignments: no row
    let deadline = Instant::now() + WAIT;
    while parts(&sql_a).is_empty() || parts(&sql_b).is_empty() || parts(&sql_a).split(',').count() + parts(&sql_b).split(',').count() != 4 {
        assert!(Instant::now() < deadline, "instances own all 4 partitions: a={} b={}", parts(&sql_a), parts(&sql_b));
        std::thread::sleep(Duration::from_millis(200));
    }
    let (pa, pb) = (parts(&sql_a), parts(&sql_b));
    let (sa, sb): (HashSet<&str>, HashSet<&str>) = (pa.split(',').collect(), pb.split(',').collect());
    assert!(sa.is_disjoint(&sb), "different partitions: a={pa} b={pb}");
    let local = |addr: &str| -> BTreeSet<String> { query(addr, "select device_id from twins").into_iter().collect() };
    let deadline = Instant::now() + WAIT;
    while local(&sql_a).len() + local(&sql_b).len() < expected.len() {
        assert!(Instant::now() < deadline, "the instances' views cover the fleet");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (la, lb) = (local(&sql_a), local(&sql_b));
    assert!(!la.is_empty() && !lb.is_empty() && la.is_disjoint(&lb), "each instance holds part of the fleet");

    // ...and the query-only process, reading the changelog, serves every device.
    // The query-only process serves over TLS (a self-signed certificate made here).
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout"])
        .arg(dir.join("sql.key"))
        .arg("-out")
        .arg(dir.join("sql.crt"))
        .output()
        .expect("openssl must be installed (scripts/test.sh installs it)");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let mut gcfg = cfg.clone();
    gcfg.sql.tls = Some(twinguard::config::TlsConfig { cert_file: "sql.crt".into(), key_file: "sql.key".into() });
    gcfg.sql.max_connections = 2;
    gcfg.sql.login_timeout_ms = 2_000;
    let gpath = write_config(&dir, "global", &gcfg);
    let g_args = ["sql", "--config", gpath.to_str().unwrap(), "--brokers", &cfg.kafka.brokers, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"];
    let mut g = PipelineProc::spawn(&dir, "global", &g_args, &envs);
    let sql_g = g.wait_addr("serving SQL");
    g.wait_log(&["every twin materialised"]);
    assert_eq!(psql_ssl(&sql_g, "analyst", PASSWORD, "select 1", "require"), Ok(vec!["1".to_string()]), "psql with sslmode=require connects over TLS");
    // SCRAM-SHA-256-PLUS: the login is bound to the TLS channel (libpq refuses a
    // server that does not offer channel binding when it is required).
    let out = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-p", sql_g.rsplit_once(':').unwrap().1, "-U", "analyst", "-d", "twinguard", "-c", "select 1"])
        .env("PGPASSWORD", PASSWORD)
        .env("PGSSLMODE", "require")
        .env("PGCHANNELBINDING", "require")
        .output()
        .unwrap();
    assert!(out.status.success(), "psql with channel_binding=require logs in: {}", String::from_utf8_lossy(&out.stderr));
    let e = psql_ssl(&sql_g, "analyst", PASSWORD, "select 1", "disable").unwrap_err();
    assert!(e.contains("requires TLS"), "a client skipping TLS is refused: {e}");
    // A connection that never logs in is closed after the login timeout.
    let mut silent = TcpStream::connect(&sql_g).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(silent.read(&mut buf).unwrap_or(0), 0, "the server closed the silent connection");
    // Connection slots: with both taken, a client is told why it is refused (the held
    // connections are renewed should the login timeout free them first).
    let deadline = Instant::now() + WAIT;
    let e = loop {
        let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(&sql_g).unwrap()).collect();
        match psql(&sql_g, "analyst", PASSWORD, "select 1") {
            Err(e) => break e,
            Ok(_) => {
                drop(held);
                assert!(Instant::now() < deadline, "the third connection was never refused");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert!(e.contains("too many connections"), "refused with the reason: {e}");
    let deadline = Instant::now() + WAIT;
    while psql(&sql_g, "analyst", PASSWORD, "select 1").is_err() {
        assert!(Instant::now() < deadline, "slots are given back when clients leave");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_scalar(&sql_g, "select count(*) from twins", expected.len() as i64);
    let all: BTreeSet<String> = query(&sql_g, "select device_id from twins").into_iter().collect();
    assert_eq!(all, expected);
    assert_eq!(all, la.union(&lb).cloned().collect::<BTreeSet<_>>());
    assert_eq!(scalar(&sql_g, "select count(distinct partition) from twins"), 4);
    verdicts.drain_to_end(&cfg, &cfg.topics.verdicts);
    wait_scalar(&sql_g, "select count(*) from verdicts", verdicts.records.len() as i64);
    assert_eq!(query(&sql_g, "select mode, ready from status"), vec!["global|t".to_string()]);
    // New events reach the global view through the changelog.
    let more = sim_records(30, 600, 6, 0.0);
    let new_devices: BTreeSet<String> = more.iter().map(|r| r.key.clone()).filter(|k| !expected.contains(k)).collect();
    assert!(!new_devices.is_empty());
    produce(&cfg, &more);
    wait_scalar(&sql_g, "select count(*) from twins", (expected.len() + new_devices.len()) as i64);
    g.stop();
    a.stop();
    b.stop();
}
