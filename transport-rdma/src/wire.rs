//! The engine's [`MessageWire`] over an [`RdmaChannel`]: a partnership's
//! data channel on RDMA, driven by its group's core.

use std::net::IpAddr;

use tandem_engine::runtime::wire::{MessageWire, Sent};

use crate::channel::RdmaChannel;

/// An RDMA channel as a replication channel, with what status shows of it.
pub struct RdmaWire {
    channel: RdmaChannel,
    description: String,
    peer: String,
}

// SAFETY: the verbs objects a channel holds (queue pair, completion queue
// and channel, protection domain, memory region, rdma_cm id) may be used
// from any thread (libibverbs and librdmacm are thread-safe); the channel is
// moved to its group's core and used by that one thread only.
unsafe impl Send for RdmaWire {}

impl RdmaWire {
    /// `local` is the address whose RDMA device the channel uses, `peer`
    /// the other end (for status and logs).
    #[must_use]
    pub fn new(channel: RdmaChannel, local: IpAddr, peer: String) -> Self {
        let device = crate::devices::path_for(local)
            .map_or_else(|_| "unknown device".to_owned(), |p| format!("{} port {} gid {}", p.device, p.port, p.gid));
        let description = format!("rdma {device} {local} -> {peer}");
        Self { channel, description, peer }
    }
}

impl MessageWire for RdmaWire {
    fn try_send(&mut self, parts: &[&[u8]]) -> Result<Sent, String> {
        let (bytes, lent) = self.channel.try_send_or_lend(parts)?;
        Ok(Sent { bytes, lent })
    }

    fn take_released(&mut self) -> Option<u64> {
        self.channel.take_released()
    }

    fn lent_and_read_bytes(&self) -> (u64, u64) {
        self.channel.lent_and_read_bytes()
    }

    fn poll_into(&mut self, into: &mut [u8]) -> Result<usize, String> {
        self.channel.poll_into(into)
    }

    fn poll_into_landing(&mut self, into: &mut [u8]) -> Result<usize, String> {
        self.channel.poll_into_landing(into)
    }

    fn landed_through(&self) -> u64 {
        self.channel.landed_through()
    }

    fn arm(&mut self) -> Result<bool, String> {
        self.channel.arm()
    }

    fn notified(&mut self) {
        self.channel.notified();
    }

    fn completion_fd(&self) -> std::os::fd::RawFd {
        self.channel.completion_fd()
    }

    fn disconnect(&mut self) {
        self.channel.disconnect();
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }
}
