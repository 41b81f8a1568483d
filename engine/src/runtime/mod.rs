//! The runtime: threads pinned to cores, one io_uring per core, executing the
//! actions of the sans-IO core against real files and sockets.

pub mod arena;
pub mod buf;
mod compare_dest;
pub mod compare_source;
mod conn;
pub mod counters;
pub mod device;
pub mod events;
pub mod failback;
mod group_events;
mod group_io;
mod io;
pub mod log_store;
pub mod net;
mod partner;
pub mod peer_conn;
mod peer_conn_wire;
pub mod peer_session;
pub mod promote;
mod reactor;
mod replica_dest;
mod replica_source;
pub mod session;
mod snapshot_rt;
pub mod snapshots;
pub mod status;
pub mod test_failover;
mod test_failover_rt;
pub mod verify_source;
pub mod wire;

pub use partner::{DestinationState, PeerDefaults, SourceView, DEFAULT_VERIFY_RATE_BYTES_PER_S};
pub use reactor::{CoreHandle, CoreMsg};
