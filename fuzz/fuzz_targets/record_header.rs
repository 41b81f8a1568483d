//! The record header decoder: never panics; whatever it accepts re-encodes to
//! the same bytes and passes its own validation again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_proto::RecordHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = RecordHeader::decode(data) {
        assert_eq!(header.as_bytes(), &data[..64]);
        let again = RecordHeader::decode(header.as_bytes()).expect("an accepted header stays valid");
        let _ = again.verify_payload(&data[64..]);
    }
});
