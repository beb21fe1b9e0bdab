//! Comparing one output of two runs: worst absolute error and the error relative to the
//! reference's largest magnitude.

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct OutputDiff {
    pub name: String,
    pub shape: Vec<i64>,
    /// max |a − b| over all elements (infinite where exactly one side is NaN or the shapes differ).
    pub max_abs: f64,
    /// max_abs / max |a| (a = the first model's output).
    pub max_rel: f64,
    /// Index of the worst element.
    pub worst_index: usize,
    pub tolerance: f64,
    pub ok: bool,
}

/// Compares `a` (reference) and `b` elementwise.
pub fn diff(name: &str, shape: &[i64], a: &[f64], b: &[f64], tolerance: f64) -> OutputDiff {
    let mut max_abs = 0.0f64;
    let mut worst = 0;
    let mut scale = 0.0f64;
    if a.len() != b.len() {
        max_abs = f64::INFINITY;
    } else {
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            let e = match (x.is_nan(), y.is_nan()) {
                (true, true) => 0.0,
                (false, false) if x == y => 0.0,
                (false, false) => (x - y).abs(),
                _ => f64::INFINITY,
            };
            let e = if e.is_nan() { f64::INFINITY } else { e };
            if e > max_abs {
                max_abs = e;
                worst = i;
            }
            if x.is_finite() {
                scale = scale.max(x.abs());
            }
        }
    }
    let max_rel = if max_abs == 0.0 {
        0.0
    } else {
        max_abs / scale.max(f64::MIN_POSITIVE)
    };
    OutputDiff {
        name: name.to_string(),
        shape: shape.to_vec(),
        max_abs,
        max_rel,
        worst_index: worst,
        tolerance,
        ok: max_abs <= tolerance,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_on_one_side_is_a_mismatch() {
        let d = diff("y", &[2], &[1.0, f64::NAN], &[1.0, 0.0], 1e-4);
        assert!(!d.ok);
        assert_eq!(d.worst_index, 1);
        let d = diff("y", &[2], &[1.0, 2.0], &[1.0, 2.00001], 1e-4);
        assert!(d.ok && d.max_abs > 0.0 && d.max_rel < 1e-5);
    }
}
