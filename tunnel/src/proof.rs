//! Proof of key possession for HTTP CONNECT (`keyway tcp`).
//!
//! A route with `allowPublicKeys` admits a CONNECT only from a client that
//! holds one of those keys. The client sends
//!
//! ```text
//! Proxy-Authorization: Keyway-SSHSIG ts=<unix seconds>,nonce=<32 hex>,sig=<hex>
//! ```
//!
//! where `sig` is an OpenSSH signature (the `ssh-keygen -Y sign` format,
//! namespace [`NAMESPACE`]) over [`message`]: the protocol tag, the CONNECT
//! authority, the timestamp and the nonce. The signature carries the public
//! key; the gateway checks its fingerprint against the route, the signature,
//! that the timestamp is within [`FRESHNESS_SECS`] of its clock, and that the
//! nonce was not used before within that window ([`ReplayCache`]). Binding
//! the authority stops a proof for one route being used on another; the
//! window and the nonce stop a captured proof being replayed (TLS hides it
//! on the wire anyway).

use std::collections::{HashMap, HashSet, VecDeque};

use ssh_key::{HashAlg, PrivateKey, PublicKey, SshSig};

/// The sshsig namespace of CONNECT proofs.
pub const NAMESPACE: &str = "keyway-connect";
/// The authorization scheme name.
pub const SCHEME: &str = "Keyway-SSHSIG";
/// How far a proof's timestamp may be from the gateway's clock.
pub const FRESHNESS_SECS: u64 = 120;

/// Seconds since the Unix epoch (0 if the clock is before it), the clock
/// proofs are made and checked with.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What is signed.
pub fn message(authority: &str, ts: u64, nonce: &str) -> Vec<u8> {
    format!("keyway-connect-v1\n{authority}\n{ts}\n{nonce}\n").into_bytes()
}

/// Why a proof is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProofError {
    /// No or another scheme.
    #[error("expected `Proxy-Authorization: {SCHEME} ts=…,nonce=…,sig=…`")]
    Missing,
    /// Unparseable.
    #[error("malformed proof: {0}")]
    Malformed(String),
    /// Too old or in the future.
    #[error("proof timestamp outside the {FRESHNESS_SECS} s window (check the client's clock)")]
    Stale,
    /// Seen before.
    #[error("proof replayed")]
    Replayed,
    /// The key is not allowed here, or nothing is routed here: the gateway
    /// answers both alike (no oracle for which routes exist).
    #[error("key {0} is not allowed on this route (or no route has this name)")]
    KeyNotAllowed(String),
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
}

/// A parsed proof.
#[derive(Debug, Clone)]
pub struct Proof {
    /// Unix seconds.
    pub ts: u64,
    /// Hex nonce.
    pub nonce: String,
    /// The signature (with the signer's public key).
    pub sig: SshSig,
}

/// The hash algorithm proofs are made with.
pub const HASH: HashAlg = HashAlg::Sha512;

/// A fresh random nonce.
pub fn nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Builds the header value: signs `authority` with `key` at `ts`.
pub fn sign(key: &PrivateKey, authority: &str, ts: u64) -> Result<String, ssh_key::Error> {
    let nonce = nonce();
    let sig = key.sign(NAMESPACE, HASH, &message(authority, ts, &nonce))?;
    header(ts, &nonce, &sig)
}

/// The bytes an ssh-agent must sign for a proof (then [`from_agent`]).
pub fn agent_data(authority: &str, ts: u64, nonce: &str) -> Result<Vec<u8>, ssh_key::Error> {
    SshSig::signed_data(NAMESPACE, HASH, &message(authority, ts, nonce))
}

/// The header value from a signature an ssh-agent made over [`agent_data`].
pub fn from_agent(
    public: &PublicKey,
    ts: u64,
    nonce: &str,
    signature: ssh_key::Signature,
) -> Result<String, ssh_key::Error> {
    let sig = SshSig::new(public.key_data().clone(), NAMESPACE, HASH, signature)?;
    header(ts, nonce, &sig)
}

fn header(ts: u64, nonce: &str, sig: &SshSig) -> Result<String, ssh_key::Error> {
    let bytes = ssh_key::encoding::Encode::encode_vec(sig)?;
    Ok(format!(
        "{SCHEME} ts={ts},nonce={nonce},sig={}",
        hex::encode(bytes)
    ))
}

/// Parses a `Proxy-Authorization` value.
pub fn parse(value: &str) -> Result<Proof, ProofError> {
    let rest = value
        .trim()
        .strip_prefix(SCHEME)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or(ProofError::Missing)?;
    let mut fields: HashMap<&str, &str> = HashMap::new();
    for kv in rest.split(',') {
        let (k, v) = kv
            .trim()
            .split_once('=')
            .ok_or_else(|| ProofError::Malformed(format!("{kv:?} is not key=value")))?;
        fields.insert(k, v);
    }
    let get = |k: &str| {
        fields
            .get(k)
            .copied()
            .ok_or_else(|| ProofError::Malformed(format!("no {k}")))
    };
    let ts = get("ts")?
        .parse::<u64>()
        .map_err(|_| ProofError::Malformed("ts is not a number".into()))?;
    let nonce = get("nonce")?;
    if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ProofError::Malformed(
            "nonce must be 32 hex characters".into(),
        ));
    }
    let raw = hex::decode(get("sig")?).map_err(|e| ProofError::Malformed(format!("sig: {e}")))?;
    let sig = <SshSig as ssh_key::encoding::Decode>::decode(&mut raw.as_slice())
        .map_err(|e| ProofError::Malformed(format!("sig: {e}")))?;
    Ok(Proof {
        ts,
        nonce: nonce.to_ascii_lowercase(),
        sig,
    })
}

/// Checks `proof` for `authority` at `now`: fresh, valid signature, allowed
/// key, not replayed. Returns the key's SHA-256 fingerprint.
///
/// The signature is checked before the key is looked up in `allowed`, so
/// the work done does not depend on whether `allowed` names the key: the
/// gateway passes an empty set for an authority nothing routes, and a
/// prober timing the answer cannot tell that apart from a route the key is
/// not on, nor from a route it is on (its signature failing).
pub fn verify(
    proof: &Proof,
    authority: &str,
    now: u64,
    allowed: &HashSet<String>,
    replay: &mut ReplayCache,
) -> Result<String, ProofError> {
    if proof.ts.abs_diff(now) > FRESHNESS_SECS {
        return Err(ProofError::Stale);
    }
    let key = PublicKey::from(proof.sig.public_key().clone());
    key.verify(
        NAMESPACE,
        &message(authority, proof.ts, &proof.nonce),
        &proof.sig,
    )
    .map_err(|_| ProofError::BadSignature)?;
    let fp = key.fingerprint(HashAlg::Sha256).to_string();
    if !allowed.contains(&fp) {
        return Err(ProofError::KeyNotAllowed(fp));
    }
    if !replay.insert(&proof.nonce, now) {
        return Err(ProofError::Replayed);
    }
    Ok(fp)
}

/// Nonces seen within the freshness window (bounded: past `cap` the oldest
/// are forgotten early, which only narrows replay protection under a flood
/// of *valid* proofs).
#[derive(Debug)]
pub struct ReplayCache {
    seen: HashSet<String>,
    order: VecDeque<(u64, String)>,
    cap: usize,
}

impl ReplayCache {
    /// At most `cap` nonces.
    pub fn new(cap: usize) -> Self {
        ReplayCache {
            seen: HashSet::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// Records `nonce`; false when it was seen within the window.
    pub fn insert(&mut self, nonce: &str, now: u64) -> bool {
        while let Some((t, _)) = self.order.front() {
            if *t + 2 * FRESHNESS_SECS < now || self.order.len() >= self.cap {
                if let Some((_, n)) = self.order.pop_front() {
                    self.seen.remove(&n);
                }
            } else {
                break;
            }
        }
        if !self.seen.insert(nonce.to_string()) {
            return false;
        }
        self.order.push_back((now, nonce.to_string()));
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ssh_key::Algorithm;
    use ssh_key::rand_core::UnwrapErr;

    fn key() -> PrivateKey {
        PrivateKey::random(
            &mut UnwrapErr(ssh_key::getrandom::SysRng),
            Algorithm::Ed25519,
        )
        .unwrap()
    }

    #[test]
    fn a_fresh_proof_by_an_allowed_key_passes_once() {
        let k = key();
        let fp = k.public_key().fingerprint(HashAlg::Sha256).to_string();
        let allowed = HashSet::from([fp.clone()]);
        let header = sign(&k, "vm.example:22", 1000).unwrap();
        let proof = parse(&header).unwrap();
        let mut cache = ReplayCache::new(100);
        assert_eq!(
            verify(&proof, "vm.example:22", 1010, &allowed, &mut cache),
            Ok(fp)
        );
        assert_eq!(
            verify(&proof, "vm.example:22", 1011, &allowed, &mut cache),
            Err(ProofError::Replayed)
        );
    }

    #[test]
    fn wrong_authority_key_time_or_format_fail() {
        let k = key();
        let fp = k.public_key().fingerprint(HashAlg::Sha256).to_string();
        let allowed = HashSet::from([fp]);
        let mut cache = ReplayCache::new(100);
        let proof = parse(&sign(&k, "a:22", 1000).unwrap()).unwrap();
        assert_eq!(
            verify(&proof, "b:22", 1000, &allowed, &mut cache),
            Err(ProofError::BadSignature)
        );
        assert_eq!(
            verify(
                &proof,
                "a:22",
                1000 + FRESHNESS_SECS + 1,
                &allowed,
                &mut cache
            ),
            Err(ProofError::Stale)
        );
        let other = parse(&sign(&key(), "a:22", 1000).unwrap()).unwrap();
        assert!(matches!(
            verify(&other, "a:22", 1000, &allowed, &mut cache),
            Err(ProofError::KeyNotAllowed(_))
        ));
        // Nothing allowed (an authority nothing routes): the same refusal
        // for a good signature, and a bad one is found first either way.
        let none = HashSet::new();
        assert!(matches!(
            verify(&proof, "a:22", 1000, &none, &mut cache),
            Err(ProofError::KeyNotAllowed(_))
        ));
        assert_eq!(
            verify(&proof, "b:22", 1000, &none, &mut cache),
            Err(ProofError::BadSignature)
        );
        assert_eq!(parse("Basic abc").unwrap_err(), ProofError::Missing);
        assert!(matches!(
            parse("Keyway-SSHSIG ts=1,nonce=zz,sig=00"),
            Err(ProofError::Malformed(_))
        ));
        assert!(matches!(
            parse(&format!(
                "Keyway-SSHSIG ts=1,nonce={},sig=0011",
                "a".repeat(32)
            )),
            Err(ProofError::Malformed(_))
        ));
    }

    #[test]
    fn the_replay_cache_forgets_after_the_window_and_stays_bounded() {
        let mut c = ReplayCache::new(3);
        assert!(c.insert("n1", 0));
        assert!(!c.insert("n1", 1));
        assert!(c.insert("n1", 2 * FRESHNESS_SECS + 1));
        for i in 0..10 {
            assert!(c.insert(&format!("x{i}"), 500));
        }
        assert!(c.order.len() <= 3);
    }
}
