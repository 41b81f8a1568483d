use super::*;
use crate::runtime::device::{open_device, OpenMode};

const VOLUME_BYTES: usize = 300_000;

struct Fixture {
    dir: PathBuf,
    volumes: Vec<Device>,
}

impl Fixture {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("tandem-snapshots-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let original: Vec<u8> = (0..VOLUME_BYTES).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join("volume"), &original).unwrap();
        let volumes = vec![open_device(&dir.join("volume"), OpenMode::VolumeBuffered).unwrap()];
        Self { dir, volumes }
    }

    fn open(&self, checkpoint_lsn: u64, max_bytes: u64) -> SnapshotSet {
        SnapshotSet::open(self.dir.join("snapshots"), max_bytes, checkpoint_lsn).unwrap()
    }

    /// A volume change as the runtime makes it: preserved, committed, written.
    fn change(&self, set: &mut SnapshotSet, offset: u64, bytes: &[u8], lsn: u64) {
        set.preserve(&self.volumes, (0, offset, bytes.len() as u64), Some(lsn));
        set.commit();
        self.volumes[0].file.write_all_at(bytes, offset).unwrap();
    }

    fn image(&self, set: &SnapshotSet, name: &str) -> Vec<u8> {
        set.read(&self.volumes, name, (0, 0, VOLUME_BYTES as u32)).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_snapshot_keeps_the_volume_as_it_was_across_reopening() {
    let fixture = Fixture::new();
    let before = std::fs::read(fixture.dir.join("volume")).unwrap();
    let mut set = fixture.open(0, 1 << 20);
    set.replay_done();
    assert_eq!(set.take("before-upgrade", 5, &fixture.volumes).unwrap(), "before-upgrade");
    fixture.change(&mut set, 60_000, &[0xee; 10_000], 6);
    fixture.change(&mut set, 70_000, &[0xdd; 100], 7);
    assert_eq!(fixture.image(&set, "before-upgrade"), before);
    assert_eq!(set.list()[0].used_bytes, 2 * SNAPSHOT_BLOCK_BYTES, "two blocks touched, each kept once");
    drop(set);
    let set = fixture.open(7, 1 << 20);
    assert_eq!(fixture.image(&set, "before-upgrade"), before, "the journal brings the blocks back");
    assert_eq!(set.list()[0].lsn, 5);
}

#[test]
fn blocks_not_committed_before_a_crash_are_not_in_the_snapshot() {
    let fixture = Fixture::new();
    let before = std::fs::read(fixture.dir.join("volume")).unwrap();
    let mut set = fixture.open(0, 1 << 20);
    set.take("s", 3, &fixture.volumes).unwrap();
    // Preserved but never committed: the volume write never started either.
    set.preserve(&fixture.volumes, (0, 0, 4096), Some(4));
    assert!(set.has_uncommitted());
    drop(set);
    let set = fixture.open(3, 1 << 20);
    assert_eq!(set.list()[0].used_bytes, 0);
    assert_eq!(fixture.image(&set, "s"), before);
}

#[test]
fn a_replay_leaves_records_before_a_pending_snapshot_to_the_volume() {
    let fixture = Fixture::new();
    let mut set = fixture.open(0, 1 << 20);
    set.take("s", 10, &fixture.volumes).unwrap();
    drop(set);
    // Reopened with the checkpoint before the snapshot: its record is ahead.
    let mut set = fixture.open(8, 1 << 20);
    fixture.change(&mut set, 0, &[1; 4096], 9);
    assert_eq!(set.take("s", 10, &fixture.volumes).unwrap(), "s", "the replayed record finds its snapshot");
    let at_snapshot = std::fs::read(fixture.dir.join("volume")).unwrap();
    fixture.change(&mut set, 0, &[2; 4096], 11);
    set.replay_done();
    fixture.change(&mut set, 100_000, &[3; 4096], 1);
    assert_eq!(fixture.image(&set, "s"), at_snapshot, "LSN 9 is in it, LSN 11 and later changes are not");
}

#[test]
fn a_full_snapshot_breaks_for_good_and_replication_goes_on() {
    let fixture = Fixture::new();
    let mut set = fixture.open(0, 2 * SNAPSHOT_BLOCK_BYTES);
    set.replay_done();
    set.take("small", 1, &fixture.volumes).unwrap();
    fixture.change(&mut set, 0, &vec![9u8; 3 * SNAPSHOT_BLOCK_BYTES as usize], 2);
    let refused = set.read(&fixture.volumes, "small", (0, 0, 512)).unwrap_err();
    assert!(refused.contains("full") && refused.contains("snapshot_max_bytes"), "{refused}");
    drop(set);
    let set = fixture.open(2, 2 * SNAPSHOT_BLOCK_BYTES);
    assert!(set.list()[0].broken.as_deref().unwrap_or_default().contains("full"), "{:?}", set.list());
}

#[test]
fn a_deleted_snapshot_is_not_taken_again_by_a_replay() {
    let fixture = Fixture::new();
    let mut set = fixture.open(0, 1 << 20);
    set.take("gone", 4, &fixture.volumes).unwrap();
    set.delete("gone").unwrap();
    drop(set);
    let mut set = fixture.open(3, 1 << 20);
    set.take("gone", 4, &fixture.volumes).unwrap();
    assert!(set.list().is_empty(), "the replayed record of a deleted snapshot takes nothing");
    drop(set);
    let set = fixture.open(4, 1 << 20);
    assert!(set.deleted.is_empty(), "past the checkpoint the tombstone goes");
    assert_eq!(std::fs::read_dir(fixture.dir.join("snapshots")).unwrap().count(), 0);
    assert!(set.read(&fixture.volumes, "gone", (0, 0, 1)).unwrap_err().contains("no snapshot named gone"));
}

#[test]
fn names_are_checked_and_a_taken_name_is_kept_apart() {
    let fixture = Fixture::new();
    let mut set = fixture.open(0, 1 << 20);
    for bad in ["", ".hidden", "a/b", "test", &"x".repeat(65)] {
        assert!(set.check_new_name(bad).is_err(), "{bad:?} accepted");
    }
    set.take("daily", 2, &fixture.volumes).unwrap();
    assert!(set.check_new_name("daily").unwrap_err().contains("exists already"));
    assert_eq!(set.take("daily", 9, &fixture.volumes).unwrap(), "daily-lsn9");
    assert_eq!(set.list().len(), 2);
}
