//! A replication connection over a message transport (RDMA): the core
//! polls it instead of posting socket IO (see `wire.rs`); the frames, their
//! seal and their parsing are those of `peer_conn.rs`.

use std::time::Instant;

use io_uring::{opcode, types};

use super::io::{Io, Op};
use super::peer_conn::{Gather, InFrame, PeerConn};
use super::wire::Wire;

/// A message channel keeps polling for this long after it last moved bytes
/// before it sleeps on its completion descriptor.
const BUSY_POLL_BUDGET: std::time::Duration = std::time::Duration::from_micros(50);
/// Longest sleep of a message channel on its completion descriptor.
const MAX_SLEEP: std::time::Duration = std::time::Duration::from_millis(100);

/// A frame parsed from a message wire, held until the bytes before its end
/// landed (see `PeerConn::landing`).
pub(super) enum Landing {
    /// Its payload is being read into its buffer: verified once there.
    Gathered(Gather),
    /// A frame parsed behind one still landing.
    Frame(InFrame),
}

impl Landing {
    fn payload_bytes(&self) -> usize {
        match self {
            Self::Gathered(Gather::Record { buf, .. } | Gather::Control { buf, .. }) => buf.len(),
            Self::Frame(frame) => frame.payload_bytes(),
        }
    }
}

impl PeerConn {
    /// A message channel: receives and sends what flow control allows now,
    /// then either comes back at once (it moved bytes in the last
    /// [`BUSY_POLL_BUDGET`]) or sleeps on its completion descriptor, both
    /// through the core's io_uring (`Op::PeerPoll` in flight = asleep).
    pub(super) fn drive_message_wire(&mut self, io: &mut Io, key: usize, channel: usize) {
        // Closing: nothing new is posted (a poll asleep ends by its timeout
        // or on the flush that the disconnect causes).
        if self.closing {
            return;
        }
        if self.recv_inflight {
            // Asleep: frames queued meanwhile go out now; their completions
            // (and the peer's answers) wake the poll.
            if let Err(reason) = self.send_queued() {
                self.close(&reason);
            }
            return;
        }
        let now = Instant::now();
        match self.move_message_bytes() {
            Ok(true) => self.busy_until = now + BUSY_POLL_BUDGET,
            Ok(false) => {}
            Err(reason) => {
                self.close(&reason);
                return;
            }
        }
        if !self.has_room() {
            // Received frames wait for the group: its IO brings the loop
            // back here, and the peer waits for the credits meanwhile.
            return;
        }
        let Wire::Message(wire) = &mut self.wire else { unreachable!("a message channel") };
        let sleep = now >= self.busy_until && wire.arm().unwrap_or(false);
        let fd = types::Fd(wire.completion_fd());
        self.recv_inflight = true;
        if sleep {
            // The timeout bounds a wait whose wake-up could be lost (a
            // disconnect that flushes nothing): the channel polls again.
            io.submit_with_timeout(
                Op::PeerPoll { peer: key, channel },
                |_| opcode::PollAdd::new(fd, libc::POLLIN as u32).build(),
                MAX_SLEEP,
            );
        } else {
            io.submit(Op::PeerPoll { peer: key, channel }, |_| opcode::Nop::new().build());
        }
    }

    /// Received bytes into the buffer (parsed), queued frames out; true when
    /// any byte moved.
    fn move_message_bytes(&mut self) -> Result<bool, String> {
        let mut moved = self.take_releases();
        while self.has_room() && !self.closing {
            // A payload being gathered takes the bytes straight from the
            // wire's buffer into the record's aligned buffer.
            if let Some(received) = self.poll_into_gather() {
                let count = received?;
                if count == 0 {
                    break;
                }
                moved = true;
                self.gathered_directly(count);
                continue;
            }
            let Wire::Message(wire) = &mut self.wire else { unreachable!("a message channel") };
            let count = wire.poll_into(&mut self.rbuf[self.rend..])?;
            if count == 0 {
                break;
            }
            moved = true;
            self.received_bytes(count);
        }
        let landed = self.release_landed()?;
        Ok(self.send_queued()? || moved || landed)
    }

    /// Whether bytes taken from the wire have yet to land (a landing read
    /// is in flight).
    pub(super) fn still_landing(&self) -> bool {
        matches!(&self.wire, Wire::Message(wire) if wire.landed_through() < self.stream_taken)
    }

    /// Holds a parsed frame until the bytes taken so far landed.
    pub(super) fn hold_landing(&mut self, held: Landing) {
        self.frames_received += 1;
        self.received_bytes_pending += held.payload_bytes();
        self.landing.push_back((self.stream_taken, held));
    }

    /// Held frames whose bytes landed go to `received`, in order (a payload
    /// is verified now); true when any did.
    fn release_landed(&mut self) -> Result<bool, String> {
        let Wire::Message(wire) = &self.wire else { return Ok(false) };
        let landed = wire.landed_through();
        assert!(landed <= self.stream_taken, "the wire landed {landed} bytes of the {} taken", self.stream_taken);
        let mut any = false;
        while self.landing.front().is_some_and(|(end, _)| *end <= landed) {
            let (_, held) = self.landing.pop_front().expect("checked");
            let frame = match held {
                Landing::Gathered(gathered) => self.verified(gathered)?,
                Landing::Frame(frame) => frame,
            };
            self.received.push_back(frame);
            any = true;
        }
        Ok(any)
    }

    /// Queued frames out as far as flow control allows; true when any byte went.
    fn send_queued(&mut self) -> Result<bool, String> {
        let mut moved = false;
        while let Some(frame) = self.queue.front_mut() {
            let Wire::Message(wire) = &mut self.wire else { unreachable!("a message channel") };
            let sent = wire.try_send(&frame.unsent())?;
            if let Some(token) = sent.lent {
                // Only a payload lies in the registered arena (headers and
                // tags live in the frame): the wire took the rest of it.
                let buffer = frame.payload_buffer_within(frame.sent, sent.bytes);
                self.lent.push((token, buffer.expect("only a frame's payload is ever lent")));
            }
            let count = sent.bytes;
            if count == 0 {
                break;
            }
            moved = true;
            frame.sent += count;
            self.bytes_sent += count as u64;
            self.queued_bytes -= count;
            self.last_send = Instant::now();
            if frame.sent == frame.len() {
                self.queue.pop_front();
                self.frames_sent += 1;
            }
        }
        Ok(moved)
    }

    /// Lets go of the buffers of lent payloads the peer has read; true when any.
    fn take_releases(&mut self) -> bool {
        let Wire::Message(wire) = &mut self.wire else { return false };
        let mut any = false;
        while let Some(token) = wire.take_released() {
            let at = self.lent.iter().position(|(lent, _)| *lent == token);
            self.lent.swap_remove(at.expect("the peer releases only what was lent"));
            any = true;
        }
        any
    }

    /// Completion of a message channel's poll (or of its immediate return).
    pub fn poll_done(&mut self) {
        self.recv_inflight = false;
        if let Wire::Message(wire) = &mut self.wire {
            wire.notified();
        }
    }
}

/// A mock message transport for unit tests of the code above it: two ends
/// joined in memory, at most `window` messages of `message_bytes` in flight
/// each way (a stand-in for RDMA credits), with no descriptor to sleep on.
#[cfg(test)]
pub(super) mod mock {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use crate::runtime::wire::{MessageWire, Sent};

    /// A message, or a part lent in its place (its bytes copied here at
    /// once, handed over only at the second poll that asks for them, as a
    /// read that takes time).
    enum Message {
        Bytes(Vec<u8>),
        Lent { bytes: Vec<u8>, token: u64 },
    }

    type Queue<T> = Arc<Mutex<VecDeque<T>>>;

    /// Polls a landing read of the mock takes to complete.
    const LANDING_POLLS: u64 = 3;

    struct LandingRead {
        target: usize,
        bytes: Vec<u8>,
        at: u64,
        token: u64,
        /// The poll at which it completes.
        due: u64,
    }

    pub struct MockMessageWire {
        outgoing: Queue<Message>,
        incoming: Queue<Message>,
        /// Tokens this end released to its peer, and the peer's to this end.
        releases_out: Queue<u64>,
        releases_in: Queue<u64>,
        taken_of_first: usize,
        window: usize,
        message_bytes: usize,
        /// Parts of at least this many bytes are lent (0: never).
        lend_threshold: usize,
        next_token: u64,
        /// The buffer a lent part is being "read" into.
        reading_into: Option<usize>,
        lent_bytes: u64,
        read_bytes: u64,
        /// Landing reads posted, in order: where each lands, its bytes, where
        /// it starts in the stream, and its token.
        landing: VecDeque<LandingRead>,
        /// Polls so far (a landing read completes [`LANDING_POLLS`] later).
        polls: u64,
        /// Stream bytes handed to the reader.
        taken: u64,
    }

    #[must_use]
    pub fn pair(window: usize, message_bytes: usize) -> (MockMessageWire, MockMessageWire) {
        lending_pair(window, message_bytes, 0)
    }

    #[must_use]
    pub fn lending_pair(
        window: usize,
        message_bytes: usize,
        lend_threshold: usize,
    ) -> (MockMessageWire, MockMessageWire) {
        let (a_to_b, b_to_a) = (Queue::default(), Queue::default());
        let (released_by_a, released_by_b) = (Queue::default(), Queue::default());
        let end = |outgoing: &Queue<Message>, incoming: &Queue<Message>, out: &Queue<u64>, into: &Queue<u64>| {
            MockMessageWire {
                outgoing: Arc::clone(outgoing),
                incoming: Arc::clone(incoming),
                releases_out: Arc::clone(out),
                releases_in: Arc::clone(into),
                taken_of_first: 0,
                window,
                message_bytes,
                lend_threshold,
                next_token: 0,
                reading_into: None,
                lent_bytes: 0,
                read_bytes: 0,
                landing: VecDeque::new(),
                polls: 0,
                taken: 0,
            }
        };
        (end(&a_to_b, &b_to_a, &released_by_a, &released_by_b), end(&b_to_a, &a_to_b, &released_by_b, &released_by_a))
    }

    impl MockMessageWire {
        /// A poll: the landing reads due complete, their bytes written to
        /// their targets, their tokens released.
        fn land_due(&mut self) {
            self.polls += 1;
            while self.landing.front().is_some_and(|read| read.due <= self.polls) {
                let LandingRead { target, bytes, token, .. } = self.landing.pop_front().expect("checked");
                // SAFETY: the reader keeps the target alive and untouched until
                // it landed or the wire is dropped (the `poll_into_landing` contract).
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), target as *mut u8, bytes.len()) };
                self.read_bytes += bytes.len() as u64;
                self.releases_out.lock().unwrap().push_back(token);
            }
        }

        /// Copies what `poll_into` takes into `into` (and counts it taken).
        fn copy_into(&mut self, into: &mut [u8]) -> usize {
            let copied = self.copy_or_read(into);
            self.taken += copied as u64;
            copied
        }

        fn copy_or_read(&mut self, into: &mut [u8]) -> usize {
            if matches!(self.incoming.lock().unwrap().front(), Some(Message::Lent { .. })) {
                return self.read_lent(into);
            }
            let mut incoming = self.incoming.lock().unwrap();
            let mut copied = 0;
            while let Some(Message::Bytes(first)) = incoming.front() {
                let take = (first.len() - self.taken_of_first).min(into.len() - copied);
                if take == 0 {
                    break;
                }
                into[copied..copied + take].copy_from_slice(&first[self.taken_of_first..self.taken_of_first + take]);
                copied += take;
                self.taken_of_first += take;
                if self.taken_of_first == first.len() {
                    incoming.pop_front();
                    self.taken_of_first = 0;
                }
            }
            copied
        }

        /// Hands over a lent part at the second poll into the same buffer.
        fn read_lent(&mut self, into: &mut [u8]) -> usize {
            let mut incoming = self.incoming.lock().unwrap();
            let Some(Message::Lent { bytes, token }) = incoming.front() else { unreachable!("a lent part first") };
            let Some(target) = self.reading_into else {
                self.reading_into = Some(into.as_ptr() as usize);
                return 0;
            };
            assert_eq!(target, into.as_ptr() as usize, "the reader passes the same buffer until the read is done");
            let take = (bytes.len() - self.taken_of_first).min(into.len());
            into[..take].copy_from_slice(&bytes[self.taken_of_first..self.taken_of_first + take]);
            self.taken_of_first += take;
            self.reading_into = None;
            self.read_bytes += take as u64;
            if self.taken_of_first == bytes.len() {
                self.releases_out.lock().unwrap().push_back(*token);
                incoming.pop_front();
                self.taken_of_first = 0;
            }
            take
        }
    }

    impl MessageWire for MockMessageWire {
        fn try_send(&mut self, parts: &[&[u8]]) -> Result<Sent, String> {
            let mut outgoing = self.outgoing.lock().unwrap();
            if outgoing.len() >= self.window {
                return Ok(Sent::default());
            }
            if self.lend_threshold > 0 && parts.first().is_some_and(|part| part.len() >= self.lend_threshold) {
                let token = self.next_token;
                self.next_token += 1;
                self.lent_bytes += parts[0].len() as u64;
                outgoing.push_back(Message::Lent { bytes: parts[0].to_vec(), token });
                return Ok(Sent { bytes: parts[0].len(), lent: Some(token) });
            }
            let lendable = parts.iter().position(|part| self.lend_threshold > 0 && part.len() >= self.lend_threshold);
            let message: Vec<u8> =
                parts[..lendable.unwrap_or(parts.len())].concat().into_iter().take(self.message_bytes).collect();
            let bytes = message.len();
            if bytes > 0 {
                outgoing.push_back(Message::Bytes(message));
            }
            Ok(Sent { bytes, lent: None })
        }

        fn take_released(&mut self) -> Option<u64> {
            self.releases_in.lock().unwrap().pop_front()
        }

        fn lent_and_read_bytes(&self) -> (u64, u64) {
            (self.lent_bytes, self.read_bytes)
        }

        fn poll_into(&mut self, into: &mut [u8]) -> Result<usize, String> {
            self.land_due();
            Ok(self.copy_into(into))
        }

        fn poll_into_landing(&mut self, into: &mut [u8]) -> Result<usize, String> {
            self.land_due();
            let mut incoming = self.incoming.lock().unwrap();
            if let Some(Message::Lent { bytes, token }) = incoming.front() {
                if self.taken_of_first == 0 && self.reading_into.is_none() && into.len() >= bytes.len() {
                    let (bytes, token) = (bytes.clone(), *token);
                    incoming.pop_front();
                    let count = bytes.len();
                    let target = into.as_mut_ptr() as usize;
                    let due = self.polls + LANDING_POLLS;
                    self.landing.push_back(LandingRead { target, bytes, at: self.taken, token, due });
                    self.taken += count as u64;
                    return Ok(count);
                }
            }
            drop(incoming);
            Ok(self.copy_into(into))
        }

        fn landed_through(&self) -> u64 {
            self.landing.front().map_or(self.taken, |read| read.at)
        }

        fn arm(&mut self) -> Result<bool, String> {
            Ok(false)
        }

        fn notified(&mut self) {}

        fn completion_fd(&self) -> std::os::fd::RawFd {
            -1
        }

        fn disconnect(&mut self) {}

        fn describe(&self) -> String {
            "mock message wire".to_owned()
        }

        fn peer(&self) -> String {
            "mock peer".to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use tandem_proto::{FrameHeader, FrameKind, RecordHeader, RecordStamp};

    use tandem_crypto::{ChannelSeal, Protection, Side};

    use super::mock::{lending_pair, pair, MockMessageWire};
    use super::*;
    use crate::runtime::buf::AlignedBuf;
    use crate::runtime::peer_conn::{InFrame, OutFrame, PeerChannel, SharedBytes};

    /// Frames larger than a message, under a window of two messages: the
    /// byte stream is cut into messages and put back together (payloads
    /// straight into their records' buffers), every frame arrives whole and
    /// in order, and flow control never loses a byte; in clear, signed and
    /// encrypted (the payload's tag follows the payload gathered in place).
    #[test]
    fn frames_cross_a_message_wire_cut_into_small_messages() {
        for protection in [None, Some(Protection::Sign), Some(Protection::Encrypt)] {
            let (most_lent, most_held) = exchange_records(pair(2, 100), protection);
            assert_eq!(most_lent, 0, "{protection:?}: nothing is lent below a threshold");
            assert_eq!(most_held, 0, "{protection:?}: nothing waits for a read");
        }
    }

    /// Payloads of 1 KiB and more are lent (mock: read at the second poll,
    /// or, taken as landing, at the next poll): the sender keeps their
    /// buffers until the receiver released them, the receiver gets them in
    /// order, in place, sealed or not. In clear they land behind the stream:
    /// the frames after one wait for it.
    #[test]
    fn lent_payloads_are_kept_until_released_and_arrive_in_order() {
        for protection in [None, Some(Protection::Sign), Some(Protection::Encrypt)] {
            let (most_lent, most_held) = exchange_records(lending_pair(2, 100, 1024), protection);
            assert!(most_lent > 0, "{protection:?}: payloads were lent");
            assert_eq!(most_held > 0, protection.is_none(), "{protection:?}: frames waited for landing reads");
        }
    }

    /// Sends 20 records (512 to 1536 bytes of payload) and heartbeats from
    /// one end of the pair to the other, checks every record arrived in
    /// order and whole; returns the most lent buffers the sender held at
    /// once, and the most frames the receiver held for landing reads.
    fn exchange_records(wires: (MockMessageWire, MockMessageWire), protection: Option<Protection>) -> (usize, usize) {
        let (a, b) = wires;
        let seal = |side| protection.map(|p| ChannelSeal::new(p, &[1; 16], &[2; 16], side, 1));
        let (to_b, to_a) =
            (seal(Side::Source), protection.map(|p| ChannelSeal::new(p, &[2; 16], &[1; 16], Side::Destination, 1)));
        let conn = |wire, seal| PeerConn::new(PeerChannel { wire: Wire::Message(Box::new(wire)), seal }, 512);
        let (mut sender, mut receiver) = (conn(a, to_b), conn(b, to_a));
        let stamp = RecordStamp { group_id: 1, epoch: 1, generation_tag: 1 };
        for lsn in 1..=20u64 {
            let payload: Vec<u8> = (0..512 * (1 + lsn as usize % 3)).map(|i| (i as u64 * lsn) as u8).collect();
            let header = RecordHeader::write(stamp, lsn, 0, lsn * 4096, &payload);
            let mut buf = AlignedBuf::zeroed(512 + payload.len());
            buf[512..].copy_from_slice(&payload);
            let len = payload.len();
            sender.send(OutFrame::new(
                header.as_bytes(),
                Some(SharedBytes { buf: std::rc::Rc::new(buf), start: 512, len }),
            ));
            sender.send(OutFrame::new(FrameHeader::new(FrameKind::Heartbeat, 0, 0, lsn, 0, 0).as_bytes(), None));
        }
        let (mut most_lent, mut most_held) = (0, 0);
        for _ in 0..10_000 {
            let sent = sender.move_message_bytes().unwrap();
            most_lent = most_lent.max(sender.lent.len());
            let received = receiver.move_message_bytes().unwrap();
            most_held = most_held.max(receiver.landing.len());
            if !sent && !received {
                break;
            }
        }
        assert_eq!(sender.queued_bytes, 0, "{protection:?}: everything went out");
        assert!(sender.lent.is_empty(), "{protection:?}: every lent buffer was released");
        let mut records = 0;
        while let Some(frame) = receiver.take_received() {
            if let InFrame::Record { header, buf } = frame {
                records += 1;
                assert_eq!(header.lsn, records, "{protection:?}: in order");
                let buf = buf.expect("a write carries its payload");
                header.verify_payload(&buf[512..512 + header.payload_bytes() as usize]).unwrap();
            }
        }
        assert_eq!(records, 20, "{protection:?}");
        let Wire::Message(wire) = &sender.wire else { unreachable!("a message wire") };
        let Wire::Message(peer) = &receiver.wire else { unreachable!("a message wire") };
        assert_eq!(wire.lent_and_read_bytes().0, peer.lent_and_read_bytes().1, "{protection:?}");
        assert!(receiver.landing.is_empty(), "{protection:?}: every frame landed");
        (most_lent, most_held)
    }
}
