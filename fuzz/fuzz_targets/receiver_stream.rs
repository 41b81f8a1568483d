//! The destination's stream logic under any sequence of frames a peer could
//! send: it never panics, submits records only in LSN order without gaps,
//! moves the stream back only by a rebase that is a connection's first
//! frame, never writes a copy range (or verifies or repairs one) outside the
//! volumes, and refuses what breaks the protocol.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_engine::core::{CopyPosition, Incoming, Receiver, ReceiverAction};
use tandem_proto::{RecordHeader, RecordKind, RecordStamp};

const STAMP: RecordStamp = RecordStamp { group_id: 1, epoch: 1, generation_tag: 1 };
const SIZES: [u64; 2] = [1 << 20, 64 << 10];

fuzz_target!(|data: &[u8]| {
    let mut receiver = Receiver::new(SIZES.to_vec(), CopyPosition::At { volume_index: 0, offset: 0 });
    let mut next_lsn = 10;
    receiver.connected(next_lsn);
    // Whether this connection took a frame yet (a barrier takes none).
    let mut taken_on_connection = false;
    for chunk in data.chunks(12) {
        if chunk.len() < 12 {
            break;
        }
        let value = u64::from_le_bytes(chunk[4..12].try_into().unwrap());
        let lsn = u64::from(chunk[1]) + 1;
        let volume_index = chunk[2] % 3;
        let offset = value % (2 << 20);
        let length = u32::from(chunk[3]) * 512 + 512;
        let incoming = match chunk[0] % 10 {
            0 => Incoming::Record {
                header: RecordHeader::write(STAMP, lsn, volume_index, offset, &vec![1u8; length as usize]),
                payload_id: Some(1),
            },
            1 => Incoming::Record {
                header: RecordHeader::without_payload(STAMP, RecordKind::Trim, 0, lsn, volume_index, offset, length),
                payload_id: None,
            },
            2 => Incoming::Copy { volume_index, offset, length, payload_id: None },
            3 => Incoming::CopyDone,
            4 => Incoming::Rebase { lsn: value % 64 },
            5 => Incoming::CopyVerified { volume_index, offset, length },
            6 => Incoming::Verify { volume_index, offset, length },
            7 => Incoming::Repair { volume_index, offset, length, payload_id: None },
            8 => Incoming::Barrier { lsn: value % 64 },
            _ => {
                let name = vec![b's'; usize::from(chunk[3] % 64) + 1];
                let checksum = tandem_proto::xxh3_128_bytes(&name);
                let length = name.len() as u32;
                let header = RecordHeader::seal_with(STAMP, RecordKind::Snapshot, 0, lsn, 0, 0, length, checksum);
                Incoming::Record { header, payload_id: Some(2) }
            }
        };
        receiver.push(incoming);
        for action in receiver.drive(chunk[0] & 0x80 != 0) {
            match action {
                ReceiverAction::Submit { lsn, volume_index, offset, length, depends_on, .. } => {
                    assert_eq!(lsn, next_lsn, "records are submitted in LSN order");
                    assert!(depends_on < lsn);
                    assert!(offset + u64::from(length) <= SIZES[usize::from(volume_index)]);
                    next_lsn += 1;
                }
                ReceiverAction::WriteCopy { volume_index, offset, length, end, .. } => {
                    assert!(offset + u64::from(length) <= SIZES[usize::from(volume_index)]);
                    receiver.copy_written(end);
                }
                ReceiverAction::Rebase { lsn } => {
                    assert!(
                        lsn + 1 >= next_lsn || !taken_on_connection,
                        "a rebase moves the stream back only as a connection's first frame"
                    );
                    next_lsn = lsn + 1;
                    receiver.rebase_performed();
                    receiver.rebased();
                }
                ReceiverAction::Persist => receiver.persisted(receiver.copy_to_persist()),
                ReceiverAction::Verify { volume_index, offset, length } => {
                    assert!(offset + u64::from(length) <= SIZES[usize::from(volume_index)]);
                    receiver.verified_range();
                }
                ReceiverAction::Refuse(_) => {
                    receiver.connected(next_lsn);
                    taken_on_connection = false;
                    continue;
                }
            }
            taken_on_connection = true;
        }
        // Every other round is a tick, when an applied-only move is sent too.
        let _ = receiver.ack(next_lsn - 1, next_lsn - 1, next_lsn.is_multiple_of(2));
    }
});
