//! The simulator's faults (link drops, reconnections, duplicated frames,
//! crashes of either node) and the checks that follow them: the destination
//! holds a prefix of the acknowledged writes, in LSN order.

use super::*;

impl World {
    /// The destination took its snapshot `lsn`: it holds exactly the
    /// source's records before it, as the source's snapshot does.
    pub(super) fn check_destination_snapshot(&mut self, lsn: u64, volumes: &[Vec<u8>]) -> Result<(), String> {
        // After the LSN the source recovered to, the destination may hold
        // records the source lost (until the reconnection's rebase).
        if self.receiver.copy_to_persist() != CopyPosition::Done || self.recovered_lsn.is_some_and(|r| lsn > r) {
            return Ok(());
        }
        let expected = self.state_at(lsn - 1);
        if let Some(volume) = (0..volumes.len()).find(|&v| volumes[v] != expected[v]) {
            return Err(format!(
                "the destination's snapshot at LSN {lsn}: volume {volume} is not the source's state at LSN {}",
                lsn - 1
            ));
        }
        if let Some(source) = self.source_snapshots.get(&lsn) {
            if source.as_slice() != volumes {
                return Err(format!("the snapshots at LSN {lsn} differ between the source and the destination"));
            }
        }
        self.stats.snapshots_checked += 1;
        Ok(())
    }

    pub(super) fn drop_link(&mut self) {
        self.pending_rebase = None;
        self.rebase_persisting = false;
        if self.link.take().is_some() {
            self.stats.drops += 1;
            self.source.core.peer_lost();
        }
    }

    /// The handshake of the daemons: the destination says what it holds.
    pub(super) fn connect(&mut self) -> Result<(), String> {
        let snapshot = self.destination.core.snapshot();
        let (durable, next) = (snapshot.durable_lsn, self.destination.core.last_taken_lsn() + 1);
        // As the daemon's Resume: the destination lists what it holds after
        // the LSN the source recovered to (few ranges, to widen them).
        let diverged =
            self.recovered_lsn.filter(|&lsn| next - 1 > lsn).map(|lsn| (lsn, self.unconfirmed.held_after(lsn, 2)));
        if diverged.is_some() {
            self.stats.diverged_reconnects += 1;
        }
        self.source
            .core
            .peer_connected(durable, next, self.receiver.copy_position(), diverged)
            .map_err(|e| format!("reconnection refused: {e}"))?;
        self.receiver.connected(next);
        self.reconnect_hold_until = None;
        self.payloads.clear();
        self.link = Some(Link {
            id: self.next_link_id,
            barrier_lsn: 0,
            to_destination: VecDeque::new(),
            to_source: VecDeque::new(),
        });
        self.next_link_id += 1;
        self.stats.connections += 1;
        Ok(())
    }

    pub(super) fn duplicate_a_frame(&mut self) {
        let Some(link) = self.link.as_mut() else { return };
        if let Some(frame @ Frame::Record { .. }) = link.to_destination.front().cloned() {
            link.to_destination.push_front(frame);
        }
    }

    pub(super) fn crash_source(&mut self) -> Result<(), String> {
        self.stats.source_crashes += 1;
        self.drop_link();
        self.reconnect_hold_until = None;
        self.chunk_reads.clear();
        self.source.lose_power(&mut self.rng);
        let floor = self.source.superblock.tail_lsn - 1;
        let outcome = self.source.recover(Some(floor))?;
        self.recovered_lsn = Some(self.recovered_lsn.map_or(outcome.last_lsn, |lsn| lsn.min(outcome.last_lsn)));
        let mut config = self.peer_config.clone();
        config.copy_complete = self.source.superblock.copy == Some(CopyPosition::Done);
        self.source.core.attach_peer(config);
        let bitmap = DirtyBitmap::from_bytes(REGION_BYTES, volume_sizes(), &self.source.bitmap_area);
        self.source.core.set_bitmap(bitmap);
        self.in_flight.clear();
        self.busy.clear();
        // The source's own volumes hold every write it acknowledged.
        for volume in 0..VOLUMES as u8 {
            for sector in 0..VOLUME_SECTORS {
                let data = self.source.visible(volume, sector * SECTOR as u64, SECTOR);
                self.model.check(key(volume, sector), &data).map_err(|e| format!("source after power loss: {e}"))?;
            }
        }
        Ok(())
    }

    pub(super) fn crash_destination(&mut self) -> Result<(), String> {
        self.stats.destination_crashes += 1;
        self.drop_link();
        self.destination.lose_power(&mut self.rng);
        let checkpoint_lsn = self.destination.superblock.checkpoint_lsn;
        let outcome = self.destination.recover(None)?;
        self.unconfirmed = UnconfirmedRecords::new(
            checkpoint_lsn,
            outcome
                .scanned
                .iter()
                .filter(|r| r.lsn > checkpoint_lsn)
                .map(|r| (r.lsn, (r.volume_index, r.offset, u64::from(r.length)))),
        );
        self.destination.core.set_apply_after_durable(true);
        let copy = self.destination.superblock.copy.unwrap_or(CopyPosition::At { volume_index: 0, offset: 0 });
        self.receiver = Receiver::new(volume_sizes(), copy);
        self.payloads.clear();
        self.pending_rebase = None;
        self.rebase_persisting = false;
        // Records after the LSN the source recovered to may be ones it lost:
        // the destination is the source's state only up to there, until the
        // reconnection copies those ranges again.
        let diverged = self.recovered_lsn.is_some_and(|lsn| outcome.last_lsn > lsn);
        if copy == CopyPosition::Done && !diverged {
            self.check_prefix(outcome.last_lsn)?;
            if self.mode == ReplicationMode::Sync {
                for volume in 0..VOLUMES as u8 {
                    for sector in 0..VOLUME_SECTORS {
                        let data = self.destination.visible(volume, sector * SECTOR as u64, SECTOR);
                        self.vouched
                            .check(key(volume, sector), &data)
                            .map_err(|e| format!("sync mode lost an acknowledged write on the destination: {e}"))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The destination's volumes are the source's initial content plus
    /// exactly the source's records up to `last_lsn`, in LSN order.
    /// The source's volumes after LSN `lsn`: the initial content and every
    /// record up to it, in LSN order.
    pub(super) fn state_at(&self, lsn: u64) -> Vec<Vec<u8>> {
        let mut state = self.initial.clone();
        for (header, payload) in self.history.range(..=lsn).map(|(_, r)| r) {
            let volume = &mut state[usize::from(header.volume_index)];
            let start = header.offset as usize;
            match header.record_kind() {
                RecordKind::Write => volume[start..start + payload.len()].copy_from_slice(payload),
                RecordKind::Trim | RecordKind::WriteZeroes => {
                    volume[start..start + header.length as usize].fill(0);
                }
                RecordKind::Pad | RecordKind::Snapshot => {}
            }
        }
        state
    }

    pub(super) fn check_prefix(&mut self, last_lsn: u64) -> Result<(), String> {
        self.stats.prefix_checks += 1;
        let expected = self.state_at(last_lsn);
        for (volume, expected) in expected.iter().enumerate() {
            let found = self.destination.visible(volume as u8, 0, expected.len());
            if let Some(sector) = (0..VOLUME_SECTORS as usize)
                .find(|s| found[s * SECTOR..(s + 1) * SECTOR] != expected[s * SECTOR..(s + 1) * SECTOR])
            {
                let describe = |data: &[u8]| crate::pattern::decode_block(data, key(volume as u8, sector as u64));
                let touching: Vec<u64> = self
                    .history
                    .range(..=last_lsn)
                    .filter(|(_, (h, _))| {
                        usize::from(h.volume_index) == volume
                            && h.offset as usize <= sector * SECTOR
                            && (h.offset + u64::from(h.length)) as usize > sector * SECTOR
                    })
                    .map(|(lsn, _)| *lsn)
                    .collect();
                return Err(format!(
                    "after recovery to LSN {last_lsn}, destination volume {volume} sector {sector} is not the source's state at that LSN: found {:?}, expected {:?}; records touching it: {touching:?}; history has {} records",
                    describe(&found[sector * SECTOR..(sector + 1) * SECTOR]),
                    describe(&expected[sector * SECTOR..(sector + 1) * SECTOR]),
                    self.history.len()
                ));
            }
        }
        Ok(())
    }

    /// The link ends for a planned reconnection (the daemon's return to
    /// RDMA): sync writes wait for the next link, or for the hold's timeout.
    pub(super) fn planned_reconnect(&mut self, step: usize) {
        if self.link.is_none() {
            return;
        }
        let hold_steps = self.rng.random_range(1..300);
        // A source restarted after a crash starts its clock at 0.
        self.source.core.handle(Event::Tick { now_ms: self.source_clock_ms });
        self.source.core.hold_writes_for_reconnect(hold_steps as u64);
        self.reconnect_hold_until = Some((step + hold_steps, self.source_clock_ms + hold_steps as u64));
        self.stats.planned_reconnects += 1;
        self.drop_link();
    }
}
