-- pgshard catalog, version 1: the shard map history, the routers following it, and moves.
-- Applied by pgshard and shardctl (src/catalog/migrate.rs) inside one transaction, under an
-- advisory lock, after `CREATE SCHEMA pgshard` and its `migrations` bookkeeping table.

-- Every published shard map; the highest version is the current one. Rows are never updated.
CREATE TABLE pgshard.maps (
    version     bigint PRIMARY KEY CHECK (version > 0),
    -- The [sharding] section, as TOML (the same syntax as the config file).
    sharding    text NOT NULL,
    shards      int NOT NULL CHECK (shards > 0),
    note        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Routers following the catalog: a lease renewed every poll, and the map version in use.
CREATE TABLE pgshard.routers (
    router_id      text PRIMARY KEY,
    addr           text NOT NULL,
    -- Identifies one process: a live row with another instance means the id is taken.
    instance       text NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now(),
    lease_until    timestamptz NOT NULL,
    acked_version  bigint NOT NULL
);

-- Moves of a unit (buckets, a tenant, a range, a region) between shards, step by step.
CREATE TABLE pgshard.moves (
    id            bigserial PRIMARY KEY,
    distribution  text NOT NULL,
    unit          text NOT NULL,
    source        int NOT NULL,
    target        int NOT NULL,
    state         text NOT NULL,
    detail        text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Publishing a map wakes every router at once (they also poll, in case a notification is lost).
CREATE FUNCTION pgshard.notify_map() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgshard_map', NEW.version::text);
    RETURN NEW;
END
$$;

CREATE TRIGGER maps_notify AFTER INSERT ON pgshard.maps
    FOR EACH ROW EXECUTE FUNCTION pgshard.notify_map();
