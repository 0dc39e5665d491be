//! Source addresses: one local address has about 28k ephemeral ports toward
//! one gateway port, so a million connections need dozens of addresses.
//! On loopback every 127.0.0.N works without configuration; elsewhere the
//! operator lists the machine's addresses with `--source-addrs`.

use std::net::{IpAddr, Ipv4Addr};

/// Ephemeral ports usable per source address (Linux default range
/// 32768-60999), minus a margin for the rest of the system.
pub const PORTS_PER_ADDRESS: u64 = 28_000;

/// Loopback addresses used at least.
pub const MIN_LOOPBACK_ADDRESSES: u64 = 8;

/// The local addresses connections are spread over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceAddrs {
    addrs: Vec<IpAddr>,
}

impl SourceAddrs {
    /// Parses `a,b,c` where each item is an address or an IPv4 range
    /// `first-last` (e.g. `127.0.0.1-127.0.0.40`).
    pub fn parse(text: &str) -> Result<SourceAddrs, String> {
        let mut addrs = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Some((first, last)) = item.split_once('-') {
                let first: Ipv4Addr = first.parse().map_err(|e| format!("{first}: {e}"))?;
                let last: Ipv4Addr = last.parse().map_err(|e| format!("{last}: {e}"))?;
                let (first, last) = (u32::from(first), u32::from(last));
                if last < first || last - first > 1 << 20 {
                    return Err(format!("bad address range {item}"));
                }
                addrs.extend((first..=last).map(|a| IpAddr::V4(Ipv4Addr::from(a))));
            } else {
                addrs.push(item.parse().map_err(|e| format!("{item}: {e}"))?);
            }
        }
        if addrs.is_empty() {
            return Err("no source addresses".into());
        }
        Ok(SourceAddrs { addrs })
    }

    /// Enough loopback addresses (127.0.0.1, 127.0.0.2, ...) for
    /// `connections`, and never fewer than [`MIN_LOOPBACK_ADDRESSES`] (they
    /// cost nothing on loopback, and a second run right after a first
    /// finds the first's TIME_WAIT ports spread thin), for tests against a
    /// gateway on 127.0.0.0/8.
    pub fn loopback_for(connections: u64) -> SourceAddrs {
        let needed = connections
            .div_ceil(PORTS_PER_ADDRESS)
            .clamp(MIN_LOOPBACK_ADDRESSES, 250_000) as u32;
        let first = u32::from(Ipv4Addr::new(127, 0, 0, 1));
        SourceAddrs {
            addrs: (first..first + needed)
                .map(|a| IpAddr::V4(Ipv4Addr::from(a)))
                .collect(),
        }
    }

    /// The address of connection `index`: round robin, so every address
    /// carries the same share and neighbours differ.
    pub fn for_connection(&self, index: u64) -> IpAddr {
        self.addrs[(index % self.addrs.len() as u64) as usize]
    }

    /// How many addresses there are.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Whether `connections` fit in the ephemeral ports of these addresses.
    pub fn capacity(&self) -> u64 {
        self.addrs.len() as u64 * PORTS_PER_ADDRESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_spreads_a_million_connections_over_enough_addresses() {
        let sources = SourceAddrs::loopback_for(1_000_000);
        assert_eq!(sources.len(), 36);
        assert!(sources.capacity() >= 1_000_000);
        let mut per_address = std::collections::HashMap::new();
        for index in 0..1_000_000u64 {
            *per_address
                .entry(sources.for_connection(index))
                .or_insert(0u64) += 1;
        }
        assert_eq!(per_address.len(), 36);
        assert!(per_address.values().all(|n| *n <= PORTS_PER_ADDRESS));
        assert_eq!(sources.for_connection(0), IpAddr::from([127, 0, 0, 1]));
        assert_eq!(sources.for_connection(1), IpAddr::from([127, 0, 0, 2]));
        assert_eq!(sources.for_connection(36), IpAddr::from([127, 0, 0, 1]));
        assert_eq!(
            SourceAddrs::loopback_for(19_000).len() as u64,
            MIN_LOOPBACK_ADDRESSES
        );
    }

    #[test]
    fn lists_and_ranges_parse() {
        let sources = SourceAddrs::parse("10.0.0.5, 127.0.0.1-127.0.0.3").unwrap();
        assert_eq!(sources.len(), 4);
        assert_eq!(sources.for_connection(3), IpAddr::from([127, 0, 0, 3]));
        assert!(SourceAddrs::parse("127.0.0.9-127.0.0.1").is_err());
        assert!(SourceAddrs::parse("").is_err());
        assert!(SourceAddrs::parse("nope").is_err());
    }
}
