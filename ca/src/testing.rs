//! Test helpers for the crates that build TLS configs on this one (feature
//! `testing`, turned on by their dev-dependencies only).

use std::sync::Arc;

use rustls::HandshakeKind;
use rustls_pki_types::ServerName;

/// Runs a handshake in memory, then delivers what the server sends after
/// it (session tickets), and says how the client's handshake went.
pub fn handshake(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
    name: ServerName<'static>,
) -> Option<HandshakeKind> {
    let mut c =
        rustls::Connection::Client(rustls::ClientConnection::new(client.clone(), name).unwrap());
    let mut s = rustls::Connection::Server(rustls::ServerConnection::new(server.clone()).unwrap());
    while pump(&mut c, &mut s) | pump(&mut s, &mut c) {}
    assert!(!c.is_handshaking() && !s.is_handshaking());
    c.handshake_kind()
}

/// Moves everything `from` has to send into `to`; false if nothing.
fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) -> bool {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).unwrap();
    }
    let mut rd = &wire[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets().unwrap();
    }
    !wire.is_empty()
}
