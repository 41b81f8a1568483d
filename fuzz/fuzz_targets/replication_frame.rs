//! The replication frame decoder: never panics; whatever it accepts
//! re-encodes to the same bytes and decodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_proto::FrameHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = FrameHeader::decode(data) {
        assert_eq!(header.as_bytes(), &data[..64]);
        let again = FrameHeader::decode(header.as_bytes()).expect("an accepted frame stays valid");
        let _ = again.verify_payload(&data[64..]);
    }
});
