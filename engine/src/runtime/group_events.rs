//! Turns a group's state changes into events, observed on every tick of its
//! core: the partnership's state machine stays free of reporting concerns.

use std::time::Instant;

use super::events::EventKind;
use super::group_io::GroupRt;
use crate::core::ReplicationState;

/// What the observer saw last.
#[derive(Debug, Default)]
pub struct Observer {
    last_state: Option<ReplicationState>,
    destination_connected: bool,
    copy_started: Option<Instant>,
    copy_completed: bool,
    catch_up_started: Option<(Instant, u64)>,
    rpo_exceeded: bool,
    failure_reported: bool,
    spills_reported: u64,
    /// When regions were first seen marked in the bitmap (a catch-up is owed).
    bitmap_dirty_since: Option<Instant>,
}

impl Observer {
    /// A new partnership: its initial copy gets its own events.
    pub fn new_partnership(&mut self) {
        self.copy_started = None;
        self.copy_completed = false;
    }
}

impl GroupRt {
    /// Events since the last observation. `target_rpo_ms` = 0 disables the RPO check.
    pub fn observe(&mut self, target_rpo_ms: u64) -> Vec<EventKind> {
        if self.source.is_some() {
            self.observe_verify();
        }
        let mut events = std::mem::take(&mut self.pending_events);
        if let (Some(reason), false) = (self.core.failure(), self.observer.failure_reported) {
            self.observer.failure_reported = true;
            events.push(EventKind::GroupFailed { reason: reason.to_owned() });
        }
        if let (Some(started), None) = (self.copy_started_at, self.observer.copy_started) {
            self.observer.copy_started = Some(started);
            let total_bytes = self.volumes.iter().map(|v| v.size_bytes).sum();
            events.push(EventKind::InitialCopyStarted { total_bytes });
        }
        if let Some(link) = self.destination.as_ref() {
            let connected = link.conn.is_some();
            if connected != self.observer.destination_connected {
                self.observer.destination_connected = connected;
                let snapshot = self.core.snapshot();
                events.push(if connected {
                    EventKind::PeerConnected {
                        peer_durable_lsn: snapshot.durable_lsn,
                        current_lsn: snapshot.durable_lsn,
                    }
                } else {
                    EventKind::PeerLost { reason: "the source's connection ended".to_owned() }
                });
            }
        }
        let Some(status) = self.partnership_status().filter(|_| self.source.is_some()) else {
            self.observer.last_state = None;
            return events;
        };
        let state = self.core.replication_state();
        let in_sync = state == Some(ReplicationState::ContinuouslyReplicating) && status.bytes_behind == 0;
        if let Some(link) = self.source.as_mut() {
            link.observe_sync(in_sync);
            link.observe_queue(status.log_queue_length);
        }
        let previous = std::mem::replace(&mut self.observer.last_state, state);
        let now = Instant::now();
        if status.bitmap_spills > self.observer.spills_reported {
            self.observer.spills_reported = status.bitmap_spills;
            events.push(EventKind::BitmapSpill { dirty_bytes: status.bitmap_dirty_bytes });
        }
        // A catch-up may start and end between two observations: what counts
        // is that marked regions were seen and the bitmap is clear again.
        if status.bitmap_dirty_bytes > 0 && self.observer.bitmap_dirty_since.is_none() {
            self.observer.bitmap_dirty_since = Some(now);
        }
        if let (Some(since), 0) = (self.observer.bitmap_dirty_since, status.bitmap_dirty_bytes) {
            self.observer.bitmap_dirty_since = None;
            let elapsed_ms = now.duration_since(since).as_millis() as u64;
            events.push(EventKind::BitmapCatchUpCompleted { elapsed_ms });
        }
        if state != previous {
            self.transition(previous, state, &status, now, &mut events);
        }
        if target_rpo_ms > 0 {
            let exceeded = status.rpo_ms > target_rpo_ms;
            if exceeded != self.observer.rpo_exceeded {
                self.observer.rpo_exceeded = exceeded;
                events.push(if exceeded {
                    EventKind::RpoExceeded { rpo_ms: status.rpo_ms, target_rpo_ms, bytes_behind: status.bytes_behind }
                } else {
                    EventKind::RpoWithinTarget { rpo_ms: status.rpo_ms, target_rpo_ms }
                });
            }
        }
        events
    }

    fn transition(
        &mut self,
        previous: Option<ReplicationState>,
        state: Option<ReplicationState>,
        status: &super::status::PartnershipStatus,
        now: Instant,
        events: &mut Vec<EventKind>,
    ) {
        use ReplicationState::{ContinuouslyReplicating, Recovering, WaitingForDestination};
        if state == Some(WaitingForDestination) && previous.is_some() {
            let reason = status.last_error.clone().unwrap_or_else(|| "connection ended".to_owned());
            events.push(EventKind::PeerLost { reason });
        }
        if previous == Some(WaitingForDestination) && state.is_some() {
            events.push(EventKind::PeerConnected {
                peer_durable_lsn: status.destination_durable_lsn,
                current_lsn: status.current_lsn,
            });
            self.observer.catch_up_started = Some((now, status.destination_durable_lsn));
        }
        // The copy may start and finish between two observations.
        let copy_finished = matches!(state, Some(Recovering | ContinuouslyReplicating));
        if copy_finished && self.observer.copy_started.is_some() && !self.observer.copy_completed {
            self.observer.copy_completed = true;
            self.copy_finished_at = Some(now);
            let elapsed_ms = self.observer.copy_started.map_or(0, |t| now.duration_since(t).as_millis() as u64);
            events.push(EventKind::InitialCopyCompleted {
                bytes_sent: status.copy_bytes_sent,
                bytes_skipped: status.copy_bytes_skipped,
                elapsed_ms,
            });
        }
        if let (Some((started, from_lsn)), Some(ContinuouslyReplicating)) = (self.observer.catch_up_started, state) {
            self.observer.catch_up_started = None;
            let elapsed_ms = now.duration_since(started).as_millis() as u64;
            if let Some(link) = self.source.as_mut() {
                link.last_recovery_elapsed_ms = elapsed_ms;
            }
            events.push(EventKind::CatchUpCompleted {
                records: status.destination_durable_lsn.saturating_sub(from_lsn),
                elapsed_ms,
            });
        }
    }
}
