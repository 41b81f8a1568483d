//! Unplanned promotion of a destination whose source is gone: the group
//! leaves the partnership, starts a new generation (recorded in its
//! superblock's history with the first LSN written under it) and serves
//! writes. What the source had and this node lacks is reported as the RPO at
//! promotion. The old source, when it returns, finds no destination to
//! resume and writes nothing here.

use crossbeam_channel::Sender;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tandem_proto::{GenerationEntry, ROLE_DESTINATION};

use super::group_io::GroupRt;

/// What a promotion found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionReport {
    /// The last of the source's LSNs this node holds.
    pub last_lsn: u64,
    /// The highest LSN the source said it held durably (heartbeats, records).
    pub source_last_known_lsn: u64,
    /// Records the source held that never arrived here (at least this many:
    /// later ones the source wrote after contact was lost are unknown here).
    pub records_missing: u64,
    /// The initial copy was complete: the volumes are a consistent image.
    pub copy_complete: bool,
    /// Milliseconds since anything arrived from the source (none: never
    /// since this daemon started): what it wrote in that time is not here.
    #[serde(default)]
    pub source_silent_ms: Option<u64>,
}

impl GroupRt {
    /// Promotes this destination (refused while its source is connected);
    /// `persisted` hears once the superblock holds the new role.
    pub fn promote(&mut self, persisted: Sender<Result<(), String>>) -> Result<PromotionReport, String> {
        let report = self.promotion_report()?;
        let next_lsn = self.core.last_taken_lsn() + 1;
        let generation: [u8; 16] = rand::rng().random();
        let history = &mut self.superblock.generation_history;
        let used = history.iter().position(|g| g.generation == [0; 16]).unwrap_or(history.len());
        if used == history.len() {
            history.rotate_left(1);
        }
        history[used.min(history.len() - 1)] = GenerationEntry { generation, first_lsn: next_lsn, reserved: 0 };
        self.superblock.generation = generation;
        // A returning source of this partnership learns it was promoted.
        self.superblock.promoted_from = self.superblock.partnership.id;
        self.superblock.promoted_after_lsn = report.last_lsn;
        self.leave_partnership();
        self.persist_then_reply(persisted);
        Ok(report)
    }

    fn promotion_report(&self) -> Result<PromotionReport, String> {
        if self.superblock.role != ROLE_DESTINATION {
            return Err(format!(
                "group {} is not a replication destination; only a destination is promoted",
                self.name
            ));
        }
        let link = self.destination.as_ref().expect("a destination has its link");
        if link.conn.is_some() {
            return Err(format!(
                "the source of {} is connected: promoting now would fork the group while both sides write; remove the partnership on the source (or wait until it is lost) first",
                self.name
            ));
        }
        let last_lsn = self.core.last_taken_lsn();
        Ok(PromotionReport {
            last_lsn,
            source_last_known_lsn: link.source_durable_lsn.max(last_lsn),
            records_missing: link.source_durable_lsn.saturating_sub(last_lsn),
            copy_complete: link.receiver.copy_complete(),
            source_silent_ms: link.last_heard.map(|at| at.elapsed().as_millis() as u64),
        })
    }
}
