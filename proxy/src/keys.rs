//! Key material: the gateway's host key and the relay CA's user certificates.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use keyway_crds::keys::{PKCS8_BEGIN, ed25519_from_pkcs8_pem};
use ssh_key::certificate::{Builder, CertType};
use ssh_key::getrandom::SysRng;
use ssh_key::rand_core::UnwrapErr;
use ssh_key::{Algorithm, Certificate, HashAlg, LineEnding, PrivateKey};

/// Loads the Ed25519 host key at `path`, creating it on first run.
///
/// Creation links a fully written temporary file into place, so replicas that
/// start together on a shared volume all end up with the same key: whoever
/// links first wins and the others read the winner's file.
pub fn load_or_create_host_key(path: &Path) -> Result<PrivateKey> {
    match std::fs::read_to_string(path) {
        Ok(pem) => return parse_private(path, &pem),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("reading the host key {}", path.display()));
        }
    }
    let mut key = PrivateKey::random(&mut UnwrapErr(SysRng), Algorithm::Ed25519)
        .context("generating the host key")?;
    key.set_comment("keyway-proxy host key");
    let pem = key
        .to_openssh(LineEnding::LF)
        .context("encoding the host key")?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile_in(dir)?;
    tmp.1
        .write_all(pem.as_bytes())
        .context("writing the host key")?;
    tmp.1.sync_all().context("writing the host key")?;
    let linked = std::fs::hard_link(&tmp.0, path);
    let _ = std::fs::remove_file(&tmp.0);
    match linked {
        Ok(()) => {
            if let Ok(public) = key.public_key().to_openssh() {
                let _ = std::fs::write(path.with_extension("pub"), format!("{public}\n"));
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading the host key {}", path.display()))?;
            parse_private(path, &pem)
        }
        Err(e) => Err(e).with_context(|| format!("writing the host key {}", path.display())),
    }
}

fn tempfile_in(dir: &Path) -> Result<(std::path::PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join(format!(".keyway-host-key.{}.tmp", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| format!("creating {}", p.display()))?;
    Ok((p, f))
}

fn parse_private(path: &Path, pem: &str) -> Result<PrivateKey> {
    if pem.trim_start().starts_with(PKCS8_BEGIN) {
        // Helm's genPrivateKey "ed25519" writes PKCS#8 (the chart's Secrets).
        return ed25519_from_pkcs8_pem(pem).map_err(|e| {
            anyhow::anyhow!(
                "{} is not an ed25519 private key in PKCS#8 PEM: {e}",
                path.display()
            )
        });
    }
    let key = PrivateKey::from_openssh(pem.as_bytes())
        .with_context(|| format!("{} is not an OpenSSH private key", path.display()))?;
    if key.is_encrypted() {
        bail!(
            "{} is passphrase-protected; the gateway needs it unencrypted",
            path.display()
        );
    }
    Ok(key)
}

/// Loads the relay CA's private key: OpenSSH format, or ed25519 in PKCS#8 PEM.
pub fn load_private(path: &Path) -> Result<PrivateKey> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("reading the relay CA key {}", path.display()))?;
    parse_private(path, &pem)
}

/// Mints short-lived user certificates for upstream logins.
pub struct RelayIssuer {
    ca: PrivateKey,
    ca_public: String,
    /// One key per process: certificates are what is short-lived.
    key: std::sync::Arc<PrivateKey>,
}

impl RelayIssuer {
    pub fn new(ca: PrivateKey) -> Result<Self> {
        let mut public = ca.public_key().clone();
        public.set_comment("");
        let ca_public = public
            .to_openssh()
            .context("encoding the relay CA public key")?
            .trim()
            .to_string();
        let key = PrivateKey::random(&mut UnwrapErr(SysRng), Algorithm::Ed25519)
            .context("generating the relay login key")?;
        Ok(RelayIssuer {
            ca,
            ca_public,
            key: std::sync::Arc::new(key),
        })
    }

    /// The CA's public key line (no comment), as the snapshot carries it.
    pub fn ca_public(&self) -> &str {
        &self.ca_public
    }

    /// The key certificates are issued for.
    pub fn key(&self) -> std::sync::Arc<PrivateKey> {
        self.key.clone()
    }

    /// A certificate for `principal`, valid from a minute ago (clock skew)
    /// for `validity_secs`.
    pub fn issue(&self, principal: &str, key_id: &str, validity_secs: u64) -> Result<Certificate> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_secs();
        let mut b = Builder::new_with_random_nonce(
            &mut UnwrapErr(SysRng),
            self.key.public_key().key_data().clone(),
            now.saturating_sub(60),
            now + validity_secs.max(1),
        )
        .context("starting a relay certificate")?;
        b.cert_type(CertType::User)?
            .key_id(key_id)?
            .valid_principal(principal)?
            .serial(rand::random())?;
        for ext in [
            "permit-pty",
            "permit-port-forwarding",
            "permit-agent-forwarding",
            "permit-user-rc",
            "permit-X11-forwarding",
        ] {
            b.extension(ext, "")?;
        }
        b.sign(&self.ca).context("signing a relay certificate")
    }
}

/// OpenSSH SHA-256 fingerprint text, as the snapshot carries it.
pub fn fingerprint(key: &ssh_key::PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn host_key_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/host_key");
        let a = load_or_create_host_key(&p).unwrap();
        let b = load_or_create_host_key(&p).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        std::fs::write(&p, "garbage").unwrap();
        let e = load_or_create_host_key(&p).unwrap_err();
        assert!(format!("{e:#}").contains("not an OpenSSH private key"));
    }

    /// `openssl genpkey -algorithm ed25519` output and the public key
    /// `ssh-keygen -y` derives from it (the same format Helm's
    /// `genPrivateKey "ed25519"` writes).
    const PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIM81vAM71wwuOhxKlEIY8pzLcMiTltAtCvSt//qA3XeD
-----END PRIVATE KEY-----
";
    const PKCS8_PUBLIC: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPZyyumpsxK6z71L+ni2NLX5QCKZE4X4A2dS6ho7hgVq";

    #[test]
    fn pkcs8_ed25519_keys_are_read_as_host_key_and_relay_ca() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("host_key");
        std::fs::write(&p, PKCS8).unwrap();
        let host = load_or_create_host_key(&p).unwrap();
        let mut public = host.public_key().clone();
        public.set_comment("");
        assert_eq!(public.to_openssh().unwrap(), PKCS8_PUBLIC);
        // The file is used as it is, not replaced.
        assert_eq!(std::fs::read_to_string(&p).unwrap(), PKCS8);
        let ca = load_private(&p).unwrap();
        assert_eq!(ca.public_key().key_data(), host.public_key().key_data());
        // It signs relay certificates like an OpenSSH CA key.
        let issuer = RelayIssuer::new(ca).unwrap();
        assert_eq!(issuer.ca_public(), PKCS8_PUBLIC);
        let cert = issuer.issue("keyway-lease-abc", "test", 300).unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        cert.validate_at(now, [&host.public_key().fingerprint(HashAlg::Sha256)])
            .unwrap();
    }

    #[test]
    fn other_pkcs8_keys_are_refused_with_the_reason() {
        // An EC P-256 key in PKCS#8 (openssl genpkey -algorithm ec).
        let p256 = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg4uXOb80ZSTsV/mU7
kvl1x0luCccNDTW76Ii889PTG+ShRANCAASC4osH3NARFEebV+ZWTRYNx5a3rjII
tZgKTiljhI2yq0uMqJnw8z+wuhyeh5Wox+FE6hfciW8YtDd7Y7kaF9oE
-----END PRIVATE KEY-----
";
        let e = ed25519_from_pkcs8_pem(p256).unwrap_err();
        assert!(format!("{e:#}").contains("only ed25519"), "{e:#}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, p256).unwrap();
        let e = load_private(&p).unwrap_err();
        assert!(format!("{e:#}").contains("PKCS#8"), "{e:#}");
        for garbage in [
            "-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n",
            "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n",
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIEFTA7ZRDvsXtdds\n-----END PRIVATE KEY-----\n",
        ] {
            assert!(ed25519_from_pkcs8_pem(garbage).is_err(), "{garbage}");
        }
    }

    #[test]
    fn certificates_name_the_principal_and_verify_against_the_ca() {
        let ca = PrivateKey::random(&mut UnwrapErr(SysRng), Algorithm::Ed25519).unwrap();
        let issuer = RelayIssuer::new(ca.clone()).unwrap();
        let cert = issuer.issue("keyway-lease-abc", "test", 300).unwrap();
        assert_eq!(cert.valid_principals(), ["keyway-lease-abc".to_string()]);
        let fp = ca.public_key().fingerprint(HashAlg::Sha256);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        cert.validate_at(now, [&fp]).unwrap();
        assert!(cert.validate_at(now + 400, [&fp]).is_err());
        assert!(issuer.ca_public().starts_with("ssh-ed25519 "));
    }
}
