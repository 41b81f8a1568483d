//! Block front ends. Each is a pure codec behind the engine's `BlockSession`
//! seam plus its handshake; the engine's core threads do the IO.

pub mod nbd;
