//! Per-client connection limits: the key a client counts under (an IPv6 client by its
//! prefix) and the slot it holds while connected.

use super::Shared;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Holds one per-IP slot until the connection ends.
pub(super) struct IpGuard {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Shared {
    /// Claims one of `max` connection slots for the client `ip` (an IPv6 client counts
    /// by its `ipv6_prefix`); `None` when all are taken.
    pub(super) fn claim_ip(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpGuard> {
        let ip = client_key(ip, self.ipv6_prefix);
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpGuard {
            shared: Arc::clone(self),
            ip,
        })
    }
}

/// The key a client is counted under: an IPv4-mapped IPv6 address is the IPv4 client
/// it stands for; any other IPv6 address counts by its first `ipv6_prefix` bits, since
/// one host or site is usually given a whole /64 and can pick any address in it.
pub(crate) fn client_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u32::from(ipv6_prefix.clamp(1, 128));
                let mask = u128::MAX << (128 - bits);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

/// The client address as one key: an IPv4-mapped IPv6 address (a proxy listening on
/// `::`) is the IPv4 client it stands for.
pub(super) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        let mut m = self.shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_counted_by_ipv4_address_or_ipv6_prefix() {
        let key = |ip: &str, prefix| client_key(ip.parse().unwrap(), prefix).to_string();
        assert_eq!(key("192.0.2.1", 64), "192.0.2.1");
        assert_eq!(key("::ffff:192.0.2.1", 64), "192.0.2.1");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 64), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 48), "2001:db8:1::");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 128), "2001:db8:1:2:3:4:5:6");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 1), "::");
    }
}
