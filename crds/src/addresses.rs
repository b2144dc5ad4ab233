//! IPPool addresses as users type them: CIDRs (parsed by `ipnet`), single IPs
//! and inclusive `a-b` ranges, IPv4 and IPv6, minus `exclude`. The result is an
//! [`AddressSet`] of disjoint ranges indexed by offset, so a pool as large as an
//! IPv6 /64 costs a few words, never an enumeration.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// An inclusive range of addresses of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpRange {
    /// First address.
    pub start: IpAddr,
    /// Last address (inclusive).
    pub end: IpAddr,
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// Why an address entry was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}[{index}]: {entry:?}: {reason}")]
pub struct AddressError {
    /// `addresses` or `exclude`.
    pub field: &'static str,
    /// Position in the list.
    pub index: usize,
    /// The entry as written.
    pub entry: String,
    /// What is wrong.
    pub reason: String,
}

/// Address family plus value, so IPv4 sorts before IPv6 and both fit a `u128`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Addr {
    v6: bool,
    value: u128,
}

impl Addr {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => Addr {
                v6: false,
                value: u128::from(u32::from(a)),
            },
            IpAddr::V6(a) => Addr {
                v6: true,
                value: u128::from(a),
            },
        }
    }
    fn ip(self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(self.value.into())
        } else {
            // Values of IPv4 ranges never exceed u32::MAX by construction.
            IpAddr::V4(u32::try_from(self.value).unwrap_or(u32::MAX).into())
        }
    }
}

/// Parses one entry: CIDR, single IP, or inclusive range `a-b`.
pub fn parse_entry(s: &str) -> Result<IpRange, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty entry".into());
    }
    if let Some((a, b)) = s.split_once('-') {
        let start: IpAddr = a
            .trim()
            .parse()
            .map_err(|e| format!("range start {:?}: {e}", a.trim()))?;
        let end: IpAddr = b
            .trim()
            .parse()
            .map_err(|e| format!("range end {:?}: {e}", b.trim()))?;
        if start.is_ipv4() != end.is_ipv4() {
            return Err("range mixes IPv4 and IPv6".into());
        }
        if Addr::of(start) > Addr::of(end) {
            return Err(format!("range start {start} is after its end {end}"));
        }
        return Ok(IpRange { start, end });
    }
    if s.contains('/') {
        let net: IpNet = s.parse().map_err(|e| format!("invalid CIDR: {e}"))?;
        if net.network() != net.addr() {
            return Err(format!(
                "host bits set; did you mean {}/{}?",
                net.network(),
                net.prefix_len()
            ));
        }
        return Ok(IpRange {
            start: net.network(),
            end: net.broadcast(),
        });
    }
    let ip: IpAddr = s
        .parse()
        .map_err(|e| format!("not an IP, CIDR (a.b.c.d/n) or range (a-b): {e}"))?;
    Ok(IpRange { start: ip, end: ip })
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Span {
    start: Addr,
    /// Inclusive end, same family.
    end: Addr,
    /// Offset of `start` within the whole set.
    offset: u128,
}

impl Span {
    fn len(&self) -> u128 {
        // A full IPv6 space (::/0) would overflow by one; saturate instead.
        (self.end.value - self.start.value).saturating_add(1)
    }
}

/// A normalized set of addresses: sorted, merged, excludes removed.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AddressSet {
    spans: Vec<Span>,
    len: u128,
}

fn parse_list(field: &'static str, list: &[String]) -> Result<Vec<(Addr, Addr)>, AddressError> {
    list.iter()
        .enumerate()
        .map(|(index, entry)| {
            parse_entry(entry)
                .map(|r| (Addr::of(r.start), Addr::of(r.end)))
                .map_err(|reason| AddressError {
                    field,
                    index,
                    entry: entry.clone(),
                    reason,
                })
        })
        .collect()
}

fn merge(mut ranges: Vec<(Addr, Addr)>) -> Vec<(Addr, Addr)> {
    ranges.sort();
    let mut out: Vec<(Addr, Addr)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        if let Some(last) = out.last_mut()
            && last.1.v6 == s.v6
            && s.value <= last.1.value.saturating_add(1)
        {
            if e > last.1 {
                last.1 = e;
            }
            continue;
        }
        out.push((s, e));
    }
    out
}

impl AddressSet {
    /// Builds the set from `spec.addresses` and `spec.exclude`.
    pub fn new(addresses: &[String], exclude: &[String]) -> Result<Self, AddressError> {
        let include = merge(parse_list("addresses", addresses)?);
        let exclude = merge(parse_list("exclude", exclude)?);
        let mut kept: Vec<(Addr, Addr)> = Vec::new();
        for (mut s, e) in include {
            let mut alive = true;
            let family = s.v6;
            for &(xs, xe) in exclude.iter().filter(|(xs, _)| xs.v6 == family) {
                if xe < s || xs > e {
                    continue;
                }
                if xs > s {
                    kept.push((
                        s,
                        Addr {
                            v6: s.v6,
                            value: xs.value - 1,
                        },
                    ));
                }
                if xe >= e {
                    alive = false;
                    break;
                }
                s = Addr {
                    v6: s.v6,
                    value: xe.value + 1,
                };
            }
            if alive {
                kept.push((s, e));
            }
        }
        let mut spans = Vec::with_capacity(kept.len());
        let mut len: u128 = 0;
        for (start, end) in kept {
            let span = Span {
                start,
                end,
                offset: len,
            };
            len = len.saturating_add(span.len());
            spans.push(span);
        }
        Ok(AddressSet { spans, len })
    }

    /// Number of addresses.
    pub fn len(&self) -> u128 {
        self.len
    }

    /// No address at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address at `offset` (0-based, IPv4 first, ascending).
    pub fn nth(&self, offset: u128) -> Option<IpAddr> {
        if offset >= self.len {
            return None;
        }
        let i = self
            .spans
            .partition_point(|s| s.offset <= offset)
            .checked_sub(1)?;
        let s = &self.spans[i];
        let value = s.start.value.checked_add(offset - s.offset)?;
        (value <= s.end.value).then(|| {
            Addr {
                v6: s.start.v6,
                value,
            }
            .ip()
        })
    }

    /// The offset of `ip`, if it is in the set.
    pub fn offset_of(&self, ip: IpAddr) -> Option<u128> {
        let a = Addr::of(ip);
        let i = self
            .spans
            .partition_point(|s| s.start <= a)
            .checked_sub(1)?;
        let s = &self.spans[i];
        (a <= s.end).then(|| s.offset + (a.value - s.start.value))
    }

    /// Whether `ip` is in the set.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.offset_of(ip).is_some()
    }

    /// The disjoint ranges, ascending.
    pub fn ranges(&self) -> Vec<IpRange> {
        self.spans
            .iter()
            .map(|s| IpRange {
                start: s.start.ip(),
                end: s.end.ip(),
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(a: &[&str], x: &[&str]) -> AddressSet {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        AddressSet::new(&s(a), &s(x)).unwrap()
    }

    #[test]
    fn forms() {
        assert_eq!(set(&["203.0.113.0/28"], &[]).len(), 16);
        assert_eq!(set(&["198.51.100.10-198.51.100.20"], &[]).len(), 11);
        assert_eq!(set(&["198.51.100.10 - 198.51.100.20"], &[]).len(), 11);
        assert_eq!(set(&["::1"], &[]).len(), 1);
        assert_eq!(set(&["2001:db8::/64"], &[]).len(), 1u128 << 64);
        assert_eq!(
            set(&["10.0.0.1", "2001:db8::1"], &[]).nth(1),
            Some("2001:db8::1".parse().unwrap())
        );
    }

    #[test]
    fn errors_name_the_entry() {
        let e = AddressSet::new(&["10.0.0.1".into(), "10.0.0/24".into()], &[]).unwrap_err();
        assert_eq!((e.field, e.index), ("addresses", 1));
        assert!(e.to_string().contains("10.0.0/24"), "{e}");
        let e = AddressSet::new(&["10.0.0.5/24".into()], &[]).unwrap_err();
        assert!(e.reason.contains("10.0.0.0/24"), "{e}");
        assert!(parse_entry("10.0.0.9-10.0.0.1").is_err());
        assert!(parse_entry("10.0.0.1-::1").is_err());
        assert!(
            AddressSet::new(&["10.0.0.1".into()], &["nope".into()])
                .unwrap_err()
                .field
                == "exclude"
        );
    }

    #[test]
    fn merge_and_exclude() {
        let s = set(
            &["10.0.0.0/30", "10.0.0.4-10.0.0.5", "10.0.0.2"],
            &["10.0.0.1", "10.0.0.4/31"],
        );
        assert_eq!(s.len(), 3);
        let all: Vec<String> = (0..3).map(|i| s.nth(i).unwrap().to_string()).collect();
        assert_eq!(all, ["10.0.0.0", "10.0.0.2", "10.0.0.3"]);
        assert!(set(&["10.0.0.0/30"], &["10.0.0.0/29"]).is_empty());
    }

    proptest! {
        #[test]
        fn nth_and_offset_round_trip(
            entries in proptest::collection::vec((0u32..64, 0u32..8), 1..6),
            excludes in proptest::collection::vec(0u32..72, 0..6),
        ) {
            let addrs: Vec<String> = entries
                .iter()
                .map(|(s, l)| format!("10.0.0.{}-10.0.0.{}", s, s + l))
                .collect();
            let ex: Vec<String> = excludes.iter().map(|x| format!("10.0.0.{x}")).collect();
            let set = AddressSet::new(&addrs, &ex).unwrap();
            let mut expected: Vec<u32> = (0..80u32)
                .filter(|v| entries.iter().any(|(s, l)| *v >= *s && *v <= s + l))
                .filter(|v| !excludes.contains(v))
                .collect();
            expected.dedup();
            prop_assert_eq!(set.len(), expected.len() as u128);
            for (i, v) in expected.iter().enumerate() {
                let ip: IpAddr = format!("10.0.0.{v}").parse().unwrap();
                prop_assert_eq!(set.nth(i as u128), Some(ip));
                prop_assert_eq!(set.offset_of(ip), Some(i as u128));
            }
            for x in &excludes {
                let ip: IpAddr = format!("10.0.0.{x}").parse().unwrap();
                prop_assert!(!set.contains(ip));
            }
        }
    }
}
