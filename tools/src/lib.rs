//! The binaries' shared code: configuration, the management API and its
//! protocol, the group registry, and human-friendly sizes. Engine logic stays
//! in `tandem-engine`; this crate only wires it to the outside world.

pub mod api;
pub mod bench;
pub mod bench_cli;
pub mod bench_target;
pub mod channel_join;
pub mod config;
pub mod counters_view;
pub mod daemon;
pub mod daemon_args;
pub mod delegation;
pub mod demo;
pub mod device_facts;
pub mod events;
pub mod failback;
pub mod manpages;
pub mod metrics;
pub mod nbd_load;
pub mod network;
pub mod partnership_set;
pub mod partnership_view;
pub mod probe;
pub mod rdma_fallback;
pub mod rdma_link;
pub mod registry;
pub mod replication;
pub mod replication_dest;
pub mod secure_channel;
pub mod serve;
pub mod size;
pub mod snapshot;
pub mod switch;
pub mod test_failover;
pub mod topology;
pub mod topology_html;
pub mod topology_requirements;
pub mod topology_source;
pub mod tune;
