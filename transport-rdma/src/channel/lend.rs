//! Large payloads lent instead of copied. A part of the byte stream that
//! lies in the channel's lending region (the engine's registered arena) and
//! is at least the threshold travels as a descriptor message: its address,
//! length, the region's remote key and a token. The receiving channel, when
//! its reader asks for those bytes, has its adapter read them with one RDMA
//! READ straight into the reader's buffer (the destination's O_DIRECT record
//! buffer, which comes from its own arena; any other buffer is registered
//! for that read), hands them over once the read completed, then gives the
//! token back in a release message. The sender keeps the lent buffer until
//! that release: the reader's adapter may read it until then.
//!
//! Descriptors sit in the ordered stream like any message. A reader that
//! takes a lent payload with `poll_into` waits for its read: the bytes after
//! it are taken only once it was read. A reader that takes it with
//! `poll_into_landing` gets it at once, as bytes still landing: the read is
//! posted, the stream goes on, and the reads of the payloads behind it are
//! posted too (up to [`READS_AHEAD`]), so the adapter always has the next
//! read queued rather than waiting for the reader between two. Reads
//! complete in the order they were posted (one send queue), so what has
//! landed is a prefix of the stream (`landed_through`). rdma_cm's default of
//! one outstanding read each way holds: the adapter issues the queued reads
//! one after the other, without a round trip through the reader.

use std::sync::Arc;

use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::queue_pair::{PostSendGuard, QueuePair, SetScatterGatherEntry, WorkRequestFlags};
use sideway::ibverbs::AccessFlags;

use super::{RdmaChannel, FLAG_LEND, FLAG_RELEASE};

/// Bytes of a descriptor message: address, length, remote key, token.
pub(super) const DESCRIPTOR_BYTES: usize = 24;
/// Work request id of reads (slots use 0 .. 2 x window).
pub(super) const READ_WR_ID: u64 = u64::MAX;
/// Reads of lent payloads a channel keeps posted at most.
pub(crate) const READS_AHEAD: usize = 8;
/// Tokens of payloads read that go back in one message while more reads
/// are in flight.
const RELEASE_BATCH: usize = 4;
/// Smaller parts in the region are copied: a copy of a few hundred bytes
/// costs less than the adapter's extra scatter/gather entry.
const GATHER_MIN_BYTES: usize = 2048;

/// A payload the peer lent: where to read it, and the token to give back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Descriptor {
    pub(super) address: u64,
    pub(super) bytes: u32,
    pub(super) rkey: u32,
    pub(super) token: u64,
}

impl Descriptor {
    fn encode(&self) -> [u8; DESCRIPTOR_BYTES] {
        let mut bytes = [0u8; DESCRIPTOR_BYTES];
        bytes[..8].copy_from_slice(&self.address.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.bytes.to_le_bytes());
        bytes[12..16].copy_from_slice(&self.rkey.to_le_bytes());
        bytes[16..].copy_from_slice(&self.token.to_le_bytes());
        bytes
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() != DESCRIPTOR_BYTES {
            return Err(format!(
                "a lent-payload descriptor of {} bytes (it has {DESCRIPTOR_BYTES}): the channel is reset",
                bytes.len()
            ));
        }
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let long = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let descriptor = Self { address: long(0), bytes: word(8), rkey: word(12), token: long(16) };
        if descriptor.bytes == 0 {
            return Err("a lent payload of 0 bytes: the channel is reset".to_owned());
        }
        Ok(descriptor)
    }
}

/// A read in flight into the reader's buffer.
pub(super) struct Read {
    target: usize,
    bytes: usize,
    pub(super) done: bool,
    /// A landing read: where its bytes start in the stream, and the token
    /// to release once it completed. None for the read a reader waits for.
    landing: Option<(u64, u64)>,
    /// The reader's buffer registered for this read when it lies outside
    /// the lending region.
    _registered: Option<Arc<MemoryRegion>>,
}

/// What a channel lends and reads.
#[derive(Default)]
pub(super) struct Lending {
    /// The lending region registered with the channel (readable by the peer).
    pub(super) region: Option<Arc<MemoryRegion>>,
    next_token: u64,
    /// Payloads lent that the peer has not read yet.
    pub(super) outstanding: usize,
    /// Tokens the peer released, for the sender's owner to take.
    pub(super) released: std::collections::VecDeque<u64>,
    /// Tokens of payloads read here, to give back.
    pub(super) to_release: Vec<u64>,
    /// Reads posted, in posting order (they complete in that order):
    /// landing reads, then perhaps the read the reader waits for.
    pub(super) reads: std::collections::VecDeque<Read>,
    /// Per send slot: the token of the caller's part its message gathers,
    /// released when the send completes.
    pub(super) gathered: Vec<Option<u64>>,
    pub(super) bytes_lent: u64,
    pub(super) bytes_read: u64,
}

impl Lending {
    pub(super) fn new(send_slots: usize) -> Self {
        Self { gathered: vec![None; send_slots], ..Self::default() }
    }

    /// Where the first landing read still in flight starts in the stream.
    pub(super) fn landed_through(&self) -> Option<u64> {
        self.reads.front().and_then(|read| read.landing).map(|(at, _)| at)
    }

    /// The read the reader waits for, if posted (always the last one).
    fn awaited(&self) -> Option<&Read> {
        self.reads.back().filter(|read| read.landing.is_none())
    }
}

impl RdmaChannel {
    /// Like [`Self::poll_into`], but a lent payload that fits `into` whole
    /// is taken at once: its read is posted and its bytes are returned
    /// before they landed, so the reader goes on with the stream (and more
    /// reads are posted behind it, up to [`READS_AHEAD`]). The reader uses
    /// those bytes only once [`Self::landed_through`] passed them, and keeps
    /// `into` alive and untouched until then or until the channel is gone.
    pub fn poll_into_landing(&mut self, into: &mut [u8]) -> Result<usize, String> {
        self.poll_stream(into, true)
    }

    /// Bytes of the stream that have landed in the reader's buffers: all
    /// that were taken but those of landing reads not yet completed.
    #[must_use]
    pub fn landed_through(&self) -> u64 {
        self.lending.landed_through().unwrap_or(self.taken_bytes)
    }

    /// Like [`Self::try_send`], but a part that lies in the lending region
    /// and reaches its threshold is lent: a descriptor goes out in its place
    /// and the token comes back (the caller keeps the part's buffer until
    /// [`Self::take_released`] returns that token). Bytes before such a part
    /// go out first, by copy.
    ///
    /// A smaller part in the region (of [`GATHER_MIN_BYTES`] or more) is not
    /// copied either: the adapter gathers it from where it lies, between
    /// the bytes before and after it (copied into the send slot), and its
    /// token comes back once that send completed.
    pub fn try_send_or_lend(&mut self, parts: &[&[u8]]) -> Result<(usize, Option<u64>), String> {
        let Some(region) = self.config.lend else { return Ok((self.try_send(parts)?, None)) };
        // Empty parts in front would leave nothing to send before a lendable one.
        let parts = &parts[parts.iter().take_while(|part| part.is_empty()).count()..];
        let registered = parts.iter().position(|part| part.len() >= GATHER_MIN_BYTES && region.contains(part));
        let Some(at) = registered else { return Ok((self.try_send(parts)?, None)) };
        if parts[at].len() >= region.threshold_bytes {
            return match at {
                0 => Ok(self.lend(parts[0])?.map_or((0, None), |token| (parts[0].len(), Some(token)))),
                _ => Ok((self.try_send(&parts[..at])?, None)),
            };
        }
        if parts[at].len() > self.config.message_bytes {
            // Larger than a message, smaller than the threshold: copied.
            return Ok((self.try_send(parts)?, None));
        }
        let before: usize = parts[..at].iter().map(|part| part.len()).sum();
        if before + parts[at].len() > self.config.message_bytes {
            // The bytes before it fill messages of their own first.
            return Ok((self.try_send(&parts[..at])?, None));
        }
        self.send_gathering(&parts[..at], parts[at], &parts[at + 1..])
    }

    /// One message: `before` and as much of `after` as fits copied into a
    /// send slot, `part` gathered from the lending region between them.
    fn send_gathering(
        &mut self,
        before: &[&[u8]],
        part: &[u8],
        after: &[&[u8]],
    ) -> Result<(usize, Option<u64>), String> {
        let Some(start) = self.data_slot_start() else { return Ok((0, None)) };
        let before_bytes = self.copy_into_slot(start, before, usize::MAX);
        let room = self.config.message_bytes - before_bytes - part.len();
        let after_bytes = self.copy_into_slot(start + before_bytes, after, room);
        let lkey = self.lending.region.as_ref().expect("a channel with a lending region registered it").lkey();
        let sge = rdma_mummy_sys::ibv_sge { addr: part.as_ptr() as u64, length: part.len() as u32, lkey };
        let slot = self.post_slot_gathering(&[(0, before_bytes), (before_bytes, after_bytes)], Some(sge), 0)?;
        let token = self.lending.next_token;
        self.lending.next_token += 1;
        self.lending.gathered[slot as usize] = Some(token);
        self.messages_sent += 1;
        Ok((before_bytes + part.len() + after_bytes, Some(token)))
    }

    /// Send slot `slot` completed: the part its message gathered is released.
    pub(super) fn send_completed(&mut self, slot: u32) {
        if let Some(token) = self.lending.gathered.get_mut(slot as usize).and_then(Option::take) {
            self.lending.released.push_back(token);
        }
    }

    /// The next token of a lent payload the peer has read.
    pub fn take_released(&mut self) -> Option<u64> {
        self.lending.released.pop_front()
    }

    /// Payload bytes this channel lent, and read from its peer, so far.
    #[must_use]
    pub fn lent_and_read_bytes(&self) -> (u64, u64) {
        (self.lending.bytes_lent, self.lending.bytes_read)
    }

    /// Sends a descriptor of `part`; `None` when no credit or slot is free
    /// now, or the window's worth of lent payloads awaits release.
    fn lend(&mut self, part: &[u8]) -> Result<Option<u64>, String> {
        let window = self.config.window as usize;
        if self.data_slot_start().is_none() || self.lending.outstanding >= window {
            return Ok(None);
        }
        let region = self.lending.region.as_ref().expect("a channel with a lending region registered it");
        let token = self.lending.next_token;
        let descriptor = Descriptor {
            address: part.as_ptr() as u64,
            bytes: u32::try_from(part.len()).map_err(|_| format!("a lent part of {} bytes", part.len()))?,
            rkey: region.rkey(),
            token,
        };
        self.lending.next_token += 1;
        self.lending.outstanding += 1;
        self.lending.bytes_lent += part.len() as u64;
        self.post_message(&descriptor.encode(), FLAG_LEND)?;
        self.messages_sent += 1;
        Ok(Some(token))
    }

    /// The stream reached a lent payload: reads it into `into` (which the
    /// caller passes again, unchanged, until bytes come back), then hands
    /// the bytes over; 0 while the read is in flight.
    pub(super) fn read_lent(&mut self, descriptor: Descriptor, into: &mut [u8]) -> Result<usize, String> {
        let remaining = descriptor.bytes as usize - self.taken_of_first;
        let Some(read) = self.lending.awaited() else {
            let bytes = into.len().min(remaining);
            if bytes > 0 && self.lending.reads.len() < READS_AHEAD {
                self.post_read(descriptor, &mut into[..bytes], None)?;
            }
            return Ok(0);
        };
        if read.target != into.as_ptr() as usize || read.bytes > into.len() {
            return Err(format!(
                "the reader moved the buffer of a lent payload being read ({} bytes at {:#x}, now {} at {:p})",
                read.bytes,
                read.target,
                into.len(),
                into.as_ptr()
            ));
        }
        if !read.done {
            return Ok(0);
        }
        let bytes = read.bytes;
        self.lending.reads.pop_back();
        self.lending.bytes_read += bytes as u64;
        self.taken_of_first += bytes;
        if self.taken_of_first == descriptor.bytes as usize {
            self.lending.to_release.push(descriptor.token);
            self.release_first()?;
        }
        Ok(bytes)
    }

    /// The stream reached a lent payload, taken by a reader that lets it
    /// land: when it fits `into` whole, its read is posted and its bytes
    /// are handed over at once (the reader waits for `landed_through`); else
    /// it is read as [`Self::read_lent`] does. 0 while [`READS_AHEAD`] reads
    /// are in flight.
    pub(super) fn read_lent_landing(&mut self, descriptor: Descriptor, into: &mut [u8]) -> Result<usize, String> {
        let bytes = descriptor.bytes as usize;
        if self.taken_of_first > 0 || into.len() < bytes || self.lending.awaited().is_some() {
            return self.read_lent(descriptor, into);
        }
        if self.lending.reads.len() >= READS_AHEAD {
            return Ok(0);
        }
        self.post_read(descriptor, &mut into[..bytes], Some((self.taken_bytes, descriptor.token)))?;
        // The descriptor was decoded: its receive buffer goes back to the
        // peer now; the payload's token once the read completed.
        self.release_first()?;
        Ok(bytes)
    }

    fn post_read(
        &mut self,
        descriptor: Descriptor,
        into: &mut [u8],
        landing: Option<(u64, u64)>,
    ) -> Result<(), String> {
        let target = into.as_ptr() as usize;
        let (lkey, registered) = if self.config.lend.is_some_and(|region| region.contains(into)) {
            (self.lending.region.as_ref().expect("registered").lkey(), None)
        } else {
            // SAFETY: the caller keeps `into` alive and unmoved until the
            // read completes or the channel (and this region with it) is gone.
            let region = unsafe { self.pd.reg_mr(target, into.len(), AccessFlags::LocalWrite) }
                .map_err(|e| format!("cannot register {} bytes to read a lent payload into: {e}", into.len()))?;
            (region.lkey(), Some(region))
        };
        let remote = descriptor.address + self.taken_of_first as u64;
        let mut guard = self.qp.start_post_send();
        let handle = guard.construct_wr(READ_WR_ID, WorkRequestFlags::Signaled).setup_read(descriptor.rkey, remote);
        // SAFETY: `into` is registered (above) and stays untouched by the
        // caller until the read's completion hands it back.
        unsafe { handle.setup_sge(lkey, target as u64, into.len() as u32) };
        guard.post().map_err(|e| format!("posting the read of a lent payload failed: {e}"))?;
        self.lending.reads.push_back(Read { target, bytes: into.len(), done: false, landing, _registered: registered });
        Ok(())
    }

    /// The oldest read in flight completed (reads complete in posting
    /// order); completed landing reads at the front give their tokens back.
    pub(super) fn read_completed(&mut self) {
        let read = self.lending.reads.iter_mut().find(|read| !read.done);
        read.expect("a read completion for a read in flight").done = true;
        while let Some(&Read { done: true, landing: Some((_, token)), bytes, .. }) = self.lending.reads.front() {
            self.lending.reads.pop_front();
            self.lending.to_release.push(token);
            self.lending.bytes_read += bytes as u64;
        }
    }

    /// Tokens in a release message from the peer (`length` bytes at `start`
    /// of the channel's memory).
    pub(super) fn take_release_message(&mut self, start: usize, length: usize) -> Result<(), String> {
        if length == 0 || !length.is_multiple_of(8) {
            return Err(format!("a release message of {length} bytes: the channel is reset"));
        }
        let count = length / 8;
        if count > self.lending.outstanding {
            return Err(format!(
                "the peer released {count} lent payloads of {} outstanding: the channel is reset",
                self.lending.outstanding
            ));
        }
        self.lending.outstanding -= count;
        for token in self.memory[start..start + length].chunks_exact(8) {
            self.lending.released.push_back(u64::from_le_bytes(token.try_into().expect("8 bytes")));
        }
        Ok(())
    }

    /// Gives back the tokens of payloads read here, as one message (two
    /// credits needed, as for data: one stays for a grant).
    pub(super) fn send_releases(&mut self) -> Result<(), String> {
        // While reads are in flight, releases wait to go out together (one
        // small message, and one completion, for several payloads); the
        // last ones go once the reads are done, so none waits for traffic.
        let waiting = self.lending.to_release.len();
        if waiting == 0 || (waiting < RELEASE_BATCH && !self.lending.reads.is_empty()) {
            return Ok(());
        }
        let Some(start) = self.data_slot_start() else { return Ok(()) };
        let count = self.lending.to_release.len().min(self.config.message_bytes / 8);
        for (at, token) in self.lending.to_release.drain(..count).enumerate() {
            self.memory[start + at * 8..start + at * 8 + 8].copy_from_slice(&token.to_le_bytes());
        }
        self.post_slot(count * 8, FLAG_RELEASE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_round_trips_and_bad_ones_are_refused() {
        let descriptor = Descriptor { address: 0x7f00_1234_5000, bytes: 65_536, rkey: 0xabcd, token: 42 };
        assert_eq!(Descriptor::decode(&descriptor.encode()).unwrap(), descriptor);
        assert!(Descriptor::decode(&descriptor.encode()[..20]).unwrap_err().contains("20 bytes"));
        let empty = Descriptor { bytes: 0, ..descriptor };
        assert!(Descriptor::decode(&empty.encode()).unwrap_err().contains("0 bytes"));
    }
}
