//! `keyway tcp`: HTTP CONNECT over TLS to the gateway, then a byte pipe.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// What `keyway tcp` was asked to do.
pub struct Options {
    pub target: String,
    pub listen: String,
    pub url: url::Url,
    pub ca: Option<PathBuf>,
    pub identity: Option<PathBuf>,
}

/// A response head larger than this is not a gateway's.
const MAX_HEAD: usize = 16 * 1024;

pub async fn run(opts: Options) -> Result<()> {
    if opts.url.scheme() != "https" {
        bail!("--url must be https:// (got {})", opts.url);
    }
    if !opts.target.contains(':') {
        bail!("the target must be HOST:PORT (got {:?})", opts.target);
    }
    let key = signer(opts.identity.as_deref())?;
    let tls = tls_config(opts.ca.as_deref())?;
    let ctx = Arc::new((opts, key, tls));
    if ctx.0.listen == "-" {
        let stream = open(&ctx.0, ctx.1.as_ref(), ctx.2.clone()).await?;
        let mut stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
        pipe(stream, &mut stdio).await;
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(&ctx.0.listen)
        .await
        .with_context(|| format!("listening on {}", ctx.0.listen))?;
    eprintln!(
        "keyway: tunnelling {} → {} via {}",
        ctx.0.listen, ctx.0.target, ctx.0.url
    );
    loop {
        let (mut local, _) = listener.accept().await.context("accepting")?;
        let ctx = ctx.clone();
        tokio::spawn(async move {
            match open(&ctx.0, ctx.1.as_ref(), ctx.2.clone()).await {
                Ok(stream) => pipe(stream, &mut local).await,
                Err(e) => eprintln!("keyway: {e:#}"),
            }
        });
    }
}

/// Pipes `tunnel` and `local` both ways. Ends when the gateway side ends (the
/// backend closed, or the route was withdrawn): a ProxyCommand must exit then,
/// not wait for ssh to close stdin.
async fn pipe<A, B>(tunnel: A, local: &mut B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut tr, mut tw) = tokio::io::split(tunnel);
    let (mut lr, mut lw) = tokio::io::split(local);
    let up = async {
        let _ = tokio::io::copy(&mut lr, &mut tw).await;
        let _ = tw.shutdown().await;
        // Local EOF: keep reading what the backend still sends.
        std::future::pending::<()>().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut tr, &mut lw).await;
        let _ = lw.flush().await;
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

fn tls_config(ca: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let Some(ca) = ca else {
        bail!("--ca FILE is needed to verify the gateway's certificate");
    };
    for cert in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))?
    {
        let cert = cert.with_context(|| format!("parsing {}", ca.display()))?;
        roots.add(cert).context("adding the CA certificate")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Connects, sends CONNECT, and returns the tunnel once the gateway said 200.
/// How proofs are signed.
enum Signer {
    /// An unencrypted private key file.
    File(Box<ssh_key::PrivateKey>),
    /// The ssh-agent at `$SSH_AUTH_SOCK`, with this public key (or its first
    /// identity when `None`).
    Agent(Option<ssh_key::PublicKey>),
}

/// `-i FILE`: a private key signs locally; a public key (`.pub`), or a
/// private key that is encrypted, signs through the ssh-agent. No `-i`: the
/// agent's first identity when `$SSH_AUTH_SOCK` is set, else no proof.
fn signer(identity: Option<&std::path::Path>) -> Result<Option<Signer>> {
    let agent = std::env::var_os("SSH_AUTH_SOCK").is_some();
    let Some(path) = identity else {
        return Ok(agent.then_some(Signer::Agent(None)));
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if let Ok(public) = ssh_key::PublicKey::from_openssh(text.trim()) {
        anyhow::ensure!(
            agent,
            "{} is a public key: its private half must be in an ssh-agent ($SSH_AUTH_SOCK is not set)",
            path.display()
        );
        return Ok(Some(Signer::Agent(Some(public))));
    }
    let key = ssh_key::PrivateKey::from_openssh(text.as_bytes())
        .with_context(|| format!("{} is not an OpenSSH key", path.display()))?;
    if key.is_encrypted() {
        anyhow::ensure!(
            agent,
            "{} is encrypted: add it to an ssh-agent (ssh-add) and set $SSH_AUTH_SOCK",
            path.display()
        );
        return Ok(Some(Signer::Agent(Some(key.public_key().clone()))));
    }
    Ok(Some(Signer::File(Box::new(key))))
}

/// The `Proxy-Authorization` value for `authority` now.
async fn proof(signer: &Signer, authority: &str) -> Result<String> {
    use keyway_tunnel::proof as p;
    let ts = p::unix_now();
    match signer {
        Signer::File(key) => p::sign(key, authority, ts).context("signing the proof"),
        Signer::Agent(want) => {
            let mut agent = russh::keys::agent::client::AgentClient::connect_env()
                .await
                .context("connecting to the ssh-agent at $SSH_AUTH_SOCK")?;
            let public = match want {
                Some(k) => k.clone(),
                None => agent
                    .request_identities()
                    .await
                    .context("listing the ssh-agent's keys")?
                    .into_iter()
                    .find_map(|id| match id {
                        russh::keys::agent::AgentIdentity::PublicKey { key, .. } => Some(key),
                        _ => None,
                    })
                    .ok_or_else(|| anyhow!("the ssh-agent holds no key; ssh-add one or pass -i"))?,
            };
            let nonce = p::nonce();
            let data = p::agent_data(authority, ts, &nonce).context("building the proof")?;
            let sig = agent
                .sign_request_signature(&public, Some(p::HASH), &data)
                .await
                .context("the ssh-agent refused to sign (is that key in it?)")?;
            p::from_agent(&public, ts, &nonce, sig).context("building the proof")
        }
    }
}

async fn open(
    opts: &Options,
    key: Option<&Signer>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let host = opts
        .url
        .host_str()
        .ok_or_else(|| anyhow!("--url has no host"))?;
    let port = opts.url.port_or_known_default().unwrap_or(443);
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect((host, port)))
        .await
        .map_err(|_| anyhow!("connecting to {host}:{port}: timed out"))?
        .with_context(|| format!("connecting to {host}:{port}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .with_context(|| format!("{host} is not a valid TLS server name"))?;
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS with {host}:{port}"))?;
    let mut req = format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n", t = opts.target);
    if let Some(signer) = key {
        let proof = proof(signer, &opts.target).await?;
        req.push_str(&format!("Proxy-Authorization: {proof}\r\n"));
    }
    req.push_str("\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .context("sending CONNECT")?;
    // Read the response head byte by byte: anything after it is the tunnel's.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            bail!("the gateway's response head is over {MAX_HEAD} bytes");
        }
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut b))
            .await
            .map_err(|_| anyhow!("no answer to CONNECT within 30 s"))?
            .context("reading the CONNECT response")?;
        if n == 0 {
            bail!("the gateway closed the connection before answering CONNECT");
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.lines().next().unwrap_or_default().to_string();
    if status.split_whitespace().nth(1) == Some("200") {
        return Ok(stream);
    }
    // The gateway explains refusals in a short body.
    let mut body = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut body))
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or(0);
    let reason = String::from_utf8_lossy(&body[..n]).trim().to_string();
    bail!(
        "the gateway refused CONNECT {}: {status}{}",
        opts.target,
        if reason.is_empty() {
            String::new()
        } else {
            format!(": {reason}")
        }
    )
}
