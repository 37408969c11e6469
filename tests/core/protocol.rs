//! Protocol coverage and bad input: COPY, cancel, large messages, notices, notifications,
//! function calls, garbage from clients.

use crate::ensure;
use crate::harness::{
    block_on, connect_port, error_code, sqlstate, Context, Harness, Raw, TestResult, APP_PW,
};
use crate::trial;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use libtest_mimic::Trial;
use std::time::{Duration, Instant};

pub fn trials() -> Vec<Trial> {
    vec![
        trial("protocol::copy_in_and_out", copy_in_out),
        trial("protocol::cancel_reaches_only_its_query", cancel),
        trial("protocol::large_rows_and_queries", large),
        trial("protocol::max_message_size_enforced", max_message_size),
        trial("protocol::notice_and_notification_forwarded", notices),
        trial("protocol::function_call", function_call),
        trial("protocol::multi_statement_and_pipelined_syncs", pipelined),
        trial("protocol::bad_input_gets_errors_not_crashes", bad_input),
        trial("protocol::client_that_stops_reading", stalled_reader),
    ]
}

fn copy_in_out(h: &Harness) -> TestResult {
    block_on(async {
        let c = h.connect("app", APP_PW, "app").await?;
        c.batch_execute("DROP TABLE IF EXISTS copy_t; CREATE TABLE copy_t(id int, v text)")
            .await
            .ctx("create")?;
        let sink = c.copy_in("COPY copy_t FROM STDIN").await.ctx("copy in")?;
        let mut sink = Box::pin(sink);
        let mut expect = String::new();
        for i in 0..5000 {
            expect.push_str(&format!("{i}\tvalue {i}\n"));
        }
        for chunk in expect.as_bytes().chunks(7000) {
            sink.send(Bytes::copy_from_slice(chunk))
                .await
                .ctx("copy data")?;
        }
        let n = sink.as_mut().finish().await.ctx("copy done")?;
        ensure!(n == 5000, "COPY FROM reported {n} rows");
        let stream = c
            .copy_out("COPY (SELECT * FROM copy_t ORDER BY id) TO STDOUT")
            .await
            .ctx("copy out")?;
        let mut stream = Box::pin(stream);
        let mut got = Vec::new();
        while let Some(chunk) = stream.next().await {
            got.extend_from_slice(&chunk.ctx("copy out data")?);
        }
        ensure!(
            got == expect.as_bytes(),
            "COPY TO returned different data ({} vs {} bytes)",
            got.len(),
            expect.len()
        );
        // psql's \copy path (simple protocol COPY) as well.
        let (ok, out, err) = h.psql("app", "COPY (SELECT count(*) FROM copy_t) TO STDOUT");
        ensure!(ok && out.trim() == "5000", "psql COPY TO: {out} {err}");
        Ok(())
    })
}

fn cancel(h: &Harness) -> TestResult {
    block_on(async {
        let a = h.connect("app", APP_PW, "app").await?;
        let b = h.connect("app", APP_PW, "app").await?;
        let token = a.cancel_token();
        let slow_b =
            tokio::spawn(async move { b.simple_query("SELECT pg_sleep(1.5)").await.map(|_| ()) });
        let t = Instant::now();
        let slow_a =
            tokio::spawn(async move { a.simple_query("SELECT pg_sleep(20)").await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .ctx("send cancel")?;
        let ra = slow_a.await.ctx("join")?;
        let e = ra.err().ok_or("cancelled query finished normally")?;
        ensure!(
            sqlstate(&e) == "57014",
            "expected 57014, got {}",
            sqlstate(&e)
        );
        ensure!(
            t.elapsed() < Duration::from_secs(5),
            "cancel took {:?}",
            t.elapsed()
        );
        slow_b
            .await
            .ctx("join")?
            .ctx("the other client's query was cancelled too")?;
        Ok(())
    })
}

fn large(h: &Harness) -> TestResult {
    block_on(async {
        let c = h.connect("app", APP_PW, "app").await?;
        let row = c
            .query_one("SELECT repeat('x', 8000000)", &[])
            .await
            .ctx("8 MB row")?;
        ensure!(
            row.get::<_, String>(0).len() == 8_000_000,
            "large row truncated"
        );
        let big = "y".repeat(3_000_000);
        let q = format!("SELECT length('{big}')");
        let n = c.simple_query(&q).await.ctx("3 MB query")?;
        let len = n.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        ensure!(
            len.as_deref() == Some("3000000"),
            "large query mangled: {len:?}"
        );
        let rows = c
            .query(
                "SELECT g, repeat('z', 1000) FROM generate_series(1, 20000) g",
                &[],
            )
            .await
            .ctx("many rows")?;
        ensure!(rows.len() == 20000, "rows lost: {}", rows.len());
        Ok(())
    })
}

fn max_message_size(h: &Harness) -> TestResult {
    let r = h.spawn_router("max_message_size = 1048576", "")?;
    block_on(async {
        let c = connect_port(r.port, "app", APP_PW, "app", "").await?;
        let q = format!("SELECT length('{}')", "q".repeat(2_000_000));
        let e = c
            .simple_query(&q)
            .await
            .err()
            .ok_or("oversized query accepted")?;
        ensure!(
            sqlstate(&e) == "08P01" || c.is_closed(),
            "unexpected error: {e}"
        );
        // Rows are never inspected: one far above max_message_size streams through.
        let c = connect_port(r.port, "app", APP_PW, "app", "").await?;
        let row = c
            .query_one("SELECT repeat('x', 20000000)", &[])
            .await
            .ctx("20 MB row with a 1 MB max_message_size")?;
        ensure!(
            row.get::<_, String>(0).len() == 20_000_000,
            "streamed row truncated"
        );
        let rss_kb = r.rss_kb();
        ensure!(
            rss_kb < 15_000,
            "router buffered the 20 MB row: RSS {rss_kb} kB"
        );
        // COPY data from the client is streamed too: one 3 MB CopyData message.
        c.batch_execute("DROP TABLE IF EXISTS big_copy; CREATE TABLE big_copy(v text)")
            .await
            .ctx("create")?;
        let sink = c.copy_in("COPY big_copy FROM STDIN").await.ctx("copy in")?;
        let mut sink = Box::pin(sink);
        let mut line = "z".repeat(3_000_000);
        line.push('\n');
        sink.send(Bytes::from(line)).await.ctx("3 MB CopyData")?;
        let n = sink.as_mut().finish().await.ctx("copy done")?;
        ensure!(n == 1, "COPY of a 3 MB row reported {n} rows");
        let len: i32 = c
            .query_one("SELECT length(v) FROM big_copy", &[])
            .await
            .ctx("check")?
            .get(0);
        ensure!(len == 3_000_000, "3 MB row stored as {len} bytes");
        let d = connect_port(r.port, "app", APP_PW, "app", "").await?;
        ensure!(
            d.query_one("SELECT 1", &[]).await.is_ok(),
            "router broken after oversized messages"
        );
        Ok(())
    })
}

fn notices(h: &Harness) -> TestResult {
    let (ok, _out, err) = h.psql(
        "app",
        "DO $$ BEGIN RAISE NOTICE 'hello from the server'; END $$",
    );
    ensure!(
        ok && err.contains("hello from the server"),
        "notice not forwarded: {err}"
    );
    block_on(async {
        let (client, mut conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=app password={APP_PW} dbname=app",
                h.router.port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .ctx("connect")?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(m)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = m {
                    let _ = tx.send(n.payload().to_string());
                }
            }
        });
        client
            .batch_execute("LISTEN pgshard_chan")
            .await
            .ctx("listen")?;
        let other = h.connect("app", APP_PW, "app").await?;
        other
            .batch_execute("NOTIFY pgshard_chan, 'ping'")
            .await
            .ctx("notify")?;
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .ctx("no notification within 5 s")?;
        ensure!(got.as_deref() == Some("ping"), "wrong notification {got:?}");
        Ok(())
    })
}

/// Logs a raw client in through a trust router; returns it after ReadyForQuery.
fn raw_login(port: u16) -> Result<Raw, String> {
    let mut raw = Raw::connect(port);
    raw.send(&Raw::startup("app", "app"));
    raw.read_until(b'Z')?;
    Ok(raw)
}

fn function_call(h: &Harness) -> TestResult {
    let r = h.spawn_router("auth_type = \"trust\"", "")?;
    let mut raw = raw_login(r.port)?;
    // FunctionCall int4pl(2, 40) (oid 177), text arguments, text result.
    let mut body = 177i32.to_be_bytes().to_vec();
    body.extend(1i16.to_be_bytes());
    body.extend(0i16.to_be_bytes());
    body.extend(2i16.to_be_bytes());
    for a in ["2", "40"] {
        body.extend((a.len() as i32).to_be_bytes());
        body.extend(a.as_bytes());
    }
    body.extend(0i16.to_be_bytes());
    raw.send(&Raw::msg(b'F', &body));
    let msgs = raw.read_until(b'Z')?;
    let v = msgs
        .iter()
        .find(|(t, _)| *t == b'V')
        .ok_or("no FunctionCallResponse")?;
    ensure!(
        &v.1[4..] == b"42",
        "int4pl(2, 40) returned {:?}",
        String::from_utf8_lossy(&v.1)
    );
    Ok(())
}

fn pipelined(h: &Harness) -> TestResult {
    let r = h.spawn_router("auth_type = \"trust\"", "")?;
    let mut raw = raw_login(r.port)?;
    // Three Sync batches sent at once, the second failing: each gets its own ReadyForQuery.
    let mut batch = Vec::new();
    for sql in ["SELECT 1", "SELECT 1/0", "SELECT 3"] {
        let mut p = b"\0".to_vec();
        p.extend(sql.as_bytes());
        p.extend(b"\0\0\0");
        batch.extend(Raw::msg(b'P', &p));
        batch.extend(Raw::msg(b'B', b"\0\0\0\0\0\0\0\0"));
        batch.extend(Raw::msg(b'E', b"\0\0\0\0\0"));
        batch.extend(Raw::msg(b'S', b""));
    }
    raw.send(&batch);
    let first = raw.read_until(b'Z')?;
    ensure!(
        first.iter().any(|(t, _)| *t == b'D'),
        "first batch returned no row"
    );
    let second = raw.read_until(b'Z')?;
    let err = second
        .iter()
        .find(|(t, _)| *t == b'E')
        .ok_or("second batch did not fail")?;
    ensure!(
        error_code(&err.1) == "22012",
        "expected division_by_zero, got {}",
        error_code(&err.1)
    );
    let third = raw.read_until(b'Z')?;
    ensure!(
        third.iter().any(|(t, _)| *t == b'D'),
        "third batch lost after an error in the second"
    );
    // A multi-statement simple query: two results, one ReadyForQuery.
    raw.send(&Raw::msg(b'Q', b"SELECT 1; SELECT 2\0"));
    let msgs = raw.read_until(b'Z')?;
    ensure!(
        msgs.iter().filter(|(t, _)| *t == b'C').count() == 2,
        "multi-statement query lost a result"
    );
    Ok(())
}

fn bad_input(h: &Harness) -> TestResult {
    let r = h.spawn_router("auth_type = \"trust\"", "")?;
    // Garbage instead of a startup packet.
    let mut raw = Raw::connect(r.port);
    raw.send(b"\x00\x00\x00\x10garbage-garbage!");
    let msgs = raw.read_until(b'E').unwrap_or_default();
    ensure!(
        msgs.last().is_some_and(|(_, b)| error_code(b) == "08P01"),
        "no 08P01 for a garbage startup packet"
    );
    // A 2 GB length prefix on the startup packet.
    let mut raw = Raw::connect(r.port);
    raw.send(&0x7fff_fff0u32.to_be_bytes());
    let msgs = raw.read_until(b'E').unwrap_or_default();
    ensure!(
        msgs.last().is_some_and(|(_, b)| error_code(b) == "08P01"),
        "no 08P01 for a 2 GB startup packet"
    );
    // Truncated startup packet, then the client goes away.
    let mut raw = Raw::connect(r.port);
    raw.send(&[0, 0, 0, 50, 0, 3]);
    drop(raw);
    // After login: a 2 GB message length, then an unknown message type.
    let mut raw = raw_login(r.port)?;
    raw.send(&[b'Q', 0x7f, 0xff, 0xff, 0xff]);
    let msgs = raw.read_until(b'E')?;
    ensure!(
        error_code(&msgs.last().unwrap().1) == "08P01",
        "no 08P01 for a 2 GB message"
    );
    ensure!(
        raw.closed(),
        "connection not closed after an oversized message"
    );
    let mut raw = raw_login(r.port)?;
    raw.send(&Raw::msg(b'!', b"what"));
    let msgs = raw.read_until(b'E')?;
    ensure!(
        error_code(&msgs.last().unwrap().1) == "08P01",
        "no 08P01 for an unknown message type"
    );
    // A query message sent before authentication (SCRAM router): refused.
    let mut raw = Raw::connect(h.router.port);
    raw.send(&Raw::startup("app", "app"));
    raw.read_until(b'R')?;
    raw.send(&Raw::msg(b'Q', b"SELECT 1\0"));
    let msgs = raw.read_until(b'E')?;
    ensure!(
        error_code(&msgs.last().unwrap().1) == "08P01",
        "query before authentication not refused"
    );
    // Length field smaller than 4.
    let mut raw = raw_login(r.port)?;
    raw.send(&[b'Q', 0, 0, 0, 2]);
    let msgs = raw.read_until(b'E')?;
    ensure!(
        error_code(&msgs.last().unwrap().1) == "08P01",
        "no 08P01 for a length below 4"
    );
    // The router still serves everyone.
    let mut raw = raw_login(r.port)?;
    raw.send(&Raw::msg(b'Q', b"SELECT 1\0"));
    raw.read_until(b'Z')?;
    Ok(())
}

fn stalled_reader(h: &Harness) -> TestResult {
    let r = h.spawn_router("auth_type = \"trust\"", "")?;
    let mut raw = raw_login(r.port)?;
    // Asks for ~200 MB and never reads it.
    raw.send(&Raw::msg(
        b'Q',
        b"SELECT repeat('x', 1000) FROM generate_series(1, 200000)\0",
    ));
    std::thread::sleep(Duration::from_millis(500));
    block_on(async {
        let c = connect_port(r.port, "app", APP_PW, "app", "").await?;
        let t = Instant::now();
        let v: i32 = c
            .query_one("SELECT 5", &[])
            .await
            .ctx("other client")?
            .get(0);
        ensure!(
            v == 5 && t.elapsed() < Duration::from_secs(3),
            "other clients stalled by a non-reading client"
        );
        Ok(())
    })?;
    let rss_kb = r.rss_kb();
    ensure!(
        rss_kb < 100_000,
        "router buffered the unread result: RSS {rss_kb} kB"
    );
    drop(raw);
    Ok(())
}
