//! Partnership changes of a group on its core: becoming a source or a
//! destination, connecting, and removal. Each persists the superblock's role
//! and partnership through a checkpoint before it is answered.

use crate::core::{HeldAfter, UnconfirmedRecords};
use crossbeam_channel::Sender;
use tandem_proto::{PartnershipEntry, ROLE_DESTINATION, ROLE_SOURCE, ROLE_STANDALONE};

use super::group_io::GroupRt;
use super::replica_dest::DestinationLink;
use super::replica_source::SourceLink;
use crate::core::{CopyPosition, PeerConfig, ReplicationMode};

/// Settings of the source side that are not stored in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerDefaults {
    /// `on_peer_loss = "block"`: sync writes wait for the destination.
    pub hold_writes_when_lost: bool,
    pub copy_chunk_bytes: u32,
    /// Send and receive buffer of every replication socket.
    pub socket_buffer_bytes: u32,
    /// Background verify of a source: every this many seconds (0: off), at
    /// this rate (also the default rate of `tandem partnership verify`).
    pub verify_interval_seconds: u64,
    pub verify_rate_bytes_per_s: u64,
}

/// Rate of a verify pass unless told otherwise: well below a disk's, so
/// foreground IO keeps most of it.
pub const DEFAULT_VERIFY_RATE_BYTES_PER_S: u64 = 100 << 20;

impl Default for PeerDefaults {
    fn default() -> Self {
        Self {
            hold_writes_when_lost: false,
            copy_chunk_bytes: 1 << 20,
            socket_buffer_bytes: super::net::DEFAULT_SOCKET_BUFFER_BYTES,
            verify_interval_seconds: 0,
            verify_rate_bytes_per_s: DEFAULT_VERIFY_RATE_BYTES_PER_S,
        }
    }
}

/// Most ranges a destination reports as held beyond its source's
/// recovered LSN (wider ranges beyond that; see `UnconfirmedRecords`).
pub const MAX_HELD_RANGES: usize = 256;

/// What a source learned from its destination's answer when it resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceView {
    pub durable_lsn: u64,
    pub next_lsn: u64,
    pub copy: CopyPosition,
    /// The LSN this source said it recovered to, and what the destination
    /// holds after it (see `GroupCore::peer_connected`).
    pub diverged: Option<(u64, HeldAfter)>,
}

/// What a destination reports when its source connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationState {
    pub partnership_id: [u8; 16],
    pub durable_lsn: u64,
    /// The next LSN the destination takes (records up to it are in its log
    /// or on their way there).
    pub next_lsn: u64,
    pub copy: CopyPosition,
    pub connected: bool,
    /// Asked with the LSN its source recovered to: what it holds after it
    /// (`None` when it holds nothing after it).
    pub held_after: Option<HeldAfter>,
}

impl GroupRt {
    pub(super) fn peer_config(&self, defaults: PeerDefaults) -> PeerConfig {
        let mode = if self.superblock.partnership.mode == tandem_proto::MODE_SYNC {
            ReplicationMode::Sync
        } else {
            ReplicationMode::Async
        };
        PeerConfig {
            mode,
            hold_writes_when_lost: defaults.hold_writes_when_lost,
            copy_chunk_bytes: defaults.copy_chunk_bytes,
            volume_sizes_bytes: self.volumes.iter().map(|v| v.size_bytes).collect(),
            max_unacked_log_bytes: 64 << 20,
            max_unacked_copy_bytes: 16 << 20,
            copy_complete: self.superblock.partnership.copy_state == tandem_proto::COPY_DONE,
        }
    }

    /// Sets up the links a group's superblock calls for (at start-up).
    pub(super) fn restore_partnership(&mut self, defaults: PeerDefaults, unconfirmed: UnconfirmedRecords) {
        match self.superblock.role {
            ROLE_SOURCE => {
                self.core.attach_peer(self.peer_config(defaults));
                self.source = Some(SourceLink::default());
                match self.read_bitmap() {
                    Ok(Some(bitmap)) => self.core.set_bitmap(bitmap),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(group = %self.name, error = %e, "cannot read the dirty-region bitmap; a full log holds writes back")
                    }
                }
            }
            ROLE_DESTINATION => {
                let copy = CopyPosition::from_entry(&self.superblock.partnership);
                let sizes = self.volumes.iter().map(|v| v.size_bytes).collect();
                self.destination = Some(DestinationLink::new(sizes, copy, unconfirmed));
                self.core.set_apply_after_durable(true);
            }
            _ => {}
        }
    }

    /// Makes this group a source; answers with the LSN after which records
    /// are shipped (everything before it comes with the initial copy).
    pub fn become_source(&mut self, entry: PartnershipEntry, defaults: PeerDefaults) -> Result<u64, String> {
        if self.superblock.role != ROLE_STANDALONE {
            return Err(format!("group {} is already in a partnership", self.name));
        }
        self.superblock.role = ROLE_SOURCE;
        self.superblock.recovered_since_connect = 0;
        self.superblock.partnership = entry;
        // A promoted group replicating again (failback) is no longer waiting
        // for its old source to return.
        self.superblock.promoted_from = [0; 16];
        self.superblock.promoted_after_lsn = 0;
        let baseline_lsn = self.core.attach_peer(self.peer_config(defaults));
        self.source = Some(SourceLink::default());
        // Progress and events of an earlier partnership (a switch or a
        // failback) are not this one's.
        self.copy_bytes_read = 0;
        self.copy_bytes_skipped = 0;
        self.copy_started_at = None;
        self.copy_finished_at = None;
        self.compare_progress = crate::core::compare::CompareProgress::default();
        self.observer.new_partnership();
        if let Some(bitmap) = self.new_bitmap() {
            // A new partnership starts clean (the initial copy covers everything).
            self.core.set_bitmap(bitmap);
            self.core.clear_bitmap();
        }
        Ok(baseline_lsn)
    }

    fn new_bitmap(&self) -> Option<crate::core::DirtyBitmap> {
        let area = self.superblock.bitmap;
        (area.bytes > 0).then(|| {
            crate::core::DirtyBitmap::new(area.region_bytes, self.volumes.iter().map(|v| v.size_bytes).collect())
        })
    }

    /// The bitmap as the log device holds it (`None` for logs without one).
    fn read_bitmap(&self) -> std::io::Result<Option<crate::core::DirtyBitmap>> {
        let area = self.superblock.bitmap;
        if area.bytes == 0 {
            return Ok(None);
        }
        let mut buf = super::buf::AlignedBuf::zeroed(area.bytes as usize);
        super::device::read_exact_at(&self.log.file, &mut buf, area.offset)?;
        let sizes = self.volumes.iter().map(|v| v.size_bytes).collect();
        Ok(Some(crate::core::DirtyBitmap::from_bytes(area.region_bytes, sizes, &buf)))
    }

    /// A destination can take over its source's LSN sequence only with an
    /// empty, checkpointed log and no clients.
    #[must_use]
    pub fn ready_to_become_destination(&self) -> bool {
        self.connections == 0 && self.core.is_fully_checkpointed() && self.core.snapshot().log_used_bytes == 0
    }

    /// Makes this (ready) group a destination continuing at `baseline_lsn + 1`.
    /// A new epoch starts at the head, so no record of the earlier sequence
    /// can ever be mistaken for one of the source's.
    pub fn become_destination(&mut self, entry: PartnershipEntry, baseline_lsn: u64) {
        assert!(self.ready_to_become_destination(), "checked by the caller");
        self.superblock.role = ROLE_DESTINATION;
        self.superblock.partnership = entry;
        self.superblock.recovered_since_connect = 0;
        // A fenced old source failing back: the resync overwrites what
        // diverged; a promoted group whose old source won a split brain.
        self.superblock.fence = 0;
        self.superblock.fenced_after_lsn = 0;
        self.superblock.promoted_from = [0; 16];
        self.superblock.promoted_after_lsn = 0;
        self.superblock.epoch += 1;
        let head = self.core.head_position();
        self.superblock.epoch_start_position = head;
        self.core.rebase(baseline_lsn, self.superblock.epoch);
        let sizes = self.volumes.iter().map(|v| v.size_bytes).collect();
        // A planned switch hands over volumes already equal: no copy.
        let copy = if entry.copy_state == tandem_proto::COPY_DONE {
            CopyPosition::Done
        } else {
            CopyPosition::At { volume_index: 0, offset: 0 }
        };
        self.destination = Some(DestinationLink::new(sizes, copy, UnconfirmedRecords::new(baseline_lsn, [])));
        self.core.set_apply_after_durable(true);
    }

    /// Ends the partnership on this side (the connection is closed by the caller).
    pub fn leave_partnership(&mut self) {
        self.superblock.role = ROLE_STANDALONE;
        self.superblock.partnership = PartnershipEntry::default_zeroed();
        self.superblock.network_constraint = [0; 64];
        self.superblock.encryption = tandem_proto::ENCRYPTION_NONE;
        self.superblock.transport = tandem_proto::TRANSPORT_TCP;
        // A test failover belongs to the destination role.
        self.test_failover = None;
        self.core.detach_peer();
        self.source = None;
        self.destination = None;
    }

    /// What this destination tells a connecting source that recovered up
    /// to `recovered_lsn` (if it opened since it was last connected).
    #[must_use]
    pub fn destination_state(&self, recovered_lsn: Option<u64>) -> Option<DestinationState> {
        let link = self.destination.as_ref()?;
        let last_taken_lsn = self.core.last_taken_lsn();
        Some(DestinationState {
            partnership_id: self.superblock.partnership.id,
            durable_lsn: self.core.snapshot().durable_lsn,
            next_lsn: last_taken_lsn + 1,
            copy: link.receiver.copy_position(),
            connected: link.conn.is_some(),
            held_after: recovered_lsn
                .filter(|&lsn| last_taken_lsn > lsn)
                .map(|lsn| link.unconfirmed.held_after(lsn, MAX_HELD_RANGES)),
        })
    }

    /// Replies once the superblock with the current partnership is durable.
    /// Sets how the partnership's channels run on this side: the network
    /// constraint (an interface or local address; empty: none) and the
    /// encryption (`ENCRYPTION_*`) and the transport of its data channels
    /// (`TRANSPORT_*`); answers once it is durable.
    pub fn set_channel_policy(
        &mut self,
        network: [u8; 64],
        (encryption, transport): (u32, u32),
        reply: Sender<Result<(), String>>,
    ) {
        if self.superblock.role == ROLE_STANDALONE {
            let _ = reply.send(Err(format!("group {} is not in a partnership", self.name)));
            return;
        }
        self.superblock.network_constraint = network;
        self.superblock.encryption = encryption;
        self.superblock.transport = transport;
        self.persist_then_reply(reply);
    }

    /// Changes the partnership's mode (`MODE_SYNC` or `MODE_ASYNC`) now, and
    /// answers once the superblock holds it.
    pub fn set_partnership_mode(&mut self, mode: u32, reply: Sender<Result<(), String>>) {
        if self.superblock.role == ROLE_STANDALONE {
            let _ = reply.send(Err(format!("group {} is not in a partnership", self.name)));
            return;
        }
        self.superblock.partnership.mode = mode;
        let replication = if mode == tandem_proto::MODE_SYNC { ReplicationMode::Sync } else { ReplicationMode::Async };
        self.core.set_mode(replication);
        self.persist_then_reply(reply);
    }

    pub fn persist_partnership(&mut self, reply: Sender<Result<(), String>>) {
        self.persist_then_reply(reply);
    }
}

impl GroupRt {
    /// The partnership part of status (connection byte counts are added by
    /// the reactor, which owns the connection).
    #[must_use]
    pub fn partnership_status(&self) -> Option<super::status::PartnershipStatus> {
        let p = &self.superblock.partnership;
        let text = |field: &[u8]| tandem_proto::read_fixed_str(field).unwrap_or_default().to_owned();
        let snapshot = self.core.snapshot();
        let mut status = super::status::PartnershipStatus {
            id: p.id.iter().map(|b| format!("{b:02x}")).collect(),
            mode: if p.mode == tandem_proto::MODE_SYNC { "sync" } else { "async" }.to_owned(),
            channels: p.channels,
            network: text(&self.superblock.network_constraint),
            encryption: match self.superblock.encryption {
                tandem_proto::ENCRYPTION_AES_128_GCM => "aes-128-gcm",
                tandem_proto::ENCRYPTION_SIGN => "sign",
                _ => "none",
            }
            .to_owned(),
            transport: if self.superblock.transport == tandem_proto::TRANSPORT_RDMA { "rdma" } else { "tcp" }
                .to_owned(),
            frames_rejected: self.frames_rejected,
            diverged: Vec::new(),
            diverged_records: 0,
            recovered_lsn: self
                .superblock
                .recovered_lsn_since_connect()
                .filter(|_| self.superblock.role == ROLE_SOURCE),
            peer_node: text(&p.peer_node),
            peer_group: text(&p.peer_group),
            peer_address: text(&p.peer_address),
            current_lsn: snapshot.current_lsn,
            ..Default::default()
        };
        (status.diverged, status.diverged_records) = self.diverged();
        if let Some(link) = self.source.as_ref() {
            let peer_durable = self.core.peer_durable_lsn().unwrap_or(0);
            status.state = self.core.replication_state().map_or("", |s| s.name()).to_owned();
            status.connected = link.conn.is_some();
            status.destination_durable_lsn = peer_durable;
            status.destination_applied_lsn = self.core.peer_applied_lsn().unwrap_or(0);
            // Log bytes from the oldest record the destination lacks to the head.
            status.bytes_behind =
                self.core.retained().next().map_or(0, |first| self.core.head_position() - first.position);
            status.rpo_ms = link.rpo_ms(peer_durable, std::time::Instant::now());
            status.copy_remaining_bytes = self.core.copy_remaining_bytes();
            status.copy_bytes_sent = self.copy_bytes_read;
            status.copy_bytes_skipped = self.copy_bytes_skipped;
            status.sync = self.sync_progress(status.copy_remaining_bytes);
            status.verify = self.verify.status.clone();
            status.bitmap_dirty_bytes = self.core.bitmap_dirty_bytes();
            status.bitmap_spills = self.core.bitmap_spills();
            status.last_error.clone_from(&link.last_error);
            status.ack_round_trip_us_avg = link.ack_round_trip_us_avg;
            status.records_read_back = link.records_read_back;
            status.log_queue_length = snapshot.current_lsn.saturating_sub(peer_durable);
            status.log_queue_length_avg = link.log_queue_length_avg;
            status.recovery_records_shipped = link.recovery_records_shipped;
            status.replication_records_shipped = link.replication_records_shipped;
            status.last_recovery_elapsed_ms = link.last_recovery_elapsed_ms;
            status.last_in_sync_unix_ms = link.last_in_sync_unix_ms;
            status.last_out_of_sync_unix_ms = link.last_out_of_sync_unix_ms;
            if self.fenced_after_lsn().is_some() {
                // Both sides wrote after the promotion (split brain), or only
                // the promoted one did (this side just returned).
                let diverged = !status.diverged.is_empty() || status.diverged_records > 0;
                status.state = if diverged { "SplitBrain" } else { "PeerPromoted" }.to_owned();
            }
        } else if let Some(link) = self.destination.as_ref() {
            status.connected = link.conn.is_some();
            status.state = if status.connected { "Connected" } else { "WaitingForSource" }.to_owned();
            status.destination_durable_lsn = snapshot.durable_lsn;
            status.destination_applied_lsn = self.core.applied_prefix_lsn();
            status.source_durable_lsn = link.source_durable_lsn;
            status.copy_complete = link.receiver.copy_complete();
            status.compare_bytes_read = link.compare_bytes_read;
        } else {
            return None;
        }
        Some(status)
    }
}
