//! What an installation uses: shell completions, man pages, the systemd unit
//! (verified by systemd-analyze) and tandemd's readiness notification.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use tandem_tests::{bin, free_port, run_ok};

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
    let config = dir.path().join("tandem.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"n\"\ncores = [0]\nstate_dir = \"{0}/state\"\napi_socket = \"{0}/api.sock\"\nnbd_listen = \"127.0.0.1:{1}\"\nreplication_listen = \"127.0.0.1:{2}\"\n",
            dir.path().display(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
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
