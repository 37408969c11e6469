//! Multi-shard execution helpers: merging the results of one statement run on several shards,
//! and splitting COPY data by sharding key.

mod aggregate;
pub mod copy;
mod decimal;
pub mod merge;
pub mod spec;
mod tags;
mod values;
mod wire;

#[cfg(test)]
mod merge_tests;

pub use copy::{CopyFormat, CopySplitError, CopySplitter};
pub use merge::{MergeError, Merger};
