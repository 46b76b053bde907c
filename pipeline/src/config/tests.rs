use super::*;

fn write(text: &str) -> tempfile_path::TempPath {
    tempfile_path::TempPath::new(text)
}

/// Minimal temp-file helper (no extra dependency).
mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn new(text: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("twinguard-cfg-{}-{n}.toml", std::process::id()));
            std::fs::write(&p, text).unwrap();
            TempPath(p)
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn example_config_loads_and_matches_defaults() {
    let p = twinguard_schemas::testing::manifest_dir().join("twinguard.example.toml");
    let c = Config::load(Some(&p), Vec::new()).unwrap();
    let d = Config::default();
    assert_eq!(c.topics.input, d.topics.input);
    assert_eq!(c.batch.max_records, d.batch.max_records);
    assert_eq!(c.state.warmup_events, d.state.warmup_events);
}

#[test]
fn sql_section_errors_name_the_key() {
    let load = |text: &str| {
        let dir = std::env::temp_dir().join(format!("twinguard-sqlcfg-{}-{}", std::process::id(), text.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, text).unwrap();
        Config::load(Some(&p), Vec::new())
    };
    let e = load("[sql]\nlisten = \"127.0.0.1:5433\"\n").unwrap_err().to_string();
    assert!(e.contains("sql.users") && e.contains("at least one user"), "{e}");
    let e = load("[sql]\nlisten = \"localhost\"\n[[sql.users]]\nname = \"a\"\npassword = \"p\"\n").unwrap_err().to_string();
    assert!(e.contains("sql.listen"), "{e}");
    let e = load("[http]\nlisten = \"nope\"\n").unwrap_err().to_string();
    assert!(e.contains("http.listen"), "{e}");
    let e = load("[otel]\nendpoint = \"collector:4317\"\n").unwrap_err().to_string();
    assert!(e.contains("otel.endpoint"), "{e}");
    let c = load("[sql]\nlisten = \"127.0.0.1:5433\"\n[[sql.users]]\nname = \"a\"\npassword_env = \"TWINGUARD_TEST_UNSET_PASSWORD_VAR\"\n").unwrap();
    let e = c.sql_users().unwrap_err().to_string();
    assert!(e.contains("sql user `a`") && e.contains("TWINGUARD_TEST_UNSET_PASSWORD_VAR"), "{e}");
    let e = load("[sql]\nlisten = \"127.0.0.1:5433\"\n[[sql.users]]\nname = \"a\"\npassword = \"p\"\n[[sql.users]]\nname = \"a\"\npassword = \"q\"\n").unwrap_err().to_string();
    assert!(e.contains("listed twice"), "{e}");
}

#[test]
fn a_new_schema_is_a_file_plus_a_config_line() {
    let dir = std::env::temp_dir().join(format!("twinguard-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("pump.v2.toml"),
        "name = \"infusion-pump\"\nversion = 2\n[[fields]]\nname = \"flow_rate\"\ntype = \"f64\"\nrole = \"metric\"\nrequired = true\nmin = 0.0\nmax = 1200.0\n",
    )
    .unwrap();
    let cfg_path = dir.join("pipeline.toml");
    std::fs::write(&cfg_path, "[schema]\nfile = \"pump.v2.toml\"\n").unwrap();
    let c = Config::load(Some(&cfg_path), Vec::new()).unwrap();
    assert_eq!(c.event_schema().unwrap().id(), "infusion-pump/v2", "file is relative to the config file");
    std::fs::write(&cfg_path, "[schema]\nname = \"wustl-flow-vitals/v1\"\nfile = \"pump.v2.toml\"\n").unwrap();
    let e = Config::load(Some(&cfg_path), Vec::new()).unwrap_err().to_string();
    assert!(e.contains("only one of"), "{e}");
    std::fs::write(&cfg_path, "[schema]\nfile = \"missing.toml\"\n").unwrap();
    let e = Config::load(Some(&cfg_path), Vec::new()).unwrap_err().to_string();
    assert!(e.contains("missing.toml"), "{e}");
}

#[test]
fn audit_keys_and_control_secrets_are_checked() {
    let err = |text: &str| Config::load(Some(&write(text).0), Vec::new()).unwrap_err().to_string();
    let k = "ab".repeat(32);
    assert!(err(&format!("[audit]\npublic_key = \"{k}\"\npublic_key_file = \"pk\"\n")).contains("only one of `audit.public_key`"));
    assert!(err("[audit]\npublic_key = \"abc\"\n").contains("audit.public_key"));
    assert!(err("[audit]\nprevious_signing_key_file = \"old.key\"\n").contains("audit.previous_signing_key_file"));
    let c = Config::load(Some(&write(&format!("[audit]\npublic_key = \" {k}\\n\"\n")).0), Vec::new()).unwrap();
    assert_eq!(c.audit_public_key().unwrap(), Some(k));
}

#[test]
fn a_configuration_error_holds_its_key_and_says_it_once() {
    // Was "key `state.ewma_alpha: must be in (0, 1)": a backtick never closed.
    let f = write("[state]\newma_alpha = 2.0\n");
    let e = Config::load(Some(&f.0), Vec::new()).unwrap_err();
    match &e {
        PipelineError::Config { key: Some(k), reason } => {
            assert_eq!(k, "state.ewma_alpha");
            assert!(reason.starts_with("must be in (0, 1)"), "{reason}");
        }
        other => panic!("expected a configuration error naming its key, got {other:?}"),
    }
    let text = e.to_string();
    assert!(text.starts_with("configuration error: key `state.ewma_alpha`: must be in (0, 1) (in "), "{text}");
    assert_eq!(text.matches('`').count(), 2, "{text}");
    // A response rule's key is composed with its section, as data.
    let f = write("[response]\ncommand_ttl_secs = 0\n");
    match Config::load(Some(&f.0), Vec::new()).unwrap_err() {
        PipelineError::Config { key: Some(k), .. } => assert_eq!(k, "response.command_ttl_secs"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn defaults_are_valid() {
    let c = Config::load(None, Vec::new()).unwrap();
    assert_eq!(c.batch.max_records, 1000);
    c.event_schema().unwrap();
}

#[test]
fn file_then_env_layering() {
    let f = write("[kafka]\nbrokers = \"a:1\"\n[kafka.properties]\n\"linger.ms\" = 5\n[batch]\nmax_records = 10\n");
    let env = vec![
        ("TWINGUARD__BATCH__MAX_RECORDS".to_string(), "20".to_string()),
        ("TWINGUARD__KAFKA__GROUP_ID".to_string(), "g-1".to_string()),
        ("UNRELATED".to_string(), "x".to_string()),
    ];
    let c = Config::load(Some(&f.0), env).unwrap();
    assert_eq!(c.kafka.brokers, "a:1");
    assert_eq!(c.kafka.group_id, "g-1");
    assert_eq!(c.batch.max_records, 20);
    assert_eq!(c.kafka.properties["linger.ms"], "5");
}

#[test]
fn errors_name_the_key() {
    let cases = [
        ("[batch]\nmax_records = \"many\"\n", "batch.max_records"),
        ("[batch]\nmax_recordz = 1\n", "max_recordz"),
        ("[batch]\nmax_records = 0\n", "batch.max_records"),
        ("[state]\newma_alpha = 2.0\n", "state.ewma_alpha"),
        ("[topics]\nverdicts = \"iomt.telemetry\"\n", "iomt.telemetry"),
        ("[kafka.consumer]\n\"enable.auto.offset.store\" = true\n", "enable.auto.offset.store"),
        ("[schema]\nname = \"nope/v9\"\n", "schema"),
    ];
    for (text, key) in cases {
        let f = write(text);
        let e = match Config::load(Some(&f.0), Vec::new()) {
            Ok(c) => c.event_schema().map(|_| ()).unwrap_err().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(key), "error for {text:?} should name {key}: {e}");
    }
    let e = Config::load(None, vec![("TWINGUARD__BATCH__MAX_LINGER_MS".into(), "soon".into())]).unwrap_err();
    assert!(e.to_string().contains("batch.max_linger_ms"), "{e}");
}

/// The review's foot-guns: properties that silently break the delivery
/// guarantee or fencing are refused, timing ones range-checked, with the key named.
#[test]
fn properties_that_break_delivery_or_fencing_are_refused() {
    let cases = [
        ("[kafka.consumer]\n\"auto.offset.reset\" = \"latest\"\n", "auto.offset.reset"),
        ("[kafka.consumer]\n\"enable.auto.commit\" = \"false\"\n", "enable.auto.commit"),
        ("[kafka.properties]\n\"isolation.level\" = \"read_uncommitted\"\n", "isolation.level"),
        ("[kafka.producer]\n\"transactional.id\" = \"x\"\n", "transactional.id"),
        ("[kafka.consumer]\n\"group.instance.id\" = \"i-1\"\n", "group.instance.id"),
        ("[kafka.producer]\n\"enable.gapless.guarantee\" = \"false\"\n", "enable.gapless.guarantee"),
        ("[kafka.producer]\n\"message.timeout.ms\" = \"0\"\n", "message.timeout.ms"),
        ("[kafka.producer]\n\"message.timeout.ms\" = \"soon\"\n", "message.timeout.ms"),
        ("[kafka.consumer]\n\"max.poll.interval.ms\" = \"60000\"\n", "max.poll.interval.ms"),
        ("[state]\nidle_ttl_secs = 3600\n", "state.idle_ttl_secs"),
        ("[state]\nmax_twin_bytes = 2000000\n", "state.max_twin_bytes"),
    ];
    for (text, key) in cases {
        let f = write(text);
        let e = Config::load(Some(&f.0), Vec::new()).expect_err(text).to_string();
        assert!(e.contains(key), "error for {text:?} should name {key}: {e}");
    }
    // In range, and the default poll interval covers restore + delivery + margin.
    let f = write("[kafka.producer]\n\"message.timeout.ms\" = \"30000\"\n[kafka.consumer]\n\"max.poll.interval.ms\" = \"200000\"\n");
    assert_eq!(Config::load(Some(&f.0), Vec::new()).unwrap().max_poll_interval_ms(), 200_000);
    let c = Config::default();
    assert!(c.max_poll_interval_ms() >= c.batch.restore_timeout_secs * 1000 + DEFAULT_MESSAGE_TIMEOUT_MS + MAX_POLL_MARGIN_MS);
}

#[test]
fn batches_close_when_idle_unless_configured_otherwise() {
    assert!(Config::default().batch.flush_when_idle);
    let c = Config::load(None, vec![("TWINGUARD__BATCH__FLUSH_WHEN_IDLE".into(), "false".into())]).unwrap();
    assert!(!c.batch.flush_when_idle);
    let e = Config::load(None, vec![("TWINGUARD__BATCH__FLUSH_WHEN_IDLE".into(), "sometimes".into())]).unwrap_err();
    assert!(e.to_string().contains("batch.flush_when_idle"), "{e}");
}

#[test]
fn engine_workers_default_to_the_cores_and_refuse_zero() {
    let p = write("[engine]\nworkers = 0\n");
    let e = Config::load(Some(&p.0), Vec::new()).unwrap_err().to_string();
    assert!(e.contains("engine.workers") && e.contains("got 0"), "{e}");
    let p = write("[engine]\nworkers = 3\n");
    assert_eq!(Config::load(Some(&p.0), Vec::new()).unwrap().engine.workers(), 3);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(Config::default().engine.workers(), cores.min(MAX_WORKERS));
}

#[test]
fn a_site_needs_a_federations_model_and_no_target_of_its_own() {
    let p = write("[model]\nsite = \"hospital-a\"\n");
    let e = Config::load(Some(&p.0), Vec::new()).unwrap_err().to_string();
    assert!(e.contains("model.site") && e.contains("model.follow"), "{e}");
    let p = write("[model]\nsite = \"hospital-a\"\npath = \"m\"\ntarget_fpr = 0.02\n");
    let e = Config::load(Some(&p.0), Vec::new()).unwrap_err().to_string();
    assert!(e.contains("model.site") && e.contains("target_fpr"), "{e}");
    let p = write("[model]\nsite = \"hospital-a\"\npath = \"m\"\n");
    assert_eq!(Config::load(Some(&p.0), Vec::new()).unwrap().model.site.as_deref(), Some("hospital-a"));
}
