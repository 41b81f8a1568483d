//! Harness for process-level tests: real `tandemd` processes in temporary
//! directories, driven through the real `tandem` CLI and real NBD clients.

pub mod nbd_client;
pub mod netns;
pub mod pattern;
pub mod proxy;
pub mod repl_sim;
pub mod sim;
pub mod sim_node;
pub mod writer;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory of the built binaries: the test executable lives in
/// `target/<profile>/deps`, the binaries in `target/<profile>`.
#[must_use]
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TANDEM_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>").to_owned()
}

/// Path of a built binary; fails with the command that builds it.
#[must_use]
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}

/// Fails with the package to install when a client tool is missing.
pub fn require_tool(tool: &str, package: &str) {
    let found =
        Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
    assert!(found, "{tool} is not installed: `apt-get install {package}` (scripts/test installs it)");
}

/// Writes a configuration for a daemon started by hand (not through `Node`):
/// node `name` on one core, state and sockets under `dir`, free loopback
/// ports, and `node_toml` added to `[node]`; returns its path.
#[must_use]
pub fn minimal_config(dir: &Path, name: &str, node_toml: &str) -> PathBuf {
    let config = dir.join("tandem.toml");
    let text = format!(
        "[node]\nname = \"{name}\"\ncores = [0]\nstate_dir = \"{0}/state\"\napi_socket = \"{0}/api.sock\"\nnbd_listen = \"127.0.0.1:{1}\"\nreplication_listen = \"127.0.0.1:{2}\"\n{node_toml}\n",
        dir.display(),
        free_port(),
        free_port()
    );
    std::fs::write(&config, text).expect("write config");
    config
}

/// A free TCP port on loopback (bound and released; the daemon binds it
/// next). A port is handed out once per test process: the kernel may offer a
/// just-released port again, and a node's two listeners must differ.
#[must_use]
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port =
            TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().expect("address").port();
        let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// One `tandemd` in its own directory.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub api: PathBuf,
    pub nbd_port: u16,
    /// Port of the replication listener.
    pub replication_port: u16,
    /// The address its listeners bind (127.0.0.1, or its namespace's address).
    pub host: String,
    /// The network namespace it runs in, if any.
    pub netns: Option<String>,
    config: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// Starts a daemon whose config has `[engine]` lines `engine_toml` added.
    #[must_use]
    pub fn start(engine_toml: &str) -> Self {
        Self::start_named("test", engine_toml, "")
    }

    /// Starts a daemon named `name` with extra `[engine]` lines and a
    /// `[replication]` section.
    #[must_use]
    pub fn start_named(name: &str, engine_toml: &str, replication_toml: &str) -> Self {
        Self::start_in(name, engine_toml, replication_toml, None)
    }

    /// Like `start_named`, inside network namespace `netns = (namespace, address)`.
    #[must_use]
    pub fn start_in(name: &str, engine_toml: &str, replication_toml: &str, netns: Option<(&str, &str)>) -> Self {
        Self::start_with(name, "", engine_toml, replication_toml, netns)
    }

    /// A daemon whose listeners bind `address` of this host (the RDMA lab
    /// guest's 10.77.0.1, where both nodes run side by side).
    #[must_use]
    pub fn start_on(name: &str, address: &str, replication_toml: &str) -> Self {
        Self::start_with_host(name, ("", ""), replication_toml, address, None)
    }

    /// Like `start_in`, with extra `[node]` lines `node_toml`.
    #[must_use]
    pub fn start_with(
        name: &str,
        node_toml: &str,
        engine_toml: &str,
        replication_toml: &str,
        netns: Option<(&str, &str)>,
    ) -> Self {
        let host = netns.map_or("127.0.0.1", |(_, address)| address);
        Self::start_with_host(name, (node_toml, engine_toml), replication_toml, host, netns.map(|(ns, _)| ns))
    }

    fn start_with_host(
        name: &str,
        (node_toml, engine_toml): (&str, &str),
        replication_toml: &str,
        host: &str,
        netns: Option<&str>,
    ) -> Self {
        let host = host.to_owned();
        let dir = tempfile::Builder::new().prefix("tandem-test-").tempdir().expect("temporary directory");
        let api = dir.path().join("api.sock");
        let nbd_port = free_port();
        let replication_port = free_port();
        let config = dir.path().join("tandem.toml");
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let cores: Vec<String> = (0..cpus.min(2)).map(|c| c.to_string()).collect();
        // Nodes of tests that do not set up TLS replicate in clear.
        let replication_toml = if replication_toml.contains("encryption") {
            replication_toml.to_owned()
        } else {
            format!("encryption = \"none\"\n{replication_toml}")
        };
        let text = format!(
            "[node]\nname = \"{name}\"\ncores = [{}]\nstate_dir = \"{}\"\napi_socket = \"{}\"\nnbd_listen = \"{host}:{nbd_port}\"\nreplication_listen = \"{host}:{replication_port}\"\nlog_level = \"info\"\n{node_toml}\n\n[engine]\n{engine_toml}\n\n[replication]\n{replication_toml}\n",
            cores.join(", "),
            dir.path().join("state").display(),
            api.display(),
        );
        std::fs::write(&config, text).expect("write config");
        let netns = netns.map(str::to_owned);
        let mut node = Self { dir, api, nbd_port, replication_port, host, netns, config, child: None };
        node.spawn();
        node
    }

    #[must_use]
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the daemon process and waits until its API answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.path("tandemd.log")).expect("log file");
        let mut command = match &self.netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns]).arg(bin("tandemd"));
                command
            }
            None => Command::new(bin("tandemd")),
        };
        let child = command
            .arg("--config")
            .arg(&self.config)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tandemd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.cli(&["status", "--json"]).status.success() {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("tandemd exited with {status} during start-up:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tandemd did not answer within 30 s:\n{}", self.log());
    }

    /// The daemon's configuration file.
    #[must_use]
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The daemon's process id while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// kill -9: no checkpoint, no clean close.
    pub fn kill9(&mut self) {
        // `ip netns exec` execs tandemd, so the child is the daemon itself.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the clean shutdown.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let status = child.wait().expect("wait for tandemd");
            assert!(status.success(), "tandemd exited with {status}:\n{}", self.log());
        }
    }

    /// The daemon's log so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("tandemd.log")).unwrap_or_default()
    }

    /// Runs `tandem --api SOCKET ARGS...`.
    #[must_use]
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("tandem")).arg("--api").arg(&self.api).args(args).output().expect("run tandem")
    }

    /// Runs the CLI and returns stdout; panics with stderr on failure.
    #[must_use]
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(output.status.success(), "tandem {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// Creates sparse volume files and a group over them.
    pub fn create_group(&self, name: &str, log_size: &str, volumes: &[(&str, u64)]) {
        self.create_group_with_log(name, &self.path(&format!("{name}.log")), log_size, volumes);
    }

    /// Creates a group over volume files that already exist (their data is kept).
    pub fn create_group_on(&self, name: &str, log_size: &str, volumes: &[(&str, &Path)]) {
        let log = self.path(&format!("{name}.log")).display().to_string();
        let mut args = vec!["group".to_owned(), "create".into(), "--name".into(), name.into(), "--log".into(), log];
        args.extend(["--log-size".to_owned(), log_size.to_owned()]);
        for (volume, path) in volumes {
            args.extend(["--volume".to_owned(), format!("{volume}={}", path.display())]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = self.cli_ok(&args);
    }

    /// Like `create_group`, with the log at `log` (e.g. on another device).
    pub fn create_group_with_log(&self, name: &str, log: &Path, log_size: &str, volumes: &[(&str, u64)]) {
        let mut args: Vec<String> = vec![
            "group".into(),
            "create".into(),
            "--name".into(),
            name.into(),
            "--log".into(),
            log.display().to_string(),
            "--log-size".into(),
            log_size.into(),
        ];
        for (volume, size) in volumes {
            let path = self.path(&format!("{name}-{volume}.img"));
            std::fs::File::create(&path).expect("create volume").set_len(*size).expect("size volume");
            args.push("--volume".into());
            args.push(format!("{volume}={}", path.display()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = self.cli_ok(&args);
    }

    /// `tandem status --json` of one group.
    #[must_use]
    pub fn group_status(&self, name: &str) -> serde_json::Value {
        let text = self.cli_ok(&["group", "show", name, "--json"]);
        let mut groups: serde_json::Value = serde_json::from_str(&text).expect("status JSON");
        groups[0].take()
    }

    /// NBD URI of `group/volume` for qemu and fio.
    #[must_use]
    pub fn nbd_uri(&self, group: &str, volume: &str) -> String {
        format!("nbd://{}:{}/{group}/{volume}", self.host, self.nbd_port)
    }

    /// `HOST:PORT` of the replication listener.
    #[must_use]
    pub fn replication_address(&self) -> String {
        format!("{}:{}", self.host, self.replication_port)
    }

    /// A client command run where this node's listeners are reachable.
    #[must_use]
    pub fn client_command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns, program]);
                command
            }
            None => Command::new(program),
        }
    }

    /// Runs `tandem partnership create` on this (source) node towards
    /// `destination_group` of `destination`, without `--mode` when `mode` is `None`.
    #[must_use]
    pub fn partner(&self, group: &str, destination: &Node, destination_group: &str, mode: Option<&str>) -> Output {
        let options = mode.map_or_else(Vec::new, |mode| vec!["--mode", mode]);
        self.partner_with(group, destination, destination_group, &options)
    }

    /// `tandem partnership create` with further `options` (`--mode`, `--channels`).
    pub fn partner_with(&self, group: &str, destination: &Node, destination_group: &str, options: &[&str]) -> Output {
        let address = destination.replication_address();
        let mut args = vec![
            "partnership",
            "create",
            "--source-group",
            group,
            "--destination",
            &address,
            "--destination-group",
            destination_group,
        ];
        args.extend(options);
        self.cli(&args)
    }

    /// `tandem partnership create` of `group` into `destination_group` at
    /// replication `address` (a proxy, say) with further `options`; panics
    /// with the CLI's message when it is refused.
    pub fn partner_at(&self, group: &str, address: &str, destination_group: &str, options: &[&str]) -> String {
        let mut args = vec!["partnership", "create", "--source-group", group, "--destination", address];
        args.extend(["--destination-group", destination_group]);
        args.extend(options);
        let created = self.cli_ok(&args);
        assert!(created.contains("created"), "{created}");
        created
    }

    /// Like `partner`, and panics with the CLI's message when it is refused.
    pub fn partner_ok(&self, group: &str, destination: &Node, destination_group: &str, mode: Option<&str>) -> String {
        let output = self.partner(group, destination, destination_group, mode);
        assert!(output.status.success(), "partnership create failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// Creates `rg01` here and `rg02` on `destination` over sparse volumes,
    /// partners them in `mode` and waits until the destination is in sync.
    pub fn replicate_to(&self, destination: &Node, log_size: &str, volumes: &[(&str, u64)], mode: &str) {
        self.create_group("rg01", log_size, volumes);
        destination.create_group("rg02", log_size, volumes);
        let out = self.partner_ok("rg01", destination, "rg02", Some(mode));
        assert!(out.contains("partnership") && out.contains("created"), "{out}");
        self.wait_in_sync("rg01", Duration::from_secs(60));
    }

    /// The partnership of `group` as `tandem partnership show --json` reports it.
    #[must_use]
    pub fn partnership(&self, group: &str) -> serde_json::Value {
        let text = self.cli_ok(&["partnership", "show", "--group", group, "--json"]);
        let mut all: serde_json::Value = serde_json::from_str(&text).expect("partnership JSON");
        all[0].take()
    }

    /// Waits until every event id of `ids` was reported; panics with the
    /// events after `timeout`.
    pub fn wait_for_events(&self, ids: &[u32], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.cli_ok(&["events", "--json"]);
            let missing: Vec<u32> =
                ids.iter().copied().filter(|id| !events.contains(&format!("\"id\":{id},"))).collect();
            if missing.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "events {missing:?} missing after {timeout:?}:\n{events}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the source group's destination holds every record and the
    /// initial copy is complete; panics with the status after `timeout`.
    pub fn wait_in_sync(&self, group: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let p = self.partnership(group);
            let caught_up = p["state"] == "ContinuouslyReplicating"
                && p["destination_durable_lsn"] == p["current_lsn"]
                && p["destination_applied_lsn"] == p["current_lsn"]
                && p["copy_remaining_bytes"] == 0;
            if caught_up {
                return;
            }
            assert!(Instant::now() < deadline, "{group} not in sync after {timeout:?}: {p:#}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Two daemons, node-a and node-b, with `[replication]` lines
/// `replication_toml`, each in its own network namespace joined by a veth
/// pair (loopback where this machine allows no namespaces: `None`).
#[must_use]
pub fn two_nodes(replication_toml: &str) -> (Option<std::sync::Arc<netns::NetPair>>, Node, Node) {
    match netns::NetPair::create() {
        Ok(net) => {
            let a = Node::start_in("node-a", "", replication_toml, Some((&net.ns[0], &net.addr[0])));
            let b = Node::start_in("node-b", "", replication_toml, Some((&net.ns[1], &net.addr[1])));
            (Some(std::sync::Arc::new(net)), a, b)
        }
        Err(reason) => {
            eprintln!("network namespaces unavailable ({reason}); both nodes use loopback");
            (None, Node::start_named("node-a", "", replication_toml), Node::start_named("node-b", "", replication_toml))
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Adds to a `fio` command the job of a pipelining client: random writes of
/// 512 B to 1 MiB at queue depth 32, each verified (crc32c) by reads on the
/// same connection while writing goes on, against the NBD export `uri`.
/// fio's verify state is not saved (it would land in the working directory).
pub fn fio_pipelined_verify_job<'a>(fio: &'a mut Command, uri: &str) -> &'a mut Command {
    fio.args(["--name=pipelined", "--ioengine=nbd", "--rw=randwrite", "--size=48m", "--iodepth=32"])
        .args(["--bssplit=512/10:4k/20:16k/10:64k/30:1m/30", "--verify=crc32c", "--do_verify=1"])
        .args(["--verify_backlog=16", "--verify_fatal=1", "--verify_state_save=0"])
        .arg(format!("--uri={uri}"))
}

/// Runs a command and returns its output; panics with everything it printed
/// when it fails.
pub fn run_ok(command: &mut Command) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?} failed with {}:\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
