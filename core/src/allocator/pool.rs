//! One pool's allocation state: who holds which address, the load of every
//! used address, and the leases waiting for room. Addresses are offsets into
//! the pool's [`AddressSet`], so huge IPv6 pools cost nothing until used.

use std::collections::{BTreeSet, HashMap};

use keyway_crds::addresses::AddressSet;

use super::{AgeKey, Lid, PoolStats, Uid};

#[derive(Default)]
struct UserEntry {
    /// Addresses of this pool the user holds.
    held: u64,
    /// The user's leases waiting for room, oldest first.
    pending: BTreeSet<(AgeKey, Lid)>,
}

pub(super) struct PoolState {
    pub(super) set: AddressSet,
    /// Leases per used offset (absent = 0).
    load: ahash::AHashMap<u128, u32>,
    /// Used offsets ordered by (load, offset): least-loaded first.
    by_load: BTreeSet<(u32, u128)>,
    /// Every offset below `hwm` is used or in `holes`, so the lowest unused
    /// offset is `holes.first()` or the first unused one from `hwm` up.
    hwm: u128,
    holes: BTreeSet<u128>,
    /// Number of used offsets.
    used: u128,
    /// (user, offset) → the lease holding it: the uniqueness index.
    holders: ahash::AHashMap<(Uid, u128), Lid>,
    users: HashMap<Uid, UserEntry>,
    allocated: u64,
}

impl PoolState {
    pub(super) fn new(set: AddressSet) -> Self {
        PoolState {
            set,
            load: Default::default(),
            by_load: BTreeSet::new(),
            hwm: 0,
            holes: BTreeSet::new(),
            used: 0,
            holders: Default::default(),
            users: HashMap::new(),
            allocated: 0,
        }
    }

    pub(super) fn holder(&self, user: Uid, off: u128) -> Option<Lid> {
        self.holders.get(&(user, off)).copied()
    }

    /// The least-loaded offset `user` does not hold: the lowest unused one if
    /// any exists, else the least-loaded used one. `None` when the user holds
    /// every address.
    pub(super) fn pick(&mut self, user: Uid) -> Option<u128> {
        if self.used < self.set.len() {
            if let Some(h) = self.holes.first() {
                return Some(*h);
            }
            while self.load.contains_key(&self.hwm) {
                self.hwm += 1;
            }
            return Some(self.hwm);
        }
        self.by_load
            .iter()
            .find(|(_, off)| !self.holders.contains_key(&(user, *off)))
            .map(|(_, off)| *off)
    }

    pub(super) fn take(&mut self, user: Uid, off: u128, lid: Lid) {
        let load = self.load.entry(off).or_insert(0);
        if *load == 0 {
            self.used += 1;
            if off < self.hwm {
                self.holes.remove(&off);
            } else if off == self.hwm {
                self.hwm += 1;
            }
        } else {
            self.by_load.remove(&(*load, off));
        }
        *load += 1;
        self.by_load.insert((*load, off));
        self.holders.insert((user, off), lid);
        self.users.entry(user).or_default().held += 1;
        self.allocated += 1;
    }

    pub(super) fn release(&mut self, user: Uid, off: u128) {
        if self.holders.remove(&(user, off)).is_none() {
            return;
        }
        if let Some(load) = self.load.get_mut(&off) {
            self.by_load.remove(&(*load, off));
            *load -= 1;
            if *load == 0 {
                self.load.remove(&off);
                self.used -= 1;
                if off < self.hwm {
                    self.holes.insert(off);
                }
            } else {
                self.by_load.insert((*load, off));
            }
        }
        if let Some(u) = self.users.get_mut(&user) {
            u.held = u.held.saturating_sub(1);
            if u.held == 0 && u.pending.is_empty() {
                self.users.remove(&user);
            }
        }
        self.allocated = self.allocated.saturating_sub(1);
    }

    pub(super) fn add_pending(&mut self, user: Uid, age: AgeKey, lid: Lid) {
        self.users
            .entry(user)
            .or_default()
            .pending
            .insert((age, lid));
    }

    pub(super) fn remove_pending(&mut self, user: Uid, age: AgeKey, lid: Lid) {
        if let Some(u) = self.users.get_mut(&user) {
            u.pending.remove(&(age, lid));
            if u.held == 0 && u.pending.is_empty() {
                self.users.remove(&user);
            }
        }
    }

    pub(super) fn pop_pending(&mut self, user: Uid) -> Option<Lid> {
        let u = self.users.get_mut(&user)?;
        u.pending.pop_first().map(|(_, lid)| lid)
    }

    /// Every lease holding or waiting for an address of this pool.
    pub(super) fn members(&self) -> impl Iterator<Item = Lid> + '_ {
        self.holders.values().copied().chain(
            self.users
                .values()
                .flat_map(|u| u.pending.iter().map(|(_, lid)| *lid)),
        )
    }

    pub(super) fn stats(&self) -> PoolStats {
        let mut s = PoolStats {
            capacity: self.set.len(),
            allocated: self.allocated,
            ..Default::default()
        };
        for u in self.users.values() {
            if u.held > 0 {
                s.users += 1;
            }
            let pending = u.pending.len() as u64;
            s.pending += pending;
            s.max_leases_per_user = s.max_leases_per_user.max(u.held + pending);
        }
        s
    }
}
