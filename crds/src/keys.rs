//! Public keys as users type them: OpenSSH lines (`ssh-ed25519 AAAA… comment`)
//! or a bare 64-hex raw ed25519 key. Parsing is the `ssh-key` crate's; this module
//! only normalizes and reports errors people can act on. Also the one PKCS#8
//! reader the operator and the proxy share for keys Helm generates.

use ssh_key::{HashAlg, PublicKey, public::Ed25519PublicKey};

/// A parsed, normalized access key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessKey {
    /// The parsed key.
    pub key: PublicKey,
    /// Canonical OpenSSH line without the comment (`ssh-ed25519 AAAA…`).
    pub openssh: String,
    /// OpenSSH SHA-256 fingerprint (`SHA256:…`).
    pub fingerprint: String,
}

/// Why a key line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Nothing but whitespace.
    #[error("empty public key")]
    Empty,
    /// A private key was pasted where a public key belongs.
    #[error("this is a private key; paste the public key (the .pub file) instead")]
    PrivateKey,
    /// A certificate line; leases take plain keys.
    #[error("certificates are not accepted here; give the plain public key")]
    Certificate,
    /// Not something `ssh-key` could parse.
    #[error(
        "not an OpenSSH public key line (\"ssh-ed25519 AAAA… comment\") or 64 hex characters: {0}"
    )]
    Invalid(String),
}

impl AccessKey {
    /// Parses one key line.
    pub fn parse(line: &str) -> Result<Self, KeyError> {
        let line = line.trim();
        if line.is_empty() {
            return Err(KeyError::Empty);
        }
        if line.contains("PRIVATE KEY") {
            return Err(KeyError::PrivateKey);
        }
        let key = if line.len() == 64 && line.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut raw = [0u8; 32];
            hex::decode_to_slice(line, &mut raw).map_err(|e| KeyError::Invalid(e.to_string()))?;
            PublicKey::from(Ed25519PublicKey(raw))
        } else {
            let algo = line.split_whitespace().next().unwrap_or_default();
            if algo.contains("-cert-v01@openssh.com") {
                return Err(KeyError::Certificate);
            }
            PublicKey::from_openssh(line).map_err(|e| KeyError::Invalid(e.to_string()))?
        };
        Self::from_key(key)
    }

    /// Normalizes an already parsed key (drops its comment).
    pub fn from_key(mut key: PublicKey) -> Result<Self, KeyError> {
        key.set_comment("");
        let openssh = key
            .to_openssh()
            .map_err(|e| KeyError::Invalid(e.to_string()))?
            .trim()
            .to_string();
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        Ok(AccessKey {
            key,
            openssh,
            fingerprint,
        })
    }
}

/// The PEM label of a PKCS#8 private key.
pub const PKCS8_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";

/// An ed25519 private key in PKCS#8 PEM (RFC 8410), as `openssl genpkey
/// -algorithm ed25519` and Helm's `genPrivateKey "ed25519"` write it, as an
/// OpenSSH key. Decoding is ed25519-dalek's (`pkcs8`); other algorithms are
/// refused with a message that says so.
pub fn ed25519_from_pkcs8_pem(pem: &str) -> Result<ssh_key::PrivateKey, String> {
    use ed25519_dalek::pkcs8::{self, DecodePrivateKey};
    let key = ed25519_dalek::SigningKey::from_pkcs8_pem(pem.trim()).map_err(|e| match e {
        pkcs8::Error::PublicKey(_) | pkcs8::Error::ParametersMalformed => {
            format!("only ed25519 keys are supported in PKCS#8 ({e})")
        }
        e => format!("not a PKCS#8 ed25519 private key: {e}"),
    })?;
    Ok(ssh_key::PrivateKey::from(
        ssh_key::private::Ed25519Keypair::from_seed(&key.to_bytes()),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKKoNs9XCkg70lxMPr+Kwva+cmXzf8/12/Srx2GyMdae alice@laptop";

    #[test]
    fn openssh_line_is_normalized() {
        let k = AccessKey::parse(&format!("  {ED}\n")).unwrap();
        assert!(k.openssh.starts_with("ssh-ed25519 AAAA"));
        assert!(!k.openssh.contains("alice"));
        assert!(k.fingerprint.starts_with("SHA256:"));
    }

    #[test]
    fn bare_hex_equals_openssh_form() {
        let k = AccessKey::parse(ED).unwrap();
        let raw = k.key.key_data().ed25519().unwrap().0;
        let from_hex = AccessKey::parse(&hex::encode(raw)).unwrap();
        assert_eq!(from_hex.openssh, k.openssh);
        assert_eq!(from_hex.fingerprint, k.fingerprint);
        let upper = AccessKey::parse(&hex::encode_upper(raw)).unwrap();
        assert_eq!(upper.fingerprint, k.fingerprint);
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        assert_eq!(AccessKey::parse(" "), Err(KeyError::Empty));
        assert!(matches!(
            AccessKey::parse("ssh-ed25519 AAAAnotbase64!!"),
            Err(KeyError::Invalid(_))
        ));
        assert!(matches!(
            AccessKey::parse("-----BEGIN OPENSSH PRIVATE KEY-----"),
            Err(KeyError::PrivateKey)
        ));
        assert!(matches!(
            AccessKey::parse("ssh-ed25519-cert-v01@openssh.com AAAA x"),
            Err(KeyError::Certificate)
        ));
        // 63 hex characters is neither form.
        assert!(AccessKey::parse(&"a".repeat(63)).is_err());
    }
}
