//! After an unplanned promotion, the old source must not take writes again:
//! when it learns that its destination was promoted after LSN L, it fences
//! itself (persisted in its superblock) and reports what it holds beyond L,
//! the diverged ranges: the records in its log after L (written here, never
//! received there) and the regions its dirty-region bitmap marks. Failback
//! then makes it the destination of the promoted group, and a compared
//! resync overwrites exactly what differs.

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};
use tandem_proto::{FENCE_PEER_PROMOTED, ROLE_SOURCE};

use super::group_io::GroupRt;

/// Most ranges status lists (merged; a bigger divergence says so).
const MAX_LISTED_RANGES: usize = 4096;

/// A range of a volume this group holds differently from the promoted side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DivergedRange {
    pub volume_index: u8,
    pub volume: String,
    pub offset: u64,
    pub length: u64,
}

impl GroupRt {
    /// Fences this source (its destination was promoted after `after_lsn`)
    /// or lifts the fence (`None`); answers once durable.
    pub fn set_fence(&mut self, after_lsn: Option<u64>, reply: Sender<Result<(), String>>) {
        match after_lsn {
            Some(lsn) => {
                if self.superblock.role != ROLE_SOURCE {
                    let _ = reply.send(Err(format!("group {} is not a source; only a source is fenced", self.name)));
                    return;
                }
                self.superblock.fence = FENCE_PEER_PROMOTED;
                self.superblock.fenced_after_lsn = lsn;
            }
            None => {
                self.superblock.fence = 0;
                self.superblock.fenced_after_lsn = 0;
            }
        }
        self.persist_then_reply(reply);
    }

    /// The LSN after which this fenced source diverged (none: not fenced).
    #[must_use]
    pub fn fenced_after_lsn(&self) -> Option<u64> {
        (self.superblock.fence == FENCE_PEER_PROMOTED).then_some(self.superblock.fenced_after_lsn)
    }

    /// What this fenced source holds beyond the promoted side: merged ranges
    /// (at most [`MAX_LISTED_RANGES`]) and the number of its records after
    /// the promotion LSN (or after the LSN it recovered to, if lower).
    #[must_use]
    pub fn diverged(&self) -> (Vec<DivergedRange>, u64) {
        let Some(fenced_after_lsn) = self.fenced_after_lsn() else { return (Vec::new(), 0) };
        // A crash since the destination was last connected may have lost
        // records it holds (they ship while their append here is in flight):
        // what this log holds after the recovered LSN was written again here
        // and differs from the promoted side too.
        let after_lsn =
            self.superblock.recovered_lsn_since_connect().map_or(fenced_after_lsn, |lsn| lsn.min(fenced_after_lsn));
        let mut raw: Vec<(u8, u64, u64)> = Vec::new();
        let mut records = 0;
        for record in self.core.retained().filter(|r| r.lsn > after_lsn) {
            records += 1;
            if record.length > 0 {
                raw.push((record.volume_index, record.offset, u64::from(record.length)));
            }
        }
        raw.extend(self.core.bitmap_regions());
        let names = self.volume_names();
        let merged = crate::core::unconfirmed::merge_ranges(&raw, 1)
            .into_iter()
            .take(MAX_LISTED_RANGES)
            .map(|(volume_index, offset, length)| {
                let volume = names.get(usize::from(volume_index)).cloned().unwrap_or_default();
                DivergedRange { volume_index, volume, offset, length }
            })
            .collect();
        (merged, records)
    }
}
