//! Extended-protocol requests that name prepared statements: renamed to global names,
//! prepared on demand, and answered by pgshard itself where the server is not needed.

use super::{Pending, Session};
use crate::frontend::{ClientWrite, ReadReady};
use crate::prepared::{global_name, StatementDef};
use crate::protocol::messages;
use crate::protocol::{parse_parse, statement_ref};
use bytes::Bytes;
use std::sync::Arc;

impl<R: ReadReady, W: ClientWrite> Session<R, W> {
    pub(super) fn on_parse(&mut self, msg: &[u8]) {
        let Some((name, text, param_types)) = parse_parse(&msg[5..]) else {
            return self.forward(msg, Some(Pending::Forwarded(self.copy_ends)));
        };
        if let Some(reason) = std::str::from_utf8(text)
            .ok()
            .and_then(crate::sqlclass::pin_reason)
        {
            self.pinned = Some(reason);
        }
        if name.is_empty() || self.session_mode {
            return self.forward(msg, Some(Pending::Forwarded(self.copy_ends)));
        }
        let def = Arc::new(StatementDef::new(
            Bytes::copy_from_slice(text),
            Bytes::copy_from_slice(param_types),
        ));
        if !self.statements.insert(name, def.clone()) {
            tracing::warn!(client = self.info.pid, name = %String::from_utf8_lossy(name), "prepared statement redefined without Close");
            self.statements.remove(name);
            self.statements.insert(name, def.clone());
        }
        let co = self.server.as_mut().expect("attached");
        if co.conn.statements.touch(def.key) {
            self.push_synthetic(b'1');
            return;
        }
        if let Some(old) = co.conn.statements.insert(def.key) {
            messages::close_statement(&mut self.server_out, &global_name(old));
            self.pending.push_back(Pending::InjectedClose);
        }
        messages::parse(
            &mut self.server_out,
            &def.global_name,
            &def.text,
            &def.param_types,
        );
        self.pending.push_back(Pending::ParseOf(def.key));
    }

    /// Bind and Describe of a named statement go to its global name, prepared first if the
    /// server connection does not have it yet.
    pub(super) fn on_bind_or_describe(&mut self, tag: u8, msg: &[u8]) {
        let named = statement_ref(tag, &msg[5..])
            .filter(|(_, name, _)| !name.is_empty() && !self.session_mode);
        let found = named
            .and_then(|(head, name, tail)| Some((head, self.statements.get(name)?.clone(), tail)));
        let Some((head, def, tail)) = found else {
            // Unnamed, a portal, or unknown to pgshard: the server answers (or errs) itself.
            return self.forward(msg, Some(Pending::Forwarded(self.copy_ends)));
        };
        self.ensure_prepared(&def);
        messages::with_statement_name(&mut self.server_out, tag, head, &def.global_name, tail);
        self.pending.push_back(Pending::Forwarded(self.copy_ends));
    }

    fn ensure_prepared(&mut self, def: &StatementDef) {
        let co = self.server.as_mut().expect("attached");
        if co.conn.statements.touch(def.key) {
            return;
        }
        if let Some(old) = co.conn.statements.insert(def.key) {
            messages::close_statement(&mut self.server_out, &global_name(old));
            self.pending.push_back(Pending::InjectedClose);
        }
        messages::parse(
            &mut self.server_out,
            &def.global_name,
            &def.text,
            &def.param_types,
        );
        self.pending.push_back(Pending::InjectedParse(def.key));
    }

    pub(super) fn on_close(&mut self, msg: &[u8]) {
        if let Some((_, name, _)) = statement_ref(b'C', &msg[5..]) {
            if !name.is_empty() && !self.session_mode && self.statements.remove(name) {
                // The global statement stays prepared for other clients.
                self.push_synthetic(b'3');
                return;
            }
        }
        self.forward(msg, Some(Pending::Forwarded(self.copy_ends)));
    }

    pub(super) fn push_synthetic(&mut self, tag: u8) {
        if self.pending.is_empty() {
            messages::empty_message(&mut self.client_out, tag);
        } else {
            self.pending.push_back(Pending::Synthetic(tag));
        }
    }

    pub(super) fn drain_synthetic(&mut self) {
        while let Some(Pending::Synthetic(tag)) = self.pending.front().copied() {
            self.pending.pop_front();
            messages::empty_message(&mut self.client_out, tag);
        }
    }
}
