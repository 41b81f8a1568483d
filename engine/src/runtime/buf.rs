//! Buffers aligned for O_DIRECT. A buffer is zeroed when handed out, so
//! padding sectors of log records never carry stale memory to disk.
//!
//! Large buffers come from the registered arena when one is installed
//! (`arena.rs`, for RDMA). Other freed buffers go back to a pool of the
//! freeing thread (bounded, by size) and are reused: allocating and freeing a fresh 68 KiB buffer for every
//! 64 KiB write made the allocator return pages to the kernel and fault them
//! in again: page faults and page clearing were 8 % of the CPU of a 64 KiB
//! QD32 replicated run; with the pool a 64 KiB QD32 run on a standalone group
//! takes 7 thousand page faults in 5 s instead of 540 thousand.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every direct-IO buffer: the largest sector size in common use,
/// and the page size.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// Bytes of freed buffers one thread keeps for reuse.
const POOL_BYTES_PER_THREAD: usize = 64 << 20;

/// Freed allocations by capacity, and their total bytes.
#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<NonNull<u8>>>,
    bytes: usize,
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (capacity, list) in self.free.drain() {
            for ptr in list {
                // SAFETY: allocated in `AlignedBuf::zeroed` with this capacity's layout.
                unsafe { dealloc(ptr.as_ptr(), AlignedBuf::layout(capacity)) }
            }
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// A heap buffer aligned to [`DIRECT_IO_ALIGN`]. Its memory never moves, so the
/// kernel may read or write it while an io_uring operation holds its pointer;
/// the owner keeps it alive until the completion arrives.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` > 0).
    #[must_use]
    pub fn zeroed(len: usize) -> Self {
        Self::zeroed_around(len, 0..0)
    }

    /// A buffer of `len` bytes (`len` > 0), zeroed outside `fill`, whose
    /// bytes in `fill` the caller overwrites before anything reads them: a
    /// reused buffer keeps its old bytes there instead of being cleared
    /// first. A 64 KiB write's payload is received straight into it, and
    /// clearing it before was 2 % of a replicated 64 KiB QD32 run's CPU.
    /// Only the header sector and the tail padding, which reach the disk
    /// as they are, must be zero.
    #[must_use]
    pub fn zeroed_around(len: usize, fill: std::ops::Range<usize>) -> Self {
        assert!(len > 0, "empty aligned buffer");
        assert!(fill.start <= fill.end && fill.end <= len, "fill range {fill:?} outside a buffer of {len} bytes");
        let capacity = Self::capacity_for(len);
        let reused = super::arena::installed().and_then(|arena| arena.take(capacity)).or_else(|| {
            POOL.try_with(|pool| {
                let mut pool = pool.borrow_mut();
                let ptr = pool.free.get_mut(&capacity)?.pop()?;
                pool.bytes -= capacity;
                Some(ptr)
            })
            .ok()
            .flatten()
        });
        if let Some(ptr) = reused {
            // SAFETY: an arena or pooled allocation of `capacity` >= len
            // bytes, owned by nobody else and initialised by its earlier use
            // (or zeroed when it was made); both ranges lie within len.
            unsafe {
                std::ptr::write_bytes(ptr.as_ptr(), 0, fill.start);
                std::ptr::write_bytes(ptr.as_ptr().add(fill.end), 0, len - fill.end);
            }
            return Self { ptr, len };
        }
        let layout = Self::layout(capacity);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }

    /// Allocations are whole pages, so buffers of nearby sizes share them.
    fn capacity_for(len: usize) -> usize {
        len.next_multiple_of(DIRECT_IO_ALIGN)
    }

    fn layout(capacity: usize) -> Layout {
        Layout::from_size_align(capacity, DIRECT_IO_ALIGN).expect("buffer size fits in isize")
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to len initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let capacity = Self::capacity_for(self.len);
        let ptr = self.ptr;
        if let Some(arena) = super::arena::installed().filter(|arena| arena.owns(ptr)) {
            arena.give_back(ptr, capacity);
            return;
        }
        let pooled = POOL
            .try_with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.bytes + capacity > POOL_BYTES_PER_THREAD {
                    return false;
                }
                pool.bytes += capacity;
                pool.free.entry(capacity).or_default().push(ptr);
                true
            })
            .unwrap_or(false);
        if !pooled {
            // SAFETY: allocated in `zeroed` with this capacity's layout.
            unsafe { dealloc(ptr.as_ptr(), Self::layout(capacity)) }
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_buffer_is_zeroed_again() {
        let mut first = AlignedBuf::zeroed(12 * 1024);
        first.fill(0xAB);
        let address = first.as_ptr() as usize;
        drop(first);
        let second = AlignedBuf::zeroed(11 * 1024);
        assert_eq!(second.as_ptr() as usize, address, "the freed allocation of the same capacity is reused");
        assert!(second.iter().all(|&b| b == 0), "no byte of the previous use shows");
        assert_eq!(second.len(), 11 * 1024);
    }

    #[test]
    fn a_buffer_zeroed_around_its_fill_range_is_zero_outside_it() {
        let mut first = AlignedBuf::zeroed(12 * 1024);
        first.fill(0xAB);
        let address = first.as_ptr() as usize;
        drop(first);
        let second = AlignedBuf::zeroed_around(12 * 1024, 4096..9000);
        assert_eq!(second.as_ptr() as usize, address, "the freed allocation is reused");
        assert!(second[..4096].iter().chain(&second[9000..]).all(|&b| b == 0), "zero outside the fill range");
        assert!(second[4096..9000].iter().all(|&b| b == 0xAB), "the fill range is left for the caller to overwrite");
    }

    /// With the registered arena installed, large buffers come from it, are
    /// zeroed like any other, and go back to it when dropped (from any
    /// thread); small ones stay on the heap.
    #[test]
    fn large_buffers_come_from_the_arena_once_installed() {
        let arena = super::super::arena::install(8 << 20, 16 << 10)
            .or_else(|_| super::super::arena::installed().ok_or("no arena"))
            .unwrap();
        let mut large = AlignedBuf::zeroed(68 << 10);
        assert!(arena.contains(&large), "a 68 KiB buffer lies in the arena");
        large.fill(0xCD);
        let address = large.as_ptr() as usize;
        std::thread::spawn(move || drop(large)).join().unwrap();
        let again = AlignedBuf::zeroed(66 << 10);
        assert_eq!(again.as_ptr() as usize, address, "the same class's freed buffer comes back");
        assert!(again.iter().all(|&b| b == 0), "zeroed again");
        let small = AlignedBuf::zeroed(8 << 10);
        assert!(!arena.contains(&small), "below the threshold: the heap");
    }

    #[test]
    fn is_aligned_zeroed_and_writable() {
        let mut buf = AlignedBuf::zeroed(8192);
        assert_eq!(buf.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
        assert!(buf.iter().all(|&b| b == 0));
        buf[8191] = 1;
        assert_eq!(buf[8191], 1);
        assert_eq!(buf.len(), 8192);
    }
}
