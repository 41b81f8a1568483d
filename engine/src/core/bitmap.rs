//! The dirty-region bitmap of a source: one bit per region of every volume,
//! set for the regions of records that left the log before the destination
//! had them. A bitmap catch-up copies exactly those regions.

/// Bits over the volumes of a group, volume after volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    region_bytes: u64,
    volume_sizes_bytes: Vec<u64>,
    /// First bit of each volume.
    first_bit: Vec<u64>,
    words: Vec<u64>,
}

impl DirtyBitmap {
    /// A clean bitmap.
    #[must_use]
    pub fn new(region_bytes: u64, volume_sizes_bytes: Vec<u64>) -> Self {
        assert!(region_bytes.is_power_of_two(), "regions are a power of two");
        let mut first_bit = Vec::with_capacity(volume_sizes_bytes.len());
        let mut bits = 0;
        for size in &volume_sizes_bytes {
            first_bit.push(bits);
            bits += size.div_ceil(region_bytes);
        }
        Self { region_bytes, volume_sizes_bytes, first_bit, words: vec![0; bits.div_ceil(64) as usize] }
    }

    /// A bitmap read back from its area (little-endian words; bytes beyond
    /// the bits are ignored).
    #[must_use]
    pub fn from_bytes(region_bytes: u64, volume_sizes_bytes: Vec<u64>, bytes: &[u8]) -> Self {
        let mut bitmap = Self::new(region_bytes, volume_sizes_bytes);
        for (index, word) in bitmap.words.iter_mut().enumerate() {
            let mut raw = [0u8; 8];
            for (i, byte) in raw.iter_mut().enumerate() {
                *byte = bytes.get(index * 8 + i).copied().unwrap_or(0);
            }
            *word = u64::from_le_bytes(raw);
        }
        bitmap
    }

    /// The area's bytes (`len` of them, zero beyond the bits).
    #[must_use]
    pub fn to_bytes(&self, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        for (index, word) in self.words.iter().enumerate() {
            bytes[index * 8..index * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    #[must_use]
    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    /// Marks every region `offset..offset + length` of `volume` touches.
    pub fn mark(&mut self, volume: u8, offset: u64, length: u64) {
        let volume = usize::from(volume);
        assert!(offset + length <= self.volume_sizes_bytes[volume], "marked range lies within its volume");
        if length == 0 {
            return;
        }
        let first = offset / self.region_bytes;
        let last = (offset + length - 1) / self.region_bytes;
        for region in first..=last {
            let bit = self.first_bit[volume] + region;
            self.words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    fn is_dirty(&self, volume: usize, region: u64) -> bool {
        let bit = self.first_bit[volume] + region;
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// The first dirty stretch at or after `offset` of `volume` (or of a
    /// later volume): (volume, start, end of that region).
    #[must_use]
    pub fn next_dirty(&self, mut volume: u8, mut offset: u64) -> Option<(u8, u64, u64)> {
        loop {
            let size = *self.volume_sizes_bytes.get(usize::from(volume))?;
            let regions = size.div_ceil(self.region_bytes);
            let mut region = offset / self.region_bytes;
            while offset < size && region < regions {
                let bit = self.first_bit[usize::from(volume)] + region;
                if self.words[(bit / 64) as usize] == 0 {
                    // A clean word: skip the rest of its 64 regions at once.
                    region += 64 - bit % 64;
                    continue;
                }
                if self.is_dirty(usize::from(volume), region) {
                    let start = offset.max(region * self.region_bytes);
                    let end = ((region + 1) * self.region_bytes).min(size);
                    return Some((volume, start, end));
                }
                region += 1;
            }
            volume += 1;
            offset = 0;
        }
    }

    /// Dirty bytes at or after (`volume`, `offset`).
    #[must_use]
    pub fn dirty_bytes_from(&self, volume: u8, offset: u64) -> u64 {
        let mut total = 0;
        let mut at = (volume, offset);
        while let Some((volume, start, end)) = self.next_dirty(at.0, at.1) {
            total += end - start;
            at = (volume, end);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_regions_finds_them_and_round_trips() {
        let region = 64 << 10;
        let mut bitmap = DirtyBitmap::new(region, vec![1 << 20, 200 << 10]);
        assert!(bitmap.is_clean());
        bitmap.mark(0, 100_000, 50_000); // regions 1 and 2 of volume 0
        bitmap.mark(1, (192 << 10) + 1, 10); // the short last region of volume 1
        assert_eq!(bitmap.next_dirty(0, 0), Some((0, region, 2 * region)));
        assert_eq!(bitmap.next_dirty(0, region + 5), Some((0, region + 5, 2 * region)));
        assert_eq!(bitmap.next_dirty(0, 2 * region), Some((0, 2 * region, 3 * region)));
        assert_eq!(bitmap.next_dirty(0, 3 * region), Some((1, 192 << 10, 200 << 10)));
        assert_eq!(bitmap.next_dirty(1, 200 << 10), None);
        assert_eq!(bitmap.dirty_bytes_from(0, 0), 2 * region + (8 << 10));
        let copy = DirtyBitmap::from_bytes(region, vec![1 << 20, 200 << 10], &bitmap.to_bytes(4096));
        assert_eq!(copy, bitmap);
        bitmap.clear();
        assert!(bitmap.is_clean() && bitmap.next_dirty(0, 0).is_none());
    }
}
