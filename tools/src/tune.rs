//! `tandem tune`: sweeps the knobs that matter, a short measurement per
//! point, and recommends the best point under an optional p99 ceiling.
//!
//! Two kinds of target:
//! - a group of this node: its group-commit limits (records per log write,
//!   log writes in flight) are changed live through the management API, and
//!   with `--cores` it moves between core threads, while `tandem bench`
//!   drives its NBD export; the original core and limits come back afterwards
//!   unless `--apply` keeps the best;
//! - the transport to a daemon: data channels (parallel connections) and
//!   socket buffer sizes, streamed through the probe.
//!
//! `--apply` writes the recommendation into the daemon's configuration file
//! (comments and the rest of the file kept).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::api::{call, Request, ResponseBody};
use crate::bench::{BenchOptions, BenchResult};
use crate::bench_target::Pattern;
use crate::size::parse_size;

/// Sweep a group's group-commit limits or a transport's channels and socket buffers.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["group", "transport"])))]
pub struct TuneArgs {
    /// A group of this node: sweep its group-commit limits live under a workload on its NBD export.
    #[arg(long)]
    pub group: Option<String>,
    /// With --group: the volume the workload writes [default: the group's first].
    #[arg(long)]
    pub volume: Option<String>,
    /// With --group: confirms that the workload's random writes may overwrite the volume's data.
    #[arg(long)]
    pub destroy_data: bool,
    /// A daemon's replication listener, HOST[:PORT]: sweep data channels and socket buffers of the path.
    #[arg(long)]
    pub transport: Option<String>,
    /// Group sweep: records per log write (engine.max_batch_records).
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    pub batch_records: Vec<usize>,
    /// Group sweep: log writes in flight (engine.max_inflight_appends).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub inflight_appends: Vec<usize>,
    /// Group sweep: the core threads serving the group, as indexes into node.cores (moves it between points).
    #[arg(long, value_delimiter = ',')]
    pub cores: Vec<usize>,
    /// Transport sweep: data channels (replication.channels).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub channels: Vec<u32>,
    /// Transport sweep: socket buffer sizes (replication.socket_buffer_bytes).
    #[arg(long, value_delimiter = ',', default_value = "256KiB,1MiB,4MiB", value_parser = parse_size)]
    pub socket_buffers: Vec<u64>,
    /// Bytes per request [default: 4KiB for a group, 64KiB for a transport].
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Requests in flight (per channel for a transport).
    #[arg(long, default_value_t = 16)]
    pub queue_depth: u16,
    /// Seconds measured per point (after one second of warm-up).
    #[arg(long, default_value_t = 3)]
    pub seconds_per_point: u64,
    /// Only points whose p99 latency is at most this count, e.g. 2ms or 500us.
    #[arg(long, value_parser = parse_latency_us)]
    pub max_p99: Option<u64>,
    /// Keep the best point: live for a group, and written into --config.
    #[arg(long)]
    pub apply: bool,
    /// The configuration file tandemd runs with, for --apply.
    #[arg(long, default_value = "/etc/tandem/tandem.toml")]
    pub config: PathBuf,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `2ms`, `500us` or `1s` as microseconds.
pub fn parse_latency_us(text: &str) -> Result<u64, String> {
    let (number, unit) = crate::size::number_and_unit(text)
        .ok_or_else(|| format!("{text:?} is not a latency; write it like 2ms or 500us"))?;
    let scale = match unit {
        "us" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        other => return Err(format!("unknown latency unit {other:?} in {text:?}; use us, ms or s")),
    };
    Ok(number * scale)
}

/// One measured point.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// The knobs and their values, e.g. [("max_batch_records", 64), ...].
    pub knobs: Vec<(String, u64)>,
    pub iops: f64,
    pub mib_per_s: f64,
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
    /// Under the p99 ceiling (always, without one).
    pub eligible: bool,
}

/// The sweep's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct TuneOutcome {
    pub target: String,
    pub points: Vec<Point>,
    /// Index into `points`.
    pub best: usize,
    pub snippet: String,
    pub applied: Option<String>,
}

impl Point {
    fn from_result(knobs: Vec<(String, u64)>, result: &BenchResult, max_p99_us: Option<u64>) -> Self {
        Self {
            knobs,
            iops: result.iops,
            mib_per_s: result.mib_per_s,
            latency_us_p50: result.latency.p50_us,
            latency_us_p99: result.latency.p99_us,
            eligible: max_p99_us.is_none_or(|max| result.latency.p99_us <= max),
        }
    }
}

/// The highest throughput among the eligible points.
pub fn best_point(points: &[Point], max_p99_us: Option<u64>) -> Result<usize, String> {
    let best = points
        .iter()
        .enumerate()
        .filter(|(_, p)| p.eligible)
        .max_by(|(_, a), (_, b)| a.mib_per_s.total_cmp(&b.mib_per_s))
        .map(|(index, _)| index);
    best.ok_or_else(|| {
        let lowest = points.iter().min_by_key(|p| p.latency_us_p99);
        format!(
            "no point met --max-p99 {} us; the lowest p99 measured was {} us ({}): raise the ceiling or lower --queue-depth",
            max_p99_us.unwrap_or(0),
            lowest.map_or(0, |p| p.latency_us_p99),
            lowest.map_or_else(String::new, |p| knobs_text(&p.knobs))
        )
    })
}

fn knobs_text(knobs: &[(String, u64)]) -> String {
    knobs.iter().map(|(name, value)| format!("{name} {value}")).collect::<Vec<_>>().join(", ")
}

impl TuneArgs {
    /// Runs the sweep, prints the table and the recommendation.
    pub fn run(&self, api: &Path) -> Result<(), String> {
        let outcome = match (&self.group, &self.transport) {
            (Some(group), _) => self.tune_group(api, group)?,
            (_, Some(address)) => self.tune_transport(address)?,
            _ => unreachable!("clap requires --group or --transport"),
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&outcome).expect("the outcome serializes"));
        } else {
            print!("{}", render(&outcome));
        }
        Ok(())
    }

    fn workload(&self, default_block_bytes: u32) -> Result<BenchOptions, String> {
        let block_bytes = match self.block_size {
            None => default_block_bytes,
            Some(bytes) => u32::try_from(bytes)
                .ok()
                .filter(|b| (512..=(16 << 20)).contains(b))
                .ok_or_else(|| "--block-size must be from 512B to 16MiB".to_owned())?,
        };
        Ok(BenchOptions {
            block_bytes,
            queue_depth: usize::from(self.queue_depth.max(1)),
            duration: Duration::from_secs(self.seconds_per_point.max(1)),
            warmup: Duration::from_secs(1),
            ..BenchOptions::new()
        })
    }

    fn tune_group(&self, api: &Path, group: &str) -> Result<TuneOutcome, String> {
        self.check_group_sweep(group)?;
        let (uri, original) = group_target(api, group, self.volume.as_deref())?;
        let options = self.workload(4096)?;
        let mut restore = Restore { api, group, original: Some(original) };
        // Without --cores the group stays where it is and the core is no knob.
        let cores: Vec<Option<usize>> =
            if self.cores.is_empty() { vec![None] } else { self.cores.iter().copied().map(Some).collect() };
        let mut points = Vec::new();
        for &core in &cores {
            if let Some(core) = core {
                move_group(api, group, core)?;
            }
            for &records in &self.batch_records {
                for &appends in &self.inflight_appends {
                    set_batching(api, group, records, appends)?;
                    let result = crate::bench_cli::run_with_progress(&uri, &options, self.json)?;
                    let mut knobs = vec![
                        ("max_batch_records".to_owned(), records as u64),
                        ("max_inflight_appends".to_owned(), appends as u64),
                    ];
                    if let Some(core) = core {
                        knobs.insert(0, ("core".to_owned(), core as u64));
                    }
                    points.push(Point::from_result(knobs, &result, self.max_p99));
                }
            }
        }
        let best = best_point(&points, self.max_p99)?;
        let (records, appends) =
            (knob(&points[best], "max_batch_records"), knob(&points[best], "max_inflight_appends"));
        let best_core = points[best].knobs.iter().any(|(name, _)| name == "core").then(|| knob(&points[best], "core"));
        let mut snippet = format!("[engine]\nmax_batch_records = {records}\nmax_inflight_appends = {appends}\n");
        if let Some(core) = best_core {
            snippet.push_str(&format!("# and: tandem group move {group} --core {core}\n"));
        }
        let applied = if self.apply {
            restore.original = None;
            if let Some(core) = best_core {
                move_group(api, group, core as usize)?;
            }
            set_batching(api, group, records as usize, appends as usize)?;
            write_settings(
                &self.config,
                "engine",
                &[("max_batch_records", records), ("max_inflight_appends", appends)],
            )?;
            Some(format!(
                "applied to {group} now{} and written to {} for the next start",
                best_core.map_or_else(String::new, |core| format!(" (served by core {core})")),
                self.config.display()
            ))
        } else {
            None
        };
        Ok(TuneOutcome { target: uri, points, best, snippet, applied })
    }

    fn check_group_sweep(&self, group: &str) -> Result<(), String> {
        if !self.destroy_data {
            return Err(format!(
                "the sweep writes random data to a volume of {group}; add --destroy-data to confirm (tune a scratch group, not one holding data)"
            ));
        }
        if let Some(bad) = self.batch_records.iter().find(|&&n| !(2..=1024).contains(&n)) {
            return Err(format!("--batch-records {bad}: use 2 to 1024"));
        }
        if let Some(bad) = self.inflight_appends.iter().find(|&&n| n == 0 || n > 64) {
            return Err(format!("--inflight-appends {bad}: use 1 to 64"));
        }
        Ok(())
    }

    fn tune_transport(&self, address: &str) -> Result<TuneOutcome, String> {
        let mut options = self.workload(64 << 10)?;
        options.pattern = Pattern::Stream;
        let target = format!("tandem://{address}");
        let mut points = Vec::new();
        for &channels in &self.channels {
            if !(1..=16).contains(&channels) {
                return Err(format!("--channels {channels}: a partnership has 1 to 16 data channels"));
            }
            for &buffer in &self.socket_buffers {
                options.jobs = channels as usize;
                options.socket_buffer_bytes = u32::try_from(buffer)
                    .ok()
                    .filter(|b| (64 << 10..=256 << 20).contains(b))
                    .ok_or_else(|| format!("--socket-buffers {buffer}: use 64KiB to 256MiB"))?;
                let result = crate::bench_cli::run_with_progress(&target, &options, self.json)?;
                let knobs =
                    vec![("channels".to_owned(), u64::from(channels)), ("socket_buffer_bytes".to_owned(), buffer)];
                points.push(Point::from_result(knobs, &result, self.max_p99));
            }
        }
        let best = best_point(&points, self.max_p99)?;
        let (channels, buffer) = (points[best].knobs[0].1, points[best].knobs[1].1);
        let snippet = format!("[replication]\nchannels = {channels}\nsocket_buffer_bytes = {buffer}\n");
        let applied = if self.apply {
            write_settings(&self.config, "replication", &[("channels", channels), ("socket_buffer_bytes", buffer)])?;
            Some(format!(
                "written to {}: restart tandemd to use the socket buffers; new partnerships get {channels} channel(s)",
                self.config.display()
            ))
        } else {
            None
        };
        Ok(TuneOutcome { target, points, best, snippet, applied })
    }
}

/// The group's NBD export and its current group-commit limits.
fn group_target(api: &Path, group: &str, volume: Option<&str>) -> Result<(String, (usize, usize, usize)), String> {
    let ResponseBody::Node(node) = call(api, &Request::Node).map_err(|e| e.to_string())? else {
        return Err("tandemd answered without its node information".to_owned());
    };
    let ResponseBody::Groups(groups) =
        call(api, &Request::GroupShow { name: group.to_owned() }).map_err(|e| e.to_string())?
    else {
        return Err("tandemd answered without groups".to_owned());
    };
    let status = groups.first().ok_or_else(|| format!("group {group} does not exist"))?;
    let volume = match volume {
        Some(name) => status.volumes.iter().find(|v| v.name == name).ok_or_else(|| {
            format!(
                "group {group} has no volume {name} (it has {})",
                status.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
            )
        })?,
        None => status.volumes.first().ok_or_else(|| format!("group {group} has no volume"))?,
    };
    let listen: std::net::SocketAddr =
        node.nbd_listen.parse().map_err(|e| format!("tandemd's nbd_listen {}: {e}", node.nbd_listen))?;
    let host = if listen.ip().is_unspecified() { "127.0.0.1".to_owned() } else { listen.ip().to_string() };
    let original = (status.core, status.max_batch_records, status.max_inflight_appends);
    Ok((format!("nbd://{host}:{}/{group}/{}", listen.port(), volume.name), original))
}

fn knob(point: &Point, name: &str) -> u64 {
    point.knobs.iter().find(|(knob, _)| knob == name).map(|(_, value)| *value).expect("every point has its knobs")
}

fn move_group(api: &Path, group: &str, core: usize) -> Result<(), String> {
    call(api, &Request::GroupMove { name: group.to_owned(), core }).map(|_| ()).map_err(|e| e.to_string())
}

fn set_batching(api: &Path, group: &str, max_batch_records: usize, max_inflight_appends: usize) -> Result<(), String> {
    call(api, &Request::EngineSet { group: group.to_owned(), max_batch_records, max_inflight_appends })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Puts the group's original limits back when the sweep ends without --apply
/// (also when it fails half-way).
struct Restore<'a> {
    api: &'a Path,
    group: &'a str,
    /// (core, records per log write, log writes in flight) before the sweep.
    original: Option<(usize, usize, usize)>,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let Some((core, records, appends)) = self.original else { return };
        // A move re-opens the group with the configured limits: move first.
        let restored =
            move_group(self.api, self.group, core).and_then(|()| set_batching(self.api, self.group, records, appends));
        if let Err(reason) = restored {
            eprintln!(
                "tandem: could not restore {} to core {core} with its group-commit limits ({reason}); check `tandem group show {}`",
                self.group, self.group
            );
        }
    }
}

/// Sets `keys` in `[section]` of the TOML file at `path`, keeping the rest.
pub fn write_settings(path: &Path, section: &str, keys: &[(&str, u64)]) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {} for --apply: {e} (pass --config FILE)", path.display()))?;
    let mut document: toml_edit::DocumentMut =
        text.parse().map_err(|e| format!("{} is not valid TOML: {e}", path.display()))?;
    let table = document
        .entry(section)
        .or_insert_with(toml_edit::table)
        .as_table_mut()
        .ok_or_else(|| format!("{} has `{section}` but not as a [{section}] table", path.display()))?;
    for (key, value) in keys {
        table[*key] = toml_edit::value(i64::try_from(*value).unwrap_or(i64::MAX));
    }
    let updated = document.to_string();
    crate::config::Config::parse_text(&updated)
        .map_err(|e| format!("the tuned settings would make {} invalid: {e}", path.display()))?;
    let temporary = path.with_extension("toml.tune");
    std::fs::write(&temporary, updated).map_err(|e| format!("cannot write {}: {e}", temporary.display()))?;
    std::fs::rename(&temporary, path).map_err(|e| format!("cannot replace {}: {e}", path.display()))
}

/// The table, the best point and the snippet.
#[must_use]
pub fn render(outcome: &TuneOutcome) -> String {
    let mut text = format!("{}\n", outcome.target);
    for (index, point) in outcome.points.iter().enumerate() {
        let mark = if index == outcome.best {
            "*"
        } else if point.eligible {
            " "
        } else {
            "x"
        };
        text.push_str(&format!(
            "{mark} {:<48} {:>9.0} IOPS {:>9.1} MiB/s  p50 {:>6} us  p99 {:>6} us\n",
            knobs_text(&point.knobs),
            point.iops,
            point.mib_per_s,
            point.latency_us_p50,
            point.latency_us_p99
        ));
    }
    let best = &outcome.points[outcome.best];
    text.push_str(&format!(
        "best (*): {}: {:.0} IOPS, {:.1} MiB/s, p99 {} us (x: above the p99 ceiling)\nrecommended configuration:\n{}",
        knobs_text(&best.knobs),
        best.iops,
        best.mib_per_s,
        best.latency_us_p99,
        outcome.snippet
    ));
    if let Some(applied) = &outcome.applied {
        text.push_str(&format!("{applied}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(mib_per_s: f64, p99: u64, max: Option<u64>) -> Point {
        Point {
            knobs: vec![("channels".into(), p99)],
            iops: 0.0,
            mib_per_s,
            latency_us_p50: 0,
            latency_us_p99: p99,
            eligible: max.is_none_or(|m| p99 <= m),
        }
    }

    #[test]
    fn the_best_point_is_the_fastest_under_the_ceiling() {
        let unbounded = [point(100.0, 900, None), point(300.0, 5000, None), point(200.0, 1500, None)];
        assert_eq!(best_point(&unbounded, None).unwrap(), 1);
        let ceiling = Some(2000);
        let bounded = [point(100.0, 900, ceiling), point(300.0, 5000, ceiling), point(200.0, 1500, ceiling)];
        assert_eq!(best_point(&bounded, ceiling).unwrap(), 2);
        let none = [point(100.0, 9000, Some(10)), point(50.0, 8000, Some(10))];
        let error = best_point(&none, Some(10)).unwrap_err();
        assert!(error.contains("lowest p99 measured was 8000 us"), "{error}");
    }

    #[test]
    fn latencies_parse_with_units() {
        assert_eq!(parse_latency_us("2ms").unwrap(), 2000);
        assert_eq!(parse_latency_us("500us").unwrap(), 500);
        assert!(parse_latency_us("2").unwrap_err().contains("use us, ms or s"));
    }

    #[test]
    fn settings_are_written_into_their_section_keeping_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tandem.toml");
        std::fs::write(&path, "# my node\n[node]\nname = \"a\" # keep me\n").unwrap();
        write_settings(&path, "engine", &[("max_batch_records", 64), ("max_inflight_appends", 2)]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("# keep me") && text.contains("max_batch_records = 64"), "{text}");
        let error = write_settings(&path, "engine", &[("max_batch_records", 1)]).unwrap_err();
        assert!(error.contains("would make") && error.contains("max_batch_records"), "{error}");
        assert!(
            std::fs::read_to_string(&path).unwrap().contains("max_batch_records = 64"),
            "a refused change leaves the file"
        );
    }
}
