//! A snapshot held as persistent maps keyed by namespace/name, together with
//! the indexes the consistency check needs, so that a delta is checked and
//! applied in O(change · log n) and a copy costs O(1) (the maps share
//! structure, `imbl`). The publisher keeps its current snapshot this way, and
//! so do subscribers, whose lookups (by hash, by IP and key, by name) read
//! the same indexes; [`crate::check::check`] stays the whole-snapshot
//! reference it is tested against (same rules, same verdicts).
//!
//! Memory: each lease is held once, as its protobuf encoding in one
//! allocation, with the fields the indexes compare located in it; every index
//! entry is a pointer to it (plus a span for a key's fingerprint), never a
//! copy of a string. Reads decode the lease they return.
//!
//! [`Table::apply`] changes nothing when the result would break a rule: the
//! caller applies to a copy and keeps it only on success.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use imbl::{HashMap, OrdMap};
use prost::Message;
use prost::bytes::Bytes;
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};
use prost::encoding::{encoded_len_varint, key_len};

use crate::check::{lease_fields, route_fields, route_name};
use crate::pb;

/// Namespace and name.
pub type Key = (String, String);

fn key_of(namespace: &str, name: &str) -> Key {
    (namespace.to_string(), name.to_string())
}

/// Where a field's bytes sit in an encoded lease.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Span {
    at: u32,
    len: u32,
}

/// The length-delimited fields of an encoded message, as (tag, span). Every
/// field of `Lease` and `AccessKey` is length-delimited today; a varint or
/// fixed-width field (a later proto version) is stepped over, and only bytes
/// that are not protobuf end the walk.
fn fields(buf: &[u8], base: u32) -> impl Iterator<Item = (u32, Span)> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        loop {
            let mut rest = buf.get(at..).filter(|r| !r.is_empty())?;
            let before = rest.len();
            let (tag, wire) = decode_key(&mut rest).ok()?;
            let skip = match wire {
                WireType::LengthDelimited => None,
                WireType::Varint => {
                    decode_varint(&mut rest).ok()?;
                    Some(0)
                }
                WireType::SixtyFourBit => Some(8),
                WireType::ThirtyTwoBit => Some(4),
                WireType::StartGroup | WireType::EndGroup => return None,
            };
            if let Some(n) = skip {
                at = (at + (before - rest.len()))
                    .checked_add(n)
                    .filter(|e| *e <= buf.len())?;
                continue;
            }
            let len = usize::try_from(decode_varint(&mut rest).ok()?).ok()?;
            let start = at + (before - rest.len());
            let end = start.checked_add(len).filter(|e| *e <= buf.len())?;
            at = end;
            let span = Span {
                at: base.checked_add(u32::try_from(start).ok()?)?,
                len: u32::try_from(len).ok()?,
            };
            return Some((tag, span));
        }
    })
}

/// One lease as a table holds it: its encoding (prost's, so re-encoding a
/// snapshot copies bytes) and where the fields the indexes compare are.
#[derive(Debug, PartialEq, Eq)]
struct Stored {
    enc: Box<[u8]>,
    namespace: Span,
    name: Span,
    hash: Span,
    user: Span,
    pool: Span,
    /// The IP when it parses (a lease whose IP does not was refused).
    ip: Option<IpAddr>,
}

type Lease = Arc<Stored>;

impl Stored {
    fn new(l: &pb::Lease, ip: Option<IpAddr>) -> Stored {
        let enc = l.encode_to_vec().into_boxed_slice();
        let mut spans = [Span::default(); 7];
        for (tag, span) in fields(&enc, 0) {
            if let Some(slot) = usize::try_from(tag).ok().and_then(|t| spans.get_mut(t)) {
                *slot = span;
            }
        }
        Stored {
            enc,
            namespace: spans[1],
            name: spans[2],
            hash: spans[3],
            user: spans[4],
            pool: spans[6],
            ip,
        }
    }

    fn bytes(&self, s: Span) -> &[u8] {
        let at = s.at as usize;
        self.enc.get(at..at + s.len as usize).unwrap_or_default()
    }

    fn text(&self, s: Span) -> &str {
        std::str::from_utf8(self.bytes(s)).unwrap_or_default()
    }

    fn name_pair(&self) -> (&[u8], &[u8]) {
        (self.bytes(self.namespace), self.bytes(self.name))
    }

    fn hash(&self) -> &[u8] {
        self.bytes(self.hash)
    }

    /// The lease itself. It was encoded from a `pb::Lease`, so it decodes.
    fn decode(&self) -> Option<pb::Lease> {
        pb::Lease::decode(&*self.enc).ok()
    }

    /// Whether `l` is this lease (equal messages encode equally).
    fn is(&self, l: &pb::Lease) -> bool {
        l.encoded_len() == self.enc.len() && *l.encode_to_vec() == *self.enc
    }

    /// The fingerprints the lease routes by IP, in key order: non-empty and
    /// not disabled (`check::ip_routed_keys`, on the encoding).
    fn routed_fingerprints(&self) -> Vec<Span> {
        let mut keys = Vec::new();
        let mut disabled = Vec::new();
        for (tag, span) in fields(&self.enc, 0) {
            match tag {
                7 => keys.extend(
                    fields(self.bytes(span), span.at)
                        .filter(|(t, _)| *t == 2)
                        .map(|(_, fp)| fp)
                        .last(),
                ),
                12 => disabled.push(span),
                _ => {}
            }
        }
        keys.retain(|fp| fp.len > 0 && !disabled.iter().any(|d| self.bytes(*d) == self.bytes(*fp)));
        keys
    }
}

/// A lease checked on its own and encoded, ready to be indexed: the part of
/// taking a lease in that needs no other lease, so a load can do it on a
/// second thread while the first indexes (see [`Builder::load`]).
pub(crate) struct Prepared {
    stored: Lease,
    /// What [`lease_fields`] found wrong.
    errors: Vec<String>,
}

impl Prepared {
    pub(crate) fn new(l: &pb::Lease) -> Prepared {
        let mut errors = Vec::new();
        let ip = lease_fields(l, &mut errors);
        Prepared {
            stored: Arc::new(Stored::new(l, ip)),
            errors,
        }
    }
}

/// A lease keyed by namespace/name (the canonical order).
#[derive(Clone, Debug)]
struct ByName(Lease);

/// Looks a lease up by name without building one: `(&str, &str)` and
/// [`ByName`] compare as the same pair.
trait NamePair {
    fn pair(&self) -> (&[u8], &[u8]);
}

impl NamePair for ByName {
    fn pair(&self) -> (&[u8], &[u8]) {
        self.0.name_pair()
    }
}

impl NamePair for (&[u8], &[u8]) {
    fn pair(&self) -> (&[u8], &[u8]) {
        *self
    }
}

impl NamePair for (&str, &str) {
    fn pair(&self) -> (&[u8], &[u8]) {
        (self.0.as_bytes(), self.1.as_bytes())
    }
}

impl PartialEq for dyn NamePair + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.pair() == other.pair()
    }
}
impl Eq for dyn NamePair + '_ {}
impl PartialOrd for dyn NamePair + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for dyn NamePair + '_ {
    fn cmp(&self, other: &Self) -> Ordering {
        self.pair().cmp(&other.pair())
    }
}
impl<'a> Borrow<dyn NamePair + 'a> for ByName {
    fn borrow(&self) -> &(dyn NamePair + 'a) {
        self
    }
}
impl PartialEq for ByName {
    fn eq(&self, other: &Self) -> bool {
        self.pair() == other.pair()
    }
}
impl Eq for ByName {}
impl PartialOrd for ByName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ByName {
    fn cmp(&self, other: &Self) -> Ordering {
        self.pair().cmp(&other.pair())
    }
}

fn by_name<'a>(namespace: &'a str, name: &'a str) -> impl NamePair + 'a {
    (namespace, name)
}

/// A lease keyed by its hash (looked up by the hash's bytes).
#[derive(Clone, Debug)]
struct ByHash(Lease);

impl Borrow<[u8]> for ByHash {
    fn borrow(&self) -> &[u8] {
        self.0.hash()
    }
}
impl Hash for ByHash {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash().hash(h)
    }
}
impl PartialEq for ByHash {
    fn eq(&self, other: &Self) -> bool {
        self.0.hash() == other.0.hash()
    }
}
impl Eq for ByHash {}

/// A lease keyed by (pool, ip, user).
#[derive(Clone, Debug)]
struct ByPoolIpUser(Lease);

impl ByPoolIpUser {
    fn key(&self) -> (&[u8], Option<IpAddr>, &[u8]) {
        let l = &self.0;
        (l.bytes(l.pool), l.ip, l.bytes(l.user))
    }
}
impl Hash for ByPoolIpUser {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.key().hash(h)
    }
}
impl PartialEq for ByPoolIpUser {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for ByPoolIpUser {}

/// A lease keyed by (ip, one of its fingerprints), the span locating it.
#[derive(Clone, Debug)]
struct ByIpKey(Lease, Span);

/// Looks up (ip, fingerprint) without a lease: a pair and [`ByIpKey`] hash
/// and compare alike.
trait IpFingerprint {
    fn ip_fp(&self) -> (Option<IpAddr>, &[u8]);
}

impl IpFingerprint for ByIpKey {
    fn ip_fp(&self) -> (Option<IpAddr>, &[u8]) {
        (self.0.ip, self.0.bytes(self.1))
    }
}

impl IpFingerprint for (IpAddr, &str) {
    fn ip_fp(&self) -> (Option<IpAddr>, &[u8]) {
        (Some(self.0), self.1.as_bytes())
    }
}

impl Hash for dyn IpFingerprint + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.ip_fp().hash(h)
    }
}
impl PartialEq for dyn IpFingerprint + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.ip_fp() == other.ip_fp()
    }
}
impl Eq for dyn IpFingerprint + '_ {}
impl<'a> Borrow<dyn IpFingerprint + 'a> for ByIpKey {
    fn borrow(&self) -> &(dyn IpFingerprint + 'a) {
        self
    }
}
impl Hash for ByIpKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self as &dyn IpFingerprint).hash(h)
    }
}
impl PartialEq for ByIpKey {
    fn eq(&self, other: &Self) -> bool {
        self.ip_fp() == other.ip_fp()
    }
}
impl Eq for ByIpKey {}

/// See the module docs.
#[derive(Clone, Debug, Default)]
pub struct Table {
    leases: OrdMap<ByName, Lease>,
    routes: OrdMap<Key, Arc<pb::Route>>,
    relay: Option<pb::RelayTrust>,
    /// Lease hash → the lease that has it.
    by_hash: HashMap<ByHash, ()>,
    /// (pool, ip, user) → the lease of that user holding that IP.
    by_pool_ip_user: HashMap<ByPoolIpUser, ()>,
    /// (ip, fingerprint) → the lease that key reaches on that IP.
    by_ip_key: HashMap<ByIpKey, ()>,
    /// Lease hash → how many routes lead to it.
    route_refs: HashMap<Vec<u8>, usize>,
}

impl PartialEq for Table {
    fn eq(&self, other: &Self) -> bool {
        self.leases == other.leases && self.routes == other.routes && self.relay == other.relay
    }
}

/// Builds a table from a whole snapshot's parts, one lease at a time, so the
/// caller can let each go (or decode the next) as it is taken in.
#[derive(Default)]
pub(crate) struct Builder {
    table: Table,
    errors: Vec<String>,
    twice: Vec<String>,
    routes: Vec<pb::Route>,
}

impl Builder {
    /// Takes a lease in (checked against those before it).
    pub(crate) fn lease(&mut self, l: &pb::Lease) {
        self.prepared(Prepared::new(l));
    }

    /// Takes a prepared lease in (checked against those before it).
    fn prepared(&mut self, p: Prepared) {
        let (namespace, name) = p.stored.name_pair();
        if self
            .table
            .leases
            .contains_key(&(namespace, name) as &dyn NamePair)
        {
            self.twice.push(format!(
                "lease {}/{}: appears twice in the delta",
                String::from_utf8_lossy(namespace),
                String::from_utf8_lossy(name)
            ));
            return;
        }
        self.table.index_lease(p, &mut self.errors);
    }

    /// Takes in encoded leases, in order: a second thread decodes and
    /// prepares them while this one indexes (a million leases take seconds
    /// on one core, and a proxy's cold start waits for them). Stops at the
    /// first lease that does not decode.
    pub(crate) fn load(&mut self, leases: Vec<Bytes>) -> Result<(), prost::DecodeError> {
        /// Leases per message between the threads.
        const BATCH: usize = 512;
        let (tx, rx) =
            std::sync::mpsc::sync_channel::<Result<Vec<Prepared>, prost::DecodeError>>(8);
        std::thread::scope(|s| {
            s.spawn(move || {
                for chunk in leases.chunks(BATCH) {
                    let batch: Result<Vec<Prepared>, _> = chunk
                        .iter()
                        .map(|enc| pb::Lease::decode(enc.clone()).map(|l| Prepared::new(&l)))
                        .collect();
                    let failed = batch.is_err();
                    // The receiver only goes away after an error of ours.
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            });
            for batch in rx {
                for p in batch? {
                    self.prepared(p);
                }
            }
            Ok(())
        })
    }

    /// Takes a route in (checked in [`Builder::finish`], after every lease).
    pub(crate) fn route(&mut self, r: pb::Route) {
        self.routes.push(r);
    }

    /// The table, or every problem (only the duplicates when there are any,
    /// as [`Table::apply`] reports them).
    pub(crate) fn finish(mut self, relay: Option<pb::RelayTrust>) -> Result<Table, Vec<String>> {
        duplicates(
            "route",
            self.routes.iter().map(|r| (&r.namespace, &r.name)),
            &mut self.twice,
        );
        if !self.twice.is_empty() {
            return Err(self.twice);
        }
        for r in &self.routes {
            self.table.insert_route(r, &mut self.errors);
        }
        self.table.relay = relay;
        if self.errors.is_empty() {
            Ok(self.table)
        } else {
            Err(self.errors)
        }
    }
}

impl Table {
    /// The table of a whole snapshot, or every problem the check finds. Takes
    /// the snapshot so each lease is let go as soon as it is held.
    pub fn from_snapshot(s: pb::Snapshot) -> Result<Table, Vec<String>> {
        let mut b = Builder::default();
        for l in s.leases {
            b.lease(&l);
        }
        for r in s.routes {
            b.route(r);
        }
        b.finish(s.relay)
    }

    /// Leases held.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Routes held.
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    fn stored(&self, namespace: &str, name: &str) -> Option<&Lease> {
        self.leases.get(&by_name(namespace, name) as &dyn NamePair)
    }

    /// A lease by namespace/name (decoded: the table holds it encoded).
    pub fn lease(&self, namespace: &str, name: &str) -> Option<pb::Lease> {
        self.stored(namespace, name)?.decode()
    }

    /// The lease with this hash.
    pub fn lease_by_hash(&self, hash: &[u8]) -> Option<pb::Lease> {
        self.by_hash.get_key_value(hash)?.0.0.decode()
    }

    /// Whether a lease has this hash.
    pub fn has_lease_hash(&self, hash: &[u8]) -> bool {
        self.by_hash.contains_key(hash)
    }

    /// The lease that the key with this fingerprint reaches on this IP.
    pub fn lease_by_ip_key(&self, ip: IpAddr, fingerprint: &str) -> Option<pb::Lease> {
        self.by_ip_key
            .get_key_value(&(ip, fingerprint) as &dyn IpFingerprint)?
            .0
            .0
            .decode()
    }

    /// A route by namespace/name.
    pub fn route(&self, namespace: &str, name: &str) -> Option<&pb::Route> {
        self.routes.get(&key_of(namespace, name)).map(|r| &**r)
    }

    /// The relay settings.
    pub fn relay(&self) -> Option<&pb::RelayTrust> {
        self.relay.as_ref()
    }

    /// The snapshot it holds, in canonical order (linear: for tests, status
    /// and the rare full copy; the wire uses [`Table::encode_full`]).
    pub fn to_snapshot(
        &self,
        version: Option<pb::Version>,
        generated_unix_ms: i64,
    ) -> pb::Snapshot {
        pb::Snapshot {
            version,
            leases: self.leases().collect(),
            routes: self.routes.values().map(|r| (**r).clone()).collect(),
            relay: self.relay.clone(),
            generated_unix_ms,
        }
    }

    /// Every lease, in canonical order (each decoded as it is reached).
    pub fn leases(&self) -> impl Iterator<Item = pb::Lease> + '_ {
        self.leases.values().filter_map(|l| l.decode())
    }

    /// Every route, in canonical order.
    pub fn routes(&self) -> impl Iterator<Item = &pb::Route> {
        self.routes.values().map(|r| &**r)
    }

    fn snapshot_len(&self, version: Option<&pb::Version>, generated_unix_ms: i64) -> usize {
        use prost::encoding::{int64, message};
        version.map_or(0, |v| message::encoded_len(1, v))
            + self
                .leases
                .values()
                .map(|l| key_len(2) + encoded_len_varint(l.enc.len() as u64) + l.enc.len())
                .sum::<usize>()
            + self
                .routes
                .values()
                .map(|r| message::encoded_len(3, &**r))
                .sum::<usize>()
            + self
                .relay
                .as_ref()
                .map_or(0, |r| message::encoded_len(4, r))
            + if generated_unix_ms == 0 {
                0
            } else {
                int64::encoded_len(5, &generated_unix_ms)
            }
    }

    fn encode_fields(
        &self,
        version: Option<&pb::Version>,
        generated_unix_ms: i64,
        out: &mut Vec<u8>,
    ) {
        use prost::encoding::{int64, message};
        if let Some(v) = version {
            message::encode(1, v, out);
        }
        // What message::encode(2, lease) writes: the held bytes are prost's.
        for l in self.leases.values() {
            encode_key(2, WireType::LengthDelimited, out);
            encode_varint(l.enc.len() as u64, out);
            out.extend_from_slice(&l.enc);
        }
        for r in self.routes.values() {
            message::encode(3, &**r, out);
        }
        if let Some(r) = &self.relay {
            message::encode(4, r, out);
        }
        if generated_unix_ms != 0 {
            int64::encode(5, &generated_unix_ms, out);
        }
    }

    /// The snapshot it holds, encoded (a `Snapshot` message), written straight
    /// from the maps; byte for byte what encoding [`Table::to_snapshot`] gives.
    pub fn encode_snapshot(&self, version: Option<pb::Version>, generated_unix_ms: i64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.snapshot_len(version.as_ref(), generated_unix_ms));
        self.encode_fields(version.as_ref(), generated_unix_ms, &mut out);
        out
    }

    /// `SnapshotResponse.snapshot` as encoded on the wire (field 3: key,
    /// length, the snapshot's bytes), written straight from the maps without
    /// copying the snapshot first.
    pub fn encode_full(&self, version: Option<pb::Version>, generated_unix_ms: i64) -> Bytes {
        let body = self.snapshot_len(version.as_ref(), generated_unix_ms);
        let mut out = Vec::with_capacity(body + 1 + encoded_len_varint(body as u64));
        encode_key(3, WireType::LengthDelimited, &mut out);
        encode_varint(body as u64, &mut out);
        self.encode_fields(version.as_ref(), generated_unix_ms, &mut out);
        Bytes::from(out)
    }

    /// The part of `proposed` that changes this table: upserts equal to what
    /// is held and removals of what is not held are dropped, a relay equal to
    /// the held one too. Lists come out in canonical order; base, version and
    /// timestamp are copied.
    pub fn effective(&self, proposed: &pb::SnapshotDelta) -> pb::SnapshotDelta {
        let mut upserted_leases: Vec<pb::Lease> = proposed
            .upserted_leases
            .iter()
            .filter(|l| !self.stored(&l.namespace, &l.name).is_some_and(|s| s.is(l)))
            .cloned()
            .collect();
        let mut removed_leases: Vec<pb::ObjectRef> = proposed
            .removed_leases
            .iter()
            .filter(|r| self.stored(&r.namespace, &r.name).is_some())
            .cloned()
            .collect();
        let mut upserted_routes: Vec<pb::Route> = proposed
            .upserted_routes
            .iter()
            .filter(|r| self.route(&r.namespace, &r.name) != Some(*r))
            .cloned()
            .collect();
        let mut removed_routes: Vec<pb::ObjectRef> = proposed
            .removed_routes
            .iter()
            .filter(|r| self.route(&r.namespace, &r.name).is_some())
            .cloned()
            .collect();
        upserted_leases.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        removed_leases.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        upserted_routes.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        removed_routes.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let relay = proposed
            .relay
            .clone()
            .filter(|r| self.relay.as_ref() != Some(r));
        pb::SnapshotDelta {
            base: proposed.base,
            version: proposed.version,
            upserted_leases,
            removed_leases,
            upserted_routes,
            removed_routes,
            relay,
            relay_removed: proposed.relay_removed && self.relay.is_some(),
            generated_unix_ms: proposed.generated_unix_ms,
        }
    }

    /// Applies a delta (its base and version are the caller's business):
    /// removals, then upserts, then the relay; a key may appear once per kind.
    /// Checks the rules for what it touches only. On error every problem is
    /// returned and the table may be half-changed: apply to a copy.
    pub fn apply(&mut self, d: &pb::SnapshotDelta) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        duplicates(
            "lease",
            d.upserted_leases
                .iter()
                .map(|l| (&l.namespace, &l.name))
                .chain(d.removed_leases.iter().map(|r| (&r.namespace, &r.name))),
            &mut errors,
        );
        duplicates(
            "route",
            d.upserted_routes
                .iter()
                .map(|r| (&r.namespace, &r.name))
                .chain(d.removed_routes.iter().map(|r| (&r.namespace, &r.name))),
            &mut errors,
        );
        if !errors.is_empty() {
            return Err(errors);
        }
        // Routes first out, so a lease they led to may go in the same delta.
        for r in &d.removed_routes {
            self.remove_route(&key_of(&r.namespace, &r.name));
        }
        for r in &d.upserted_routes {
            self.remove_route(&key_of(&r.namespace, &r.name));
        }
        // Every lease this delta touches leaves the indexes before any enters,
        // so two leases swapping an IP or a hash in one delta is fine.
        let mut gone_hashes: Vec<Vec<u8>> = Vec::new();
        for r in &d.removed_leases {
            gone_hashes.extend(self.remove_lease(&r.namespace, &r.name));
        }
        for l in &d.upserted_leases {
            gone_hashes.extend(self.remove_lease(&l.namespace, &l.name));
        }
        for l in &d.upserted_leases {
            self.insert_lease(l, &mut errors);
        }
        for h in gone_hashes {
            if !self.by_hash.contains_key(h.as_slice())
                && self.route_refs.get(&h).is_some_and(|n| *n > 0)
            {
                errors.push(format!(
                    "lease {} left the snapshot but a route still leads to it",
                    hex::encode(&h)
                ));
            }
        }
        for r in &d.upserted_routes {
            self.insert_route(r, &mut errors);
        }
        if d.relay_removed {
            self.relay = None;
        } else if let Some(relay) = &d.relay {
            self.relay = Some(relay.clone());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Takes a lease out of the map and the indexes; returns its hash.
    fn remove_lease(&mut self, namespace: &str, name: &str) -> Option<Vec<u8>> {
        let old = self
            .leases
            .remove(&by_name(namespace, name) as &dyn NamePair)?;
        let mine = |other: &Lease| other.name_pair() == old.name_pair();
        if self
            .by_hash
            .get_key_value(old.hash())
            .is_some_and(|(k, ())| mine(&k.0))
        {
            self.by_hash.remove(old.hash());
        }
        if old.ip.is_some() {
            let piu = ByPoolIpUser(old.clone());
            if self
                .by_pool_ip_user
                .get_key_value(&piu)
                .is_some_and(|(k, ())| mine(&k.0))
            {
                self.by_pool_ip_user.remove(&piu);
            }
            for fp in old.routed_fingerprints() {
                let k = ByIpKey(old.clone(), fp);
                if self
                    .by_ip_key
                    .get_key_value(&k)
                    .is_some_and(|(k, ())| mine(&k.0))
                {
                    self.by_ip_key.remove(&k);
                }
            }
        }
        Some(old.hash().to_vec())
    }

    /// Inserts `l` into every index (see [`Prepared`]).
    fn insert_lease(&mut self, l: &pb::Lease, errors: &mut Vec<String>) {
        self.index_lease(Prepared::new(l), errors);
    }

    /// Indexes a prepared lease, reporting what collides with the leases
    /// held. An entry already present is replaced by `insert` itself (key
    /// and value), so nothing is removed first.
    fn index_lease(&mut self, p: Prepared, errors: &mut Vec<String>) {
        errors.extend(p.errors);
        let new = p.stored;
        // Named only when something is wrong: loads take millions of leases.
        let who = || format!("lease {}/{}", new.text(new.namespace), new.text(new.name));
        let other_than_new = |other: &Lease| other.name_pair() != new.name_pair();
        if new.hash.len == 32 {
            match self.by_hash.get_key_value(new.hash()) {
                Some((other, ())) if other_than_new(&other.0) => {
                    errors.push(format!("{}: lease hash shared with another lease", who()));
                }
                _ => {
                    self.by_hash.insert(ByHash(new.clone()), ());
                }
            }
        }
        if let Some(ip) = new.ip {
            let piu = ByPoolIpUser(new.clone());
            match self.by_pool_ip_user.get_key_value(&piu) {
                Some((other, ())) if other_than_new(&other.0) => errors.push(format!(
                    "{}: user {} holds {ip} in pool {} twice",
                    who(),
                    new.text(new.user),
                    new.text(new.pool)
                )),
                _ => {
                    self.by_pool_ip_user.insert(piu, ());
                }
            }
            for fp in new.routed_fingerprints() {
                let k = ByIpKey(new.clone(), fp);
                match self.by_ip_key.get_key_value(&k) {
                    Some((other, ())) if other_than_new(&other.0) => errors.push(format!(
                        "{}: ({ip}, {}) already routes to lease {}/{}",
                        who(),
                        new.text(fp),
                        other.0.text(other.0.namespace),
                        other.0.text(other.0.name)
                    )),
                    _ => {
                        self.by_ip_key.insert(k, ());
                    }
                }
            }
        }
        self.leases.insert(ByName(new.clone()), new);
    }

    fn remove_route(&mut self, key: &Key) {
        let Some(old) = self.routes.remove(key) else {
            return;
        };
        if let Some(pb::route::To::LeaseHash(h)) = &old.to
            && let Some(n) = self.route_refs.get_mut(h)
        {
            *n -= 1;
            if *n == 0 {
                self.route_refs.remove(h);
            }
        }
    }

    fn insert_route(&mut self, r: &pb::Route, errors: &mut Vec<String>) {
        route_fields(r, errors);
        if let Some(pb::route::To::LeaseHash(h)) = &r.to {
            if !self.by_hash.contains_key(h.as_slice()) {
                errors.push(format!(
                    "{}: its lease {} is not in the snapshot",
                    route_name(r),
                    hex::encode(h)
                ));
            }
            *self.route_refs.entry(h.clone()).or_insert(0) += 1;
        }
        self.routes
            .insert(key_of(&r.namespace, &r.name), Arc::new(r.clone()));
    }

    /// Leases plus routes held.
    pub fn objects(&self) -> usize {
        self.leases.len() + self.routes.len()
    }

    /// The delta taking this table to `new` (both checked); walks the maps,
    /// skipping what they share.
    pub fn diff(&self, new: &Table) -> pb::SnapshotDelta {
        let mut d = pb::SnapshotDelta::default();
        for item in self.leases.diff(&new.leases) {
            match item {
                imbl::ordmap::DiffItem::Add(_, l)
                | imbl::ordmap::DiffItem::Update { new: (_, l), .. } => {
                    d.upserted_leases.extend(l.decode())
                }
                imbl::ordmap::DiffItem::Remove(_, l) => d.removed_leases.push(pb::ObjectRef {
                    namespace: l.text(l.namespace).to_string(),
                    name: l.text(l.name).to_string(),
                }),
            }
        }
        for item in self.routes.diff(&new.routes) {
            match item {
                imbl::ordmap::DiffItem::Add(_, r)
                | imbl::ordmap::DiffItem::Update { new: (_, r), .. } => {
                    d.upserted_routes.push((**r).clone())
                }
                imbl::ordmap::DiffItem::Remove(k, _) => d.removed_routes.push(pb::ObjectRef {
                    namespace: k.0.clone(),
                    name: k.1.clone(),
                }),
            }
        }
        if self.relay != new.relay {
            d.relay.clone_from(&new.relay);
            d.relay_removed = new.relay.is_none();
        }
        d
    }
}

/// Reports keys listed twice among a kind's upserts and removals.
fn duplicates<'a>(
    kind: &str,
    keys: impl Iterator<Item = (&'a String, &'a String)>,
    errors: &mut Vec<String>,
) {
    let mut seen = std::collections::HashSet::new();
    for (ns, name) in keys {
        if !seen.insert((ns, name)) {
            errors.push(format!("{kind} {ns}/{name}: appears twice in the delta"));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{check, delta};
    use proptest::prelude::*;

    /// A varint field (not in today's `Lease`, maybe in a later one) is
    /// stepped over: the fields after it are still found.
    #[test]
    fn fields_step_over_other_wire_types() {
        let mut buf = Vec::new();
        prost::encoding::uint64::encode(20, &300, &mut buf);
        prost::encoding::fixed32::encode(21, &7, &mut buf);
        prost::encoding::string::encode(1, &"ns".to_string(), &mut buf);
        let got: Vec<(u32, Span)> = fields(&buf, 0).collect();
        assert_eq!(got.len(), 1, "{got:?}");
        let (tag, span) = got[0];
        assert_eq!(tag, 1);
        assert_eq!(&buf[span.at as usize..][..span.len as usize], b"ns");
    }

    fn lease(name: u8, hash: u8, ip: u8, user: u8, fp: u8, disabled: bool) -> pb::Lease {
        let fp = format!("f{fp}");
        pb::Lease {
            namespace: "d".into(),
            name: format!("l{name}"),
            lease_hash: vec![hash; 32],
            user: format!("u{user}"),
            ip: if ip == 0 {
                "bad".into()
            } else {
                format!("10.0.0.{ip}")
            },
            pool: "p".into(),
            access_keys: vec![pb::AccessKey {
                openssh: "ssh-ed25519 AAAA".into(),
                fingerprint: fp.clone(),
            }],
            target: Some(pb::lease::Target::Address("127.0.0.1:22".into())),
            ip_route_disabled_fingerprints: if disabled { vec![fp] } else { vec![] },
            ..Default::default()
        }
    }

    fn route(name: u8, to: u8) -> pb::Route {
        pb::Route {
            namespace: "d".into(),
            name: format!("r{name}"),
            from: "ssh://u@h".into(),
            r#match: Some(pb::route::Match::Ssh(pb::SshMatch {
                user: "u".into(),
                host: "h".into(),
            })),
            to: Some(if to == 0 {
                pb::route::To::Address("10.1.1.1:22".into())
            } else {
                pb::route::To::LeaseHash(vec![to; 32])
            }),
            allow_keys: vec![],
            allow_unauthenticated: true,
        }
    }

    fn any_lease() -> impl Strategy<Value = pb::Lease> {
        (0u8..5, 1u8..4, 0u8..3, 0u8..2, 0u8..3, any::<bool>())
            .prop_map(|(n, h, ip, u, fp, dis)| lease(n, h, ip, u, fp, dis))
    }

    fn any_route() -> impl Strategy<Value = pb::Route> {
        (0u8..3, 0u8..4).prop_map(|(n, to)| route(n, to))
    }

    fn objref(ns: &str, name: &str) -> pb::ObjectRef {
        pb::ObjectRef {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn any_delta() -> impl Strategy<Value = pb::SnapshotDelta> {
        (
            prop::collection::vec(any_lease(), 0..3),
            prop::collection::vec(0u8..5, 0..2),
            prop::collection::vec(any_route(), 0..2),
            prop::collection::vec(0u8..3, 0..2),
        )
            .prop_map(|(ul, rl, ur, rr)| pb::SnapshotDelta {
                base: Some(pb::Version::new(1, 1)),
                version: Some(pb::Version::new(1, 2)),
                upserted_leases: ul,
                removed_leases: rl.iter().map(|n| objref("d", &format!("l{n}"))).collect(),
                upserted_routes: ur,
                removed_routes: rr.iter().map(|n| objref("d", &format!("r{n}"))).collect(),
                ..Default::default()
            })
    }

    /// A base snapshot that passes the check (built from unique leases).
    fn any_base() -> impl Strategy<Value = pb::Snapshot> {
        (
            prop::collection::vec(any_lease(), 0..5),
            prop::collection::vec(any_route(), 0..3),
        )
            .prop_map(|(leases, routes)| {
                let mut s = pb::Snapshot {
                    version: Some(pb::Version::new(1, 1)),
                    ..Default::default()
                };
                for l in leases {
                    if !s.leases.iter().any(|o| o.name == l.name) {
                        s.leases.push(l);
                    }
                }
                for r in routes {
                    if !s.routes.iter().any(|o| o.name == r.name) {
                        s.routes.push(r);
                    }
                }
                delta::normalize(&mut s);
                s
            })
    }

    proptest! {
        /// Same verdicts and same content as the whole-snapshot check and
        /// delta::apply, for bases and deltas full of collisions.
        #[test]
        fn apply_agrees_with_the_whole_snapshot_check(base in any_base(), d in any_delta()) {
            let table = Table::from_snapshot(base.clone());
            prop_assert_eq!(table.is_ok(), check::check(&base).is_ok());
            let Ok(table) = table else { return Ok(()) };
            prop_assert_eq!(table.to_snapshot(base.version, 0), base.clone());
            let oracle = delta::apply(&base, &d).ok().filter(|s| check::check(s).is_ok());
            let mut next = table.clone();
            let got = next.apply(&d);
            prop_assert_eq!(got.is_ok(), oracle.is_some(), "{:?}", got);
            if let Some(want) = oracle {
                prop_assert_eq!(next.to_snapshot(d.version, 0), want.clone());
                // Lookups go through the indexes, which an upsert updates in
                // place: each finds the lease as it is now.
                for l in &want.leases {
                    prop_assert_eq!(next.lease_by_hash(&l.lease_hash), Some(l.clone()));
                    if let Ok(ip) = l.ip.parse() {
                        for fp in check::ip_routed_keys(l) {
                            prop_assert_eq!(next.lease_by_ip_key(ip, fp), Some(l.clone()));
                        }
                    }
                }
                // The effective delta of the same change is what diff finds.
                let eff = table.effective(&d);
                let mut again = table.clone();
                again.apply(&eff).unwrap();
                prop_assert_eq!(&again, &next);
                let mut via_diff = table.clone();
                via_diff.apply(&table.diff(&next)).unwrap();
                prop_assert_eq!(&via_diff, &next);
                let mut wire = Vec::new();
                let full = pb::Snapshot { generated_unix_ms: 7, ..want };
                prost::encoding::message::encode(3, &full, &mut wire);
                prop_assert_eq!(next.encode_full(full.version, 7).to_vec(), wire);
            }
            // The original is untouched (copies share, never alias).
            prop_assert_eq!(table.to_snapshot(base.version, 0), base);
        }
    }

    #[test]
    fn a_lease_a_route_leads_to_cannot_leave_alone() {
        let mut t = Table::default();
        t.apply(&pb::SnapshotDelta {
            upserted_leases: vec![lease(1, 1, 1, 0, 0, false)],
            upserted_routes: vec![route(1, 1)],
            ..Default::default()
        })
        .unwrap();
        let mut copy = t.clone();
        let err = copy
            .apply(&pb::SnapshotDelta {
                removed_leases: vec![objref("d", "l1")],
                ..Default::default()
            })
            .unwrap_err();
        assert!(err[0].contains("a route still leads to it"), "{err:?}");
        // With the route in the same delta it may go.
        let mut copy = t.clone();
        copy.apply(&pb::SnapshotDelta {
            removed_leases: vec![objref("d", "l1")],
            removed_routes: vec![objref("d", "r1")],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(copy.objects(), 0);
        assert_eq!(t.objects(), 2);
    }
}
