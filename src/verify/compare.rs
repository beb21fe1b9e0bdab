//! Comparing one output of two runs: worst absolute error and the error relative to the
//! reference's largest magnitude. Elements at padded query positions can be compared apart: a
//! query that sees no key (a padding position under a causal mask or sliding window) gets zeros
//! from the operator where the exported graph averages every value; such rows carry no meaning
//! for the model, so they are reported beside the verdict, not in it.

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
    /// Padded query positions (attention_mask = 0) left out of max_abs, max_rel and ok.
    pub padded_excluded: usize,
    /// The worst absolute error at those positions (0 when none).
    pub padded_max_abs: f64,
}

/// Compares `a` (reference) and `b` elementwise.
pub fn diff(name: &str, shape: &[i64], a: &[f64], b: &[f64], tolerance: f64) -> OutputDiff {
    diff_unpadded(name, shape, a, b, tolerance, None)
}

/// Like [`diff`], leaving out of the verdict the elements of padded positions: `padded[r]` is
/// true when row r of the output's first two dims ([B, S], row = b·S + s) is padding.
pub fn diff_unpadded(
    name: &str,
    shape: &[i64],
    a: &[f64],
    b: &[f64],
    tolerance: f64,
    padded: Option<&[bool]>,
) -> OutputDiff {
    let mut max_abs = 0.0f64;
    let mut worst = 0;
    let mut scale = 0.0f64;
    let mut padded_max_abs = 0.0f64;
    let mut padded_excluded = 0;
    let inner: usize = shape.iter().skip(2).map(|&d| d.max(0) as usize).product();
    let padded = padded.filter(|p| inner > 0 && p.len() * inner == a.len());
    if let Some(p) = padded {
        padded_excluded = p.iter().filter(|&&x| x).count();
    }
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
            if padded.is_some_and(|p| p[i / inner]) {
                padded_max_abs = padded_max_abs.max(e);
                continue;
            }
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
        padded_excluded,
        padded_max_abs,
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

    #[test]
    fn padded_rows_are_reported_apart() {
        // [B=1, S=2, 2]: row 1 is padding and differs; row 0 matches.
        let (a, b) = ([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 0.0, 0.0]);
        let d = diff_unpadded("y", &[1, 2, 2], &a, &b, 1e-4, Some(&[false, true]));
        assert!(d.ok);
        assert_eq!((d.padded_excluded, d.padded_max_abs), (1, 4.0));
        // A real row that differs still fails.
        let d = diff_unpadded("y", &[1, 2, 2], &a, &b, 1e-4, Some(&[true, false]));
        assert!(!d.ok);
        assert_eq!(d.max_abs, 4.0);
    }
}
