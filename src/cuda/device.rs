//! Device discovery and properties through `cudarc`'s driver API, loaded at run time so that a
//! machine without a GPU or driver simply reports zero devices. Properties are read once per
//! device and cached, so launches never query the driver.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::{result, sys};

use crate::{Error, Result};

/// What kernel planning needs to know about a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceProps {
    pub sm_count: i32,
    /// Largest dynamic shared memory one block may opt into, in bytes.
    pub max_smem_optin: i32,
    /// Shared memory of one SM, in bytes.
    pub smem_per_sm: i32,
    pub cc_major: i32,
    pub cc_minor: i32,
}

/// Whether libcuda loads and `cuInit` succeeds (checked once).
fn driver_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        // SAFETY: only tries to dlopen libcuda; no driver call is made when it is absent.
        let present = unsafe { sys::is_culib_present() };
        present && result::init().is_ok()
    })
}

/// Number of usable CUDA devices; 0 without a GPU or driver (never panics).
pub fn device_count() -> usize {
    if !driver_ready() {
        return 0;
    }
    result::device::get_count().map_or(0, |n| n.max(0) as usize)
}

/// Properties of `device`, cached after the first call.
pub fn device_props(device: i32) -> Result<DeviceProps> {
    static CACHE: OnceLock<Mutex<HashMap<i32, DeviceProps>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(p) = cache.lock().ok().and_then(|c| c.get(&device).copied()) {
        return Ok(p);
    }
    if !driver_ready() {
        return Err(Error::Device(
            "CUDA: no CUDA driver or device is available on this machine".into(),
        ));
    }
    let count = device_count();
    if device < 0 || device as usize >= count {
        return Err(Error::Device(format!(
            "CUDA: device {device} does not exist ({count} devices)"
        )));
    }
    let dev = result::device::get(device)
        .map_err(|e| Error::Device(format!("CUDA: cuDeviceGet({device}): {e}")))?;
    let attr = |a: sys::CUdevice_attribute| -> Result<i32> {
        // SAFETY: `dev` is a valid device handle from cuDeviceGet.
        unsafe { result::device::get_attribute(dev, a) }
            .map_err(|e| Error::Device(format!("CUDA: cuDeviceGetAttribute({a:?}): {e}")))
    };
    use sys::CUdevice_attribute as A;
    let props = DeviceProps {
        sm_count: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        max_smem_optin: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
        smem_per_sm: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?,
        cc_major: attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        cc_minor: attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    };
    if props.cc_major < 8 {
        return Err(Error::NotImplemented(format!(
            "CUDA: device {device} has compute capability {}.{}; the kernels need 8.0 or newer",
            props.cc_major, props.cc_minor
        )));
    }
    if let Ok(mut c) = cache.lock() {
        c.insert(device, props);
    }
    Ok(props)
}
