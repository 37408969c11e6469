//! Database-per-tenant: clients of `shop_<tenant>` see and write only that tenant's rows of the
//! tenant distribution's tables, on the shared 2-shard topology's sharded router.

use crate::ensure;
use crate::harness::{
    block_on, connect_port, copy_out_lines, first_value as one, sqlstate, Harness, PgContext,
    TestResult, APP_PW,
};
use crate::sharding::{on_shard, router, shop};
use crate::trial;
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "tenants::tenant_database_sees_only_its_tenant",
        tenant_database,
    )]
}

/// The shard a hashed tenant of the `tenants` distribution lives on (2 shards, 4096 buckets).
fn tenant_shard(t: &str) -> usize {
    if t == "big" {
        return 1;
    }
    let b = pgshard::pghash::bucket(&pgshard::pghash::KeyValue::Text(t.as_bytes()), 4096).unwrap();
    b as usize * 2 / 4096
}

/// Waits until every replica has replayed its primary's WAL as of now.
fn replicas_caught_up(h: &Harness) -> TestResult {
    for shard in 0..2 {
        let lsn = on_shard(h, shard, "shop", "SELECT pg_current_wal_lsn()")?;
        for r in h.cluster.replicas(shard) {
            let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while h
                .cluster
                .psql(r, "shop", &sql)
                .map_err(|e| e.to_string())?
                .trim()
                != "t"
            {
                ensure!(
                    std::time::Instant::now() < deadline,
                    "a replica of shard {shard} did not replay {lsn} in 30 s"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
    Ok(())
}

/// The SQLSTATE a statement fails with (or "ok").
async fn outcome(c: &tokio_postgres::Client, sql: &str) -> String {
    match c.simple_query(sql).await {
        Ok(_) => "ok".into(),
        Err(e) => sqlstate(&e),
    }
}

fn tenant_database(h: &Harness) -> TestResult {
    block_on(async {
        let base = shop(h).await?;
        base.batch_execute(
            "DROP TABLE IF EXISTS tdocs, tlines, tplans; \
             CREATE TABLE tplans (name text); INSERT INTO tplans VALUES ('free'), ('pro'); \
             CREATE TABLE tdocs (tenant text, id int, body text, PRIMARY KEY (tenant, id)); \
             CREATE TABLE tlines (tenant text, doc int, n int)",
        )
        .await
        .pgx("ddl")?;
        // Tenants t0..t11 with i docs of one line each: several tenants share each shard.
        let tenants: Vec<String> = (0..12).map(|i| format!("t{i}")).collect();
        for (i, t) in tenants.iter().enumerate() {
            for id in 1..=(i + 1) {
                base.batch_execute(&format!(
                    "INSERT INTO tdocs (tenant, id, body) VALUES ('{t}', {id}, 'b'); INSERT INTO tlines (tenant, doc, n) VALUES ('{t}', {id}, {id})"
                ))
                .await
                .pgx("seed")?;
            }
        }
        let me = "t7";
        let my_shard = tenant_shard(me);
        let neighbours = tenants
            .iter()
            .filter(|t| *t != me && tenant_shard(t) == my_shard)
            .count();
        ensure!(
            neighbours > 0,
            "t7 should share its shard with other tenants"
        );

        let c = connect_port(router(h).port, "app", APP_PW, "shop_t7", "").await?;
        // Key-less reads see the tenant's rows only, also through joins not on the key and
        // through the extended protocol.
        // Reads outside a transaction may run on replicas: they get the seed rows first.
        replicas_caught_up(h)?;
        let n = one(&c, "SELECT count(*) FROM tdocs").await?;
        ensure!(n == "8", "key-less count: {n}");
        // COPY … TO copies the tenant's rows only: its source is filtered like a read (the
        // shard also holds its neighbours' rows). tokio-postgres runs COPY through the
        // extended protocol.
        for (sql, header) in [
            ("COPY tdocs TO STDOUT", false),
            (
                "COPY tdocs (id) TO STDOUT WITH (FORMAT csv, HEADER true)",
                true,
            ),
            (
                "COPY (SELECT d.id FROM tdocs d JOIN tlines l ON l.doc = d.id) TO STDOUT",
                false,
            ),
        ] {
            let mut lines = copy_out_lines(&c, sql).await?;
            if header {
                ensure!(
                    lines.first().map(String::as_str) == Some("id"),
                    "{sql}: header {lines:?}"
                );
                lines.remove(0);
            }
            let mut ids: Vec<i32> = lines
                .iter()
                .map(|l| {
                    let f: Vec<&str> = l.split(['\t', ',']).collect();
                    let id = if f.len() == 3 { f[1] } else { f[0] };
                    ensure!(
                        f.len() != 3 || f[0] == "t7",
                        "{sql}: another tenant's row {l}"
                    );
                    id.parse().map_err(|e| format!("{sql}: {l}: {e}"))
                })
                .collect::<Result<_, String>>()?;
            ids.sort();
            ensure!(
                ids == (1..=8).collect::<Vec<_>>(),
                "{sql}: copied ids {ids:?}"
            );
        }
        let joined = one(
            &c,
            "SELECT count(*) FROM tdocs d JOIN tlines l ON l.doc = d.id",
        )
        .await?;
        ensure!(joined == "8", "join not on the key: {joined}");
        let n: i64 = c
            .query_one("SELECT count(*) FROM tdocs WHERE id > $1", &[&4i32])
            .await
            .pgx("extended key-less read")?
            .get(0);
        ensure!(n == 4, "extended key-less count: {n}");
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM tdocs WHERE tenant = $1",
                &[&"t7".to_string()],
            )
            .await
            .pgx("keyed read")?
            .get(0);
        ensure!(n == 8, "keyed count: {n}");
        ensure!(
            one(&c, "SELECT count(*) FROM tdocs WHERE tenant = 't3'").await? == "0",
            "another tenant's key reads nothing"
        );
        let plans = one(&c, "SELECT count(*) FROM tplans").await?;
        ensure!(plans == "2", "reference table read: {plans}");

        // Writes name the tenant, and no other.
        c.batch_execute("INSERT INTO tdocs (tenant, id, body) VALUES ('t7', 100, 'new')")
            .await
            .pgx("insert own row")?;
        let n = c
            .execute(
                "UPDATE tdocs SET body = 'upd' WHERE tenant = $1 AND id = $2",
                &[&"t7".to_string(), &100i32],
            )
            .await
            .pgx("update own row")?;
        ensure!(n == 1, "update own row touched {n}");
        // What a write reads is the tenant's too (neighbours share the shard).
        c.batch_execute(
            "UPDATE tdocs SET body = (SELECT count(*)::text FROM tdocs) WHERE tenant = 't7' AND id = 100",
        )
        .await
        .pgx("update reading its table")?;
        let body = one(
            &c,
            "SELECT body FROM tdocs WHERE tenant = 't7' AND id = 100",
        )
        .await?;
        ensure!(
            body == "9",
            "a write's subquery counted {body} docs, the tenant has 9"
        );
        c.execute(
            "UPDATE tdocs SET body = (SELECT count(*)::text FROM tlines l WHERE l.n > $1) WHERE tenant = $2 AND id = $3",
            &[&0i32, &"t7".to_string(), &100i32],
        )
        .await
        .pgx("extended update reading another table")?;
        let body = one(
            &c,
            "SELECT body FROM tdocs WHERE tenant = 't7' AND id = 100",
        )
        .await?;
        ensure!(
            body == "8",
            "a write's subquery counted {body} lines, the tenant has 8"
        );
        let refused = [
            (
                "INSERT INTO tdocs (tenant, id, body) VALUES ('t3', 100, 'x')",
                "42501",
            ),
            (
                "INSERT INTO tdocs (tenant, id, body) VALUES ('t7', 101, 'x'), ('t3', 101, 'x')",
                "42501",
            ),
            ("DELETE FROM tdocs WHERE tenant = 't3'", "42501"),
            ("UPDATE tdocs SET body = 'all'", "0A000"),
            ("DELETE FROM tdocs WHERE id = 1", "0A000"),
            ("/* pgshard: shard=0 */ SELECT count(*) FROM tdocs", "42501"),
            ("/* pgshard: key=t3 */ SELECT count(*) FROM tdocs", "42501"),
            ("SELECT count(*) FROM items", "0A000"),
            ("SELECT count(*) FROM tdocs, mystery", "0A000"),
        ];
        for (sql, code) in refused {
            let got = outcome(&c, sql).await;
            ensure!(got == code, "{sql}: {got}, want {code}");
        }
        c.batch_execute("SET pgshard.key = 't3'").await.pgx("set")?;
        let got = outcome(&c, "SELECT count(*) FROM tdocs").await;
        ensure!(got == "42501", "SET pgshard.key to another tenant: {got}");
        c.batch_execute("RESET pgshard.key").await.pgx("reset")?;

        // COPY rows are checked one by one.
        {
            use futures_util::SinkExt;
            // Prepared first, then run while another client holds the server connections it
            // was prepared on: pgshard prepares it again, and that Parse is not the client's.
            let stmt = c
                .prepare("COPY tdocs (tenant, id, body) FROM STDIN")
                .await
                .pgx("prepare copy")?;
            base.batch_execute("BEGIN; SELECT count(*) FROM tlines")
                .await
                .pgx("hold connections")?;
            let sink = c.copy_in(&stmt).await.pgx("copy in")?;
            futures_util::pin_mut!(sink);
            sink.send(bytes::Bytes::from_static(b"t7\t200\tc\nt7\t201\tc\n"))
                .await
                .pgx("send")?;
            ensure!(sink.finish().await.pgx("finish")? == 2, "own COPY rows");
            base.batch_execute("COMMIT").await.pgx("release")?;
            let sink = c
                .copy_in("COPY tdocs (tenant, id, body) FROM STDIN")
                .await
                .pgx("copy in")?;
            futures_util::pin_mut!(sink);
            let _ = sink
                .send(bytes::Bytes::from_static(b"t7\t202\tc\nt3\t202\tc\n"))
                .await;
            let Err(err) = sink.finish().await else {
                return Err("COPY of another tenant's row was accepted".into());
            };
            ensure!(sqlstate(&err) == "42501", "COPY refusal: {err}");
        }

        // Where the rows landed, seen on the servers.
        let mine = on_shard(
            h,
            my_shard,
            "shop",
            "SELECT string_agg(id::text || ':' || body, ',' ORDER BY id) FROM tdocs WHERE tenant = 't7' AND id >= 100",
        )?;
        ensure!(
            // Row 100's body is the count its last UPDATE's subquery took.
            mine == "100:8,200:c,201:c",
            "t7's new rows on its shard: {mine}"
        );
        let stray = on_shard(
            h,
            1 - my_shard,
            "shop",
            "SELECT count(*) FROM tdocs WHERE tenant = 't7' OR id >= 100",
        )?;
        ensure!(stray == "0", "rows on the other shard: {stray}");
        let t3 = one(&base, "SELECT count(*) FROM tdocs WHERE tenant = 't3'").await?;
        ensure!(t3 == "4", "t3 untouched: {t3}");

        // A tenant name that is no key of the distribution is no database.
        let Err(err) = connect_port(router(h).port, "app", APP_PW, "shop_", "").await else {
            return Err("the bare prefix shop_ was accepted as a database".into());
        };
        ensure!(err.contains("3D000"), "bare prefix: {err}");
        Ok(())
    })
}
