//! The mosquitto plugin API v5 boundary: hand-written bindings for exactly what is used,
//! copied from mosquitto 2.0.11's `mosquitto_broker.h`, `mosquitto_plugin.h` and
//! `mosquitto.h`, and the exported entry points. Thin: each callback converts its event to
//! safe values, calls [`crate::plugin::Plugin`], and converts the answer back, inside
//! `catch_unwind` so no panic crosses into C (a panic denies).
#![allow(unsafe_code)]

use crate::options::PluginOptions;
use crate::plugin::{Access, AuthAnswer, ConnectAttempt, ConnectionKey, LogLevel, Plugin};
use std::ffi::{CStr, CString, c_char, c_int, c_long, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

// mosquitto.h: enum mosq_err_t (the values used).
const MOSQ_ERR_SUCCESS: c_int = 0;
const MOSQ_ERR_NOMEM: c_int = 1;
const MOSQ_ERR_INVAL: c_int = 3;
const MOSQ_ERR_AUTH: c_int = 11;
const MOSQ_ERR_ACL_DENIED: c_int = 12;
const MOSQ_ERR_UNKNOWN: c_int = 13;

// mosquitto.h: log levels.
const MOSQ_LOG_INFO: c_int = 1 << 0;
const MOSQ_LOG_NOTICE: c_int = 1 << 1;
const MOSQ_LOG_WARNING: c_int = 1 << 2;
const MOSQ_LOG_ERR: c_int = 1 << 3;
const MOSQ_LOG_DEBUG: c_int = 1 << 4;

// mosquitto_broker.h: enum mosquitto_plugin_event (the events used).
const MOSQ_EVT_ACL_CHECK: c_int = 2;
const MOSQ_EVT_BASIC_AUTH: c_int = 3;
const MOSQ_EVT_MESSAGE: c_int = 7;
const MOSQ_EVT_TICK: c_int = 9;
const MOSQ_EVT_DISCONNECT: c_int = 10;

// mosquitto_plugin.h.
const MOSQ_PLUGIN_VERSION: c_int = 5;
const MOSQ_ACL_READ: c_int = 0x01;
const MOSQ_ACL_WRITE: c_int = 0x02;
const MOSQ_ACL_SUBSCRIBE: c_int = 0x04;
const MOSQ_ACL_UNSUBSCRIBE: c_int = 0x08;

/// `struct mosquitto`: opaque.
#[repr(C)]
pub struct Mosquitto {
    _opaque: [u8; 0],
}

/// `struct mosquitto_opt`.
#[repr(C)]
pub struct MosquittoOpt {
    key: *mut c_char,
    value: *mut c_char,
}

/// `struct mosquitto_evt_acl_check`.
#[repr(C)]
struct EvtAclCheck {
    future: *mut c_void,
    client: *mut Mosquitto,
    topic: *const c_char,
    payload: *const c_void,
    properties: *mut c_void,
    access: c_int,
    payloadlen: u32,
    qos: u8,
    retain: bool,
    future2: [*mut c_void; 4],
}

/// `struct mosquitto_evt_basic_auth`.
#[repr(C)]
struct EvtBasicAuth {
    future: *mut c_void,
    client: *mut Mosquitto,
    username: *mut c_char,
    password: *mut c_char,
    future2: [*mut c_void; 4],
}

/// `struct mosquitto_evt_message`: mosquitto takes back `topic`, `payload` and
/// `retain` after the callback (a replaced topic must be allocated with
/// `mosquitto_strdup`; the old one is the callback's to free).
#[repr(C)]
struct EvtMessage {
    future: *mut c_void,
    client: *mut Mosquitto,
    topic: *mut c_char,
    payload: *mut c_void,
    properties: *mut c_void,
    reason_string: *mut c_char,
    payloadlen: u32,
    qos: u8,
    reason_code: u8,
    retain: bool,
    future2: [*mut c_void; 4],
}

/// `struct mosquitto_evt_disconnect`.
#[repr(C)]
struct EvtDisconnect {
    future: *mut c_void,
    client: *mut Mosquitto,
    reason: c_int,
    future2: [*mut c_void; 4],
}

/// `struct mosquitto_evt_tick` (`time_t` is `long` on the 64-bit Linux targets built for;
/// the fields are not read: 2.0.11 passes them zeroed). Kept for the layout test.
#[cfg_attr(not(test), allow(dead_code))]
#[repr(C)]
struct EvtTick {
    future: *mut c_void,
    now_ns: c_long,
    next_ns: c_long,
    now_s: c_long,
    next_s: c_long,
    future2: [*mut c_void; 4],
}

/// `MOSQ_FUNC_generic_callback`.
type GenericCallback = unsafe extern "C" fn(c_int, *mut c_void, *mut c_void) -> c_int;

unsafe extern "C" {
    fn mosquitto_callback_register(
        identifier: *mut c_void,
        event: c_int,
        cb_func: GenericCallback,
        event_data: *const c_void,
        userdata: *mut c_void,
    ) -> c_int;
    fn mosquitto_callback_unregister(
        identifier: *mut c_void,
        event: c_int,
        cb_func: GenericCallback,
        event_data: *const c_void,
    ) -> c_int;
    fn mosquitto_log_printf(level: c_int, fmt: *const c_char, ...);
    fn mosquitto_client_address(client: *const Mosquitto) -> *const c_char;
    fn mosquitto_client_id(client: *const Mosquitto) -> *const c_char;
    /// Returns `SSL_get_peer_certificate(client->ssl)`: a new reference the caller frees.
    fn mosquitto_client_certificate(client: *const Mosquitto) -> *mut c_void;
    fn mosquitto_client_protocol_version(client: *const Mosquitto) -> c_int;
    /// NULL kicks every client: never passed here.
    fn mosquitto_kick_client_by_clientid(clientid: *const c_char, with_will: bool) -> c_int;
    /// Queues a message for one client (`clientid` non-NULL: that client only, whatever
    /// its subscriptions); copies `payload`. Broker thread only.
    fn mosquitto_broker_publish_copy(
        clientid: *const c_char,
        topic: *const c_char,
        payloadlen: c_int,
        payload: *const c_void,
        qos: c_int,
        retain: bool,
        properties: *mut c_void,
    ) -> c_int;
    fn mosquitto_strdup(s: *const c_char) -> *mut c_char;
    fn mosquitto_free(mem: *mut c_void);
    // OpenSSL's libcrypto, already loaded by the broker.
    fn i2d_X509(x509: *mut c_void, out: *mut *mut u8) -> c_int;
    fn X509_free(x509: *mut c_void);
}

/// What `userdata` points at between init and cleanup.
struct Handle {
    identifier: *mut c_void,
    plugin: Plugin,
}

fn log(level: LogLevel, message: &str) {
    let level = match level {
        LogLevel::Debug => MOSQ_LOG_DEBUG,
        LogLevel::Info => MOSQ_LOG_INFO,
        LogLevel::Notice => MOSQ_LOG_NOTICE,
        LogLevel::Warning => MOSQ_LOG_WARNING,
        LogLevel::Error => MOSQ_LOG_ERR,
    };
    let text =
        CString::new(format!("fleetcert: {}", message.replace('\0', "\\0"))).unwrap_or_default();
    // SAFETY: "%s" with one NUL-terminated string argument.
    unsafe { mosquitto_log_printf(level, c"%s".as_ptr(), text.as_ptr()) };
}

fn flush_logs(plugin: &Plugin) {
    for line in plugin.drain_logs() {
        log(line.level, &line.message);
    }
}

/// # Safety
/// `ptr` is NULL or a NUL-terminated string valid for the returned lifetime.
unsafe fn text<'a>(ptr: *const c_char) -> Option<&'a str> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated per the caller.
    unsafe { CStr::from_ptr(ptr) }.to_str().ok()
}

/// The client's certificate, DER.
///
/// # Safety
/// `client` is a live `struct mosquitto`.
unsafe fn client_certificate_der(client: *const Mosquitto) -> Option<Vec<u8>> {
    // SAFETY: live client per the caller; the result is ours to free.
    let x509 = unsafe { mosquitto_client_certificate(client) };
    if x509.is_null() {
        return None;
    }
    // SAFETY: a valid X509*; with NULL `out`, i2d only measures.
    let len = unsafe { i2d_X509(x509, std::ptr::null_mut()) };
    let der = usize::try_from(len)
        .ok()
        .filter(|&n| n > 0)
        .and_then(|len| {
            let mut der = vec![0u8; len];
            let mut out = der.as_mut_ptr();
            // SAFETY: `der` has exactly the `len` bytes i2d said it writes.
            let written = unsafe { i2d_X509(x509, &mut out) };
            (written == len as c_int).then_some(der)
        });
    // SAFETY: mosquitto 2.0 returns SSL_get_peer_certificate's new reference.
    unsafe { X509_free(x509) };
    der
}

/// Runs `body` with the plugin, catching panics (`on_panic` then) and flushing logs.
fn guarded(userdata: *mut c_void, on_panic: c_int, body: impl FnOnce(&Plugin) -> c_int) -> c_int {
    if userdata.is_null() {
        return on_panic;
    }
    // SAFETY: userdata is the Box<Handle> from init, alive until cleanup, which runs after
    // every callback is unregistered; callbacks run on the broker's one thread.
    let handle = unsafe { &*(userdata as *const Handle) };
    let result = catch_unwind(AssertUnwindSafe(|| body(&handle.plugin)));
    let _ = catch_unwind(AssertUnwindSafe(|| flush_logs(&handle.plugin)));
    result.unwrap_or_else(|_| {
        let _ = catch_unwind(|| {
            log(
                LogLevel::Error,
                "internal error (panic) in a callback: denied",
            )
        });
        on_panic
    })
}

unsafe extern "C" fn on_basic_auth(
    _event: c_int,
    event_data: *mut c_void,
    userdata: *mut c_void,
) -> c_int {
    guarded(userdata, MOSQ_ERR_AUTH, |plugin| {
        let event = event_data as *const EvtBasicAuth;
        if event.is_null() {
            return MOSQ_ERR_AUTH;
        }
        // SAFETY: mosquitto passes a valid mosquitto_evt_basic_auth for this event.
        let event = unsafe { &*event };
        let client = event.client;
        if client.is_null() {
            return MOSQ_ERR_AUTH;
        }
        // SAFETY: a live client; its strings live for this call.
        let (client_id, address, username, der, protocol_version) = unsafe {
            (
                text(mosquitto_client_id(client)),
                text(mosquitto_client_address(client)),
                text(event.username),
                client_certificate_der(client),
                mosquitto_client_protocol_version(client),
            )
        };
        let Some(client_id) = client_id else {
            return MOSQ_ERR_AUTH;
        };
        let attempt = ConnectAttempt {
            connection: ConnectionKey(client as usize),
            client_id,
            certificate_der: der.as_deref(),
            source_address: address.unwrap_or(""),
            username,
            protocol_version,
        };
        // A call to serve may run here: the wake signal waits until it is done, so it
        // cannot cut the call's socket reads short (they carry a timeout, which makes the
        // kernel return EINTR instead of restarting them).
        let answer = {
            let _deferred = WakeDeferred::new();
            plugin.authenticate(&attempt)
        };
        match answer {
            AuthAnswer::Allowed => MOSQ_ERR_SUCCESS,
            AuthAnswer::NotAuthorized => MOSQ_ERR_AUTH,
            // 2.0 sends no CONNACK for anything but MOSQ_ERR_AUTH: it closes the connection,
            // which devices retry like a network failure (see the crate docs).
            AuthAnswer::Unavailable => MOSQ_ERR_UNKNOWN,
        }
    })
}

unsafe extern "C" fn on_acl_check(
    _event: c_int,
    event_data: *mut c_void,
    userdata: *mut c_void,
) -> c_int {
    guarded(userdata, MOSQ_ERR_ACL_DENIED, |plugin| {
        let event = event_data as *const EvtAclCheck;
        if event.is_null() {
            return MOSQ_ERR_ACL_DENIED;
        }
        // SAFETY: mosquitto passes a valid mosquitto_evt_acl_check for this event.
        let event = unsafe { &*event };
        // SAFETY: NUL-terminated topic, alive for this call.
        let Some(topic) = (unsafe { text(event.topic) }) else {
            return MOSQ_ERR_ACL_DENIED;
        };
        if event.client.is_null() {
            return MOSQ_ERR_ACL_DENIED;
        }
        let access = match event.access {
            MOSQ_ACL_SUBSCRIBE => Access::Subscribe,
            MOSQ_ACL_WRITE => Access::Publish {
                retain: event.retain,
            },
            MOSQ_ACL_READ => Access::Receive,
            MOSQ_ACL_UNSUBSCRIBE => Access::Unsubscribe,
            _ => return MOSQ_ERR_ACL_DENIED,
        };
        if plugin.authorize(ConnectionKey(event.client as usize), access, topic) {
            MOSQ_ERR_SUCCESS
        } else {
            MOSQ_ERR_ACL_DENIED
        }
    })
}

unsafe extern "C" fn on_message(
    _event: c_int,
    event_data: *mut c_void,
    userdata: *mut c_void,
) -> c_int {
    // A panic here denies the PUBLISH: a request must never be routed by accident.
    guarded(userdata, MOSQ_ERR_ACL_DENIED, |plugin| {
        let event = event_data as *mut EvtMessage;
        if event.is_null() {
            return MOSQ_ERR_SUCCESS;
        }
        // SAFETY: mosquitto passes a valid mosquitto_evt_message for this event.
        let event = unsafe { &mut *event };
        // SAFETY: NUL-terminated topic, alive for this call.
        let Some(topic) = (unsafe { text(event.topic) }) else {
            return MOSQ_ERR_SUCCESS;
        };
        let payload: &[u8] = if event.payload.is_null() || event.payloadlen == 0 {
            &[]
        } else {
            // SAFETY: mosquitto's payload of `payloadlen` bytes, alive for this call.
            unsafe {
                std::slice::from_raw_parts(event.payload as *const u8, event.payloadlen as usize)
            }
        };
        if !plugin.take_provisioning_request(ConnectionKey(event.client as usize), topic, payload) {
            return MOSQ_ERR_SUCCESS;
        }
        let Ok(sink) = CString::new(crate::plugin::PROVISIONING_SINK_TOPIC) else {
            return MOSQ_ERR_ACL_DENIED;
        };
        // SAFETY: a NUL-terminated string; mosquitto frees the copy with the message.
        let replacement = unsafe { mosquitto_strdup(sink.as_ptr()) };
        if replacement.is_null() {
            return MOSQ_ERR_ACL_DENIED;
        }
        // SAFETY: the old topic was allocated by mosquitto and is no longer referenced
        // once replaced (plugin__handle_message assigns event.topic back).
        unsafe { mosquitto_free(event.topic.cast()) };
        event.topic = replacement;
        event.retain = false;
        MOSQ_ERR_SUCCESS
    })
}

unsafe extern "C" fn on_disconnect(
    _event: c_int,
    event_data: *mut c_void,
    userdata: *mut c_void,
) -> c_int {
    guarded(userdata, MOSQ_ERR_SUCCESS, |plugin| {
        let event = event_data as *const EvtDisconnect;
        if !event.is_null() {
            // SAFETY: mosquitto passes a valid mosquitto_evt_disconnect for this event.
            let client = unsafe { (*event).client };
            plugin.disconnected(ConnectionKey(client as usize));
        }
        MOSQ_ERR_SUCCESS
    })
}

unsafe extern "C" fn on_tick(
    _event: c_int,
    _event_data: *mut c_void,
    userdata: *mut c_void,
) -> c_int {
    guarded(userdata, MOSQ_ERR_SUCCESS, |plugin| {
        // Kicking runs the DISCONNECT callback re-entrantly: no lock is held here.
        for client_id in plugin.tick() {
            if let Ok(id) = CString::new(client_id) {
                // SAFETY: a NUL-terminated, non-NULL client id.
                unsafe { mosquitto_kick_client_by_clientid(id.as_ptr(), false) };
            }
        }
        for reply in plugin.take_replies() {
            let (Ok(id), Ok(topic), Ok(len)) = (
                CString::new(reply.client_id),
                CString::new(reply.topic),
                c_int::try_from(reply.payload.len()),
            ) else {
                continue;
            };
            // SAFETY: NUL-terminated, non-NULL client id and topic; the payload is
            // copied by mosquitto; no properties.
            unsafe {
                mosquitto_broker_publish_copy(
                    id.as_ptr(),
                    topic.as_ptr(),
                    len,
                    reply.payload.as_ptr().cast(),
                    1,
                    false,
                    std::ptr::null_mut(),
                )
            };
        }
        MOSQ_ERR_SUCCESS
    })
}

const CALLBACKS: [(c_int, GenericCallback); 5] = [
    (MOSQ_EVT_BASIC_AUTH, on_basic_auth),
    (MOSQ_EVT_ACL_CHECK, on_acl_check),
    (MOSQ_EVT_MESSAGE, on_message),
    (MOSQ_EVT_DISCONNECT, on_disconnect),
    (MOSQ_EVT_TICK, on_tick),
];

/// Plugin API negotiation: this plugin speaks version 5 only.
///
/// Makes mosquitto reload its configuration, and with it each listener's `crlfile`: the
/// SIGHUP an operator would send, to our own process. mosquitto's handler only sets a
/// flag its main loop acts on (2.0: config, listener certificates and CRLs reloaded;
/// plugins and connections kept), so this is safe from the worker thread. Logged by the
/// caller (mosquitto's log is written from the broker's thread only).
fn reload_broker() -> Result<(), String> {
    // SAFETY: kill(2) with our own pid and a valid signal number; no memory is shared.
    let rc = unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

/// The signal that wakes the broker's loop: a realtime signal mosquitto does not use.
fn wake_signal() -> c_int {
    libc::SIGRTMIN() + 5
}

extern "C" fn ignore_wake(_: c_int) {}

/// Sets `handler` for the wake signal (`SA_RESTART`, so other system calls of the broker's
/// thread carry on; `epoll_wait` is never restarted, which is the point).
fn set_wake_action(handler: libc::sighandler_t) -> Result<(), String> {
    // SAFETY: a zeroed sigaction is a valid value to fill in; sigemptyset and sigaction get
    // valid pointers; the handler (a no-op, async-signal-safe) or SIG_IGN stays valid.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(wake_signal(), &action, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

/// Blocks the wake signal on this (the broker's) thread until dropped; one sent meanwhile
/// is delivered then, and still ends the next `epoll_wait`.
struct WakeDeferred(Option<libc::sigset_t>);

impl WakeDeferred {
    fn new() -> WakeDeferred {
        // SAFETY: sigset_t values are initialised by sigemptyset before use; the pointers
        // are to locals; pthread_sigmask only changes this thread's mask.
        unsafe {
            let mut block: libc::sigset_t = std::mem::zeroed();
            let mut previous: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut block);
            libc::sigaddset(&mut block, wake_signal());
            if libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut previous) == 0 {
                WakeDeferred(Some(previous))
            } else {
                WakeDeferred(None)
            }
        }
    }
}

impl Drop for WakeDeferred {
    fn drop(&mut self) {
        if let Some(previous) = &self.0 {
            // SAFETY: restores the mask saved by `new` on the same thread.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, previous, std::ptr::null_mut()) };
        }
    }
}

/// Called on the broker's thread at init: a no-op handler for the wake signal, and a hook
/// that sends it to this thread. mosquitto 2.0's loop waits up to 100 ms in `epoll_wait`
/// between ticks; the signal ends that wait (EINTR, which mosquitto ignores), so a reply
/// made on a provisioning thread is published at the next tick at once.
fn broker_waker() -> Result<crate::plugin::WakeHook, String> {
    set_wake_action(ignore_wake as *const () as libc::sighandler_t)?;
    // SAFETY: pthread_self has no preconditions.
    let broker_thread = unsafe { libc::pthread_self() };
    Ok(Box::new(move || {
        // SAFETY: the broker's main thread outlives the provisioning threads (cleanup
        // joins them), and the signal has a handler until then.
        unsafe { libc::pthread_kill(broker_thread, wake_signal()) };
    }))
}

/// # Safety
/// `supported_versions` points at `supported_version_count` ints (mosquitto's call).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mosquitto_plugin_version(
    supported_version_count: c_int,
    supported_versions: *const c_int,
) -> c_int {
    if supported_versions.is_null() || supported_version_count <= 0 {
        return -1;
    }
    // SAFETY: per mosquitto's contract above.
    let versions =
        unsafe { std::slice::from_raw_parts(supported_versions, supported_version_count as usize) };
    if versions.contains(&MOSQ_PLUGIN_VERSION) {
        MOSQ_PLUGIN_VERSION
    } else {
        -1
    }
}

/// Reads the options, starts the plugin and registers its callbacks. A missing or invalid
/// option fails here (logged, naming it), and mosquitto refuses to start.
///
/// # Safety
/// mosquitto's call: valid identifier, userdata slot and `option_count` options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mosquitto_plugin_init(
    identifier: *mut c_void,
    userdata: *mut *mut c_void,
    options: *mut MosquittoOpt,
    option_count: c_int,
) -> c_int {
    let started = catch_unwind(AssertUnwindSafe(|| {
        if identifier.is_null() || userdata.is_null() {
            return MOSQ_ERR_INVAL;
        }
        let opts: &[MosquittoOpt] = if options.is_null() || option_count <= 0 {
            &[]
        } else {
            // SAFETY: mosquitto passes `option_count` options.
            unsafe { std::slice::from_raw_parts(options, option_count as usize) }
        };
        let mut pairs = Vec::with_capacity(opts.len());
        for opt in opts {
            // SAFETY: NUL-terminated strings owned by mosquitto for this call.
            match unsafe { (text(opt.key), text(opt.value)) } {
                (Some(key), Some(value)) => pairs.push((key, value)),
                _ => {
                    log(LogLevel::Error, "a plugin_opt_ option is not UTF-8");
                    return MOSQ_ERR_INVAL;
                }
            }
        }
        let plugin = match PluginOptions::parse(pairs)
            .and_then(|o| Plugin::start(&o, Box::new(reload_broker)))
        {
            Ok(plugin) => plugin,
            Err(e) => {
                log(LogLevel::Error, &format!("cannot start: {e}"));
                return MOSQ_ERR_INVAL;
            }
        };
        match broker_waker() {
            Ok(wake) => plugin.set_wake_hook(wake),
            Err(e) => log(
                LogLevel::Warning,
                &format!(
                    "Fleet Provisioning replies wait for the broker's tick: no wake signal ({e})"
                ),
            ),
        }
        flush_logs(&plugin);
        let handle = Box::into_raw(Box::new(Handle { identifier, plugin }));
        for (index, (event, callback)) in CALLBACKS.iter().enumerate() {
            // SAFETY: identifier from mosquitto; handle outlives the registration.
            let rc = unsafe {
                mosquitto_callback_register(
                    identifier,
                    *event,
                    *callback,
                    std::ptr::null(),
                    handle.cast(),
                )
            };
            if rc != MOSQ_ERR_SUCCESS {
                log(
                    LogLevel::Error,
                    &format!("cannot register callback for event {event}: error {rc}"),
                );
                for (event, callback) in &CALLBACKS[..index] {
                    // SAFETY: registered just above.
                    unsafe {
                        mosquitto_callback_unregister(
                            identifier,
                            *event,
                            *callback,
                            std::ptr::null(),
                        )
                    };
                }
                // SAFETY: from Box::into_raw above, no callback refers to it any more.
                drop(unsafe { Box::from_raw(handle) });
                return MOSQ_ERR_UNKNOWN;
            }
        }
        // SAFETY: non-null slot checked above.
        unsafe { *userdata = handle.cast() };
        MOSQ_ERR_SUCCESS
    }));
    started.unwrap_or(MOSQ_ERR_NOMEM)
}

/// Unregisters the callbacks and stops the plugin (its worker sends queued disconnects).
///
/// # Safety
/// mosquitto's call, with the userdata init stored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mosquitto_plugin_cleanup(
    userdata: *mut c_void,
    _options: *mut MosquittoOpt,
    _option_count: c_int,
) -> c_int {
    if userdata.is_null() {
        return MOSQ_ERR_SUCCESS;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the Box<Handle> from init; mosquitto calls cleanup once.
        let handle = unsafe { Box::from_raw(userdata as *mut Handle) };
        for (event, callback) in &CALLBACKS {
            // SAFETY: registered in init with this identifier.
            unsafe {
                mosquitto_callback_unregister(
                    handle.identifier,
                    *event,
                    *callback,
                    std::ptr::null(),
                )
            };
        }
        let Handle { plugin, .. } = *handle;
        flush_logs(&plugin);
        plugin.shutdown();
        // No provisioning thread is left to send it; ignored from now on, so a signal
        // sent late cannot reach a handler in an unloaded library.
        let _ = set_wake_action(libc::SIG_IGN);
    }));
    MOSQ_ERR_SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Offsets as the C compiler lays out mosquitto_broker.h's structs on LP64.
    #[test]
    fn event_struct_layouts_match_the_headers() {
        assert_eq!(offset_of!(EvtAclCheck, client), 8);
        assert_eq!(offset_of!(EvtAclCheck, topic), 16);
        assert_eq!(offset_of!(EvtAclCheck, access), 40);
        assert_eq!(offset_of!(EvtAclCheck, payloadlen), 44);
        assert_eq!(offset_of!(EvtAclCheck, qos), 48);
        assert_eq!(offset_of!(EvtAclCheck, retain), 49);
        assert_eq!(offset_of!(EvtAclCheck, future2), 56);
        assert_eq!(size_of::<EvtAclCheck>(), 88);
        assert_eq!(offset_of!(EvtBasicAuth, username), 16);
        assert_eq!(size_of::<EvtBasicAuth>(), 64);
        assert_eq!(offset_of!(EvtDisconnect, reason), 16);
        assert_eq!(size_of::<EvtDisconnect>(), 56);
        assert_eq!(offset_of!(EvtMessage, topic), 16);
        assert_eq!(offset_of!(EvtMessage, payload), 24);
        assert_eq!(offset_of!(EvtMessage, payloadlen), 48);
        assert_eq!(offset_of!(EvtMessage, qos), 52);
        assert_eq!(offset_of!(EvtMessage, retain), 54);
        assert_eq!(offset_of!(EvtMessage, future2), 56);
        assert_eq!(size_of::<EvtMessage>(), 88);
        assert_eq!(size_of::<EvtTick>(), 72);
        assert_eq!(size_of::<MosquittoOpt>(), 16);
    }
}
