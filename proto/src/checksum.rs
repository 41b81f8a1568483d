//! xxh3-128 checksums. xxh3 is fast (tens of GB/s per core) and detects torn and
//! corrupted records; it is not a MAC. Integrity against an attacker comes from the
//! AEAD of the transport, never from these checksums.

/// A 128-bit checksum stored little-endian as 16 bytes, so the containing structs
/// keep an alignment of 8 and no padding.
pub type Checksum128 = [u8; 16];

/// xxh3-128 of `bytes`, little-endian.
#[must_use]
pub fn xxh3_128_bytes(bytes: &[u8]) -> Checksum128 {
    xxhash_rust::xxh3::xxh3_128(bytes).to_le_bytes()
}

/// xxh3-128 of `bytes` folded to 64 bits (low half), for fields that have room for
/// only 64 bits. The low half of xxh3-128 is as well mixed as xxh3-64.
#[must_use]
pub fn xxh3_128_low64(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_128(bytes) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_differ_on_single_bit_flip() {
        let mut data = vec![0x5au8; 4096];
        let before = xxh3_128_bytes(&data);
        data[1234] ^= 0x01;
        assert_ne!(before, xxh3_128_bytes(&data));
        assert_ne!(xxh3_128_low64(&[1, 2, 3]), xxh3_128_low64(&[1, 2, 4]));
    }
}
