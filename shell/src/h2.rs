//! HTTP/2 plumbing shared by the broker and the agent: DATAGRAM capsules
//! onto a CONNECT-IP request stream.

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

/// Writes queued capsules to the stream as flow control allows, many per
/// DATA frame when they queue up; ends the stream when every sender is
/// gone.
pub async fn write_capsules(mut send: h2::SendStream<Bytes>, mut queue: mpsc::Receiver<Bytes>) {
    const BATCH: usize = 64 * 1024;
    let mut buf = BytesMut::with_capacity(BATCH);
    while let Some(first) = queue.recv().await {
        let data = if queue.is_empty() {
            first
        } else {
            buf.extend_from_slice(&first);
            while buf.len() < BATCH {
                match queue.try_recv() {
                    Ok(more) => buf.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            buf.split().freeze()
        };
        if send_flow_controlled(&mut send, data).await.is_err() {
            return;
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}

/// Sends `data` as the peer's flow-control window opens.
pub async fn send_flow_controlled(
    send: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = std::future::poll_fn(|cx| send.poll_capacity(cx)).await;
        let capacity = match granted {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(e),
            None => return Err(h2::Error::from(h2::Reason::CANCEL)),
        };
        if capacity == 0 {
            continue;
        }
        let chunk = data.split_to(capacity.min(data.len()));
        send.send_data(chunk, false)?;
    }
    Ok(())
}
