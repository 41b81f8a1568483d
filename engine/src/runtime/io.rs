//! The io_uring of one core and the operations in flight on it.
//!
//! Every submitted entry's `user_data` is the key of its [`Op`] in a slab. The
//! op owns (or names the owner of) every buffer the kernel touches, and is only
//! removed when the completion arrives: that is the ownership rule that makes
//! the `unsafe` submission sound.

use io_uring::{squeue, IoUring};
use slab::Slab;

use super::buf::AlignedBuf;

/// A volume read for a client: `buf` is the reply (header then data), `done`
/// bytes are read, `started` is when the request arrived.
#[derive(Debug)]
pub struct VolumeRead {
    pub conn: usize,
    pub cookie: u64,
    pub buf: Vec<u8>,
    pub header_bytes: usize,
    pub offset: u64,
    pub done: usize,
    pub started: std::time::Instant,
}

/// An operation in flight, keyed by its `user_data`.
#[derive(Debug)]
pub enum Op {
    /// Read of the core's wake-up eventfd.
    Wake { buf: Box<[u8; 8]> },
    /// The timeout linked to another entry (see `Io::submit_with_timeout`).
    LinkTimeout { timespec: Box<io_uring::types::Timespec> },
    /// The periodic tick.
    Timer { timespec: Box<io_uring::types::Timespec> },
    /// A segment of a group-commit write. `iovecs` point into write buffers held
    /// by the group (until the write completes) and into `headers`.
    LogWrite {
        group: usize,
        batch_id: u64,
        expected_bytes: usize,
        #[allow(dead_code)] // Held only so that the kernel's pointers stay valid.
        iovecs: Box<[libc::iovec]>,
        #[allow(dead_code)] // Held only so that the kernel's pointers stay valid.
        headers: Vec<AlignedBuf>,
    },
    /// A volume change; `done` bytes of a write are already through.
    Apply { group: usize, apply: crate::core::ApplyOp, done: u32 },
    /// fdatasync of one volume for a checkpoint.
    Fsync { group: usize },
    /// The superblock write that completes a checkpoint.
    SuperblockWrite { group: usize, buf: AlignedBuf },
    /// A volume read for a client; `buf` is the reply (header then data).
    VolumeRead(VolumeRead),
    /// Receive on a replication connection into its own buffer.
    PeerRecv { peer: usize, channel: usize },
    /// A message channel (RDMA) waits for its completion descriptor, or
    /// (a no-op) comes back at once to poll again.
    PeerPoll { peer: usize, channel: usize },
    /// Send of replication frames, owned here until the completion.
    PeerSend {
        peer: usize,
        channel: usize,
        frames: Vec<super::peer_conn::OutFrame>,
        #[allow(dead_code)] // Held only so that the kernel's pointers stay valid.
        iovecs: Box<[libc::iovec]>,
        msghdr: Box<libc::msghdr>,
    },
    /// A record read back from the log for shipping into outbox slot `slot`.
    LogRead { group: usize, slot: u64, lsn: u64, buf: AlignedBuf },
    /// A chunk of a volume read for the initial copy.
    /// Its bytes go to outbox slot `slot`, or (`None`) to the comparison.
    ChunkRead { group: usize, slot: Option<u64>, chunk: super::replica_source::ChunkRequest, buf: AlignedBuf },
    /// A destination's volume read to hash a chunk for a compared copy.
    CompareRead { group: usize, read: super::compare_dest::CompareRead, buf: AlignedBuf },
    /// A source's bitmap written to its area in the log device.
    BitmapWrite { group: usize, buf: AlignedBuf, spilled_up_to_lsn: Option<u64> },
    /// A destination's copy write (`buf`) or hole punch (`None`) ending at `end`.
    CopyWrite { group: usize, end: crate::core::CopyPosition, buf: Option<AlignedBuf> },
    /// Receive on a client connection into the connection's own buffer.
    Recv { conn: usize },
    /// Send of queued replies; the chunks are owned here until the completion.
    Send {
        conn: usize,
        chunks: Vec<Vec<u8>>,
        #[allow(dead_code)] // Held only so that the kernel's pointers stay valid.
        iovecs: Box<[libc::iovec]>,
        msghdr: Box<libc::msghdr>,
    },
}

/// A sendmsg header over `iovecs`; both are kept in the op until the
/// completion, which keeps the kernel's pointers valid.
#[must_use]
pub fn msghdr_for(iovecs: &[libc::iovec]) -> Box<libc::msghdr> {
    // SAFETY: msghdr is plain old data; zero is a valid empty header.
    let mut msghdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
    msghdr.msg_iov = iovecs.as_ptr().cast_mut();
    msghdr.msg_iovlen = iovecs.len();
    msghdr
}

/// The ring plus the ops it carries.
pub struct Io {
    pub ring: IoUring,
    pub ops: Slab<Op>,
    /// Entries held back to the end of the loop's round (see
    /// [`Self::submit_last`]).
    last: Vec<squeue::Entry>,
}

// SAFETY: the raw pointers inside ops (iovecs, msghdr) point into heap memory
// owned by the same Op or by the core that owns this Io; the Io is created and
// used on exactly one thread, and moved only before its loop starts.
unsafe impl Send for Io {}

impl Io {
    /// A ring with `entries` submission slots.
    pub fn new(entries: u32) -> std::io::Result<Self> {
        Ok(Self { ring: IoUring::builder().build(entries)?, ops: Slab::with_capacity(1024), last: Vec::new() })
    }

    /// Stores `op` and submits the entry built from it (the builder receives
    /// the stored op, whose heap memory stays put, and its key).
    pub fn submit(&mut self, op: Op, build: impl FnOnce(&mut Op) -> squeue::Entry) {
        let key = self.ops.insert(op);
        let entry = build(&mut self.ops[key]).user_data(key as u64);
        self.push(&entry);
    }

    /// Like [`Self::submit`], but the entry enters the submission queue only
    /// at the end of the loop's round ([`Self::push_last`]), after the
    /// replies to clients and the frames to peers of the same round. The
    /// kernel runs a round's entries in order, and submitting a volume
    /// write (a block-layer dispatch and a doorbell) takes tens of
    /// microseconds that a client's reply should not wait behind: a volume
    /// write is off the latency path.
    pub fn submit_last(&mut self, op: Op, build: impl FnOnce(&mut Op) -> squeue::Entry) {
        let key = self.ops.insert(op);
        self.last.push(build(&mut self.ops[key]).user_data(key as u64));
    }

    /// Puts the entries held back by [`Self::submit_last`] into the
    /// submission queue; the loop calls it before it submits and waits.
    pub fn push_last(&mut self) {
        for entry in std::mem::take(&mut self.last) {
            self.push(&entry);
        }
    }

    /// Like [`Self::submit`], with a timeout linked to the entry: it
    /// completes (with -ECANCELED) after `timeout` at the latest.
    pub fn submit_with_timeout(
        &mut self,
        op: Op,
        build: impl FnOnce(&mut Op) -> squeue::Entry,
        timeout: std::time::Duration,
    ) {
        let key = self.ops.insert(op);
        let entry = build(&mut self.ops[key]).user_data(key as u64).flags(squeue::Flags::IO_LINK);
        let timespec = Box::new(io_uring::types::Timespec::from(timeout));
        let timeout_key = self.ops.insert(Op::LinkTimeout { timespec });
        let Op::LinkTimeout { timespec } = &self.ops[timeout_key] else { unreachable!("just inserted") };
        let timeout_entry = io_uring::opcode::LinkTimeout::new(&**timespec).build().user_data(timeout_key as u64);
        // A link must not be cut by a submission between its two entries.
        let free = {
            let submission = self.ring.submission();
            submission.capacity() - submission.len()
        };
        if free < 2 {
            self.ring.submit().expect("io_uring submit failed");
        }
        self.push(&entry);
        self.push(&timeout_entry);
    }

    fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: the buffers the entry points to are owned by its Op (or by
            // state the Op names) and live until the completion removes the Op.
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                return;
            }
            self.ring.submit().expect("io_uring submit failed while the submission queue was full");
        }
    }
}
