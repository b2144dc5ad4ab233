//! The relay CA's public key, from whatever file the operator is given: the
//! CA's `.pub` line, its OpenSSH private key, or its ed25519 private key in
//! PKCS#8 PEM (what the Helm chart generates with `genPrivateKey "ed25519"`,
//! and `openssl genpkey -algorithm ed25519` writes). keyway-proxy reads the
//! same formats for the signing side (proxy/src/keys.rs).

use anyhow::{Context, Result, bail};
use ssh_key::PublicKey;

const PKCS8_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PKCS8_END: &str = "-----END PRIVATE KEY-----";

/// The public key in `text` (a public key line or a private key file).
pub fn public_key(text: &str) -> Result<PublicKey> {
    if let Ok(p) = PublicKey::from_openssh(text.trim()) {
        return Ok(p);
    }
    if text.trim_start().starts_with(PKCS8_BEGIN) {
        return pkcs8_ed25519_public(text).context("not an ed25519 private key in PKCS#8 PEM");
    }
    let key = ssh_key::PrivateKey::from_openssh(text.as_bytes())
        .context("neither an OpenSSH public nor private key, nor PKCS#8 ed25519")?;
    Ok(key.public_key().clone())
}

/// The public half of an ed25519 key in PKCS#8 PEM (RFC 8410; the optional
/// public key of PKCS#8 v2 is ignored and derived from the seed instead).
fn pkcs8_ed25519_public(pem: &str) -> Result<PublicKey> {
    use ssh_key::encoding::base64::{Base64, Encoding};
    let body = pem
        .trim()
        .strip_prefix(PKCS8_BEGIN)
        .and_then(|b| b.strip_suffix(PKCS8_END))
        .context("no PRIVATE KEY PEM block")?;
    let b64: String = body.split_whitespace().collect();
    let der = Base64::decode_vec(&b64).map_err(|e| anyhow::anyhow!("bad base64: {e}"))?;
    let seed = seed(&der)?;
    let pair = ssh_key::private::Ed25519Keypair::from_seed(&seed);
    Ok(PublicKey::from(ssh_key::public::Ed25519PublicKey::from(
        pair,
    )))
}

/// One DER element: (tag, contents, rest). Lengths up to two bytes.
fn element(b: &[u8]) -> Result<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first().context("truncated DER")?;
    let (&len, mut b) = b.split_first().context("truncated DER")?;
    let len = if len < 0x80 {
        usize::from(len)
    } else {
        let n = usize::from(len & 0x7f);
        if n == 0 || n > 2 || b.len() < n {
            bail!("unsupported DER length");
        }
        let (l, rest) = b.split_at(n);
        b = rest;
        l.iter().fold(0, |acc, &x| (acc << 8) | usize::from(x))
    };
    if b.len() < len {
        bail!("truncated DER");
    }
    let (contents, rest) = b.split_at(len);
    Ok((tag, contents, rest))
}

/// The seed of a OneAsymmetricKey whose algorithm is Ed25519 (1.3.101.112).
fn seed(der: &[u8]) -> Result<[u8; 32]> {
    let (tag, info, _) = element(der)?;
    if tag != 0x30 {
        bail!("not a PKCS#8 structure");
    }
    let (tag, version, rest) = element(info)?;
    if tag != 0x02 || !(version == [0] || version == [1]) {
        bail!("unknown PKCS#8 version");
    }
    let (tag, algorithm, rest) = element(rest)?;
    let (oid_tag, oid, params) = element(algorithm)?;
    if tag != 0x30 || oid_tag != 0x06 || oid != [0x2b, 0x65, 0x70] || !params.is_empty() {
        bail!("not an ed25519 key (only ed25519 is supported)");
    }
    let (tag, private, _) = element(rest)?;
    let (inner, seed, trailing) = element(private)?;
    if tag != 0x04 || inner != 0x04 || !trailing.is_empty() {
        bail!("malformed ed25519 private key");
    }
    seed.try_into()
        .map_err(|_| anyhow::anyhow!("an ed25519 seed has 32 bytes, not {}", seed.len()))
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
