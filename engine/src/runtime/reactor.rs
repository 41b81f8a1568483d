//! The loop of one core: a pinned thread with its own io_uring, serving the
//! groups it owns and their client connections. Messages from the control plane
//! arrive on a crossbeam channel; an eventfd read on the ring wakes the loop.

use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use io_uring::{opcode, types};
use slab::Slab;

use super::conn::Conn;
use super::events::{EngineEvent, EventKind};
use super::group_io::{Completion, GroupRt};
use super::io::{Io, Op};
use super::log_store::OpenGroup;
use super::partner::{DestinationState, PeerDefaults};
use super::peer_session::PeerSession;
use super::session::BlockSession;
use super::status::GroupStatus;
use crate::core::{Event, GroupConfig};
use tandem_proto::PartnershipEntry;

const TICK: Duration = Duration::from_millis(100);
const RING_ENTRIES: u32 = 1024;

/// A message to a core.
pub enum CoreMsg {
    /// Take ownership of an opened, recovered group.
    AttachGroup { group: Box<OpenGroup>, config: GroupConfig, peer_defaults: PeerDefaults },
    /// Make a standalone group a replication source; answers (once the
    /// superblock says so durably) with the LSN after which records are shipped.
    BecomeSource { group: String, entry: PartnershipEntry, reply: Sender<Result<u64, String>> },
    /// Make an idle standalone group the destination of a source whose stream
    /// continues after `baseline_lsn`; answers once durable.
    BecomeDestination { group: String, entry: PartnershipEntry, baseline_lsn: u64, reply: Sender<Result<(), String>> },
    /// What a destination group holds, for a connecting source.
    /// What a destination holds, for a source that recovered up to
    /// `recovered_lsn` since it was last connected.
    DestinationState { group: String, recovered_lsn: Option<u64>, reply: Sender<Option<DestinationState>> },
    /// Serve the replication connection of a group (either side); a source
    /// checks the destination's state first.
    AttachPeer {
        group: String,
        /// The session's data channels, in channel order.
        channels: Vec<super::peer_conn::PeerChannel>,
        /// The destination's durable LSN, next LSN and copy position.
        source_view: Option<crate::runtime::SourceView>,
        reply: Sender<Result<(), String>>,
    },
    /// End a group's partnership on this node; answers once durable.
    LeavePartnership { group: String, reply: Sender<Result<(), String>> },
    /// Serve a client connection (past its handshake) on `group`'s volume.
    AttachConnection { group: String, volume_index: u8, stream: TcpStream, session: Box<dyn BlockSession> },
    /// Report every group's status.
    Status { reply: Sender<Vec<GroupStatus>> },
    /// Change a group's group-commit limits (records per log write, log
    /// writes in flight) while it runs; answers with the previous values.
    SetBatching {
        group: String,
        max_batch_records: usize,
        max_inflight_appends: usize,
        reply: Sender<Result<(usize, usize), String>>,
    },
    /// Start an online verify pass of a source group (rate in bytes per second).
    StartVerify { group: String, rate_bytes_per_s: u64, repair: bool, reply: Sender<Result<(), String>> },
    /// Promote a destination whose source is gone: `reply` hears what it
    /// found, `persisted` once the new role is durable.
    Promote {
        group: String,
        reply: Sender<Result<super::promote::PromotionReport, String>>,
        persisted: Sender<Result<(), String>>,
    },
    /// Set a partnership's network constraint on this side; answers once durable.
    SetChannelPolicy {
        group: String,
        network: [u8; 64],
        encryption: u32,
        transport: u32,
        reply: Sender<Result<(), String>>,
    },
    /// Change a partnership's mode (`MODE_SYNC` / `MODE_ASYNC`); answers once durable.
    SetMode { group: String, mode: u32, reply: Sender<Result<(), String>> },
    /// Close the group's connections, drain, checkpoint and release its files.
    DetachGroup { group: String, reply: Sender<Result<(), String>> },
    /// Start a test failover of a destination group: a copy-on-write
    /// snapshot in `path`, at most `max_bytes`; answers its LSN once in force.
    StartTestFailover { group: String, path: std::path::PathBuf, max_bytes: u64, reply: Sender<Result<u64, String>> },
    /// End a group's test failover, discarding what it wrote.
    StopTestFailover { group: String, reply: Sender<Result<(), String>> },
    /// A test client's request on the snapshot of `volume_index`.
    TestFailoverIo {
        group: String,
        volume_index: u8,
        op: super::test_failover::SnapshotOp,
        reply: Sender<Result<Vec<u8>, String>>,
    },
    /// Write a Snapshot record named `name` into a source's (or standalone
    /// group's) log; answers its LSN once the snapshot is taken here.
    TakeSnapshot { group: String, name: String, reply: Sender<Result<u64, String>> },
    /// Delete a group's snapshot `name`.
    DeleteSnapshot { group: String, name: String, reply: Sender<Result<super::snapshots::SnapshotInfo, String>> },
    /// Bytes of a volume as snapshot `name` holds them (read-only exports).
    ReadSnapshot { group: String, name: String, range: (u8, u64, u32), reply: Sender<Result<Vec<u8>, String>> },
    /// Fence a source whose destination was promoted after `after_lsn`
    /// (`None` lifts it); answers once durable.
    SetFence { group: String, after_lsn: Option<u64>, reply: Sender<Result<(), String>> },
    /// End a source group's replication session so that it reconnects
    /// (its transport changes); sync writes wait for the next session for
    /// at most `hold` rather than complete on this log alone.
    EndSession { group: String, reason: String, hold: Duration, reply: Sender<Result<(), String>> },
    /// Disconnect every client of a group (a planned switch: its exports
    /// turn read-only first, so clients come back read-only).
    CloseClients { group: String, reason: String, reply: Sender<Result<(), String>> },
    /// Detach every group and stop the thread.
    Shutdown,
}

/// The control plane's handle on a core thread.
pub struct CoreHandle {
    pub index: usize,
    tx: Sender<CoreMsg>,
    wake: Arc<OwnedFd>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl CoreHandle {
    /// Starts core `index`, pinned to `cpu`; it reports events on `events`
    /// (RPO above `target_rpo_ms` among them; 0 turns that check off).
    pub fn spawn(index: usize, cpu: usize, events: Sender<EngineEvent>, target_rpo_ms: u64) -> std::io::Result<Self> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor owned by nobody else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let (tx, rx) = crossbeam_channel::unbounded();
        let io = Io::new(RING_ENTRIES)?;
        let wake_for_thread = Arc::clone(&wake);
        let thread = std::thread::Builder::new().name(format!("tandem-core-{index}")).spawn(move || {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                tracing::warn!(core = index, cpu, "could not pin the core thread to its CPU; it runs unpinned");
            }
            Reactor::new(io, rx, wake_for_thread, events, target_rpo_ms).run();
        })?;
        Ok(Self { index, tx, wake, thread: std::sync::Mutex::new(Some(thread)) })
    }

    /// Sends a message and wakes the core.
    pub fn send(&self, msg: CoreMsg) {
        if self.tx.send(msg).is_ok() {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writing 8 bytes to an eventfd we own.
            unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }

    /// Stops the core after detaching its groups (checkpointed) and waits.
    pub fn shutdown(&self) {
        self.send(CoreMsg::Shutdown);
        let thread = self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

struct Detach {
    group: usize,
    reply: Option<Sender<Result<(), String>>>,
}

struct Reactor {
    io: Io,
    inbox: Receiver<CoreMsg>,
    wake: Arc<OwnedFd>,
    groups: Vec<Option<GroupRt>>,
    conns: Slab<Conn>,
    peers: Slab<PeerSession>,
    next_conn_id: u64,
    pending_destinations: Vec<PendingDestination>,
    peer_defaults: PeerDefaults,
    events: Sender<EngineEvent>,
    target_rpo_ms: u64,
    started: Instant,
    detaches: Vec<Detach>,
    shutting_down: bool,
    completions: Vec<Completion>,
}

impl Reactor {
    fn new(
        io: Io,
        inbox: Receiver<CoreMsg>,
        wake: Arc<OwnedFd>,
        events: Sender<EngineEvent>,
        target_rpo_ms: u64,
    ) -> Self {
        Self {
            io,
            inbox,
            wake,
            groups: Vec::new(),
            conns: Slab::new(),
            peers: Slab::new(),
            next_conn_id: 1,
            pending_destinations: Vec::new(),
            peer_defaults: PeerDefaults::default(),
            events,
            target_rpo_ms,
            started: Instant::now(),
            detaches: Vec::new(),
            shutting_down: false,
            completions: Vec::new(),
        }
    }

    fn run(mut self) {
        self.arm_wake();
        self.arm_timer();
        loop {
            self.drain_inbox();
            self.take_peer_frames();
            self.pump_groups();
            self.dispatch_group_io();
            self.progress_connections();
            self.progress_peers();
            self.progress_detaches();
            self.progress_pending_destinations();
            for (index, slot) in self.groups.iter_mut().enumerate() {
                if let Some(rt) = slot.as_mut().filter(|rt| rt.test_failover_pending.is_some()) {
                    rt.progress_test_failover(&mut self.io, index);
                }
            }
            if self.shutting_down && self.groups.iter().all(Option::is_none) {
                break;
            }
            self.io.push_last();
            match self.io.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => panic!("io_uring submit_and_wait failed: {e}"),
            }
            self.reap();
        }
    }

    fn arm_wake(&mut self) {
        let fd = types::Fd(self.wake.as_raw_fd());
        self.io.submit(Op::Wake { buf: Box::new([0; 8]) }, |op| {
            let Op::Wake { buf } = op else { unreachable!() };
            opcode::Read::new(fd, buf.as_mut_ptr(), 8).build()
        });
    }

    fn arm_timer(&mut self) {
        let timespec = Box::new(types::Timespec::new().sec(TICK.as_secs()).nsec(TICK.subsec_nanos()));
        self.io.submit(Op::Timer { timespec }, |op| {
            let Op::Timer { timespec } = op else { unreachable!() };
            opcode::Timeout::new(&**timespec).build()
        });
    }

    fn reap(&mut self) {
        let finished: Vec<(u64, i32)> = self.io.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())).collect();
        for (key, result) in finished {
            let op = self.io.ops.remove(key as usize);
            self.dispatch(op, result);
        }
    }

    fn dispatch(&mut self, op: Op, result: i32) {
        match op {
            Op::Wake { .. } => self.arm_wake(),
            Op::LinkTimeout { .. } => {}
            Op::Timer { .. } => {
                let now_ms = self.started.elapsed().as_millis() as u64;
                for group in self.groups.iter_mut().flatten() {
                    group.core.handle(Event::Tick { now_ms });
                }
                self.tick_peers();
                self.report_events();
                self.arm_timer();
            }
            Op::LogWrite { group, batch_id, expected_bytes, .. } => {
                self.group(group).log_write_done(batch_id, result, expected_bytes);
            }
            Op::Apply { group, apply, done } => {
                let rt = self.groups[group].as_mut().expect("group of an op in flight");
                rt.apply_done(&mut self.io, group, apply, done, result);
            }
            Op::Fsync { group } => {
                let rt = self.groups[group].as_mut().expect("group of an op in flight");
                rt.fsync_done(&mut self.io, group, result);
            }
            Op::SuperblockWrite { group, .. } => self.group(group).finish_checkpoint(result),
            Op::VolumeRead(read) => {
                let connection = &mut self.conns[read.conn];
                let rt = self.groups[connection.group].as_mut().expect("group of a connection");
                connection.read_done(rt, &mut self.io, read, result);
            }
            Op::Recv { conn } => {
                let connection = &mut self.conns[conn];
                let rt = self.groups[connection.group].as_mut().expect("group of a connection");
                connection.recv_done(result, rt, &mut self.io, conn);
            }
            Op::Send { conn, chunks, .. } => self.conns[conn].send_done(chunks, result),
            Op::PeerRecv { peer, channel } => self.peers[peer].recv_done(channel, result),
            Op::PeerPoll { peer, channel } => self.peers[peer].poll_done(channel),
            Op::PeerSend { peer, channel, frames, .. } => self.peers[peer].send_done(channel, frames, result),
            Op::LogRead { group, slot, lsn, buf } => self.group(group).log_read_done(slot, lsn, buf, result),
            Op::ChunkRead { group, slot, chunk, buf } => self.group(group).chunk_read_done(slot, chunk, buf, result),
            Op::CompareRead { group, read, buf } => {
                let rt = self.group(group);
                if let Err(reason) = rt.compare_read_done(&read, &buf, result) {
                    tracing::error!(group = %rt.name, %reason, "comparison read failed");
                    rt.close_peer = true;
                }
            }
            Op::BitmapWrite { group, buf, spilled_up_to_lsn } => {
                self.group(group).bitmap_write_done(spilled_up_to_lsn, buf.len(), result);
            }
            Op::CopyWrite { group, end, buf, .. } => {
                let rt = self.group(group);
                if let Err(reason) = rt.copy_write_done(end, buf.map(|b| b.len()), result) {
                    tracing::error!(group = %rt.name, %reason, "initial copy write failed");
                    rt.close_peer = true;
                }
            }
        }
    }

    fn group(&mut self, index: usize) -> &mut GroupRt {
        self.groups[index].as_mut().expect("group of an op in flight")
    }

    fn report_events(&mut self) {
        for group in self.groups.iter_mut().flatten() {
            for kind in group.observe(self.target_rpo_ms) {
                let _ = self.events.send(EngineEvent { group: group.name.clone(), kind });
            }
        }
    }

    /// Hands the groups' IO of this round (log appends first) to the kernel
    /// before the round's sends are queued behind it. The kernel runs a
    /// batch in order and holds its block IO in a plug until the whole
    /// batch was issued, and a send on a local socket runs the receiver's
    /// TCP processing inline: a log append queued with the round's client
    /// replies and record ships reached the disk only after all of them.
    fn dispatch_group_io(&mut self) {
        if !self.io.ring.submission().is_empty() {
            self.io.ring.submit().expect("io_uring submit failed");
        }
    }

    fn pump_groups(&mut self) {
        for (index, group) in self.groups.iter_mut().enumerate() {
            if let Some(group) = group {
                group.pump(&mut self.io, index, &mut self.completions);
            }
        }
        for completion in self.completions.drain(..) {
            match self.conns.get_mut(completion.conn) {
                Some(conn) if conn.id == completion.conn_id => {
                    conn.write_done(completion.cookie, completion.payload_bytes, completion.result);
                }
                _ => unreachable!("a connection stays until its writes complete"),
            }
        }
    }

    fn progress_connections(&mut self) {
        let mut closed = Vec::new();
        for (key, conn) in &mut self.conns {
            if conn.can_close() {
                closed.push(key);
                continue;
            }
            if let Some(group) = self.groups[conn.group].as_mut() {
                conn.resume(group, &mut self.io, key);
            }
            conn.post_io(&mut self.io, key);
        }
        for key in closed {
            let conn = self.conns.remove(key);
            if let Some(group) = self.groups[conn.group].as_mut() {
                group.connections -= 1;
            }
            tracing::info!(peer = conn.peer(), "client disconnected");
        }
    }

    fn start_detach(&mut self, index: usize, reply: Option<Sender<Result<(), String>>>) {
        let group = self.groups[index].as_mut().expect("detaching a present group");
        group.detaching = true;
        group.core.handle(Event::CheckpointRequested);
        for (_, conn) in &mut self.conns {
            if conn.group == index {
                conn.close("group is being detached");
            }
        }
        self.close_group_peers(index, "group is being detached");
        self.detaches.push(Detach { group: index, reply });
    }

    /// A detaching group is released once its connections are gone, nothing is
    /// in flight and every record is checkpointed into the volumes (or, for a
    /// failed group, once nothing is in flight).
    fn progress_detaches(&mut self) {
        let mut index = 0;
        while index < self.detaches.len() {
            let slot = self.detaches[index].group;
            let group = self.groups[slot].as_mut().expect("detaching group is present");
            let drained =
                group.connections == 0 && group.core.is_idle() && !self.peers.iter().any(|(_, p)| p.group == slot);
            let done = drained && (group.core.failure().is_some() || group.core.is_fully_checkpointed());
            if drained && !done {
                group.core.handle(Event::CheckpointRequested);
            }
            if done {
                let group = self.groups[slot].take().expect("present");
                tracing::info!(group = %group.name, "group detached; volumes are checkpointed");
                // The reply lets the caller reopen or wipe the devices: close
                // them first, so an exclusive claim of a block device is free.
                drop(group);
                let detach = self.detaches.swap_remove(index);
                if let Some(reply) = detach.reply {
                    let _ = reply.send(Ok(()));
                }
            } else {
                index += 1;
            }
        }
    }
}

#[path = "reactor_peers.rs"]
mod peers;
use peers::PendingDestination;

#[path = "reactor_inbox.rs"]
mod inbox;
