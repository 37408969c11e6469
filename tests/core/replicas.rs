//! Reads on replicas: routing by statement kind, read-your-writes, lag, health and failover.
//! Where a statement ran is read back with `inet_server_port()`.

use crate::ensure;
use crate::harness::{
    block_on, connect_port, first_value as one, Context, Harness, PgContext, Router, TestResult,
    APP_PW,
};
use crate::trial;
use libtest_mimic::Trial;
use pgshard::topology::{ClusterSpec, LocalCluster};
use std::time::{Duration, Instant};

pub fn trials() -> Vec<Trial> {
    vec![
        trial("replicas::reads_on_replicas_writes_on_primaries", routing),
        trial(
            "replicas::read_your_writes_lag_health_and_failover",
            lag_health_failover,
        ),
    ]
}

/// Evaluates `probe` (an Option) every 100 ms until it is Some, for at most `secs` seconds.
macro_rules! until {
    ($secs:expr, $what:expr, $probe:expr) => {{
        let deadline = Instant::now() + Duration::from_secs($secs);
        loop {
            if let Some(v) = $probe {
                break v;
            }
            ensure!(Instant::now() < deadline, "timed out waiting for {}", $what);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }};
}

/// `v:port` of the row with `id` as `c` reads it.
async fn where_read(c: &tokio_postgres::Client, table: &str, id: i64) -> Result<String, String> {
    one(
        c,
        &format!("SELECT v || ':' || inet_server_port() FROM {table} WHERE id = {id}"),
    )
    .await
}

fn routing(h: &Harness) -> TestResult {
    let more = format!(
        "[replicas]\ncheck_interval = \"200ms\"\n{}\n[[sharding.tables]]\nname = \"reads\"\ndistribution = \"ids\"\ncolumn = \"id\"\n",
        crate::sharding::SHARDING
    );
    let router = h.spawn_router("", &more)?;
    let port = router.port;
    let replica = |s: usize| h.cluster.replicas(s)[0].port;
    let primary = |s: usize| h.primary(s).port;
    block_on(async move {
        let w = connect_port(port, "app", APP_PW, "shop", "").await?;
        w.batch_execute("DROP TABLE IF EXISTS reads; CREATE TABLE reads (id bigint, v int); CREATE SEQUENCE IF NOT EXISTS reads_seq")
            .await
            .pgx("ddl")?;
        let (a, b) = (
            (1..).find(|&i| crate::sharding::shard_of(i) == 0).unwrap(),
            (1..).find(|&i| crate::sharding::shard_of(i) == 1).unwrap(),
        );
        let ports = one(
            &w,
            &format!("INSERT INTO reads (id, v) VALUES ({a}, 1) RETURNING inet_server_port()"),
        )
        .await?;
        ensure!(
            ports == primary(0).to_string(),
            "a write runs on the primary, not {ports}"
        );
        w.batch_execute(&format!("INSERT INTO reads (id, v) VALUES ({b}, 1)"))
            .await
            .pgx("insert b")?;

        // A session that never wrote reads from each shard's replica once it has the rows.
        let r = connect_port(port, "app", APP_PW, "shop", "").await?;
        for (id, shard) in [(a, 0), (b, 1)] {
            let want = format!("1:{}", replica(shard));
            until!(
                10,
                &format!("key {id} read on shard {shard}'s replica"),
                where_read(&r, "reads", id)
                    .await
                    .ok()
                    .filter(|got| *got == want)
            );
        }
        // Keyless reads run on every shard's replica.
        let rows = r
            .simple_query("SELECT inet_server_port() FROM reads")
            .await
            .pgx("scatter")?;
        let mut seen: Vec<String> = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                _ => None,
            })
            .collect();
        seen.sort();
        let mut want = vec![replica(0).to_string(), replica(1).to_string()];
        want.sort();
        ensure!(
            seen == want,
            "scatter read ran on {seen:?}, expected the replicas {want:?}"
        );
        // READ ONLY transactions use replicas; read-write ones, and reads that write, the primary.
        r.batch_execute("BEGIN READ ONLY").await.pgx("begin ro")?;
        let got = where_read(&r, "reads", a).await?;
        r.batch_execute("COMMIT").await.pgx("commit ro")?;
        ensure!(
            got == format!("1:{}", replica(0)),
            "READ ONLY transaction read {got}"
        );
        r.batch_execute("BEGIN").await.pgx("begin")?;
        let got = where_read(&r, "reads", a).await?;
        r.batch_execute("COMMIT").await.pgx("commit")?;
        ensure!(
            got == format!("1:{}", primary(0)),
            "read-write transaction read {got}"
        );
        let n = one(
            &r,
            "SELECT nextval('reads_seq')::text || ':' || inet_server_port()",
        )
        .await?;
        ensure!(
            n.ends_with(&format!(":{}", primary(0))) || n.ends_with(&format!(":{}", primary(1))),
            "nextval ran on {n}"
        );

        // Read-your-writes: every read right after the session's own write sees it.
        for i in 2..40 {
            w.batch_execute(&format!("UPDATE reads SET v = {i} WHERE id = {a}"))
                .await
                .pgx("update")?;
            let got = where_read(&w, "reads", a).await?;
            ensure!(
                got.starts_with(&format!("{i}:")),
                "read after own write {i} saw {got}"
            );
        }

        let admin = connect_port(port, "admin", "admin-secret", "pgshard", "").await?;
        let rows = admin.simple_query("SHOW SHARDS").await.pgx("show shards")?;
        let states: Vec<(String, String)> = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some((
                    row.get("state").unwrap_or("").to_string(),
                    row.get("writer").unwrap_or("").to_string(),
                )),
                _ => None,
            })
            .collect();
        let expect: Vec<(String, String)> = [
            ("primary", "true"),
            ("standby", "false"),
            ("primary", "true"),
            ("standby", "false"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        ensure!(states == expect, "SHOW SHARDS states: {states:?}");
        drop(router);
        Ok(())
    })
}

const FAILOVER_SHARDING: &str = r#"
[[databases]]
name = "shop"
sharded = true

[[databases]]
name = "plain"
server_database = "shop"

[sharding]
[[sharding.distributions]]
name = "ids"
strategy = "hash"
key_type = "int8"

[[sharding.tables]]
name = "t"
distribution = "ids"
column = "id"
"#;

/// A router over a dedicated primary + replica (this trial stops and promotes servers).
fn failover_router(h: &Harness, cluster: &LocalCluster, replicas: &str) -> Result<Router, String> {
    let (p, r) = (cluster.primary(0).port, cluster.replicas(0)[0].port);
    h.spawn_with(|port, metrics| {
        format!(
            "[general]\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\nadmin_users = [\"admin\"]\n\
             server_connect_timeout = \"1s\"\nserver_connect_retries = 0\nquery_wait_timeout = \"5s\"\n\n\
             [replicas]\ncheck_interval = \"200ms\"\ncheck_timeout = \"1s\"\n{replicas}\n\n\
             [[users]]\nname = \"app\"\npassword = \"{APP_PW}\"\n\n[[users]]\nname = \"admin\"\npassword = \"admin-secret\"\n\n\
             [[shards]]\nprimary = \"127.0.0.1:{p}\"\nreplicas = [\"127.0.0.1:{r}\"]\n{FAILOVER_SHARDING}"
        )
    })
}

fn lag_health_failover(h: &Harness) -> TestResult {
    let mut spec = ClusterSpec::new(1, 1, h.dir.join("failover-pg"));
    spec.users = vec![("app".into(), APP_PW.into())];
    spec.databases = vec!["shop".into()];
    let cluster = LocalCluster::start(spec).ctx("start primary + replica")?;
    let router = failover_router(h, &cluster, "max_lag = \"1s\"")?;
    let stale_router = failover_router(h, &cluster, "max_lag = \"60s\"\nread_your_writes = false")?;
    let (pport, rport) = (cluster.primary(0).port, cluster.replicas(0)[0].port);
    let replica = cluster.replicas(0)[0].clone();
    let psql = |s: &pgshard::topology::Server, sql: &str| {
        cluster
            .psql(s, "shop", sql)
            .map(|o| o.trim().to_string())
            .ctx(sql)
    };
    block_on(async {
        let w = connect_port(router.port, "app", APP_PW, "shop", "").await?;
        w.batch_execute("CREATE TABLE t (id bigint, v int); INSERT INTO t (id, v) VALUES (1, 1)")
            .await
            .pgx("setup")?;
        let r = connect_port(router.port, "app", APP_PW, "shop", "").await?;
        let on_replica = format!("1:{rport}");
        until!(
            10,
            "reads on the replica",
            where_read(&r, "t", 1)
                .await
                .ok()
                .filter(|g| *g == on_replica)
        );
        let plain = connect_port(router.port, "app", APP_PW, "plain", "").await?;
        ensure!(
            one(&plain, "SELECT inet_server_port()").await? == pport.to_string(),
            "unsharded database on the primary"
        );

        // The replica stops replaying: the writer's next read must not go there.
        psql(&replica, "SELECT pg_wal_replay_pause()")?;
        w.batch_execute("UPDATE t SET v = 2 WHERE id = 1")
            .await
            .pgx("update")?;
        let got = where_read(&w, "t", 1).await?;
        ensure!(
            got == format!("2:{pport}"),
            "read-your-writes: the writer read {got}"
        );
        // Without read-your-writes (and a lax lag bound) the same sequence reads stale data.
        let s = connect_port(stale_router.port, "app", APP_PW, "shop", "").await?;
        until!(
            10,
            "the second router to see the replica",
            one(&s, "SELECT inet_server_port()")
                .await
                .ok()
                .filter(|p| *p == rport.to_string())
        );
        s.batch_execute("UPDATE t SET v = 3 WHERE id = 1")
            .await
            .pgx("update 3")?;
        let got = where_read(&s, "t", 1).await?;
        ensure!(
            got == format!("1:{rport}"),
            "with read_your_writes = false the read went to the paused replica: {got}"
        );
        // Past max_lag (1 s) the paused replica takes no reads, even from sessions that never wrote.
        let want = format!("3:{pport}");
        until!(
            10,
            "reads to leave the lagging replica",
            where_read(&r, "t", 1).await.ok().filter(|g| *g == want)
        );
        psql(&replica, "SELECT pg_wal_replay_resume()")?;
        let want = format!("3:{rport}");
        until!(
            10,
            "reads to return to the caught-up replica",
            where_read(&r, "t", 1).await.ok().filter(|g| *g == want)
        );

        // A replica that goes away: reads keep working on the primary, and come back.
        cluster.stop_server(&replica).ctx("stop replica")?;
        let want = format!("3:{pport}");
        for i in 0..20 {
            let got = where_read(&r, "t", 1)
                .await
                .map_err(|e| format!("read {i} with the replica down failed: {e}"))?;
            if got == want {
                break;
            }
            ensure!(i < 19, "reads stayed on the stopped replica: {got}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for i in 0..5 {
            let got = where_read(&r, "t", 1)
                .await
                .map_err(|e| format!("read {i} with the replica down failed: {e}"))?;
            ensure!(got == want, "read with the replica down: {got}");
        }
        cluster.start_server(&replica).ctx("restart replica")?;
        let want = format!("3:{rport}");
        until!(
            15,
            "reads to return to the restarted replica",
            where_read(&r, "t", 1).await.ok().filter(|g| *g == want)
        );

        // Failover: the primary dies, the replica is promoted; writes follow within seconds.
        cluster
            .stop_server(cluster.primary(0))
            .ctx("stop primary")?;
        cluster.promote(&replica).ctx("promote")?;
        let t = Instant::now();
        let got = until!(
            10,
            "writes to reach the promoted server",
            one(
                &w,
                "INSERT INTO t (id, v) VALUES (2, 5) RETURNING inet_server_port()"
            )
            .await
            .ok()
        );
        ensure!(
            got == rport.to_string(),
            "write after failover ran on {got}"
        );
        eprintln!("failover: writes resumed {:?} after promotion", t.elapsed());
        ensure!(
            one(&w, "SELECT count(*) FROM t").await? == "2",
            "rows on the promoted server"
        );
        let got = until!(
            10,
            "the unsharded database to follow",
            one(&plain, "SELECT inet_server_port()").await.ok()
        );
        ensure!(
            got == rport.to_string(),
            "unsharded database after failover ran on {got}"
        );
        Ok(())
    })?;
    drop(stale_router);
    drop(router);
    drop(cluster);
    Ok(())
}
