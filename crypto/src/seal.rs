//! The seal of a replication channel: every frame is authenticated, and with
//! `aes-128-gcm` also encrypted, before it leaves and before anything reads it.
//!
//! On the wire a sealed frame is its 64-byte header (encrypted, or in clear
//! when only signing), a 16-byte tag, then the payload (encrypted or in
//! clear) and its own 16-byte tag. The nonce is direction, channel, part
//! (header or payload) and the frame's sequence number on the channel; the
//! sequence is never sent, both ends count, so a dropped, replayed or
//! reordered frame fails its tag like an altered one. The payload's seal
//! has the plaintext header as associated data, binding the two.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, NONCE_LEN};
use thiserror::Error;

use crate::keys::{Protection, TO_DESTINATION, TO_SOURCE};

/// Bytes of an AES-128-GCM tag.
pub const TAG_BYTES: usize = 16;
/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 64;

const PART_HEADER: u8 = 0;
const PART_PAYLOAD: u8 = 1;

/// Which end of a partnership a seal belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// A frame that failed authentication.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("frame {sequence} on channel {channel} failed authentication ({part}): altered, replayed, reordered or dropped on the way")]
pub struct SealError {
    pub channel: u8,
    pub sequence: u64,
    pub part: &'static str,
}

/// The keys and counters of one channel, both directions.
pub struct ChannelSeal {
    protection: Protection,
    send: LessSafeKey,
    recv: LessSafeKey,
    send_direction: u8,
    recv_direction: u8,
    channel: u8,
    send_sequence: u64,
    recv_sequence: u64,
}

impl std::fmt::Debug for ChannelSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSeal")
            .field("protection", &self.protection)
            .field("channel", &self.channel)
            .field("send_sequence", &self.send_sequence)
            .field("recv_sequence", &self.recv_sequence)
            .finish_non_exhaustive()
    }
}

fn key(bytes: &[u8; 16]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_128_GCM, bytes).expect("16 bytes is an AES-128 key"))
}

fn nonce(direction: u8, channel: u8, part: u8, sequence: u64) -> Nonce {
    let mut bytes = [0u8; NONCE_LEN];
    bytes[0] = direction;
    bytes[1] = channel;
    bytes[2] = part;
    bytes[4..].copy_from_slice(&sequence.to_be_bytes());
    Nonce::assume_unique_for_key(bytes)
}

impl ChannelSeal {
    /// A seal sending with `send_key` and receiving with `recv_key`.
    #[must_use]
    pub fn new(protection: Protection, send_key: &[u8; 16], recv_key: &[u8; 16], side: Side, channel: u8) -> Self {
        let (send_direction, recv_direction) = match side {
            Side::Source => (TO_DESTINATION, TO_SOURCE),
            Side::Destination => (TO_SOURCE, TO_DESTINATION),
        };
        Self {
            protection,
            send: key(send_key),
            recv: key(recv_key),
            send_direction,
            recv_direction,
            channel,
            send_sequence: 0,
            recv_sequence: 0,
        }
    }

    /// Whether payloads are encrypted (and so need a buffer of their own to
    /// be sealed into: the plaintext stays where it is, for the local log).
    #[must_use]
    pub fn encrypts(&self) -> bool {
        self.protection == Protection::Encrypt
    }

    /// Seals the next frame: `header` in place; `payload` into
    /// `payload_out` when encrypting (its length), else left as it is.
    /// Returns the header's tag and, for a payload, the payload's tag.
    pub fn seal(
        &mut self,
        header: &mut [u8; HEADER_BYTES],
        payload: &[u8],
        payload_out: &mut [u8],
    ) -> ([u8; TAG_BYTES], Option<[u8; TAG_BYTES]>) {
        let sequence = self.send_sequence;
        self.send_sequence += 1;
        let payload_nonce = nonce(self.send_direction, self.channel, PART_PAYLOAD, sequence);
        let payload_tag = (!payload.is_empty()).then(|| {
            let tag = match self.protection {
                Protection::Encrypt => {
                    assert_eq!(payload_out.len(), payload.len(), "an encrypted payload needs a buffer of its size");
                    let mut tag = [0u8; TAG_BYTES];
                    self.send
                        .seal_out_of_place_scatter(
                            payload_nonce,
                            Aad::from(&header[..]),
                            payload,
                            payload_out,
                            &[],
                            &mut tag,
                        )
                        .expect("AES-GCM seals any length below 64 GiB");
                    return tag;
                }
                Protection::Sign => self.send.seal_in_place_separate_tag(payload_nonce, Aad::from(payload), &mut []),
            };
            tag.expect("GMAC signs any length").as_ref().try_into().expect("16-byte tag")
        });
        let header_nonce = nonce(self.send_direction, self.channel, PART_HEADER, sequence);
        let header_tag = match self.protection {
            Protection::Encrypt => self.send.seal_in_place_separate_tag(header_nonce, Aad::empty(), &mut header[..]),
            Protection::Sign => self.send.seal_in_place_separate_tag(header_nonce, Aad::from(&header[..]), &mut []),
        }
        .expect("a header seals");
        (header_tag.as_ref().try_into().expect("16-byte tag"), payload_tag)
    }

    /// Opens the next frame's header in place; returns its sequence number
    /// for [`Self::open_payload`].
    pub fn open_header(&mut self, header: &mut [u8; HEADER_BYTES], tag: &[u8; TAG_BYTES]) -> Result<u64, SealError> {
        let sequence = self.recv_sequence;
        let header_nonce = nonce(self.recv_direction, self.channel, PART_HEADER, sequence);
        let opened = match self.protection {
            Protection::Encrypt => {
                self.recv.open_in_place_separate_tag(header_nonce, Aad::empty(), tag, &mut header[..])
            }
            Protection::Sign => {
                self.recv.open_in_place_separate_tag(header_nonce, Aad::from(&header[..]), tag, &mut [])
            }
        };
        opened.map_err(|_| SealError { channel: self.channel, sequence, part: "header" })?;
        self.recv_sequence += 1;
        Ok(sequence)
    }

    /// Opens the payload of frame `sequence` (whose opened header is
    /// `header`) in place.
    pub fn open_payload(
        &self,
        sequence: u64,
        header: &[u8; HEADER_BYTES],
        payload: &mut [u8],
        tag: &[u8; TAG_BYTES],
    ) -> Result<(), SealError> {
        let payload_nonce = nonce(self.recv_direction, self.channel, PART_PAYLOAD, sequence);
        let opened = match self.protection {
            Protection::Encrypt => {
                self.recv.open_in_place_separate_tag(payload_nonce, Aad::from(&header[..]), tag, payload)
            }
            Protection::Sign => self.recv.open_in_place_separate_tag(payload_nonce, Aad::from(&*payload), tag, &mut []),
        };
        opened.map(|_| ()).map_err(|_| SealError { channel: self.channel, sequence, part: "payload" })
    }
}
