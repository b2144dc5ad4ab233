//! Local mode's secrets under `DIR/.keyway/`, made on first run: the token
//! snapshot subscribers present and the relay CA. (The state database and the
//! other files are the `keyway-state` crate's.)

use std::path::Path;

use anyhow::{Context, Result, bail};
use keyway_state::write_atomic;

/// Reads the snapshot token, creating a random one on first run.
pub fn load_or_create_token(path: &Path) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => bail!("{} is empty; delete it to get a new token", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    write_atomic(path, format!("{token}\n").as_bytes(), 0o600)?;
    Ok(token)
}

/// Reads the relay CA (OpenSSH, or ed25519 in PKCS#8 PEM), creating an
/// ed25519 one on first run. Returns its public key as an OpenSSH line.
pub fn load_or_create_relay_ca(path: &Path) -> Result<String> {
    use ssh_key::{Algorithm, LineEnding, PrivateKey, getrandom::SysRng, rand_core::UnwrapErr};
    let key = match std::fs::read_to_string(path) {
        Ok(text) => {
            let public = crate::relay_ca::public_key(&text)
                .with_context(|| format!("the relay CA {}", path.display()))?;
            return trust_line(&public);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = PrivateKey::random(&mut UnwrapErr(SysRng), Algorithm::Ed25519)
                .context("generating the relay CA")?;
            key.set_comment("keyway-relay-ca");
            let pem = key
                .to_openssh(LineEnding::LF)
                .context("encoding the relay CA")?;
            write_atomic(path, pem.as_bytes(), 0o600)?;
            let public = key
                .public_key()
                .to_openssh()
                .context("encoding the relay CA")?;
            write_atomic(
                &path.with_extension("pub"),
                format!("{public}\n").as_bytes(),
                0o644,
            )?;
            key
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    trust_line(key.public_key())
}

/// The relay CA's public key as the bare OpenSSH line (no comment) that
/// goes into `status.relayTrust`.
pub fn trust_line(public: &ssh_key::PublicKey) -> Result<String> {
    let mut public = public.clone();
    public.set_comment("");
    Ok(public
        .to_openssh()
        .context("encoding the relay CA")?
        .trim()
        .to_string())
}
