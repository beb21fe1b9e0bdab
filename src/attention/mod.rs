//! The operator's semantics, CPU kernel and reference (see params, cpu, reference).
