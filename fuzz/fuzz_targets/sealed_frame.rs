//! The frame seal: a frame sealed and sent untouched opens to exactly what
//! was sealed; the same frame with any one bit flipped (header, its tag,
//! payload or its tag) never opens, and opening never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_crypto::{Protection, SessionKeys, Side, HEADER_BYTES, TAG_BYTES};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 + HEADER_BYTES {
        return;
    }
    let (control, rest) = data.split_at(3);
    let protection = if control[0] & 1 == 0 { Protection::Encrypt } else { Protection::Sign };
    // Fixed keys stand in for the TLS exporter: both ends derive the same.
    let keys = SessionKeys::derive(Some(protection), 1, |context, out| {
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = context.iter().fold(i as u8, |a, b| a.wrapping_mul(31).wrapping_add(*b));
        }
        Ok(())
    })
    .expect("keys");
    let mut sender = keys.channel_seal(0, Side::Source).expect("sealed");
    let mut receiver = keys.channel_seal(0, Side::Destination).expect("sealed");
    let plain_header: [u8; HEADER_BYTES] = rest[..HEADER_BYTES].try_into().expect("64 bytes");
    let payload = &rest[HEADER_BYTES..];
    let mut header = plain_header;
    let mut sealed = vec![0u8; if sender.encrypts() { payload.len() } else { 0 }];
    let (mut header_tag, payload_tag) = sender.seal(&mut header, payload, &mut sealed);
    let mut body = if sender.encrypts() { sealed } else { payload.to_vec() };
    let mut payload_tag = payload_tag.unwrap_or([0; TAG_BYTES]);
    // control[1..3] picks a bit to flip, or none.
    let wire_bits = (HEADER_BYTES + TAG_BYTES + body.len() + if payload.is_empty() { 0 } else { TAG_BYTES }) * 8;
    let pick = usize::from(u16::from_le_bytes([control[1], control[2]]));
    let flip = (pick < wire_bits).then_some(pick);
    if let Some(bit) = flip {
        let (byte, mask) = (bit / 8, 1u8 << (bit % 8));
        match byte {
            b if b < HEADER_BYTES => header[b] ^= mask,
            b if b < HEADER_BYTES + TAG_BYTES => header_tag[b - HEADER_BYTES] ^= mask,
            b if b < HEADER_BYTES + TAG_BYTES + body.len() => body[b - HEADER_BYTES - TAG_BYTES] ^= mask,
            b => payload_tag[b - HEADER_BYTES - TAG_BYTES - body.len()] ^= mask,
        }
    }
    let opened = receiver.open_header(&mut header, &header_tag).and_then(|sequence| {
        if payload.is_empty() {
            Ok(())
        } else {
            receiver.open_payload(sequence, &header, &mut body, &payload_tag)
        }
    });
    match flip {
        Some(bit) => assert!(opened.is_err(), "a flipped bit {bit} opened"),
        None => {
            opened.expect("an untouched frame opens");
            assert_eq!(header, plain_header);
            assert_eq!(body, payload);
        }
    }
});
