//! `/xe/tunnel/2.0.0`: the handshake on a libp2p stream from a gateway to a
//! provider agent.
//!
//! ```text
//! opener → agent   32 bytes   the lease hash (raw, i.e. hex-decoded)
//! agent  → opener  0x00                       accepted: the data phase starts
//!                  0x01 message… <EOF>         refused: UTF-8, at most 4 KiB
//! ```
//!
//! After 0x00 the stream is a plain bidirectional byte pipe to the VM's SSH
//! port. The agent gives the opener [`HANDSHAKE_DEADLINE`] to send the hash;
//! the deadline is gone in the data phase (an idle SSH session is fine).
//!
//! The functions here are generic over tokio's I/O traits, so they are tested
//! on in-memory pipes and used on libp2p streams through `compat()`.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol name negotiated by multistream-select.
pub const PROTOCOL: &str = "/xe/tunnel/2.0.0";

/// How long the agent waits for the 32-byte lease hash.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(30);

/// The longest refusal message, in bytes.
pub const MAX_MESSAGE: usize = 4096;

const ACCEPTED: u8 = 0x00;
const REFUSED: u8 = 0x01;

/// What went wrong opening a tunnel, from the opener's side.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The agent answered 0x01 with this message.
    #[error("the provider agent refused the tunnel: {0}")]
    Refused(String),
    /// The agent answered something that is not this protocol.
    #[error("the provider agent answered {0:#04x}, not 0x00 or 0x01")]
    Protocol(u8),
    #[error("tunnel handshake: {0}")]
    Io(#[from] std::io::Error),
}

/// Opener side: sends `lease_hash` and reads the agent's verdict. On `Ok`
/// the stream carries the VM's SSH bytes.
pub async fn open<S>(stream: &mut S, lease_hash: &[u8; 32]) -> Result<(), OpenError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(lease_hash).await?;
    stream.flush().await?;
    let mut verdict = [0u8; 1];
    stream.read_exact(&mut verdict).await?;
    match verdict[0] {
        ACCEPTED => Ok(()),
        REFUSED => {
            let mut msg = Vec::with_capacity(256);
            // The message ends at EOF; never read (or keep) more than the cap.
            stream
                .take(MAX_MESSAGE as u64)
                .read_to_end(&mut msg)
                .await?;
            Err(OpenError::Refused(
                String::from_utf8_lossy(&msg).into_owned(),
            ))
        }
        other => Err(OpenError::Protocol(other)),
    }
}

/// Agent side: reads the lease hash, or fails when the opener sends less
/// than 32 bytes within `deadline` (the caller then drops the stream).
pub async fn read_request<S>(stream: &mut S, deadline: Duration) -> std::io::Result<[u8; 32]>
where
    S: AsyncRead + Unpin,
{
    let mut hash = [0u8; 32];
    match tokio::time::timeout(deadline, stream.read_exact(&mut hash)).await {
        Ok(r) => r.map(|_| hash),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no lease hash within {deadline:?}"),
        )),
    }
}

/// Agent side: 0x00, the data phase starts.
pub async fn accept<S>(stream: &mut S) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    stream.write_all(&[ACCEPTED]).await?;
    stream.flush().await
}

/// Agent side: 0x01, `message` (cut to [`MAX_MESSAGE`] bytes on a character
/// boundary), then the end of the stream.
pub async fn refuse<S>(stream: &mut S, message: &str) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let mut end = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = Vec::with_capacity(end + 1);
    out.push(REFUSED);
    out.extend_from_slice(&message.as_bytes()[..end]);
    stream.write_all(&out).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn accepted_then_bytes_flow() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let agent = tokio::spawn(async move {
            let h = read_request(&mut b, HANDSHAKE_DEADLINE).await.unwrap();
            accept(&mut b).await.unwrap();
            b.write_all(b"SSH-2.0-vm\r\n").await.unwrap();
            h
        });
        open(&mut a, &[7; 32]).await.unwrap();
        let mut banner = [0u8; 12];
        a.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"SSH-2.0-vm\r\n");
        assert_eq!(agent.await.unwrap(), [7; 32]);
    }

    #[tokio::test]
    async fn refusal_carries_the_message() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            read_request(&mut b, HANDSHAKE_DEADLINE).await.unwrap();
            refuse(&mut b, "lease is settled").await.unwrap();
        });
        match open(&mut a, &[1; 32]).await {
            Err(OpenError::Refused(m)) => assert_eq!(m, "lease is settled"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn long_messages_are_cut_on_a_character_boundary() {
        let (mut a, mut b) = tokio::io::duplex(16 * 1024);
        let long = "é".repeat(MAX_MESSAGE); // 2 bytes each
        refuse(&mut b, &long).await.unwrap();
        drop(b);
        let mut all = Vec::new();
        a.read_to_end(&mut all).await.unwrap();
        assert_eq!(all[0], REFUSED);
        assert_eq!(all.len() - 1, MAX_MESSAGE);
        assert!(std::str::from_utf8(&all[1..]).is_ok());
    }

    #[tokio::test]
    async fn an_agent_that_never_stops_talking_is_read_only_to_the_cap() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut junk = vec![b'x'; 20_000];
            junk[0] = REFUSED;
            let _ = b.write_all(&junk).await;
            let _ = read_request(&mut b, HANDSHAKE_DEADLINE).await;
        });
        match open(&mut a, &[1; 32]).await {
            Err(OpenError::Refused(m)) => assert_eq!(m.len(), MAX_MESSAGE),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_foreign_verdict_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            b.write_all(b"SSH-2.0-").await.unwrap();
            let _ = read_request(&mut b, HANDSHAKE_DEADLINE).await;
        });
        assert!(matches!(
            open(&mut a, &[1; 32]).await,
            Err(OpenError::Protocol(b'S'))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_opener_times_out() {
        let (mut a, _b) = tokio::io::duplex(1024);
        let e = read_request(&mut a, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_short_hash_then_eof_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        b.write_all(&[1; 10]).await.unwrap();
        drop(b);
        assert!(read_request(&mut a, HANDSHAKE_DEADLINE).await.is_err());
    }
}
