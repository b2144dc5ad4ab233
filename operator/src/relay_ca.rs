//! The relay CA's public key, from whatever file the operator is given: the
//! CA's `.pub` line, its OpenSSH private key, or its ed25519 private key in
//! PKCS#8 PEM (what the Helm chart generates with `genPrivateKey "ed25519"`,
//! and `openssl genpkey -algorithm ed25519` writes). keyway-proxy reads the
//! same formats for the signing side (proxy/src/keys.rs).

use anyhow::{Context, Result};
use keyway_crds::keys::{PKCS8_BEGIN, ed25519_from_pkcs8_pem};
use ssh_key::PublicKey;

/// The public key in `text` (a public key line or a private key file).
pub fn public_key(text: &str) -> Result<PublicKey> {
    if let Ok(p) = PublicKey::from_openssh(text.trim()) {
        return Ok(p);
    }
    if text.trim_start().starts_with(PKCS8_BEGIN) {
        return ed25519_from_pkcs8_pem(text)
            .map(|k| k.public_key().clone())
            .map_err(|e| anyhow::anyhow!("not an ed25519 private key in PKCS#8 PEM: {e}"));
    }
    let key = ssh_key::PrivateKey::from_openssh(text.as_bytes())
        .context("neither an OpenSSH public nor private key, nor PKCS#8 ed25519")?;
    Ok(key.public_key().clone())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `openssl genpkey -algorithm ed25519` and its public key in OpenSSH form.
    const PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIM81vAM71wwuOhxKlEIY8pzLcMiTltAtCvSt//qA3XeD
-----END PRIVATE KEY-----
";
    const PUBLIC: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPZyyumpsxK6z71L+ni2NLX5QCKZE4X4A2dS6ho7hgVq";

    #[test]
    fn every_accepted_format_gives_the_same_public_key() {
        let p = public_key(PKCS8).unwrap();
        assert_eq!(p.to_openssh().unwrap(), PUBLIC);
        assert_eq!(public_key(PUBLIC).unwrap().key_data(), p.key_data());
        let key = ssh_key::PrivateKey::random(
            &mut ssh_key::rand_core::UnwrapErr(ssh_key::getrandom::SysRng),
            ssh_key::Algorithm::Ed25519,
        )
        .unwrap();
        let text = key.to_openssh(ssh_key::LineEnding::LF).unwrap();
        assert_eq!(
            public_key(&text).unwrap().key_data(),
            key.public_key().key_data()
        );
    }

    #[test]
    fn other_keys_and_garbage_are_refused() {
        // EC P-256 in PKCS#8 (openssl genpkey -algorithm ec).
        let p256 = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg4uXOb80ZSTsV/mU7
kvl1x0luCccNDTW76Ii889PTG+ShRANCAASC4osH3NARFEebV+ZWTRYNx5a3rjII
tZgKTiljhI2yq0uMqJnw8z+wuhyeh5Wox+FE6hfciW8YtDd7Y7kaF9oE
-----END PRIVATE KEY-----
";
        let e = public_key(p256).unwrap_err();
        assert!(format!("{e:#}").contains("only ed25519"), "{e:#}");
        for garbage in [
            "",
            "hello",
            "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n",
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIM81\n-----END PRIVATE KEY-----\n",
        ] {
            assert!(public_key(garbage).is_err(), "{garbage:?}");
        }
    }
}
