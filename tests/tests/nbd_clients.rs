//! Real NBD clients against a real tandemd: qemu-io, qemu-img and fio.

use std::process::Command;

use rand::{Rng, SeedableRng};
use tandem_tests::{fio_pipelined_verify_job, require_tool, run_ok, Node};

const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, commands: &[String]) -> String {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    command.arg(uri);
    let output = run_ok(&mut command);
    assert!(!output.contains("Pattern verification failed"), "qemu-io found wrong data:\n{output}");
    assert!(!output.contains("failed:"), "qemu-io reported an error:\n{output}");
    output
}

#[test]
fn qemu_io_patterns_fua_flush_discard_and_zeroes_survive_a_crash() {
    require_tool("qemu-io", "qemu-utils");
    let mut node = Node::start("");
    node.create_group("rg01", "128MiB", &[("data", 64 * MIB)]);
    let uri = node.nbd_uri("rg01", "data");
    let seed: u64 = rand::rng().random();
    eprintln!("qemu-io test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // 256 slots of 256 KiB; 64 of them get one write each, at a random offset
    // and length inside the slot, some of them FUA, some not sector-aligned.
    let mut slots: Vec<u64> = (0..256).collect();
    let mut writes = Vec::new();
    for i in 0..64 {
        let slot = slots.swap_remove(rng.random_range(0..slots.len()));
        let unaligned = i % 8 == 7;
        let offset =
            slot * 256 * 1024 + if unaligned { 512 * rng.random_range(1..8) } else { 4096 * rng.random_range(0..16) };
        let length = if unaligned { 512 * rng.random_range(1..64) } else { 4096 * rng.random_range(1..48) };
        let pattern = 1 + (i % 250) as u8;
        writes.push((offset, length, pattern, i % 3 == 0));
    }
    let mut commands: Vec<String> = writes
        .iter()
        .map(|(offset, length, pattern, fua)| {
            format!("write {} -P {pattern} {offset} {length}", if *fua { "-f" } else { "" })
        })
        .collect();
    commands.push("flush".into());
    let reads: Vec<String> = writes.iter().map(|(o, l, p, _)| format!("read -P {p} {o} {l}")).collect();
    commands.extend(reads.iter().cloned());
    qemu_io(&uri, &commands);

    // Discard and write-zeroes (with and without unmap) read back as zeroes.
    let (o, l, _, _) = writes[0];
    let (o2, l2, _, _) = writes[1];
    let (o3, l3, _, _) = writes[2];
    qemu_io(
        &uri,
        &[
            format!("discard {o} {l}"),
            format!("write -z {o2} {l2}"),
            format!("write -z -u {o3} {l3}"),
            format!("read -P 0 {o} {l}"),
            format!("read -P 0 {o2} {l2}"),
            format!("read -P 0 {o3} {l3}"),
        ],
    );

    // Everything acknowledged is still there after kill -9 and recovery.
    node.kill9();
    node.spawn();
    let mut after = vec![format!("read -P 0 {o} {l}"), format!("read -P 0 {o2} {l2}"), format!("read -P 0 {o3} {l3}")];
    after.extend(reads[3..].iter().cloned());
    qemu_io(&uri, &after);
    let status = node.group_status("rg01");
    assert!(status["last_recovery"]["records_replayed"].as_u64().unwrap() > 0, "recovery replayed the log: {status}");
}

#[test]
fn qemu_img_convert_of_a_random_image_compares_equal() {
    require_tool("qemu-img", "qemu-utils");
    let mut node = Node::start("");
    node.create_group("rg01", "128MiB", &[("data", 256 * MIB)]);
    let source = node.path("source.img");
    run_ok(
        Command::new("dd")
            .args(["if=/dev/urandom", "bs=1M", "count=256", "status=none"])
            .arg(format!("of={}", source.display())),
    );
    let uri = node.nbd_uri("rg01", "data");
    // 256 MiB through a 128 MiB log: checkpoints and log backpressure run.
    run_ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&source).arg(&uri));
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&source).arg(&uri));
    let status = node.group_status("rg01");
    assert!(status["checkpoints"].as_u64().unwrap() > 0, "the log wrapped through checkpoints: {status}");
    // After a clean stop the volume file itself is byte-identical.
    node.stop();
    let volume = node.path("rg01-data.img");
    run_ok(Command::new("cmp").arg(&source).arg(&volume));
}

#[test]
fn fio_verifies_crc32c_with_several_jobs_in_flight() {
    require_tool("fio", "fio");
    let node = Node::start("");
    node.create_group("rg01", "128MiB", &[("data", 64 * MIB)]);
    let uri = node.nbd_uri("rg01", "data");
    let output = run_ok(
        Command::new("fio")
            .args(["--name=verify", "--ioengine=nbd", "--rw=randwrite", "--bsrange=4k-64k", "--size=24m"])
            .args(["--iodepth=16", "--numjobs=2", "--offset_increment=32m", "--verify=crc32c", "--do_verify=1"])
            .args(["--verify_fatal=1", "--verify_state_save=0", "--group_reporting=1"])
            .arg(format!("--uri={uri}")),
    );
    assert!(output.contains("verify"), "fio ran its verify job:\n{output}");
    assert!(!output.contains("verify: bad"), "fio verification failed:\n{output}");
    let status = node.group_status("rg01");
    assert!(status["writes_completed"].as_u64().unwrap() > 100, "{status}");
    assert!(status["reads_completed"].as_u64().unwrap() > 100, "fio read back to verify: {status}");
}

/// Large writes pipelined deep are received straight into their record
/// buffers with a short tail behind them, and taken several per turn of the
/// reactor; the tail then holds the next header and a little of the next
/// payload, or reads interleaved with the writes (verify_backlog reads back
/// on the same connection while writing). Every byte must still land where
/// its request said.
#[test]
fn fio_verifies_deeply_pipelined_large_and_small_writes_with_reads_between() {
    require_tool("fio", "fio");
    let node = Node::start("");
    node.create_group("rg01", "256MiB", &[("data", 64 * MIB)]);
    let uri = node.nbd_uri("rg01", "data");
    let output = run_ok(fio_pipelined_verify_job(&mut Command::new("fio"), &uri));
    assert!(!output.contains("verify: bad"), "fio verification failed:\n{output}");
    let status = node.group_status("rg01");
    assert!(status["writes_completed"].as_u64().unwrap() > 100, "{status}");
    assert!(status["reads_completed"].as_u64().unwrap() > 100, "fio read back to verify: {status}");
}
