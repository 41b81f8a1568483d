//! Security between real daemons: node certificates from `tandem cert`,
//! mutual TLS on the control connection, sealed frames on every channel,
//! and a fault-injecting proxy between the nodes that alters, replays and
//! reorders frames and tampers with the TLS handshake line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_tests::proxy::{Fault, FaultProxy};
use tandem_tests::{bin, run_ok, Node};

const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// A cluster CA made with `tandem cert init-ca`, issuing with `tandem cert issue`.
struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = run_ok(Command::new(bin("tandem")).args(["cert", "init-ca"]).arg(dir.path().join("ca")));
        assert!(out.contains("cluster CA created"), "{out}");
        Self { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Issues node `name`'s certificate into its own directory.
    fn issue(&self, name: &str) -> PathBuf {
        let out_dir = self.dir.path().join(format!("{name}-{}", rand::random::<u32>()));
        let out = run_ok(
            Command::new(bin("tandem"))
                .args(["cert", "issue", "--ca"])
                .arg(self.ca())
                .args(["--node", name, "--out"])
                .arg(&out_dir),
        );
        assert!(out.contains(&format!("certificate for node {name} issued")) && out.contains("[tls]"), "{out}");
        out_dir
    }

    /// Issues node `name`'s certificate valid until yesterday.
    fn issue_expired(&self, name: &str) -> PathBuf {
        let (ca_params, ca_key, ca_pem) = tandem_crypto::identity::load_ca(&self.ca()).unwrap();
        let issuer = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = tandem_crypto::identity::node_params(name).unwrap();
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
        params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        let cert = params.signed_by(&key, &issuer, &ca_key).unwrap();
        let out_dir = self.dir.path().join(format!("{name}-expired"));
        std::fs::create_dir_all(&out_dir).unwrap();
        std::fs::write(out_dir.join("ca.pem"), ca_pem).unwrap();
        std::fs::write(out_dir.join("node.pem"), cert.pem()).unwrap();
        let key_path = out_dir.join("node.key");
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        out_dir
    }
}

/// `[replication]` lines: `encryption`, then a `[tls]` section over `tls`.
fn replication_toml(encryption: &str, tls: Option<&Path>) -> String {
    let mut text = format!("encryption = \"{encryption}\"\n");
    if let Some(dir) = tls {
        let d = dir.display();
        text.push_str(&format!("\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/node.pem\"\nkey = \"{d}/node.key\"\n"));
    }
    text
}

fn start(name: &str, encryption: &str, tls: Option<&Path>) -> Node {
    Node::start_named(name, "", &replication_toml(encryption, tls))
}

fn random_into(node: &Node, path: &Path, size_mib: u64) {
    let _ = node;
    run_ok(
        Command::new("dd")
            .arg("if=/dev/urandom")
            .arg(format!("of={}", path.display()))
            .arg("bs=1M")
            .arg(format!("count={size_mib}"))
            .arg("conv=notrunc")
            .arg("status=none"),
    );
}

fn md5(path: &Path) -> String {
    run_ok(Command::new("md5sum").arg(path)).split_whitespace().next().unwrap().to_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The events of `node` with number `id`, as text.
fn events(node: &Node, id: u32) -> Vec<String> {
    let text = node.cli_ok(&["events", "--json"]);
    text.lines().filter(|line| line.contains(&format!("\"id\":{id},"))).map(str::to_owned).collect()
}

fn wait_for_event_text(node: &Node, id: u32, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !events(node, id).iter().any(|e| e.contains(text)) {
        assert!(Instant::now() < deadline, "no event {id} with {text:?}: {:?}", node.cli_ok(&["events", "--json"]));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A partnership over TLS with AES-128-GCM: the data arrives intact, both
/// sides report the protection, and the bytes on the wire hold none of the
/// data written.
#[test]
fn an_encrypted_partnership_replicates_and_nothing_readable_crosses_the_wire() {
    tandem_tests::require_tool("qemu-io", "qemu-utils");
    let cluster = Cluster::new();
    let source = start("node-a", "aes-128-gcm", Some(&cluster.issue("node-a")));
    let destination = start("node-b", "aes-128-gcm", Some(&cluster.issue("node-b")));
    let proxy = FaultProxy::start(destination.replication_address().parse().unwrap(), &[]);
    source.create_group("rg01", "128MiB", &[("data", 32 << 20)]);
    destination.create_group("rg02", "128MiB", &[("data", 32 << 20)]);
    // A recognisable pattern before (initial copy) and after (log shipping).
    run_ok(
        Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "count=4", "status=none", "conv=notrunc"])
            .arg(format!("of={}", source.path("rg01-data.img").display())),
    );
    let pattern_file = source.path("pattern");
    std::fs::write(&pattern_file, "TANDEM-PLAINTEXT-".repeat(64 << 10)).unwrap();
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", pattern_file.display()))
            .args(["bs=1M", "conv=notrunc", "status=none"])
            .arg(format!("of={}", source.path("rg01-data.img").display())),
    );
    let address = proxy.address.to_string();
    let _ = source.partner_at("rg01", &address, "rg02", &["--destination-node", "node-b", "--mode", "sync"]);
    run_ok(
        source
            .client_command("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 8M 4M"])
            .arg(source.nbd_uri("rg01", "data")),
    );
    source.wait_in_sync("rg01", SYNC_TIMEOUT);
    assert_eq!(md5(&source.path("rg01-data.img")), md5(&destination.path("rg02-data.img")));
    for (node, group) in [(&source, "rg01"), (&destination, "rg02")] {
        let p = node.partnership(group);
        assert_eq!(p["encryption"], "aes-128-gcm", "{p:#}");
        assert_eq!(p["frames_rejected"], 0, "{p:#}");
    }
    let shown = source.cli_ok(&["partnership", "show", "--group", "rg01"]);
    assert!(shown.contains("AES-128-GCM (encrypted and authenticated)"), "{shown}");
    let wire = proxy.captured.lock().unwrap().clone();
    assert!(wire.len() > 5 << 20, "the data crossed the proxy ({} bytes)", wire.len());
    let plaintext = b"TANDEM-PLAINTEXT-TANDEM-PLAINTEXT-";
    assert!(!wire.windows(plaintext.len()).any(|w| w == plaintext), "the initial copy's data is readable on the wire");
    assert!(!wire.windows(4096).any(|w| w.iter().all(|&b| b == 0x5a)), "a replicated write is readable on the wire");
    // The keys never reach logs or status.
    let log = source.log() + &destination.log();
    assert!(!log.contains("PRIVATE KEY"), "a key appeared in a log");
}

/// A frame altered in its header, its tag, its payload or the payload's tag,
/// replayed, or swapped with the next is refused: the channel resets with
/// event 8001, nothing of it is applied, the source reconnects and the
/// volumes end equal.
#[test]
fn altered_replayed_or_reordered_frames_reset_the_channel_and_nothing_is_applied() {
    let cluster = Cluster::new();
    let source = start("node-a", "sign", Some(&cluster.issue("node-a")));
    let destination = start("node-b", "sign", Some(&cluster.issue("node-b")));
    let plan = [
        Fault::FlipHeader,
        Fault::FlipHeaderTag,
        Fault::FlipPayload,
        Fault::FlipPayloadTag,
        Fault::Replay,
        Fault::Swap,
    ];
    let proxy = FaultProxy::start(destination.replication_address().parse().unwrap(), &plan);
    source.create_group("rg01", "256MiB", &[("data", 96 << 20)]);
    destination.create_group("rg02", "256MiB", &[("data", 96 << 20)]);
    random_into(&source, &source.path("rg01-data.img"), 96);
    let address = proxy.address.to_string();
    let _ = source.partner_at("rg01", &address, "rg02", &["--encryption", "sign", "--channels", "2"]);
    let deadline = Instant::now() + SYNC_TIMEOUT;
    while proxy.remaining() > 0 {
        assert!(
            Instant::now() < deadline,
            "faults left: {}; applied {:?}",
            proxy.remaining(),
            proxy.applied.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    source.wait_in_sync("rg01", SYNC_TIMEOUT);
    assert_eq!(*proxy.applied.lock().unwrap(), plan);
    let rejected = events(&destination, 8001);
    assert_eq!(rejected.len(), plan.len(), "one reset per fault: {rejected:#?}");
    assert!(rejected.iter().all(|e| e.contains("failed authentication")), "{rejected:#?}");
    assert_eq!(destination.partnership("rg02")["frames_rejected"], plan.len() as u64);
    assert_eq!(md5(&source.path("rg01-data.img")), md5(&destination.path("rg02-data.img")));
}

/// Each refusal of mutual authentication, on both sides, with its reason
/// and an event on the refusing node.
#[test]
fn peers_without_a_valid_certificate_are_refused_on_both_sides() {
    let cluster = Cluster::new();
    let destination = start("node-b", "aes-128-gcm", Some(&cluster.issue("node-b")));
    destination.create_group("rg02", "128MiB", &[("data", 8 << 20)]);
    let target = destination.replication_address();
    let create = |source: &Node, extra: &[&str]| {
        if source.cli(&["group", "show", "rg01"]).status.code() != Some(0) {
            source.create_group("rg01", "128MiB", &[("data", 8 << 20)]);
        }
        let mut args = vec![
            "partnership",
            "create",
            "--source-group",
            "rg01",
            "--destination",
            &target,
            "--destination-group",
            "rg02",
        ];
        args.extend_from_slice(extra);
        let output = source.cli(&args);
        assert!(!output.status.success(), "must be refused: {output:?}");
        assert_eq!(destination.group_status("rg02")["role"], "standalone");
        stderr(&output)
    };

    // No certificate at all: a source without [tls] connects in clear.
    let plain = start("node-a", "none", None);
    let refused = create(&plain, &["--encryption", "none"]);
    assert!(refused.contains("accepts replication only over TLS"), "{refused}");
    wait_for_event_text(&destination, 8002, "accepts replication only over TLS");

    // A certificate of another CA (the impostor trusts ours, so it is the
    // destination that refuses).
    let other = Cluster::new();
    let impostor_dir = other.issue("node-a");
    std::fs::copy(cluster.ca().join("ca.pem"), impostor_dir.join("ca.pem")).unwrap();
    let impostor = start("node-a", "aes-128-gcm", Some(&impostor_dir));
    let refused = create(&impostor, &[]);
    assert!(
        refused.contains("refused this node's certificate") || refused.contains("closed the connection"),
        "{refused}"
    );
    wait_for_event_text(&destination, 8002, "not signed by this node's CA");

    // The destination is not the node the source expects.
    let source = start("node-a", "aes-128-gcm", Some(&cluster.issue("node-a")));
    let refused = create(&source, &["--destination-node", "node-x"]);
    assert!(refused.contains("names node-b, not the expected node node-x"), "{refused}");
    wait_for_event_text(&source, 2003, "not the expected node node-x");

    // A weaker protection than the destination requires.
    let refused = create(&source, &["--encryption", "sign"]);
    assert!(refused.contains("offers encryption sign but node-b requires"), "{refused}");
    wait_for_event_text(&destination, 2003, "offers encryption sign");

    // An expired destination certificate.
    let expired = start("node-c", "aes-128-gcm", Some(&cluster.issue_expired("node-c")));
    expired.create_group("rg03", "128MiB", &[("data", 8 << 20)]);
    let output = source.partner_with("rg01", &expired, "rg03", &[]);
    assert!(stderr(&output).contains("expired"), "{output:?}");

    // A destination without [tls] cannot take TLS.
    let clear = start("node-d", "none", None);
    clear.create_group("rg04", "128MiB", &[("data", 8 << 20)]);
    let output = source.partner_with("rg01", &clear, "rg04", &[]);
    assert!(!output.status.success(), "{output:?}");
    wait_for_event_text(&clear, 8002, "has no [tls] section");
}

/// A rewritten handshake line (where the encryption is offered) breaks the
/// TLS record that carries it: refused, nothing created.
#[test]
fn a_tampered_handshake_line_is_refused() {
    let cluster = Cluster::new();
    let source = start("node-a", "aes-128-gcm", Some(&cluster.issue("node-a")));
    let destination = start("node-b", "aes-128-gcm", Some(&cluster.issue("node-b")));
    source.create_group("rg01", "128MiB", &[("data", 8 << 20)]);
    destination.create_group("rg02", "128MiB", &[("data", 8 << 20)]);
    let proxy = FaultProxy::start(destination.replication_address().parse().unwrap(), &[Fault::AlterTlsHello]);
    let address = proxy.address.to_string();
    let output = source.cli(&[
        "partnership",
        "create",
        "--source-group",
        "rg01",
        "--destination",
        &address,
        "--destination-group",
        "rg02",
    ]);
    assert!(!output.status.success(), "{output:?}");
    assert_eq!(*proxy.applied.lock().unwrap(), [Fault::AlterTlsHello]);
    assert_eq!(destination.group_status("rg02")["role"], "standalone");
    assert_eq!(source.group_status("rg01")["role"], "standalone");
    assert!(destination.log().contains("decrypt"), "{}", destination.log());
}

/// tandemd refuses a key others can read and a certificate of another node,
/// with the fix.
#[test]
fn tandemd_refuses_a_readable_key_or_a_certificate_of_another_node() {
    let cluster = Cluster::new();
    let tls = cluster.issue("node-a");
    let dir = tempfile::tempdir().unwrap();
    let start_with = |name: &str| {
        let config = tandem_tests::minimal_config(dir.path(), name, "");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&replication_toml("aes-128-gcm", Some(&tls)).replace("encryption = \"aes-128-gcm\"\n", ""));
        std::fs::write(&config, text).unwrap();
        Command::new(bin("tandemd")).arg("--config").arg(&config).output().unwrap()
    };
    let renamed = start_with("node-c");
    assert!(!renamed.status.success());
    assert!(stderr(&renamed).contains("names node \"node-a\" but node.name is \"node-c\""), "{}", stderr(&renamed));
    std::fs::set_permissions(tls.join("node.key"), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let readable = start_with("node-a");
    assert!(!readable.status.success());
    assert!(stderr(&readable).contains("chmod 600"), "{}", stderr(&readable));
}

/// A probe (here `tandem bench --transport`) of a node with `[tls]` is
/// refused in clear and measures once it authenticates with this node's
/// `[tls]` (`--node-config`).
#[test]
fn probes_of_a_tls_node_authenticate_with_the_node_config() {
    let cluster = Cluster::new();
    let source = start("node-a", "aes-128-gcm", Some(&cluster.issue("node-a")));
    let destination = start("node-b", "aes-128-gcm", Some(&cluster.issue("node-b")));
    let address = destination.replication_address();
    let bench = |node_config: &Path| {
        Command::new(bin("tandem"))
            .arg("--node-config")
            .arg(node_config)
            .args(["bench", "--transport", &address, "--seconds", "1", "--warmup-seconds", "0", "--json"])
            .output()
            .unwrap()
    };
    let refused = bench(Path::new("/nonexistent/tandem.toml"));
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("accepts replication only over TLS"), "{}", stderr(&refused));
    let measured = bench(source.config_path());
    assert!(measured.status.success(), "{}", stderr(&measured));
    let report: serde_json::Value = serde_json::from_slice(&measured.stdout).unwrap();
    assert!(report.to_string().contains("iops"), "{report:#}");
}
