//! The recovery scanner over an arbitrary ring image: never panics, never
//! loops, and accepts only a chain of consecutive LSNs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_engine::core::{HeaderVerdict, ScanStart, Scanner};

const SECTOR: usize = 512;

fuzz_target!(|data: &[u8]| {
    let sectors = data.len() / SECTOR;
    if sectors < 2 {
        return;
    }
    let ring = &data[..sectors * SECTOR];
    // The first byte places the epoch start, so kept records of older epochs
    // before it are explored too.
    let epoch_start_sectors = u64::from(data[0] % 4);
    let mut scanner = Scanner::new(ScanStart {
        ring_size_bytes: ring.len() as u64,
        sector_bytes: SECTOR as u32,
        group_id: 7,
        epoch: 3,
        tail_position: 0,
        tail_lsn: 1,
        epoch_start_position: epoch_start_sectors * SECTOR as u64,
    });
    let mut accepted = 0u64;
    while let Ok(offset) = scanner.next_header_offset() {
        let offset = offset as usize;
        match scanner.check_header(&ring[offset..offset + SECTOR]) {
            Ok(HeaderVerdict::NeedPayload { header, ring_offset, padded_bytes }) => {
                let start = ring_offset as usize;
                let Some(payload) = ring.get(start..start + padded_bytes as usize) else { break };
                if scanner.check_payload(&header, &payload[..header.payload_bytes() as usize]).is_err() {
                    break;
                }
            }
            Ok(HeaderVerdict::Pad) => {
                // A pad consumes no LSN.
                assert_eq!(scanner.last_lsn(), accepted);
                continue;
            }
            Ok(HeaderVerdict::Complete(_)) => {}
            Err(_) => break,
        }
        accepted += 1;
        assert_eq!(scanner.last_lsn(), accepted);
    }
});
