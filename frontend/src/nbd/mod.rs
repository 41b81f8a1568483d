//! The NBD server: fixed newstyle handshake (EXPORT_NAME, LIST, INFO, GO,
//! ABORT) and the transmission phase (READ, WRITE with FUA, FLUSH, TRIM,
//! WRITE_ZEROES, DISC) with simple replies. Exports are volumes, named
//! `GROUP/VOLUME`.

mod consts;
mod handshake;
mod session;

pub use consts::MAX_REQUEST_BYTES;
pub use handshake::{handshake, Export, HandshakeError, HandshakeOutcome};
pub use session::NbdSession;
