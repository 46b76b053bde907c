//! The command line: invalid configuration fails at start naming the key, `--help`
//! explains, `--check-config` validates without a broker.

use std::process::Command;

use crate::harness::scratch;

fn twinguard(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twinguard")).args(args).envs(env.iter().copied()).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn invalid_config_fails_at_start_naming_the_key() {
    let dir = scratch("cli");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[batch]\nmax_records = -3\n").unwrap();
    let (ok, out) = twinguard(&["run", "--config", bad.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(out.contains("batch.max_records"), "{out}");

    let good = dir.join("good.toml");
    std::fs::write(&good, "[kafka]\nbrokers = \"127.0.0.1:1\"\n[schema]\nname = \"ciciomt-flow-window/v1\"\n").unwrap();
    let (ok, out) = twinguard(&["run", "--config", good.to_str().unwrap(), "--check-config"], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("ciciomt-flow-window/v1"), "{out}");

    let (ok, out) = twinguard(&["run", "--config", good.to_str().unwrap(), "--check-config"], &[("TWINGUARD__STATE__WARMUP_EVENTS", "many")]);
    assert!(!ok);
    assert!(out.contains("state.warmup_events"), "{out}");

    let (ok, out) = twinguard(&["run", "--config", dir.join("missing.toml").to_str().unwrap()], &[]);
    assert!(!ok && out.contains("missing.toml"), "{out}");

    // The model is loaded by --check-config: a missing artifact is named.
    let (ok, out) = twinguard(
        &["run", "--config", good.to_str().unwrap(), "--check-config"],
        &[("TWINGUARD__MODEL__PATH", "/nonexistent/model")],
    );
    assert!(!ok);
    assert!(out.contains("model.path") && out.contains("/nonexistent/model"), "{out}");
}

#[test]
fn help_explains_the_commands() {
    let (ok, out) = twinguard(&["--help"], &[]);
    assert!(ok);
    for cmd in ["demo", "run", "sql", "simulate", "replay", "train", "eval", "audit", "schemas"] {
        assert!(out.contains(cmd), "--help lists {cmd}: {out}");
    }
    let (ok, out) = twinguard(&["schemas"], &[]);
    assert!(ok && out.contains("wustl-flow-vitals/v1") && out.contains("ciciomt-flow-window/v1"), "{out}");
}

/// The README's main job: the demo on the embedded broker accounts for every record
/// (the mock cluster is allowed here: the demo is what runs on it).
#[test]
fn demo_accounts_for_every_record() {
    let (ok, out) = twinguard(&["demo", "--devices", "12", "--events", "4000", "--partitions", "2", "--train-events", "6000"], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("one per valid event: yes"), "{out}");
    assert!(out.contains("one per malformed record: yes"), "{out}");
    assert!(out.contains("injected attacks"), "{out}");
    // The SQL view answered the demo's query: a table with the riskiest twins.
    let table = &out[out.find("SQL over the live twins").unwrap_or_else(|| panic!("{out}"))..];
    assert!(table.contains("| device_id") && table.contains("| risk"), "{out}");
    assert_eq!(table.lines().filter(|l| l.starts_with("| ") && !l.contains("device_id")).count(), 5, "5 rows: {out}");
}

/// `twinguard sql` refuses to start without users, names a missing password variable,
/// and `run --check-config` checks the SQL users too.
#[test]
fn sql_endpoint_config_errors_name_the_problem() {
    let dir = scratch("cli-sql");
    let p = dir.join("sql.toml");
    let path = p.to_str().unwrap();
    std::fs::write(&p, "[kafka]\nbrokers = \"127.0.0.1:1\"\n").unwrap();
    let (ok, out) = twinguard(&["sql", "--config", path, "--check-config"], &[]);
    assert!(!ok && out.contains("no SQL users configured"), "{out}");
    std::fs::write(&p, "[kafka]\nbrokers = \"127.0.0.1:1\"\n[sql]\nlisten = \"127.0.0.1:5999\"\n[[sql.users]]\nname = \"analyst\"\npassword_env = \"TG_CLI_SQL_PW\"\n").unwrap();
    let (ok, out) = twinguard(&["sql", "--config", path, "--check-config"], &[]);
    assert!(!ok && out.contains("TG_CLI_SQL_PW") && out.contains("analyst"), "{out}");
    let (ok, out) = twinguard(&["run", "--config", path, "--check-config"], &[]);
    assert!(!ok && out.contains("TG_CLI_SQL_PW"), "{out}");
    let (ok, out) = twinguard(&["sql", "--config", path, "--check-config", "--listen", "nowhere"], &[("TG_CLI_SQL_PW", "pw")]);
    assert!(!ok && out.contains("--listen") && out.contains("nowhere"), "{out}");
    let (ok, out) = twinguard(&["sql", "--config", path, "--check-config"], &[("TG_CLI_SQL_PW", "pw")]);
    assert!(ok && out.contains("query-only SQL on 127.0.0.1:5999"), "{out}");
}
