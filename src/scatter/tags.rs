//! Combining the shards' completion messages into the one the client gets.

use bytes::BytesMut;

use super::merge::MergeError;
use super::wire;

/// How one shard's response ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    Pending,
    Complete(Vec<u8>),
    Empty,
    Suspended,
}

/// Completion messages of every shard.
#[derive(Debug)]
pub struct Tags {
    ends: Vec<End>,
}

/// Commands whose tag ends in a row count that adds up across shards.
const COUNTED: [&str; 8] = [
    "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "FETCH", "MOVE",
];

impl Tags {
    /// Nothing recorded yet for `shards` shards.
    pub fn new(shards: usize) -> Tags {
        Tags {
            ends: vec![End::Pending; shards],
        }
    }

    /// Records a CommandComplete ('C'), EmptyQueryResponse ('I') or PortalSuspended ('s').
    pub fn record(&mut self, shard: usize, tag: u8, body: &[u8]) -> Result<(), MergeError> {
        self.ends[shard] = match tag {
            b'C' => {
                let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
                End::Complete(body[..end].to_vec())
            }
            b'I' => End::Empty,
            _ => End::Suspended,
        };
        Ok(())
    }

    /// Writes the merged completion. `rows_sent` is set when rows went through the merger:
    /// a SELECT/FETCH count is then what the client received (after LIMIT, DISTINCT,
    /// aggregation) rather than what the shards produced.
    pub fn finish(&self, rows_sent: Option<u64>, out: &mut BytesMut) -> Result<(), MergeError> {
        if self.ends.is_empty() {
            return Ok(());
        }
        // One shard's portal still has rows, so the merged portal is not complete either.
        if self.ends.contains(&End::Suspended) {
            out.extend_from_slice(&[b's', 0, 0, 0, 4]);
            return Ok(());
        }
        if self.ends.iter().all(|e| *e == End::Empty) {
            out.extend_from_slice(&[b'I', 0, 0, 0, 4]);
            return Ok(());
        }
        let mut tags = Vec::with_capacity(self.ends.len());
        for e in &self.ends {
            match e {
                End::Complete(t) => tags
                    .push(std::str::from_utf8(t).map_err(|_| mismatch("a non-UTF-8 command tag"))?),
                _ => {
                    return Err(mismatch(
                        "some shards completed the statement and others did not",
                    ))
                }
            }
        }
        let Some(first) = tags.first() else {
            return Ok(());
        };
        let (command, _) = first.split_once(' ').unwrap_or((first, ""));
        let counted = COUNTED.contains(&command) && first.rsplit(' ').next().is_some_and(is_count);
        if !counted {
            if tags.iter().any(|t| t != first) {
                return Err(mismatch(&format!(
                    "shards completed with different commands ({first} / ...)"
                )));
            }
            wire::put_command_complete(out, first.as_bytes());
            return Ok(());
        }
        let mut total: u64 = 0;
        for t in &tags {
            let (c, n) = t
                .rsplit_once(' ')
                .ok_or_else(|| mismatch("command tag without a count"))?;
            if c.split(' ').next() != Some(command) || !is_count(n) {
                return Err(mismatch(&format!(
                    "shards completed with different commands ({first} / {t})"
                )));
            }
            total = total.saturating_add(n.parse().unwrap_or(u64::MAX));
        }
        let n = match (command, rows_sent) {
            ("SELECT" | "FETCH", Some(sent)) => sent,
            _ => total,
        };
        // INSERT's middle field is the long-gone OID, always 0 on current servers.
        let tag = if command == "INSERT" {
            format!("INSERT 0 {n}")
        } else {
            format!("{command} {n}")
        };
        wire::put_command_complete(out, tag.as_bytes());
        Ok(())
    }
}

fn is_count(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn mismatch(what: &str) -> MergeError {
    MergeError::Mismatch(what.to_string())
}
