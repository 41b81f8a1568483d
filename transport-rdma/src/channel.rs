//! A reliable-connected RDMA channel: rdma_cm sets it up; messages go by
//! SEND into receive buffers the peer posted and granted.
//!
//! Flow control is by credits, as SMB Direct does it: each side posts
//! `window` receive buffers and starts with `window` credits (buffers of the
//! peer it may fill). Every message carries the credits its sender grants
//! back (buffers it reposted since its last message). A data message needs
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

/// Bytes before each message's payload: granted credits (u16), flags
/// (u16), payload length (u32), little-endian.
pub const HEADER_BYTES: usize = 8;
const FLAG_CREDIT_ONLY: u16 = 1;
/// How long a waiting channel polls its completion queue before it sleeps
/// on the completion channel: busy while traffic flows, idle when it stops.
const BUSY_POLL_BUDGET: Duration = Duration::from_micros(50);
/// How often a connecting channel reads its rdma_cm events while it polls.
const EVENT_CHECK_INTERVAL: Duration = Duration::from_millis(10);
/// IBV_WC_RECV: receive completions have this opcode bit.
const WC_RECV: u32 = 1 << 7;

/// Sizes and limits of a channel (both ends must use the same).
#[derive(Debug, Clone, Copy)]
pub struct ChannelConfig {
    /// Largest payload of one message.
    pub message_bytes: usize,
    /// Receive buffers posted, and so credits granted at the start (≥ 4).
    pub window: u32,
    /// Longest wait for a credit, a message or a connection event.
    pub timeout: Duration,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self { message_bytes: 64 << 10, window: 32, timeout: Duration::from_secs(10) }
    }
}

impl ChannelConfig {
    fn slot_bytes(&self) -> usize {
        HEADER_BYTES + self.message_bytes
    }

    /// Registered bytes of one channel: `window` receive and send slots.
    #[must_use]
    pub fn registered_bytes(&self) -> u64 {
        2 * u64::from(self.window) * self.slot_bytes() as u64
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        if self.window < 4 || self.window > 4096 {
            return Err(format!("an RDMA channel window of {} buffers: use 4 to 4096", self.window));
        }
        if self.message_bytes == 0 || self.message_bytes > 16 << 20 {
            return Err(format!("RDMA messages of {} bytes: use 1 byte to 16 MiB", self.message_bytes));
        }
        crate::memlock::check(self.registered_bytes())
    }
}

/// One end of a connected channel.
pub struct RdmaChannel {
    /// Kept open while the channel's rdma_cm id lives on it (a channel that
    /// connected reads its events there; an accepted one shares its listener's).
    events: Arc<EventChannel>,
    id: Arc<Identifier>,
    qp: GenericQueuePair,
    cq: GenericCompletionQueue,
    basic_cq: Arc<BasicCompletionQueue>,
    completions: Arc<CompletionChannel>,
    _pd: Arc<ProtectionDomain>,
    mr: Arc<MemoryRegion>,
    /// `window` receive slots, then `window` send slots.
    memory: Box<[u8]>,
    config: ChannelConfig,
    credits: u32,
    owed: u32,
    free_send: Vec<u32>,
    /// Received messages not yet taken: their slot and length, and how much
    /// of the first one was taken already.
    received: VecDeque<(u32, usize)>,
    taken_of_first: usize,
    /// Blocking use only: messages copied out of their buffers while
    /// [`Self::send`] waited for a credit, so both ends waiting to send
    /// still grant each other their buffers.
    spilled: VecDeque<Vec<u8>>,
    /// Work completions of one poll (work request id, status, bytes, opcode).
    completed: Vec<(u64, u32, u32, u32)>,
    /// What rdma_cm said of the channel (a disconnect, its device removed).
    alarm: Alarm,
    /// A channel that connected reads its own events: when it does next.
    next_event_check: Option<Instant>,
    pub messages_sent: u64,
    pub credit_messages_sent: u64,
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
        let depth = config.window * 2 + 1;
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
            .setup_max_send_wr(config.window)
            .setup_max_recv_wr(config.window)
            .setup_max_send_sge(1)
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
        Ok(Self {
            events,
            id,
            qp,
            cq,
            basic_cq,
            completions,
            _pd: pd,
            mr,
            memory,
            config,
            credits: config.window,
            owed: 0,
            free_send: (0..config.window).collect(),
            received: VecDeque::new(),
            taken_of_first: 0,
            spilled: VecDeque::new(),
            completed: Vec::new(),
            alarm,
            next_event_check: None,
            messages_sent: 0,
            credit_messages_sent: 0,
        })
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

    fn slot_addr(&self, slot: u32) -> u64 {
        self.memory.as_ptr() as u64 + u64::from(slot) * self.config.slot_bytes() as u64
    }

    pub(crate) fn post_all_receives(&mut self) -> Result<(), String> {
        (0..self.config.window).try_for_each(|slot| self.post_receive(slot))
    }

    fn post_receive(&mut self, slot: u32) -> Result<(), String> {
        let (lkey, addr, length) = (self.mr.lkey(), self.slot_addr(slot), self.config.slot_bytes() as u32);
        let mut guard = self.qp.start_post_recv();
        let handle = guard.construct_wr(u64::from(slot));
        // SAFETY: the slot lies in the registered region and is not used
        // until its receive completes.
        unsafe { handle.setup_sge(lkey, addr, length) };
        guard.post().map_err(|e| format!("posting a receive failed: {e}"))
    }

    /// Sends one message of at most `message_bytes`, waiting for a credit.
    pub fn send(&mut self, payload: &[u8]) -> Result<(), String> {
        if payload.len() > self.config.message_bytes {
            return Err(format!(
                "a message of {} bytes exceeds the channel's {}",
                payload.len(),
                self.config.message_bytes
            ));
        }
        let deadline = Instant::now() + self.config.timeout;
        while self.credits < 2 || self.free_send.is_empty() {
            self.spill_received()?;
            if !self.poll()? && !self.wait_for_completion(deadline)? {
                return Err(format!("no credit from the peer for {:?} (it stopped reading)", self.config.timeout));
            }
        }
        self.post_message(payload, 0)?;
        self.messages_sent += 1;
        Ok(())
    }

    /// The next message (its payload), waiting for it.
    pub fn recv(&mut self) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + self.config.timeout;
        loop {
            if let Some(message) = self.spilled.pop_front() {
                return Ok(message);
            }
            if let Some(message) = self.take_first_message()? {
                return Ok(message);
            }
            if !self.poll()? && !self.wait_for_completion(deadline)? {
                return Err(format!("no message from the peer for {:?}", self.config.timeout));
            }
        }
    }

    /// Copies as much of `parts` (one after the other) as one message
    /// holds into a send slot and posts it; 0 when no credit or slot is
    /// free now (completions and grants arrive through [`Self::poll_into`]).
    pub fn try_send(&mut self, parts: &[&[u8]]) -> Result<usize, String> {
        if self.credits < 2 || self.free_send.is_empty() {
            return Ok(0);
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let length = total.min(self.config.message_bytes);
        if length == 0 {
            return Ok(0);
        }
        let slot = *self.free_send.last().expect("checked");
        let mut at = (self.config.window + slot) as usize * self.config.slot_bytes() + HEADER_BYTES;
        let mut left = length;
        for part in parts {
            let take = part.len().min(left);
            self.memory[at..at + take].copy_from_slice(&part[..take]);
            at += take;
            left -= take;
            if left == 0 {
                break;
            }
        }
        self.post_slot(length, 0)?;
        self.messages_sent += 1;
        Ok(length)
    }

    /// Takes completions, then copies received bytes (messages one after
    /// the other, as a stream) into `into`; returns how many. A message's
    /// buffer is posted again (and so granted) once it is taken whole.
    pub fn poll_into(&mut self, into: &mut [u8]) -> Result<usize, String> {
        self.poll()?;
        let mut copied = 0;
        while let Some(&(slot, length)) = self.received.front() {
            let take = (length - self.taken_of_first).min(into.len() - copied);
            if take == 0 {
                break;
            }
            let start = slot as usize * self.config.slot_bytes() + HEADER_BYTES + self.taken_of_first;
            into[copied..copied + take].copy_from_slice(&self.memory[start..start + take]);
            copied += take;
            self.taken_of_first += take;
            if self.taken_of_first == length {
                self.release_first()?;
            }
        }
        if copied > 0 {
            // Grants for the buffers just freed go out without waiting for data.
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

    /// Copies every received message out of its buffer (which is granted back).
    fn spill_received(&mut self) -> Result<(), String> {
        while let Some(message) = self.take_first_message()? {
            self.spilled.push_back(message);
        }
        self.grant_if_owed()
    }

    /// What is left of the first received message, copied out; its buffer
    /// is posted again and granted back.
    fn take_first_message(&mut self) -> Result<Option<Vec<u8>>, String> {
        let Some(&(slot, length)) = self.received.front() else { return Ok(None) };
        let start = slot as usize * self.config.slot_bytes() + HEADER_BYTES + self.taken_of_first;
        let message = self.memory[start..start + length - self.taken_of_first].to_vec();
        self.release_first()?;
        Ok(Some(message))
    }

    /// The first received message was taken whole: its buffer is posted
    /// again and granted back.
    fn release_first(&mut self) -> Result<(), String> {
        let (slot, _) = self.received.pop_front().expect("a message to release");
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

    fn post_message(&mut self, payload: &[u8], flags: u16) -> Result<(), String> {
        let slot = *self.free_send.last().expect("a free send slot");
        let start = (self.config.window + slot) as usize * self.config.slot_bytes() + HEADER_BYTES;
        self.memory[start..start + payload.len()].copy_from_slice(payload);
        self.post_slot(payload.len(), flags)
    }

    /// Posts the last free send slot, whose payload (`length` bytes) is in
    /// place, with its header: the grant owed and the flags.
    fn post_slot(&mut self, length: usize, flags: u16) -> Result<(), String> {
        assert!(self.credits >= 1, "a message is sent only into a buffer the peer granted");
        let slot = self.free_send.pop().expect("a free send slot");
        let grant = u16::try_from(self.owed).expect("the window is at most 4096");
        let start = (self.config.window + slot) as usize * self.config.slot_bytes();
        let buf = &mut self.memory[start..start + HEADER_BYTES];
        buf[..2].copy_from_slice(&grant.to_le_bytes());
        buf[2..4].copy_from_slice(&flags.to_le_bytes());
        buf[4..8].copy_from_slice(&(length as u32).to_le_bytes());
        self.owed = 0;
        self.credits -= 1;
        let (lkey, addr) = (self.mr.lkey(), self.slot_addr(self.config.window + slot));
        let mut guard = self.qp.start_post_send();
        let handle = guard.construct_wr(u64::from(self.config.window + slot), WorkRequestFlags::Signaled).setup_send();
        // SAFETY: the send slot lies in the registered region and stays
        // untouched until its completion returns it to `free_send`.
        unsafe { handle.setup_sge(lkey, addr, (HEADER_BYTES + length) as u32) };
        guard.post().map_err(|e| format!("posting a send failed: {e}"))
    }

    /// The completion channel's descriptor: readable when a completion
    /// arrived after [`Self::wait_for_completion`] armed it (for a caller that
    /// sleeps in its own event loop, io_uring on a core).
    #[must_use]
    pub fn completion_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&*self.completions)
    }

    /// Waits for the next completion until `deadline`: polls for a short
    /// budget, then arms the completion queue and sleeps on the channel.
    /// False when the deadline passed.
    fn wait_for_completion(&mut self, deadline: Instant) -> Result<bool, String> {
        let busy_until = Instant::now() + BUSY_POLL_BUDGET;
        while Instant::now() < busy_until {
            if self.poll()? {
                return Ok(true);
            }
            std::hint::spin_loop();
        }
        // A completion may have come between the last poll and arming.
        if !self.arm()? {
            return Ok(true);
        }
        let timeout_ms = deadline.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128) as i32;
        let mut pollfd = libc::pollfd { fd: self.completion_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            return match error.kind() {
                std::io::ErrorKind::Interrupted => Ok(true),
                _ => Err(format!("waiting on the completion channel failed: {error}")),
            };
        }
        if ready == 0 {
            return Ok(Instant::now() < deadline);
        }
        self.notified();
        Ok(true)
    }

    /// Takes every completion: received messages (their grants, their
    /// payloads, their buffers posted again) and finished sends. True when
    /// there was any.
    fn poll(&mut self) -> Result<bool, String> {
        self.check_connection()?;
        // Reused between polls: a busy-polling core allocates nothing here.
        let mut done = std::mem::take(&mut self.completed);
        done.clear();
        if let Ok(poller) = self.cq.start_poll() {
            for wc in poller {
                done.push((wc.wr_id(), wc.status(), wc.byte_len(), wc.opcode()));
            }
        }
        for &(wr_id, status, byte_len, opcode) in &done {
            if status != 0 {
                let meaning = completion_status_meaning(status);
                return Err(format!(
                    "RDMA work request {wr_id} completed with status {status} ({meaning}): the channel is closed"
                ));
            }
            let slot = wr_id as u32;
            if opcode & WC_RECV == 0 {
                assert!(slot >= self.config.window, "send completion {wr_id} (opcode {opcode}) names a send slot");
                self.free_send.push(slot - self.config.window);
                continue;
            }
            assert!(slot < self.config.window, "receive completion {wr_id} names a receive slot");
            self.take_received(slot, byte_len as usize)?;
        }
        let any = !done.is_empty();
        self.completed = done;
        self.grant_if_owed()?;
        Ok(any)
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

    fn take_received(&mut self, slot: u32, byte_len: usize) -> Result<(), String> {
        let start = slot as usize * self.config.slot_bytes();
        let header = &self.memory[start..start + HEADER_BYTES];
        let grant = u16::from_le_bytes([header[0], header[1]]);
        let flags = u16::from_le_bytes([header[2], header[3]]);
        let length = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        if length > self.config.message_bytes || HEADER_BYTES + length != byte_len {
            return Err(format!("a malformed message ({byte_len} bytes, header says {length}): the channel is reset"));
        }
        self.credits += u32::from(grant);
        if self.credits > self.config.window {
            return Err(format!("the peer granted {} credits for a window of {}", self.credits, self.config.window));
        }
        if flags & FLAG_CREDIT_ONLY == 0 && length > 0 {
            // Kept in its buffer until taken: the grant waits for the reader.
            self.received.push_back((slot, length));
        } else {
            self.post_receive(slot)?;
            self.owed += 1;
        }
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
