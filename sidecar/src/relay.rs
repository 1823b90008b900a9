//! Copying bytes both ways between the downstream and upstream connections.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::telemetry::{BytesLabels, Metrics};

/// Bytes read per call in each direction.
const COPY_BUFFER: usize = 16 * 1024;

/// Relays until both sides are done, then records the byte counts.
/// Returns (bytes sent upstream, bytes received from upstream).
pub async fn relay<A, B>(
    metrics: &Metrics,
    direction: &'static str,
    mut down: A,
    mut up: B,
) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // One TLS record's worth of plaintext per read (tokio's default is 8 KiB):
    // half the system calls and records of a bulk transfer.
    match tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, COPY_BUFFER, COPY_BUFFER)
        .await
    {
        Ok((sent, received)) => {
            metrics
                .tcp_bytes
                .get_or_create(&BytesLabels {
                    direction,
                    flow: "sent",
                })
                .inc_by(sent);
            metrics
                .tcp_bytes
                .get_or_create(&BytesLabels {
                    direction,
                    flow: "received",
                })
                .inc_by(received);
            (sent, received)
        }
        Err(e) => {
            tracing::debug!(error = %e, direction, "relay ended with an error");
            (0, 0)
        }
    }
}
