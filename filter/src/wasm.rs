//! The proxy-wasm glue: contexts that forward Envoy's callbacks to [`Stream`] and an
//! implementation of [`Host`] over the host calls. Kept thin on purpose; the logic is in
//! the other modules, tested natively.
//!
//! The root context (one per worker) owns the worker's stream to the control plane
//! ([`Link`]): it opens it, receives every reply on it and hands each to the HTTP context
//! that waits for it, switching the host calls to that context with
//! `set_effective_context`. Each HTTP context's state is shared with the root through an
//! `Rc<RefCell<…>>` (one thread per VM).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action as WasmAction, BufferType, ContextType, LogLevel, MapType};

use crate::classify::serialized_has_knocker_header;
use crate::config::PluginConfig;
use crate::host::{HeaderPair, Host};
use crate::link::{self, Link};
use crate::metrics::Counter;
use crate::stream::{Action, Outcome, Stream, GRPC_DEADLINE_EXCEEDED};

/// gRPC's `UNAVAILABLE`.
const GRPC_UNAVAILABLE: u32 = 14;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root {
            id: context_id,
            config: Rc::default(),
            link: Rc::default(),
        })
    });
}}

/// An HTTP context's request state, shared with the root for replies on the stream.
type Waiter = Rc<RefCell<Stream>>;

/// How often the root checks deadlines and reopens a closed stream (at most; shorter
/// for a short `timeout_ms`). The tick starts with the worker's first Knocker request:
/// a worker that only passes traffic through never wakes up for it.
const TICK: Duration = Duration::from_millis(100);

fn tick_period(config: &PluginConfig) -> Duration {
    TICK.min(Duration::from_millis(config.timeout_ms / 4).max(Duration::from_millis(10)))
}

/// The gRPC metadata of every call to the control plane: its shared secret, if any.
fn metadata(authorization: Option<&str>) -> Vec<(&str, &[u8])> {
    authorization.map_or_else(Vec::new, |a| vec![("authorization", a.as_bytes())])
}

struct Root {
    id: u32,
    config: Rc<PluginConfig>,
    link: Rc<RefCell<Link<Waiter>>>,
}

impl Root {
    fn open_stream(&self) {
        let Ok(mut link) = self.link.try_borrow_mut() else {
            return;
        };
        if !link.wants_stream() {
            return;
        }
        let token = self.config.grpc_metadata();
        match hostcalls::open_grpc_stream(
            &self.config.cluster,
            knocker_proto::INGRESS_SERVICE,
            knocker_proto::INGRESS_SUBMIT_STREAM,
            metadata(token.as_deref()),
        ) {
            Ok(token) => {
                if link.has_opened() {
                    counters::add(Counter::StreamReopened, None);
                }
                link.opened(token);
            }
            Err(status) => log(
                LogLevel::Debug,
                &format!("knocker: cannot open the stream to the control plane ({status:?})"),
            ),
        }
    }

    /// Hands `outcome` to the HTTP context that waits for it (if it is still there).
    fn deliver(&self, waiting: link::Waiting<Waiter>, outcome: Outcome) {
        if hostcalls::set_effective_context(waiting.context_id).is_err() {
            return;
        }
        if let Ok(mut stream) = waiting.waiter.try_borrow_mut() {
            stream.on_reply(&Envoy::default(), &self.config, waiting.id, outcome);
        }
        let _ = hostcalls::set_effective_context(self.id);
    }
}

impl Context for Root {
    fn on_grpc_stream_message(&mut self, _token: u32, size: usize) {
        let message = hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let Some((id, reply)) = link::decode_reply(&message) else {
            log(
                LogLevel::Warn,
                "knocker: unreadable message on the control-plane stream",
            );
            return;
        };
        let waiting = self
            .link
            .try_borrow_mut()
            .ok()
            .and_then(|mut l| l.reply(id));
        if let Some(waiting) = waiting {
            self.deliver(waiting, Outcome::Reply(Some(reply)));
        }
    }

    fn on_grpc_stream_close(&mut self, token: u32, status: u32) {
        let message = hostcalls::get_grpc_status().ok().and_then(|(_, m)| m);
        // A stream the control plane ended (it is shutting down) leaves what was not
        // answered unanswered: for those requests it is unavailable.
        let (status, message) = match status {
            0 => (
                GRPC_UNAVAILABLE,
                Some("the control plane closed the stream".to_owned()),
            ),
            _ => (status, message),
        };
        let Ok(mut link) = self.link.try_borrow_mut() else {
            return;
        };
        let failed = link.closed(token, status);
        if link.is_unsupported() {
            log(
                LogLevel::Warn,
                "knocker: the control plane has no SubmitStream; one unary call per request from now on",
            );
        }
        drop(link);
        if !failed.is_empty() {
            log(
                LogLevel::Warn,
                &format!(
                    "knocker: the stream to the control plane closed (gRPC status {status}) with {} requests waiting",
                    failed.len()
                ),
            );
        }
        for waiting in failed {
            let outcome = Outcome::Failed {
                grpc_status: status,
                message: message.clone(),
            };
            self.deliver(waiting, outcome);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let text = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(text) => text.unwrap_or_default(),
            Err(status) => {
                log(
                    LogLevel::Critical,
                    &format!("knocker: cannot read plugin configuration: {status:?}"),
                );
                return false;
            }
        };
        match PluginConfig::parse(&text) {
            Ok(config) => {
                // Every counter shows (at 0) from the start, the rules' own included.
                for counter in Counter::ALL {
                    counters::id(counter, None);
                    for rule in &config.rules {
                        counters::id(counter, Some(&rule.name));
                    }
                }
                self.config = Rc::new(config);
                true
            }
            Err(reason) => {
                log(LogLevel::Critical, &reason);
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let expired = self
            .link
            .try_borrow_mut()
            .map(|mut l| l.expired(now_ms()))
            .unwrap_or_default();
        for waiting in expired {
            let outcome = Outcome::Failed {
                grpc_status: GRPC_DEADLINE_EXCEEDED,
                message: Some(format!("no reply within {} ms", self.config.timeout_ms)),
            };
            self.deliver(waiting, outcome);
        }
        self.open_stream();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter {
            config: Rc::clone(&self.config),
            stream: Rc::default(),
            body_size: 0,
            id: context_id,
            root_id: self.id,
            link: Rc::clone(&self.link),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    config: Rc<PluginConfig>,
    stream: Waiter,
    /// The body size Envoy last reported; trailers do not repeat it.
    body_size: usize,
    id: u32,
    root_id: u32,
    link: Rc<RefCell<Link<Waiter>>>,
}

impl Filter {
    /// Runs `f` on the request state with a host that submits on the worker's stream.
    fn with_stream(&self, f: impl FnOnce(&mut Stream, &Envoy) -> Action) -> WasmAction {
        let host = Envoy {
            link: Some(Submitter {
                link: &self.link,
                config: &self.config,
                root_id: self.root_id,
                context_id: self.id,
                waiter: &self.stream,
            }),
        };
        match self.stream.try_borrow_mut() {
            Ok(mut stream) => to_wasm(f(&mut stream, &host)),
            Err(_) => WasmAction::Continue,
        }
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        if let Ok(mut link) = self.link.try_borrow_mut() {
            link.forget(self.id);
        }
    }
}

impl Context for Filter {
    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        let config = Rc::clone(&self.config);
        self.with_stream(|s, host| {
            s.on_grpc_response(host, &config, token, status, size);
            Action::Continue
        });
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> WasmAction {
        let config = Rc::clone(&self.config);
        self.with_stream(|s, host| s.on_request_headers(host, &config, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> WasmAction {
        self.body_size = body_size;
        let config = Rc::clone(&self.config);
        self.with_stream(|s, host| s.on_request_body(host, &config, body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> WasmAction {
        let (config, body_size) = (Rc::clone(&self.config), self.body_size);
        self.with_stream(|s, host| s.on_request_trailers(host, &config, body_size))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _eos: bool) -> WasmAction {
        let config = Rc::clone(&self.config);
        self.with_stream(|s, host| s.on_response_headers(host, &config))
    }

    fn on_http_response_body(&mut self, _body_size: usize, _eos: bool) -> WasmAction {
        self.with_stream(|s, _| s.on_response_body())
    }
}

fn to_wasm(action: Action) -> WasmAction {
    match action {
        Action::Continue => WasmAction::Continue,
        Action::Pause => WasmAction::Pause,
    }
}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What an HTTP context needs to submit on its worker's stream.
struct Submitter<'a> {
    link: &'a RefCell<Link<Waiter>>,
    config: &'a PluginConfig,
    root_id: u32,
    context_id: u32,
    waiter: &'a Waiter,
}

impl Submitter<'_> {
    /// Sends the submission on the stream; `None` when there is no open stream or the
    /// message could not be sent (the caller makes a unary call instead).
    fn submit(&self, message: &[u8], timeout: Duration) -> Option<u32> {
        let mut link = self.link.try_borrow_mut().ok()?;
        let deadline =
            now_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        let Some((id, token)) = link.register(self.context_id, Rc::clone(self.waiter), deadline)
        else {
            // The first request of this worker: start the root's tick, which opens the
            // stream (set as the root, then back).
            if !link.ticking {
                link.ticking = true;
                let ticking = hostcalls::set_effective_context(self.root_id)
                    .and_then(|()| hostcalls::set_tick_period(tick_period(self.config)));
                let _ = hostcalls::set_effective_context(self.context_id);
                if let Err(status) = ticking {
                    log(
                        LogLevel::Warn,
                        &format!("knocker: no tick ({status:?}); one unary call per request"),
                    );
                }
            }
            return None;
        };
        let frame = link::encode_submit(id, message);
        // The stream belongs to the root context: send as the root, then come back.
        let sent = hostcalls::set_effective_context(self.root_id)
            .and_then(|()| hostcalls::send_grpc_stream_message(token, Some(&frame), false));
        let _ = hostcalls::set_effective_context(self.context_id);
        match sent {
            Ok(()) => Some(id),
            Err(status) => {
                log(
                    LogLevel::Warn,
                    &format!("knocker: cannot send on the stream to the control plane ({status:?}); reopening it"),
                );
                link.unsent(id);
                None
            }
        }
    }
}

/// [`Host`] over the proxy-wasm host calls of the current context; with a
/// [`Submitter`], submissions go on the worker's stream when it is open.
#[derive(Default)]
struct Envoy<'a> {
    link: Option<Submitter<'a>>,
}

impl Host for Envoy<'_> {
    fn has_knocker_header(&self) -> bool {
        raw::with_request_header_map(serialized_has_knocker_header).unwrap_or(false)
    }

    fn request_headers(&self) -> Option<Vec<HeaderPair>> {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders).ok()
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .ok()
            .map(Option::unwrap_or_default)
    }

    fn response_status(&self) -> Option<u32> {
        hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status")
            .ok()??
            .parse()
            .ok()
    }

    fn response_code_details(&self) -> Option<String> {
        let bytes = hostcalls::get_property(vec!["response", "code_details"]).ok()??;
        String::from_utf8(bytes).ok()
    }

    fn set_response_header(&self, name: &str, value: &str) {
        if let Err(e) = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value)) {
            log(
                LogLevel::Warn,
                &format!("knocker: cannot set response header {name}: {e:?}"),
            );
        }
    }

    fn resume_response(&self) {
        if let Err(e) = hostcalls::resume_http_response() {
            log(
                LogLevel::Error,
                &format!("knocker: cannot resume the response: {e:?}"),
            );
        }
    }

    fn downstream_address(&self) -> Option<String> {
        let bytes = hostcalls::get_property(vec!["source", "address"]).ok()??;
        String::from_utf8(bytes).ok()
    }

    fn dispatch_submit(
        &self,
        cluster: &str,
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, String> {
        if let Some(id) = self.link.as_ref().and_then(|l| l.submit(message, timeout)) {
            return Ok(id);
        }
        let token = self.link.as_ref().and_then(|l| l.config.grpc_metadata());
        hostcalls::dispatch_grpc_call(
            cluster,
            knocker_proto::INGRESS_SERVICE,
            knocker_proto::INGRESS_SUBMIT,
            metadata(token.as_deref()),
            Some(message),
            timeout,
        )
        .map_err(|status| format!("gRPC dispatch to cluster `{cluster}` failed ({status:?})"))
    }

    fn grpc_response(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
            .ok()
            .map(Option::unwrap_or_default)
    }

    fn grpc_status_message(&self) -> Option<String> {
        hostcalls::get_grpc_status().ok()?.1
    }

    fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        if let Err(e) = hostcalls::send_http_response(status, headers.to_vec(), Some(body)) {
            log(
                LogLevel::Error,
                &format!("knocker: cannot send the local response: {e:?}"),
            );
        }
    }

    fn warn(&self, message: &str) {
        log(LogLevel::Warn, message);
    }

    fn count(&self, counter: Counter, rule: Option<&str>) {
        counters::add(counter, None);
        if rule.is_some() {
            counters::add(counter, rule);
        }
    }
}

/// The counters' metric ids, defined once per worker (a VM per thread).
mod counters {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use proxy_wasm::hostcalls;
    use proxy_wasm::types::MetricType;

    use crate::metrics::{metric_name, Counter};

    thread_local! {
        static IDS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
    }

    /// The metric's id, defining it the first time; `None` when Envoy refuses.
    pub fn id(counter: Counter, rule: Option<&str>) -> Option<u32> {
        let name = metric_name(counter, rule);
        IDS.with(|ids| {
            let mut ids = ids.try_borrow_mut().ok()?;
            if let Some(id) = ids.get(&name) {
                return Some(*id);
            }
            let id = hostcalls::define_metric(MetricType::Counter, &name).ok()?;
            ids.insert(name, id);
            Some(id)
        })
    }

    pub fn add(counter: Counter, rule: Option<&str>) {
        if let Some(id) = id(counter, rule) {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }
}

/// The one raw host call of the hot path: the serialized request header map, scanned in
/// place instead of being decoded into owned strings (see `classify`).
#[allow(unsafe_code)]
mod raw {
    use std::ptr::null_mut;

    use proxy_wasm::types::{MapType, Status};

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_header_map_pairs(
            map_type: MapType,
            return_map_data: *mut *mut u8,
            return_map_size: *mut usize,
        ) -> Status;
    }

    pub fn with_request_header_map<T>(scan: impl FnOnce(&[u8]) -> T) -> Option<T> {
        let mut data: *mut u8 = null_mut();
        let mut size: usize = 0;
        // SAFETY: the host writes a pointer to `size` bytes it allocated through the SDK's
        // `proxy_on_memory_allocate` (a boxed slice of exactly `size` bytes), which we now
        // own; rebuilding the Vec with capacity == size frees it with the same layout.
        unsafe {
            match proxy_get_header_map_pairs(MapType::HttpRequestHeaders, &mut data, &mut size) {
                Status::Ok if !data.is_null() => {
                    let map = Vec::from_raw_parts(data, size, size);
                    Some(scan(&map))
                }
                Status::Ok => Some(scan(&[])),
                _ => None,
            }
        }
    }
}
