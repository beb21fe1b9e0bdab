//! The ORT custom-op ABI.
