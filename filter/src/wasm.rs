//! The proxy-wasm glue: contexts that forward Envoy's callbacks to [`Stream`] and an
//! implementation of [`Host`] over the host calls. Kept thin on purpose; the logic is in
//! the other modules, tested natively.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action as WasmAction, BufferType, ContextType, LogLevel, MapType};

use crate::classify::serialized_has_knocker_header;
use crate::config::PluginConfig;
use crate::host::{HeaderPair, Host};
use crate::stream::{Action, Stream};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    config: Rc<PluginConfig>,
}

impl Context for Root {}

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
                self.config = Rc::new(config);
                true
            }
            Err(reason) => {
                log(LogLevel::Critical, &reason);
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter {
            config: Rc::clone(&self.config),
            stream: Stream::default(),
            body_size: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    config: Rc<PluginConfig>,
    stream: Stream,
    /// The body size Envoy last reported; trailers do not repeat it.
    body_size: usize,
}

impl Context for Filter {
    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        self.stream
            .on_grpc_response(&Envoy, &self.config, token, status, size);
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> WasmAction {
        to_wasm(
            self.stream
                .on_request_headers(&Envoy, &self.config, end_of_stream),
        )
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> WasmAction {
        self.body_size = body_size;
        to_wasm(
            self.stream
                .on_request_body(&Envoy, &self.config, body_size, end_of_stream),
        )
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> WasmAction {
        to_wasm(
            self.stream
                .on_request_trailers(&Envoy, &self.config, self.body_size),
        )
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _eos: bool) -> WasmAction {
        to_wasm(self.stream.on_response_headers(&Envoy, &self.config))
    }

    fn on_http_response_body(&mut self, _body_size: usize, _eos: bool) -> WasmAction {
        to_wasm(self.stream.on_response_body())
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

/// [`Host`] over the proxy-wasm host calls of the current context.
struct Envoy;

impl Host for Envoy {
    fn has_knocker_header(&self) -> bool {
        raw::with_request_header_map(serialized_has_knocker_header).unwrap_or(false)
    }

    fn request_headers(&self) -> Option<Vec<HeaderPair>> {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders).ok()
    }

    fn request_header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
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
        hostcalls::dispatch_grpc_call(
            cluster,
            knocker_proto::INGRESS_SERVICE,
            knocker_proto::INGRESS_SUBMIT,
            Vec::new(),
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
