//! Server responses: matched to the requests that caused them, with pgshard's own injected
//! messages' responses swallowed and session settings tracked.

use super::{Pending, Session};
use crate::frontend::{fatal_and_close, ClientWrite, ReadReady, SessionEnd};
use crate::protocol::Cursor;
use crate::sqlclass::QueryKind;

impl<R: ReadReady, W: ClientWrite> Session<R, W> {
    /// Handles every complete server message buffered.
    pub(super) fn process_server_messages(&mut self) -> Result<(), SessionEnd> {
        loop {
            let Some(co) = self.server.as_mut() else {
                return Ok(());
            };
            // Large rows and COPY data are streamed to the client as they arrive.
            if self.server_stream_left > 0 {
                self.server_stream_left = co
                    .conn
                    .rbuf
                    .continue_stream(self.server_stream_left, &mut self.client_out);
                if self.server_stream_left > 0 {
                    return Ok(());
                }
                continue;
            }
            if let Some(left) = co.conn.rbuf.start_stream(b"Dd", &mut self.client_out) {
                self.server_stream_left = left;
                continue;
            }
            let (tag, len) = match co.conn.rbuf.peek(self.max_msg) {
                Ok(Some(x)) => x,
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "bad message from server");
                    fatal_and_close(
                        &mut self.client_out,
                        "08P01",
                        &format!("server sent an invalid message: {e}"),
                    );
                    self.discard_server();
                    return Err(SessionEnd::ServerLost);
                }
            };
            let buf = std::mem::take(&mut co.conn.rbuf.buf);
            self.on_server_message(tag, &buf[..len]);
            if let Some(co) = self.server.as_mut() {
                co.conn.rbuf.buf = buf;
                co.conn.rbuf.consume(len);
            }
        }
    }

    pub(super) fn on_server_message(&mut self, tag: u8, msg: &[u8]) {
        let head = self.pending.front().copied();
        let in_query = matches!(head, Some(Pending::Query));
        match tag {
            b'Z' => {
                let status = crate::protocol::ready_status(msg);
                if let Some(co) = self.server.as_mut() {
                    co.conn.tx_status = status;
                }
                if status == b'I' {
                    if let Some((client, server)) = self.tx_snapshot.take() {
                        if self.last_tag_rollback {
                            self.params = client;
                            if let Some(co) = self.server.as_mut() {
                                co.conn.params = server;
                            }
                        }
                    }
                }
                self.tracked = None;
                self.pending.pop_front();
                self.client_out.extend_from_slice(msg);
                self.drain_synthetic();
            }
            b'E' => {
                self.pool.metrics.errors.inc();
                self.tracked = None;
                if !in_query {
                    // The server skips everything up to the next Sync.
                    while let Some(p) = self.pending.front().copied() {
                        if matches!(p, Pending::Sync(_)) {
                            break;
                        }
                        self.pending.pop_front();
                        if let (Pending::ParseOf(k) | Pending::InjectedParse(k), Some(co)) =
                            (p, self.server.as_mut())
                        {
                            co.conn.statements.remove(k);
                        }
                    }
                }
                self.client_out.extend_from_slice(msg);
            }
            b'S' => {
                let mut c = Cursor::new(&msg[5..]);
                if let (Some(k), Some(v)) = (c.str(), c.str()) {
                    if self.params.observe_reported(k, v) {
                        if let Some(co) = self.server.as_mut() {
                            co.conn.params.observe_reported(k, v);
                        }
                    }
                }
                self.client_out.extend_from_slice(msg);
            }
            b'G' => {
                // Extended-protocol COPY FROM: the server ignores every Sync the client sent
                // after the Execute and before ending the copy, so none of them will be answered.
                if let Some(Pending::Forwarded(at)) = head {
                    self.pending
                        .retain(|p| !matches!(p, Pending::Sync(n) if *n == at));
                }
                self.client_out.extend_from_slice(msg);
            }
            b'C' if in_query => {
                let tag_text = Cursor::new(&msg[5..]).str().unwrap_or("");
                self.last_tag_rollback = tag_text == "ROLLBACK";
                self.on_command_complete();
                self.client_out.extend_from_slice(msg);
            }
            b'1' | b'2' | b'3' | b'T' | b'n' | b'C' | b'I' | b's' if !in_query => {
                match self.pending.pop_front() {
                    Some(Pending::InjectedParse(_)) | Some(Pending::InjectedClose) => {}
                    _ => self.client_out.extend_from_slice(msg),
                }
                self.drain_synthetic();
            }
            _ => self.client_out.extend_from_slice(msg),
        }
    }

    /// A tracked SET/RESET/DISCARD succeeded: the client's and the server's settings change.
    pub(super) fn on_command_complete(&mut self) {
        let Some(kind) = self.tracked.take() else {
            return;
        };
        let Some(co) = self.server.as_mut() else {
            return;
        };
        if co.conn.tx_status != b'I' && self.tx_snapshot.is_none() {
            self.tx_snapshot = Some((self.params.clone(), co.conn.params.clone()));
        }
        match kind {
            QueryKind::Set { name, value } => {
                self.params.set(&name, &value);
                co.conn.params.set(&name, &value);
            }
            QueryKind::Reset { name } => {
                co.conn.params.reset(&name);
                match self.startup_params.get(&name.to_ascii_lowercase()) {
                    Some(v) => {
                        let v = v.to_string();
                        self.params.set(&name, &v);
                        self.resync = true;
                    }
                    None => self.params.reset(&name),
                }
            }
            QueryKind::ResetAll => {
                co.conn.params.clear();
                self.params = self.startup_params.clone();
                self.resync = !self.params.is_empty();
            }
            QueryKind::DiscardAll => {
                co.conn.params.clear();
                co.conn.statements.clear();
                self.statements.clear();
                self.params = self.startup_params.clone();
                self.resync = !self.params.is_empty();
                self.pinned = None;
            }
            _ => {}
        }
    }
}
