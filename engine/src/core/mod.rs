//! Sans-IO state machines. Nothing in this module touches a file, a socket, a
//! clock or a thread: the runtime (or a test, or the simulator) feeds events and
//! executes the returned actions.

pub mod bitmap;
pub mod compare;
pub mod group;
pub mod receiver;
pub mod recovery;
pub mod retention;
pub mod ring;
pub mod unconfirmed;

pub use bitmap::DirtyBitmap;
pub use group::peer::{CopyPosition, CopyStart, PeerConfig, ReplicationMode, ReplicationState};
pub use group::{
    Action, AppendBatch, AppendSegment, ApplyKind, ApplyOp, Event, GroupConfig, GroupCore, GroupSnapshot, IoFailure,
    LogRecord, WriteError, WriteId, WriteOp, WriteRequest,
};
pub use receiver::{Incoming, Receiver, ReceiverAction};
pub use recovery::{replay, HeaderVerdict, ReplayOutcome, ScanStart, ScanStop, ScannedRecord, Scanner};
pub use retention::Retention;
pub use ring::{LogRing, Placement};
pub use unconfirmed::{HeldAfter, UnconfirmedRecords, VolumeRange};
