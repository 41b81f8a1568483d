//! Handshake tests against scripted client bytes.

use std::io::{Cursor, Read, Write};

use super::*;

struct Duplex {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn export() -> Export {
    Export {
        name: "rg01/data".into(),
        size_bytes: 1 << 30,
        read_only: false,
        description: String::new(),
        refusal: None,
    }
}

fn find(name: &str) -> Option<Export> {
    (name == "rg01/data").then(export)
}

fn list() -> Vec<Export> {
    vec![export()]
}

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
    bytes.extend_from_slice(&code.to_be_bytes());
    bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
    bytes.extend_from_slice(data);
    bytes
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        data.extend_from_slice(&info.to_be_bytes());
    }
    data
}

fn run(client: Vec<u8>) -> (Result<HandshakeOutcome, HandshakeError>, Vec<u8>) {
    let mut duplex = Duplex { input: Cursor::new(client), output: Vec::new() };
    let outcome = handshake(&mut duplex, "test", &find, &list);
    (outcome, duplex.output)
}

/// Splits the server's option replies after the 18-byte greeting into
/// (option, reply type, data).
fn replies(output: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut rest = &output[18..];
    let mut out = Vec::new();
    while rest.len() >= 20 {
        assert_eq!(u64::from_be_bytes(rest[..8].try_into().unwrap()), OPTION_REPLY_MAGIC);
        let option = u32::from_be_bytes(rest[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(rest[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
        out.push((option, kind, rest[20..20 + len].to_vec()));
        rest = &rest[20 + len..];
    }
    out
}

#[test]
fn go_with_block_size_enters_transmission() {
    let mut client = 3u32.to_be_bytes().to_vec();
    client.extend(option(OPT_GO, &go_data("rg01/data", &[INFO_BLOCK_SIZE])));
    let (outcome, output) = run(client);
    assert!(matches!(outcome.unwrap(), HandshakeOutcome::Transmission { export, .. } if export.name == "rg01/data"));
    assert_eq!(&output[..8], &NBDMAGIC.to_be_bytes());
    let replies = replies(&output);
    assert_eq!(replies.len(), 3, "export info, block size, ack");
    assert_eq!(replies[0].1, REP_INFO);
    assert_eq!(u64::from_be_bytes(replies[0].2[2..10].try_into().unwrap()), 1 << 30);
    assert_eq!(u16::from_be_bytes(replies[1].2[..2].try_into().unwrap()), INFO_BLOCK_SIZE);
    assert_eq!(replies[2].1, REP_ACK);
}

#[test]
fn unknown_export_and_unsupported_options_get_errors_and_the_client_may_retry() {
    let mut client = 3u32.to_be_bytes().to_vec();
    client.extend(option(OPT_GO, &go_data("nope", &[])));
    client.extend(option(8, &[]));
    client.extend(option(OPT_GO, &[1, 2]));
    client.extend(option(OPT_LIST, &[]));
    client.extend(option(OPT_ABORT, &[]));
    let (outcome, output) = run(client);
    assert!(matches!(outcome.unwrap(), HandshakeOutcome::Ended));
    let kinds: Vec<u32> = replies(&output).iter().map(|r| r.1).collect();
    assert_eq!(kinds, vec![REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_ERR_INVALID, REP_SERVER, REP_ACK, REP_ACK]);
}

#[test]
fn export_name_option_and_protocol_violations() {
    let mut client = 1u32.to_be_bytes().to_vec();
    client.extend(option(OPT_EXPORT_NAME, b"rg01/data"));
    let (outcome, output) = run(client);
    assert!(matches!(outcome.unwrap(), HandshakeOutcome::Transmission { .. }));
    assert_eq!(output.len(), 18 + 8 + 2 + 124, "zeroes are sent without NO_ZEROES");

    let mut bad_magic = 3u32.to_be_bytes().to_vec();
    bad_magic.extend_from_slice(&[0u8; 16]);
    assert!(matches!(run(bad_magic).0, Err(HandshakeError::BadOptionMagic { found: 0 })));

    let mut huge = 3u32.to_be_bytes().to_vec();
    huge.extend_from_slice(&IHAVEOPT.to_be_bytes());
    huge.extend_from_slice(&OPT_GO.to_be_bytes());
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(run(huge).0, Err(HandshakeError::OptionTooLong { .. })));

    assert!(matches!(run(0xffu32.to_be_bytes().to_vec()).0, Err(HandshakeError::UnknownClientFlags(0xff))));
    let mut unknown = 3u32.to_be_bytes().to_vec();
    unknown.extend(option(OPT_EXPORT_NAME, b"other"));
    assert!(matches!(run(unknown).0, Err(HandshakeError::UnknownExport(_))));
    assert!(matches!(run(3u32.to_be_bytes().to_vec()).0, Err(HandshakeError::Io(_))), "truncated stream");
}
