//! The NBD handshake against arbitrary client bytes: never panics, never
//! enters transmission for an unknown export.
#![no_main]

use std::io::{Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use tandem_frontend::nbd::{handshake, Export, HandshakeOutcome};

struct Duplex<'a> {
    input: Cursor<&'a [u8]>,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let export = Export {
        name: "rg01/data".into(),
        size_bytes: 1 << 20,
        read_only: false,
        description: String::new(),
        refusal: None,
    };
    let find = |name: &str| (name == "rg01/data").then(|| export.clone());
    let list = || vec![export.clone()];
    let mut duplex = Duplex { input: Cursor::new(data) };
    if let Ok(HandshakeOutcome::Transmission { export, .. }) = handshake(&mut duplex, "fuzz", &find, &list) {
        assert_eq!(export.name, "rg01/data");
    }
});
