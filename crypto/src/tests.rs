//! Unit tests of identity, TLS and seal on real sockets and real keys.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use crate::identity::{self, NODE_CERT_FILE, NODE_KEY_FILE};
use crate::keys::Protection;
use crate::seal::{Side, HEADER_BYTES};
use crate::{NodeTls, SessionKeys};

fn node(dir: &Path, ca: &Path, name: &str) -> NodeTls {
    let out = dir.join(name);
    identity::issue(ca, name, &out, 30).unwrap();
    let identity =
        identity::load_identity(&out.join("ca.pem"), &out.join(NODE_CERT_FILE), &out.join(NODE_KEY_FILE)).unwrap();
    NodeTls::new(identity).unwrap()
}

fn ca(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    identity::init_ca(&path, name, 30).unwrap();
    path
}

/// Runs a handshake between `client` (expecting `expected`) and `server`;
/// returns both results.
fn handshake(
    client: &NodeTls,
    server: &NodeTls,
    expected: Option<&str>,
) -> (Result<crate::TlsStream, String>, Result<crate::TlsStream, String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::scope(|scope| {
        let accepted = scope.spawn(|| server.accept(listener.accept().unwrap().0));
        // A client that refuses closes; the server sees its alert.
        let connected = client.connect(TcpStream::connect(address).unwrap(), expected);
        (connected, accepted.join().unwrap())
    })
}

#[test]
fn nodes_of_one_ca_authenticate_each_other_and_agree_on_keys() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path(), "cluster");
    let (a, b) = (node(dir.path(), &ca, "node-a"), node(dir.path(), &ca, "node-b"));
    let (client, server) = handshake(&a, &b, Some("node-b"));
    let (mut client, mut server) = (client.unwrap(), server.unwrap());
    assert_eq!(client.peer_name(), "node-b");
    assert_eq!(server.peer_name(), "node-a");
    client.write_all(b"hello\n").unwrap();
    let mut line = [0u8; 6];
    server.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"hello\n");
    server.write_all(b"answer\n").unwrap();
    let mut answer = [0u8; 7];
    client.read_exact(&mut answer).unwrap();
    let client_keys = client.session_keys(Some(Protection::Encrypt), 2).unwrap();
    let server_keys = server.session_keys(Some(Protection::Encrypt), 2).unwrap();
    let proof = client_keys.join_proof(77, 1);
    assert!(server_keys.check_join_proof(77, 1, &proof));
    assert!(!server_keys.check_join_proof(77, 2, &proof), "a proof is bound to its channel");
    assert!(!server_keys.check_join_proof(78, 1, &proof), "a proof is bound to its session");
    // After the TLS records, the raw stream carries exactly what the peer
    // sends next: nothing was read ahead.
    let (mut client_tcp, mut server_tcp) = (client.into_inner(), server.into_inner());
    client_tcp.write_all(b"raw frame bytes").unwrap();
    let mut raw = [0u8; 15];
    server_tcp.read_exact(&mut raw).unwrap();
    assert_eq!(&raw, b"raw frame bytes");
    // Sealed on one side, opened on the other with the exporter's keys.
    let mut seal = client_keys.channel_seal(1, Side::Source).unwrap();
    let mut open = server_keys.channel_seal(1, Side::Destination).unwrap();
    let mut header = [7u8; HEADER_BYTES];
    let payload = vec![9u8; 4096];
    let mut sealed = vec![0u8; 4096];
    let (header_tag, payload_tag) = seal.seal(&mut header, &payload, &mut sealed);
    assert_ne!(sealed, payload);
    let sequence = open.open_header(&mut header, &header_tag).unwrap();
    assert_eq!(header, [7u8; HEADER_BYTES]);
    open.open_payload(sequence, &header, &mut sealed, &payload_tag.unwrap()).unwrap();
    assert_eq!(sealed, payload);
}

#[test]
fn unknown_any_name_takes_the_certificate_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path(), "cluster");
    let (a, b) = (node(dir.path(), &ca, "node-a"), node(dir.path(), &ca, "node-b"));
    let (client, server) = handshake(&a, &b, None);
    assert_eq!(client.unwrap().peer_name(), "node-b");
    assert_eq!(server.unwrap().peer_name(), "node-a");
}

#[test]
fn another_ca_or_another_name_is_refused_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (ca(dir.path(), "cluster"), ca(dir.path(), "other"));
    let a = node(dir.path(), &ca1, "node-a");
    let b = node(dir.path(), &ca1, "node-b");
    let stranger = node(dir.path(), &ca2, "node-x");
    let (client, server) = handshake(&a, &stranger, None);
    assert!(client.unwrap_err().contains("not signed by this node's CA"));
    assert!(server.is_err());
    // A client that trusts the cluster CA but holds another CA's certificate
    // is refused by the server.
    let out = dir.path().join("impostor");
    identity::issue(&ca2, "node-a", &out, 30).unwrap();
    std::fs::copy(ca1.join("ca.pem"), out.join("ca.pem")).unwrap();
    let impostor = NodeTls::new(
        identity::load_identity(&out.join("ca.pem"), &out.join(NODE_CERT_FILE), &out.join(NODE_KEY_FILE)).unwrap(),
    )
    .unwrap();
    let (client, server) = handshake(&impostor, &b, Some("node-b"));
    assert!(server.unwrap_err().contains("not signed by this node's CA"));
    // In TLS 1.3 the client finishes first and learns of the refusal on
    // its first read.
    let error = client.unwrap().read(&mut [0u8; 1]).unwrap_err().to_string();
    assert!(error.contains("refused this node's certificate"), "{error}");
    let (client, _) = handshake(&stranger, &b, Some("node-b"));
    assert!(client.is_err());
    let (client, server) = handshake(&a, &b, Some("node-c"));
    let error = client.unwrap_err();
    assert!(error.contains("names node-b, not the expected node"), "{error}");
    assert!(server.is_err());
}

#[test]
fn an_expired_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path(), "cluster");
    let a = node(dir.path(), &ca_dir, "node-a");
    let (ca_params, ca_key, ca_pem) = identity::load_ca(&ca_dir).unwrap();
    let issuer = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = identity::node_params("node-b").unwrap();
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(10);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let cert = params.signed_by(&key, &issuer, &ca_key).unwrap();
    let out = dir.path().join("expired");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("ca.pem"), ca_pem).unwrap();
    std::fs::write(out.join(NODE_CERT_FILE), cert.pem()).unwrap();
    std::fs::write(out.join(NODE_KEY_FILE), key.serialize_pem()).unwrap();
    std::fs::set_permissions(out.join(NODE_KEY_FILE), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let expired = NodeTls::new(
        identity::load_identity(&out.join("ca.pem"), &out.join(NODE_CERT_FILE), &out.join(NODE_KEY_FILE)).unwrap(),
    )
    .unwrap();
    let (client, _) = handshake(&a, &expired, Some("node-b"));
    assert!(client.unwrap_err().contains("expired"));
}

#[test]
fn a_readable_key_file_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path(), "cluster");
    identity::issue(&ca, "node-a", &dir.path().join("a"), 30).unwrap();
    let key = dir.path().join("a").join(NODE_KEY_FILE);
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let error = identity::load_identity(&ca.join("ca.pem"), &dir.path().join("a/node.pem"), &key).unwrap_err();
    assert!(error.contains("mode 644") && error.contains("chmod 600"), "{error}");
    assert!(identity::issue(&ca, "bad_name", &dir.path().join("b"), 30).unwrap_err().contains("DNS name"));
    assert!(identity::init_ca(&ca, "again", 30).unwrap_err().contains("already exists"));
}

fn seal_pair(protection: Protection) -> (crate::ChannelSeal, crate::ChannelSeal) {
    let keys = SessionKeys::derive(Some(protection), 1, |context, out| {
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = context.iter().fold(i as u8, |a, b| a.wrapping_mul(31).wrapping_add(*b));
        }
        Ok(())
    })
    .unwrap();
    (keys.channel_seal(0, Side::Source).unwrap(), keys.channel_seal(0, Side::Destination).unwrap())
}

#[test]
fn every_alteration_replay_or_reorder_fails_to_open() {
    for protection in [Protection::Encrypt, Protection::Sign] {
        let (mut sender, _) = seal_pair(protection);
        let mut frames = Vec::new();
        for i in 0..3u8 {
            let mut header = [i; HEADER_BYTES];
            let payload = vec![i; 512];
            let mut out = vec![0u8; 512];
            let (header_tag, payload_tag) = sender.seal(&mut header, &payload, &mut out);
            let body = if protection == Protection::Encrypt { out } else { payload };
            frames.push((header, header_tag, body, payload_tag.unwrap()));
        }
        // In order and untouched: every frame opens.
        let (_, mut receiver) = seal_pair(protection);
        for (header, header_tag, body, payload_tag) in frames.clone() {
            let (mut header, mut body) = (header, body);
            let sequence = receiver.open_header(&mut header, &header_tag).unwrap();
            receiver.open_payload(sequence, &header, &mut body, &payload_tag).unwrap();
        }
        type Tamper = fn(&mut ([u8; 64], [u8; 16], Vec<u8>, [u8; 16]));
        let tampers: [(&str, Tamper); 4] = [
            ("header bit", |f| f.0[5] ^= 0x10),
            ("header tag bit", |f| f.1[0] ^= 1),
            ("payload bit", |f| f.2[100] ^= 0x80),
            ("payload tag bit", |f| f.3[15] ^= 1),
        ];
        for (what, tamper) in tampers {
            let (_, mut receiver) = seal_pair(protection);
            let mut frame = frames[0].clone();
            tamper(&mut frame);
            let opened = receiver
                .open_header(&mut frame.0, &frame.1)
                .and_then(|sequence| receiver.open_payload(sequence, &frame.0, &mut frame.2, &frame.3));
            assert!(opened.is_err(), "{protection:?}: a flipped {what} must fail");
        }
        // A replay of frame 0 after it, or frame 1 before frame 0, fails.
        let (_, mut receiver) = seal_pair(protection);
        let mut first = frames[0].clone();
        receiver.open_header(&mut first.0, &first.1).unwrap();
        let mut replay = frames[0].clone();
        assert!(receiver.open_header(&mut replay.0, &replay.1).is_err(), "replay");
        let (_, mut receiver) = seal_pair(protection);
        let mut second = frames[1].clone();
        assert!(receiver.open_header(&mut second.0, &second.1).is_err(), "reorder");
    }
}
