//! The key schedule of a replication session. Channel 0's TLS session is the
//! root: its exporter (RFC 8446 section 7.5) gives one AES-128 key per
//! channel and direction, and a key that proves a data channel belongs to
//! this session when it joins. Key bytes live in [`Zeroizing`] buffers and
//! are wiped when dropped; the expanded AES key schedules live inside
//! aws-lc, whose allocator wipes memory before freeing it.

use aws_lc_rs::hmac;
use zeroize::Zeroizing;

use crate::seal::{ChannelSeal, Side};

/// The exporter label of Tandem's replication sessions.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tandem-replication-v1";
/// Direction bytes (in key derivation and nonces).
pub const TO_DESTINATION: u8 = 1;
pub const TO_SOURCE: u8 = 2;

/// How the frames of a partnership's channels are protected (beyond `none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// AES-128-GCM: confidential and authenticated.
    Encrypt,
    /// GMAC (AES-128-GCM over no plaintext): authenticated, readable.
    Sign,
}

impl Protection {
    /// The name in configuration, CLI and handshake.
    #[must_use]
    pub fn name(protection: Option<Self>) -> &'static str {
        match protection {
            Some(Self::Encrypt) => "aes-128-gcm",
            Some(Self::Sign) => "sign",
            None => "none",
        }
    }

    /// Parses `aes-128-gcm`, `sign` or `none` (`Ok(None)`).
    pub fn parse(text: &str) -> Result<Option<Self>, String> {
        match text {
            "aes-128-gcm" => Ok(Some(Self::Encrypt)),
            "sign" => Ok(Some(Self::Sign)),
            "none" => Ok(None),
            other => Err(format!("encryption {other:?}: use aes-128-gcm, sign or none")),
        }
    }
}

/// The keys of one channel, one per direction.
struct ChannelKeys {
    to_destination: Zeroizing<[u8; 16]>,
    to_source: Zeroizing<[u8; 16]>,
}

/// Every key of one session.
pub struct SessionKeys {
    /// `None`: the session is authenticated (TLS) but frames are not sealed.
    pub protection: Option<Protection>,
    channels: Vec<ChannelKeys>,
    join_key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("protection", &self.protection)
            .field("channels", &self.channels.len())
            .field("keys", &"<redacted>")
            .finish()
    }
}

impl SessionKeys {
    /// Derives the keys of `channels` channels through `export(context, out)`
    /// (the TLS exporter with [`EXPORTER_LABEL`]).
    pub fn derive(
        protection: Option<Protection>,
        channels: u32,
        export: impl Fn(&[u8], &mut [u8]) -> Result<(), String>,
    ) -> Result<Self, String> {
        let mut keys = Vec::with_capacity(channels as usize);
        for channel in 0..channels {
            let mut to_destination = Zeroizing::new([0u8; 16]);
            let mut to_source = Zeroizing::new([0u8; 16]);
            export(&context(b"channel-key", TO_DESTINATION, channel), &mut to_destination[..])?;
            export(&context(b"channel-key", TO_SOURCE, channel), &mut to_source[..])?;
            keys.push(ChannelKeys { to_destination, to_source });
        }
        let mut join_key = Zeroizing::new([0u8; 32]);
        export(b"join-proof", &mut join_key[..])?;
        Ok(Self { protection, channels: keys, join_key })
    }

    /// The number of channels these keys cover.
    #[must_use]
    pub fn channel_count(&self) -> u32 {
        self.channels.len() as u32
    }

    /// The proof that a data channel joining session `session` as channel
    /// `channel` was opened by the holder of this TLS session (hex).
    #[must_use]
    pub fn join_proof(&self, session: u64, channel: u32) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.join_key[..]);
        let tag = hmac::sign(&key, &join_message(session, channel));
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `proof_hex` is the proof for (`session`, `channel`), compared
    /// in constant time.
    #[must_use]
    pub fn check_join_proof(&self, session: u64, channel: u32, proof_hex: &str) -> bool {
        let Some(proof) = parse_hex(proof_hex) else { return false };
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.join_key[..]);
        hmac::verify(&key, &join_message(session, channel), &proof).is_ok()
    }

    /// The seal of channel `channel` for the end `side` (none when the
    /// partnership's encryption is `none`).
    #[must_use]
    pub fn channel_seal(&self, channel: u32, side: Side) -> Option<ChannelSeal> {
        let protection = self.protection?;
        let keys = &self.channels[channel as usize];
        let (send, recv) = match side {
            Side::Source => (&keys.to_destination, &keys.to_source),
            Side::Destination => (&keys.to_source, &keys.to_destination),
        };
        Some(ChannelSeal::new(protection, send, recv, side, channel as u8))
    }
}

fn context(label: &[u8], direction: u8, channel: u32) -> Vec<u8> {
    let mut context = label.to_vec();
    context.push(direction);
    context.extend_from_slice(&channel.to_be_bytes());
    context
}

fn join_message(session: u64, channel: u32) -> Vec<u8> {
    let mut message = b"tandem-join".to_vec();
    message.extend_from_slice(&session.to_be_bytes());
    message.extend_from_slice(&channel.to_be_bytes());
    message
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}
