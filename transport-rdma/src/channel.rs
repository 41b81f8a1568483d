//! A reliable-connected RDMA channel: rdma_cm sets it up; messages go by
//! SEND into receive buffers the peer posted and granted.
//!
//! Flow control is by credits, as SMB Direct does it: each side posts
//! `window` receive buffers and starts with `window` credits (buffers of the
//! peer it may fill). Every message carries the credits its sender grants
//! back (buffers it reposted since its last message) in the SEND's
//! immediate data, so a message of N payload bytes is N bytes on the wire
//! (a 4 KiB message fills four 1 KiB RoCE packets, not five). A data message needs
//! two credits, so one always stays for a credit-only message: two sides
//! that both ran out while owing each other grants can still tell each
//! other. A credit-only message is sent when half the window is owed and
//! nothing else is going out, so grants never wait for data. Nothing is
//! ever sent into an unposted buffer, so there is no RNR retry storm. A
//! receive buffer is posted again (and granted) only once its message was
//! taken, so a reader that stops stops its writer instead of queueing.
//!
//! Two ways to use a channel: blocking [`RdmaChannel::send`] and
//! [`RdmaChannel::recv`] (handshakes, tests), or the non-blocking byte
//! stream of [`RdmaChannel::try_send`], [`RdmaChannel::poll_into`] and
//! [`RdmaChannel::arm`] that a core's event loop drives.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionChannel, CompletionQueue, GenericCompletionQueue};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    GenericQueuePair, PostSendGuard, QueuePair, QueuePairState, SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;
use sideway::rdmacm::communication_manager::{EventChannel, Identifier};

use crate::connection::Alarm;

mod blocking;
mod lend;
use crate::ChannelConfig;
use lend::{Descriptor, Lending, READS_AHEAD, READ_WR_ID};

/// A message's immediate data (sent in network byte order): the credits
/// it grants in the low 16 bits, flags in the high 16. Its length is the
/// completion's byte count.
const FLAG_CREDIT_ONLY: u16 = 1;
/// The message is a descriptor of a lent payload (`lend.rs`).
const FLAG_LEND: u16 = 2;
/// The message gives back tokens of lent payloads read.
const FLAG_RELEASE: u16 = 4;
/// IBV_WC_WITH_IMM: the completion carries immediate data.
const WC_WITH_IMM: u32 = 2;
/// Work completions taken per ibv_poll_cq call.
const POLL_BATCH: usize = 16;
/// How long a waiting channel polls its completion queue before it sleeps
/// on the completion channel: busy while traffic flows, idle when it stops.
const BUSY_POLL_BUDGET: Duration = Duration::from_micros(50);
/// How often a connecting channel reads its rdma_cm events while it polls.
const EVENT_CHECK_INTERVAL: Duration = Duration::from_millis(10);
/// IBV_WC_RECV: receive completions have this opcode bit.
const WC_RECV: u32 = 1 << 7;

/// One end of a connected channel.
pub struct RdmaChannel {
    /// Kept open while the channel's rdma_cm id lives on it (a channel that
    /// connected reads its events there; an accepted one shares its listener's).
    events: Arc<EventChannel>,
    id: Arc<Identifier>,
    qp: GenericQueuePair,
    basic_cq: Arc<BasicCompletionQueue>,
    completions: Arc<CompletionChannel>,
    pd: Arc<ProtectionDomain>,
    mr: Arc<MemoryRegion>,
    /// `window` receive slots, then `window` send slots.
    memory: Box<[u8]>,
    config: ChannelConfig,
    credits: u32,
    owed: u32,
    free_send: Vec<u32>,
    /// Send slots posted and not yet known complete, in posting order. Only
    /// some sends ask for a completion (see [`Self::completion_wanted`]); on
    /// a reliable connection one completion means every earlier send is done.
    sending: VecDeque<u32>,
    /// Sends posted since the last one that asked for a completion.
    unsignaled_run: u32,
    /// Received messages not yet taken, and how much of the first one (of
    /// its payload, or of the payload it lends) was taken already.
    received: VecDeque<Received>,
    taken_of_first: usize,
    /// Blocking use only: messages copied out of their buffers while
    /// [`Self::send`] waited for a credit, so both ends waiting to send
    /// still grant each other their buffers.
    spilled: VecDeque<Vec<u8>>,
    /// Work completions of one poll, reused (a busy-polling core allocates
    /// nothing per poll).
    completed: Vec<rdma_mummy_sys::ibv_wc>,
    /// What rdma_cm said of the channel (a disconnect, its device removed).
    alarm: Alarm,
    /// A channel that connected reads its own events: when it does next.
    next_event_check: Option<Instant>,
    /// Why the channel ended, kept while the messages that arrived before
    /// the end are still being taken.
    ended: Option<String>,
    /// Payloads lent and read (`lend.rs`).
    lending: Lending,
    /// Bytes of the stream handed to the reader so far (copied, or being
    /// read into its buffer: see [`Self::poll_into_landing`]).
    pub(super) taken_bytes: u64,
    pub messages_sent: u64,
    pub credit_messages_sent: u64,
}

/// A received message waiting in its receive slot.
#[derive(Clone, Copy)]
struct Received {
    slot: u32,
    length: usize,
    /// The payload the message lends, to be read in its place.
    lent: Option<Descriptor>,
}

impl RdmaChannel {
    /// Opens a channel to a listener at `address`.
    pub fn connect(address: SocketAddr, config: ChannelConfig) -> Result<Self, String> {
        config.check()?;
        crate::connection::connect(address, config)
    }

    pub(crate) fn new(events: Arc<EventChannel>, id: Arc<Identifier>, config: ChannelConfig) -> Result<Self, String> {
        let alarm = Alarm::default();
        id.setup_context(alarm.clone());
        let context = id.get_device_context().ok_or("the rdma_cm id has no device")?;
        let pd = context.alloc_pd().map_err(|e| format!("cannot allocate a protection domain: {e}"))?;
        // Every slot's completion, and the reads of lent payloads.
        let depth = config.window * 2 + 2 + READS_AHEAD as u32;
        let completions =
            context.create_comp_channel().map_err(|e| format!("cannot create a completion channel: {e}"))?;
        completions.set_nonblocking(true).map_err(|e| format!("completion channel: {e}"))?;
        let basic_cq = context
            .create_cq_builder()
            .setup_cqe(depth)
            .setup_comp_channel(&completions, 0)
            .build()
            .map_err(|e| format!("cannot create a completion queue of {depth}: {e}"))?;
        let cq = GenericCompletionQueue::from(Arc::clone(&basic_cq));
        let qp = pd
            .create_qp_builder()
            .setup_max_send_wr(config.window + 1 + READS_AHEAD as u32)
            .setup_max_recv_wr(config.window)
            // A gathered send: slot bytes, the caller's part, slot bytes.
            .setup_max_send_sge(3)
            .setup_max_recv_sge(1)
            .setup_send_cq(cq.clone())
            .setup_recv_cq(cq.clone())
            // Basic queue pair and completion queue (ibv_post_send,
            // ibv_poll_cq): with the extended ones of sideway 0.4 on rxe,
            // send completions came back with work request id 0.
            .build()
            .map_err(|e| format!("cannot create a queue pair: {e}"))?
            .into();
        let bytes = config.registered_bytes() as usize;
        let memory = vec![0u8; bytes].into_boxed_slice();
        // SAFETY: `memory` is owned by the channel and outlives the region
        // (fields drop in order: the region is dropped with the channel, and
        // the boxed slice never moves its heap allocation).
        let mr = unsafe { pd.reg_mr(memory.as_ptr() as usize, bytes, AccessFlags::LocalWrite) }
            .map_err(|e| format!("cannot register {bytes} bytes for RDMA: {e} (see `ulimit -l`)"))?;
        let mut lending = Lending::new(config.window as usize);
        if let Some(region) = config.lend {
            let access = AccessFlags::LocalWrite | AccessFlags::RemoteRead;
            // SAFETY: the lending region (the engine's arena) is mapped for
            // the life of the process.
            let registered = unsafe { pd.reg_mr(region.address, region.bytes, access) }.map_err(|e| {
                format!(
                    "cannot register the {} bytes of the lending region for RDMA: {e} (see `ulimit -l`)",
                    region.bytes
                )
            })?;
            lending.region = Some(registered);
        }
        Ok(Self {
            events,
            id,
            qp,
            basic_cq,
            completions,
            pd,
            mr,
            memory,
            config,
            credits: config.window,
            owed: 0,
            free_send: (0..config.window).collect(),
            sending: VecDeque::with_capacity(config.window as usize),
            unsignaled_run: 0,
            received: VecDeque::new(),
            taken_of_first: 0,
            spilled: VecDeque::new(),
            // SAFETY: ibv_wc is plain data; all zeroes is a valid value.
            completed: vec![unsafe { std::mem::zeroed() }; POLL_BATCH],
            alarm,
            next_event_check: None,
            ended: None,
            lending,
            taken_bytes: 0,
            messages_sent: 0,
            credit_messages_sent: 0,
        })
    }

    /// Credits, slots and lending of the channel, for the message of a stall.
    #[must_use]
    pub fn flow_control_state(&self) -> String {
        let lending = &self.lending;
        format!(
            "credits {}, owed {}, free send slots {}, sends in flight {}, messages waiting {}, \
             lent unread {}, releases waiting {} in and {} out, reads in flight {}",
            self.credits,
            self.owed,
            self.free_send.len(),
            self.sending.len(),
            self.received.len(),
            lending.outstanding,
            lending.released.len(),
            lending.to_release.len(),
            lending.reads.iter().filter(|read| !read.done).count()
        )
    }

    pub(crate) fn id(&self) -> &Arc<Identifier> {
        &self.id
    }

    pub(crate) fn qp_number(&self) -> u32 {
        self.qp.qp_number()
    }

    /// The channel reads its own (non-blocking) rdma_cm event channel at its
    /// polls, at most every [`EVENT_CHECK_INTERVAL`].
    pub(crate) fn watch_own_events(&mut self) {
        self.next_event_check = Some(Instant::now());
    }

    /// The queue pair through INIT, RTR and RTS with rdma_cm's attributes.
    pub(crate) fn make_ready(&mut self) -> Result<(), String> {
        for state in [QueuePairState::Init, QueuePairState::ReadyToReceive, QueuePairState::ReadyToSend] {
            let attr = self.id.get_qp_attr(state).map_err(|e| format!("queue pair attributes for {state:?}: {e}"))?;
            self.qp.modify(&attr).map_err(|e| format!("queue pair to {state:?}: {e}"))?;
        }
        Ok(())
    }

    /// Where slot `slot` starts in the channel's memory (receive slots
    /// 0 .. window, then send slots window .. 2 x window).
    fn slot_start(&self, slot: u32) -> usize {
        slot as usize * self.config.message_bytes
    }

    fn slot_addr(&self, slot: u32) -> u64 {
        self.memory.as_ptr() as u64 + self.slot_start(slot) as u64
    }

    /// Where the send slot of the next data message starts, when one may
    /// go now: a send slot is free and two credits are left (one always
    /// stays for a credit-only message).
    fn data_slot_start(&self) -> Option<usize> {
        let slot = *self.free_send.last()?;
        (self.credits >= 2).then(|| self.slot_start(self.config.window + slot))
    }

    pub(crate) fn post_all_receives(&mut self) -> Result<(), String> {
        (0..self.config.window).try_for_each(|slot| self.post_receive(slot))
    }

    fn post_receive(&mut self, slot: u32) -> Result<(), String> {
        let (lkey, addr, length) = (self.mr.lkey(), self.slot_addr(slot), self.config.message_bytes as u32);
        let mut guard = self.qp.start_post_recv();
        let handle = guard.construct_wr(u64::from(slot));
        // SAFETY: the slot lies in the registered region and is not used
        // until its receive completes.
        unsafe { handle.setup_sge(lkey, addr, length) };
        guard.post().map_err(|e| format!("posting a receive failed: {e}"))
    }

    /// Copies as much of `parts` (one after the other) as one message
    /// holds into a send slot and posts it; 0 when no credit or slot is
    /// free now (completions and grants arrive through [`Self::poll_into`]).
    pub fn try_send(&mut self, parts: &[&[u8]]) -> Result<usize, String> {
        let Some(start) = self.data_slot_start() else { return Ok(0) };
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let length = total.min(self.config.message_bytes);
        if length == 0 {
            return Ok(0);
        }
        self.copy_into_slot(start, parts, length);
        self.post_slot(length, 0)?;
        self.messages_sent += 1;
        Ok(length)
    }

    /// Takes completions, then copies received bytes (messages one after
    /// the other, as a stream) into `into`; returns how many. A message's
    /// buffer is posted again (and so granted) once it is taken whole.
    pub fn poll_into(&mut self, into: &mut [u8]) -> Result<usize, String> {
        self.poll_stream(into, false)
    }

    pub(super) fn poll_stream(&mut self, into: &mut [u8], landing: bool) -> Result<usize, String> {
        self.poll()?;
        let mut copied = 0;
        while let Some(&Received { slot, length, lent }) = self.received.front() {
            if let Some(descriptor) = lent {
                // A lent payload is handed over alone, once read (or once
                // its landing read is posted).
                if copied == 0 {
                    copied = if landing {
                        self.read_lent_landing(descriptor, into)?
                    } else {
                        self.read_lent(descriptor, into)?
                    };
                }
                break;
            }
            let take = (length - self.taken_of_first).min(into.len() - copied);
            if take == 0 {
                break;
            }
            let start = self.slot_start(slot) + self.taken_of_first;
            into[copied..copied + take].copy_from_slice(&self.memory[start..start + take]);
            copied += take;
            self.taken_of_first += take;
            if self.taken_of_first == length {
                self.release_first()?;
            }
        }
        self.taken_bytes += copied as u64;
        if copied > 0 {
            // Grants for the buffers just freed (and releases of payloads
            // read) go out without waiting for data.
            self.send_releases()?;
            self.grant_if_owed()?;
        }
        Ok(copied)
    }

    /// Arms the completion queue so that [`Self::completion_fd`] becomes
    /// readable at the next completion. False when completions came
    /// meanwhile (poll again instead of sleeping).
    pub fn arm(&mut self) -> Result<bool, String> {
        // SAFETY: the completion queue lives as long as the channel.
        let cq = unsafe { self.basic_cq.cq() }.as_ptr();
        // SAFETY: arming a live completion queue for its next completion.
        if unsafe { rdma_mummy_sys::ibv_req_notify_cq(cq, 0) } != 0 {
            return Err("cannot arm the completion queue".to_owned());
        }
        let before = self.received.len();
        let any = self.poll()?;
        Ok(!any && self.received.len() == before)
    }

    /// Takes the completion channel's event after [`Self::completion_fd`]
    /// became readable (nothing when there is none).
    pub fn notified(&mut self) {
        let mut event_cq = std::ptr::null_mut();
        let mut context = std::ptr::null_mut();
        // SAFETY: the channel is non-blocking; an event names our queue and
        // is acknowledged at once (one event per arming).
        unsafe {
            let channel = self.completions.comp_channel().as_ptr();
            if rdma_mummy_sys::ibv_get_cq_event(channel, &mut event_cq, &mut context) == 0 {
                rdma_mummy_sys::ibv_ack_cq_events(event_cq, 1);
            }
        }
    }

    /// Disconnects: the queue pair goes to the error state and every work
    /// request still posted completes (flushed), which wakes a sleeper.
    pub fn disconnect(&mut self) {
        let _ = self.id.disconnect();
    }

    /// The first received message was taken whole: its buffer is posted
    /// again and granted back.
    fn release_first(&mut self) -> Result<(), String> {
        let slot = self.received.pop_front().expect("a message to release").slot;
        self.taken_of_first = 0;
        self.post_receive(slot)?;
        self.owed += 1;
        Ok(())
    }

    fn grant_if_owed(&mut self) -> Result<(), String> {
        if self.owed >= self.config.window / 2 && self.credits >= 1 && !self.free_send.is_empty() {
            self.post_slot(0, FLAG_CREDIT_ONLY)?;
            self.credit_messages_sent += 1;
        }
        Ok(())
    }

    /// Copies `parts`, one after the other, to `at` in the channel's memory,
    /// at most `room` bytes; how many.
    pub(super) fn copy_into_slot(&mut self, mut at: usize, parts: &[&[u8]], room: usize) -> usize {
        let mut copied = 0;
        for part in parts {
            let take = part.len().min(room - copied);
            self.memory[at..at + take].copy_from_slice(&part[..take]);
            (at, copied) = (at + take, copied + take);
        }
        copied
    }

    fn post_message(&mut self, payload: &[u8], flags: u16) -> Result<(), String> {
        let slot = *self.free_send.last().expect("a free send slot");
        let start = self.slot_start(self.config.window + slot);
        self.copy_into_slot(start, &[payload], payload.len());
        self.post_slot(payload.len(), flags)
    }

    /// Posts the last free send slot, whose payload (`length` bytes) is in
    /// place, with the grant owed and the flags as immediate data.
    fn post_slot(&mut self, length: usize, flags: u16) -> Result<(), String> {
        self.post_slot_gathering(&[(0, length)], None, flags).map(|_| ())
    }

    /// Posts the last free send slot as one message: the ranges of the slot
    /// (`(offset, length)`, in order) with `gathered` (a registered part of
    /// the caller's, sent from where it lies) after the first range. Returns
    /// the slot.
    fn post_slot_gathering(
        &mut self,
        ranges: &[(usize, usize)],
        gathered: Option<rdma_mummy_sys::ibv_sge>,
        flags: u16,
    ) -> Result<u32, String> {
        assert!(self.credits >= 1, "a message is sent only into a buffer the peer granted");
        let slot = self.free_send.pop().expect("a free send slot");
        let grant = u16::try_from(self.owed).expect("the window is at most 4096");
        let immediate = (u32::from(grant) | u32::from(flags) << 16).to_be();
        self.owed = 0;
        self.credits -= 1;
        let (lkey, addr) = (self.mr.lkey(), self.slot_addr(self.config.window + slot));
        // A gathered part's owner waits for this send's own completion.
        let wr_flags = self.completion_wanted(gathered.is_some());
        self.sending.push_back(slot);
        // A credit-only message has no scatter/gather entry: zero bytes and
        // its immediate data.
        let slot_sge = |&(offset, length): &(usize, usize)| rdma_mummy_sys::ibv_sge {
            addr: addr + offset as u64,
            length: length as u32,
            lkey,
        };
        let mut sges = [slot_sge(&(0, 0)); 3];
        let mut count = 0;
        let (first, rest) = ranges.split_first().expect("a range of the slot");
        let entries = std::iter::once(slot_sge(first)).chain(gathered).chain(rest.iter().map(slot_sge));
        for sge in entries.filter(|sge| sge.length > 0) {
            sges[count] = sge;
            count += 1;
        }
        let mut guard = self.qp.start_post_send();
        let handle = guard.construct_wr(u64::from(self.config.window + slot), wr_flags).setup_send_imm(immediate);
        // SAFETY: the send slot lies in the registered region and stays
        // untouched until a completion (its own or a later send's) returns
        // it to `free_send`; a gathered part lies in the registered lending
        // region and its owner keeps it until that completion releases it.
        unsafe { handle.setup_sge_list(&sges[..count]) };
        guard.post().map_err(|e| format!("posting a send failed: {e}"))?;
        Ok(slot)
    }

    /// Whether the send being posted (its slot already taken from
    /// `free_send`) asks for a completion: every quarter window, and every
    /// send once half the slots are in flight, so that a sender short of
    /// slots always has a completion coming that frees them. Fewer
    /// completions are less work for the device and the poller (perftest's
    /// latency tests ask for one in 100).
    fn completion_wanted(&mut self, always: bool) -> WorkRequestFlags {
        self.unsignaled_run += 1;
        if always
            || self.unsignaled_run >= self.config.window / 4
            || self.free_send.len() < self.config.window as usize / 2
        {
            self.unsignaled_run = 0;
            WorkRequestFlags::Signaled
        } else {
            WorkRequestFlags::none()
        }
    }

    /// The completion channel's descriptor: readable when a completion
    /// arrived after [`Self::wait_for_completion`] armed it (for a caller that
    /// sleeps in its own event loop, io_uring on a core).
    #[must_use]
    pub fn completion_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&*self.completions)
    }

    /// Takes every completion: received messages (their grants, their
    /// payloads, their buffers posted again) and finished sends. True when
    /// there was any.
    fn poll(&mut self) -> Result<bool, String> {
        if let Some(reason) = &self.ended {
            return Err(reason.clone());
        }
        let mut any = false;
        if let Err(reason) = self.take_completions(&mut any).and_then(|()| self.check_connection()) {
            // A peer may close right after its last send: what arrived
            // before the end is delivered first, and the next poll reports
            // the end.
            self.ended = Some(reason.clone());
            return if any { Ok(true) } else { Err(reason) };
        }
        self.send_releases()?;
        self.grant_if_owed()?;
        Ok(any)
    }

    /// Takes every work completion waiting in the queue; `any` says whether
    /// there was one.
    fn take_completions(&mut self, any: &mut bool) -> Result<(), String> {
        loop {
            let count = self.poll_batch()?;
            *any |= count > 0;
            for index in 0..count {
                self.take_completion(index)?;
            }
            if count < POLL_BATCH {
                return Ok(());
            }
        }
    }

    /// Fills `completed` with up to [`POLL_BATCH`] work completions; how many.
    fn poll_batch(&mut self) -> Result<usize, String> {
        // SAFETY: the completion queue lives as long as the channel, and
        // `completed` holds POLL_BATCH entries for the call to fill.
        let count = unsafe {
            rdma_mummy_sys::ibv_poll_cq(self.basic_cq.cq().as_ptr(), POLL_BATCH as i32, self.completed.as_mut_ptr())
        };
        usize::try_from(count).map_err(|_| format!("polling the completion queue failed (error {count})"))
    }

    /// One work completion of the last batch: a finished send frees its
    /// slot; a received message is taken (its grant, its payload).
    fn take_completion(&mut self, index: usize) -> Result<(), String> {
        let wc = self.completed[index];
        let (wr_id, status, byte_len, opcode) = (wc.wr_id, wc.status, wc.byte_len, wc.opcode);
        if status != 0 {
            let meaning = completion_status_meaning(status);
            return Err(format!(
                "RDMA work request {wr_id} completed with status {status} ({meaning}): the channel is closed"
            ));
        }
        let slot = wr_id as u32;
        if wr_id == READ_WR_ID {
            self.read_completed();
            return Ok(());
        }
        if opcode & WC_RECV == 0 {
            assert!(slot >= self.config.window, "send completion {wr_id} (opcode {opcode}) names a send slot");
            self.sends_completed_through(slot - self.config.window);
            return Ok(());
        }
        assert!(slot < self.config.window, "receive completion {wr_id} names a receive slot");
        if wc.wc_flags & WC_WITH_IMM == 0 {
            return Err(format!("a message of {byte_len} bytes without immediate data: the channel is reset"));
        }
        // SAFETY: the completion carries immediate data (checked above).
        let immediate = u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data });
        self.take_received(slot, byte_len as usize, immediate)
    }

    /// A send completed: it and every send posted before it free their slots.
    fn sends_completed_through(&mut self, slot: u32) {
        assert!(self.sending.contains(&slot), "send completion for slot {slot}, which is not in flight");
        while let Some(done) = self.sending.pop_front() {
            self.free_send.push(done);
            self.send_completed(done);
            if done == slot {
                break;
            }
        }
    }

    /// Fails once rdma_cm said the channel ended (its own events are read
    /// here, now and then, for a channel that connected).
    fn check_connection(&mut self) -> Result<(), String> {
        if let Some(next) = self.next_event_check {
            let now = Instant::now();
            if now >= next {
                self.next_event_check = Some(now + EVENT_CHECK_INTERVAL);
                crate::connection::drain_events(&self.events);
            }
        }
        self.alarm.check()
    }

    fn take_received(&mut self, slot: u32, length: usize, immediate: u32) -> Result<(), String> {
        let grant = immediate as u16;
        let flags = (immediate >> 16) as u16;
        if length > self.config.message_bytes {
            return Err(format!(
                "a message of {length} bytes exceeds the channel's {}: the channel is reset",
                self.config.message_bytes
            ));
        }
        self.credits += u32::from(grant);
        if self.credits > self.config.window {
            return Err(format!("the peer granted {} credits for a window of {}", self.credits, self.config.window));
        }
        let start = self.slot_start(slot);
        if flags & FLAG_RELEASE != 0 {
            self.take_release_message(start, length)?;
        } else if flags & FLAG_CREDIT_ONLY == 0 && length > 0 {
            // Kept in its buffer until taken (a lent payload: until read):
            // the grant waits for the reader.
            let lent = (flags & FLAG_LEND != 0)
                .then(|| Descriptor::decode(&self.memory[start..start + length]))
                .transpose()?;
            self.received.push_back(Received { slot, length, lent });
            return Ok(());
        }
        self.post_receive(slot)?;
        self.owed += 1;
        Ok(())
    }
}

/// What an error status of a work completion (`ibv_wc_status`) means.
fn completion_status_meaning(status: u32) -> &'static str {
    match status {
        4 => "a local protection error",
        5 => "flushed: the queue pair went to the error state, after a disconnect or a failure on the path",
        10 => "the peer refused the remote access",
        12 => "the transport retry count was exceeded: the peer or the path stopped answering",
        13 => "the receiver-not-ready retry count was exceeded",
        _ => "an error of the device or the path",
    }
}

impl Drop for RdmaChannel {
    fn drop(&mut self) {
        let _ = self.id.disconnect();
    }
}
