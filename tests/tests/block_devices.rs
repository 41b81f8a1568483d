//! Logs and volumes on real block devices (loop devices): geometry from the
//! device (BLKSSZGET/BLKPBSZGET), exclusive claims (O_EXCL), whole-device logs,
//! and recovery after kill -9.

use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;

use tandem_tests::nbd_client::NbdClient;
use tandem_tests::pattern::block_content;
use tandem_tests::{run_ok, Node};

/// A loop device over a sparse file, detached on drop.
struct LoopDevice {
    device: String,
}

impl LoopDevice {
    fn new(node: &Node, name: &str, size: u64, sector_bytes: u32) -> Self {
        let backing = node.path(name);
        std::fs::File::create(&backing).unwrap().set_len(size).unwrap();
        let device = run_ok(
            Command::new("losetup")
                .args(["--find", "--show", "--sector-size", &sector_bytes.to_string()])
                .arg(&backing),
        )
        .trim()
        .to_owned();
        assert!(device.starts_with("/dev/loop"), "losetup gave {device:?}");
        Self { device }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

#[test]
fn groups_on_block_devices_use_device_geometry_claim_devices_and_recover() {
    assert!(
        std::path::Path::new("/dev/loop-control").exists(),
        "this test needs loop devices (root and /dev/loop-control)"
    );
    let mut node = Node::start("checkpoint_interval_ms = 3600000\n");
    // The log device reports 4096-byte sectors; the volumes 512.
    let log = LoopDevice::new(&node, "log.backing", 192 << 20, 4096);
    let data = LoopDevice::new(&node, "data.backing", 64 << 20, 512);
    let other = LoopDevice::new(&node, "other.backing", 32 << 20, 512);
    let volume_a = format!("a={}", data.device);
    let volume_b = format!("b={}", other.device);
    let created = node.cli_ok(&[
        "group",
        "create",
        "--name",
        "rg01",
        "--log",
        &log.device,
        "--volume",
        &volume_a,
        "--volume",
        &volume_b,
    ]);
    assert!(created.contains("4096-byte sectors"), "{created}");
    let status = node.group_status("rg01");
    assert_eq!(status["log_sector_bytes"], 4096, "the log uses the device's sector size");
    // Two superblock slots, the ring, and the dirty-region bitmap (one sector
    // for 128 MiB of volumes) fill the whole device.
    assert_eq!(status["log_size_bytes"], (192u64 << 20) - 32768 - 4096, "a device log spans the whole device");
    assert_eq!(status["volumes"][0]["size_bytes"], 64u64 << 20);

    // The daemon holds the devices exclusively: another exclusive opener is refused.
    let claim = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&data.device);
    assert_eq!(claim.unwrap_err().raw_os_error(), Some(libc::EBUSY), "O_EXCL claim held by tandemd");

    // 512-byte writes are fine on 512-byte volumes; everything survives kill -9.
    let mut client = NbdClient::connect(node.nbd_port, "rg01/a").unwrap();
    assert_eq!(client.write(512, &[0x42; 512]).unwrap(), 0);
    for block in 1..64u64 {
        assert_eq!(client.write(block * 4096, &block_content(block, block)).unwrap(), 0);
    }
    drop(client);
    node.kill9();
    node.spawn();
    let recovery = node.group_status("rg01")["last_recovery"].clone();
    assert_eq!(recovery["records_replayed"], 64, "{recovery}");
    let mut client = NbdClient::connect(node.nbd_port, "rg01/a").unwrap();
    assert_eq!(client.read(512, 512).unwrap().unwrap(), vec![0x42; 512]);
    for block in 1..64u64 {
        assert_eq!(client.read(block * 4096, 4096).unwrap().unwrap(), block_content(block, block));
    }

    // A device that holds a live log is not formatted again.
    node.stop();
    let mut fresh = Node::start("");
    let refused = fresh.cli(&["group", "create", "--name", "rg09", "--log", &log.device, "--volume", &volume_b]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("already holds the log of group rg01"), "{stderr}");
    fresh.stop();
}

#[test]
fn a_destination_whose_log_has_other_sectors_is_refused() {
    assert!(
        std::path::Path::new("/dev/loop-control").exists(),
        "this test needs loop devices (root and /dev/loop-control)"
    );
    let source = Node::start_named("node-a", "", "");
    let destination = Node::start_named("node-b", "", "");
    source.create_group("rg01", "128MiB", &[("data", 16 << 20)]);
    // The destination's log is a device with 512-byte sectors; the source's a file (4096).
    let log = LoopDevice::new(&destination, "log.backing", 160 << 20, 512);
    let volume = destination.path("rg02-data.img");
    std::fs::File::create(&volume).unwrap().set_len(16 << 20).unwrap();
    let volume = format!("data={}", volume.display());
    let _ = destination.cli_ok(&["group", "create", "--name", "rg02", "--log", &log.device, "--volume", &volume]);
    let output = source.partner("rg01", &destination, "rg02", None);
    let text = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("the log of rg02 on node-b has 512-byte sectors but the source's has 4096-byte sectors"),
        "{text}"
    );
    let _ = destination.cli_ok(&["group", "delete", "rg02"]);
}
