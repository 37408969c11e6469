//! Operating the router: authentication, admin console, metrics, reload, drain, TLS.

use crate::ensure;
use crate::harness::{
    block_on, connect_port, first_value as value, sqlstate, Context, Harness, TestResult, APP_PW,
};
use crate::trial;
use libtest_mimic::Trial;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "ops::client_auth_scram_md5_verifier_and_failures",
            client_auth,
        ),
        trial("ops::server_auth_md5_password_trust", server_auth),
        trial("ops::admin_console", admin_console),
        trial("ops::pause_resume", pause_resume),
        trial("ops::metrics_endpoint", metrics),
        trial("ops::reload_sighup_and_bad_config", reload),
        trial("ops::sigterm_drains", sigterm_drains),
        trial("ops::tls", tls),
        trial("ops::shardctl_status", shardctl_status),
    ]
}

/// All rows of an admin command as (column names, rows).
async fn table(
    c: &tokio_postgres::Client,
    sql: &str,
) -> Result<(Vec<String>, Vec<Vec<String>>), String> {
    let msgs = c
        .simple_query(sql)
        .await
        .map_err(|e| format!("{sql}: {e}"))?;
    let mut cols = Vec::new();
    let mut rows = Vec::new();
    for m in msgs {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            cols = r.columns().iter().map(|c| c.name().to_string()).collect();
            rows.push(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_string())
                    .collect(),
            );
        }
    }
    Ok((cols, rows))
}

fn client_auth(h: &Harness) -> TestResult {
    block_on(async {
        let p = h.router.port;
        // SCRAM (default) with plaintext secret, and with a stored SCRAM verifier.
        connect_port(p, "app", APP_PW, "app", "").await?;
        let v = connect_port(p, "verif", "verif-pw", "app", "").await?;
        ensure!(
            value(&v, "SELECT current_user").await? == "verif",
            "verifier user logged in as someone else"
        );
        for (user, pw, db, code) in [
            ("app", "wrong", "app", "28P01"),
            ("nobody", "x", "app", "28P01"),
            ("app", APP_PW, "nodb", "3D000"),
            ("app", APP_PW, "pgshard", "28000"),
        ] {
            let e = connect_port(p, user, pw, db, "")
                .await
                .err()
                .ok_or(format!("{user}/{db} logged in"))?;
            ensure!(e.contains(code), "{user}/{db}: expected {code}, got {e}");
        }
        // md5 router: a user whose secret is an md5 hash, and one with plaintext.
        let md5 = postgres_protocol::password::md5(b"verif-pw", "verif");
        let r = h.spawn_router("auth_type = \"md5\"", "")?;
        connect_port(r.port, "app", APP_PW, "app", "").await?;
        let e = connect_port(r.port, "app", "bad", "app", "")
            .await
            .err()
            .ok_or("md5 accepted a wrong password")?;
        ensure!(e.contains("28P01"), "md5 wrong password: {e}");
        let r2 = h.spawn_router("", &format!("[[users]]\nname = \"md5hashed\"\npassword = \"{md5}\"\nserver_password = \"verif-pw\"\n"))?;
        // The hash was made for user "verif": a client must prove the same password as md5hashed.
        let e = connect_port(r2.port, "md5hashed", "verif-pw", "app", "")
            .await
            .err();
        ensure!(
            e.as_deref().is_some_and(|e| e.contains("28P01")),
            "md5 hash for another user accepted: {e:?}"
        );
        let good = postgres_protocol::password::md5(b"hashpw", "md5ok");
        let r3 = h.spawn_router("", &format!("[[users]]\nname = \"md5ok\"\npassword = \"{good}\"\nserver_password = \"{APP_PW}\"\n"))?;
        // Under scram-sha-256 a user configured with an md5 hash is asked for md5 instead.
        let c = connect_port(r3.port, "md5ok", "hashpw", "app", "").await?;
        ensure!(
            value(&c, "SELECT current_user").await? == "md5ok",
            "md5-hash user logged in as someone else"
        );
        let e = connect_port(r3.port, "md5ok", "wrong", "app", "")
            .await
            .err()
            .ok_or("md5-hash user accepted a wrong password")?;
        ensure!(e.contains("28P01"), "md5-hash user, wrong password: {e}");
        Ok(())
    })
}

fn server_auth(h: &Harness) -> TestResult {
    block_on(async {
        for (user, pw) in [
            ("md5user", "md5-pw"),
            ("pwuser", "pw-pw"),
            ("trustuser", "trust-pw"),
        ] {
            let c = connect_port(h.router.port, user, pw, "app", "").await?;
            ensure!(
                value(&c, "SELECT current_user").await? == user,
                "{user}: wrong identity on the server"
            );
        }
        Ok(())
    })
}

fn admin_console(h: &Harness) -> TestResult {
    block_on(async {
        let app = h.connect("app", APP_PW, "app").await?;
        value(&app, "SELECT 1").await?;
        let a = connect_port(h.router.port, "admin", "admin-secret", "pgshard", "").await?;
        let (cols, rows) = table(&a, "SHOW POOLS").await?;
        for c in [
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode",
        ] {
            ensure!(
                cols.iter().any(|x| x == c),
                "SHOW POOLS lacks {c}: {cols:?}"
            );
        }
        ensure!(
            rows.iter().any(|r| r[0] == "app" && r[1] == "app"),
            "SHOW POOLS has no app/app pool: {rows:?}"
        );
        let (_, clients) = table(&a, "SHOW CLIENTS").await?;
        ensure!(
            clients.iter().any(|r| r[1] == "app"),
            "SHOW CLIENTS misses the app client"
        );
        let (_, servers) = table(&a, "SHOW SERVERS").await?;
        ensure!(!servers.is_empty(), "SHOW SERVERS is empty");
        let (scols, stats) = table(&a, "SHOW STATS").await?;
        let xi = scols
            .iter()
            .position(|c| c == "total_xact_count")
            .ok_or("no total_xact_count")?;
        ensure!(
            stats.iter().any(|r| r[xi].parse::<u64>().unwrap_or(0) > 0),
            "SHOW STATS counts no transactions"
        );
        let (_, config) = table(&a, "SHOW CONFIG").await?;
        ensure!(
            config
                .iter()
                .any(|r| r[0] == "default_pool_size" && r[1] == "10"),
            "SHOW CONFIG wrong: {config:?}"
        );
        ensure!(
            value(&a, "SHOW VERSION").await?.starts_with("pgshard "),
            "SHOW VERSION"
        );
        let (_, shards) = table(&a, "SHOW SHARDS").await?;
        ensure!(
            shards.len() == 4,
            "SHOW SHARDS should list 2 primaries + 2 replicas: {shards:?}"
        );
        ensure!(
            shards.iter().all(|r| r[4] == "up"),
            "a shard is not up: {shards:?}"
        );
        let e = a
            .simple_query("SHOW NONSENSE")
            .await
            .err()
            .ok_or("unknown admin command accepted")?;
        ensure!(sqlstate(&e) == "42601", "unknown command: {e}");
        Ok(())
    })
}

fn pause_resume(h: &Harness) -> TestResult {
    let r = h.spawn_router("", "")?;
    block_on(async {
        let a = connect_port(r.port, "admin", "admin-secret", "pgshard", "").await?;
        let c = connect_port(r.port, "app", APP_PW, "app", "").await?;
        value(&c, "SELECT 1").await?;
        value(&a, "PAUSE").await?;
        let q = tokio::spawn(async move { value(&c, "SELECT 2").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        ensure!(!q.is_finished(), "query ran while paused");
        value(&a, "RESUME").await?;
        let v = tokio::time::timeout(Duration::from_secs(5), q)
            .await
            .ctx("query stuck after RESUME")?
            .ctx("join")??;
        ensure!(v == "2", "wrong result after RESUME");
        Ok(())
    })
}

fn metrics(h: &Harness) -> TestResult {
    block_on(async {
        let c = h.connect("app", APP_PW, "app").await?;
        value(&c, "SELECT 1").await?;
        Ok(())
    })?;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", h.router.metrics_port))
        .ctx("connect metrics")?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ctx("send")?;
    let mut body = String::new();
    s.read_to_string(&mut body).ctx("read")?;
    ensure!(
        body.starts_with("HTTP/1.1 200"),
        "metrics status: {}",
        body.lines().next().unwrap_or("")
    );
    for m in [
        "pgshard_transactions_total{",
        "pgshard_pool_servers_idle{",
        "pgshard_wait_seconds_bucket{",
        "pgshard_client_connections",
    ] {
        ensure!(body.contains(m), "metrics lack {m}");
    }
    let line = body
        .lines()
        .find(|l| l.starts_with("pgshard_transactions_total{") && l.contains("database=\"app\""))
        .ok_or("no app pool counter")?;
    let n = line
        .rsplit(' ')
        .next()
        .unwrap_or("0")
        .parse::<f64>()
        .unwrap_or(0.0) as u64;
    ensure!(n > 0, "transactions counter is zero: {line}");
    Ok(())
}

fn reload(h: &Harness) -> TestResult {
    let r = h.spawn_router("", "")?;
    block_on(async {
        let a = connect_port(r.port, "admin", "admin-secret", "pgshard", "").await?;
        let c = connect_port(r.port, "app", APP_PW, "app", "").await?;
        value(&c, "SELECT 1").await?;
        let cfg = std::fs::read_to_string(&r.config_path).ctx("read config")?;
        std::fs::write(
            &r.config_path,
            cfg.replace("default_pool_size = 10", "default_pool_size = 7"),
        )
        .ctx("write")?;
        r.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, config) = table(&a, "SHOW CONFIG").await?;
            if config
                .iter()
                .any(|row| row[0] == "default_pool_size" && row[1] == "7")
            {
                break;
            }
            ensure!(Instant::now() < deadline, "SIGHUP did not reload");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(
            value(&c, "SELECT 2").await? == "2",
            "client dropped by reload"
        );
        // A broken file is refused and the running config stays.
        std::fs::write(&r.config_path, "[general]\nbogus_key = 1\n").ctx("write")?;
        let e = a
            .simple_query("RELOAD")
            .await
            .err()
            .ok_or("bad config accepted")?;
        ensure!(
            e.to_string().contains("bogus_key") || format!("{e:?}").contains("bogus_key"),
            "reload error does not name the key: {e:?}"
        );
        let (_, config) = table(&a, "SHOW CONFIG").await?;
        ensure!(
            config
                .iter()
                .any(|row| row[0] == "default_pool_size" && row[1] == "7"),
            "config lost after a failed reload"
        );
        ensure!(
            value(&c, "SELECT 3").await? == "3",
            "client dropped by failed reload"
        );
        Ok(())
    })
}

fn sigterm_drains(h: &Harness) -> TestResult {
    let mut r = h.spawn_router("shutdown_timeout = \"10s\"", "")?;
    let port = r.port;
    block_on(async {
        h.direct("CREATE TABLE IF NOT EXISTS drain_t(id int)")?;
        let c = connect_port(port, "app", APP_PW, "app", "").await?;
        c.batch_execute("BEGIN; INSERT INTO drain_t VALUES (42)")
            .await
            .ctx("begin")?;
        r.signal(libc::SIGTERM);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // New clients are refused while the open transaction may finish.
        ensure!(
            connect_port(port, "app", APP_PW, "app", "").await.is_err(),
            "new client accepted while draining"
        );
        c.batch_execute("COMMIT").await.ctx("commit during drain")?;
        drop(c);
        Ok(())
    })?;
    ensure!(
        r.wait_exit(Duration::from_secs(5)),
        "router did not exit after its clients left"
    );
    ensure!(
        h.direct("SELECT count(*) FROM drain_t WHERE id = 42")?
            .trim()
            == "1",
        "transaction lost during drain"
    );
    Ok(())
}

fn tls(h: &Harness) -> TestResult {
    let dir = h.dir.join("tls");
    std::fs::create_dir_all(&dir).ctx("tls dir")?;
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    let o = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .ctx("openssl")?;
    ensure!(
        o.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r = h.spawn_router(
        &format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
            cert.display(),
            key.display()
        ),
        "",
    )?;
    let o = h.client_program(
        "psql",
        r.port,
        "app",
        APP_PW,
        &[
            "-X",
            "-At",
            "-d",
            "sslmode=require dbname=app",
            "-c",
            "SELECT 'over tls'",
            "-c",
            "\\conninfo",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    ensure!(
        o.status.success() && out.contains("over tls") && out.contains("SSL connection"),
        "TLS session failed: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A result larger than the socket buffers: bytes the TLS writer holds must be flushed.
    let o = h.client_program(
        "psql",
        r.port,
        "app",
        APP_PW,
        &[
            "-X",
            "-At",
            "-d",
            "sslmode=require dbname=app",
            "-c",
            "SELECT length(string_agg(repeat('x', 1000), '')) FROM generate_series(1, 5000)",
            "-c",
            "SELECT repeat('y', 5000000)",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    ensure!(
        o.status.success() && out.starts_with("5000000\n") && out.len() > 5_000_000,
        "large result over TLS failed ({} bytes)",
        out.len()
    );
    // Without TLS configured, sslmode=require is refused cleanly ('N').
    let o = h.client_program(
        "psql",
        h.router.port,
        "app",
        APP_PW,
        &["-X", "-d", "sslmode=require dbname=app", "-c", "SELECT 1"],
    );
    ensure!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("SSL"),
        "sslmode=require without TLS should fail"
    );
    Ok(())
}

fn shardctl_status(h: &Harness) -> TestResult {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args([
            "--port",
            &h.router.port.to_string(),
            "--password",
            "admin-secret",
            "status",
        ])
        .output()
        .ctx("shardctl")?;
    let out = String::from_utf8_lossy(&o.stdout);
    ensure!(
        o.status.success(),
        "shardctl status failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let writers = out
        .lines()
        .filter(|l| l.contains("| primary | true |"))
        .count();
    ensure!(
        out.contains("shards:") && writers == 2,
        "shardctl status should list 2 writing primaries: {out}"
    );
    Ok(())
}
