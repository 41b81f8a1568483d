//! The seam between the runtime and a block protocol. A front end (NBD today,
//! ublk later) implements [`BlockSession`] as a pure codec: it parses requests
//! out of received bytes and encodes replies. The runtime does every IO on the
//! group's core, so front ends never see io_uring and the engine never sees NBD.

/// An error answered to the client. Front ends map these to their own codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockError {
    /// Bad offset/length, unknown command or flags.
    InvalidArgument,
    /// A write beyond the end of the export.
    NoSpace,
    /// The export is read-only.
    ReadOnly,
    /// The command is not supported.
    NotSupported,
    /// The group failed (log or volume IO error).
    Io,
}

/// A request parsed from the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRequest {
    Read {
        cookie: u64,
        offset: u64,
        length: u32,
    },
    /// `length` bytes of payload follow in the stream; the runtime receives them
    /// straight into an O_DIRECT-aligned log buffer.
    Write {
        cookie: u64,
        offset: u64,
        length: u32,
    },
    Flush {
        cookie: u64,
    },
    Trim {
        cookie: u64,
        offset: u64,
        length: u32,
    },
    WriteZeroes {
        cookie: u64,
        offset: u64,
        length: u32,
        no_hole: bool,
    },
    /// Answer `error` at once; first read and drop `discard_payload_bytes` that
    /// follow in the stream (the payload of a refused write).
    Refuse {
        cookie: u64,
        error: BlockError,
        discard_payload_bytes: u32,
    },
    /// The client asked to disconnect.
    Disconnect,
}

/// Result of one parse step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes for a complete request header yet.
    NeedMore,
    /// One request, whose header took `consumed` bytes of the input.
    Request { consumed: usize, request: BlockRequest },
}

/// A protocol violation after which the connection cannot continue (bad magic,
/// an unbounded payload): the runtime logs the reason and closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionFatal(pub String);

/// A block protocol session for one client connection, already past its
/// handshake. Ranges in returned requests are already checked against the
/// export; the runtime asserts them again.
pub trait BlockSession: Send {
    /// Parses the next request from the front of `input`.
    fn parse(&mut self, input: &[u8]) -> Result<Parsed, SessionFatal>;
    /// Bytes of the reply header that precede read data.
    fn read_reply_header_bytes(&self) -> usize;
    /// Writes the header of a successful read reply into `header`.
    fn encode_read_reply_header(&mut self, cookie: u64, header: &mut [u8]);
    /// Appends a reply without data (write, flush, trim, errors) to `out`.
    fn encode_reply(&mut self, cookie: u64, result: Result<(), BlockError>, out: &mut Vec<u8>);
    /// Who the client is, for log lines.
    fn peer(&self) -> &str;
}
