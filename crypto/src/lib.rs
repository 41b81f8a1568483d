//! Tandem's security: node identity (a cluster CA and node certificates),
//! mutual TLS 1.3 on the control connection, the key schedule of a
//! replication session and the seal of its frames (AES-128-GCM or GMAC).

pub mod identity;
pub mod keys;
pub mod seal;
pub mod tls;

pub use keys::{Protection, SessionKeys};
pub use seal::{ChannelSeal, SealError, Side, HEADER_BYTES, TAG_BYTES};
pub use tls::{NodeTls, TlsStream};

#[cfg(test)]
mod tests;
