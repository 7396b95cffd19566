//! Connections of both doors: a cap on how many are open, and a deadline on each that
//! passes when the peer sends and receives nothing for `KNOCKER_IDLE_TIMEOUT`. The HTTP
//! door adds hyper's header deadline (`KNOCKER_HEADER_TIMEOUT`, which also closes an
//! idle keep-alive connection) and a body deadline (`KNOCKER_BODY_TIMEOUT`); the gRPC
//! door pings its peers more often than the idle deadline, so a live filter connection
//! never reaches it, while one that never finished its preface does.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// A connection that closes itself when its peer goes quiet.
pub struct Guarded {
    tcp: TcpStream,
    peer: SocketAddr,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Guarded {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn progress(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.idle);
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }

    /// A write that made progress moves the deadline; one that waits past it fails.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match result {
            Poll::Ready(Ok(n)) => {
                self.progress();
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(idle_error())),
            other => other,
        }
    }
}

fn idle_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "connection idle past KNOCKER_IDLE_TIMEOUT",
    )
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.tcp).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.progress();
                }
                Poll::Ready(result)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.tcp).poll_write(cx, data);
        self.wrote(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.wrote(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

/// Accepts connections up to `max` open at once (one over that is closed at once), each
/// with TCP_NODELAY (small replies must not wait for Nagle) and the idle deadline.
/// Accept errors (out of descriptors) pause accepting briefly instead of ending it.
pub fn accept(
    listener: TcpListener,
    max: usize,
    idle: Duration,
) -> impl Stream<Item = io::Result<Guarded>> + Send {
    let slots = Arc::new(Semaphore::new(max));
    futures_util::stream::unfold((listener, slots), move |(listener, slots)| async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection; pausing");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                tracing::warn!(%peer, max, "connection refused: KNOCKER_MAX_CONNECTIONS are open");
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let guarded = Guarded {
                tcp,
                peer,
                idle,
                deadline: Box::pin(tokio::time::sleep(idle)),
                _slot: slot,
            };
            return Some((Ok(guarded), (listener, slots)));
        }
    })
}
