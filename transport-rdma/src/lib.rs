//! Tandem's RDMA transport, through verbs and rdma_cm (the `sideway`
//! crate): the devices a node has and whether a path can use one
//! ([`devices`]), the memory-lock limit registered buffers need
//! ([`memlock`]), and a reliable-connected channel that moves messages by
//! SEND/RECV into pre-posted registered buffers under credit-based flow
//! control ([`channel`]): a message is sent only into a receive buffer the
//! peer granted, so a burst never meets an unposted buffer (no RNR retry).
//!
//! This is the foundation the replication transport is built on; the
//! partnership does not use it yet (docs/ARCHITECTURE.md, "RDMA").

pub mod channel;
pub mod devices;
pub mod memlock;

pub use channel::{ChannelConfig, RdmaChannel, RdmaListener};
