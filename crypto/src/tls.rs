//! Mutual TLS 1.3 on the control connection (rustls with the aws-lc-rs
//! provider). Both ends present a certificate that chains to the cluster CA;
//! the source also checks that the destination's certificate names the node
//! the partnership expects, and the destination checks the source's name
//! against the handshake (see the replication handshake in tandem-tools).
//!
//! The handshake lines travel inside TLS; after them the same socket carries
//! sealed replication frames (see [`crate::seal`]), keyed from this
//! session's exporter. So that no byte of those frames is swallowed by TLS,
//! TLS records are read exactly: never past the end of the record rustls asked for.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::NodeIdentity;
use crate::keys::{Protection, SessionKeys};

/// The server name a source uses when it does not know the destination's
/// node name yet (creating a partnership without `--destination-node`):
/// the certificate must still chain to the CA, and its own name is taken.
const ANY_NODE: &str = "any-node.tandem.invalid";

/// The first byte of a TLS handshake record; a plaintext handshake line
/// starts with `{`.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A node's TLS configuration, for both roles.
pub struct NodeTls {
    pub name: String,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls").field("name", &self.name).finish_non_exhaustive()
    }
}

impl NodeTls {
    pub fn new(identity: NodeIdentity) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        for ca in &identity.ca {
            roots.add(ca.clone()).map_err(|e| format!("the CA certificate is not usable: {e}"))?;
        }
        let roots = Arc::new(roots);
        let client_verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
            .build()
            .map_err(|e| format!("cannot build the client certificate verifier: {e}"))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS 1.3 unavailable: {e}"))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(identity.chain.clone(), identity.key.clone_key())
            .map_err(|e| format!("the node certificate and key do not match or are unusable: {e}"))?;
        // Tickets would be TLS bytes sent after the handshake lines, where
        // sealed frames begin; sessions are never resumed anyway.
        server.send_tls13_tickets = 0;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| format!("cannot build the server certificate verifier: {e}"))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS 1.3 unavailable: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NodeNameVerifier { inner: server_verifier }))
            .with_client_auth_cert(identity.chain, identity.key)
            .map_err(|e| format!("the node certificate and key do not match or are unusable: {e}"))?;
        Ok(Self { name: identity.name, server: Arc::new(server), client: Arc::new(client) })
    }

    /// TLS as the client on `stream`: the peer must chain to the CA and be
    /// node `expected_peer` (any node of the CA when `None`).
    pub fn connect(&self, stream: TcpStream, expected_peer: Option<&str>) -> Result<TlsStream, String> {
        let name = ServerName::try_from(expected_peer.unwrap_or(ANY_NODE).to_owned())
            .map_err(|_| format!("{:?} is not a node name", expected_peer.unwrap_or_default()))?;
        let conn = ClientConnection::new(Arc::clone(&self.client), name).map_err(|e| describe(&e))?;
        TlsStream::handshake(Connection::Client(conn), stream)
    }

    /// TLS as the server on `stream` (the peer must present a certificate of the CA).
    pub fn accept(&self, stream: TcpStream) -> Result<TlsStream, String> {
        let conn = ServerConnection::new(Arc::clone(&self.server)).map_err(|e| describe(&e))?;
        TlsStream::handshake(Connection::Server(conn), stream)
    }
}

/// A TLS session over a TCP stream, after its handshake.
pub struct TlsStream {
    conn: Connection,
    sock: RecordExact,
    peer_name: String,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").field("peer_name", &self.peer_name).finish_non_exhaustive()
    }
}

impl TlsStream {
    fn handshake(mut conn: Connection, stream: TcpStream) -> Result<Self, String> {
        let mut sock = RecordExact::new(stream);
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut sock) {
                // Send our alert (a bad certificate, say) before reporting.
                let _ = conn.write_tls(&mut sock);
                return Err(describe_io(&e));
            }
        }
        let der = conn.peer_certificates().and_then(|c| c.first()).ok_or("the peer presented no certificate")?;
        let peer_name = certificate_node_name(der)?;
        Ok(Self { conn, sock, peer_name })
    }

    /// The node name of the peer's certificate.
    #[must_use]
    pub fn peer_name(&self) -> &str {
        &self.peer_name
    }

    /// The keys of the session's replication channels, from the TLS
    /// exporter (RFC 8446 section 7.5): both ends derive the same.
    pub fn session_keys(&self, protection: Option<Protection>, channels: u32) -> Result<SessionKeys, String> {
        SessionKeys::derive(protection, channels, |context, out| {
            self.conn
                .export_keying_material(out, crate::keys::EXPORTER_LABEL, Some(context))
                .map(|_| ())
                .map_err(|e| format!("TLS exporter failed: {e}"))
        })
    }

    /// The TCP stream, positioned right after the last TLS record read.
    #[must_use]
    pub fn into_inner(self) -> TcpStream {
        self.sock.stream
    }

    #[must_use]
    pub fn tcp(&self) -> &TcpStream {
        &self.sock.stream
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            self.conn.complete_io(&mut self.sock).map_err(map_io)?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.conn.writer().write(buf)?;
        self.flush()?;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.writer().flush()?;
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.sock).map_err(map_io)?;
        }
        Ok(())
    }
}

fn map_io(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), describe_io(&e))
}

/// Reads TLS records exactly: the 5-byte header, then at most what is left
/// of that record's body, so nothing after the last record is consumed.
struct RecordExact {
    stream: TcpStream,
    header: [u8; 5],
    header_have: usize,
    body_left: usize,
}

impl RecordExact {
    fn new(stream: TcpStream) -> Self {
        Self { stream, header: [0; 5], header_have: 0, body_left: 0 }
    }
}

impl Read for RecordExact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.header_have < self.header.len() {
            let want = (self.header.len() - self.header_have).min(buf.len());
            let n = self.stream.read(&mut buf[..want])?;
            self.header[self.header_have..self.header_have + n].copy_from_slice(&buf[..n]);
            self.header_have += n;
            if self.header_have == self.header.len() {
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                if self.body_left == 0 {
                    self.header_have = 0;
                }
            }
            return Ok(n);
        }
        let want = self.body_left.min(buf.len());
        let n = self.stream.read(&mut buf[..want])?;
        self.body_left -= n;
        if self.body_left == 0 {
            self.header_have = 0;
        }
        Ok(n)
    }
}

impl Write for RecordExact {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// Checks the chain with webpki; the name is the expected node's, or, when
/// the source does not know it yet, the certificate's own.
#[derive(Debug)]
struct NodeNameVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for NodeNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let any = matches!(server_name, ServerName::DnsName(d) if d.as_ref() == ANY_NODE);
        let own = if any {
            let name = certificate_node_name(end_entity)
                .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
            Some(
                ServerName::try_from(name)
                    .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?,
            )
        } else {
            None
        };
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            own.as_ref().unwrap_or(server_name),
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The node name a certificate carries: its first DNS subject alternative name.
pub fn certificate_node_name(der: &CertificateDer<'_>) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("the certificate's subject alternative names cannot be parsed: {e}"))?;
    san.and_then(|ext| {
        ext.value.general_names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
    })
    .ok_or_else(|| {
        "the certificate names no node (no DNS subject alternative name); issue it with `tandem cert issue`".to_owned()
    })
}

fn describe_io(e: &io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(tls) => describe(tls),
        None if e.kind() == io::ErrorKind::UnexpectedEof => {
            "the peer closed the connection during the TLS handshake (it refused this node; see its events)".to_owned()
        }
        None => format!("TLS handshake failed: {e}"),
    }
}

/// An operator's reading of a TLS error.
#[must_use]
pub fn describe(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(cert) => format!("the peer's certificate was refused: {}", describe_certificate(cert)),
        E::NoCertificatesPresented => {
            "the peer presented no certificate: configure [tls] (ca, cert, key) on it".to_owned()
        }
        E::AlertReceived(alert) => format!(
            "the peer refused this node's certificate or TLS offer (alert {alert:?}): both nodes need [tls] with the same CA, and certificates that have not expired"
        ),
        E::InvalidMessage(_) => {
            "the peer does not speak TLS on its replication port: configure [tls] on it, or use --encryption none on both".to_owned()
        }
        other => format!("TLS failed: {other}"),
    }
}

fn describe_certificate(e: &CertificateError) -> String {
    match e {
        CertificateError::UnknownIssuer => "it is not signed by this node's CA ([tls] ca)".to_owned(),
        CertificateError::BadSignature => {
            "it is not signed by this node's CA: a CA of the same name but another key issued it ([tls] ca)".to_owned()
        }
        CertificateError::Expired => "it has expired; issue a new one with `tandem cert issue`".to_owned(),
        CertificateError::ExpiredContext { time, not_after } => format!(
            "it expired {} s ago; issue a new one with `tandem cert issue`",
            time.as_secs().saturating_sub(not_after.as_secs())
        ),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "it is not valid yet (check both clocks)".to_owned()
        }
        CertificateError::NotValidForName => "it names another node".to_owned(),
        CertificateError::NotValidForNameContext { expected, presented } => {
            let presented: Vec<&str> = presented.iter().map(|p| unquote(p)).collect();
            format!("it names {}, not the expected node {}", presented.join(", "), expected.to_str())
        }
        other => format!("{other:?}"),
    }
}

/// `DnsName("node-b")` (how rustls reports a presented name) as `node-b`.
fn unquote(text: &str) -> &str {
    text.split_once('"').and_then(|(_, rest)| rest.rsplit_once('"')).map_or(text, |(inner, _)| inner)
}
