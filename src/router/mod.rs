//! Statement → shards: analysis of SQL text into a cached plan, and routing of a plan with its
//! parameters through the shard map.
