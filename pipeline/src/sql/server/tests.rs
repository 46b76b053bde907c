use super::*;

fn code_and_message(e: PgWireError) -> (String, String) {
    match e {
        PgWireError::UserError(i) => (i.code, i.message),
        e => ("?".into(), e.to_string()),
    }
}

/// Plan a statement as the simple protocol does (parse, check, plan, check).
async fn plan(ctx: &SessionContext, served: &Served, sql: &str) -> PgWireResult<LogicalPlan> {
    let mut statements = PostgresCompatibilityParser::new().parse(sql).map_err(|e| user_error("42601", e.to_string()))?;
    let s = statements.remove(0);
    let query_like = check_statement(&s)?;
    let plan = ctx.state().statement_to_plan(DfStatement::Statement(Box::new(s))).await.map_err(|e| df_error(&e.to_string()))?;
    if query_like {
        check_plan(&plan)?;
    }
    served.check(&plan)?;
    Ok(plan)
}

#[test]
fn sql_session_reads_no_files_and_serves_only_allowlisted_functions() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let ctx = session_context(&SqlView::new(10), 64 << 20).unwrap();
        assert!(ctx.runtime_env().object_store(ObjectStoreUrl::local_filesystem()).is_err(), "no file:// object store");
        assert!(ctx.state().table_factories().is_empty(), "no table factories");
        // Even through DataFusion's own parser with DDL allowed, no file is read.
        let e = ctx.sql("create external table pw (line varchar) stored as csv location '/etc/passwd'").await.err();
        assert!(e.is_some(), "CREATE EXTERNAL TABLE has no factory to create the table with");
        let served = Served::of(&ctx);
        for (sql, code, named) in [
            ("select repeat('x', 3)", "42883", "`repeat`"),
            ("select replace('x', 'x', 'xx')", "42883", "`replace`"),
            ("select lpad('x', 1000000000)", "42883", "`lpad`"),
            ("select regexp_replace('x', '', 'xx', 'g')", "42883", "`regexp_replace`"),
            ("select array_resize(make_array(1), 10)", "42883", "`array_resize`"),
            ("select array_repeat(1, 10)", "42883", "`array_repeat`"),
            // Built from syntax by an expression planner, not looked up by name.
            ("select overlay('abc' placing 'x' from 2)", "42883", "`overlay`"),
            ("with recursive t(n) as (select 1 union all select n + 1 from t where n < 3) select * from t", "0A000", "recursive queries"),
            ("copy (select 1) to '/tmp/x'", "25006", "read-only endpoint"),
        ] {
            let (c, m) = code_and_message(plan(&ctx, &served, sql).await.expect_err(sql));
            assert_eq!(c, code, "{sql}: {m}");
            assert!(m.contains(named), "{sql}: {m}");
        }
        assert!(plan(&ctx, &served, "select * from generate_series(1, 10)").await.is_err(), "no table functions");
        // Read-only bypass attempts (review §4 C5 item 7).
        for sql in [
            "set time zone 'UTC'",
            "declare c cursor for select * from twins",
            "explain analyze create table x (a int)",
            "explain create table x as select 1",
            "select 1 as a into t2",
            "create view v as select 1",
        ] {
            let (c, m) = code_and_message(plan(&ctx, &served, sql).await.expect_err(sql));
            assert_eq!(c, "25006", "{sql}: {m}");
        }
        assert!(plan(&ctx, &served, "with t as (select 1) insert into twins (device_id) select 'x'").await.is_err(), "DML under a CTE");
        // Quoting with an embedded `;` stays one harmless statement.
        for sql in ["select $$a; drop table twins$$", "select E'\\'; drop table twins; --'"] {
            assert_eq!(PostgresCompatibilityParser::new().parse(sql).map(|v| v.len()).ok(), Some(1), "{sql}");
            plan(&ctx, &served, sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        for sql in [
            "select upper(device_id), count(*), avg(risk) from twins group by 1",
            "select string_agg(device_id, ',') from twins",
            "select device_id, row_number() over (order by risk desc) from twins",
            "select make_array(1, 2)[1], concat('a', 'b') || 'c', date_trunc('hour', now())",
            "select current_schema(), current_database(), pg_catalog.pg_get_userbyid(cast(10 as int))",
        ] {
            plan(&ctx, &served, sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    });
}

/// Values that grow step by step (`s || s` in one CTE after another, nested
/// `encode`, lists joined back into strings) stop at the per-value limit
/// instead of growing past the process's memory; ordinary uses are unchanged.
#[test]
fn sql_values_grown_step_by_step_stop_at_the_limit() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let ctx = session_context(&SqlView::new(10), 64 << 20).unwrap();
        let served = Served::of(&ctx);
        let run = |sql: String| {
            let (ctx, served) = (ctx.clone(), served.clone());
            async move {
                let plan = plan(&ctx, &served, &sql).await.map_err(|e| e.to_string())?;
                let df = ctx.execute_logical_plan(plan).await.map_err(|e| e.to_string())?;
                df.collect().await.map_err(|e| e.to_string())
            }
        };
        let chain = |step: &str| {
            let mut q = "with a0 as (select 'xxxxxxxxxxxxxxxx' as s)".to_string();
            for i in 1..=40 {
                q += &format!(", a{i} as (select {} as s from a{})", step, i - 1);
            }
            q + " select length(s) from a40"
        };
        for sql in [
            chain("s || s"),
            chain("concat(s, s)"),
            chain("concat_ws(s, s, s)"),
            chain("array_to_string(make_array(s, s), '')"),
            chain("array_to_string([s, s], '')"),
            chain("encode(s, 'hex')"),
            chain("upper(s || s)"),
        ] {
            let e = run(sql.clone()).await.expect_err(&sql);
            assert!(e.contains("per value"), "{}...: {e}", &sql[..120]);
        }
        let rows = run("select 'a' || 'b', 'a' || null, concat('a', null), upper('ab'), encode('ab', 'hex'), array_to_string(make_array('a', 'b'), ',')".into()).await.unwrap();
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&rows).unwrap().to_string();
        for want in ["| ab ", "|  ", "| a ", "| AB ", "| 6162 ", "| a,b "] {
            assert!(text.contains(want), "`{want}` in\n{text}");
        }
        let n = run("select count(*) from twins where device_id || '/' || schema <> ''".into()).await.unwrap();
        assert_eq!(n[0].num_rows(), 1);
    });
}

/// PostgreSQL's mock salt: per name, stable, shaped like a real one, keyed by a
/// per-process secret.
#[test]
fn sql_mock_salts_are_per_name_stable_and_shaped_like_real_ones() {
    let users = Users::new(&[("analyst".into(), "pw".into())]);
    let (a, va) = users.verifier("ghost-a");
    assert_eq!((a.clone(), va.clone()), users.verifier("ghost-a"), "stable");
    assert_ne!(a, users.verifier("ghost-b").0, "per name");
    let (real, real_v) = users.verifier("analyst");
    assert_eq!((real.len(), real_v.len()), (a.len(), va.len()), "same shape as a real user's");
    assert_eq!(users.verifier("analyst"), (real, real_v));
    assert_ne!(Users::new(&[]).verifier("ghost-a").0, a, "another process, other salts");
}

/// The back-off: free failures, then a doubling refusal window per address
/// (IPv6 per /64), capped, forgotten after a quiet period. Pure state machine,
/// driven by explicit instants.
#[test]
fn sql_login_backoff_doubles_after_free_failures_per_address_and_is_capped() {
    let t = LoginThrottle::default();
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let t0 = std::time::Instant::now();
    for n in 1..=FREE_FAILURES {
        assert_eq!(t.failed(ip, t0), (n, None), "failure {n} is free");
        assert_eq!(t.check(ip, t0), Ok(()));
    }
    assert_eq!(t.failed(ip, t0), (FREE_FAILURES + 1, Some(BACKOFF_BASE)));
    assert_eq!(t.check(ip, t0), Err(BACKOFF_BASE), "backed off");
    assert_eq!(t.check("10.0.0.2".parse().unwrap(), t0), Ok(()), "another address is not");
    assert_eq!(t.check("::ffff:10.0.0.1".parse().unwrap(), t0), Err(BACKOFF_BASE), "the same address, v4-mapped");
    let t1 = t0 + BACKOFF_BASE;
    assert_eq!(t.check(ip, t1), Ok(()), "over once it has passed");
    assert_eq!(t.failed(ip, t1).1, Some(BACKOFF_BASE * 2), "doubles");
    let mut last = None;
    for _ in 0..40 {
        last = t.failed(ip, t1).1;
    }
    assert_eq!(last, Some(BACKOFF_CAP), "capped");
    let quiet = t1 + FORGET_AFTER + Duration::from_secs(1);
    assert_eq!(t.check(ip, quiet), Ok(()));
    assert_eq!(t.failed(ip, quiet), (1, None), "forgotten after a quiet period");
    let v6: IpAddr = "2001:db8::1".parse().unwrap();
    for _ in 0..=FREE_FAILURES {
        t.failed(v6, t0);
    }
    assert!(t.check("2001:db8::ffff:2".parse().unwrap(), t0).is_err(), "the same /64");
    assert_eq!(t.check("2001:db8:0:1::1".parse().unwrap(), t0), Ok(()), "another /64");
}
