//! Tandem's engine.
//!
//! `core` holds the sans-IO state machines: events in, actions out, no files,
//! sockets, clocks or threads. `runtime` owns the threads pinned to cores, one
//! io_uring per core, and executes the actions of the core against real files
//! and sockets. Front ends plug in through [`runtime::session::BlockSession`],
//! so the engine never depends on a particular block protocol.

pub mod core;
pub mod runtime;
