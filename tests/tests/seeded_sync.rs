//! The initial copy compares before it sends (checksum aggregation): a
//! destination that already holds an older copy receives only the blocks
//! that differ, holes are neither read nor sent, and the volumes end equal.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tandem_tests::Node;

const VOLUME_BYTES: u64 = 64 << 20;
const BLOCK: u64 = 4096;
const IN_SYNC_TIMEOUT: Duration = Duration::from_secs(120);

fn random_file(path: &Path, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; VOLUME_BYTES as usize];
    rng.fill(&mut data[..]);
    std::fs::write(path, data).unwrap();
}

/// Overwrites `count` random distinct 4 KiB blocks of `path`; returns them.
fn change_blocks(path: &Path, count: usize, seed: u64) -> usize {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut chosen = std::collections::BTreeSet::new();
    while chosen.len() < count {
        chosen.insert(rng.random_range(0..VOLUME_BYTES / BLOCK));
    }
    let mut block = vec![0u8; BLOCK as usize];
    for index in &chosen {
        rng.fill(&mut block[..]);
        file.seek(SeekFrom::Start(index * BLOCK)).unwrap();
        file.write_all(&block).unwrap();
    }
    chosen.len()
}

fn md5(path: &Path) -> String {
    tandem_tests::run_ok(std::process::Command::new("md5sum").arg(path)).split_whitespace().next().unwrap().to_owned()
}

struct Outcome {
    source: Node,
    _destination: Node,
    source_volume: PathBuf,
    destination_volume: PathBuf,
}

/// Prepares both volume files with `prepare`, partners them and waits until
/// the destination is in sync.
fn sync(prepare: impl FnOnce(&Path, &Path)) -> Outcome {
    let source = Node::start_named("seed-a", "", "");
    let destination = Node::start_named("seed-b", "", "");
    let (source_volume, destination_volume) = (source.path("data.img"), destination.path("data.img"));
    prepare(&source_volume, &destination_volume);
    source.create_group_on("rg01", "128MiB", &[("data", &source_volume)]);
    destination.create_group_on("rg02", "128MiB", &[("data", &destination_volume)]);
    let _ = source.partner_ok("rg01", &destination, "rg02", Some("sync"));
    source.wait_in_sync("rg01", IN_SYNC_TIMEOUT);
    Outcome { source, _destination: destination, source_volume, destination_volume }
}

fn check(outcome: &Outcome, differing_blocks: usize, what: &str) -> serde_json::Value {
    assert_eq!(md5(&outcome.source_volume), md5(&outcome.destination_volume), "{what}: the volumes are equal");
    let p = outcome.source.partnership("rg01");
    let sync = &p["sync"];
    assert_eq!(sync["bytes_compared"].as_u64().unwrap(), VOLUME_BYTES, "{what}: {p:#}");
    let differing = differing_blocks as u64 * BLOCK;
    let sent = sync["bytes_sent"].as_u64().unwrap() + sync["bytes_zeroed"].as_u64().unwrap();
    assert_eq!(sent, differing, "{what}: exactly the differing blocks were sent: {p:#}");
    assert_eq!(sync["bytes_equal"].as_u64().unwrap(), VOLUME_BYTES - differing, "{what}: {p:#}");
    // Within 10 % of the differing bytes and the hashes (a digest per chunk,
    // and at most every chunk's block hashes, 16 bytes a block), plus 64 KiB
    // for the handshake, heartbeats and acknowledgements of an idle link.
    let chunks = VOLUME_BYTES >> 20;
    let hashes = chunks * 16 + if differing > 0 { chunks * 256 * 16 } else { 0 };
    let wire = p["bytes_sent"].as_u64().unwrap() + p["bytes_received"].as_u64().unwrap();
    let budget = (differing + hashes) * 11 / 10 + 64 * 1024;
    assert!(wire <= budget, "{what}: {wire} bytes on the wire for {differing} differing bytes (budget {budget})");
    p
}

#[test]
fn seeded_destinations_receive_only_the_differing_blocks() {
    for (percent, differing) in [(0, 0usize), (1, 164), (10, 1638), (100, 16384)] {
        let mut changed = 0;
        let outcome = sync(|source, destination| {
            random_file(source, 7);
            std::fs::copy(source, destination).unwrap();
            changed = if percent == 100 {
                random_file(destination, 8);
                16384
            } else {
                change_blocks(destination, differing, percent)
            };
        });
        let p = check(&outcome, changed, &format!("{percent} % differing"));
        if percent == 10 {
            // The watch ends by itself once the sync is done, with the partnership's text.
            let watched = outcome.source.cli_ok(&["partnership", "show", "--watch", "1"]);
            assert!(
                watched.contains("initial sync  64.0 MiB compared") && watched.contains("0 B remaining"),
                "{watched}"
            );
        }
        if percent == 0 {
            let wire = p["bytes_sent"].as_u64().unwrap() + p["bytes_received"].as_u64().unwrap();
            assert!(wire < VOLUME_BYTES / 500, "identical volumes cost under 0.2 % on the wire: {wire}");
        }
    }
}

#[test]
fn a_sparse_source_punches_holes_into_old_destination_data() {
    let outcome = sync(|source, destination| {
        random_file(destination, 3);
        let file = std::fs::File::create(source).unwrap();
        file.set_len(VOLUME_BYTES).unwrap();
        // 4 MiB of data in the middle of an otherwise empty source.
        let mut data = vec![0u8; 4 << 20];
        let mut old = std::fs::File::open(destination).unwrap();
        old.seek(SeekFrom::Start(32 << 20)).unwrap();
        old.read_exact(&mut data).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &data, 32 << 20).unwrap();
    });
    assert_eq!(md5(&outcome.source_volume), md5(&outcome.destination_volume));
    let p = outcome.source.partnership("rg01");
    let sync = &p["sync"];
    assert_eq!(sync["bytes_sent"].as_u64().unwrap(), 0, "no data crossed the wire: {p:#}");
    assert_eq!(sync["bytes_zeroed"].as_u64().unwrap(), VOLUME_BYTES - (4 << 20), "{p:#}");
    assert!(p["bytes_sent"].as_u64().unwrap() < 1 << 20, "holes cost headers only: {p:#}");
    // The rate is the copy's own: it stays put once the copy is done (and
    // seen done, within a tick of the daemon).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let rate = outcome.source.partnership("rg01")["sync"]["rate_bytes_per_s"].as_f64().unwrap();
    assert!(rate > 0.0, "{p:#}");
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let later = outcome.source.partnership("rg01")["sync"]["rate_bytes_per_s"].as_f64().unwrap();
    assert!((later - rate).abs() < 1e-6, "the rate of a finished copy changed from {rate} to {later}");
    let allocated =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&outcome.destination_volume).unwrap()) * 512;
    assert!(allocated <= 5 << 20, "the destination's old data became holes: {allocated} bytes allocated");
}

/// The data segments of a sparse file (SEEK_DATA / SEEK_HOLE).
fn data_segments(file: &std::fs::File) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let size = file.metadata().unwrap().len() as i64;
    let (mut segments, mut at) = (Vec::new(), 0i64);
    while at < size {
        // SAFETY: lseek on an open descriptor.
        let start = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
        if start < 0 {
            break;
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(file.as_raw_fd(), start, libc::SEEK_HOLE) };
        segments.push((start as u64, end as u64));
        at = end;
    }
    segments
}

#[test]
fn a_thin_volume_is_compared_without_reading_its_holes() {
    const THIN_BYTES: u64 = 4 << 30;
    let source = Node::start_named("thin-a", "", "");
    let destination = Node::start_named("thin-b", "", "");
    let (source_volume, destination_volume) = (source.path("thin.img"), destination.path("thin.img"));
    for path in [&source_volume, &destination_volume] {
        std::fs::File::create(path).unwrap().set_len(THIN_BYTES).unwrap();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut data = vec![0u8; 1 << 20];
    let file = std::fs::OpenOptions::new().write(true).open(&source_volume).unwrap();
    for index in 0..64u64 {
        rng.fill(&mut data[..]);
        std::os::unix::fs::FileExt::write_all_at(&file, &data, index * (THIN_BYTES / 64)).unwrap();
    }
    source.create_group_on("rg01", "128MiB", &[("data", &source_volume)]);
    destination.create_group_on("rg02", "128MiB", &[("data", &destination_volume)]);
    let _ = source.partner_ok("rg01", &destination, "rg02", Some("sync"));
    source.wait_in_sync("rg01", IN_SYNC_TIMEOUT);
    // Equal without reading 4 GiB of holes twice: the 64 data regions match,
    // and the destination allocated nothing else (the rest reads as zeros).
    let (a, b) = (std::fs::File::open(&source_volume).unwrap(), std::fs::File::open(&destination_volume).unwrap());
    let (mut here, mut there) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for index in 0..64u64 {
        std::os::unix::fs::FileExt::read_exact_at(&a, &mut here, index * (THIN_BYTES / 64)).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&b, &mut there, index * (THIN_BYTES / 64)).unwrap();
        assert!(here == there, "data region {index} differs");
    }
    for (start, end) in data_segments(&b) {
        let region = start / (THIN_BYTES / 64) * (THIN_BYTES / 64);
        assert!(end <= region + (1 << 20), "the destination holds data at {start}..{end}, outside the data regions");
    }
    let p = source.partnership("rg01");
    assert_eq!(p["copy_bytes_sent"].as_u64().unwrap(), 64 << 20, "the source read its 64 MiB of data only: {p:#}");
    assert_eq!(p["sync"]["bytes_sent"].as_u64().unwrap(), 64 << 20, "{p:#}");
    let read = destination.partnership("rg02")["compare_bytes_read"].as_u64().unwrap();
    assert_eq!(read, 0, "the destination, all holes, read nothing");
}

/// kill -9 of either side in the middle of a seeded sync: after the restart
/// the sync resumes where the destination's copy stands (a killed source
/// compares again only the chunks that were in flight; a killed destination
/// resumes from its last checkpoint) and converges.
#[test]
fn a_sync_killed_on_either_side_resumes_and_converges() {
    const BIG_BYTES: u64 = 128 << 20;
    for victim in ["source", "destination"] {
        let mut source = Node::start_named("kill-a", "", "");
        let mut destination = Node::start_named("kill-b", "", "");
        let (source_volume, destination_volume) = (source.path("data.img"), destination.path("data.img"));
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let mut data = vec![0u8; BIG_BYTES as usize];
        rng.fill(&mut data[..]);
        std::fs::write(&source_volume, &data).unwrap();
        for block in (0..BIG_BYTES / BLOCK).step_by(10) {
            let at = (block * BLOCK) as usize;
            data[at] ^= 0xff;
        }
        std::fs::write(&destination_volume, &data).unwrap();
        drop(data);
        source.create_group_on("rg01", "128MiB", &[("data", &source_volume)]);
        destination.create_group_on("rg02", "128MiB", &[("data", &destination_volume)]);
        let _ = source.partner_ok("rg01", &destination, "rg02", Some("sync"));
        let compared = |node: &Node| node.partnership("rg01")["sync"]["bytes_compared"].as_u64().unwrap();
        let deadline = std::time::Instant::now() + IN_SYNC_TIMEOUT;
        while compared(&source) < BIG_BYTES / 4 {
            assert!(std::time::Instant::now() < deadline, "the sync never reached a quarter");
            std::thread::sleep(Duration::from_millis(20));
        }
        let before = compared(&source);
        assert!(before < BIG_BYTES, "{victim}: killed mid-sync, not after it ({before} bytes compared)");
        if victim == "source" {
            source.kill9();
            source.spawn();
        } else {
            destination.kill9();
            destination.spawn();
        }
        source.wait_in_sync("rg01", IN_SYNC_TIMEOUT);
        assert_eq!(md5(&source_volume), md5(&destination_volume), "{victim}: converged after the kill");
        let after = compared(&source);
        if victim == "source" {
            // The restarted source counts from where the destination's copy
            // stood: what it compares again is at most the chunks that were
            // in flight (the 16 MiB copy window, and acknowledgements on
            // their way).
            assert!(after + before <= BIG_BYTES + (24 << 20), "{victim}: {after} compared again after {before}");
        } else {
            assert!(after < 2 * BIG_BYTES, "{victim}: {after} bytes compared in all");
        }
    }
}

/// `--seeded` states that the destination holds an older copy: a destination
/// whose volume holds no data is refused with the reason, and nothing changes.
#[test]
fn seeded_is_refused_for_an_empty_destination() {
    let source = Node::start_named("empty-a", "", "");
    let destination = Node::start_named("empty-b", "", "");
    source.create_group("rg01", "128MiB", &[("data", 16 << 20)]);
    destination.create_group("rg02", "128MiB", &[("data", 16 << 20)]);
    let output = source.partner_with("rg01", &destination, "rg02", &["--seeded"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--seeded, but volume 0 of rg02 on empty-b") && stderr.contains("holds no data"),
        "{stderr}"
    );
    assert_eq!(source.group_status("rg01")["role"], "standalone", "nothing changed on the source");
    assert_eq!(destination.group_status("rg02")["role"], "standalone", "nor on the destination");
}

/// Online verify while replication runs: a block changed behind the
/// destination daemon's back (directly in its volume file) is found and
/// named, `--repair` sends it again, and a second pass finds nothing.
#[test]
fn online_verify_finds_a_block_changed_behind_the_destination_and_repairs_it() {
    let source = Node::start_named("verify-a", "", "");
    let destination = Node::start_named("verify-b", "", "");
    source.replicate_to(&destination, "128MiB", &[("data", 16 << 20)], "sync");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut data = vec![0u8; 8 << 20];
    rng.fill(&mut data[..]);
    let image = source.path("image.img");
    std::fs::write(&image, &data).unwrap();
    tandem_tests::run_ok(
        std::process::Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&image)
            .arg(source.nbd_uri("rg01", "data")),
    );
    source.wait_in_sync("rg01", IN_SYNC_TIMEOUT);
    let clean = source.cli(&["partnership", "verify", "--group", "rg01"]);
    assert!(clean.status.success(), "{}", String::from_utf8_lossy(&clean.stderr));
    assert!(String::from_utf8_lossy(&clean.stdout).contains("verified 16.0 MiB: 0 range(s) out of sync"), "{clean:?}");

    // Flip one byte of the destination's volume at 5 MiB + 4 KiB.
    let file = std::fs::OpenOptions::new().read(true).write(true).open(destination.path("rg02-data.img")).unwrap();
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, (5 << 20) + 4096).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 0xff], (5 << 20) + 4096).unwrap();
    file.sync_all().unwrap();

    let found = source.cli(&["partnership", "verify", "--group", "rg01", "--rate", "64MiB"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&found.stdout), String::from_utf8_lossy(&found.stderr));
    assert_eq!(found.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("out of sync: volume 0 (data) 5242880..6291456 (1.0 MiB)"), "{stdout}");
    assert!(stderr.contains("1 range(s) out of sync") && stderr.contains("--repair"), "{stderr}");
    let p = source.partnership("rg01");
    assert_eq!(p["verify"]["out_of_sync_ranges"], 1, "{p:#}");
    let events = source.cli_ok(&["events", "--json"]);
    assert!(
        events.contains("\"id\":6002") && events.contains("differs from the destination at 5242880..6291456"),
        "{events}"
    );

    let repaired = source.cli(&["partnership", "verify", "--group", "rg01", "--repair"]);
    assert!(repaired.status.success(), "{}", String::from_utf8_lossy(&repaired.stderr));
    assert!(String::from_utf8_lossy(&repaired.stdout).contains("1.0 MiB repaired"), "{repaired:?}");
    source.wait_in_sync("rg01", IN_SYNC_TIMEOUT);
    let again = source.cli(&["partnership", "verify", "--group", "rg01"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 range(s) out of sync"), "{again:?}");
    let mut source_bytes = vec![0u8; 16 << 20];
    let mut destination_bytes = vec![0u8; 16 << 20];
    std::fs::File::open(source.path("rg01-data.img")).unwrap().read_exact(&mut source_bytes).unwrap();
    std::fs::File::open(destination.path("rg02-data.img")).unwrap().read_exact(&mut destination_bytes).unwrap();
    assert!(source_bytes == destination_bytes, "the repair made the volumes equal");
}

/// The background mode (`verify_interval_seconds`) finds the same change
/// without being asked, and reports it as an event.
#[test]
fn background_verify_reports_divergence_by_itself() {
    let replication = "verify_interval_seconds = 1\nverify_rate_bytes_per_s = 67108864";
    let source = Node::start_named("bg-a", "", replication);
    let destination = Node::start_named("bg-b", "", "");
    source.replicate_to(&destination, "128MiB", &[("data", 8 << 20)], "async");
    let file = std::fs::OpenOptions::new().write(true).open(destination.path("rg02-data.img")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"silent corruption", 3 << 20).unwrap();
    file.sync_all().unwrap();
    source.wait_for_events(&[6001, 6002, 6003], Duration::from_secs(30));
    let events = source.cli_ok(&["events", "--json"]);
    assert!(events.contains("differs from the destination at 3145728..4194304"), "{events}");
}
