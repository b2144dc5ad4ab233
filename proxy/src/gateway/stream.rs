//! A TCP stream the gateway can cut from outside.
//!
//! russh owns a connection's socket inside its own task and offers no way to
//! abort it. Wrapping the socket lets the auth deadline, settlement and the
//! drain deadline end a connection for certain: once the token is cancelled
//! every read and write fails, so russh's loop ends and drops its channels.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// A [`TcpStream`] that fails once its token is cancelled.
pub struct KillableStream {
    inner: TcpStream,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The first bytes the peer sent, while they could still be the start
    /// of a PROXY header that must be refused.
    sniff: Option<Vec<u8>>,
}

/// The error text a refused PROXY header surfaces as.
pub const UNTRUSTED_PROXY_HEADER: &str = "PROXY protocol header from an untrusted peer";

impl KillableStream {
    pub fn new(inner: TcpStream, token: CancellationToken) -> Self {
        KillableStream {
            inner,
            cancelled: Box::pin(token.cancelled_owned()),
            sniff: None,
        }
    }

    /// Fails the first read when the peer opens with a PROXY header (it is
    /// not trusted to send one, and its bytes must not reach the SSH parser).
    pub fn refuse_proxy_header(mut self, on: bool) -> Self {
        self.sniff = on.then(Vec::new);
        self
    }

    fn sniff(&mut self, fresh: &[u8]) -> io::Result<()> {
        let Some(seen) = self.sniff.as_mut() else {
            return Ok(());
        };
        seen.extend(fresh.iter().take(6 - seen.len().min(6)));
        if !super::proxy_header::looks_like_header(seen) {
            self.sniff = None;
        } else if seen.len() >= 6 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                UNTRUSTED_PROXY_HEADER,
            ));
        }
        Ok(())
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cancelled.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed by the gateway",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.sniff.is_some() && matches!(r, Poll::Ready(Ok(()))) {
            this.sniff(&buf.filled()[before..])?;
        }
        r
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_blocked_read_fails_when_cancelled() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_client, accepted) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (server, _) = accepted.unwrap();
        let token = CancellationToken::new();
        let mut s = KillableStream::new(server, token.clone());
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 8];
            s.read(&mut b).await
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        token.cancel();
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
    }

    #[tokio::test]
    async fn it_passes_bytes_until_then() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), l.accept());
        let mut client = client.unwrap();
        let mut s = KillableStream::new(accepted.unwrap().0, CancellationToken::new());
        client.write_all(b"hello").await.unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hello");
    }
}
