//! The simulated network between the two nodes: frames queued on the link,
//! delivered in order (or dropped with the link), and heartbeats.

use super::*;

impl World {
    pub(super) fn send_to_destination(&mut self, frame: Frame) {
        if let Some(link) = self.link.as_mut() {
            link.to_destination.push_back(frame);
        }
    }

    /// Runs both nodes and the receiver until nothing new comes out.
    /// The source's progress heartbeat; once connected (and its
    /// destination continues after the LSN it recovered to), the source
    /// forgets that LSN and announces its durable LSN in full.
    pub(super) fn send_heartbeat(&mut self) {
        if self.link.is_none() {
            return;
        }
        if !self.source.core.rebase_pending() {
            self.recovered_lsn = None;
        }
        let durable = self.source.core.snapshot().durable_lsn;
        let lsn = self.recovered_lsn.map_or(durable, |recovered| durable.min(recovered));
        self.send_to_destination(Frame::Heartbeat { lsn });
    }

    pub(super) fn deliver_to_destination(&mut self) {
        let Some(frame) = self.link.as_mut().and_then(|l| l.to_destination.pop_front()) else { return };
        let mut payload = |data: Vec<u8>| {
            let id = self.next_payload_id;
            self.next_payload_id += 1;
            self.payloads.insert(id, data);
            id
        };
        let incoming = match frame {
            Frame::Heartbeat { lsn } => {
                self.unconfirmed.source_durable(lsn);
                return;
            }
            Frame::Record { header, payload: data } => {
                let payload_id = header.record_kind().has_payload().then(|| payload(data));
                Incoming::Record { header, payload_id }
            }
            Frame::Copy { volume, offset, length, data } => {
                Incoming::Copy { volume_index: volume, offset, length, payload_id: data.map(payload) }
            }
            Frame::CopyDone => Incoming::CopyDone,
            Frame::Rebase { lsn } => Incoming::Rebase { lsn },
            Frame::Barrier { lsn } => Incoming::Barrier { lsn },
            Frame::Ack { .. } => unreachable!("acks travel to the source"),
        };
        self.receiver.push(incoming);
    }

    pub(super) fn deliver_to_source(&mut self) -> Result<(), String> {
        let Some(frame) = self.link.as_mut().and_then(|l| l.to_source.pop_front()) else { return Ok(()) };
        let Frame::Ack { lsn, copy, rebased } = frame else { unreachable!("only acks travel to the source") };
        if self.source.core.rebase_pending() && !rebased {
            // As the daemon: it describes the log before the rebase.
            return Ok(());
        }
        let current = self.source.core.snapshot().current_lsn;
        if lsn > current {
            return Err(format!("the destination acknowledged LSN {lsn} beyond the source's {current}"));
        }
        self.source.core.peer_acknowledged(lsn, copy);
        Ok(())
    }
}
