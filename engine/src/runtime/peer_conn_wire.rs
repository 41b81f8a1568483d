//! A replication connection over a message transport (RDMA): the core
//! polls it instead of posting socket IO (see `wire.rs`); the frames, their
//! seal and their parsing are those of `peer_conn.rs`.

use std::time::Instant;

use io_uring::{opcode, types};

use super::io::{Io, Op};
use super::peer_conn::PeerConn;
use super::wire::Wire;

/// A message channel keeps polling for this long after it last moved bytes
/// before it sleeps on its completion descriptor.
const BUSY_POLL_BUDGET: std::time::Duration = std::time::Duration::from_micros(50);
/// Longest sleep of a message channel on its completion descriptor.
const MAX_SLEEP: std::time::Duration = std::time::Duration::from_millis(100);

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
        let mut moved = false;
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
        Ok(self.send_queued()? || moved)
    }

    /// Queued frames out as far as flow control allows; true when any byte went.
    fn send_queued(&mut self) -> Result<bool, String> {
        let mut moved = false;
        while let Some(frame) = self.queue.front_mut() {
            let Wire::Message(wire) = &mut self.wire else { unreachable!("a message channel") };
            let count = wire.try_send(&frame.unsent())?;
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

    use crate::runtime::wire::MessageWire;

    type Queue = Arc<Mutex<VecDeque<Vec<u8>>>>;

    pub struct MockMessageWire {
        outgoing: Queue,
        incoming: Queue,
        taken_of_first: usize,
        window: usize,
        message_bytes: usize,
    }

    #[must_use]
    pub fn pair(window: usize, message_bytes: usize) -> (MockMessageWire, MockMessageWire) {
        let (a_to_b, b_to_a) = (Queue::default(), Queue::default());
        let end = |outgoing: &Queue, incoming: &Queue| MockMessageWire {
            outgoing: Arc::clone(outgoing),
            incoming: Arc::clone(incoming),
            taken_of_first: 0,
            window,
            message_bytes,
        };
        (end(&a_to_b, &b_to_a), end(&b_to_a, &a_to_b))
    }

    impl MessageWire for MockMessageWire {
        fn try_send(&mut self, parts: &[&[u8]]) -> Result<usize, String> {
            let mut outgoing = self.outgoing.lock().unwrap();
            if outgoing.len() >= self.window {
                return Ok(0);
            }
            let message: Vec<u8> = parts.concat().into_iter().take(self.message_bytes).collect();
            let count = message.len();
            outgoing.push_back(message);
            Ok(count)
        }

        fn poll_into(&mut self, into: &mut [u8]) -> Result<usize, String> {
            let mut incoming = self.incoming.lock().unwrap();
            let mut copied = 0;
            while let Some(first) = incoming.front() {
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
            Ok(copied)
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

    use super::mock::pair;
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
        use tandem_crypto::{ChannelSeal, Protection, Side};
        for protection in [None, Some(Protection::Sign), Some(Protection::Encrypt)] {
            let (a, b) = pair(2, 100);
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
            for _ in 0..10_000 {
                let sent = sender.move_message_bytes().unwrap();
                let received = receiver.move_message_bytes().unwrap();
                if !sent && !received {
                    break;
                }
            }
            assert_eq!(sender.queued_bytes, 0, "{protection:?}: everything went out");
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
        }
    }
}
