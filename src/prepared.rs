//! Named prepared statements in transaction mode.
//!
//! A client's statement names mean nothing on the server connection it happens to get, so each
//! distinct (query text, parameter types) gets one global name derived from its hash. Clients
//! keep their own name → statement map; each server connection keeps an LRU of the global
//! statements it has prepared, and a statement is prepared there on demand just before a Bind
//! or Describe needs it.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;

/// One distinct statement, shared by every client that prepared the same text and types.
#[derive(Debug)]
pub struct StatementDef {
    /// Hash of text and parameter types; identifies the statement on every server.
    pub key: u128,
    /// `pgshard_<hex key>`: the name used on servers.
    pub global_name: Box<[u8]>,
    /// The query text.
    pub text: Bytes,
    /// The raw parameter-type section of the client's Parse (count + OIDs).
    pub param_types: Bytes,
}

impl StatementDef {
    /// Builds the definition for a Parse body's text and parameter types.
    pub fn new(text: Bytes, param_types: Bytes) -> StatementDef {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&text);
        h.update(&[0]);
        h.update(&param_types);
        let key = h.digest128();
        StatementDef {
            key,
            global_name: format!("pgshard_{key:032x}").into_bytes().into(),
            text,
            param_types,
        }
    }
}

/// A client's prepared statements by its own names.
#[derive(Debug, Default)]
pub struct ClientStatements {
    by_name: HashMap<Box<[u8]>, Arc<StatementDef>>,
}

impl ClientStatements {
    /// The statement a client named `name`.
    pub fn get(&self, name: &[u8]) -> Option<&Arc<StatementDef>> {
        self.by_name.get(name)
    }

    /// Records a client's Parse; returns false if the name is taken by a different statement.
    pub fn insert(&mut self, name: &[u8], def: Arc<StatementDef>) -> bool {
        match self.by_name.get(name) {
            Some(old) if old.key != def.key => false,
            Some(_) => true,
            None => {
                self.by_name.insert(name.into(), def);
                true
            }
        }
    }

    /// Forgets one name.
    pub fn remove(&mut self, name: &[u8]) -> bool {
        self.by_name.remove(name).is_some()
    }

    /// Forgets every name (DEALLOCATE ALL, DISCARD ALL).
    pub fn clear(&mut self) {
        self.by_name.clear();
    }

    /// Number of statements.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// True when the client has none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The global statements prepared on one server connection, least recently used evicted first.
#[derive(Debug)]
pub struct ServerStatements {
    last_use: HashMap<u128, u64>,
    tick: u64,
    cap: usize,
}

impl ServerStatements {
    /// An empty cache holding at most `cap` statements.
    pub fn new(cap: usize) -> Self {
        ServerStatements {
            last_use: HashMap::new(),
            tick: 0,
            cap: cap.max(1),
        }
    }

    /// True (and marks it used) if statement `key` is prepared here.
    pub fn touch(&mut self, key: u128) -> bool {
        self.tick += 1;
        match self.last_use.get_mut(&key) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records that `key` is now prepared; returns the key to close if the cache overflowed.
    pub fn insert(&mut self, key: u128) -> Option<u128> {
        self.tick += 1;
        let evict = if self.last_use.len() >= self.cap && !self.last_use.contains_key(&key) {
            let (&old, _) = self.last_use.iter().min_by_key(|(_, &t)| t)?;
            self.last_use.remove(&old);
            Some(old)
        } else {
            None
        };
        self.last_use.insert(key, self.tick);
        evict
    }

    /// Forgets `key` (its Parse failed or it was closed).
    pub fn remove(&mut self, key: u128) {
        self.last_use.remove(&key);
    }

    /// Forgets everything (the server ran DISCARD ALL / DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.last_use.clear();
    }

    /// Number of statements prepared here.
    pub fn len(&self) -> usize {
        self.last_use.len()
    }

    /// True when none are prepared.
    pub fn is_empty(&self) -> bool {
        self.last_use.is_empty()
    }
}

/// The server-side name of statement `key`.
pub fn global_name(key: u128) -> Vec<u8> {
    format!("pgshard_{key:032x}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_same_global_name() {
        let a = StatementDef::new(
            Bytes::from_static(b"select $1"),
            Bytes::from_static(b"\0\0"),
        );
        let b = StatementDef::new(
            Bytes::from_static(b"select $1"),
            Bytes::from_static(b"\0\0"),
        );
        let c = StatementDef::new(
            Bytes::from_static(b"select $1"),
            Bytes::from_static(b"\0\x01\0\0\0\x17"),
        );
        assert_eq!(a.global_name, b.global_name);
        assert_ne!(a.global_name, c.global_name);
        assert_eq!(&*a.global_name, global_name(a.key).as_slice());
    }

    #[test]
    fn client_name_conflicts_detected() {
        let mut cs = ClientStatements::default();
        let a = Arc::new(StatementDef::new(
            Bytes::from_static(b"select 1"),
            Bytes::new(),
        ));
        let b = Arc::new(StatementDef::new(
            Bytes::from_static(b"select 2"),
            Bytes::new(),
        ));
        assert!(cs.insert(b"s1", a.clone()));
        assert!(cs.insert(b"s1", a));
        assert!(!cs.insert(b"s1", b));
        assert!(cs.remove(b"s1"));
        assert!(cs.is_empty());
    }

    #[test]
    fn lru_evicts_oldest() {
        let mut ss = ServerStatements::new(2);
        assert_eq!(ss.insert(1), None);
        assert_eq!(ss.insert(2), None);
        assert!(ss.touch(1));
        assert_eq!(ss.insert(3), Some(2));
        assert!(ss.touch(1) && ss.touch(3) && !ss.touch(2));
    }
}
