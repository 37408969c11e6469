//! Real clients through the router: psql, pgbench in every mode, psycopg 3, asyncpg, JDBC.

use crate::ensure;
use crate::harness::{block_on, python_venv, Context, Harness, TestResult, APP_PW};
use crate::trial;
use libtest_mimic::Trial;
use std::path::Path;
use std::process::Command;

pub fn trials() -> Vec<Trial> {
    vec![
        trial("clients::psql_login_and_identity", psql_login_and_identity),
        trial(
            "clients::tokio_postgres_simple_and_extended",
            tokio_postgres_simple_and_extended,
        ),
        trial("clients::pgbench_every_mode", pgbench_every_mode),
        trial("clients::psycopg3_prepare_threshold_0", |h| {
            python_driver(h, "psycopg")
        }),
        trial("clients::asyncpg_prepared", |h| python_driver(h, "asyncpg")),
        trial("clients::jdbc_prepare_threshold_1", jdbc),
    ]
}

fn psql_login_and_identity(h: &Harness) -> TestResult {
    let (ok, out, err) = h.psql("app", "select current_user, current_database()");
    ensure!(ok, "psql failed: {err}");
    ensure!(out.trim() == "app|app", "unexpected identity {out:?}");
    Ok(())
}

fn tokio_postgres_simple_and_extended(h: &Harness) -> TestResult {
    block_on(async {
        let c = h.connect("app", APP_PW, "app").await?;
        let rows = c
            .simple_query("select 1 as one")
            .await
            .ctx("simple query")?;
        let v = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        ensure!(v.as_deref() == Some("1"), "simple query gave {v:?}");
        let row = c
            .query_one("select $1::int + 1, $2::text", &[&41i32, &"x"])
            .await
            .ctx("extended query")?;
        ensure!(
            row.get::<_, i32>(0) == 42 && row.get::<_, String>(1) == "x",
            "extended query gave wrong values"
        );
        c.batch_execute("create table if not exists tp_rollback(a int)")
            .await
            .ctx("create")?;
        c.batch_execute("begin; insert into tp_rollback values (1); rollback")
            .await
            .ctx("rollback")?;
        let n: i64 = c
            .query_one("select count(*) from tp_rollback", &[])
            .await
            .ctx("count")?
            .get(0);
        ensure!(n == 0, "rolled back row is visible ({n})");
        Ok(())
    })
}

/// Parses "number of transactions actually processed: N/M" (N == M when nothing failed).
fn processed(out: &str) -> Option<(u64, u64)> {
    let line = out
        .lines()
        .find(|l| l.starts_with("number of transactions actually processed:"))?;
    let v = line.split(':').nth(1)?.trim();
    match v.split_once('/') {
        Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
        None => {
            let n = v.parse().ok()?;
            Some((n, n))
        }
    }
}

fn pgbench_every_mode(h: &Harness) -> TestResult {
    let port = h.router.port;
    let o = h.client_program(
        "pgbench",
        port,
        "app",
        APP_PW,
        &["-i", "-s", "1", "-q", "app"],
    );
    ensure!(
        o.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let runs: &[(&[&str], u64)] = &[
        (
            &["-S", "-c", "16", "-j", "2", "-t", "200", "-M", "simple"],
            16 * 200,
        ),
        (
            &["-S", "-c", "16", "-j", "2", "-t", "200", "-M", "extended"],
            16 * 200,
        ),
        (
            &["-S", "-c", "16", "-j", "2", "-t", "200", "-M", "prepared"],
            16 * 200,
        ),
        (&["-c", "8", "-j", "2", "-t", "100"], 8 * 100),
        (
            &["-c", "8", "-j", "2", "-t", "50", "-M", "prepared"],
            8 * 50,
        ),
        (&["-S", "-C", "-c", "4", "-j", "2", "-t", "50"], 4 * 50),
    ];
    for (args, want) in runs {
        let mut full: Vec<&str> = args.to_vec();
        full.push("-n");
        full.push("app");
        let o = h.client_program("pgbench", port, "app", APP_PW, &full);
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        ensure!(o.status.success(), "pgbench {args:?} failed: {err}{out}");
        ensure!(
            processed(&out) == Some((*want, *want)),
            "pgbench {args:?}: expected {want} transactions: {out}"
        );
    }
    // TPC-B keeps the branch/teller/account/history sums equal.
    let sums = h.direct(
        "select (select sum(abalance) from pgbench_accounts) = (select sum(bbalance) from pgbench_branches) \
         and (select sum(tbalance) from pgbench_tellers) = (select sum(delta) from pgbench_history)",
    )?;
    ensure!(sums.trim() == "t", "TPC-B invariant broken: {sums}");
    Ok(())
}

fn dsn(h: &Harness) -> String {
    format!(
        "postgresql://app:{APP_PW}@127.0.0.1:{}/small",
        h.router.port
    )
}

fn python_driver(h: &Harness, which: &str) -> TestResult {
    let py = python_venv()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/drivers.py");
    let o = Command::new(py)
        .arg(script)
        .arg(which)
        .env("PGSHARD_DSN", dsn(h))
        .output()
        .ctx("run driver test")?;
    let out = String::from_utf8_lossy(&o.stdout);
    ensure!(
        o.status.success(),
        "{which} failed: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(
        out.contains(&format!("OK {which}")),
        "{which} printed no OK line: {out}"
    );
    Ok(())
}

fn jdbc(h: &Harness) -> TestResult {
    let jar = Path::new("/usr/share/java/postgresql.jar");
    ensure!(
        jar.exists(),
        "JDBC driver missing: apt-get install -y libpostgresql-jdbc-java (.ci/run does)"
    );
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/JdbcTest.java");
    let classes = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-jdbc");
    std::fs::create_dir_all(&classes).ctx("classes dir")?;
    let o = Command::new("javac")
        .arg("-d")
        .arg(&classes)
        .arg(&src)
        .output()
        .ctx("javac")?;
    ensure!(
        o.status.success(),
        "javac failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let cp = format!("{}:{}", classes.display(), jar.display());
    let url = format!("jdbc:postgresql://127.0.0.1:{}/small", h.router.port);
    let o = Command::new("java")
        .args(["-cp", &cp, "JdbcTest", &url, "app", APP_PW])
        .output()
        .ctx("java")?;
    let out = String::from_utf8_lossy(&o.stdout);
    ensure!(
        o.status.success() && out.contains("OK jdbc"),
        "JDBC test failed: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}
