//! A channel's sizes and limits, and the registered memory they take.

use std::time::Duration;

/// Sizes and limits of a channel (both ends must use the same).
#[derive(Debug, Clone, Copy)]
pub struct ChannelConfig {
    /// Largest payload of one message.
    pub message_bytes: usize,
    /// Receive buffers posted, and so credits granted at the start (≥ 4).
    pub window: u32,
    /// Longest wait for a credit, a message or a connection event.
    pub timeout: Duration,
    /// Memory registered with the channel from which payloads are lent
    /// rather than copied (the engine's arena); `None`: every payload is
    /// copied into send slots. Either way the channel reads what its peer lends.
    pub lend: Option<LendRegion>,
}

/// A registered region whose bytes a channel sends without copying them: a
/// part of at least `threshold_bytes` that lies in it is lent (it travels
/// as a descriptor the peer reads with RDMA READ); a smaller one (of 2 KiB
/// or more) goes out by the adapter gathering it from where it is, in the
/// same SEND as the bytes around it.
#[derive(Debug, Clone, Copy)]
pub struct LendRegion {
    pub address: usize,
    pub bytes: usize,
    pub threshold_bytes: usize,
}

impl LendRegion {
    /// Whether `part` lies wholly in the region.
    #[must_use]
    pub fn contains(&self, part: &[u8]) -> bool {
        let start = part.as_ptr() as usize;
        start >= self.address && start + part.len() <= self.address + self.bytes
    }
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self { message_bytes: 64 << 10, window: 32, timeout: Duration::from_secs(10), lend: None }
    }
}

impl ChannelConfig {
    /// Registered bytes of one channel: `window` receive and send slots,
    /// and the lending region (registered again by every channel).
    #[must_use]
    pub fn registered_bytes(&self) -> u64 {
        2 * u64::from(self.window) * self.message_bytes as u64 + self.lend.map_or(0, |l| l.bytes as u64)
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        if self.window < 4 || self.window > 4096 {
            return Err(format!("an RDMA channel window of {} buffers: use 4 to 4096", self.window));
        }
        if self.message_bytes == 0 || self.message_bytes > 16 << 20 {
            return Err(format!("RDMA messages of {} bytes: use 1 byte to 16 MiB", self.message_bytes));
        }
        crate::memlock::check(self.registered_bytes())
    }
}
