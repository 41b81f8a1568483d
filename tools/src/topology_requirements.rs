//! The topology test's requirements: each verdict carries the measured value,
//! the limit and the fix, so one failure never hides behind another.

use serde::Serialize;

use crate::device_facts::GroupDevices;
use crate::probe::GroupFacts;
use crate::size::format_size;
use crate::topology_source::SourceSide;

/// One requirement's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Requirement {
    pub name: String,
    pub passed: bool,
    pub measured: String,
    pub limit: String,
    /// What to do when it failed.
    pub fix: String,
}

pub(crate) fn requirement(name: &str, passed: bool, measured: String, limit: &str, fix: String) -> Requirement {
    Requirement {
        name: name.to_owned(),
        passed,
        measured,
        limit: limit.to_owned(),
        fix: if passed { String::new() } else { fix },
    }
}

/// `PASS name: measured (limit)` or `FAIL name: measured (limit); fix`.
#[must_use]
pub fn render_requirement(r: &Requirement) -> String {
    if r.passed {
        format!("PASS {}: {} (requirement: {})", r.name, r.measured, r.limit)
    } else {
        format!("FAIL {}: {} (requirement: {}); {}", r.name, r.measured, r.limit, r.fix)
    }
}

pub(crate) fn volume_size_requirement(source: &SourceSide, destination: &GroupFacts) -> Requirement {
    let sizes = &source.volume_sizes_bytes;
    let show = |sizes: &[u64]| sizes.iter().map(|s| format!("{s} bytes")).collect::<Vec<_>>().join(", ");
    let passed = *sizes == destination.volume_sizes_bytes;
    requirement(
        "volume sizes equal",
        passed,
        format!(
            "source {}: {}; destination {}: {}",
            source.name,
            show(sizes),
            destination.name,
            show(&destination.volume_sizes_bytes)
        ),
        "the same number of volumes, each of the same size",
        "resize or recreate the destination's volumes to the source's sizes (truncate -s SIZE FILE, or lvresize)"
            .to_owned(),
    )
}

pub(crate) fn sector_requirement(source: &SourceSide, destination: &GroupFacts) -> Requirement {
    requirement(
        "log sector sizes equal",
        source.log_sector_bytes == destination.log_sector_bytes,
        format!("source log {} bytes, destination log {} bytes", source.log_sector_bytes, destination.log_sector_bytes),
        "equal sector sizes",
        "put both logs on storage with the same sector size".to_owned(),
    )
}

pub(crate) fn separate_log_requirement(side: &str, devices: &GroupDevices) -> Requirement {
    let shared = devices.log_shares_with();
    let measured = if shared.is_empty() {
        format!(
            "log on {}, volumes on {}",
            devices.log.device,
            devices.volumes.iter().map(|v| v.device.as_str()).collect::<Vec<_>>().join(", ")
        )
    } else {
        let (index, disks) = &shared[0];
        format!(
            "the log {} and volume {index} ({}) are both on {disks}",
            devices.log.path, devices.volumes[*index].path
        )
    };
    requirement(
        &format!("{side} log on its own device"),
        shared.is_empty(),
        measured,
        "the log shares no disk with the volumes",
        format!(
            "move the {side} log to another (faster) device: delete the group and create it with --log on that device"
        ),
    )
}

pub(crate) fn faster_log_requirement(side: &str, devices: &GroupDevices) -> Requirement {
    let name = format!("{side} log faster than data");
    let limit = "the log's average latency below every volume's";
    let Some(log_us) = devices.log.latency_us_avg else {
        return requirement(
            &name,
            false,
            format!("log {}", devices.log.latency_method),
            limit,
            "check that the log's directory is writable".to_owned(),
        );
    };
    if let Some((index, disks)) = devices.log_shares_with().first() {
        return requirement(
            &name,
            false,
            format!("the log and volume {index} share {disks}: every log write competes with the volume's writes"),
            limit,
            format!("put the {side} log on its own device, faster than its volumes (NVMe or SSD)"),
        );
    }
    let slowest_allowed = devices.volumes.iter().filter_map(|v| v.latency_us_avg).fold(f64::INFINITY, f64::min);
    let passed = log_us < slowest_allowed;
    let volumes = devices
        .volumes
        .iter()
        .map(|v| v.latency_us_avg.map_or_else(|| v.latency_method.clone(), |us| format!("{us:.0} us")))
        .collect::<Vec<_>>()
        .join(", ");
    requirement(
        &name,
        passed,
        format!("log {log_us:.0} us, volumes {volumes} ({})", devices.log.latency_method),
        limit,
        format!("put the {side} log on faster storage than its volumes (NVMe or SSD for the log)"),
    )
}

pub(crate) fn bandwidth_requirement(rate: &Result<f64, String>, write_bytes_per_s: f64, when: &str) -> Requirement {
    let limit = "above the source's peak write rate";
    match rate {
        Ok(bytes_per_s) => requirement(
            "bandwidth",
            *bytes_per_s > write_bytes_per_s,
            format!(
                "{}/s to the destination; the source wrote {}/s {when}",
                format_size(*bytes_per_s as u64),
                format_size(write_bytes_per_s as u64)
            ),
            limit,
            "use a faster link, more links (--channels), or async mode with a log sized for the backlog".to_owned(),
        ),
        Err(reason) => {
            requirement("bandwidth", false, reason.clone(), limit, "check the path to the destination".to_owned())
        }
    }
}
