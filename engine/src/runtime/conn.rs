//! A client connection of a block front end, served on its group's core.
//!
//! Received bytes go into the connection's buffer and are parsed by its
//! [`BlockSession`]. The payload of a write is received straight into the
//! O_DIRECT-aligned record buffer that the log append and the volume write then
//! use, so a write is copied once, by the kernel. Replies are sent in batches.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Instant;

use io_uring::{opcode, types};

use super::buf::AlignedBuf;
use super::group_io::{GroupRt, PendingWrite};
use super::io::{msghdr_for, Io, Op, VolumeRead};
use super::session::{BlockError, BlockRequest, BlockSession, Parsed};
use crate::core::group::errno_text;
use crate::core::WriteOp;

/// Receive buffer of a connection: room for many request headers and small
/// payloads per system call.
const RECV_BUF_BYTES: usize = 256 * 1024;
/// Requests in flight per connection before the connection stops reading
/// (backpressure towards the client).
const MAX_INFLIGHT_PER_CONN: usize = 512;
/// Bytes a connection may hold (writes being received or in flight, reads in
/// flight, replies not yet sent) before it stops reading: bounds the memory one
/// client can pin, whatever its request sizes.
const MAX_PENDING_BYTES_PER_CONN: usize = 64 << 20;
/// Most reply chunks per sendmsg.
const MAX_SEND_CHUNKS: usize = 64;
/// A payload still missing at least this much is received straight into its
/// record buffer with only a short tail of the connection's buffer behind it.
/// The tail takes the next request's header, and of its payload only what
/// the tail has room for: a pipelining client's next large payload then
/// mostly arrives in the next receive, straight into its own record buffer,
/// instead of into `rbuf` and a copy (profiled: that copy into a cold record
/// buffer was a quarter of a source core's time under 64 KiB QD32 writes).
const DIRECT_PAYLOAD_MIN_BYTES: usize = 16 * 1024;
/// The tail behind a large direct payload: many request headers, little of
/// the next payload. A receive between two payloads (the last one filled
/// its payload exactly) is as short while the client streams large writes.
const DIRECT_TAIL_BYTES: usize = 1024;
/// Bytes taken at once, without the ring, after a receive that filled all
/// it offered: about what one receive into `rbuf` takes. Measured with
/// 64 KiB QD32 writes: taking none leaves one request per turn of the
/// reactor (a log append and a partner send each; sync mode fell to half),
/// taking 32 requests delays the first ones' log writes behind the
/// receives of the rest (standalone lost 15 %).
const DRAIN_BYTES: usize = RECV_BUF_BYTES;

enum Gather {
    /// `buf` holds the header sector (`sector` bytes), then the payload.
    Write {
        buf: AlignedBuf,
        sector: usize,
        filled: usize,
        length: usize,
        cookie: u64,
        offset: u64,
        started: Instant,
    },
    Discard {
        remaining: usize,
    },
}

/// One client connection.
pub struct Conn {
    pub id: u64,
    pub stream: TcpStream,
    pub group: usize,
    volume_index: u8,
    volume_size_bytes: u64,
    session: Box<dyn BlockSession>,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    gather: Option<Gather>,
    /// Bytes of the receive in flight that go straight into the payload
    /// being gathered (its first iovec); the rest go to `rbuf` at `rend`.
    recv_direct_bytes: usize,
    /// The last request parsed was a large write: the next likely is too.
    large_writes: bool,
    /// Where the receive prepared last puts its bytes; boxed, as is its
    /// header, so that the kernel's pointers stay valid while it is in flight.
    recv_iovecs: Box<[libc::iovec; 2]>,
    recv_msghdr: Box<libc::msghdr>,
    pub recv_inflight: bool,
    small_replies: Vec<u8>,
    send_queue: VecDeque<Vec<u8>>,
    /// Bytes of the front of `send_queue` already sent (a short send).
    send_head_sent: usize,
    pub send_inflight: bool,
    send_broken: bool,
    pub inflight: usize,
    pending_bytes: usize,
    pub closing: bool,
    /// Reads (cookie, offset, length, arrival) waiting for an answered write
    /// of their range to reach the volume (counted in `inflight`).
    deferred_reads: VecDeque<(u64, u64, u32, Instant)>,
}

impl Conn {
    #[must_use]
    pub fn new(
        id: u64,
        stream: TcpStream,
        group: usize,
        volume_index: u8,
        volume_size_bytes: u64,
        session: Box<dyn BlockSession>,
    ) -> Self {
        Self {
            id,
            stream,
            group,
            volume_index,
            volume_size_bytes,
            session,
            rbuf: vec![0u8; RECV_BUF_BYTES].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            gather: None,
            recv_direct_bytes: 0,
            large_writes: false,
            recv_iovecs: Box::new([libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 2]),
            // SAFETY: msghdr is plain old data; zero is a valid empty header.
            recv_msghdr: Box::new(unsafe { std::mem::zeroed() }),
            recv_inflight: false,
            small_replies: Vec::new(),
            send_queue: VecDeque::new(),
            send_head_sent: 0,
            send_inflight: false,
            send_broken: false,
            inflight: 0,
            pending_bytes: 0,
            closing: false,
            deferred_reads: VecDeque::new(),
        }
    }

    #[must_use]
    pub fn peer(&self) -> &str {
        self.session.peer()
    }

    /// True once the connection may be dropped: nothing in flight and nothing
    /// left to send.
    #[must_use]
    pub fn can_close(&self) -> bool {
        let nothing_to_send = self.send_broken || (self.small_replies.is_empty() && self.send_queue.is_empty());
        self.closing && !self.recv_inflight && !self.send_inflight && self.inflight == 0 && nothing_to_send
    }

    /// Starts closing: no more requests are read; in-flight ones still finish.
    pub fn close(&mut self, reason: &str) {
        if !self.closing {
            tracing::info!(peer = %self.session.peer(), reason, "closing client connection");
            self.closing = true;
        }
        // Wakes a pending receive so that it completes (with 0) and the
        // connection can be dropped.
        // SAFETY: shutdown on a socket this connection owns.
        unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_RD) };
    }

    /// Completion of a receive.
    pub fn recv_done(&mut self, result: i32, group: &mut GroupRt, io: &mut Io, key: usize) {
        self.recv_inflight = false;
        if result <= 0 {
            self.receive_ended(-result);
            return;
        }
        let mut filled_all = self.take_received(result as usize);
        self.drive(group, io, key);
        // A receive that filled every byte offered likely left more in the
        // socket: it is taken now, without waiting on the ring, so that one
        // turn of the reactor handles several requests (one log append and
        // one send to the partner for all of them rather than one each).
        let mut drained = 0;
        while filled_all && drained < DRAIN_BYTES && !self.closing && self.has_capacity() && self.prepare_recv() {
            // SAFETY: the iovecs point into buffers this connection owns.
            let result = unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut *self.recv_msghdr, libc::MSG_DONTWAIT) };
            if result <= 0 {
                let errno = if result == 0 { 0 } else { std::io::Error::last_os_error().raw_os_error().unwrap_or(0) };
                if errno != libc::EAGAIN {
                    self.receive_ended(errno);
                }
                break;
            }
            drained += result as usize;
            filled_all = self.take_received(result as usize);
            self.drive(group, io, key);
        }
    }

    /// A receive ended the stream: the client closed it (`errno` 0) or it failed.
    fn receive_ended(&mut self, errno: i32) {
        let reason = if errno == 0 { "client closed the connection".to_owned() } else { errno_text(errno) };
        if !self.closing {
            self.close(&reason);
        }
    }

    /// Accounts `received` bytes of the receive prepared last; returns
    /// whether they filled everything it offered.
    fn take_received(&mut self, received: usize) -> bool {
        let direct = received.min(self.recv_direct_bytes);
        if direct > 0 {
            match self.gather.as_mut() {
                Some(Gather::Write { filled, length, .. }) => {
                    *filled += direct;
                    assert!(*filled <= *length, "a direct receive stays within its payload");
                }
                _ => unreachable!("direct receive without a write to gather"),
            }
        }
        self.rend += received - direct;
        assert!(self.rend <= self.rbuf.len(), "a receive stays within the connection's buffer");
        let offered: usize = self.recv_iovecs[..self.recv_msghdr.msg_iovlen].iter().map(|v| v.iov_len).sum();
        received == offered
    }

    fn has_capacity(&self) -> bool {
        self.inflight < MAX_INFLIGHT_PER_CONN && self.pending_bytes < MAX_PENDING_BYTES_PER_CONN
    }

    /// Goes on parsing requests already received once capacity is free again:
    /// a client that pipelined past the limits may be waiting for replies only,
    /// so no new receive would ever wake the connection.
    pub fn resume(&mut self, group: &mut GroupRt, io: &mut Io, key: usize) {
        self.start_deferred_reads(group, io, key);
        if !self.closing && self.rend > self.rstart && self.has_capacity() {
            self.drive(group, io, key);
        }
    }

    /// Parses and dispatches everything received so far.
    fn drive(&mut self, group: &mut GroupRt, io: &mut Io, key: usize) {
        while !self.closing {
            if self.gather.is_some() {
                if !self.take_gathered(group, key) {
                    break;
                }
                continue;
            }
            if !self.has_capacity() {
                break;
            }
            match self.session.parse(&self.rbuf[self.rstart..self.rend]) {
                Err(fatal) => {
                    tracing::warn!(peer = %self.session.peer(), reason = %fatal.0, "protocol error");
                    self.close(&fatal.0);
                }
                Ok(Parsed::NeedMore) => break,
                Ok(Parsed::Request { consumed, request }) => {
                    self.rstart += consumed;
                    self.dispatch(request, group, io, key);
                }
            }
        }
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        } else if self.rstart > 0 && self.gather.is_none() {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
    }

    /// Moves buffered bytes into the write or discard in progress; returns
    /// true when it finished (parsing may go on).
    fn take_gathered(&mut self, group: &mut GroupRt, key: usize) -> bool {
        let available = self.rend - self.rstart;
        let finished = match self.gather.as_mut().expect("checked by caller") {
            Gather::Write { buf, sector, filled, length, .. } => {
                let take = available.min(*length - *filled);
                let sector = *sector;
                buf[sector + *filled..sector + *filled + take]
                    .copy_from_slice(&self.rbuf[self.rstart..self.rstart + take]);
                *filled += take;
                self.rstart += take;
                *filled == *length
            }
            Gather::Discard { remaining } => {
                let take = available.min(*remaining);
                *remaining -= take;
                self.rstart += take;
                *remaining == 0
            }
        };
        if finished {
            if let Some(Gather::Write { buf, length, cookie, offset, started, .. }) = self.gather.take() {
                self.submit_write(group, key, buf, length, cookie, offset, started);
            }
        }
        finished
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_write(
        &mut self,
        group: &mut GroupRt,
        key: usize,
        buf: AlignedBuf,
        length: usize,
        cookie: u64,
        offset: u64,
        started: Instant,
    ) {
        let sector = group.sector_bytes();
        let payload_checksum = tandem_proto::xxh3_128_bytes(&buf[sector..sector + length]);
        let pending = PendingWrite {
            conn: key,
            conn_id: self.id,
            cookie,
            buf: Some(Rc::new(buf)),
            payload_bytes: length,
            started,
            volume_index: self.volume_index,
        };
        let length = u32::try_from(length).expect("bounded by the front end");
        group.account_write(length);
        group.submit(pending, offset, length, self.volume_index, WriteOp::Write { payload_checksum });
        self.inflight += 1;
    }

    fn dispatch(&mut self, request: BlockRequest, group: &mut GroupRt, io: &mut Io, key: usize) {
        self.large_writes =
            matches!(request, BlockRequest::Write { length, .. } if length as usize >= DIRECT_PAYLOAD_MIN_BYTES);
        match request {
            BlockRequest::Read { cookie, offset, length } => {
                let arrived = Instant::now();
                if group.core.unapplied_overlaps(self.volume_index, offset, length) {
                    self.assert_in_range(offset, length);
                    self.inflight += 1;
                    self.deferred_reads.push_back((cookie, offset, length, arrived));
                } else {
                    self.start_read(group, io, key, (cookie, offset, length), arrived);
                }
            }
            BlockRequest::Write { cookie, offset, length } => {
                self.assert_in_range(offset, length);
                let sector = group.sector_bytes();
                let padded = tandem_proto::align_up(u64::from(length), sector as u64) as usize;
                // The payload is received into the buffer after its header sector.
                let buf = AlignedBuf::zeroed_around(sector + padded, sector..sector + length as usize);
                let started = Instant::now();
                self.pending_bytes += length as usize;
                self.gather =
                    Some(Gather::Write { buf, sector, filled: 0, length: length as usize, cookie, offset, started });
            }
            // Every write is durable in the log before it is answered, so a
            // flush has nothing left to make durable and is answered at once.
            BlockRequest::Flush { cookie } => self.reply(cookie, Ok(())),
            BlockRequest::Trim { cookie, offset, length } => {
                self.submit_range(group, key, cookie, offset, length, WriteOp::Trim)
            }
            BlockRequest::WriteZeroes { cookie, offset, length, no_hole } => {
                self.submit_range(group, key, cookie, offset, length, WriteOp::WriteZeroes { no_hole });
            }
            BlockRequest::Refuse { cookie, error, discard_payload_bytes } => {
                self.reply(cookie, Err(error));
                if discard_payload_bytes > 0 {
                    self.gather = Some(Gather::Discard { remaining: discard_payload_bytes as usize });
                }
            }
            BlockRequest::Disconnect => self.close("client sent disconnect"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_range(&mut self, group: &mut GroupRt, key: usize, cookie: u64, offset: u64, length: u32, op: WriteOp) {
        self.assert_in_range(offset, length);
        let pending = PendingWrite {
            conn: key,
            conn_id: self.id,
            cookie,
            buf: None,
            payload_bytes: 0,
            started: Instant::now(),
            volume_index: self.volume_index,
        };
        group.submit(pending, offset, length, self.volume_index, op);
        self.inflight += 1;
    }

    fn assert_in_range(&self, offset: u64, length: u32) {
        assert!(
            length > 0 && offset.checked_add(u64::from(length)).is_some_and(|end| end <= self.volume_size_bytes),
            "the session checked the range {offset}+{length} against the export size {}",
            self.volume_size_bytes
        );
    }

    /// Queues a reply without data.
    pub fn reply(&mut self, cookie: u64, result: Result<(), BlockError>) {
        let before = self.small_replies.len();
        self.session.encode_reply(cookie, result, &mut self.small_replies);
        self.pending_bytes += self.small_replies.len() - before;
    }

    /// A write (or trim, or zeroing) of this connection finished.
    pub fn write_done(&mut self, cookie: u64, payload_bytes: usize, result: Result<(), BlockError>) {
        self.inflight -= 1;
        self.pending_bytes -= payload_bytes;
        self.reply(cookie, result);
    }
}

impl Conn {
    /// Starts the deferred reads whose range is now in the volume.
    fn start_deferred_reads(&mut self, group: &GroupRt, io: &mut Io, key: usize) {
        let mut index = 0;
        while index < self.deferred_reads.len() {
            let (cookie, offset, length, arrived) = self.deferred_reads[index];
            if group.core.unapplied_overlaps(self.volume_index, offset, length) {
                index += 1;
                continue;
            }
            self.deferred_reads.remove(index);
            self.inflight -= 1;
            self.start_read(group, io, key, (cookie, offset, length), arrived);
        }
    }

    /// Reads `(cookie, offset, length)`; its latency counts from `arrived`.
    fn start_read(&mut self, group: &GroupRt, io: &mut Io, key: usize, request: (u64, u64, u32), arrived: Instant) {
        let (cookie, offset, length) = request;
        self.assert_in_range(offset, length);
        let header_bytes = self.session.read_reply_header_bytes();
        let buf = vec![0u8; header_bytes + length as usize];
        self.inflight += 1;
        // Counted until the reply has been sent (see `send_done`).
        self.pending_bytes += buf.len();
        let fd = types::Fd(group.volumes[usize::from(self.volume_index)].file.as_raw_fd());
        let read = VolumeRead { conn: key, cookie, buf, header_bytes, offset, done: 0, started: arrived };
        let op = Op::VolumeRead(read);
        submit_volume_read(io, fd, op);
    }

    /// Completion of a volume read: resubmits the rest of a short read, or
    /// queues the reply.
    pub fn read_done(&mut self, group: &mut GroupRt, io: &mut Io, mut read: VolumeRead, result: i32) {
        let length = read.buf.len() - read.header_bytes;
        read.done += result.max(0) as usize;
        if result > 0 && read.done < length {
            let fd = types::Fd(group.volumes[usize::from(self.volume_index)].file.as_raw_fd());
            submit_volume_read(io, fd, Op::VolumeRead(read));
            return;
        }
        let VolumeRead { cookie, mut buf, header_bytes, offset, started, .. } = read;
        self.inflight -= 1;
        if result <= 0 {
            self.pending_bytes -= buf.len();
            let reason = if result == 0 { "unexpected end of volume".to_owned() } else { errno_text(-result) };
            tracing::error!(peer = %self.session.peer(), offset, length, %reason, "volume read failed");
            self.reply(cookie, Err(BlockError::Io));
            return;
        }
        group.read_done(self.volume_index, length, started);
        self.session.encode_read_reply_header(cookie, &mut buf[..header_bytes]);
        self.send_queue.push_back(buf);
    }

    /// Posts a receive (into the buffer, or straight into the record buffer of
    /// a write being gathered) and a send of queued replies, as needed.
    pub fn post_io(&mut self, io: &mut Io, key: usize) {
        if !self.closing && !self.recv_inflight && self.has_capacity() {
            self.post_recv(io, key);
        }
        if !self.send_inflight && !self.send_broken {
            self.post_send(io, key);
        }
    }

    fn post_recv(&mut self, io: &mut Io, key: usize) {
        if !self.prepare_recv() {
            return;
        }
        let fd = types::Fd(self.stream.as_raw_fd());
        self.recv_inflight = true;
        let msghdr: *mut libc::msghdr = &mut *self.recv_msghdr;
        io.submit(Op::Recv { conn: key }, |_| opcode::RecvMsg::new(fd, msghdr).build());
    }

    /// Points the receive header at where the next bytes go: straight into
    /// the payload being gathered (when nothing is buffered before it), then
    /// the free part of `rbuf`. False when there is no room at all. The
    /// iovecs and header live in the connection, which outlives a receive in
    /// flight (a connection is dropped only once none is).
    fn prepare_recv(&mut self) -> bool {
        let (direct_ptr, direct_len) = match self.gather.as_mut() {
            Some(Gather::Write { buf, sector, filled, length, .. }) if self.rstart == self.rend => {
                assert!(*sector + *length <= buf.len(), "payload fits after the header sector");
                // SAFETY: the range [sector + filled, sector + length) lies within buf.
                (unsafe { buf.as_mut_ptr().add(*sector + *filled) }, *length - *filled)
            }
            _ => (std::ptr::null_mut(), 0),
        };
        let room = self.rbuf.len() - self.rend;
        let short_tail = direct_len >= DIRECT_PAYLOAD_MIN_BYTES || (direct_len == 0 && self.large_writes);
        let tail = if short_tail { room.min(DIRECT_TAIL_BYTES) } else { room };
        if direct_len == 0 && tail == 0 {
            return false;
        }
        // SAFETY: rend <= rbuf.len(), and tail bytes from rend lie within it.
        let tail_ptr = unsafe { self.rbuf.as_mut_ptr().add(self.rend) };
        let tail_iovec = libc::iovec { iov_base: tail_ptr.cast(), iov_len: tail };
        self.recv_direct_bytes = direct_len;
        if direct_len == 0 {
            self.recv_iovecs[0] = tail_iovec;
            self.recv_msghdr.msg_iovlen = 1;
        } else {
            *self.recv_iovecs = [libc::iovec { iov_base: direct_ptr.cast(), iov_len: direct_len }, tail_iovec];
            self.recv_msghdr.msg_iovlen = if tail == 0 { 1 } else { 2 };
        }
        self.recv_msghdr.msg_iov = self.recv_iovecs.as_mut_ptr();
        true
    }

    fn post_send(&mut self, io: &mut Io, key: usize) {
        let mut chunks = Vec::new();
        // NBD replies may go out in any order, but each one whole: a reply
        // partly on the wire goes on before anything else, and the small
        // replies gathered meanwhile wait behind it.
        let head_sent = self.send_head_sent;
        if head_sent > 0 {
            chunks.push(self.send_queue.pop_front().expect("a partly sent reply is queued"));
        }
        if !self.small_replies.is_empty() {
            chunks.push(std::mem::take(&mut self.small_replies));
        }
        while chunks.len() < MAX_SEND_CHUNKS {
            match self.send_queue.pop_front() {
                Some(chunk) => chunks.push(chunk),
                None => break,
            }
        }
        if chunks.is_empty() {
            return;
        }
        let iovecs: Box<[libc::iovec]> = chunks
            .iter()
            .enumerate()
            .map(|(index, chunk)| {
                let skip = if index == 0 { head_sent } else { 0 };
                assert!(skip < chunk.len(), "a partly sent reply has bytes left");
                // SAFETY: skip < chunk.len().
                libc::iovec {
                    iov_base: unsafe { chunk.as_ptr().add(skip) } as *mut libc::c_void,
                    iov_len: chunk.len() - skip,
                }
            })
            .collect();
        let msghdr = msghdr_for(&iovecs);
        self.send_inflight = true;
        let fd = types::Fd(self.stream.as_raw_fd());
        io.submit(Op::Send { conn: key, chunks, iovecs, msghdr }, |op| {
            let Op::Send { msghdr, .. } = op else { unreachable!() };
            opcode::SendMsg::new(fd, &**msghdr).flags(libc::MSG_NOSIGNAL as u32).build()
        });
    }

    /// Completion of a send: requeues what was not sent, in order, the
    /// first chunk with how much of it is on the wire already.
    pub fn send_done(&mut self, mut chunks: Vec<Vec<u8>>, result: i32) {
        self.send_inflight = false;
        if result < 0 {
            self.send_broken = true;
            self.close(&format!("send failed: {}", errno_text(-result)));
            return;
        }
        let mut sent = result as usize;
        self.pending_bytes -= sent;
        let mut offset = std::mem::take(&mut self.send_head_sent);
        let mut index = 0;
        while index < chunks.len() && sent >= chunks[index].len() - offset {
            sent -= chunks[index].len() - offset;
            offset = 0;
            index += 1;
        }
        if index < chunks.len() {
            self.send_head_sent = offset + sent;
        }
        for chunk in chunks.drain(index..).rev() {
            self.send_queue.push_front(chunk);
        }
    }
}

fn submit_volume_read(io: &mut Io, fd: types::Fd, op: Op) {
    io.submit(op, |op| {
        let Op::VolumeRead(VolumeRead { buf, header_bytes, offset, done, .. }) = op else { unreachable!() };
        let start = *header_bytes + *done;
        let remaining = (buf.len() - start) as u32;
        // SAFETY: start < buf.len() because done < length.
        let ptr = unsafe { buf.as_mut_ptr().add(start) };
        opcode::Read::new(fd, ptr, remaining).offset(*offset + *done as u64).build()
    });
}
