//! What the agent knows from its snapshot, and its live tunnels. Pure code.
//!
//! The [`Book`] answers the handshake's one question: may this opener have a
//! tunnel to this lease hash, and where is the VM? [`Tunnels`] keeps every
//! live tunnel by lease, so that a new book (a snapshot without the lease,
//! or with another provider) closes what it no longer allows. Both sit
//! behind one lock in the agent, so no tunnel is admitted by a book that has
//! already been replaced.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use keyway_snapshot::pb;
use tokio_util::sync::CancellationToken;

/// Where the agent sends a lease's bytes.
#[derive(Clone, Debug, Default)]
pub struct Forwards {
    /// The VM sshd for leases without an override (`--forward`).
    pub default: String,
    /// `namespace/name` → `host:port` (`--lease-forward`).
    pub by_lease: HashMap<String, String>,
}

impl Forwards {
    /// Parses `--lease-forward` values: `NAMESPACE/NAME=HOST:PORT`.
    pub fn new(default: String, overrides: &[String]) -> Result<Forwards, String> {
        let mut by_lease = HashMap::new();
        for o in overrides {
            let (lease, addr) = o
                .split_once('=')
                .filter(|(l, a)| l.contains('/') && !a.is_empty())
                .ok_or_else(|| {
                    format!("--lease-forward {o:?}: expected NAMESPACE/NAME=HOST:PORT")
                })?;
            by_lease.insert(lease.to_string(), addr.to_string());
        }
        Ok(Forwards { default, by_lease })
    }
}

/// A lease this agent serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// `namespace/name`, for logs.
    pub label: String,
    /// The VM's SSH address.
    pub forward: String,
}

/// Why a handshake is refused. The messages go to the opener (a gateway).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No live lease has this hash: unknown, settled or deleted.
    UnknownLease,
    /// The lease names another provider.
    WrongProvider,
    /// `--allow-peer` is set and the opener is not on it.
    PeerNotAllowed,
    /// `--max-tunnels` reached.
    TooManyTunnels,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::UnknownLease => "no live lease with this hash (unknown, settled or deleted)",
            Refusal::WrongProvider => "this lease is served by another provider, not this agent",
            Refusal::PeerNotAllowed => "this peer may not open tunnels to this agent",
            Refusal::TooManyTunnels => "this agent is at its tunnel limit",
        }
    }

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::UnknownLease => "unknown_lease",
            Refusal::WrongProvider => "wrong_provider",
            Refusal::PeerNotAllowed => "peer_not_allowed",
            Refusal::TooManyTunnels => "tunnel_limit",
        }
    }
}

/// The snapshot, as far as this agent is concerned.
#[derive(Debug, Default)]
pub struct Book {
    /// Every live lease by hash: `(label, provider peer id if any)`.
    leases: HashMap<[u8; 32], (String, Option<String>)>,
    me: String,
    forwards: Arc<Forwards>,
}

impl Book {
    /// Indexes `snap` for the agent whose peer id is `me`.
    #[cfg(test)]
    pub fn build(snap: &pb::Snapshot, me: &str, forwards: Arc<Forwards>) -> Book {
        Self::from_leases(snap.leases.iter().cloned(), me, forwards)
    }

    /// Indexes these leases (a snapshot's) for the agent whose peer id is `me`.
    pub fn from_leases(
        leases: impl Iterator<Item = pb::Lease>,
        me: &str,
        forwards: Arc<Forwards>,
    ) -> Book {
        let leases = leases
            .filter_map(|l| {
                let hash: [u8; 32] = l.lease_hash.as_slice().try_into().ok()?;
                let provider = match l.target {
                    Some(pb::lease::Target::Provider(p)) => Some(p.peer_id),
                    _ => None,
                };
                Some((hash, (format!("{}/{}", l.namespace, l.name), provider)))
            })
            .collect();
        Book {
            leases,
            me: me.to_string(),
            forwards,
        }
    }

    /// May a tunnel to `hash` be opened here, and to where?
    pub fn decide(&self, hash: &[u8; 32]) -> Result<Entry, Refusal> {
        let (label, provider) = self.leases.get(hash).ok_or(Refusal::UnknownLease)?;
        if provider.as_deref() != Some(self.me.as_str()) {
            return Err(Refusal::WrongProvider);
        }
        let forward = self
            .forwards
            .by_lease
            .get(label)
            .unwrap_or(&self.forwards.default)
            .clone();
        Ok(Entry {
            label: label.clone(),
            forward,
        })
    }

    /// Leases this agent serves (for logs and metrics).
    pub fn served(&self) -> usize {
        self.leases
            .values()
            .filter(|(_, p)| p.as_deref() == Some(self.me.as_str()))
            .count()
    }
}

/// The book in force and the tunnels it admitted.
#[derive(Default)]
pub struct State {
    pub book: Arc<Book>,
    next: u64,
    live: HashMap<u64, ([u8; 32], CancellationToken)>,
}

impl State {
    /// Decides against the current book and, when allowed, registers the
    /// tunnel: its id (for [`State::end`]) and the token that closes it.
    pub fn admit(
        &mut self,
        hash: &[u8; 32],
        max_tunnels: usize,
    ) -> Result<(u64, Entry, CancellationToken), Refusal> {
        let entry = self.book.decide(hash)?;
        if self.live.len() >= max_tunnels {
            return Err(Refusal::TooManyTunnels);
        }
        self.next += 1;
        let token = CancellationToken::new();
        self.live.insert(self.next, (*hash, token.clone()));
        Ok((self.next, entry, token))
    }

    /// A tunnel ended on its own.
    pub fn end(&mut self, id: u64) {
        self.live.remove(&id);
    }

    /// Puts `book` in force and closes every tunnel it no longer allows;
    /// returns how many.
    pub fn replace(&mut self, book: Arc<Book>) -> usize {
        self.book = book;
        let doomed: HashSet<u64> = self
            .live
            .iter()
            .filter(|(_, (h, _))| self.book.decide(h).is_err())
            .map(|(id, _)| *id)
            .collect();
        for id in &doomed {
            if let Some((_, t)) = self.live.remove(id) {
                t.cancel();
            }
        }
        doomed.len()
    }

    /// Closes every tunnel (shutdown).
    pub fn close_all(&mut self) {
        for (_, (_, t)) in self.live.drain() {
            t.cancel();
        }
    }

    pub fn live(&self) -> usize {
        self.live.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn lease(name: &str, hash: u8, provider: Option<&str>) -> pb::Lease {
        pb::Lease {
            namespace: "default".into(),
            name: name.into(),
            lease_hash: vec![hash; 32],
            target: Some(match provider {
                Some(p) => pb::lease::Target::Provider(pb::Provider {
                    peer_id: p.into(),
                    addresses: vec![],
                }),
                None => pb::lease::Target::Address("10.0.0.1:22".into()),
            }),
            ..Default::default()
        }
    }

    fn snap(leases: Vec<pb::Lease>) -> pb::Snapshot {
        pb::Snapshot {
            leases,
            ..Default::default()
        }
    }

    fn forwards() -> Arc<Forwards> {
        Arc::new(
            Forwards::new(
                "127.0.0.1:22".into(),
                &["default/b=127.0.0.1:2201".to_string()],
            )
            .unwrap(),
        )
    }

    #[test]
    fn decisions() {
        let s = snap(vec![
            lease("a", 1, Some("me")),
            lease("b", 2, Some("me")),
            lease("c", 3, Some("other")),
            lease("d", 4, None),
        ]);
        let book = Book::build(&s, "me", forwards());
        assert_eq!(book.served(), 2);
        assert_eq!(book.decide(&[1; 32]).unwrap().forward, "127.0.0.1:22");
        let b = book.decide(&[2; 32]).unwrap();
        assert_eq!(
            (b.label.as_str(), b.forward.as_str()),
            ("default/b", "127.0.0.1:2201")
        );
        assert_eq!(book.decide(&[3; 32]), Err(Refusal::WrongProvider));
        assert_eq!(book.decide(&[4; 32]), Err(Refusal::WrongProvider));
        assert_eq!(book.decide(&[9; 32]), Err(Refusal::UnknownLease));
    }

    #[test]
    fn bad_overrides_are_named() {
        for bad in ["b=127.0.0.1:1", "default/b", "default/b="] {
            let e = Forwards::new("x".into(), &[bad.to_string()]).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn a_new_book_closes_only_what_it_withdraws() {
        let f = forwards();
        let mut st = State {
            book: Arc::new(Book::build(
                &snap(vec![lease("a", 1, Some("me")), lease("b", 2, Some("me"))]),
                "me",
                f.clone(),
            )),
            ..Default::default()
        };
        let (_, _, ta) = st.admit(&[1; 32], 10).unwrap();
        let (idb, _, tb) = st.admit(&[2; 32], 10).unwrap();
        let (_, _, tb2) = st.admit(&[2; 32], 10).unwrap();
        assert_eq!(st.admit(&[7; 32], 10).unwrap_err(), Refusal::UnknownLease);
        assert_eq!(st.admit(&[1; 32], 3).unwrap_err(), Refusal::TooManyTunnels);
        st.end(idb);
        // a settles (gone from the snapshot); b moves to another provider.
        let closed = st.replace(Arc::new(Book::build(
            &snap(vec![lease("b", 2, Some("other"))]),
            "me",
            f,
        )));
        assert_eq!(closed, 2);
        assert!(ta.is_cancelled() && tb2.is_cancelled());
        assert!(!tb.is_cancelled(), "an ended tunnel is not touched");
        assert_eq!(st.live(), 0);
    }
}
