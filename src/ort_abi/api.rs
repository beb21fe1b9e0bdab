//! The one choke point for calls into ORT's C API table: the table handed over by the host,
//! status ↔ [`Error`] conversion, and small safe readers for tensors.

use std::ffi::{c_char, CStr, CString};
use std::sync::OnceLock;

use ort_sys::{OrtApi, OrtErrorCode, OrtStatus, OrtStatusPtr};

use crate::{Error, Result};

/// The API table of the host that registered us (first registration wins; a process has one ORT).
static API: OnceLock<ApiRef> = OnceLock::new();

#[derive(Clone, Copy)]
struct ApiRef(&'static OrtApi);
// SAFETY: the OrtApi table is an immutable static table of function pointers owned by the host.
unsafe impl Send for ApiRef {}
unsafe impl Sync for ApiRef {}

pub fn set_api(api: &'static OrtApi) {
    let _ = API.set(ApiRef(api));
}

/// The host's API table. Only reachable after `RegisterCustomOps` ran, which is the only way ORT
/// can call any of our callbacks.
pub fn api() -> Result<&'static OrtApi> {
    API.get()
        .map(|a| a.0)
        .ok_or_else(|| Error::Other("flash-ort: ORT API table not initialised".into()))
}

/// Turns a status returned by ORT into a `Result`, releasing the status.
pub fn check(status: OrtStatusPtr, what: &str) -> Result<()> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = api()?;
    // SAFETY: non-null status objects come from the host and are released exactly once here.
    let msg = unsafe {
        let m = (api.GetErrorMessage)(status.0);
        let s = if m.is_null() {
            String::new()
        } else {
            CStr::from_ptr(m).to_string_lossy().into_owned()
        };
        (api.ReleaseStatus)(status.0);
        s
    };
    Err(Error::Other(format!("{what}: {msg}")))
}

/// Like [`check`] but only reports whether the call succeeded (for optional attributes).
pub fn succeeded(status: OrtStatusPtr) -> bool {
    check(status, "").is_ok()
}

/// Builds an `OrtStatus` for an error, with the ORT code its variant maps to.
pub fn error_status(err: &Error) -> OrtStatusPtr {
    let code = match err {
        Error::InvalidArgument(_) => OrtErrorCode::ORT_INVALID_ARGUMENT,
        Error::NotImplemented(_) => OrtErrorCode::ORT_NOT_IMPLEMENTED,
        Error::Device(_) => OrtErrorCode::ORT_EP_FAIL,
        Error::Other(_) => OrtErrorCode::ORT_FAIL,
    };
    status_with(code, &format!("com.flash.FlashAttention: {err}"))
}

pub fn status_with(code: OrtErrorCode, msg: &str) -> OrtStatusPtr {
    let Ok(api) = api() else {
        return OrtStatusPtr(std::ptr::null_mut::<OrtStatus>());
    };
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // SAFETY: CreateStatus copies the message.
    unsafe { (api.CreateStatus)(code, c.as_ptr()) }
}

/// Runs an ABI callback body, turning both errors and panics into an ORT status so nothing
/// unwinds across the C boundary.
pub fn guard(body: impl FnOnce() -> Result<()>) -> OrtStatusPtr {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Ok(())) => OrtStatusPtr(std::ptr::null_mut()),
        Ok(Err(e)) => error_status(&e),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            error_status(&Error::Other(format!("internal error (panic): {what}")))
        }
    }
}

/// A NUL-terminated attribute or domain name.
pub fn cstr(s: &'static [u8]) -> *const c_char {
    debug_assert!(s.last() == Some(&0));
    s.as_ptr().cast()
}
