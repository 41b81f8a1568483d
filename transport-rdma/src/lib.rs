//! Tandem's RDMA transport, through verbs and rdma_cm (the `sideway`
//! crate): the devices a node has and whether a path can use one
//! ([`devices`]), the memory-lock limit registered buffers need
//! ([`memlock`]), and a reliable-connected channel that moves messages by
//! SEND/RECV into pre-posted registered buffers under credit-based flow
//! control ([`channel`]): a message is sent only into a receive buffer the
//! peer granted, so a burst never meets an unposted buffer (no RNR retry).
//!
//! [`wire::RdmaWire`] makes a channel a partnership's data channel: the
//! engine drives it on the group's core through its `MessageWire` seam
//! (docs/ARCHITECTURE.md, "RDMA").

pub mod channel;
mod config;
pub mod connection;
pub mod devices;
pub mod memlock;
pub mod wire;

pub use channel::RdmaChannel;
pub use config::{ChannelConfig, LendRegion};
pub use connection::RdmaListener;
