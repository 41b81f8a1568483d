//! The transmission phase of NBD as a [`BlockSession`]: requests are parsed
//! and checked against the export here, so the engine only sees valid ranges.

use tandem_engine::runtime::session::{BlockError, BlockRequest, BlockSession, Parsed, SessionFatal};

use super::consts::*;

const REQUEST_BYTES: usize = 28;
const SIMPLE_REPLY_BYTES: usize = 16;

/// One client's transmission phase.
#[derive(Debug)]
pub struct NbdSession {
    size_bytes: u64,
    read_only: bool,
    peer: String,
}

impl NbdSession {
    #[must_use]
    pub fn new(size_bytes: u64, read_only: bool, peer: String) -> Self {
        Self { size_bytes, read_only, peer }
    }

    fn in_range(&self, offset: u64, length: u32) -> bool {
        offset.checked_add(u64::from(length)).is_some_and(|end| end <= self.size_bytes)
    }

    fn classify(
        &self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    ) -> Result<BlockRequest, SessionFatal> {
        let refuse = |error, discard_payload_bytes| BlockRequest::Refuse { cookie, error, discard_payload_bytes };
        let allowed_flags = match command {
            CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            _ => 0,
        };
        let payload = if command == CMD_WRITE { length } else { 0 };
        if command == CMD_WRITE && length > MAX_REQUEST_BYTES {
            // The payload cannot be skipped safely without reading an
            // unbounded amount; the protocol allows a disconnect here.
            return Err(SessionFatal(format!(
                "write of {length} bytes exceeds the advertised maximum of {MAX_REQUEST_BYTES} bytes"
            )));
        }
        if flags & !allowed_flags != 0 {
            return Ok(refuse(BlockError::InvalidArgument, payload));
        }
        let request = match command {
            CMD_READ if length == 0 || length > MAX_REQUEST_BYTES || !self.in_range(offset, length) => {
                refuse(BlockError::InvalidArgument, 0)
            }
            CMD_READ => BlockRequest::Read { cookie, offset, length },
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if self.read_only => refuse(BlockError::ReadOnly, payload),
            CMD_WRITE if !self.in_range(offset, length) => refuse(BlockError::NoSpace, payload),
            CMD_TRIM | CMD_WRITE_ZEROES if !self.in_range(offset, length) => refuse(BlockError::InvalidArgument, 0),
            // Nothing to change: answered at once like a flush.
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if length == 0 => BlockRequest::Flush { cookie },
            CMD_WRITE => BlockRequest::Write { cookie, offset, length },
            CMD_TRIM => BlockRequest::Trim { cookie, offset, length },
            CMD_WRITE_ZEROES => {
                BlockRequest::WriteZeroes { cookie, offset, length, no_hole: flags & CMD_FLAG_NO_HOLE != 0 }
            }
            CMD_FLUSH => BlockRequest::Flush { cookie },
            CMD_DISC => BlockRequest::Disconnect,
            _ => refuse(BlockError::InvalidArgument, 0),
        };
        Ok(request)
    }
}

fn nbd_errno(error: BlockError) -> u32 {
    match error {
        BlockError::InvalidArgument => EINVAL,
        BlockError::NoSpace => ENOSPC,
        BlockError::ReadOnly => EPERM,
        BlockError::NotSupported => ENOTSUP,
        BlockError::Io => EIO,
    }
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl BlockSession for NbdSession {
    fn parse(&mut self, input: &[u8]) -> Result<Parsed, SessionFatal> {
        if input.len() < REQUEST_BYTES {
            return Ok(Parsed::NeedMore);
        }
        let magic = be_u32(&input[0..]);
        if magic != REQUEST_MAGIC {
            return Err(SessionFatal(format!("bad request magic {magic:#010x} (expected {REQUEST_MAGIC:#010x})")));
        }
        let flags = be_u16(&input[4..]);
        let command = be_u16(&input[6..]);
        let cookie = be_u64(&input[8..]);
        let offset = be_u64(&input[16..]);
        let length = be_u32(&input[24..]);
        let request = self.classify(flags, command, cookie, offset, length)?;
        Ok(Parsed::Request { consumed: REQUEST_BYTES, request })
    }

    fn read_reply_header_bytes(&self) -> usize {
        SIMPLE_REPLY_BYTES
    }

    fn encode_read_reply_header(&mut self, cookie: u64, header: &mut [u8]) {
        header[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        header[4..8].copy_from_slice(&0u32.to_be_bytes());
        header[8..16].copy_from_slice(&cookie.to_be_bytes());
    }

    fn encode_reply(&mut self, cookie: u64, result: Result<(), BlockError>, out: &mut Vec<u8>) {
        out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&result.err().map_or(0, nbd_errno).to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
    }

    fn peer(&self) -> &str {
        &self.peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&flags.to_be_bytes());
        bytes.extend_from_slice(&command.to_be_bytes());
        bytes.extend_from_slice(&cookie.to_be_bytes());
        bytes.extend_from_slice(&offset.to_be_bytes());
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes
    }

    fn parse_one(session: &mut NbdSession, bytes: &[u8]) -> BlockRequest {
        match session.parse(bytes).unwrap() {
            Parsed::Request { consumed: 28, request } => request,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn parses_every_command() {
        let mut s = NbdSession::new(1 << 20, false, "test".into());
        assert_eq!(s.parse(&request(0, CMD_READ, 1, 0, 512)[..27]).unwrap(), Parsed::NeedMore);
        assert_eq!(
            parse_one(&mut s, &request(0, CMD_READ, 1, 0, 512)),
            BlockRequest::Read { cookie: 1, offset: 0, length: 512 }
        );
        assert_eq!(
            parse_one(&mut s, &request(CMD_FLAG_FUA, CMD_WRITE, 2, 4096, 4096)),
            BlockRequest::Write { cookie: 2, offset: 4096, length: 4096 }
        );
        assert_eq!(parse_one(&mut s, &request(0, CMD_FLUSH, 3, 0, 0)), BlockRequest::Flush { cookie: 3 });
        assert_eq!(
            parse_one(&mut s, &request(0, CMD_TRIM, 4, 0, 8192)),
            BlockRequest::Trim { cookie: 4, offset: 0, length: 8192 }
        );
        assert_eq!(
            parse_one(&mut s, &request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 5, 0, 8192)),
            BlockRequest::WriteZeroes { cookie: 5, offset: 0, length: 8192, no_hole: true }
        );
        assert_eq!(parse_one(&mut s, &request(0, CMD_DISC, 6, 0, 0)), BlockRequest::Disconnect);
    }

    #[test]
    fn refuses_bad_requests_with_the_documented_errors() {
        let mut s = NbdSession::new(1 << 20, false, "test".into());
        let refuse =
            |cookie, error, discard_payload_bytes| BlockRequest::Refuse { cookie, error, discard_payload_bytes };
        assert_eq!(
            parse_one(&mut s, &request(0, CMD_READ, 1, 1 << 20, 512)),
            refuse(1, BlockError::InvalidArgument, 0)
        );
        assert_eq!(
            parse_one(&mut s, &request(0, CMD_WRITE, 2, (1 << 20) - 512, 1024)),
            refuse(2, BlockError::NoSpace, 1024)
        );
        assert_eq!(parse_one(&mut s, &request(0, 99, 3, 0, 0)), refuse(3, BlockError::InvalidArgument, 0));
        assert_eq!(
            parse_one(&mut s, &request(0x40, CMD_WRITE, 4, 0, 512)),
            refuse(4, BlockError::InvalidArgument, 512)
        );
        assert_eq!(
            parse_one(&mut s, &request(0, CMD_READ, 5, u64::MAX, 512)),
            refuse(5, BlockError::InvalidArgument, 0)
        );
        assert_eq!(
            parse_one(&mut s, &request(0, CMD_READ, 6, 0, MAX_REQUEST_BYTES + 1)),
            refuse(6, BlockError::InvalidArgument, 0)
        );
        assert!(s.parse(&request(0, CMD_WRITE, 7, 0, MAX_REQUEST_BYTES + 1)).is_err());
        let mut garbage = request(0, CMD_READ, 8, 0, 512);
        garbage[0] = 0xff;
        assert!(s.parse(&garbage).unwrap_err().0.contains("bad request magic"));
        let mut ro = NbdSession::new(1 << 20, true, "test".into());
        assert_eq!(parse_one(&mut ro, &request(0, CMD_WRITE, 9, 0, 512)), refuse(9, BlockError::ReadOnly, 512));
    }

    #[test]
    fn encodes_simple_replies() {
        let mut s = NbdSession::new(1 << 20, false, "test".into());
        let mut out = Vec::new();
        s.encode_reply(0x1122, Err(BlockError::NoSpace), &mut out);
        assert_eq!(out.len(), 16);
        assert_eq!(be_u32(&out[0..]), SIMPLE_REPLY_MAGIC);
        assert_eq!(be_u32(&out[4..]), ENOSPC);
        assert_eq!(be_u64(&out[8..]), 0x1122);
        let mut header = [0u8; 16];
        s.encode_read_reply_header(7, &mut header);
        assert_eq!((be_u32(&header[4..]), be_u64(&header[8..])), (0, 7));
    }
}
