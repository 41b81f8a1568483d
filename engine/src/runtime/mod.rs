//! The runtime: threads pinned to cores, one io_uring per core, executing the
//! actions of the sans-IO core against real files and sockets.

pub mod buf;
mod conn;
pub mod device;
mod group_io;
mod io;
pub mod log_store;
mod reactor;
pub mod session;
pub mod status;

pub use reactor::{CoreHandle, CoreMsg};
