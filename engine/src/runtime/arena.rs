//! Memory that a message transport registers once, so that large payloads
//! cross without a CPU copy. When a node replicates over RDMA, every
//! direct-IO buffer of at least the lending threshold comes from here: the
//! record buffer a source's log writes, the sealed copy of an encrypted
//! payload, the buffer a destination gathers a payload into. The transport
//! registers the whole mapping with each channel, so the peer's adapter can
//! read a payload straight out of the source's record buffer into the
//! destination's (docs/ARCHITECTURE.md, "RDMA (as built)").
//!
//! One anonymous mapping, installed once at start and never unmapped (a
//! registration may outlive any one buffer, never the memory), carved into
//! size classes on demand; a freed buffer goes back to its class through a
//! lock-free queue, from whichever thread frees it. Memory carved for one
//! class stays in that class. When a class has nothing free and the mapping
//! is used up, buffers come from the heap, and the transport copies those
//! as it copies small ones.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crossbeam_queue::SegQueue;

use super::buf::DIRECT_IO_ALIGN;

/// Size classes per doubling: a buffer wastes at most a fifth of its class.
const CLASSES_PER_DOUBLING: usize = 4;
/// The largest buffer the arena serves: a 4 MiB write and its header sector.
pub const MAX_BUFFER_BYTES: usize = (4 << 20) + DIRECT_IO_ALIGN;

/// The registered mapping and its free buffers.
pub struct Arena {
    base: NonNull<u8>,
    bytes: usize,
    /// Buffers at least this large come from the arena.
    min_buffer_bytes: usize,
    /// Bytes carved into classes so far.
    carved: AtomicUsize,
    class_bytes: Vec<usize>,
    free: Vec<SegQueue<usize>>,
    /// Buffers asked for that the arena could not serve (the heap did).
    misses: AtomicUsize,
}

// SAFETY: the mapping lives for the whole process and the arena hands each
// byte of it to one owner at a time (through atomics and lock-free queues).
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

static ARENA: OnceLock<Arena> = OnceLock::new();

impl Drop for Arena {
    fn drop(&mut self) {
        // Only arenas of unit tests drop: the installed one lives as long
        // as the process.
        // SAFETY: the mapping made in `map`, no longer used by anyone.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

/// Maps `bytes` (rounded up to pages) once for the whole process; buffers of
/// `min_buffer_bytes` and more then come from it. A second call keeps the
/// first arena and says so.
pub fn install(bytes: usize, min_buffer_bytes: usize) -> Result<&'static Arena, String> {
    if let Some(arena) = ARENA.get() {
        return Err(format!("the registered buffer arena is installed already ({} bytes)", arena.bytes));
    }
    let arena = Arena::map(bytes, min_buffer_bytes)?;
    Ok(ARENA.get_or_init(|| arena))
}

/// The arena, once installed.
#[must_use]
pub fn installed() -> Option<&'static Arena> {
    ARENA.get()
}

impl Arena {
    fn map(bytes: usize, min_buffer_bytes: usize) -> Result<Self, String> {
        let bytes = bytes.next_multiple_of(DIRECT_IO_ALIGN);
        if bytes < MAX_BUFFER_BYTES {
            return Err(format!(
                "a registered buffer arena of {bytes} bytes cannot hold one buffer of {MAX_BUFFER_BYTES}: \
                 use at least {} MiB",
                MAX_BUFFER_BYTES.div_ceil(1 << 20)
            ));
        }
        let min_buffer_bytes = min_buffer_bytes.clamp(DIRECT_IO_ALIGN, MAX_BUFFER_BYTES);
        // SAFETY: a fresh private anonymous mapping, owned by the arena.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            let error = std::io::Error::last_os_error();
            return Err(format!("cannot map a registered buffer arena of {bytes} bytes: {error}"));
        }
        let base = NonNull::new(raw.cast::<u8>()).expect("mmap returned a mapping");
        let class_bytes = class_sizes(min_buffer_bytes);
        let free = class_bytes.iter().map(|_| SegQueue::new()).collect();
        Ok(Self {
            base,
            bytes,
            min_buffer_bytes,
            carved: AtomicUsize::new(0),
            class_bytes,
            free,
            misses: AtomicUsize::new(0),
        })
    }

    /// The mapping's address and length, for registration.
    #[must_use]
    pub fn region(&self) -> (usize, usize) {
        (self.base.as_ptr() as usize, self.bytes)
    }

    /// Whether `bytes` lie wholly inside the arena.
    #[must_use]
    pub fn contains(&self, bytes: &[u8]) -> bool {
        let (start, len) = (bytes.as_ptr() as usize, bytes.len());
        let base = self.base.as_ptr() as usize;
        start >= base && start + len <= base + self.bytes
    }

    /// Buffers of at least this many bytes come from the arena.
    #[must_use]
    pub fn min_buffer_bytes(&self) -> usize {
        self.min_buffer_bytes
    }

    /// How many buffers the heap served because the arena was used up.
    #[must_use]
    pub fn misses(&self) -> usize {
        self.misses.load(Ordering::Relaxed)
    }

    /// A buffer of `capacity` bytes (`None`: not an arena size, or none
    /// left). Its bytes are not zeroed.
    pub(super) fn take(&self, capacity: usize) -> Option<NonNull<u8>> {
        let class = self.class_of(capacity)?;
        if let Some(offset) = self.free[class].pop() {
            return Some(self.at(offset));
        }
        let size = self.class_bytes[class];
        let carved = self.carved.fetch_update(Ordering::AcqRel, Ordering::Acquire, |carved| {
            (carved + size <= self.bytes).then_some(carved + size)
        });
        match carved {
            Ok(offset) => Some(self.at(offset)),
            Err(_) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Returns a buffer that [`Self::take`] gave for `capacity`.
    pub(super) fn give_back(&self, ptr: NonNull<u8>, capacity: usize) {
        let class = self.class_of(capacity).expect("an arena buffer has an arena size");
        let offset = ptr.as_ptr() as usize - self.base.as_ptr() as usize;
        assert!(offset + self.class_bytes[class] <= self.bytes, "a buffer given back lies in the arena");
        self.free[class].push(offset);
    }

    /// Whether `ptr` was handed out by this arena.
    pub(super) fn owns(&self, ptr: NonNull<u8>) -> bool {
        let (address, base) = (ptr.as_ptr() as usize, self.base.as_ptr() as usize);
        address >= base && address < base + self.bytes
    }

    fn class_of(&self, capacity: usize) -> Option<usize> {
        if capacity < self.min_buffer_bytes || capacity > MAX_BUFFER_BYTES {
            return None;
        }
        Some(self.class_bytes.partition_point(|&size| size < capacity))
    }

    fn at(&self, offset: usize) -> NonNull<u8> {
        // SAFETY: offsets handed out lie inside the mapping.
        unsafe { NonNull::new_unchecked(self.base.as_ptr().add(offset)) }
    }
}

/// Class sizes from `min` up to [`MAX_BUFFER_BYTES`]: page multiples,
/// [`CLASSES_PER_DOUBLING`] steps per doubling.
fn class_sizes(min: usize) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut doubling = min.next_power_of_two() / 2;
    while sizes.last().is_none_or(|&last| last < MAX_BUFFER_BYTES) {
        for step in 1..=CLASSES_PER_DOUBLING {
            let size = (doubling + doubling * step / CLASSES_PER_DOUBLING).next_multiple_of(DIRECT_IO_ALIGN);
            if size >= min && sizes.last().is_none_or(|&last| size > last) {
                sizes.push(size.min(MAX_BUFFER_BYTES));
            }
        }
        doubling *= 2;
    }
    sizes.dedup();
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_every_size_with_little_waste() {
        let sizes = class_sizes(16 << 10);
        assert_eq!(sizes[0], 16 << 10);
        assert_eq!(*sizes.last().unwrap(), MAX_BUFFER_BYTES);
        assert!(sizes.windows(2).all(|w| w[0] < w[1] && w[1] as f64 / w[0] as f64 <= 1.25 + 1e-9), "{sizes:?}");
        assert!(sizes.iter().all(|s| s % DIRECT_IO_ALIGN == 0));
        // A 64 KiB write's record buffer (a header sector more) takes 80 KiB.
        let arena = Arena::map(8 << 20, 16 << 10).unwrap();
        assert_eq!(arena.class_bytes[arena.class_of(68 << 10).unwrap()], 80 << 10);
        assert_eq!(arena.class_of(12 << 10), None, "below the threshold: the heap");
        assert_eq!(arena.class_of(MAX_BUFFER_BYTES + 1), None, "above the largest class: the heap");
    }

    #[test]
    fn buffers_are_reused_by_class_and_the_heap_serves_when_it_is_full() {
        let arena = Arena::map(MAX_BUFFER_BYTES, 16 << 10).unwrap();
        let first = arena.take(64 << 10).unwrap();
        let second = arena.take(64 << 10).unwrap();
        assert_ne!(first, second);
        assert!(arena.owns(first) && arena.owns(second));
        arena.give_back(first, 64 << 10);
        assert_eq!(arena.take(60 << 10), Some(first), "a freed buffer of the class comes back first");
        assert!(arena.take(MAX_BUFFER_BYTES).is_none(), "what is left cannot hold the largest class");
        assert_eq!(arena.misses(), 1);
        let (base, len) = arena.region();
        // SAFETY: inside the mapping, which lives as long as `arena`.
        let inside = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
        assert!(arena.contains(&inside[4096..8192]));
        assert!(!arena.contains(&[0u8; 8]));
    }

    #[test]
    fn an_arena_too_small_for_one_buffer_is_refused() {
        let refused = Arena::map(1 << 20, 16 << 10).err().unwrap();
        assert!(refused.contains("use at least 5 MiB"), "{refused}");
    }
}
