//! Opening logs and volumes: files or block devices, exclusive ownership, sector
//! size and size discovery, and the O_DIRECT fallback.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Sector size used for regular files: the page size, which every Linux
/// filesystem accepts for O_DIRECT.
pub const FILE_SECTOR_BYTES: u32 = 4096;

// Block-device ioctls from <linux/fs.h>; the libc crate does not export them.
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// A file or block device opened for Tandem.
#[derive(Debug)]
pub struct Device {
    pub file: File,
    pub is_block: bool,
    pub size_bytes: u64,
    /// The unit of direct IO: max(logical, physical) block size for devices, so
    /// a 512e drive is never made to read-modify-write; 4096 for files.
    pub sector_bytes: u32,
    /// False when the filesystem refused O_DIRECT and O_DSYNC alone is used.
    pub direct_io: bool,
    /// For volumes: a second descriptor of the same file with O_DIRECT, used
    /// for sector-aligned writes straight from the record buffer (no copy, no
    /// dirty page cache for checkpoints to flush). `None` when the filesystem
    /// refuses O_DIRECT; the buffered descriptor then takes every write.
    pub direct_file: Option<File>,
}

/// How a path is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The log: O_DIRECT (when allowed) + O_DSYNC, so every write is
    /// write-through and durable when it completes.
    LogWriteThrough,
    /// A volume: a buffered descriptor (reads, unaligned writes) plus an
    /// O_DIRECT one (aligned writes); made durable by fdatasync at checkpoints.
    VolumeBuffered,
}

/// Opens `path`, takes exclusive ownership (flock for files, O_EXCL for block
/// devices, which the kernel refuses while the device is mounted or claimed)
/// and reads its geometry. Errors name the path and the cause.
pub fn open_device(path: &Path, mode: OpenMode) -> io::Result<Device> {
    let metadata = std::fs::metadata(path).map_err(|e| annotate(path, e, "cannot access"))?;
    let is_block = metadata.file_type().is_block_device();
    if !is_block && !metadata.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is neither a regular file nor a block device", path.display()),
        ));
    }
    let mut flags = if is_block { libc::O_EXCL } else { 0 };
    if mode == OpenMode::LogWriteThrough {
        flags |= libc::O_DSYNC;
    }
    let (file, direct_io) = if mode == OpenMode::LogWriteThrough {
        match open_with(path, flags | libc::O_DIRECT) {
            Ok(file) => (file, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    path = %path.display(),
                    "the filesystem refuses O_DIRECT; the log uses O_DSYNC alone (durable, but through the page cache)"
                );
                (open_with(path, flags)?, false)
            }
            Err(e) => return Err(e),
        }
    } else {
        (open_with(path, flags)?, false)
    };
    if !is_block {
        lock_exclusive(&file, path)?;
    }
    let (size_bytes, sector_bytes) =
        if is_block { block_geometry(&file, path)? } else { (metadata.len(), FILE_SECTOR_BYTES) };
    let direct_file = if mode == OpenMode::VolumeBuffered {
        // Without O_EXCL: the first descriptor already holds the device's claim.
        match open_with(path, libc::O_DIRECT) {
            Ok(direct) => Some(direct),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    Ok(Device { file, is_block, size_bytes, sector_bytes, direct_io, direct_file })
}

impl Device {
    /// The O_DIRECT descriptor when `length` bytes at `offset` are whole
    /// sectors (the caller's buffer must be sector-aligned too).
    #[must_use]
    pub fn direct_file_for(&self, offset: u64, length: u64) -> Option<&File> {
        let sector = u64::from(self.sector_bytes);
        self.direct_file.as_ref().filter(|_| offset.is_multiple_of(sector) && length.is_multiple_of(sector))
    }

    /// The descriptor for IO of `length` bytes at `offset` from an aligned
    /// buffer: the O_DIRECT one when the range is whole sectors (no page
    /// cache), else the buffered one.
    #[must_use]
    pub fn io_fd(&self, offset: u64, length: u64) -> std::os::fd::RawFd {
        self.direct_file_for(offset, length).unwrap_or(&self.file).as_raw_fd()
    }
}

/// Opens `path` with `flags`. An exclusive claim of a block device (O_EXCL)
/// that is busy is tried again for [`LOCK_WAIT`]: the last reference of a
/// descriptor closed by io_uring's workers, or by a killed process's ring, is
/// put asynchronously, so a device this daemon (or its previous life) just
/// released can look claimed for a moment.
fn open_with(path: &Path, flags: libc::c_int) -> io::Result<File> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match OpenOptions::new().read(true).write(true).custom_flags(flags).open(path) {
            Ok(file) => return Ok(file),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                if flags & libc::O_EXCL == 0 || std::time::Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::ResourceBusy,
                        format!(
                            "{} is in use (mounted, or claimed by another program); release it first",
                            path.display()
                        ),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(annotate(path, e, "cannot open")),
        }
    }
}

/// How long to wait for a lock held by a process that is going away: the
/// kernel tears down a killed process's io_uring asynchronously, and its
/// in-flight requests keep the files (and their locks) for a moment.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn lock_exclusive(file: &File, path: &Path) -> io::Result<()> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        // SAFETY: flock on a valid, owned descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(annotate(path, error, "cannot lock"));
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "{} is held by another process (flock, waited {} s); stop that process or choose another path",
                    path.display(),
                    LOCK_WAIT.as_secs()
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn block_geometry(file: &File, path: &Path) -> io::Result<(u64, u32)> {
    let fd = file.as_raw_fd();
    let mut logical: libc::c_int = 0;
    let mut physical: libc::c_uint = 0;
    let mut size: u64 = 0;
    // SAFETY: each ioctl writes one integer of the declared type into the pointee.
    let rcs = unsafe {
        [
            libc::ioctl(fd, BLKSSZGET, &mut logical),
            libc::ioctl(fd, BLKPBSZGET, &mut physical),
            libc::ioctl(fd, BLKGETSIZE64, &mut size),
        ]
    };
    if rcs.iter().any(|&rc| rc != 0) {
        return Err(annotate(path, io::Error::last_os_error(), "cannot read the block device geometry of"));
    }
    let sector = u32::try_from(logical).unwrap_or(512).max(physical);
    Ok((size, sector))
}

fn annotate(path: &Path, error: io::Error, what: &str) -> io::Error {
    io::Error::new(error.kind(), format!("{what} {}: {error}", path.display()))
}

/// Positioned read of exactly `buf.len()` bytes.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

/// Positioned write of all of `buf`.
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

/// fallocate(2) with `mode` on `[offset, offset + length)`.
pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, length: u64) -> io::Result<()> {
    let to_off = |v: u64| libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW));
    // SAFETY: fallocate on a valid descriptor; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, to_off(offset)?, to_off(length)?) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// fdatasync(2).
pub fn fdatasync(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// True when `start..end` of the file holds data (SEEK_DATA finds some before
/// `end`). Holes of thin volumes read as zeros and need not be copied; block
/// devices and filesystems without hole reporting always answer true.
#[must_use]
pub fn has_data(file: &File, start: u64, end: u64) -> bool {
    let Ok(offset) = libc::off_t::try_from(start) else { return true };
    // SAFETY: lseek on a descriptor we own; SEEK_DATA only reads metadata.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_DATA) };
    if found < 0 {
        // ENXIO: no data after `start` at all.
        return io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO);
    }
    (found as u64) < end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_of_a_file_is_refused_while_locked() {
        let dir = std::env::temp_dir().join(format!("tandem-device-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vol.img");
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let first = open_device(&path, OpenMode::VolumeBuffered).unwrap();
        assert_eq!((first.size_bytes, first.sector_bytes, first.is_block), (1 << 20, 4096, false));
        assert!(first.direct_file.is_some(), "volumes get an O_DIRECT descriptor for aligned writes");
        let second = open_device(&path, OpenMode::VolumeBuffered).unwrap_err();
        assert!(second.to_string().contains("held by another process"), "{second}");
        drop(first);
        let log = open_device(&path, OpenMode::LogWriteThrough).unwrap();
        assert!(log.direct_io, "ext4 and xfs accept O_DIRECT");
        let missing = open_device(&dir.join("missing"), OpenMode::VolumeBuffered).unwrap_err();
        assert!(missing.to_string().contains("cannot access"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
