//! The frame seal per core: sealing (encrypt out of place) and opening
//! (decrypt in place) a frame of 4 KiB, 64 KiB and 1 MiB with Tandem's seal
//! on aws-lc-rs, the same AES-128-GCM work with the RustCrypto `aes-gcm`
//! crate for comparison, and signing only (GMAC).

use std::hint::black_box;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tandem_crypto::{Protection, SessionKeys, Side, HEADER_BYTES};

const SIZES: [usize; 3] = [4096, 65536, 1 << 20];

/// Fixed keys in place of the TLS exporter (both ends derive the same).
fn keys(protection: Protection) -> SessionKeys {
    SessionKeys::derive(Some(protection), 1, |context, out| {
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = context.iter().fold(i as u8, |a, b| a.wrapping_mul(31).wrapping_add(*b));
        }
        Ok(())
    })
    .expect("keys")
}

/// Seal then open one frame with Tandem's seal (aws-lc-rs).
fn tandem_seal(c: &mut Criterion) {
    for protection in [Protection::Encrypt, Protection::Sign] {
        let name =
            if protection == Protection::Encrypt { "seal_open_aes_128_gcm_aws_lc" } else { "seal_open_gmac_aws_lc" };
        let mut group = c.benchmark_group(name);
        for size in SIZES {
            let keys = keys(protection);
            let mut sender = keys.channel_seal(0, Side::Source).expect("seal");
            let mut receiver = keys.channel_seal(0, Side::Destination).expect("seal");
            let payload = vec![0xa5u8; size];
            let mut out = vec![0u8; if sender.encrypts() { size } else { 0 }];
            // With signing the payload travels as it is; the receiver checks it where it landed.
            let mut landed = payload.clone();
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_with_input(BenchmarkId::from_parameter(size), &payload, |b, payload| {
                b.iter(|| {
                    let mut header = [7u8; HEADER_BYTES];
                    let (header_tag, payload_tag) = sender.seal(&mut header, black_box(payload), &mut out);
                    let sequence = receiver.open_header(&mut header, &header_tag).expect("opens");
                    let body = if out.is_empty() { &mut landed[..] } else { &mut out[..] };
                    receiver.open_payload(sequence, &header, body, &payload_tag.expect("tag")).expect("opens");
                })
            });
        }
        group.finish();
    }
}

/// The same AES-128-GCM work (a header and a payload sealed and opened)
/// with the RustCrypto `aes-gcm` crate.
fn rustcrypto_aes_gcm(c: &mut Criterion) {
    let mut group = c.benchmark_group("seal_open_aes_128_gcm_rustcrypto");
    let cipher = Aes128Gcm::new_from_slice(&[3u8; 16]).expect("key");
    for size in SIZES {
        let payload = vec![0xa5u8; size];
        let mut buf = payload.clone();
        let mut sequence = 0u64;
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &payload, |b, payload| {
            b.iter(|| {
                sequence += 1;
                let (mut header_nonce, mut payload_nonce) = ([0u8; 12], [0u8; 12]);
                header_nonce[4..].copy_from_slice(&sequence.to_be_bytes());
                payload_nonce[4..].copy_from_slice(&sequence.to_be_bytes());
                payload_nonce[2] = 1;
                let (header_nonce, payload_nonce) =
                    (Nonce::from_slice(&header_nonce), Nonce::from_slice(&payload_nonce));
                let mut header = [7u8; HEADER_BYTES];
                let plain_header = header;
                let header_tag = cipher.encrypt_in_place_detached(header_nonce, &[], &mut header).expect("seals");
                // Out of place like Tandem's seal: the plaintext stays for the local log.
                buf.copy_from_slice(black_box(payload));
                let tag = cipher.encrypt_in_place_detached(payload_nonce, &plain_header, &mut buf).expect("seals");
                cipher.decrypt_in_place_detached(header_nonce, &[], &mut header, &header_tag).expect("opens");
                cipher.decrypt_in_place_detached(payload_nonce, &header, &mut buf, &tag).expect("opens");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, tandem_seal, rustcrypto_aes_gcm);
criterion_main!(benches);
