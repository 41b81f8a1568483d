//! Self-describing blocks for crash drills. Every 4 KiB block written carries
//! the write's sequence number and the block's index, and is filled with bytes
//! derived from both, so a read-back tells exactly which write it came from and
//! whether it is torn.

use std::collections::HashMap;

pub const BLOCK_BYTES: usize = 4096;
const MAGIC: &[u8; 8] = b"TNDMTEST";

/// The content of 4 KiB `block` as written by write `seq`.
#[must_use]
pub fn block_content(seq: u64, block: u64) -> Vec<u8> {
    block_content_sized(seq, block, BLOCK_BYTES)
}

/// The content of `block` of `size` bytes (at least 32) as written by write `seq`.
#[must_use]
pub fn block_content_sized(seq: u64, block: u64, size: usize) -> Vec<u8> {
    assert!(size >= 32, "a block holds at least its 24-byte stamp");
    let mut data = vec![0u8; size];
    data[..8].copy_from_slice(MAGIC);
    data[8..16].copy_from_slice(&seq.to_le_bytes());
    data[16..24].copy_from_slice(&block.to_le_bytes());
    let mut state = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
    for chunk in data[24..].chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    data
}

/// What a block read back holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    Zero,
    Write(u64),
}

/// Decodes a block; `Err` describes a torn or foreign block.
pub fn decode_block(data: &[u8], block: u64) -> Result<Found, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(Found::Zero);
    }
    if &data[..8] != MAGIC {
        return Err(format!("block {block} holds foreign bytes"));
    }
    let seq = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    let index = u64::from_le_bytes(data[16..24].try_into().expect("8 bytes"));
    if index != block {
        return Err(format!("block {block} holds the content of block {index} (seq {seq})"));
    }
    if data != block_content_sized(seq, block, data.len()).as_slice() {
        return Err(format!("block {block} of write {seq} is torn"));
    }
    Ok(Found::Write(seq))
}

/// Which writes were issued and acknowledged, per block.
#[derive(Debug, Default)]
pub struct WriteModel {
    /// Highest acknowledged write per block.
    pub acked: HashMap<u64, u64>,
    /// Every write issued per block (acknowledged or not).
    pub issued: HashMap<u64, Vec<u64>>,
    /// Writes that leave zeros (trim, write-zeroes) rather than a pattern.
    pub zeroing: std::collections::HashSet<u64>,
}

impl WriteModel {
    /// Checks a block read after a crash: it must hold the last acknowledged
    /// write or a write issued after it, never an older one, never torn.
    pub fn check(&self, block: u64, data: &[u8]) -> Result<(), String> {
        let found = decode_block(data, block)?;
        let acked = self.acked.get(&block).copied();
        let issued = self.issued.get(&block).map_or(&[][..], Vec::as_slice);
        match (found, acked) {
            (Found::Zero, None) => Ok(()),
            (Found::Zero, Some(seq)) => {
                let zeroed = self.zeroing.contains(&seq) || issued.iter().any(|s| *s > seq && self.zeroing.contains(s));
                if zeroed {
                    Ok(())
                } else {
                    Err(format!("block {block} lost acknowledged write {seq}"))
                }
            }
            (Found::Write(seq), _) if !issued.contains(&seq) || self.zeroing.contains(&seq) => {
                Err(format!("block {block} holds write {seq}, which never targeted it"))
            }
            (Found::Write(seq), Some(acked)) if seq < acked => {
                Err(format!("block {block} went back from acknowledged write {acked} to older write {seq}"))
            }
            (Found::Write(_), _) => Ok(()),
        }
    }

    /// Records what a block durably holds after recovery: later checks must
    /// find it or something newer. A zero block is recorded as a zeroing write
    /// `fresh_seq`, newer than every write issued so far.
    pub fn observe(&mut self, block: u64, data: &[u8], fresh_seq: u64) {
        match decode_block(data, block) {
            Ok(Found::Write(seq)) => {
                self.acked.insert(block, seq);
            }
            Ok(Found::Zero) => {
                self.zeroing.insert(fresh_seq);
                self.issued.entry(block).or_default().push(fresh_seq);
                self.acked.insert(block, fresh_seq);
            }
            Err(_) => {}
        }
    }
}

/// Every acknowledged write of `model` is in the volume file at `path`,
/// none older, and the writer wrote (over 100 blocks hold its writes).
pub fn check_acknowledged(path: &std::path::Path, model: &std::sync::Mutex<WriteModel>) {
    let data = std::fs::read(path).unwrap();
    let model = model.lock().unwrap();
    let errors: Vec<String> = data
        .chunks(BLOCK_BYTES)
        .enumerate()
        .filter_map(|(block, bytes)| model.check(block as u64, bytes).err())
        .collect();
    assert!(errors.is_empty(), "{} blocks wrong, first: {:?}", errors.len(), &errors[..errors.len().min(5)]);
    let written = data
        .chunks(BLOCK_BYTES)
        .enumerate()
        .filter(|(block, bytes)| matches!(decode_block(bytes, *block as u64), Ok(Found::Write(_))))
        .count();
    assert!(written > 100, "the writer wrote ({written} blocks)");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_loss_regression_and_tearing() {
        let mut model = WriteModel::default();
        model.issued.insert(3, vec![1, 5, 9]);
        model.acked.insert(3, 5);
        assert!(model.check(3, &block_content(5, 3)).is_ok());
        assert!(model.check(3, &block_content(9, 3)).is_ok(), "a later unacknowledged write may be there");
        assert!(model.check(3, &block_content(1, 3)).unwrap_err().contains("older write"));
        assert!(model.check(3, &[0u8; BLOCK_BYTES]).unwrap_err().contains("lost"));
        assert!(model.check(3, &block_content(7, 3)).unwrap_err().contains("never targeted"));
        let mut torn = block_content(5, 3);
        torn[4000] ^= 1;
        assert!(model.check(3, &torn).unwrap_err().contains("torn"));
        assert!(model.check(4, &block_content(5, 3)).unwrap_err().contains("content of block 3"));
    }

    #[test]
    fn zeroing_writes_explain_zero_blocks() {
        let mut model = WriteModel::default();
        model.issued.insert(1, vec![2, 4]);
        model.zeroing.insert(4);
        model.acked.insert(1, 2);
        assert!(model.check(1, &[0u8; BLOCK_BYTES]).is_ok(), "a later zeroing write was issued");
        assert!(model.check(1, &block_content(4, 1)).unwrap_err().contains("never targeted"));
        model.acked.insert(1, 4);
        assert!(model.check(1, &block_content(2, 1)).unwrap_err().contains("older write"));
        model.observe(1, &[0u8; BLOCK_BYTES], 9);
        assert_eq!(model.acked[&1], 9);
        assert!(model.check(1, &[0u8; BLOCK_BYTES]).is_ok());
    }
}
