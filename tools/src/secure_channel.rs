//! The control connection of a partnership, in clear or over mutual TLS,
//! and the data channels it hands to the core with their seals.
//!
//! A node with `[tls]` speaks TLS on every control connection it opens and
//! accepts no other: the handshake lines (mode, groups, generation and the
//! encryption choice) are only ever read inside the authenticated session,
//! so nobody in the middle can downgrade or redirect a partnership. Data
//! channels 1..N then join in clear with a proof bound to that TLS session,
//! and every frame on every channel is sealed with keys from its exporter.

use std::io::{Read, Write};
use std::net::TcpStream;

use tandem_crypto::{Protection, SessionKeys, Side, TlsStream};
use tandem_engine::runtime::peer_conn::PeerChannel;
use tandem_engine::runtime::wire::Wire;
use tandem_proto::{ENCRYPTION_AES_128_GCM, ENCRYPTION_NONE, ENCRYPTION_SIGN};

use crate::daemon::Daemon;

/// A control connection during its handshake.
pub enum ControlStream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl ControlStream {
    /// The peer's node name from its certificate (none in clear).
    #[must_use]
    pub fn peer_node(&self) -> Option<&str> {
        match self {
            Self::Plain(_) => None,
            Self::Tls(tls) => Some(tls.peer_name()),
        }
    }

    /// The keys of the session this connection opens (none in clear).
    pub fn session_keys(&self, encryption: &str, channels: u32) -> Result<Option<SessionKeys>, String> {
        let protection = Protection::parse(encryption)?;
        match self {
            Self::Plain(_) if protection.is_some() => {
                Err(format!("encryption {encryption} needs TLS on both nodes ([tls] in their configuration)"))
            }
            Self::Plain(_) => Ok(None),
            Self::Tls(tls) => tls.session_keys(protection, channels).map(Some),
        }
    }

    #[must_use]
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(stream) => stream,
            Self::Tls(tls) => tls.tcp(),
        }
    }

    /// The socket, positioned where frames begin.
    #[must_use]
    pub fn into_tcp(self) -> TcpStream {
        match self {
            Self::Plain(stream) => stream,
            Self::Tls(tls) => tls.into_inner(),
        }
    }
}

impl Read for ControlStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(stream) => stream.read(buf),
            Self::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for ControlStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(stream) => stream.write(buf),
            Self::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(stream) => stream.flush(),
            Self::Tls(tls) => tls.flush(),
        }
    }
}

/// Secures a connection this node opened: TLS when it has `[tls]`, the
/// peer being node `expected_peer` (any node of the CA when `None`).
pub fn client(daemon: &Daemon, stream: TcpStream, expected_peer: Option<&str>) -> Result<ControlStream, String> {
    match &daemon.tls {
        None => Ok(ControlStream::Plain(stream)),
        Some(tls) => tls.connect(stream, expected_peer).map(|s| ControlStream::Tls(Box::new(s))),
    }
}

/// Checks that the node answering a handshake is the one its certificate names.
pub fn check_answering_node(control: &ControlStream, answering: &str) -> Result<(), String> {
    match control.peer_node() {
        Some(certified) if certified != answering => Err(format!(
            "the destination answers as node {answering:?} but its certificate names {certified:?}; refused"
        )),
        _ => Ok(()),
    }
}

/// The session's channels as the core takes them: channel i sealed with
/// channel i's keys for `side` (nothing sealed without keys or with `none`).
#[must_use]
pub fn sealed_channels(wires: Vec<Wire>, keys: Option<&SessionKeys>, side: Side) -> Vec<PeerChannel> {
    wires
        .into_iter()
        .enumerate()
        .map(|(channel, wire)| PeerChannel { wire, seal: keys.and_then(|k| k.channel_seal(channel as u32, side)) })
        .collect()
}

/// The superblock's code for an encryption name.
pub fn encryption_code(encryption: &str) -> Result<u32, String> {
    Ok(match Protection::parse(encryption)? {
        Some(Protection::Encrypt) => ENCRYPTION_AES_128_GCM,
        Some(Protection::Sign) => ENCRYPTION_SIGN,
        None => ENCRYPTION_NONE,
    })
}
