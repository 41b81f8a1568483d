//! A replication session: the N data channels (TCP connections) of one
//! partnership, used as one ordered stream.
//!
//! The ordered frames (records, copy data, barriers: everything except
//! heartbeats and acknowledgements) are striped round robin: the k-th ordered
//! frame of a session goes on channel k mod N. The receiving side takes them
//! back in the same rotation, so the stream comes out exactly as it went in
//! without a sequence number on the wire, and consecutive LSNs travel on
//! different connections (a large copy chunk on one does not hold up the
//! records behind it on the wire). Heartbeats keep each channel alive on its
//! own; acknowledgements carry values that only grow and use channel 0.
//! Losing any channel ends the session: a stream with a hole cannot go on,
//! and the reconnection resumes from the destination's durable LSN.

use std::time::Instant;

use tandem_proto::FrameHeader;

use super::io::Io;
use super::peer_conn::{InFrame, OutFrame, PeerChannel, PeerConn};
use super::wire::Wire;

/// Most data channels a partnership may have (the superblock allows 16).
pub const MAX_CHANNELS: usize = 16;

/// The rotation of the ordered stream over the channels `first..channels`.
#[derive(Debug, Clone, Copy)]
struct Rotation {
    first: usize,
    channels: usize,
    next: usize,
}

impl Rotation {
    fn advance(&mut self) {
        self.next += 1;
        if self.next == self.channels {
            self.next = self.first;
        }
    }
}

/// The channels of one partnership's connection to its peer.
pub struct PeerSession {
    pub id: u64,
    pub group: usize,
    channels: Vec<PeerConn>,
    send_rotation: Rotation,
    recv_rotation: Rotation,
}

impl PeerSession {
    /// A session over `channels`, channel i being `channels[i]` on both sides.
    #[must_use]
    pub fn new(id: u64, channels: Vec<PeerChannel>, group: usize, sector_bytes: usize) -> Self {
        assert!((1..=MAX_CHANNELS).contains(&channels.len()), "a session has 1..={MAX_CHANNELS} channels");
        let count = channels.len();
        // A TCP channel 0 before message (RDMA) channels is the control
        // channel: the ordered stream rotates over the others only.
        let control_only = count > 1 && channels[0].wire.is_tcp() && channels[1..].iter().all(|c| !c.wire.is_tcp());
        let first = usize::from(control_only);
        let channels = channels.into_iter().map(|c| PeerConn::new(c, sector_bytes)).collect();
        let rotation = Rotation { first, channels: count, next: first };
        Self { id, group, channels, send_rotation: rotation, recv_rotation: rotation }
    }

    /// The peer's address (of channel 0), for logs.
    #[must_use]
    pub fn peer(&self) -> &str {
        &self.channels[0].peer
    }

    #[must_use]
    /// Data channels (a TCP control channel before RDMA ones is not one).
    pub fn channel_count(&self) -> usize {
        self.channels.len() - self.send_rotation.first
    }

    /// Each channel as "TRANSPORT [DEVICE PORT GID] LOCAL -> REMOTE".
    #[must_use]
    pub fn channel_addresses(&self) -> Vec<String> {
        self.channels.iter().map(|c| c.wire.describe()).collect()
    }

    /// Queues a frame: ordered frames in rotation, the others on channel 0.
    pub fn send(&mut self, frame: OutFrame) {
        if tandem_proto::header_is_ordered(&frame.header) {
            self.channels[self.send_rotation.next].send(frame);
            self.send_rotation.advance();
        } else {
            self.channels[0].send(frame);
        }
    }

    /// The next received frame: a heartbeat or acknowledgement at the front
    /// of any channel, else the next ordered frame from the channel whose
    /// turn it is (nothing when that one has not arrived yet).
    pub fn take_received(&mut self) -> Option<InFrame> {
        for channel in &mut self.channels {
            if channel.received.front().is_some_and(|f| !frame_is_ordered(f)) {
                return channel.take_received();
            }
        }
        let frame = self.channels[self.recv_rotation.next].take_received()?;
        self.recv_rotation.advance();
        Some(frame)
    }

    /// Closes every channel.
    pub fn close(&mut self, reason: &str) {
        for channel in &mut self.channels {
            channel.close(reason);
        }
    }

    /// Whether the session is ending (any channel closed ends all).
    #[must_use]
    pub fn closing(&self) -> bool {
        self.channels.iter().any(|c| c.closing)
    }

    /// Why the session ended: the first channel that closed says.
    #[must_use]
    pub fn close_reason(&self) -> &str {
        self.channels.iter().find(|c| c.closing).map_or("", |c| c.close_reason.as_str())
    }

    /// Whether the session ended because a frame failed authentication.
    #[must_use]
    pub fn rejected_a_frame(&self) -> bool {
        self.channels.iter().any(|c| c.rejected)
    }

    /// Nothing of the session is in flight any more.
    #[must_use]
    pub fn can_drop(&self) -> bool {
        self.channels.iter().all(PeerConn::can_drop)
    }

    /// Heartbeats for idle channels, the progress heartbeat on channel 0
    /// (busy or not), and the timeout of silent channels.
    pub fn tick(&mut self, now: Instant, heartbeat: &FrameHeader) {
        for (index, channel) in self.channels.iter_mut().enumerate() {
            let idle = channel.tick(now);
            let progress_due = index == 0
                && !channel.closing
                && now.duration_since(channel.last_heartbeat) >= super::peer_conn::PROGRESS_INTERVAL;
            if idle || progress_due {
                channel.send(OutFrame::new(heartbeat.as_bytes(), None));
                channel.last_heartbeat = now;
            }
        }
    }

    /// Posts receives and sends on every channel; a channel that closed
    /// closes the others first, so the session ends as one.
    pub fn post_io(&mut self, io: &mut Io, key: usize) {
        if self.closing() {
            let reason = self.close_reason().to_owned();
            for channel in self.channels.iter_mut().filter(|c| !c.closing) {
                channel.close(&format!("another channel of the session closed: {reason}"));
            }
        }
        for (index, channel) in self.channels.iter_mut().enumerate() {
            channel.post_io(io, key, index);
        }
    }

    pub fn poll_done(&mut self, channel: usize) {
        self.channels[channel].poll_done();
    }

    pub fn recv_done(&mut self, channel: usize, result: i32) {
        self.channels[channel].recv_done(result);
    }

    pub fn send_done(&mut self, channel: usize, frames: Vec<OutFrame>, result: i32) {
        self.channels[channel].send_done(frames, result);
    }

    #[must_use]
    pub fn bytes_sent(&self) -> u64 {
        self.channels.iter().map(|c| c.bytes_sent).sum()
    }

    /// Payload bytes the peer read from this side's buffers, and this side
    /// from the peer's, without a copy (RDMA READ).
    #[must_use]
    pub fn zero_copy_bytes(&self) -> (u64, u64) {
        self.channels
            .iter()
            .filter_map(|c| match &c.wire {
                Wire::Message(wire) => Some(wire.lent_and_read_bytes()),
                Wire::Tcp(_) => None,
            })
            .fold((0, 0), |(lent, read), (l, r)| (lent + l, read + r))
    }

    #[must_use]
    pub fn bytes_received(&self) -> u64 {
        self.channels.iter().map(|c| c.bytes_received).sum()
    }

    /// Frames sent and received, and the average send latency of the
    /// channels, in microseconds.
    #[must_use]
    pub fn frame_counts(&self) -> (u64, u64, f64) {
        let sent = self.channels.iter().map(|c| c.frames_sent).sum();
        let received = self.channels.iter().map(|c| c.frames_received).sum();
        let latency = self.channels.iter().map(|c| c.send_latency_us_avg).sum::<f64>() / self.channels.len() as f64;
        (sent, received, latency)
    }
}

fn frame_is_ordered(frame: &InFrame) -> bool {
    match frame {
        InFrame::Record { .. } => true,
        InFrame::Control { header, .. } => header.frame_kind().is_ordered(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use tandem_proto::FrameKind;

    use super::*;

    fn loopback_pair() -> PeerChannel {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _accepted = listener.accept().unwrap();
        PeerChannel { wire: crate::runtime::wire::Wire::Tcp(stream), seal: None }
    }

    /// Over RDMA, channel 0 (TCP) is the control channel: ordered frames
    /// rotate over the message channels only, heartbeats and acknowledgements
    /// use channel 0, and the data channels are what status counts.
    #[test]
    fn a_tcp_control_channel_before_message_channels_carries_no_ordered_frame() {
        let message = || {
            let (end, _peer) = crate::runtime::peer_conn_wire::mock::pair(4, 1024);
            PeerChannel { wire: crate::runtime::wire::Wire::Message(Box::new(end)), seal: None }
        };
        let mut session = PeerSession::new(1, vec![loopback_pair(), message(), message()], 0, 512);
        assert_eq!(session.channel_count(), 2);
        for lsn in 1..=6 {
            session.send(OutFrame::new(FrameHeader::new(FrameKind::Barrier, 0, 0, lsn, 0, 0).as_bytes(), None));
        }
        session.send(OutFrame::new(FrameHeader::new(FrameKind::Ack, 0, 0, 9, 0, 0).as_bytes(), None));
        let queued: Vec<usize> = session.channels.iter().map(PeerConn::queued_frames).collect();
        assert_eq!(queued, vec![1, 3, 3], "channel 0 has only the acknowledgement");
    }

    /// Channels sealed with `protection` for `side`, keyed by a fixed
    /// stand-in for the TLS exporter (both sides derive the same keys).
    fn sealed_channels(
        protection: Option<tandem_crypto::Protection>,
        side: tandem_crypto::Side,
        count: usize,
    ) -> Vec<PeerChannel> {
        let keys = protection.map(|p| {
            tandem_crypto::SessionKeys::derive(Some(p), count as u32, |context, out| {
                for (i, byte) in out.iter_mut().enumerate() {
                    *byte = context.iter().fold(i as u8, |a, b| a.wrapping_mul(31).wrapping_add(*b));
                }
                Ok(())
            })
            .unwrap()
        });
        (0..count)
            .map(|channel| PeerChannel {
                seal: keys.as_ref().and_then(|k| k.channel_seal(channel as u32, side)),
                ..loopback_pair()
            })
            .collect()
    }

    fn control(kind: FrameKind, lsn: u64) -> InFrame {
        InFrame::Control { header: FrameHeader::new(kind, 0, 0, lsn, 0, 0), payload: None }
    }

    fn lsn_of(frame: &InFrame) -> u64 {
        match frame {
            InFrame::Record { header, .. } => header.lsn,
            InFrame::Control { header, .. } => header.lsn,
        }
    }

    /// Frames arrive on three channels in the rotation the sender used,
    /// with heartbeats and acknowledgements in between; the session gives
    /// the ordered ones back in sending order whatever channel filled first.
    #[test]
    fn the_ordered_stream_comes_back_in_sending_order() {
        let streams = (0..3).map(|_| loopback_pair()).collect();
        let mut session = PeerSession::new(1, streams, 0, 512);
        // Ordered frames 1..=7 went to channels 0,1,2,0,1,2,0; channel 2 is late.
        for lsn in [1, 4, 7] {
            session.channels[0].received.push_back(control(FrameKind::Barrier, lsn));
        }
        session.channels[1].received.push_back(control(FrameKind::Barrier, 2));
        session.channels[1].received.push_back(control(FrameKind::Heartbeat, 100));
        session.channels[1].received.push_back(control(FrameKind::Barrier, 5));
        let mut taken = Vec::new();
        while let Some(frame) = session.take_received() {
            taken.push(lsn_of(&frame));
        }
        assert_eq!(taken, vec![1, 2, 100], "frame 3 on channel 2 has not arrived: no ordered frame may pass it");
        session.channels[2].received.push_back(control(FrameKind::Ack, 200));
        session.channels[2].received.push_back(control(FrameKind::Barrier, 3));
        session.channels[2].received.push_back(control(FrameKind::Barrier, 6));
        while let Some(frame) = session.take_received() {
            taken.push(lsn_of(&frame));
        }
        assert_eq!(taken, vec![1, 2, 100, 200, 3, 4, 5, 6, 7]);
    }

    /// Random frames (records with payloads, copy data, barriers, and
    /// heartbeats between them) go through a sending session; the bytes of
    /// each channel arrive in random pieces, the channels in random order,
    /// into a receiving session that parses them: the ordered frames come out
    /// in sending order.
    #[test]
    fn random_frames_over_random_arrivals_come_out_in_order() {
        use rand::{Rng, SeedableRng};
        use tandem_crypto::{Protection, Side};
        use tandem_proto::{RecordHeader, RecordStamp};
        for seed in 0..60u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let channels = rng.random_range(1..=4);
            let protection = [None, Some(Protection::Sign), Some(Protection::Encrypt)][seed as usize % 3];
            let tamper = seed % 6 >= 3;
            let mut sender = PeerSession::new(1, sealed_channels(protection, Side::Source, channels), 0, 512);
            let mut sent = Vec::new();
            let stamp = RecordStamp { group_id: 1, epoch: 1, generation_tag: 1 };
            for lsn in 1..=rng.random_range(1..200u64) {
                if rng.random_bool(0.2) {
                    sender
                        .send(OutFrame::new(FrameHeader::new(FrameKind::Heartbeat, 0, 0, lsn, 0, 0).as_bytes(), None));
                }
                let frame = match rng.random_range(0..3) {
                    0 => {
                        let payload = vec![lsn as u8; rng.random_range(1..3000)];
                        let header = RecordHeader::write(stamp, lsn, 0, 0, &payload);
                        outframe_with(header.as_bytes(), &payload)
                    }
                    1 => {
                        let payload = vec![!(lsn as u8); 512 * rng.random_range(1..5)];
                        outframe_with(FrameHeader::copy_data(0, lsn, 0, &payload).as_bytes(), &payload)
                    }
                    _ => OutFrame::new(FrameHeader::new(FrameKind::Barrier, 0, 0, lsn, 0, 0).as_bytes(), None),
                };
                sent.push(lsn);
                sender.send(frame);
            }
            // The bytes each channel would put on the wire.
            let mut wires: Vec<Vec<u8>> = sender.channels.iter_mut().map(PeerConn::drain_bytes_for_test).collect();
            if tamper {
                // One bit anywhere in one channel's bytes (header, tag or payload).
                let channel = rng.random_range(0..channels);
                if !wires[channel].is_empty() {
                    let at = rng.random_range(0..wires[channel].len());
                    wires[channel][at] ^= 1 << rng.random_range(0..8);
                }
            }
            let mut receiver = PeerSession::new(2, sealed_channels(protection, Side::Destination, channels), 0, 512);
            let mut received = Vec::new();
            while wires.iter().any(|w| !w.is_empty()) {
                let channel = rng.random_range(0..channels);
                if wires[channel].is_empty() {
                    continue;
                }
                let take = rng.random_range(1..=wires[channel].len().min(5000));
                let piece: Vec<u8> = wires[channel].drain(..take).collect();
                receiver.channels[channel].receive_for_test(&piece);
                while let Some(frame) = receiver.take_received() {
                    if frame_is_ordered(&frame) {
                        received.push(lsn_of(&frame));
                    }
                }
            }
            if tamper && protection.is_some() {
                assert!(receiver.rejected_a_frame(), "seed {seed}: a flipped bit must be caught");
                // What came out before the bad frame is a prefix of what was sent.
                assert!(sent.starts_with(&received), "seed {seed}");
                continue;
            }
            if tamper {
                // Without a seal a flipped bit may go unnoticed (a payload
                // byte of a heartbeat LSN); that is what sealing is for.
                continue;
            }
            assert!(!receiver.closing(), "seed {seed}: {}", receiver.close_reason());
            assert_eq!(received, sent, "seed {seed}: {channels} channels");
        }
    }

    fn outframe_with(header: &[u8], payload: &[u8]) -> OutFrame {
        let mut buf = crate::runtime::buf::AlignedBuf::zeroed(payload.len());
        buf.copy_from_slice(payload);
        let shared = super::super::peer_conn::SharedBytes { buf: std::rc::Rc::new(buf), start: 0, len: payload.len() };
        OutFrame::new(header, Some(shared))
    }

    /// The sender's rotation puts ordered frames on every channel in turn and
    /// keeps heartbeats and acknowledgements out of it.
    #[test]
    fn ordered_frames_rotate_over_the_channels() {
        let streams = (0..2).map(|_| loopback_pair()).collect();
        let mut session = PeerSession::new(1, streams, 0, 512);
        for lsn in 1..=5 {
            session.send(OutFrame::new(FrameHeader::new(FrameKind::Barrier, 0, 0, lsn, 0, 0).as_bytes(), None));
            session.send(OutFrame::new(FrameHeader::new(FrameKind::Ack, 0, 0, lsn, 0, 0).as_bytes(), None));
        }
        let frames_on = |channel: usize| session.channels[channel].queued_frames();
        assert_eq!(frames_on(0), 3 + 5, "barriers 1, 3, 5 and every acknowledgement");
        assert_eq!(frames_on(1), 2, "barriers 2 and 4");
    }
}
