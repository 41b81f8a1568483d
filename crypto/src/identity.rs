//! Node identity: a self-managed cluster CA and the node certificates it
//! issues (`tandem cert init-ca`, `tandem cert issue`), and loading a node's
//! CA, certificate and key from PEM files (ours or the operator's own).
//!
//! A node certificate names its node in the subject alternative name (a DNS
//! name, which is what rustls checks on a server) and in the common name, and
//! is valid for both TLS roles: every node is a server to its sources and a
//! client to its destinations.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use time::{Duration, OffsetDateTime};

/// File names inside a CA directory and a node directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const NODE_CERT_FILE: &str = "node.pem";
pub const NODE_KEY_FILE: &str = "node.key";

/// Validity of a new CA when not given (10 years).
pub const DEFAULT_CA_VALID_DAYS: u32 = 3650;
/// Validity of a new node certificate when not given (about 2 years).
pub const DEFAULT_NODE_VALID_DAYS: u32 = 825;

/// A node's TLS material, loaded and checked.
pub struct NodeIdentity {
    /// The node name its certificate carries.
    pub name: String,
    pub ca: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for NodeIdentity {
    // The key never appears in logs, even through a debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity").field("name", &self.name).field("key", &"<redacted>").finish()
    }
}

/// Whether `name` can be a node name in a certificate (a DNS name, as rustls
/// checks server names).
pub fn check_node_name(name: &str) -> Result<(), String> {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() <= 253
        && name.split('.').all(label_ok)
        && matches!(ServerName::try_from(name), Ok(ServerName::DnsName(_)))
    {
        Ok(())
    } else {
        Err(format!(
            "node name {name:?} cannot go into a certificate: use letters, digits, '-' and '.' (a DNS name), e.g. node-a"
        ))
    }
}

/// Creates a cluster CA in `dir` (ca.pem, and ca.key readable by its owner only).
pub fn init_ca(dir: &Path, common_name: &str, valid_days: u32) -> Result<Vec<PathBuf>, String> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    refuse_existing(&[&cert_path, &key_path])?;
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let key = KeyPair::generate().map_err(|e| format!("cannot generate the CA key: {e}"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, valid_days);
    let cert = params.self_signed(&key).map_err(|e| format!("cannot sign the CA certificate: {e}"))?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    Ok(vec![cert_path, key_path])
}

/// Issues a certificate for node `node` from the CA in `ca_dir`, into
/// `out_dir` (node.pem, node.key readable by its owner only, and a copy of
/// ca.pem): the three files `[tls]` names.
pub fn issue(ca_dir: &Path, node: &str, out_dir: &Path, valid_days: u32) -> Result<Vec<PathBuf>, String> {
    check_node_name(node)?;
    let (ca_params, ca_key, ca_pem) = load_ca(ca_dir)?;
    let cert_path = out_dir.join(NODE_CERT_FILE);
    let key_path = out_dir.join(NODE_KEY_FILE);
    let ca_copy = out_dir.join(CA_CERT_FILE);
    refuse_existing(&[&cert_path, &key_path])?;
    fs::create_dir_all(out_dir).map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let issuer = ca_params.self_signed(&ca_key).map_err(|e| format!("cannot load the CA: {e}"))?;
    let key = KeyPair::generate().map_err(|e| format!("cannot generate the node key: {e}"))?;
    let mut params = node_params(node)?;
    set_validity(&mut params, valid_days);
    let cert = params.signed_by(&key, &issuer, &ca_key).map_err(|e| format!("cannot sign the certificate: {e}"))?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    if ca_copy != ca_dir.join(CA_CERT_FILE) {
        write_public(&ca_copy, ca_pem.as_bytes())?;
    }
    Ok(vec![cert_path, key_path, ca_copy])
}

/// The parameters of a node certificate for `node` (also used by tests to
/// make deliberately bad certificates).
pub fn node_params(node: &str) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(node);
    let dns = node.try_into().map_err(|_| format!("node name {node:?} is not a DNS name"))?;
    params.subject_alt_names = vec![SanType::DnsName(dns)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// Reads the CA of `ca_dir`: its parameters, key and certificate text.
pub fn load_ca(ca_dir: &Path) -> Result<(CertificateParams, KeyPair, String), String> {
    let cert_path = ca_dir.join(CA_CERT_FILE);
    let key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = read_text(&cert_path)?;
    check_key_permissions(&key_path)?;
    let ca_key = KeyPair::from_pem(&read_text(&key_path)?)
        .map_err(|e| format!("{} is not a private key in PEM: {e}", key_path.display()))?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca_pem)
        .map_err(|e| format!("{} is not a CA certificate in PEM: {e}", cert_path.display()))?;
    Ok((ca_params, ca_key, ca_pem))
}

/// Refuses a key file that its group or others can read, with the fix.
pub fn check_key_permissions(path: &Path) -> Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "key file {} has mode {mode:03o}: its group or others can read it; run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// Loads the `[tls]` files of a node: the CA to trust, the node's
/// certificate chain and its private key.
pub fn load_identity(ca: &Path, cert: &Path, key: &Path) -> Result<NodeIdentity, String> {
    check_key_permissions(key)?;
    let ca_certs = read_certs(ca)?;
    let chain = read_certs(cert)?;
    let key_der = rustls_pemfile::private_key(&mut read_text(key)?.as_bytes())
        .map_err(|e| format!("{} is not a private key in PEM: {e}", key.display()))?
        .ok_or_else(|| format!("{} holds no private key", key.display()))?;
    let name = crate::tls::certificate_node_name(&chain[0]).map_err(|e| format!("{}: {e}", cert.display()))?;
    Ok(NodeIdentity { name, ca: ca_certs, chain, key: key_der })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = read_text(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not a certificate in PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn read_text(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, "Tandem");
    name
}

/// Valid from an hour ago (clocks of two nodes differ a little) for `days`.
fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
}

fn refuse_existing(paths: &[&Path]) -> Result<(), String> {
    for path in paths {
        if path.exists() {
            return Err(format!("{} already exists; choose another directory or remove it first", path.display()));
        }
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
