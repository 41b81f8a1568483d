//! What a replication channel runs over: a TCP socket, driven through the
//! core's io_uring, or a message transport (RDMA verbs) that the core polls
//! itself. The engine knows the second only through [`MessageWire`], which
//! a transport crate implements; the frames, their seal and their parsing
//! are the same on both (see `peer_conn.rs`).

use std::net::TcpStream;
use std::os::fd::RawFd;

/// What a message wire took of the parts offered to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// Bytes taken (0: flow control allows nothing yet).
    pub bytes: usize,
    /// A part was sent from where it lies rather than copied (it lies in the
    /// registered arena, `arena.rs`): the adapter, or the peer's, reads it
    /// there, so its buffer must stay alive and unchanged until
    /// [`MessageWire::take_released`] returns this token.
    pub lent: Option<u64>,
}

/// A reliable, ordered, flow-controlled channel that carries a byte stream
/// as messages and reports its completions on a file descriptor.
pub trait MessageWire: Send {
    /// Takes as much of `parts` (one after the other) as it can send now.
    fn try_send(&mut self, parts: &[&[u8]]) -> Result<Sent, String>;
    /// The token of a lent part the peer has read (its buffer may go).
    fn take_released(&mut self) -> Option<u64>;
    /// Payload bytes lent to the peer, and read from it, so far.
    fn lent_and_read_bytes(&self) -> (u64, u64);
    /// Takes completions and copies received bytes into `into`; 0 when none.
    /// Bytes the peer lent are read into `into` by the transport itself:
    /// 0 until that read completed, so the caller passes the same `into`
    /// again, and keeps its memory alive until then or until the wire is
    /// dropped.
    fn poll_into(&mut self, into: &mut [u8]) -> Result<usize, String>;
    /// Like [`Self::poll_into`], except that a lent payload which fits
    /// `into` whole is taken at once: its read is started and its bytes
    /// count as received, but they land in `into` later, so the stream
    /// after it (and the reads of the payloads behind it) need not wait.
    /// The caller uses those bytes only once [`Self::landed_through`]
    /// passed them, and keeps `into` alive until then or until the wire is
    /// dropped.
    fn poll_into_landing(&mut self, into: &mut [u8]) -> Result<usize, String>;
    /// How many bytes of the stream (counted from the first byte either
    /// poll returned) have landed where they were taken to: all of them
    /// but those of reads [`Self::poll_into_landing`] started that have not
    /// completed yet.
    fn landed_through(&self) -> u64;
    /// Arms the descriptor for the next completion; false when one came
    /// meanwhile (poll again rather than sleep).
    fn arm(&mut self) -> Result<bool, String>;
    /// The descriptor became readable: takes its event.
    fn notified(&mut self);
    /// Readable after [`Self::arm`] once a completion arrived.
    fn completion_fd(&self) -> RawFd;
    /// Ends the channel; whatever is posted completes (flushed), so a
    /// sleeping poll of the descriptor wakes.
    fn disconnect(&mut self);
    /// "rdma DEVICE port N gid GID LOCAL -> REMOTE", for status.
    fn describe(&self) -> String;
    /// The peer's address, for logs.
    fn peer(&self) -> String;
}

/// The transport under one channel.
pub enum Wire {
    Tcp(TcpStream),
    Message(Box<dyn MessageWire>),
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Wire {
    /// "tcp LOCAL -> REMOTE" or the message transport's own description.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Tcp(stream) => {
                let text =
                    |a: std::io::Result<std::net::SocketAddr>| a.map_or_else(|_| "?".to_owned(), |a| a.to_string());
                format!("tcp {} -> {}", text(stream.local_addr()), text(stream.peer_addr()))
            }
            Self::Message(wire) => wire.describe(),
        }
    }

    #[must_use]
    pub fn peer(&self) -> String {
        match self {
            Self::Tcp(stream) => stream.peer_addr().map_or_else(|_| "unknown".to_owned(), |a| a.to_string()),
            Self::Message(wire) => wire.peer(),
        }
    }

    #[must_use]
    pub fn is_tcp(&self) -> bool {
        matches!(self, Self::Tcp(_))
    }
}
