//! Answers streamed to a client, with a bound on how long the server waits for the client to take
//! each one. A client that stops reading fills HTTP/2 flow control and then the outbox; without a
//! bound, the generation or ingest behind it would wait forever, holding its query slot.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::Status;

use super::ServerError;

/// The stream of answers a handler returns.
pub(super) type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The sending end of a stream of answers.
pub(super) struct Outbox<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    /// Taken when the client leaves an answer untaken for `timeout`: the stream's last word.
    stalled: Option<oneshot::Sender<Status>>,
    timeout: Duration,
    runtime: Handle,
}

/// An outbox holding up to `capacity` answers the client has not read, and the stream that carries
/// them. Must be called on the runtime.
pub(super) fn outbox<T: Send + 'static>(
    capacity: usize,
    timeout: Duration,
) -> (Outbox<T>, Answers<T>) {
    let (tx, rx) = mpsc::channel(capacity);
    let (stalled, status) = oneshot::channel();
    let outbox = Outbox {
        tx,
        stalled: Some(stalled),
        timeout,
        runtime: Handle::current(),
    };
    let stream = Unread {
        rx,
        status: Some(status),
    };
    (outbox, Box::pin(stream))
}

impl<T> Outbox<T> {
    /// Queues `item` for the client; false when the client is gone, or took no answer for the
    /// timeout (then the stream ends with DEADLINE_EXCEEDED after the answers it holds), and the
    /// sender should stop.
    pub async fn send(&mut self, item: Result<T, Status>) -> bool {
        if self.stalled.is_none() {
            return false;
        }
        match tokio::time::timeout(self.timeout, self.tx.send(item)).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::warn!(timeout = ?self.timeout, "a client stopped reading; stream ended");
                if let Some(stalled) = self.stalled.take() {
                    let _ = stalled.send(ServerError::Stalled(self.timeout).into());
                }
                false
            }
        }
    }

    /// [`Outbox::send`] from a blocking thread (off the runtime's workers).
    pub fn blocking_send(&mut self, item: Result<T, Status>) -> bool {
        let runtime = self.runtime.clone();
        runtime.block_on(self.send(item))
    }
}

/// The answers in an outbox, then the stall status if the outbox gave up on the client.
struct Unread<T> {
    rx: mpsc::Receiver<Result<T, Status>>,
    status: Option<oneshot::Receiver<Status>>,
}

impl<T> Stream for Unread<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(item) = std::task::ready!(self.rx.poll_recv(cx)) {
            return Poll::Ready(Some(item));
        }
        // Every sender is gone; the outbox is too, so the status is final.
        let Some(status) = self.status.as_mut() else {
            return Poll::Ready(None);
        };
        let last = std::task::ready!(Pin::new(status).poll(cx)).ok();
        self.status = None;
        Poll::Ready(last.map(Err))
    }
}
