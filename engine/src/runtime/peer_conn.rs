//! A replication connection on its group's core: frames in (records, acks,
//! copy data) and frames out, all through the core's io_uring.
//!
//! Outgoing frames reference their payload where it already lives (the
//! record buffer of a write, a log or volume read) and go out in batches with
//! sendmsg; incoming frames are parsed from a receive buffer and their payloads
//! gathered into O_DIRECT-aligned buffers ready for the log and the volume.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use tandem_crypto::{ChannelSeal, TAG_BYTES};
use tandem_proto::{FrameHeader, RecordHeader, FRAME_MAGIC, RECORD_HEADER_BYTES, RECORD_MAGIC};

use super::buf::AlignedBuf;
use super::io::{msghdr_for, Io, Op};
use super::peer_conn_wire::Landing;
use super::wire::Wire;
use crate::core::group::errno_text;

const RECV_BUF_BYTES: usize = 1 << 20;
const MAX_SEND_FRAMES: usize = 64;
/// Received frames waiting for the group before the connection stops reading.
const MAX_RECEIVED_FRAMES: usize = 4096;
/// Send a heartbeat when nothing else went out for this long.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Tell the peer this side's durable LSN at least this often, busy or not:
/// a destination promoted after losing its source reports as its RPO what
/// the source last said it held.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// Declare the peer lost when nothing arrived for this long.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// The bytes of a frame payload: a range of a shared buffer.
#[derive(Debug, Clone)]
pub struct SharedBytes {
    pub buf: Rc<AlignedBuf>,
    pub start: usize,
    pub len: usize,
}

/// A frame to send.
#[derive(Debug)]
pub struct OutFrame {
    pub header: [u8; RECORD_HEADER_BYTES],
    pub payload: Option<SharedBytes>,
    /// On a sealed channel: the tags of the header and of the payload.
    header_tag: Option<[u8; TAG_BYTES]>,
    payload_tag: Option<[u8; TAG_BYTES]>,
    /// Bytes already sent (of header, tags and payload, in wire order).
    pub sent: usize,
}

impl OutFrame {
    #[must_use]
    pub fn new(header: &[u8], payload: Option<SharedBytes>) -> Self {
        Self {
            header: header.try_into().expect("64-byte header"),
            payload,
            header_tag: None,
            payload_tag: None,
            sent: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.segments().iter().map(|s| s.len()).sum()
    }

    /// The frame's bytes in wire order: header, its tag, payload, its tag.
    fn segments(&self) -> [&[u8]; 4] {
        let payload = self.payload.as_ref().map_or(&[][..], |p| &p.buf[p.start..p.start + p.len]);
        [
            &self.header[..],
            self.header_tag.as_ref().map_or(&[][..], |t| &t[..]),
            payload,
            self.payload_tag.as_ref().map_or(&[][..], |t| &t[..]),
        ]
    }

    fn push_iovecs(&self, iovecs: &mut Vec<libc::iovec>) {
        for rest in self.unsent() {
            iovecs.push(libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: rest.len() });
        }
    }

    /// The buffer of the payload, when bytes `sent .. sent + count` of the
    /// frame (in wire order) cover all of it that was not sent before.
    pub(super) fn payload_buffer_within(&self, sent: usize, count: usize) -> Option<Rc<AlignedBuf>> {
        let [header, header_tag, payload, _] = self.segments();
        let end = header.len() + header_tag.len() + payload.len();
        let shared = self.payload.as_ref()?;
        (!payload.is_empty() && sent < end && sent + count >= end).then(|| Rc::clone(&shared.buf))
    }

    /// The bytes not sent yet, in wire order.
    pub(super) fn unsent(&self) -> Vec<&[u8]> {
        let mut skip = self.sent;
        let mut parts = Vec::with_capacity(4);
        for segment in self.segments() {
            let rest = &segment[skip.min(segment.len())..];
            skip = skip.saturating_sub(segment.len());
            if !rest.is_empty() {
                parts.push(rest);
            }
        }
        parts
    }

    /// Seals the frame for its channel. An encrypted payload goes into a
    /// buffer of its own: the plaintext stays where it is (the record
    /// buffer the local log writes, or a read other frames may share).
    fn seal(&mut self, seal: &mut ChannelSeal) {
        debug_assert_eq!(self.sent, 0, "a frame is sealed before any byte of it is sent");
        let plain: &[u8] = self.payload.as_ref().map_or(&[][..], |p| &p.buf[p.start..p.start + p.len]);
        let mut sealed = (seal.encrypts() && !plain.is_empty()).then(|| AlignedBuf::zeroed(plain.len()));
        let out = sealed.as_mut().map_or(&mut [][..], |b| &mut b[..]);
        let (header_tag, payload_tag) = seal.seal(&mut self.header, plain, out);
        self.header_tag = Some(header_tag);
        self.payload_tag = payload_tag;
        if let Some(buf) = sealed {
            let len = buf.len();
            self.payload = Some(SharedBytes { buf: Rc::new(buf), start: 0, len });
        }
    }
}

/// A frame received.
#[derive(Debug)]
pub enum InFrame {
    /// A log record; `buf` holds a header sector then the payload (for writes).
    Record { header: RecordHeader, buf: Option<AlignedBuf> },
    /// Any other frame; `payload` (CopyData) is aligned for direct IO.
    Control { header: FrameHeader, payload: Option<AlignedBuf> },
}

impl InFrame {
    pub(super) fn payload_bytes(&self) -> usize {
        match self {
            Self::Record { buf, .. } | Self::Control { payload: buf, .. } => buf.as_ref().map_or(0, |b| b.len()),
        }
    }
}

pub(super) enum Gather {
    Record { header: RecordHeader, buf: AlignedBuf, at: usize, end: usize },
    Control { header: FrameHeader, buf: AlignedBuf, at: usize },
}

/// On a sealed channel, the opened header of the frame being gathered and
/// the payload tag that follows its payload.
struct SealedGather {
    sequence: u64,
    header: [u8; RECORD_HEADER_BYTES],
    tag: [u8; TAG_BYTES],
    tag_have: usize,
}

/// A replication connection as the control plane hands it to the core:
/// its transport and, unless the partnership's encryption is `none`, its seal.
#[derive(Debug)]
pub struct PeerChannel {
    pub wire: Wire,
    pub seal: Option<ChannelSeal>,
}

/// One replication connection (a channel of a [`super::peer_session::PeerSession`]).
pub struct PeerConn {
    pub wire: Wire,
    pub peer: String,
    /// A message channel polls until then before it sleeps.
    pub(super) busy_until: Instant,
    sector_bytes: usize,
    seal: Option<ChannelSeal>,
    sealed_gather: Option<SealedGather>,
    /// A received frame failed authentication (the channel is closing).
    pub rejected: bool,
    pub(super) rbuf: Box<[u8]>,
    rstart: usize,
    pub(super) rend: usize,
    gather: Option<Gather>,
    pub recv_inflight: bool,
    pub send_inflight: bool,
    send_broken: bool,
    pub closing: bool,
    pub close_reason: String,
    pub(super) queue: VecDeque<OutFrame>,
    pub queued_bytes: usize,
    pub received: VecDeque<InFrame>,
    /// Message wires: frames whose payload may still be landing in their
    /// buffers (`MessageWire::poll_into_landing`), and every frame parsed
    /// behind one, each with the stream offset it ends at; they move to
    /// `received` in order as the wire's bytes land (`peer_conn_wire.rs`).
    pub(super) landing: VecDeque<(u64, Landing)>,
    /// Bytes taken from the wire so far (the offsets of `landing`).
    pub(super) stream_taken: u64,
    pub(super) received_bytes_pending: usize,
    last_recv: Instant,
    pub(super) last_send: Instant,
    /// When this channel last carried a heartbeat (see [`PROGRESS_INTERVAL`]).
    pub last_heartbeat: Instant,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    /// When the send in flight was posted, and the average time from
    /// posting a send to its completion (the kernel took the bytes), in us.
    send_posted: Option<Instant>,
    pub send_latency_us_avg: f64,
    /// Message wires: buffers of payloads lent to the peer (read by its
    /// adapter from where they are), kept until the peer releases their
    /// token. Declared after `wire`, so they outlive the queue pair.
    pub(super) lent: Vec<(u64, Rc<AlignedBuf>)>,
}

impl PeerConn {
    #[must_use]
    pub fn new(channel: PeerChannel, sector_bytes: usize) -> Self {
        let PeerChannel { wire, seal } = channel;
        let peer = wire.peer();
        let now = Instant::now();
        // Offsets of `landing` are the wire's: from where it stands now.
        let stream_taken = match &wire {
            Wire::Message(wire) => wire.landed_through(),
            Wire::Tcp(_) => 0,
        };
        Self {
            wire,
            peer,
            busy_until: now,
            sector_bytes,
            seal,
            sealed_gather: None,
            rejected: false,
            rbuf: vec![0u8; RECV_BUF_BYTES].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            gather: None,
            recv_inflight: false,
            send_inflight: false,
            send_broken: false,
            closing: false,
            close_reason: String::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            received: VecDeque::new(),
            landing: VecDeque::new(),
            stream_taken,
            received_bytes_pending: 0,
            last_recv: now,
            last_send: now,
            last_heartbeat: now,
            bytes_sent: 0,
            bytes_received: 0,
            frames_sent: 0,
            frames_received: 0,
            send_posted: None,
            send_latency_us_avg: 0.0,
            lent: Vec::new(),
        }
    }

    /// Queues a frame behind every frame queued before it.
    pub fn send(&mut self, mut frame: OutFrame) {
        if let Some(seal) = self.seal.as_mut() {
            frame.seal(seal);
        }
        self.queued_bytes += frame.len();
        self.queue.push_back(frame);
    }

    /// Takes the next received frame.
    pub fn take_received(&mut self) -> Option<InFrame> {
        let frame = self.received.pop_front()?;
        self.received_bytes_pending -= frame.payload_bytes();
        Some(frame)
    }

    /// Starts closing; the group is told once nothing is in flight.
    pub fn close(&mut self, reason: &str) {
        if !self.closing {
            tracing::warn!(peer = %self.peer, reason, "replication connection closing");
            self.closing = true;
            self.close_reason = reason.to_owned();
        }
        match &mut self.wire {
            // SAFETY: shutdown on a socket this connection owns wakes pending IO.
            Wire::Tcp(stream) => unsafe {
                libc::shutdown(stream.as_raw_fd(), libc::SHUT_RDWR);
            },
            Wire::Message(wire) => wire.disconnect(),
        }
    }

    #[must_use]
    pub fn can_drop(&self) -> bool {
        self.closing && !self.recv_inflight && !self.send_inflight
    }

    /// Heartbeat and timeout: returns true when a heartbeat should be queued.
    pub fn tick(&mut self, now: Instant) -> bool {
        if self.closing {
            return false;
        }
        if now.duration_since(self.last_recv) > PEER_TIMEOUT {
            self.close(&format!("nothing received for {} s", PEER_TIMEOUT.as_secs()));
            return false;
        }
        self.queue.is_empty() && !self.send_inflight && now.duration_since(self.last_send) >= HEARTBEAT_INTERVAL
    }

    /// Frames queued and not yet handed to the kernel.
    #[cfg(test)]
    #[must_use]
    pub fn queued_frames(&self) -> usize {
        self.queue.len()
    }

    /// Posts a receive and a send as needed; `key` and `channel` name this
    /// connection in its session.
    pub fn post_io(&mut self, io: &mut Io, key: usize, channel: usize) {
        let fd = match &self.wire {
            Wire::Tcp(stream) => types::Fd(stream.as_raw_fd()),
            Wire::Message(_) => {
                self.drive_message_wire(io, key, channel);
                return;
            }
        };
        if !self.closing && !self.recv_inflight && self.has_room() {
            // SAFETY: rend < rbuf.len().
            let ptr = unsafe { self.rbuf.as_mut_ptr().add(self.rend) };
            let len = (self.rbuf.len() - self.rend) as u32;
            self.recv_inflight = true;
            io.submit(Op::PeerRecv { peer: key, channel }, |_| opcode::Recv::new(fd, ptr, len).build());
        }
        if !self.closing && !self.send_inflight && !self.send_broken && !self.queue.is_empty() {
            self.post_send(io, key, channel, fd);
        }
    }

    /// Whether received frames leave room to take more bytes.
    pub(super) fn has_room(&self) -> bool {
        let frames = self.received.len() + self.landing.len();
        let room = frames < MAX_RECEIVED_FRAMES && self.received_bytes_pending < (64 << 20);
        room && self.rend < self.rbuf.len()
    }

    fn post_send(&mut self, io: &mut Io, key: usize, channel: usize, fd: types::Fd) {
        let count = self.queue.len().min(MAX_SEND_FRAMES);
        let frames: Vec<OutFrame> = self.queue.drain(..count).collect();
        let mut iovecs = Vec::with_capacity(frames.len() * 2);
        for frame in &frames {
            frame.push_iovecs(&mut iovecs);
        }
        let iovecs = iovecs.into_boxed_slice();
        let msghdr = msghdr_for(&iovecs);
        self.send_inflight = true;
        self.send_posted = Some(Instant::now());
        io.submit(Op::PeerSend { peer: key, channel, frames, iovecs, msghdr }, |op| {
            let Op::PeerSend { msghdr, .. } = op else { unreachable!() };
            opcode::SendMsg::new(fd, &**msghdr).flags(libc::MSG_NOSIGNAL as u32).build()
        });
    }

    /// Completion of a send: frames not fully sent go back to the front.
    pub fn send_done(&mut self, frames: Vec<OutFrame>, result: i32) {
        self.send_inflight = false;
        if result < 0 {
            self.send_broken = true;
            self.close(&format!("send failed: {}", errno_text(-result)));
            return;
        }
        let mut sent = result as usize;
        self.bytes_sent += sent as u64;
        if let Some(posted) = self.send_posted.take() {
            let us = posted.elapsed().as_micros() as f64;
            self.send_latency_us_avg = super::counters::moving_average(self.send_latency_us_avg, us);
        }
        self.queued_bytes -= sent;
        self.last_send = Instant::now();
        let mut rest = Vec::new();
        for mut frame in frames {
            let left = frame.len() - frame.sent;
            if sent >= left {
                sent -= left;
                self.frames_sent += 1;
                continue;
            }
            frame.sent += sent;
            sent = 0;
            rest.push(frame);
        }
        for frame in rest.into_iter().rev() {
            self.queue.push_front(frame);
        }
    }

    /// Completion of a receive: parses every complete frame.
    pub fn recv_done(&mut self, result: i32) {
        self.recv_inflight = false;
        if result <= 0 {
            let reason = if result == 0 { "peer closed the connection".to_owned() } else { errno_text(-result) };
            self.close(&reason);
            return;
        }
        if self.closing {
            // Nothing after a rejected or malformed frame is ever parsed.
            return;
        }
        self.received_bytes(result as usize);
    }

    /// `count` bytes arrived at `rend`: parses every complete frame.
    pub(super) fn received_bytes(&mut self, count: usize) {
        self.rend += count;
        self.take_received_bytes(count);
    }

    /// `count` bytes arrived (in `rbuf`, or straight into the payload being
    /// gathered): parses every complete frame and compacts `rbuf`.
    fn take_received_bytes(&mut self, count: usize) {
        self.bytes_received += count as u64;
        self.stream_taken += count as u64;
        self.last_recv = Instant::now();
        if let Err(reason) = self.parse() {
            self.close(&reason);
        }
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        } else if self.rstart > 0 {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
    }

    /// Test only: the bytes of every queued frame, as a send would put them
    /// on the wire.
    #[cfg(test)]
    pub fn drain_bytes_for_test(&mut self) -> Vec<u8> {
        let mut bytes = Vec::new();
        for frame in self.queue.drain(..) {
            let mut iovecs = Vec::new();
            frame.push_iovecs(&mut iovecs);
            for iovec in iovecs {
                // SAFETY: the iovecs point into the frame, alive in this loop.
                bytes.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(iovec.iov_base as *const u8, iovec.iov_len)
                });
            }
        }
        self.queued_bytes = 0;
        bytes
    }

    /// Test only: `bytes` arrive as if received from the socket.
    #[cfg(test)]
    pub fn receive_for_test(&mut self, bytes: &[u8]) {
        self.rbuf[self.rend..self.rend + bytes.len()].copy_from_slice(bytes);
        self.recv_inflight = true;
        self.recv_done(bytes.len() as i32);
    }

    /// Receives from a message wire straight into the part still missing
    /// of the payload being gathered (the record's O_DIRECT-aligned buffer)
    /// rather than through the receive buffer: one copy less. `None` when
    /// the bytes must go to `rbuf` (no payload is being gathered, bytes are
    /// buffered before it, or only its tag is missing).
    pub(super) fn poll_into_gather(&mut self) -> Option<Result<usize, String>> {
        if self.rstart != self.rend {
            return None;
        }
        let Wire::Message(wire) = &mut self.wire else { return None };
        let room = match self.gather.as_mut()? {
            Gather::Record { buf, at, end, .. } => &mut buf[*at..*end],
            Gather::Control { buf, at, .. } => &mut buf[*at..],
        };
        // A payload read by the adapter may land later (frames wait for it
        // in `landing`), except on a sealed channel, which opens it at once.
        let landing = self.seal.is_none();
        (!room.is_empty()).then(|| if landing { wire.poll_into_landing(room) } else { wire.poll_into(room) })
    }

    /// `count` bytes landed through [`Self::poll_into_gather`]: the frame is
    /// delivered once complete.
    pub(super) fn gathered_directly(&mut self, count: usize) {
        match self.gather.as_mut().expect("bytes were gathered into a frame") {
            Gather::Record { at, .. } | Gather::Control { at, .. } => *at += count,
        }
        self.take_received_bytes(count);
    }

    fn parse(&mut self) -> Result<(), String> {
        loop {
            if self.gather.is_some() {
                if !self.fill_gather()? {
                    return Ok(());
                }
                continue;
            }
            let Some(raw) = self.next_header()? else { return Ok(()) };
            let magic = u32::from_le_bytes(raw[..4].try_into().expect("4 bytes"));
            match magic {
                RECORD_MAGIC => {
                    let header = RecordHeader::decode(&raw).map_err(|e| format!("malformed record frame: {e}"))?;
                    let payload = header.payload_bytes() as usize;
                    if payload == 0 {
                        self.deliver(InFrame::Record { header, buf: None });
                        continue;
                    }
                    let sector = self.sector_bytes;
                    let padded = tandem_proto::align_up(payload as u64, sector as u64) as usize;
                    let buf = AlignedBuf::zeroed_around(sector + padded, sector..sector + payload);
                    self.gather = Some(Gather::Record { header, buf, at: sector, end: sector + payload });
                }
                FRAME_MAGIC => {
                    let header = FrameHeader::decode(&raw).map_err(|e| format!("malformed frame: {e}"))?;
                    let payload = header.payload_bytes() as usize;
                    if payload == 0 {
                        self.deliver(InFrame::Control { header, payload: None });
                        continue;
                    }
                    let buf = AlignedBuf::zeroed(payload);
                    self.gather = Some(Gather::Control { header, buf, at: 0 });
                }
                other => return Err(format!("malformed frame: unknown magic {other:#010x}")),
            }
        }
    }

    /// The next frame header, opened when the channel is sealed (the tag
    /// follows the header); `None` until all its bytes arrived.
    fn next_header(&mut self) -> Result<Option<[u8; RECORD_HEADER_BYTES]>, String> {
        let tag_bytes = if self.seal.is_some() { TAG_BYTES } else { 0 };
        let available = &self.rbuf[self.rstart..self.rend];
        if available.len() < RECORD_HEADER_BYTES + tag_bytes {
            return Ok(None);
        }
        let mut header: [u8; RECORD_HEADER_BYTES] = available[..RECORD_HEADER_BYTES].try_into().expect("64 bytes");
        let tag: Option<[u8; TAG_BYTES]> =
            (tag_bytes > 0).then(|| available[RECORD_HEADER_BYTES..][..TAG_BYTES].try_into().expect("16 bytes"));
        self.rstart += RECORD_HEADER_BYTES + tag_bytes;
        if let (Some(seal), Some(tag)) = (self.seal.as_mut(), tag) {
            let sequence = seal.open_header(&mut header, &tag).map_err(|e| self.reject(&e))?;
            self.sealed_gather = Some(SealedGather { sequence, header, tag: [0; TAG_BYTES], tag_have: 0 });
        }
        Ok(Some(header))
    }

    fn reject(&mut self, error: &tandem_crypto::SealError) -> String {
        self.rejected = true;
        format!("{error}; the channel was reset and nothing of that frame was used")
    }

    /// Copies received bytes into the payload being gathered (then, on a
    /// sealed channel, into its tag); true when the frame is complete.
    fn fill_gather(&mut self) -> Result<bool, String> {
        let available = self.rend - self.rstart;
        let (buf, at, end) = match self.gather.as_mut().expect("checked") {
            Gather::Record { buf, at, end, .. } => (buf, at, *end),
            Gather::Control { buf, at, .. } => {
                let end = buf.len();
                (buf, at, end)
            }
        };
        let take = available.min(end - *at);
        buf[*at..*at + take].copy_from_slice(&self.rbuf[self.rstart..self.rstart + take]);
        *at += take;
        self.rstart += take;
        if *at < end || !self.fill_payload_tag() {
            return Ok(false);
        }
        let mut gathered = self.gather.take().expect("checked");
        if self.still_landing() {
            // Verified once its bytes are there (a landing read is never
            // used on a sealed channel: opening needs the bytes).
            self.hold_landing(Landing::Gathered(gathered));
            return Ok(true);
        }
        if let Some(sealed) = self.sealed_gather.take() {
            let payload = match &mut gathered {
                Gather::Record { buf, end, .. } => &mut buf[self.sector_bytes..*end],
                Gather::Control { buf, .. } => &mut buf[..],
            };
            let seal = self.seal.as_ref().expect("sealed channel");
            let opened = seal.open_payload(sealed.sequence, &sealed.header, payload, &sealed.tag);
            opened.map_err(|e| self.reject(&e))?;
        }
        let frame = self.verified(gathered)?;
        self.deliver(frame);
        Ok(true)
    }

    /// A gathered frame whose payload matches its checksum.
    pub(super) fn verified(&self, gathered: Gather) -> Result<InFrame, String> {
        match gathered {
            Gather::Record { header, buf, end, .. } => {
                header
                    .verify_payload(&buf[self.sector_bytes..end])
                    .map_err(|e| format!("record frame LSN {}: {e}", header.lsn))?;
                Ok(InFrame::Record { header, buf: Some(buf) })
            }
            Gather::Control { header, buf, .. } => {
                header.verify_payload(&buf).map_err(|e| format!("copy frame at {}: {e}", header.offset))?;
                Ok(InFrame::Control { header, payload: Some(buf) })
            }
        }
    }

    /// On a sealed channel, gathers the payload's tag; true once complete
    /// (at once on a channel without seal).
    fn fill_payload_tag(&mut self) -> bool {
        let Some(sealed) = self.sealed_gather.as_mut() else { return true };
        let take = (self.rend - self.rstart).min(TAG_BYTES - sealed.tag_have);
        sealed.tag[sealed.tag_have..sealed.tag_have + take]
            .copy_from_slice(&self.rbuf[self.rstart..self.rstart + take]);
        sealed.tag_have += take;
        self.rstart += take;
        sealed.tag_have == TAG_BYTES
    }

    fn deliver(&mut self, frame: InFrame) {
        self.sealed_gather = None;
        if self.landing.is_empty() {
            self.frames_received += 1;
            self.received_bytes_pending += frame.payload_bytes();
            self.received.push_back(frame);
        } else {
            // Behind a frame still landing, in order.
            self.hold_landing(Landing::Frame(frame));
        }
    }
}
