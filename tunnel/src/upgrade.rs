//! `POST /tunnel/{leaseHash}/tcp` (HTTP upgrade to a raw TCP pipe to the
//! lease's VM) and its two proofs.
//!
//! - `X-Signature: <hex>`: the ed25519 signature of the 32-byte lease hash
//!   by one of the lease's access keys, as existing clients send it. It is
//!   the same bytes every time, so anyone who captures one header (a logging
//!   TLS terminator, a proxy in the path) can replay it for as long as the
//!   key is allowed: it proves possession once, not now.
//! - `Proxy-Authorization: Keyway-SSHSIG …` (see [`crate::proof`]) over the
//!   authority `tunnel/<leaseHash>`: fresh (timestamp window) and single-use
//!   (nonce). The gateway accepts only this one unless started with
//!   `--allow-replayable-upgrade-proofs`.

use ssh_key::{HashAlg, PrivateKey, PublicKey};

use crate::proof::ProofError;

/// The authority a fresh proof for an upgrade signs.
pub fn authority(hash_hex: &str) -> String {
    format!("tunnel/{}", hash_hex.to_ascii_lowercase())
}

/// The path of the endpoint for a lease hash, or the hash in a path.
pub fn parse_path(path: &str) -> Option<[u8; 32]> {
    let hex_hash = path.strip_prefix("/tunnel/")?.strip_suffix("/tcp")?;
    let mut h = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut h).ok()?;
    Some(h)
}

/// Signs the plain (replayable) `X-Signature` with an ed25519 key.
pub fn sign_plain(key: &PrivateKey, hash: &[u8; 32]) -> Option<String> {
    use ed25519_dalek::Signer;
    let kp = key.key_data().ed25519()?;
    let sk = ed25519_dalek::SigningKey::from_bytes(&kp.private.to_bytes());
    Some(hex::encode(sk.sign(hash).to_bytes()))
}

/// Checks a plain `X-Signature` against the lease's keys (OpenSSH lines);
/// returns the fingerprint of the key that signed.
pub fn verify_plain(hash: &[u8; 32], sig_hex: &str, keys: &[String]) -> Result<String, ProofError> {
    use ed25519_dalek::Verifier;
    let mut raw = [0u8; 64];
    hex::decode_to_slice(sig_hex.trim(), &mut raw)
        .map_err(|_| ProofError::Malformed("X-Signature must be 128 hex characters".into()))?;
    let sig = ed25519_dalek::Signature::from_bytes(&raw);
    for line in keys {
        let Ok(key) = PublicKey::from_openssh(line) else {
            continue;
        };
        let Some(vk) = key
            .key_data()
            .ed25519()
            .and_then(|k| ed25519_dalek::VerifyingKey::try_from(k).ok())
        else {
            continue;
        };
        if vk.verify(hash, &sig).is_ok() {
            return Ok(key.fingerprint(HashAlg::Sha256).to_string());
        }
    }
    Err(ProofError::BadSignature)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ssh_key::Algorithm;
    use ssh_key::rand_core::UnwrapErr;

    #[test]
    fn plain_signatures_verify_against_the_lease_keys_only() {
        let k = PrivateKey::random(
            &mut UnwrapErr(ssh_key::getrandom::SysRng),
            Algorithm::Ed25519,
        )
        .unwrap();
        let other = PrivateKey::random(
            &mut UnwrapErr(ssh_key::getrandom::SysRng),
            Algorithm::Ed25519,
        )
        .unwrap();
        let hash = [7u8; 32];
        let sig = sign_plain(&k, &hash).unwrap();
        let keys = vec![k.public_key().to_openssh().unwrap()];
        assert!(verify_plain(&hash, &sig, &keys).is_ok());
        assert_eq!(
            verify_plain(&[8u8; 32], &sig, &keys),
            Err(ProofError::BadSignature)
        );
        let bad = sign_plain(&other, &hash).unwrap();
        assert_eq!(
            verify_plain(&hash, &bad, &keys),
            Err(ProofError::BadSignature)
        );
        assert!(matches!(
            verify_plain(&hash, "zz", &keys),
            Err(ProofError::Malformed(_))
        ));
        let path = format!("/tunnel/{}/tcp", hex::encode(hash));
        assert_eq!(parse_path(&path), Some(hash));
        assert_eq!(parse_path("/tunnel/abc/tcp"), None);
    }
}
