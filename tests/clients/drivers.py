"""Real drivers through pgshard: many concurrent clients over a pool smaller than the client count.

Usage: drivers.py psycopg|asyncpg  (DSN in PGSHARD_DSN). Exits non-zero on any wrong result.
"""
import asyncio
import os
import sys
import threading

DSN = os.environ["PGSHARD_DSN"]
CLIENTS = 24
ROUNDS = 60


def check(cond, what):
    if not cond:
        print("FAIL:", what, flush=True)
        sys.exit(1)


def psycopg_test():
    import psycopg

    errors = []

    def worker(n):
        try:
            # prepare_threshold=0: every statement is a named server-side prepared statement.
            with psycopg.connect(DSN, prepare_threshold=0, autocommit=True) as conn:
                conn.execute(f"SET application_name = 'client{n}'")
                for i in range(ROUNDS):
                    v = conn.execute("select %s::int + %s::int", (i, n)).fetchone()[0]
                    if v != i + n:
                        errors.append(f"client {n}: {i}+{n} gave {v}")
                    s = conn.execute("select %s::text || '-' || current_setting('application_name')", (str(i),)).fetchone()[0]
                    if s != f"{i}-client{n}":
                        errors.append(f"client {n}: settings leaked: {s!r}")
                with conn.transaction():
                    conn.execute("insert into drivers_t(client, v) values (%s, %s)", (n, 1))
                    conn.execute("insert into drivers_t(client, v) values (%s, %s)", (n, 2))
                try:
                    with conn.transaction():
                        conn.execute("insert into drivers_t(client, v) values (%s, %s)", (n, 3))
                        conn.execute("select 1/0")
                except psycopg.errors.DivisionByZero:
                    pass
                rows = conn.execute("select count(*) from drivers_t where client = %s", (n,)).fetchone()[0]
                if rows != 2:
                    errors.append(f"client {n}: expected 2 committed rows, saw {rows}")
        except Exception as e:  # noqa: BLE001 - report every failure
            errors.append(f"client {n}: {e!r}")

    with psycopg.connect(DSN, autocommit=True) as c:
        c.execute("drop table if exists drivers_t")
        c.execute("create table drivers_t(client int, v int)")
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(not errors, "; ".join(errors[:5]))
    print(f"OK psycopg: {CLIENTS} clients x {ROUNDS} rounds with prepare_threshold=0")


async def asyncpg_test():
    import asyncpg

    async def worker(n):
        conn = await asyncpg.connect(DSN, statement_cache_size=100)
        try:
            await conn.execute(f"SET search_path = 'pgshard_{n}', public")
            stmt = await conn.prepare("select $1::int * 2, current_setting('search_path')")
            for i in range(ROUNDS):
                v, sp = await stmt.fetchrow(i)
                check(v == 2 * i, f"asyncpg client {n}: {i}*2 gave {v}")
                check(sp == f'pgshard_{n}, public', f"asyncpg client {n}: search_path leaked: {sp}")
                v = await conn.fetchval("select $1::text || $2::text", str(n), str(i))
                check(v == f"{n}{i}", f"asyncpg client {n}: concat gave {v}")
            async with conn.transaction():
                await conn.executemany("insert into drivers_a(client, v) values ($1, $2)", [(n, k) for k in range(10)])
            cnt = await conn.fetchval("select count(*) from drivers_a where client = $1", n)
            check(cnt == 10, f"asyncpg client {n}: expected 10 rows, saw {cnt}")
        finally:
            await conn.close()

    c = await asyncpg.connect(DSN)
    await c.execute("drop table if exists drivers_a; create table drivers_a(client int, v int)")
    await c.close()
    await asyncio.gather(*(worker(n) for n in range(CLIENTS)))
    print(f"OK asyncpg: {CLIENTS} clients x {ROUNDS} rounds with prepared statements")


if __name__ == "__main__":
    which = sys.argv[1]
    if which == "psycopg":
        psycopg_test()
    elif which == "asyncpg":
        asyncio.run(asyncpg_test())
    else:
        sys.exit(f"unknown driver {which}")
