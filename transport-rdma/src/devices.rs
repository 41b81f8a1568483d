//! The RDMA devices of this node, their ports and GIDs, and whether a local
//! IP address can carry RDMA (an active port with a RoCE v2 GID for it):
//! what `--transport rdma` checks and status shows.

use std::net::{IpAddr, Ipv6Addr};

use sideway::ibverbs::address::GidType;
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::PortState;

/// One GID of a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidInfo {
    pub port: u8,
    pub index: u32,
    pub address: Ipv6Addr,
    /// IB, RoCEv1 or RoCEv2.
    pub kind: &'static str,
    pub netdev: String,
}

/// One device with its ports' states and its GIDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfoSummary {
    pub name: String,
    /// (port number, active).
    pub ports: Vec<(u8, bool)>,
    pub gids: Vec<GidInfo>,
}

/// Where RDMA to or from `ip` goes: device, port, GID index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaPath {
    pub device: String,
    pub port: u8,
    pub gid_index: u32,
    pub gid: Ipv6Addr,
}

/// Every RDMA device of this node (an error when the verbs library or the
/// devices are missing, saying so).
pub fn list() -> Result<Vec<DeviceInfoSummary>, String> {
    let devices = DeviceList::new().map_err(|e| {
        format!("no RDMA devices on this node ({e}): install rdma-core and load the driver (e.g. `rdma link add rxe0 type rxe netdev eth0` for soft-RoCE), or use --transport tcp")
    })?;
    let mut out = Vec::new();
    for device in &devices {
        let name = device.name();
        let context = device.open().map_err(|e| format!("cannot open RDMA device {name}: {e}"))?;
        let attr = context.query_device().map_err(|e| format!("cannot query RDMA device {name}: {e}"))?;
        let ports = (1..=attr.phys_port_cnt())
            .map(|port| {
                let active = context.query_port(port).is_ok_and(|p| p.port_state() == PortState::Active);
                (port, active)
            })
            .collect();
        let gids = context
            .query_gid_table()
            .map_err(|e| format!("cannot read the GID table of {name}: {e}"))?
            .into_iter()
            .map(|g| GidInfo {
                port: g.port_num() as u8,
                index: g.gid_index(),
                address: Ipv6Addr::from(g.gid()),
                kind: match g.gid_type() {
                    GidType::InfiniBand => "IB",
                    GidType::RoceV1 => "RoCEv1",
                    GidType::RoceV2 => "RoCEv2",
                },
                netdev: g.netdev_name().unwrap_or_default(),
            })
            .collect();
        out.push(DeviceInfoSummary { name, ports, gids });
    }
    if out.is_empty() {
        return Err("no RDMA devices on this node: load the driver (or create a soft-RoCE device with `rdma link add`), or use --transport tcp".to_owned());
    }
    Ok(out)
}

/// The device, port and GID that carry RDMA for local address `ip`, or why
/// there is none (no device, port down, GID missing) and what to do.
pub fn path_for(ip: IpAddr) -> Result<RdmaPath, String> {
    let mapped = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let devices = list()?;
    let mut down = Vec::new();
    for device in &devices {
        for gid in device.gids.iter().filter(|g| g.address == mapped && g.kind == "RoCEv2") {
            if device.ports.contains(&(gid.port, true)) {
                return Ok(RdmaPath { device: device.name.clone(), port: gid.port, gid_index: gid.index, gid: mapped });
            }
            down.push(format!("{} port {}", device.name, gid.port));
        }
    }
    if !down.is_empty() {
        return Err(format!(
            "{ip} belongs to {}, whose port is down: bring the link up, or use --transport tcp",
            down.join(", ")
        ));
    }
    let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
    Err(format!(
        "no RDMA device has a RoCE v2 GID for {ip} (devices: {}): give that interface's address to the RDMA device (its GID table follows the netdev's addresses), or use --transport tcp",
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    /// On a host without RDMA (this project's build machines), the answer
    /// says so and names the way out; in the lab this has a device.
    #[test]
    fn a_host_without_rdma_gets_the_reason_and_the_fix() {
        match super::list() {
            Err(reason) => {
                assert!(reason.contains("no RDMA devices") && reason.contains("--transport tcp"), "{reason}")
            }
            Ok(devices) => assert!(!devices.is_empty()),
        }
        if super::list().is_err() {
            let refused = super::path_for("127.0.0.1".parse().unwrap()).unwrap_err();
            assert!(refused.contains("--transport tcp"), "{refused}");
        }
    }
}
