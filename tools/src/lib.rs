//! The binaries' shared code: configuration, the management API and its
//! protocol, the group registry, and human-friendly sizes. Engine logic stays
//! in `tandem-engine`; this crate only wires it to the outside world.

pub mod api;
pub mod bench;
pub mod channel_join;
pub mod config;
pub mod counters_view;
pub mod daemon;
pub mod daemon_args;
pub mod demo;
pub mod events;
pub mod manpages;
pub mod metrics;
pub mod nbd_load;
pub mod registry;
pub mod replication;
pub mod serve;
pub mod size;
