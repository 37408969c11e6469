//! Transaction pooling semantics: prepared statements, session settings, pinning, cleanup.

use crate::ensure;
use crate::harness::{
    block_on, connect_port, first_value as one, sqlstate, Context, Harness, TestResult, APP_PW,
};
use crate::trial;
use libtest_mimic::Trial;
use std::time::{Duration, Instant};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "pooling::prepared_statements_many_clients_small_pool",
            prepared_many_clients,
        ),
        trial(
            "pooling::settings_follow_the_client",
            settings_follow_client,
        ),
        trial("pooling::startup_options_applied", startup_options),
        trial(
            "pooling::set_local_and_rolled_back_set",
            set_local_and_rollback,
        ),
        trial(
            "pooling::advisory_lock_pins_until_disconnect",
            advisory_lock_pins,
        ),
        trial("pooling::temp_table_pins", temp_table_pins),
        trial(
            "pooling::client_vanishing_mid_transaction_rolls_back",
            client_vanishes,
        ),
        trial("pooling::server_dying_mid_transaction", server_dies),
        trial("pooling::query_wait_timeout_gives_53300", wait_timeout),
        trial("pooling::session_mode_keeps_backend", session_mode),
        trial("pooling::idle_transaction_timeout", idle_tx_timeout),
        trial("pooling::deallocate_and_discard", deallocate_and_discard),
        trial(
            "pooling::min_size_idle_timeout_and_dead_servers",
            pool_maintenance,
        ),
    ]
}

/// 30 clients, each with its own named prepared statements, over a pool of 3 connections.
fn prepared_many_clients(h: &Harness) -> TestResult {
    block_on(async {
        let mut tasks = Vec::new();
        for n in 0..30i32 {
            let port = h.router.port;
            tasks.push(tokio::spawn(async move {
                let c = connect_port(port, "app", APP_PW, "small", "").await?;
                // Same text from every client (shared global statement) and a per-client one.
                let shared = c
                    .prepare("select $1::int * 10")
                    .await
                    .ctx("prepare shared")?;
                let own = c
                    .prepare(&format!("select $1::int + {n}"))
                    .await
                    .ctx("prepare own")?;
                for i in 0..40i32 {
                    let a: i32 = c.query_one(&shared, &[&i]).await.ctx("exec shared")?.get(0);
                    let b: i32 = c.query_one(&own, &[&i]).await.ctx("exec own")?.get(0);
                    if a != i * 10 || b != i + n {
                        return Err(format!("client {n}: wrong results {a} {b} for {i}"));
                    }
                }
                Ok::<(), String>(())
            }));
        }
        for t in tasks {
            t.await.ctx("join")??;
        }
        Ok(())
    })
}

fn settings_follow_client(h: &Harness) -> TestResult {
    block_on(async {
        let a = h.connect("app", APP_PW, "tiny").await?;
        let b = h.connect("app", APP_PW, "tiny").await?;
        one(&a, "SET search_path = 'client_a', public").await?;
        one(&a, "SET statement_timeout = '4321ms'").await?;
        one(&b, "SET application_name = 'client-b'").await?;
        // "tiny" has one server connection: a and b alternate on the same backend.
        for _ in 0..3 {
            ensure!(
                one(&a, "SHOW search_path").await? == "client_a, public",
                "a lost its search_path"
            );
            ensure!(
                one(&a, "SHOW statement_timeout").await? == "4321ms",
                "a lost statement_timeout"
            );
            ensure!(
                one(&b, "SHOW search_path").await? == "\"$user\", public",
                "a's search_path leaked to b"
            );
            ensure!(
                one(&b, "SHOW statement_timeout").await? == "0",
                "a's statement_timeout leaked to b"
            );
            ensure!(
                one(&b, "SHOW application_name").await? == "client-b",
                "b lost application_name"
            );
            ensure!(
                one(&a, "SHOW application_name").await? != "client-b",
                "b's application_name leaked to a"
            );
        }
        one(&a, "RESET statement_timeout").await?;
        ensure!(
            one(&a, "SHOW statement_timeout").await? == "0",
            "RESET not applied"
        );
        one(&a, "RESET ALL").await?;
        ensure!(
            one(&a, "SHOW search_path").await? == "\"$user\", public",
            "RESET ALL not applied"
        );
        Ok(())
    })
}

fn startup_options(h: &Harness) -> TestResult {
    block_on(async {
        let c = connect_port(
            h.router.port,
            "app",
            APP_PW,
            "tiny",
            "options='-c statement_timeout=2345 -c work_mem=1234kB' application_name=optapp",
        )
        .await?;
        let other = h.connect("app", APP_PW, "tiny").await?;
        for _ in 0..3 {
            ensure!(
                one(&c, "SHOW statement_timeout").await? == "2345ms",
                "startup option not applied"
            );
            ensure!(
                one(&c, "SHOW work_mem").await? == "1234kB",
                "startup option not applied"
            );
            ensure!(
                one(&c, "SHOW application_name").await? == "optapp",
                "application_name not applied"
            );
            ensure!(
                one(&other, "SHOW work_mem").await? != "1234kB",
                "startup option leaked to another client"
            );
        }
        Ok(())
    })
}

fn set_local_and_rollback(h: &Harness) -> TestResult {
    block_on(async {
        let c = h.connect("app", APP_PW, "tiny").await?;
        c.batch_execute("BEGIN; SET LOCAL work_mem = '777kB'")
            .await
            .ctx("set local")?;
        ensure!(
            one(&c, "SHOW work_mem").await? == "777kB",
            "SET LOCAL not in effect inside its transaction"
        );
        c.batch_execute("COMMIT").await.ctx("commit")?;
        ensure!(
            one(&c, "SHOW work_mem").await? != "777kB",
            "SET LOCAL outlived its transaction"
        );
        c.batch_execute("BEGIN").await.ctx("begin")?;
        one(&c, "SET work_mem = '888kB'").await?;
        c.batch_execute("ROLLBACK").await.ctx("rollback")?;
        let other = h.connect("app", APP_PW, "tiny").await?;
        ensure!(
            one(&other, "SHOW work_mem").await? != "888kB",
            "rolled back SET leaked"
        );
        ensure!(
            one(&c, "SHOW work_mem").await? != "888kB",
            "rolled back SET still applied to its client"
        );
        c.batch_execute("BEGIN").await.ctx("begin")?;
        one(&c, "SET work_mem = '999kB'").await?;
        c.batch_execute("COMMIT").await.ctx("commit")?;
        ensure!(
            one(&other, "SHOW work_mem").await? != "999kB",
            "committed SET leaked to another client"
        );
        ensure!(
            one(&c, "SHOW work_mem").await? == "999kB",
            "committed SET lost"
        );
        Ok(())
    })
}

fn advisory_lock_pins(h: &Harness) -> TestResult {
    block_on(async {
        let a = h.connect("app", APP_PW, "small").await?;
        let b = h.connect("app", APP_PW, "small").await?;
        one(&a, "SELECT pg_advisory_lock(424242)").await?;
        ensure!(
            one(&b, "SELECT pg_try_advisory_lock(424242)").await? == "f",
            "b got a lock a holds"
        );
        // a keeps its lock across transactions: its server connection is pinned.
        let pid1 = one(&a, "SELECT pg_backend_pid()").await?;
        let pid2 = one(&a, "SELECT pg_backend_pid()").await?;
        ensure!(
            pid1 == pid2,
            "pinned client moved between server connections"
        );
        drop(a);
        // a's connection is reset (DISCARD ALL) before reuse, which releases the lock.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if one(&b, "SELECT pg_try_advisory_lock(424242)").await? == "t" {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "lock not released after the pinned client left"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        one(&b, "SELECT pg_advisory_unlock_all()").await?;
        Ok(())
    })
}

fn temp_table_pins(h: &Harness) -> TestResult {
    block_on(async {
        let a = h.connect("app", APP_PW, "small").await?;
        one(&a, "CREATE TEMP TABLE pin_tmp(x int)").await?;
        for i in 0..5 {
            one(&a, &format!("INSERT INTO pin_tmp VALUES ({i})")).await?;
        }
        ensure!(
            one(&a, "SELECT count(*) FROM pin_tmp").await? == "5",
            "temp table lost between transactions"
        );
        Ok(())
    })
}

fn client_vanishes(h: &Harness) -> TestResult {
    block_on(async {
        h.direct("CREATE TABLE IF NOT EXISTS vanish(id int)")?;
        let pid = {
            let c = h.connect("app", APP_PW, "tiny").await?;
            c.batch_execute("BEGIN; INSERT INTO vanish VALUES (1)")
                .await
                .ctx("begin+insert")?;
            one(&c, "SELECT pg_backend_pid()").await?
            // Dropped mid-transaction without COMMIT.
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let c = h.connect("app", APP_PW, "tiny").await?;
        ensure!(
            one(&c, "SELECT count(*) FROM vanish").await? == "0",
            "uncommitted row of a vanished client is visible"
        );
        // The single server connection of "tiny" was cleaned, not left in a transaction.
        // In a fresh transaction now() is this statement's time; in a leftover one it is older.
        let fresh = one(&c, "SELECT now() = statement_timestamp()").await?;
        ensure!(
            fresh == "t",
            "reused connection was still inside the vanished client's transaction"
        );
        // Other trials hold transactions of their own on this server: look at this backend only.
        let idle_in_tx = h.direct(&format!("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' AND pid = {pid}"))?;
        ensure!(
            idle_in_tx.trim() == "0",
            "the vanished client's server connection was left idle in transaction"
        );
        Ok(())
    })
}

fn server_dies(h: &Harness) -> TestResult {
    block_on(async {
        let c = h.connect("app", APP_PW, "small").await?;
        c.batch_execute("BEGIN").await.ctx("begin")?;
        let pid = one(&c, "SELECT pg_backend_pid()").await?;
        h.direct(&format!("SELECT pg_terminate_backend({pid})"))?;
        let r = c.simple_query("SELECT 1").await;
        ensure!(r.is_err(), "query on a dead server connection succeeded");
        // Other clients and new connections keep working.
        let d = h.connect("app", APP_PW, "small").await?;
        ensure!(
            one(&d, "SELECT 41 + 1").await? == "42",
            "pool broken after server death"
        );
        Ok(())
    })
}

fn wait_timeout(h: &Harness) -> TestResult {
    let r = h.spawn_router("query_wait_timeout = \"1s\"", "")?;
    block_on(async {
        let a = connect_port(r.port, "app", APP_PW, "tiny", "").await?;
        a.batch_execute("BEGIN; SELECT 1").await.ctx("hold")?;
        let b = connect_port(r.port, "app", APP_PW, "tiny", "").await?;
        let t = Instant::now();
        let e = b
            .simple_query("SELECT 1")
            .await
            .err()
            .ok_or("second client got a server connection")?;
        ensure!(
            sqlstate(&e) == "53300",
            "expected 53300, got {}",
            sqlstate(&e)
        );
        ensure!(
            t.elapsed() >= Duration::from_millis(900),
            "timed out too early: {:?}",
            t.elapsed()
        );
        a.batch_execute("COMMIT").await.ctx("commit")?;
        ensure!(
            one(&b, "SELECT 7").await? == "7",
            "client unusable after a wait timeout"
        );
        Ok(())
    })
}

fn session_mode(h: &Harness) -> TestResult {
    block_on(async {
        let c = h.connect("sess", "sess-pw", "app").await?;
        let p1 = one(&c, "SELECT pg_backend_pid()").await?;
        let other = h.connect("sess", "sess-pw", "app").await?;
        let _ = one(&other, "SELECT 1").await?;
        let p2 = one(&c, "SELECT pg_backend_pid()").await?;
        ensure!(p1 == p2, "session-mode client changed backend");
        c.batch_execute("PREPARE sp AS SELECT 5")
            .await
            .ctx("prepare")?;
        ensure!(
            one(&c, "EXECUTE sp").await? == "5",
            "SQL prepared statement lost in session mode"
        );
        Ok(())
    })
}

fn idle_tx_timeout(h: &Harness) -> TestResult {
    let r = h.spawn_router("idle_transaction_timeout = \"500ms\"", "")?;
    block_on(async {
        let c = connect_port(r.port, "app", APP_PW, "tiny", "").await?;
        c.batch_execute("BEGIN; SELECT 1").await.ctx("begin")?;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let e = c
            .simple_query("SELECT 1")
            .await
            .err()
            .ok_or("idle transaction survived the timeout")?;
        ensure!(
            c.is_closed() || sqlstate(&e) == "25P03",
            "unexpected error {e}"
        );
        let d = connect_port(r.port, "app", APP_PW, "tiny", "").await?;
        ensure!(
            one(&d, "SELECT 3").await? == "3",
            "pool unusable after idle-transaction disconnect"
        );
        Ok(())
    })
}

fn deallocate_and_discard(h: &Harness) -> TestResult {
    block_on(async {
        let c = h.connect("app", APP_PW, "small").await?;
        let st = c.prepare("select $1::int - 1").await.ctx("prepare")?;
        let v: i32 = c.query_one(&st, &[&5i32]).await.ctx("exec")?.get(0);
        ensure!(v == 4, "wrong result");
        one(&c, "DEALLOCATE ALL").await?;
        // tokio-postgres still thinks `st` exists; the server must now say it does not.
        let e = c
            .query_one(&st, &[&5i32])
            .await
            .err()
            .ok_or("statement survived DEALLOCATE ALL")?;
        ensure!(
            sqlstate(&e) == "26000",
            "expected 26000, got {}",
            sqlstate(&e)
        );
        one(&c, "SET work_mem = '1111kB'").await?;
        one(&c, "DISCARD ALL").await?;
        ensure!(
            one(&c, "SHOW work_mem").await? != "1111kB",
            "DISCARD ALL kept settings"
        );
        let st2 = c
            .prepare("select $1::int - 2")
            .await
            .ctx("prepare after discard")?;
        let v: i32 = c
            .query_one(&st2, &[&5i32])
            .await
            .ctx("exec after discard")?
            .get(0);
        ensure!(v == 3, "wrong result after discard");
        Ok(())
    })
}

/// Waits until `f` holds, polling; fails with `what` after `secs` seconds.
async fn eventually<F: FnMut() -> Result<bool, String>>(
    secs: u64,
    what: &str,
    mut f: F,
) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f()? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pool_maintenance(h: &Harness) -> TestResult {
    let r = h.spawn_router(
        "min_pool_size = 2\nserver_idle_timeout = \"1s\"",
        "[[users]]\nname = \"maint\"\npassword = \"maint-pw\"\n",
    )?;
    let backends = || {
        h.direct("SELECT count(*) FROM pg_stat_activity WHERE usename = 'maint'")
            .map(|s| s.trim().parse::<i64>().unwrap_or(-1))
    };
    block_on(async {
        // Five clients in parallel transactions: five server connections.
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(connect_port(r.port, "maint", "maint-pw", "app", "").await?);
        }
        let mut tasks = Vec::new();
        for c in clients {
            tasks.push(tokio::spawn(async move {
                c.batch_execute("BEGIN; SELECT pg_sleep(0.3); COMMIT")
                    .await
                    .map(|_| c)
            }));
        }
        let mut clients = Vec::new();
        for t in tasks {
            clients.push(t.await.ctx("join")?.ctx("transaction")?);
        }
        ensure!(
            backends()? == 5,
            "expected 5 server connections, saw {}",
            backends()?
        );
        // Unused for longer than server_idle_timeout: closed down to min_pool_size.
        eventually(
            6,
            "idle connections not closed down to min_pool_size",
            || Ok(backends()? == 2),
        )
        .await?;
        // Servers killed behind the pool's back: detected, replaced up to min_pool_size, and
        // clients never see the dead connections.
        let pids = || {
            h.direct("SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity WHERE usename = 'maint'")
        };
        let before = pids()?;
        h.direct("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'maint'")?;
        eventually(6, "dead idle connections not replaced", || {
            let now = pids()?;
            let fresh = now
                .trim()
                .split(',')
                .all(|p| !before.trim().split(',').any(|b| b == p));
            Ok(backends()? == 2 && fresh)
        })
        .await?;
        for c in &clients {
            ensure!(
                one(c, "SELECT 11").await? == "11",
                "client got a dead server connection"
            );
        }
        Ok(())
    })
}
