//! The NBD transmission-phase parser over arbitrary byte streams: never
//! panics, consumes what it says, and only returns ranges inside the export.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_engine::runtime::session::{BlockRequest, BlockSession, Parsed};
use tandem_frontend::nbd::NbdSession;

const SIZE: u64 = 1 << 30;

fuzz_target!(|data: &[u8]| {
    let mut session = NbdSession::new(SIZE, data.first().is_some_and(|b| b & 1 == 1), "fuzz".into());
    let mut rest = data;
    while let Ok(Parsed::Request { consumed, request }) = session.parse(rest) {
        assert!(consumed > 0 && consumed <= rest.len());
        rest = &rest[consumed..];
        let range = match request {
            BlockRequest::Read { offset, length, .. }
            | BlockRequest::Write { offset, length, .. }
            | BlockRequest::Trim { offset, length, .. }
            | BlockRequest::WriteZeroes { offset, length, .. } => Some((offset, length)),
            _ => None,
        };
        if let Some((offset, length)) = range {
            assert!(length > 0 && offset + u64::from(length) <= SIZE);
        }
        let mut out = Vec::new();
        session.encode_reply(1, Ok(()), &mut out);
    }
});
