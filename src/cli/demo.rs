//! `bulwark demo-app`: a small HTTP server for demos and tests, with
//! configurable latency and error rate.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Name in every response (e.g. api-v2).
    #[arg(long, default_value = "demo")]
    name: String,
    /// Added latency per request.
    #[arg(long, default_value = "0s", value_parser = super::parse_duration_ms)]
    latency: Duration,
    /// Fraction of requests answered 503 (0.0-1.0).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&a.error_rate) {
        anyhow::bail!("--error-rate must be between 0 and 1");
    }
    super::runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen).await?;
        tracing::info!(addr = %a.listen, name = %a.name, "demo app listening");
        let name: Arc<str> = a.name.into();
        let counter = Arc::new(AtomicU64::new(0));
        let every = if a.error_rate > 0.0 {
            (1.0 / a.error_rate).round() as u64
        } else {
            0
        };
        loop {
            let (stream, peer) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (name, counter, latency) = (name.clone(), counter.clone(), a.latency);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let (name, counter) = (name.clone(), counter.clone());
                    async move {
                        if let Some(proto) = req.headers().get(hyper::header::UPGRADE).cloned() {
                            // Echo every byte back once upgraded (WebSocket-style tunnels).
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(up) = on.await {
                                    let (mut r, mut w) =
                                        tokio::io::split(hyper_util::rt::TokioIo::new(up));
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                            return Ok::<_, Infallible>(
                                Response::builder()
                                    .status(101)
                                    .header(hyper::header::CONNECTION, "upgrade")
                                    .header(hyper::header::UPGRADE, proto)
                                    .body(Full::new(Bytes::new()))
                                    .expect("valid response"),
                            );
                        }
                        if !latency.is_zero() {
                            tokio::time::sleep(latency).await;
                        }
                        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                        let status = if every > 0 && n % every == 0 {
                            503
                        } else {
                            200
                        };
                        let caller = req
                            .headers()
                            .get("x-bulwark-peer-identity")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-");
                        let body = format!(
                            "{name} {} {} from {peer} caller={caller}\n",
                            req.method(),
                            req.uri().path()
                        );
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .header("x-served-by", name.as_ref())
                                .body(Full::new(Bytes::from(body)))
                                .expect("valid response"),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    })
}
