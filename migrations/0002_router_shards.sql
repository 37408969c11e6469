-- pgshard catalog, version 2: each router records how many shards its config lists, so that
-- `shardctl add-shard` publishes a map with one more shard only once every live router can
-- reach it (routers serve maps with as many shards as their config lists, or fewer).
ALTER TABLE pgshard.routers ADD COLUMN shards int;
