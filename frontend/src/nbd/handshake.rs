//! The fixed newstyle handshake, run on a blocking socket by the control plane.
//! A client that misbehaves here only ever holds its own handshake thread.

use std::io::{self, Read, Write};

use thiserror::Error;

use super::consts::*;
use super::session::NbdSession;

/// An export as the handshake advertises it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// `GROUP/VOLUME`.
    pub name: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub description: String,
    /// Why clients may not use the export now (a replication destination);
    /// NBD_OPT_GO and NBD_OPT_INFO answer with this text (NBD_REP_ERR_POLICY).
    pub refusal: Option<String>,
}

/// How a handshake ended.
#[derive(Debug)]
pub enum HandshakeOutcome {
    /// The client chose `export`; the socket enters the transmission phase.
    Transmission { export: Export, session: NbdSession },
    /// The client aborted or only listed exports.
    Ended,
}

/// Why a handshake failed; the connection is closed.
#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("socket error during handshake: {0}")]
    Io(#[from] io::Error),
    #[error("client sent {found:#018x} where the option magic IHAVEOPT was expected")]
    BadOptionMagic { found: u64 },
    #[error("client flags {0:#x} contain unknown bits")]
    UnknownClientFlags(u32),
    #[error("option {option} carries {length} bytes, more than the {MAX_OPTION_BYTES} allowed")]
    OptionTooLong { option: u32, length: u32 },
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("client asked for export {name:?}, refused: {reason}")]
    Refused { name: String, reason: String },
    #[error("client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
}

/// Runs the server side of the handshake. `find` resolves an export name and
/// `list` enumerates exports; both are asked at the moment of the request, so
/// groups created while a client negotiates are seen.
pub fn handshake<S: Read + Write>(
    stream: &mut S,
    peer: &str,
    find: &dyn Fn(&str) -> Option<Export>,
    list: &dyn Fn() -> Vec<Export>,
) -> Result<HandshakeOutcome, HandshakeError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&hello)?;
    let client_flags = read_u32(stream)?;
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(HandshakeError::UnknownClientFlags(client_flags));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    for _ in 0..MAX_OPTIONS {
        let magic = read_u64(stream)?;
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic { found: magic });
        }
        let option = read_u32(stream)?;
        let length = read_u32(stream)?;
        if length > MAX_OPTION_BYTES {
            return Err(HandshakeError::OptionTooLong { option, length });
        }
        let mut data = vec![0u8; length as usize];
        stream.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let export = find(&name).ok_or_else(|| HandshakeError::UnknownExport(name.clone()))?;
                if let Some(reason) = export.refusal {
                    return Err(HandshakeError::Refused { name, reason });
                }
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&export.size_bytes.to_be_bytes());
                reply.extend_from_slice(&transmission_flags(&export).to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&reply)?;
                return Ok(transmission(export, peer));
            }
            OPT_ABORT => {
                // The client may already have closed; an error here is harmless.
                let _ = option_reply(stream, option, REP_ACK, &[]);
                return Ok(HandshakeOutcome::Ended);
            }
            OPT_LIST => list_exports(stream, &data, list)?,
            OPT_INFO | OPT_GO => {
                if let Some(export) = info_or_go(stream, option, &data, find)? {
                    if option == OPT_GO {
                        return Ok(transmission(export, peer));
                    }
                }
            }
            _ => option_error(stream, option, REP_ERR_UNSUP, "option not supported by tandem")?,
        }
    }
    Err(HandshakeError::TooManyOptions)
}

fn transmission(export: Export, peer: &str) -> HandshakeOutcome {
    let session = NbdSession::new(export.size_bytes, export.read_only, peer.to_owned());
    HandshakeOutcome::Transmission { export, session }
}

fn transmission_flags(export: &Export) -> u16 {
    // Every write is durable before it is answered and a flush covers all
    // connections alike, so several connections to one export are coherent.
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    if export.read_only {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    flags
}

fn list_exports<S: Write>(stream: &mut S, data: &[u8], list: &dyn Fn() -> Vec<Export>) -> io::Result<()> {
    if !data.is_empty() {
        return option_error(stream, OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
    }
    for export in list() {
        let mut payload = Vec::with_capacity(4 + export.name.len());
        payload.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
        payload.extend_from_slice(export.name.as_bytes());
        payload.extend_from_slice(export.description.as_bytes());
        option_reply(stream, OPT_LIST, REP_SERVER, &payload)?;
    }
    option_reply(stream, OPT_LIST, REP_ACK, &[])
}

/// Answers NBD_OPT_INFO or NBD_OPT_GO; returns the export when it was found.
fn info_or_go<S: Write>(
    stream: &mut S,
    option: u32,
    data: &[u8],
    find: &dyn Fn(&str) -> Option<Export>,
) -> io::Result<Option<Export>> {
    let Some((name, requests)) = parse_info_request(data) else {
        option_error(stream, option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request")?;
        return Ok(None);
    };
    let Some(export) = find(&name) else {
        option_error(
            stream,
            option,
            REP_ERR_UNKNOWN,
            &format!("no export named {name:?}; list them with NBD_OPT_LIST"),
        )?;
        return Ok(None);
    };
    if let Some(reason) = &export.refusal {
        option_error(stream, option, REP_ERR_POLICY, reason)?;
        return Ok(None);
    }
    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.size_bytes.to_be_bytes());
    info.extend_from_slice(&transmission_flags(&export).to_be_bytes());
    option_reply(stream, option, REP_INFO, &info)?;
    for request in requests {
        let mut info = request.to_be_bytes().to_vec();
        match request {
            INFO_NAME => info.extend_from_slice(export.name.as_bytes()),
            INFO_DESCRIPTION => info.extend_from_slice(export.description.as_bytes()),
            INFO_BLOCK_SIZE => {
                for size in [MIN_BLOCK_BYTES, PREFERRED_BLOCK_BYTES, MAX_REQUEST_BYTES] {
                    info.extend_from_slice(&size.to_be_bytes());
                }
            }
            _ => continue,
        }
        option_reply(stream, option, REP_INFO, &info)?;
    }
    option_reply(stream, option, REP_ACK, &[])?;
    Ok(Some(export))
}

fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(data.get(4..4 + name_len)?).ok()?.to_owned();
    let rest = data.get(4 + name_len..)?;
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    Some((name, list.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

fn option_reply<S: Write>(stream: &mut S, option: u32, reply_type: u32, data: &[u8]) -> io::Result<()> {
    let mut reply = Vec::with_capacity(20 + data.len());
    reply.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    reply.extend_from_slice(&option.to_be_bytes());
    reply.extend_from_slice(&reply_type.to_be_bytes());
    reply.extend_from_slice(&(data.len() as u32).to_be_bytes());
    reply.extend_from_slice(data);
    stream.write_all(&reply)
}

fn option_error<S: Write>(stream: &mut S, option: u32, reply_type: u32, message: &str) -> io::Result<()> {
    option_reply(stream, option, reply_type, message.as_bytes())
}

fn read_u32<S: Read>(stream: &mut S) -> io::Result<u32> {
    let mut bytes = [0u8; 4];
    stream.read_exact(&mut bytes)?;
    Ok(u32::from_be_bytes(bytes))
}

fn read_u64<S: Read>(stream: &mut S) -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    stream.read_exact(&mut bytes)?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
