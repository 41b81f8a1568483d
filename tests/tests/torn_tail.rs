//! Torn tail: with the daemon stopped, damage the last records of the log (and
//! forget the volume's copy of them, as a power loss would); recovery must stop
//! exactly at the damage, say why, and restore every earlier record.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use tandem_proto::RING_OFFSET_BYTES;
use tandem_tests::nbd_client::NbdClient;
use tandem_tests::pattern::{block_content, BLOCK_BYTES};
use tandem_tests::Node;

const RECORDS: u64 = 20;
/// A 4 KiB write is one header sector plus one payload sector in the log.
const RECORD_BYTES: u64 = 8192;
/// Checkpoints never run during the test, so every record stays in the log.
const NO_CHECKPOINTS: &str = "checkpoint_interval_ms = 3600000\ncheckpoint_used_percent = 100\n";

fn record_offset(index: u64) -> u64 {
    RING_OFFSET_BYTES + index * RECORD_BYTES
}

/// A node whose group holds `RECORDS` one-block writes (block i = write i+1),
/// killed with SIGKILL, and whose volume lost them (zeroed).
fn crashed_node_with_records() -> Node {
    let mut node = Node::start(NO_CHECKPOINTS);
    node.create_group("rg01", "128MiB", &[("data", 16 << 20)]);
    let mut client = NbdClient::connect(node.nbd_port, "rg01/data").unwrap();
    for block in 0..RECORDS {
        assert_eq!(client.write(block * BLOCK_BYTES as u64, &block_content(block + 1, block)).unwrap(), 0);
    }
    node.kill9();
    forget_volume_writes(&node);
    node
}

fn forget_volume_writes(node: &Node) {
    let volume = OpenOptions::new().write(true).open(node.path("rg01-data.img")).unwrap();
    volume.write_all_at(&vec![0u8; (RECORDS as usize + 8) * BLOCK_BYTES], 0).unwrap();
    volume.sync_all().unwrap();
}

fn damage_log(node: &Node, offset: u64, bytes: &[u8]) {
    let log = OpenOptions::new().write(true).open(node.path("rg01.log")).unwrap();
    log.write_all_at(bytes, offset).unwrap();
    log.sync_all().unwrap();
}

fn flip_byte(node: &Node, offset: u64) {
    let log = OpenOptions::new().read(true).write(true).open(node.path("rg01.log")).unwrap();
    let mut byte = [0u8; 1];
    log.read_exact_at(&mut byte, offset).unwrap();
    log.write_all_at(&[byte[0] ^ 0x40], offset).unwrap();
    log.sync_all().unwrap();
}

/// Restarts, checks the recovery report, and checks that blocks below
/// `replayed` hold their write and the others are zero.
fn restart_and_check(node: &mut Node, replayed: u64, stop_reason: &str) {
    node.spawn();
    let recovery = node.group_status("rg01")["last_recovery"].clone();
    assert_eq!(recovery["records_replayed"], replayed, "{recovery}");
    assert_eq!(recovery["last_lsn"], replayed, "{recovery}");
    let stopped = recovery["stopped"].as_str().unwrap();
    assert!(stopped.contains(stop_reason), "recovery said {stopped:?}, expected {stop_reason:?}");
    let mut client = NbdClient::connect(node.nbd_port, "rg01/data").unwrap();
    for block in 0..RECORDS {
        let data = client.read(block * BLOCK_BYTES as u64, BLOCK_BYTES as u32).unwrap().unwrap();
        if block < replayed {
            assert_eq!(data, block_content(block + 1, block), "block {block} was replayed");
        } else {
            assert!(data.iter().all(|&b| b == 0), "block {block} is beyond the torn tail and stays unwritten");
        }
    }
}

#[test]
fn torn_payload_stops_recovery_at_that_record() {
    let mut node = crashed_node_with_records();
    flip_byte(&node, record_offset(12) + RECORD_BYTES / 2 + 100);
    restart_and_check(&mut node, 12, "torn record");
    assert!(node.log().contains("torn record"), "the daemon's log says where recovery stopped");
}

#[test]
fn damaged_header_stops_recovery_at_that_record() {
    let mut node = crashed_node_with_records();
    flip_byte(&node, record_offset(7) + 20);
    restart_and_check(&mut node, 7, "header checksum mismatch");
}

#[test]
fn lost_last_records_end_the_log_there() {
    let mut node = crashed_node_with_records();
    damage_log(&node, record_offset(RECORDS - 3), &vec![0u8; 3 * RECORD_BYTES as usize]);
    restart_and_check(&mut node, RECORDS - 3, "end of log");
}

/// After a torn tail, new records reuse its place. Old, valid records of the
/// crashed incarnation lie beyond them with the next LSNs; the epoch rule must
/// keep recovery from replaying them over newer data.
#[test]
fn records_of_a_crashed_incarnation_are_never_replayed_after_new_ones() {
    let mut node = crashed_node_with_records();
    flip_byte(&node, record_offset(12) + RECORD_BYTES / 2 + 100);
    restart_and_check(&mut node, 12, "torn record");
    // One new write lands where record 13 (the torn one) was, as LSN 13.
    let mut client = NbdClient::connect(node.nbd_port, "rg01/data").unwrap();
    let block = 100;
    assert_eq!(client.write(block * BLOCK_BYTES as u64, &block_content(1000, block)).unwrap(), 0);
    drop(client);
    node.kill9();
    forget_volume_writes(&node);
    let volume = OpenOptions::new().write(true).open(node.path("rg01-data.img")).unwrap();
    volume.write_all_at(&vec![0u8; BLOCK_BYTES], block * BLOCK_BYTES as u64).unwrap();
    node.spawn();
    let recovery = node.group_status("rg01")["last_recovery"].clone();
    assert_eq!(recovery["records_replayed"], 1, "only the new record is replayed: {recovery}");
    assert!(recovery["stopped"].as_str().unwrap().contains("crashed incarnation"), "{recovery}");
    let mut client = NbdClient::connect(node.nbd_port, "rg01/data").unwrap();
    let new = client.read(block * BLOCK_BYTES as u64, BLOCK_BYTES as u32).unwrap().unwrap();
    assert_eq!(new, block_content(1000, block), "the new write was replayed");
    let stale = client.read(13 * BLOCK_BYTES as u64, BLOCK_BYTES as u32).unwrap().unwrap();
    assert!(stale.iter().all(|&b| b == 0), "the stale record of the crashed incarnation was not replayed");
}
