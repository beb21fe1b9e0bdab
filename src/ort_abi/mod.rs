//! The only `extern "C"` surface of the library: `RegisterCustomOps`, which ORT hosts look up
//! when they load `libflash_ort.so`, and the custom-op tables and kernels behind it.

mod api;
mod cpu_compute;
#[cfg(feature = "cuda")]
mod cuda_compute;
mod kernel;
mod op;
mod shape_infer;
mod tensors;

use std::ffi::CStr;
use std::sync::OnceLock;

use ort_sys::{OrtApiBase, OrtCustomOpDomain, OrtErrorCode, OrtSessionOptions, OrtStatusPtr};

use crate::attention::DType;
use crate::{Error, Result};
use op::{FlashOp, Provider, DOMAIN, OP_STRUCT_VERSION};

/// The ORT minor version (= C API version) of a version string like "1.20.1".
fn host_api_version(version: &str) -> Option<u32> {
    version.split('.').nth(1)?.parse().ok()
}

/// The custom-op tables, built once per process and never freed: ORT keeps pointers to them
/// for the life of every session that registered them.
static OPS: OnceLock<Vec<FlashOp>> = OnceLock::new();

fn ops(version: u32) -> &'static [FlashOp] {
    OPS.get_or_init(|| {
        let mut v = Vec::new();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            v.push(FlashOp::new(Provider::Cpu, dtype, version));
        }
        if cfg!(feature = "cuda") {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                v.push(FlashOp::new(Provider::Cuda, dtype, version));
            }
        }
        v
    })
}

unsafe fn register(options: *mut OrtSessionOptions, base: *const OrtApiBase) -> Result<()> {
    if options.is_null() || base.is_null() {
        return Err(Error::InvalidArgument(
            "RegisterCustomOps: null session options or API base".into(),
        ));
    }
    let base = &*base;
    let version_ptr = (base.GetVersionString)();
    let version = if version_ptr.is_null() {
        String::new()
    } else {
        CStr::from_ptr(version_ptr).to_string_lossy().into_owned()
    };
    let host = host_api_version(&version).unwrap_or(0);
    if host < OP_STRUCT_VERSION {
        return Err(Error::NotImplemented(format!(
            "flash-ort needs ONNX Runtime 1.{OP_STRUCT_VERSION} or newer; this host is {version:?}"
        )));
    }
    // Declare the newest layout both sides know: never above the host's API version, so older
    // hosts accept the tables (ORT rejects a custom op whose version exceeds its own).
    let declared = OP_STRUCT_VERSION.min(host);
    let api_ptr = (base.GetApi)(declared);
    if api_ptr.is_null() {
        return Err(Error::NotImplemented(format!(
            "ONNX Runtime {version} does not provide C API version {declared}"
        )));
    }
    api::set_api(&*api_ptr);
    let api = api::api()?;

    let mut domain: *mut OrtCustomOpDomain = std::ptr::null_mut();
    api::check(
        (api.CreateCustomOpDomain)(api::cstr(DOMAIN), &mut domain),
        "CreateCustomOpDomain",
    )?;
    for op in ops(declared) {
        api::check(
            (api.CustomOpDomain_Add)(domain, op.as_ort()),
            "CustomOpDomain_Add",
        )?;
    }
    // The domain is intentionally leaked: ORT keeps using it after registration returns.
    api::check(
        (api.AddCustomOpDomain)(options, domain),
        "AddCustomOpDomain",
    )
}

/// Entry point ORT calls after loading the library (`register_custom_ops_library` in Python,
/// `RegisterCustomOpsLibrary` in C/C++, `with_operator_library` in Rust's `ort`).
///
/// # Safety
/// Called by ONNX Runtime with valid session options and its API base.
#[no_mangle]
pub unsafe extern "C" fn RegisterCustomOps(
    options: *mut OrtSessionOptions,
    api_base: *const OrtApiBase,
) -> OrtStatusPtr {
    let outcome = std::panic::catch_unwind(|| register(options, api_base));
    match outcome {
        Ok(Ok(())) => OrtStatusPtr(std::ptr::null_mut()),
        Ok(Err(e)) => {
            // Before the API table is known no status can be built; fall back to the host's base.
            if api::api().is_err() && !api_base.is_null() {
                let api = ((*api_base).GetApi)(1);
                if !api.is_null() {
                    let msg = std::ffi::CString::new(format!("flash-ort: {e}")).unwrap_or_default();
                    return ((*api).CreateStatus)(OrtErrorCode::ORT_NOT_IMPLEMENTED, msg.as_ptr());
                }
            }
            api::error_status(&e)
        }
        Err(_) => api::status_with(
            OrtErrorCode::ORT_FAIL,
            "flash-ort: internal error during registration",
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_host_versions() {
        assert_eq!(super::host_api_version("1.20.1"), Some(20));
        assert_eq!(super::host_api_version("1.31.1"), Some(31));
        assert_eq!(super::host_api_version("garbage"), None);
    }
}
