//! Network constraints (like Set-SRNetworkConstraint): a partnership's
//! replication traffic uses only a named interface or local address on each
//! side. The source binds its connections to it (SO_BINDTODEVICE for an
//! interface, bind for an address); the destination accepts the partnership's
//! connections only when they arrive on it.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// Interfaces and their addresses on this node (getifaddrs).
fn interfaces() -> Vec<(String, Option<IpAddr>)> {
    let mut found = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates the list, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return found;
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: entry points into the list getifaddrs returned.
        let item = unsafe { &*entry };
        // SAFETY: ifa_name is a NUL-terminated string of the list.
        let name = unsafe { std::ffi::CStr::from_ptr(item.ifa_name) }.to_string_lossy().into_owned();
        let address = if item.ifa_addr.is_null() {
            None
        } else {
            // SAFETY: ifa_addr points to a sockaddr of the family it names.
            unsafe {
                match i32::from((*item.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*item.ifa_addr.cast::<libc::sockaddr_in>();
                        Some(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()))
                    }
                    libc::AF_INET6 => {
                        let v6 = &*item.ifa_addr.cast::<libc::sockaddr_in6>();
                        Some(IpAddr::from(v6.sin6_addr.s6_addr))
                    }
                    _ => None,
                }
            }
        };
        found.push((name, address));
        entry = item.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// The local addresses `constraint` (an interface name or an address) stands
/// for, or why it names nothing on this node.
pub fn local_addresses(constraint: &str) -> Result<Vec<IpAddr>, String> {
    let all = interfaces();
    if let Ok(address) = constraint.parse::<IpAddr>() {
        if all.iter().any(|(_, a)| *a == Some(address)) {
            return Ok(vec![address]);
        }
        let mut known: Vec<String> = all.iter().filter_map(|(_, a)| a.map(|a| a.to_string())).collect();
        known.dedup();
        return Err(format!("{constraint} is not an address of this node (it has {})", known.join(", ")));
    }
    if all.iter().any(|(name, _)| name == constraint) {
        return Ok(all.iter().filter(|(name, _)| name == constraint).filter_map(|(_, a)| *a).collect());
    }
    let mut names: Vec<String> = all.into_iter().map(|(name, _)| name).collect();
    names.sort();
    names.dedup();
    Err(format!("there is no interface or address {constraint} on this node (interfaces: {})", names.join(", ")))
}

/// Connects to `address`, through `constraint` when there is one.
pub fn connect(address: SocketAddr, constraint: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    if constraint.is_empty() {
        return TcpStream::connect_timeout(&address, timeout);
    }
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    match constraint.parse::<IpAddr>() {
        Ok(local) => socket.bind(&SocketAddr::new(local, 0).into())?,
        Err(_) => socket.bind_device(Some(constraint.as_bytes()))?,
    }
    socket.connect_timeout(&address.into(), timeout)?;
    Ok(socket.into())
}

/// Whether a connection that arrived on `local` respects `constraint`.
pub fn arrived_within(constraint: &str, local: Option<IpAddr>) -> Result<(), String> {
    if constraint.is_empty() {
        return Ok(());
    }
    let allowed = local_addresses(constraint)?;
    match local {
        Some(local) if allowed.contains(&local) => Ok(()),
        other => Err(format!(
            "replication for this partnership is constrained to {constraint} ({}) here, but the connection arrived on {}",
            allowed.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            other.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string())
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_and_strangers_are_named() {
        assert_eq!(local_addresses("127.0.0.1").unwrap(), vec![IpAddr::from([127, 0, 0, 1])]);
        assert!(local_addresses("lo").unwrap().contains(&IpAddr::from([127, 0, 0, 1])));
        assert!(local_addresses("203.0.113.77").unwrap_err().contains("is not an address of this node"));
        assert!(local_addresses("nosuchif0").unwrap_err().contains("interfaces: "));
        assert!(arrived_within("", None).is_ok());
        assert!(arrived_within("lo", Some(IpAddr::from([127, 0, 0, 1]))).is_ok());
        let refused = arrived_within("127.0.0.1", Some(IpAddr::from([127, 0, 0, 2]))).unwrap_err();
        assert!(refused.contains("constrained to 127.0.0.1") && refused.contains("arrived on 127.0.0.2"), "{refused}");
    }
}
