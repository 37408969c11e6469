//! Multi-shard execution helpers: merging the results of one statement run on several shards,
//! and splitting COPY data by sharding key.

pub mod spec;
