//! The library's one error type. Each variant maps to an ORT status code at the ABI boundary.

/// Errors raised by validation, kernels and graph tooling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input has the wrong rank, shape, type or value (maps to `ORT_INVALID_ARGUMENT`).
    #[error("{0}")]
    InvalidArgument(String),
    /// A valid request this build cannot serve, e.g. a head dim without a kernel (`ORT_NOT_IMPLEMENTED`).
    #[error("{0}")]
    NotImplemented(String),
    /// A CUDA launch or runtime failure (`ORT_EP_FAIL`).
    #[error("{0}")]
    Device(String),
    /// Anything else (`ORT_FAIL`).
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Returns early with [`Error::InvalidArgument`] built from a format string.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err($crate::Error::InvalidArgument(format!($($arg)*)))
    };
}
