//! The superblock decoder: never panics; an accepted copy re-encodes exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_proto::{Superblock, SUPERBLOCK_SLOT_BYTES};

fuzz_target!(|data: &[u8]| {
    // Short inputs are extended with zeros so the fuzzer reaches field checks.
    let mut slot = vec![0u8; SUPERBLOCK_SLOT_BYTES];
    let n = data.len().min(SUPERBLOCK_SLOT_BYTES);
    slot[..n].copy_from_slice(&data[..n]);
    for bytes in [data, slot.as_slice()] {
        if let Ok(sb) = Superblock::decode(bytes) {
            assert_eq!(sb.as_bytes(), &bytes[..SUPERBLOCK_SLOT_BYTES]);
            let _ = sb.group_name();
        }
    }
});
