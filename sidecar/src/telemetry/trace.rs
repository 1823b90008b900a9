//! Distributed tracing: OpenTelemetry spans for inbound and outbound
//! requests, W3C `traceparent`/`tracestate` continued when present and
//! started when absent, exported over OTLP/gRPC in the background. Export
//! never blocks the data path: spans go to a bounded batch queue (full =
//! dropped and counted) drained by the SDK's own worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanProcessor,
};
use prometheus_client::metrics::counter::Counter;

/// Spans waiting for export, at most.
const MAX_QUEUE: usize = 4096;

#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    /// Fraction of new traces sampled (an incoming sampled parent is always followed).
    pub sample_ratio: f64,
    /// `service.name` of this proxy's spans (the workload identity).
    pub service_name: String,
    pub mark: u32,
}

/// A live tracer, or none when tracing is off (then every call is a no-op).
#[derive(Clone, Default)]
pub struct Tracing(Option<Arc<Inner>>);

struct Inner {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    propagator: TraceContextPropagator,
    /// Fraction of the traces this proxy decides on that are sampled.
    ratio: f64,
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Counts spans handed to the batch processor and refuses them past the
/// bound, so a dead collector costs a counter increment, never memory.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
    dropped: Counter,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx)
    }
    fn on_end(&self, span: SpanData) {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUE {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.dropped.inc();
            return;
        }
        self.inner.on_end(span)
    }
    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
}

/// The exporter, counting spans out of the queue as they are exported (or
/// fail to be).
#[derive(Debug)]
struct Dequeue<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Dequeue<E>
{
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        let n = batch.len();
        let r = self.inner.export(batch).await;
        self.queued.fetch_sub(n, Ordering::Relaxed);
        r
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource)
    }
}

impl Tracing {
    /// Starts exporting to `opts.endpoint`; `dropped` counts spans lost to a full queue.
    pub fn start(opts: &TraceOptions, dropped: Counter) -> Result<Self, String> {
        // The exporter's connection attempts, RPCs and retries run on a
        // thread and runtime of their own: on the data-plane runtime (one
        // thread by default), a slow or dead collector took turns from
        // requests (the dead-collector test saw p99 up by 13-35%).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("trace export runtime: {e}"))?;
        let handle = rt.handle().clone();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || rt.block_on(std::future::pending::<()>()))
            .map_err(|e| format!("trace export thread: {e}"))?;
        let _on_export_runtime = handle.enter();
        let uri: http::Uri = opts
            .endpoint
            .parse()
            .map_err(|e| format!("--otlp-endpoint {:?}: {e}", opts.endpoint))?;
        let authority = uri
            .authority()
            .ok_or("--otlp-endpoint needs host:port")?
            .to_string();
        // The exporter's own connections carry the proxy mark, like every
        // socket of the proxy, so interception leaves them alone.
        let mark = opts.mark;
        let connector = tower::service_fn(move |_u: http::Uri| {
            let authority = authority.clone();
            async move {
                let tcp = bulwark_ca::client::dial(authority.as_str(), mark).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(opts.endpoint.clone())
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .connect_with_connector_lazy(connector);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(opts.endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .with_channel(channel)
            .build()
            .map_err(|e| e.to_string())?;
        let ratio = opts.sample_ratio.clamp(0.0, 1.0);
        let queued = Arc::new(AtomicUsize::new(0));
        let batch = BatchSpanProcessor::builder(Dequeue {
            inner: exporter,
            queued: queued.clone(),
        })
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(MAX_QUEUE)
                .with_scheduled_delay(Duration::from_millis(200))
                .build(),
        )
        .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Bounded {
                inner: batch,
                queued,
                dropped,
            })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_attribute(KeyValue::new("service.name", opts.service_name.clone()))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("bulwark-sidecar");
        Ok(Self(Some(Arc::new(Inner {
            tracer,
            provider,
            propagator: TraceContextPropagator::new(),
            ratio,
        }))))
    }

    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Starts a span continuing any `traceparent` in `headers`, and rewrites
    /// `headers` to carry this span as the parent of the next hop.
    /// `describe` gives the span's name and attributes; it runs only for a
    /// sampled span, so the unsampled majority of requests (and every request
    /// with tracing off) allocates none of them.
    pub fn start_span(
        &self,
        kind: SpanKind,
        headers: &mut http::HeaderMap,
        describe: impl FnOnce() -> (String, Vec<KeyValue>),
    ) -> ReqSpan {
        let Some(t) = &self.0 else {
            return ReqSpan(None);
        };
        let parent = t.propagator.extract(&HeaderExtractor(headers));
        // The sampler (parent-based, trace-id ratio) decides on the ids
        // alone, so the real name is set once the span is known to record.
        let mut span = t
            .tracer
            .span_builder("request")
            .with_kind(kind)
            .start_with_context(&t.tracer, &parent);
        if span.is_recording() {
            let (name, attrs) = describe();
            span.update_name(name);
            span.set_attributes(attrs);
        }
        let cx = parent.with_span(span);
        t.propagator
            .inject_context(&cx, &mut HeaderInjector(headers));
        ReqSpan(Some(cx))
    }

    /// Decides afresh whether a trace arriving from outside the mesh is
    /// sampled: a client's `traceparent` keeps its trace id, so its logs
    /// still correlate, but its sampled flag counts for nothing. Otherwise
    /// any client could have every request it sends recorded and exported
    /// by every hop, crowding out the sampled traces of everyone else.
    ///
    /// The draw is random, not the trace-id ratio: the client chose the
    /// trace id, and a ratio sampler samples ids whose low bits are small.
    /// With tracing off here, the flag is cleared, so that tracing hops
    /// behind do not follow it either.
    pub fn resample_untrusted(&self, headers: &mut http::HeaderMap) {
        let propagator = TraceContextPropagator::new();
        let parent = propagator.extract(&HeaderExtractor(headers));
        let sc = parent.span().span_context().clone();
        if !sc.is_valid() {
            return;
        }
        let sampled = self
            .0
            .as_ref()
            .is_some_and(|t| crate::balance::rand_unit() < t.ratio);
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        if flags == sc.trace_flags() {
            return;
        }
        let sc = SpanContext::new(
            sc.trace_id(),
            sc.span_id(),
            flags,
            true,
            sc.trace_state().clone(),
        );
        propagator.inject_context(
            &Context::new().with_remote_span_context(sc),
            &mut HeaderInjector(headers),
        );
    }

    pub fn shutdown(&self) {
        if let Some(t) = &self.0 {
            let _ = t.provider.shutdown();
        }
    }
}

/// A request's span; ended when finished.
pub struct ReqSpan(Option<Context>);

impl ReqSpan {
    /// Hex trace id, for access logs ("" when not tracing).
    pub fn trace_id(&self) -> String {
        self.0
            .as_ref()
            .map(|cx| cx.span().span_context().trace_id().to_string())
            .unwrap_or_default()
    }

    /// Ends the span; `attrs` runs only when the span is sampled.
    pub fn finish(self, status: u16, attrs: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(cx) = self.0 {
            let span = cx.span();
            if span.is_recording() {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                for a in attrs() {
                    span.set_attribute(a);
                }
                if status >= 500 {
                    span.set_status(Status::error(format!("HTTP {status}")));
                }
            }
            span.end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracing(sample_ratio: f64) -> Tracing {
        let opts = TraceOptions {
            // Never reached: nothing here is exported.
            endpoint: "http://127.0.0.1:9".into(),
            sample_ratio,
            service_name: "test".into(),
            mark: 0,
        };
        Tracing::start(&opts, Counter::default()).unwrap()
    }

    fn traceparent(h: &http::HeaderMap) -> &str {
        h.get("traceparent").unwrap().to_str().unwrap()
    }

    #[test]
    fn an_untrusted_sampled_flag_is_decided_afresh_and_the_trace_id_kept() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let sampled = format!("00-{id}-00f067aa0ba902b7-01");
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", sampled.parse().unwrap());
        h.insert("tracestate", "vendor=x".parse().unwrap());
        let never = tracing(0.0);
        never.resample_untrusted(&mut h);
        assert_eq!(traceparent(&h), format!("00-{id}-00f067aa0ba902b7-00"));
        assert_eq!(h.get("tracestate").unwrap(), "vendor=x");
        // The span started from it records nothing.
        let span = never.start_span(SpanKind::Server, &mut h.clone(), || ("x".into(), vec![]));
        assert!(!span.0.as_ref().unwrap().span().is_recording());
        // At ratio 1 an unsampled client trace is sampled: the decision is ours.
        let always = tracing(1.0);
        always.resample_untrusted(&mut h);
        assert_eq!(traceparent(&h), sampled);
        // No parent, or a malformed one: headers untouched.
        let mut h = http::HeaderMap::new();
        always.resample_untrusted(&mut h);
        assert!(h.is_empty());
        h.insert("traceparent", "garbage".parse().unwrap());
        never.resample_untrusted(&mut h);
        assert_eq!(traceparent(&h), "garbage");
        // Tracing off here: the client's flag is cleared all the same.
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", sampled.parse().unwrap());
        Tracing::default().resample_untrusted(&mut h);
        assert_eq!(traceparent(&h), format!("00-{id}-00f067aa0ba902b7-00"));
    }

    #[test]
    fn a_chosen_trace_id_does_not_buy_sampling() {
        // A trace-id ratio sampler samples every id whose low 64 bits are
        // zero: the client's choice must not decide.
        let half = tracing(0.5);
        let sampled = (0..400)
            .filter(|_| {
                let mut h = http::HeaderMap::new();
                let p = "00-4bf92f3577b34da60000000000000000-00f067aa0ba902b7-01";
                h.insert("traceparent", p.parse().unwrap());
                half.resample_untrusted(&mut h);
                traceparent(&h).ends_with("-01")
            })
            .count();
        // 400 draws at 0.5: outside 120..=280 about once in 10^20 runs.
        assert!((120..=280).contains(&sampled), "{sampled} of 400 sampled");
    }
}
