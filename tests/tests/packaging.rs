//! What an installation uses: shell completions, man pages, the systemd unit
//! (verified by systemd-analyze) and tandemd's readiness notification.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use tandem_tests::{bin, run_ok};

#[test]
fn completions_are_valid_shell_and_know_the_subcommands() {
    let script = run_ok(Command::new(bin("tandem")).args(["completions", "bash"]));
    assert!(script.contains("partnership") && script.contains("--channels"), "{script}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tandem.bash");
    std::fs::write(&path, &script).unwrap();
    run_ok(Command::new("bash").arg("-n").arg(&path));
    for shell in ["zsh", "fish"] {
        let script = run_ok(Command::new(bin("tandem")).args(["completions", shell]));
        assert!(script.contains("partnership"), "{shell}: {script}");
    }
    let output = Command::new(bin("tandem")).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "an unknown shell is a usage error");
    assert!(String::from_utf8_lossy(&output.stderr).contains("possible values"), "the shells are listed");
}

#[test]
fn man_pages_render_for_every_subcommand_and_the_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(Command::new(bin("tandem")).arg("man").arg("--out").arg(dir.path()));
    assert!(out.contains("man pages written"), "{out}");
    for page in ["man1/tandem.1", "man1/tandem-partnership-create.1", "man8/tandemd.8"] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH "), "{page} is a man page");
    }
    let create = std::fs::read_to_string(dir.path().join("man1/tandem-partnership-create.1")).unwrap();
    assert!(create.contains("channels"), "options are documented");
    if Command::new("man").arg("--version").output().is_ok() {
        let rendered =
            run_ok(Command::new("man").env("MANPATH", dir.path()).env("MANWIDTH", "80").args(["-P", "cat", "tandemd"]));
        assert!(rendered.contains("--config"), "{rendered}");
    }
    let Ok(analyze) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed; the unit is not verified");
        return;
    };
    assert!(analyze.status.success());
    // The unit as installed, with ExecStart pointing at the binary under test.
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/systemd/tandemd.service"))
        .unwrap()
        .replace("/usr/bin/tandemd", &bin("tandemd").display().to_string());
    let unit_path = dir.path().join("tandemd.service");
    std::fs::write(&unit_path, unit).unwrap();
    let output =
        Command::new("systemd-analyze").env("MANPATH", dir.path()).arg("verify").arg(&unit_path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && text.trim().is_empty(), "systemd-analyze verify: {text}");
}

/// tandemd says READY=1 on $NOTIFY_SOCKET once it serves (Type=notify).
#[test]
fn tandemd_notifies_systemd_when_ready() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let config = tandem_tests::minimal_config(dir.path(), "n", "");
    let mut child = Command::new(bin("tandemd"))
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let received = socket.recv(&mut buf);
    let api_up = dir.path().join("api.sock").exists();
    // SAFETY: SIGTERM to the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopping = socket.recv(&mut buf[128..]).map(|n| String::from_utf8_lossy(&buf[128..128 + n]).into_owned());
    let _ = child.wait();
    let message = String::from_utf8_lossy(&buf[..received.expect("a readiness notification")]).into_owned();
    assert!(message.contains("READY=1"), "{message}");
    assert!(api_up, "the management socket is up before READY=1");
    assert!(stopping.is_ok_and(|m| m.contains("STOPPING=1")), "SIGTERM is announced");
}

/// Under systemd (`JOURNAL_STREAM` set) logs and numbered events go to
/// journald's native socket with their fields. No journald runs here, so the
/// test listens on its socket path itself (skipped where one exists).
#[test]
fn under_systemd_logs_and_events_go_to_journald_with_fields() {
    let journal_dir = std::path::Path::new("/run/systemd/journal");
    let journal_socket = journal_dir.join("socket");
    if journal_socket.exists() {
        eprintln!("a journald runs here; its socket is not taken over");
        return;
    }
    if std::fs::create_dir_all(journal_dir).is_err() {
        eprintln!("cannot create {}; skipped", journal_dir.display());
        return;
    }
    let socket = UnixDatagram::bind(&journal_socket).expect("bind the journal socket");
    // The socket path goes away with the test, even when an assertion fails.
    struct RemoveOnDrop(std::path::PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = RemoveOnDrop(journal_socket.clone());
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = tandem_tests::minimal_config(dir.path(), "j", "");
    let child = Command::new(bin("tandemd"))
        .arg("--config")
        .arg(&config)
        .env("JOURNAL_STREAM", "8:12345")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !entries.iter().any(|e: &Vec<(String, String)>| e.iter().any(|(k, v)| k == "MESSAGE" && v == "tandemd ready"))
    {
        let Ok(n) = socket.recv(&mut buf) else { break };
        entries.push(journal_fields(&buf[..n]));
    }
    // A numbered event (group created) travels with its id and group.
    let volume = dir.path().join("v.img");
    std::fs::File::create(&volume).unwrap().set_len(1 << 20).unwrap();
    let api = dir.path().join("api.sock");
    let log = dir.path().join("g.log");
    run_ok(
        Command::new(bin("tandem"))
            .arg("--api")
            .arg(&api)
            .args(["group", "create", "--name", "g1", "--log-size", "128MiB", "--log"])
            .arg(&log)
            .arg("--volume")
            .arg(&volume),
    );
    let mut event = None;
    while event.is_none() {
        let Ok(n) = socket.recv(&mut buf) else { break };
        let fields = journal_fields(&buf[..n]);
        if fields.iter().any(|(k, v)| k == "F_GROUP" && v == "g1") && fields.iter().any(|(k, _)| k == "F_ID") {
            event = Some(fields);
        }
    }
    // SAFETY: SIGTERM to the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let output = child.wait_with_output().unwrap();
    let event = event.expect("the group-created event reached the journal");
    assert!(event.iter().any(|(k, v)| k == "F_ID" && v == "1001"), "group created is event 1001: {event:?}");
    let ready = entries.last().expect("journal entries arrived");
    let field = |key: &str| ready.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    assert_eq!(field("MESSAGE"), Some("tandemd ready"), "{entries:?}");
    assert_eq!(field("SYSLOG_IDENTIFIER"), Some("tandemd"), "{ready:?}");
    assert_eq!(field("F_NODE"), Some("j"), "structured fields travel as fields: {ready:?}");
    assert!(field("PRIORITY").is_some(), "{ready:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("tandemd ready"), "nothing duplicated on stderr: {stderr}");
}

/// The fields of one entry of journald's native protocol: `KEY=value` lines,
/// or `KEY`, a newline, a 64-bit little-endian length and the value.
fn journal_fields(mut bytes: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'=') {
        let key = String::from_utf8_lossy(&bytes[..end]).into_owned();
        if bytes[end] == b'=' {
            let rest = &bytes[end + 1..];
            let line_end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            fields.push((key, String::from_utf8_lossy(&rest[..line_end]).into_owned()));
            bytes = &rest[(line_end + 1).min(rest.len())..];
        } else {
            let rest = &bytes[end + 1..];
            let length = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            fields.push((key, String::from_utf8_lossy(&rest[8..8 + length]).into_owned()));
            bytes = &rest[(8 + length + 1).min(rest.len())..];
        }
    }
    fields
}

/// `scripts/package-deb` (cargo-deb) makes a .deb that unpacks (`dpkg -x`)
/// into binaries, the unit, the default configuration as a conffile, man
/// pages and completions.
#[test]
fn the_deb_unpacks_into_the_expected_files() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // The binaries under test are packaged as built (other tests run them).
    let output =
        Command::new(root.join("scripts/package-deb")).args(["dev", "--no-build"]).current_dir(&root).output().unwrap();
    assert!(output.status.success(), "package-deb: {}", String::from_utf8_lossy(&output.stderr));
    let deb = root.join("target/debian/tandem_0.1.0-1_amd64.deb");
    let scratch = tempfile::tempdir().unwrap();
    run_ok(Command::new("dpkg").arg("-x").arg(&deb).arg(scratch.path()));
    for file in [
        "usr/bin/tandemd",
        "usr/bin/tandem",
        "lib/systemd/system/tandemd.service",
        "etc/tandem/tandem.toml",
        "usr/share/man/man1/tandem-partnership-create.1.gz",
        "usr/share/man/man8/tandemd.8.gz",
        "usr/share/bash-completion/completions/tandem",
        "usr/share/doc/tandem/tandem-dashboard.json",
    ] {
        assert!(scratch.path().join(file).is_file(), "{file} is in the package");
    }
    let control = run_ok(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Package"));
    assert_eq!(control.trim(), "tandem");
    let listed = run_ok(Command::new("sh").arg("-c").arg(format!(
        "dpkg-deb -e {} {}/ctrl && cat {}/ctrl/conffiles",
        deb.display(),
        scratch.path().display(),
        scratch.path().display()
    )));
    assert_eq!(listed.trim(), "/etc/tandem/tandem.toml", "the configuration survives upgrades");
    let version = run_ok(Command::new(scratch.path().join("usr/bin/tandem")).arg("--version"));
    assert!(version.starts_with("tandem "), "{version}");
}
