//! Every bad input of `tandem group ...` gets a clear error naming the problem,
//! and nothing is lost: groups survive restarts, delete keeps the data.

use std::os::fd::AsRawFd;
use std::process::Command;

use tandem_tests::nbd_client::NbdClient;
use tandem_tests::pattern::block_content;
use tandem_tests::{bin, Node};

/// The daemon refuses (exit code 1) with a message containing `expected`.
fn refused(node: &Node, args: &[&str], expected: &str) {
    refused_with_code(node, args, expected, 1);
}

fn refused_with_code(node: &Node, args: &[&str], expected: &str, code: i32) {
    let output = node.cli(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "tandem {args:?} must fail: {stderr}");
    assert!(stderr.contains(expected), "tandem {args:?} said {stderr:?}, expected it to mention {expected:?}");
}

fn args(owned: &[String]) -> Vec<&str> {
    owned.iter().map(String::as_str).collect()
}

fn sparse(node: &Node, name: &str, size: u64) -> String {
    let path = node.path(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path.display().to_string()
}

#[test]
fn daemon_not_running_is_reported_with_exit_code_3() {
    let output = Command::new(bin("tandem")).args(["--api", "/nonexistent/api.sock", "status"]).output().unwrap();
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("tandemd is not running") && stderr.contains("/nonexistent/api.sock"), "{stderr}");
}

#[test]
fn group_creation_refuses_bad_inputs_with_precise_errors() {
    let node = Node::start("");
    let good = sparse(&node, "good.img", 16 << 20);
    let log = node.path("a.log").display().to_string();
    let create = |log: &str, size: &str, volume: &str| -> Vec<String> {
        ["group", "create", "--name", "rg01", "--log", log, "--log-size", size, "--volume", volume]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    };

    refused(&node, &args(&create(&log, "128MiB", &node.path("missing.img").display().to_string())), "cannot access");
    refused(&node, &args(&create(&log, "64MiB", &good)), "below the minimum of 128 MiB");
    let odd = sparse(&node, "odd.img", (16 << 20) + 100);
    refused(&node, &args(&create(&log, "128MiB", &odd)), "not a positive multiple of its 4096-byte sector");
    // A malformed size is a usage error of the CLI itself (exit code 2).
    refused_with_code(&node, &args(&create(&log, "128 parsecs", &good)), "unknown size unit", 2);
    refused(&node, &args(&create(&good, "128MiB", &good)), "is given twice");
    let data_file = node.path("precious.dat");
    std::fs::write(&data_file, b"someone's data").unwrap();
    refused(&node, &args(&create(&data_file.display().to_string(), "128MiB", &good)), "holds data");
    assert_eq!(std::fs::read(&data_file).unwrap(), b"someone's data", "the refused path was not touched");

    // A volume held by another process.
    let held = sparse(&node, "held.img", 16 << 20);
    let holder = std::fs::File::open(&held).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX) }, 0);
    refused(&node, &args(&create(&log, "128MiB", &held)), "held by another process");
    drop(holder);

    // Two volumes with one name would make one export unreachable.
    let twin = sparse(&node, "twin.img", 16 << 20);
    let (first, second) = (format!("v={good}"), format!("v={twin}"));
    refused(
        &node,
        &["group", "create", "--name", "rg01", "--log", &log, "--volume", &first, "--volume", &second],
        "two volumes are named",
    );

    // Bad names.
    refused(
        &node,
        &["group", "create", "--name", "bad/name", "--log", &log, "--volume", &good],
        "must be 1 to 47 characters",
    );

    // A group, then conflicts with it.
    let _ = node.cli_ok(&args(&create(&log, "128MiB", &good)));
    assert!(!node.path("a.log").with_extension("log.tmp").exists());
    refused(&node, &args(&create(&node.path("b.log").display().to_string(), "128MiB", &good)), "already exists");
    let other = sparse(&node, "other.img", 16 << 20);
    let second = |log: &str, volume: &str| {
        vec!["group", "create", "--name", "rg02", "--log", log, "--log-size", "128MiB", "--volume", volume]
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    refused(&node, &args(&second(&node.path("b.log").display().to_string(), &good)), "already used by group rg01");
    refused(&node, &args(&second(&log, &other)), "already used by group rg01");

    // Unknown groups.
    refused(&node, &["group", "show", "nope"], "no group named nope");
    refused(&node, &["group", "delete", "nope"], "no group named nope");
}

#[test]
fn groups_survive_restarts_and_delete_keeps_the_data() {
    let mut node = Node::start("");
    node.create_group("rg01", "128MiB", &[("a", 8 << 20), ("b", 8 << 20)]);
    let listed = node.cli_ok(&["group", "list"]);
    assert!(listed.contains("rg01/a") && listed.contains("rg01/b"), "{listed}");
    let mut client = NbdClient::connect(node.nbd_port, "rg01/b").unwrap();
    assert_eq!(client.write(4096, &block_content(1, 1)).unwrap(), 0);
    drop(client);

    node.stop();
    node.spawn();
    let status = node.group_status("rg01");
    assert_eq!(status["current_lsn"], 1, "the group came back with its history: {status}");
    assert_eq!(status["last_recovery"]["records_replayed"], 0, "a clean stop checkpoints everything: {status}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&node.api).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o666, "anyone may connect; each request is checked against its caller");
    assert_eq!(status["volumes"].as_array().unwrap().len(), 2);
    let human = node.cli_ok(&["status"]);
    assert!(human.contains("group rg01: Online") && human.contains("latency"), "{human}");

    let message = node.cli_ok(&["group", "delete", "rg01"]);
    assert!(message.contains("deleted"), "{message}");
    let volume = std::fs::read(node.path("rg01-b.img")).unwrap();
    assert_eq!(&volume[4096..8192], block_content(1, 1).as_slice(), "delete leaves the volume holding every write");
    assert!(node.cli_ok(&["group", "list"]).contains("no groups"));
    // The released log and the volumes can form a new group.
    node.create_group("rg01", "128MiB", &[("a", 8 << 20)]);
    node.stop();
    node.spawn();
    assert_eq!(node.group_status("rg01")["state"], "Online");
}

/// A group moves to another core thread with its data and its history; the
/// move survives a restart; a core that does not exist is refused with the
/// range.
#[test]
fn a_group_moves_between_cores_and_stays_there() {
    let mut node = Node::start("");
    node.create_group("rg01", "128MiB", &[("a", 8 << 20)]);
    let mut client = NbdClient::connect(node.nbd_port, "rg01/a").unwrap();
    assert_eq!(client.write(0, &block_content(1, 1)).unwrap(), 0);
    drop(client);
    let cores = node.group_status("rg01")["core"].as_u64().unwrap();
    assert_eq!(cores, 0);
    let two_cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) >= 2;
    let target = usize::from(two_cores);
    let moved = node.cli_ok(&["group", "move", "rg01", "--core", &target.to_string()]);
    assert!(moved.contains(&format!("core {target}")), "{moved}");
    let status = node.group_status("rg01");
    assert_eq!(status["core"].as_u64().unwrap() as usize, target, "{status}");
    assert_eq!(status["current_lsn"], 1, "the history came along: {status}");
    let mut client = NbdClient::connect(node.nbd_port, "rg01/a").unwrap();
    assert_eq!(client.read(0, 4096).unwrap(), Ok(block_content(1, 1)), "the data came along");
    assert_eq!(client.write(4096, &block_content(2, 1)).unwrap(), 0, "and the group takes writes there");
    drop(client);
    node.stop();
    node.spawn();
    assert_eq!(node.group_status("rg01")["core"].as_u64().unwrap() as usize, target, "the registry kept the move");
    let refused = node.cli(&["group", "move", "rg01", "--core", "7"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("core 7 does not exist: this node runs cores 0 to"), "{stderr}");
}

/// A group whose volume disappeared while the daemon was down does not stop the
/// daemon or the other groups: it is reported unavailable with the reason and
/// can be deleted.
#[test]
fn a_group_with_a_missing_volume_is_reported_and_the_others_keep_serving() {
    let mut node = Node::start("");
    node.create_group("rg01", "128MiB", &[("a", 8 << 20)]);
    node.create_group("rg02", "128MiB", &[("b", 8 << 20)]);
    node.stop();
    std::fs::remove_file(node.path("rg02-b.img")).unwrap();
    node.spawn();
    assert_eq!(node.group_status("rg01")["state"], "Online");
    let broken = node.group_status("rg02");
    let state = broken["state"].as_str().unwrap();
    assert!(state.starts_with("Unavailable") && state.contains("rg02-b.img"), "{state}");
    let mut client = NbdClient::connect(node.nbd_port, "rg01/a").unwrap();
    assert_eq!(client.write(0, &block_content(3, 0)).unwrap(), 0, "rg01 still serves");
    assert!(NbdClient::connect(node.nbd_port, "rg02/b").is_err(), "rg02 exports nothing");
    let message = node.cli_ok(&["group", "delete", "rg02"]);
    assert!(message.contains("deleted"), "{message}");
    let listed = node.cli_ok(&["group", "list"]);
    assert!(listed.contains("rg01") && !listed.contains("rg02"), "{listed}");
}

/// `tandem status | head -1`: the CLI ends on SIGPIPE like any command-line
/// tool when its reader goes away, without a panic message.
#[test]
fn a_reader_that_goes_away_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let node = Node::start("");
    for index in 0..2 {
        let volume = sparse(&node, &format!("v{index}.img"), 1 << 20);
        let _ = node.cli_ok(&[
            "group",
            "create",
            "--name",
            &format!("g{index}"),
            "--log-size",
            "128MiB",
            "--log",
            &node.path(&format!("g{index}.log")).display().to_string(),
            "--volume",
            &volume,
        ]);
    }
    let mut child = Command::new(bin("tandem"))
        .arg("--api")
        .arg(&node.api)
        .args(["status", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tandem");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("wait for tandem");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.status.success() || output.status.signal() == Some(libc::SIGPIPE), "{:?}: {stderr}", output.status);
}

/// SIGHUP reloads the configuration: the log level changes at once, every
/// other changed setting is named as needing a restart, and a broken file
/// changes nothing.
#[test]
fn sighup_changes_the_log_level_and_names_what_needs_a_restart() {
    let node = Node::start("");
    let pid = node.pid().expect("running");
    let original = std::fs::read_to_string(node.config_path()).unwrap();
    let changed = original
        .replace("log_level = \"info\"", "log_level = \"warn\"")
        .replace(&format!(":{}\"", node.nbd_port), &format!(":{}\"", tandem_tests::free_port()));
    assert_ne!(changed, original);
    std::fs::write(node.config_path(), &changed).unwrap();
    // SAFETY: a signal to the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !node.log().contains("node.nbd_listen changed") {
        assert!(std::time::Instant::now() < deadline, "no reload seen:\n{}", node.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let log = node.log();
    assert!(log.contains("restart tandemd to apply it"), "{log}");
    assert!(log.contains("configuration reloaded"), "{log}");
    let mark = node.log().len();
    node.create_group("rg01", "128MiB", &[("data", 8 << 20)]);
    let after = node.log()[mark..].to_owned();
    assert!(!after.contains("group online"), "info lines stop at log_level warn: {after}");
    std::fs::write(node.config_path(), "[node\nbroken").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    while !node.log().contains("configuration not reloaded") {
        assert!(std::time::Instant::now() < deadline, "the broken file was not reported:\n{}", node.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(node.cli(&["status"]).status.success(), "tandemd goes on");
}

/// The management socket checks its caller (SO_PEERCRED): a user without a
/// role is refused, a viewer sees only its group and cannot change it, an
/// operator may manage its group's partnership, only administrators create
/// or delete groups or change delegations; every refusal names what to do.
#[test]
fn delegated_users_operate_or_view_only_their_groups() {
    tandem_tests::require_tool("runuser", "util-linux");
    tandem_tests::require_tool("useradd", "passwd");
    const USER: &str = "tandem-delegate-test";
    let _ = Command::new("useradd").args(["--no-create-home", "--shell", "/usr/sbin/nologin", USER]).output();
    let node = Node::start("");
    std::fs::set_permissions(node.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    node.create_group("rg01", "128MiB", &[("data", 4 << 20)]);
    node.create_group("rg02", "128MiB", &[("data", 4 << 20)]);
    let as_user = |args: &[&str]| {
        let output = Command::new("runuser")
            .args(["-u", USER, "--"])
            .arg(bin("tandem"))
            .arg("--api")
            .arg(&node.api)
            .args(args)
            .output()
            .unwrap();
        (
            output.status.success(),
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
        )
    };
    let (ok, text) = as_user(&["status"]);
    assert!(!ok && text.contains("no role on any group of this node"), "{text}");
    let _ = node.cli_ok(&["delegation", "grant", "--user", USER, "--group", "rg01", "--role", "viewer"]);
    let (ok, text) = as_user(&["group", "list"]);
    assert!(ok && text.contains("rg01") && !text.contains("rg02"), "a viewer sees its group only: {text}");
    let (ok, text) = as_user(&["partnership", "remove", "--group", "rg01"]);
    assert!(!ok && text.contains("a viewer there only reads") && text.contains("--role operator"), "{text}");
    let (ok, text) = as_user(&["group", "delete", "rg01"]);
    assert!(!ok && text.contains("only root and members of group tandem-admin"), "{text}");
    let _ = node.cli_ok(&["delegation", "grant", "--user", USER, "--group", "rg01", "--role", "operator"]);
    let (ok, text) = as_user(&["partnership", "remove", "--group", "rg01"]);
    assert!(!ok && text.contains("group rg01 is not in a partnership"), "an operator gets past the check: {text}");
    let (ok, text) = as_user(&["partnership", "remove", "--group", "rg02"]);
    assert!(!ok && text.contains("no role on rg02"), "{text}");
    let listed = node.cli_ok(&["delegation", "list"]);
    assert!(
        listed.contains(USER) && listed.contains("Operator") && !listed.contains("Viewer"),
        "one role per group: {listed}"
    );
    let _ = node.cli_ok(&["delegation", "revoke", "--user", USER, "--group", "rg01"]);
    let (ok, _) = as_user(&["status"]);
    assert!(!ok, "revoked");
    assert!(node.log().contains("management request refused"), "refusals are logged");
    // A member of group tandem-admin administers the node without a grant.
    const ADMIN: &str = "tandem-admin-test";
    let _ = Command::new("groupadd").args(["--force", "tandem-admin"]).output();
    let _ = Command::new("useradd").args(["--no-create-home", "--shell", "/usr/sbin/nologin", ADMIN]).output();
    let _ = Command::new("usermod").args(["--append", "--groups", "tandem-admin", ADMIN]).output();
    let admin = Command::new("runuser")
        .args(["-u", ADMIN, "--"])
        .arg(bin("tandem"))
        .arg("--api")
        .arg(&node.api)
        .args(["delegation", "list"])
        .output()
        .unwrap();
    assert!(admin.status.success(), "{}", String::from_utf8_lossy(&admin.stderr));
    let no_user =
        node.cli(&["delegation", "grant", "--user", "no-such-user-here", "--group", "rg01", "--role", "viewer"]);
    assert!(String::from_utf8_lossy(&no_user.stderr).contains("there is no user no-such-user-here"), "{no_user:?}");
}
