//! Copying bytes both ways between the downstream and upstream connections.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::telemetry::{BytesLabels, Metrics};

/// Relays until both sides are done, then records the byte counts.
pub async fn relay<A, B>(metrics: &Metrics, direction: &'static str, mut down: A, mut up: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut down, &mut up).await {
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
        }
        Err(e) => tracing::debug!(error = %e, direction, "relay ended with an error"),
    }
}
