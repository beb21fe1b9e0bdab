//! A small symbolic shape and value inference: element types, ranks and dims (known numbers or
//! symbols, so "the same sequence length" can be proven), the values of shape vectors built with
//! `Shape → Gather → Concat`, and constant float scalars such as a scale computed from `Shape(Q)`.
//! It runs once over a graph in node order and never allocates by a dim's value.

use std::collections::HashMap;

use super::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, type_proto, GraphProto, NodeProto,
    TensorProto, ValueInfoProto,
};
use super::tensor;

/// One dimension: a known size or a symbol (equal symbols are equal sizes).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Val(i64),
    Sym(String),
}

impl Dim {
    pub fn val(&self) -> Option<i64> {
        match self {
            Dim::Val(v) => Some(*v),
            Dim::Sym(_) => None,
        }
    }
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Val(v) => write!(f, "{v}"),
            Dim::Sym(s) => write!(f, "{s}"),
        }
    }
}

/// What is known about one tensor.
#[derive(Clone, Debug, Default)]
pub struct Info {
    /// ONNX element type (`TensorProto.DataType`).
    pub elem: Option<i32>,
    /// Dims, when the rank is known.
    pub dims: Option<Vec<Dim>>,
    /// Contents of a small integer tensor (a shape vector or index), flattened.
    pub ints: Option<Vec<Dim>>,
    /// Contents of a floating tensor with exactly one element.
    pub scalar: Option<f64>,
}

impl Info {
    /// Element type and dims alone: nothing known about the values.
    fn typed(elem: Option<i32>, dims: Option<Vec<Dim>>) -> Info {
        Info {
            elem,
            dims,
            ..Default::default()
        }
    }
    pub fn rank(&self) -> Option<usize> {
        self.dims.as_ref().map(Vec::len)
    }
    /// Whether the tensor has exactly one element (all dims known to be 1, or rank 0).
    pub fn is_single(&self) -> bool {
        self.dims
            .as_ref()
            .is_some_and(|d| d.iter().all(|x| *x == Dim::Val(1)))
    }
}

/// Inference results for one graph, keyed by tensor name.
#[derive(Clone, Debug, Default)]
pub struct Infos {
    pub map: HashMap<String, Info>,
    fresh: usize,
}

impl Infos {
    pub fn get(&self, name: &str) -> Option<&Info> {
        self.map.get(name)
    }
    pub fn dims(&self, name: &str) -> Option<&[Dim]> {
        self.map.get(name).and_then(|i| i.dims.as_deref())
    }
    pub fn rank(&self, name: &str) -> Option<usize> {
        self.dims(name).map(<[Dim]>::len)
    }
    pub fn elem(&self, name: &str) -> Option<i32> {
        self.map.get(name).and_then(|i| i.elem)
    }
    pub fn scalar(&self, name: &str) -> Option<f64> {
        self.map.get(name).and_then(|i| i.scalar)
    }
    pub fn ints(&self, name: &str) -> Option<&[Dim]> {
        self.map.get(name).and_then(|i| i.ints.as_deref())
    }
    fn fresh(&mut self) -> Dim {
        self.fresh += 1;
        Dim::Sym(format!("?{}", self.fresh))
    }
    fn fresh_dims(&mut self, rank: usize) -> Vec<Dim> {
        (0..rank).map(|_| self.fresh()).collect()
    }
}

/// Dims of a value_info entry; unnamed unknown dims become fresh symbols.
fn vi_dims(vi: &ValueInfoProto, infos: &mut Infos) -> (Option<i32>, Option<Vec<Dim>>) {
    let Some(type_proto::Value::TensorType(tt)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return (None, None);
    };
    let dims = tt.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(super::onnx::tensor_shape_proto::dimension::Value::DimValue(v)) => {
                    Dim::Val(*v)
                }
                Some(super::onnx::tensor_shape_proto::dimension::Value::DimParam(p))
                    if !p.is_empty() =>
                {
                    Dim::Sym(p.clone())
                }
                _ => infos.fresh(),
            })
            .collect()
    });
    (tt.elem_type, dims)
}

fn const_info(t: &TensorProto) -> Info {
    let dims = t.dims.iter().map(|&d| Dim::Val(d)).collect::<Vec<_>>();
    let small = tensor::element_count(t).is_some_and(|n| n <= 64);
    let ints = if small {
        tensor::ints(t).map(|v| v.into_iter().map(Dim::Val).collect())
    } else {
        None
    };
    let scalar = if tensor::element_count(t) == Some(1) {
        tensor::floats(t).and_then(|v| v.first().copied())
    } else {
        None
    };
    Info {
        elem: t.data_type,
        dims: Some(dims),
        ints,
        scalar,
    }
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a super::onnx::AttributeProto> {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name))
}
fn attr_i(n: &NodeProto, name: &str) -> Option<i64> {
    attr(n, name).and_then(|a| a.i)
}
fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name)
        .filter(|a| !a.ints.is_empty() || a.r#type == Some(AttributeType::Ints as i32))
        .map(|a| a.ints.clone())
}

/// Broadcast of two dim lists (numpy rules); unprovable pairs get a fresh symbol.
fn broadcast(a: &[Dim], b: &[Dim], infos: &mut Infos) -> Vec<Dim> {
    let r = a.len().max(b.len());
    let mut out = Vec::with_capacity(r);
    for i in 0..r {
        let x = (i + a.len()).checked_sub(r).map(|j| &a[j]);
        let y = (i + b.len()).checked_sub(r).map(|j| &b[j]);
        out.push(match (x, y) {
            (Some(x), None) => x.clone(),
            (None, Some(y)) => y.clone(),
            (Some(x), Some(y)) if x == y => x.clone(),
            (Some(Dim::Val(1)), Some(y)) => y.clone(),
            (Some(x), Some(Dim::Val(1))) => x.clone(),
            (Some(Dim::Val(v)), Some(_)) | (Some(_), Some(Dim::Val(v))) => Dim::Val(*v),
            _ => infos.fresh(),
        });
    }
    out
}

/// Element `i` of an integer vector broadcast along its only axis (one element repeats).
fn broadcast_at(v: &[Dim], i: usize) -> Option<&Dim> {
    v.get(if v.len() == 1 { 0 } else { i })
}

/// The size a Reshape's -1 takes: the input's element count divided by the other target dims,
/// cancelling equal symbols (so [batch, seq, 32] → [batch, seq, -1, 16] gives 2).
fn infer_minus_one(input: &[Dim], others: &[Dim]) -> Option<Dim> {
    let mut syms: Vec<&Dim> = input.iter().filter(|d| d.val().is_none()).collect();
    // Products like `batch*sequence` cancel factor by factor.
    let _ = &mut syms;
    let mut num: i64 = input
        .iter()
        .filter_map(Dim::val)
        .try_fold(1i64, |a, b| a.checked_mul(b))?;
    let mut den: i64 = 1;
    for d in others {
        match d {
            Dim::Val(v) => den = den.checked_mul(*v)?,
            sym => {
                let k = syms.iter().position(|s| *s == sym)?;
                syms.remove(k);
            }
        }
    }
    if den <= 0 || num % den != 0 {
        return None;
    }
    num /= den;
    // What is left is the product of the symbols that did not cancel.
    syms.into_iter()
        .try_fold(Dim::Val(num), |acc, s| product(&acc, s, false))
}

fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

fn int_arith(op: &str, a: &Dim, b: &Dim) -> Option<Dim> {
    match (op, a, b) {
        ("Sub", x, y) if x == y => Some(Dim::Val(0)),
        ("Add", x, Dim::Val(0)) | ("Add", Dim::Val(0), x) | ("Sub", x, Dim::Val(0)) => {
            Some(x.clone())
        }
        ("Mul", x, Dim::Val(1)) | ("Mul", Dim::Val(1), x) | ("Div", x, Dim::Val(1)) => {
            Some(x.clone())
        }
        ("Div", x, y) if x == y => Some(Dim::Val(1)),
        ("Equal", x, y) if x == y => Some(Dim::Val(1)),
        // A dim is never negative: comparing one with -1 (torch's "keep this dim") is false.
        ("Equal", Dim::Sym(_), Dim::Val(v)) | ("Equal", Dim::Val(v), Dim::Sym(_)) if *v < 0 => {
            Some(Dim::Val(0))
        }
        ("Mul", x, y) => product(x, y, false),
        ("Div", x, y) => product(x, y, true),
        (_, Dim::Val(x), Dim::Val(y)) => match op {
            "Add" => x.checked_add(*y).map(Dim::Val),
            "Sub" => x.checked_sub(*y).map(Dim::Val),
            "Mul" => x.checked_mul(*y).map(Dim::Val),
            "Div" if *y != 0 => Some(Dim::Val(x.div_euclid(*y))),
            "Equal" => Some(Dim::Val((x == y) as i64)),
            "Max" => Some(Dim::Val(*x.max(y))),
            "Min" => Some(Dim::Val(*x.min(y))),
            _ => None,
        },
        _ => None,
    }
}

/// A dim as coefficient × symbols (a symbol may itself be a product written `a*b`).
fn factors(d: &Dim) -> (i64, Vec<String>) {
    match d {
        Dim::Val(v) => (*v, vec![]),
        Dim::Sym(s) => (1, s.split('*').map(str::to_string).collect()),
    }
}

/// x·y or x/y over symbolic products (`batch*sequence / batch` = `sequence`); a division that is
/// not exact gives None.
fn product(x: &Dim, y: &Dim, divide: bool) -> Option<Dim> {
    let (kx, mut fx) = factors(x);
    let (ky, fy) = factors(y);
    let k = if divide {
        if ky == 0 || kx % ky != 0 {
            return None;
        }
        for f in fy {
            let i = fx.iter().position(|g| *g == f)?;
            fx.remove(i);
        }
        kx / ky
    } else {
        fx.extend(fy);
        kx.checked_mul(ky)?
    };
    fx.sort();
    Some(match (k, fx.is_empty()) {
        (k, true) => Dim::Val(k),
        (1, false) => Dim::Sym(fx.join("*")),
        (k, false) => Dim::Sym(format!("{k}*{}", fx.join("*"))),
    })
}

fn float_arith(op: &str, a: f64, b: f64) -> Option<f64> {
    Some(match op {
        "Add" => a + b,
        "Sub" => a - b,
        "Mul" => a * b,
        "Div" => a / b,
        "Pow" => a.powf(b),
        _ => return None,
    })
}

/// The `axes` of a Reduce*, Squeeze or Unsqueeze: an attribute before opset 13 (18 for most
/// reductions), the constant second input after.
fn axes(n: &NodeProto, infos: &Infos) -> Option<Vec<i64>> {
    attr_ints(n, "axes").or_else(|| {
        let name = n.input.get(1).filter(|s| !s.is_empty())?;
        infos.ints(name)?.iter().map(Dim::val).collect()
    })
}

/// starts, ends, axes, steps of a Slice.
type SliceParams = (Vec<i64>, Vec<i64>, Option<Vec<i64>>, Option<Vec<i64>>);

/// Slice parameters of a Slice node, when constant.
fn slice_params(n: &NodeProto, infos: &Infos) -> Option<SliceParams> {
    let get = |i: usize| -> Option<Option<Vec<i64>>> {
        match n.input.get(i).filter(|s| !s.is_empty()) {
            None => Some(None),
            Some(name) => infos
                .ints(name)
                .map(|v| v.iter().map(Dim::val).collect::<Option<Vec<_>>>())
                .map(Some)?,
        }
    };
    if n.input.len() >= 3 {
        Some((get(1)??, get(2)??, get(3)?, get(4)?))
    } else {
        Some((
            attr_ints(n, "starts")?,
            attr_ints(n, "ends")?,
            attr_ints(n, "axes"),
            None,
        ))
    }
}

/// Clamped [start, end) with step 1 of a slice over a dimension of known size `len`.
fn clamp_range(start: i64, end: i64, len: i64) -> (i64, i64) {
    let fix = |v: i64| if v < 0 { (v + len).max(0) } else { v.min(len) };
    (fix(start), fix(end))
}

/// Runs inference over `graph`. `outer` supplies what is known about names from enclosing graphs.
pub fn infer(graph: &GraphProto, outer: Option<&Infos>) -> Infos {
    let mut infos = Infos::default();
    if let Some(o) = outer {
        infos.map = o.map.clone();
        infos.fresh = o.fresh + 100_000;
    }
    for t in &graph.initializer {
        if let Some(name) = &t.name {
            infos.map.insert(name.clone(), const_info(t));
        }
    }
    for vi in graph
        .input
        .iter()
        .chain(graph.value_info.iter())
        .chain(graph.output.iter())
    {
        let (elem, dims) = vi_dims(vi, &mut infos);
        let name = vi.name.clone().unwrap_or_default();
        let e = infos.map.entry(name).or_default();
        if e.elem.is_none() {
            e.elem = elem;
        }
        if e.dims.is_none() {
            e.dims = dims;
        }
    }
    for n in &graph.node {
        infer_node(n, &mut infos);
    }
    infos
}

fn set(infos: &mut Infos, name: &str, mut info: Info) {
    if name.is_empty() {
        return;
    }
    // value_info from the exporter fills gaps our rules leave (and names its symbols better).
    if let Some(old) = infos.map.get(name) {
        if info.elem.is_none() {
            info.elem = old.elem;
        }
        match (&info.dims, &old.dims) {
            (None, Some(_)) => info.dims = old.dims.clone(),
            (Some(new), Some(old_d)) if new.len() == old_d.len() => {
                let merged = new
                    .iter()
                    .zip(old_d)
                    .map(|(a, b)| match (a, b) {
                        (Dim::Sym(s), Dim::Val(v)) if s.starts_with('?') => Dim::Val(*v),
                        (Dim::Sym(s), Dim::Sym(t)) if s.starts_with('?') && !t.starts_with('?') => {
                            Dim::Sym(t.clone())
                        }
                        _ => a.clone(),
                    })
                    .collect();
                info.dims = Some(merged);
            }
            _ => {}
        }
    }
    infos.map.insert(name.to_string(), info);
}

fn infer_node(n: &NodeProto, infos: &mut Infos) {
    let op = n.op_type.as_deref().unwrap_or("");
    let domain = n.domain.as_deref().unwrap_or("");
    let inp = |i: usize| n.input.get(i).map(String::as_str).filter(|s| !s.is_empty());
    let get = |infos: &Infos, i: usize| {
        inp(i)
            .and_then(|s| infos.get(s))
            .cloned()
            .unwrap_or_default()
    };
    let out0 = n.output.first().cloned().unwrap_or_default();
    if domain == "com.microsoft" {
        infer_contrib(n, op, infos);
        return;
    }
    if !(domain.is_empty() || domain == "ai.onnx" || domain == "com.flash") {
        return;
    }
    let x = get(infos, 0);
    match op {
        "Constant" => {
            if let Some(t) = attr(n, "value").and_then(|a| a.t.as_ref()) {
                set(infos, &out0, const_info(t));
            } else if let Some(a) = attr(n, "value_float") {
                set(
                    infos,
                    &out0,
                    Info {
                        elem: Some(DataType::Float as i32),
                        dims: Some(vec![]),
                        ints: None,
                        scalar: a.f.map(f64::from),
                    },
                );
            } else if let Some(a) = attr(n, "value_int") {
                set(
                    infos,
                    &out0,
                    Info {
                        elem: Some(DataType::Int64 as i32),
                        dims: Some(vec![]),
                        ints: a.i.map(|v| vec![Dim::Val(v)]),
                        scalar: None,
                    },
                );
            } else if let Some(a) = attr(n, "value_ints") {
                let v = a.ints.iter().map(|&v| Dim::Val(v)).collect::<Vec<_>>();
                set(
                    infos,
                    &out0,
                    Info {
                        elem: Some(DataType::Int64 as i32),
                        dims: Some(vec![Dim::Val(v.len() as i64)]),
                        ints: Some(v),
                        scalar: None,
                    },
                );
            } else if let Some(a) = attr(n, "value_floats") {
                let dims = vec![Dim::Val(a.floats.len() as i64)];
                let scalar = (a.floats.len() == 1).then(|| a.floats[0] as f64);
                set(
                    infos,
                    &out0,
                    Info {
                        elem: Some(DataType::Float as i32),
                        dims: Some(dims),
                        ints: None,
                        scalar,
                    },
                );
            }
        }
        "Identity"
        | "Softmax"
        | "LogSoftmax"
        | "Tanh"
        | "Sqrt"
        | "Neg"
        | "Relu"
        | "Sigmoid"
        | "Erf"
        | "Exp"
        | "Log"
        | "Abs"
        | "Reciprocal"
        | "Floor"
        | "Ceil"
        | "Trilu"
        | "CumSum"
        | "Dropout"
        | "LayerNormalization"
        | "Gelu"
        | "Softplus"
        | "Clip"
        | "Sign"
        | "Round"
        | "Not"
        | "IsNaN"
        | "IsInf"
        | "Cast"
        | "CastLike"
        | "Sin"
        | "Cos"
        | "Selu"
        | "Elu"
        | "SimplifiedLayerNormalization"
        | "BatchNormalization"
        | "HardSigmoid" => {
            let mut info = Info::typed(x.elem, x.dims.clone());
            match op {
                "Cast" => info.elem = attr_i(n, "to").map(|v| v as i32),
                "CastLike" => info.elem = get(infos, 1).elem,
                "Not" | "IsNaN" | "IsInf" => info.elem = Some(DataType::Bool as i32),
                _ => {}
            }
            let is_int_out = info.elem.is_some_and(|e| !tensor::is_float(e));
            match op {
                "Identity" => {
                    info.ints = x.ints.clone();
                    info.scalar = x.scalar;
                }
                "Cast" | "CastLike" => {
                    if is_int_out {
                        info.ints = x.ints.clone().or_else(|| {
                            x.scalar
                                .filter(|s| s.fract() == 0.0)
                                .map(|s| vec![Dim::Val(s as i64)])
                        });
                    } else {
                        info.scalar = x.scalar.or(match x.ints.as_deref() {
                            Some([Dim::Val(v)]) => Some(*v as f64),
                            _ => None,
                        });
                    }
                }
                "Sqrt" => info.scalar = x.scalar.map(f64::sqrt),
                "Neg" => info.scalar = x.scalar.map(|v| -v),
                "Reciprocal" => info.scalar = x.scalar.map(|v| 1.0 / v),
                "Tanh" => info.scalar = x.scalar.map(f64::tanh),
                _ => {}
            }
            set(infos, &out0, info);
            if op == "Dropout" {
                if let Some(mask) = n.output.get(1) {
                    let elem = Some(DataType::Bool as i32);
                    set(infos, mask, Info::typed(elem, x.dims.clone()));
                }
            }
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Equal" | "Less" | "LessOrEqual" | "Greater"
        | "GreaterOrEqual" | "And" | "Or" | "Xor" | "Max" | "Min" | "Mod" | "Where" => {
            let ins: Vec<Info> = (0..n.input.len()).map(|i| get(infos, i)).collect();
            let dims = ins.iter().try_fold(Vec::new(), |acc: Vec<Dim>, i| {
                i.dims.as_ref().map(|d| broadcast(&acc, d, infos))
            });
            let elem = match op {
                "Equal" | "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual" | "And" | "Or"
                | "Xor" => Some(DataType::Bool as i32),
                "Where" => ins
                    .get(1)
                    .and_then(|i| i.elem)
                    .or(ins.get(2).and_then(|i| i.elem)),
                _ => ins.iter().find_map(|i| i.elem),
            };
            let mut info = Info::typed(elem, dims);
            if ins.len() == 2 {
                let (a, b) = (&ins[0], &ins[1]);
                if let (Some(x), Some(y)) = (a.scalar, b.scalar) {
                    info.scalar = float_arith(op, x, y);
                }
                if let (Some(x), Some(y)) = (&a.ints, &b.ints) {
                    let n = x.len().max(y.len());
                    if (x.len() == n || x.len() == 1) && (y.len() == n || y.len() == 1) {
                        info.ints = (0..n)
                            .map(|i| int_arith(op, broadcast_at(x, i)?, broadcast_at(y, i)?))
                            .collect();
                    }
                }
            }
            if op == "Where" && ins.len() == 3 {
                if let (Some(c), Some(a), Some(b)) = (&ins[0].ints, &ins[1].ints, &ins[2].ints) {
                    let n = c.len().max(a.len()).max(b.len());
                    info.ints = (0..n)
                        .map(|i| match broadcast_at(c, i)? {
                            Dim::Val(0) => broadcast_at(b, i).cloned(),
                            Dim::Val(_) => broadcast_at(a, i).cloned(),
                            Dim::Sym(_) => None,
                        })
                        .collect();
                }
            }
            set(infos, &out0, info);
        }
        "Gemm" => {
            let b = get(infos, 1);
            let ta = attr_i(n, "transA").unwrap_or(0) != 0;
            let tb = attr_i(n, "transB").unwrap_or(0) != 0;
            let dims = match (&x.dims, &b.dims) {
                (Some(a), Some(bd)) if a.len() == 2 && bd.len() == 2 => Some(vec![
                    a[if ta { 1 } else { 0 }].clone(),
                    bd[if tb { 0 } else { 1 }].clone(),
                ]),
                _ => Some(infos.fresh_dims(2)),
            };
            set(infos, &out0, Info::typed(x.elem, dims));
        }
        "Flatten" => {
            let dims = Some(match (&x.dims, attr_i(n, "axis").unwrap_or(1)) {
                (Some(d), a) if a >= 0 && (a as usize) <= d.len() => {
                    let a = a as usize;
                    let prod = |s: &[Dim]| s.iter().try_fold(1i64, |a, d| a.checked_mul(d.val()?));
                    let (l, r) = (prod(&d[..a]), prod(&d[a..]));
                    vec![
                        l.map(Dim::Val).unwrap_or_else(|| infos.fresh()),
                        r.map(Dim::Val).unwrap_or_else(|| infos.fresh()),
                    ]
                }
                _ => infos.fresh_dims(2),
            });
            set(infos, &out0, Info::typed(x.elem, dims));
        }
        "Split" => {
            let axis = attr_i(n, "axis").unwrap_or(0);
            let sizes = split_sizes(n, infos, x.dims.as_deref(), axis);
            for (k, o) in n.output.iter().enumerate() {
                let dims = x.dims.as_ref().and_then(|d| {
                    let a = norm_axis(axis, d.len())?;
                    let mut d = d.clone();
                    d[a] = sizes.get(k).cloned().unwrap_or_else(|| infos.fresh());
                    Some(d)
                });
                set(infos, o, Info::typed(x.elem, dims));
            }
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL2" => {
            let keep = attr_i(n, "keepdims").unwrap_or(1) != 0;
            let axes = axes(n, infos);
            let dims = x.dims.as_ref().and_then(|d| {
                let axes: Vec<usize> = match &axes {
                    Some(a) if !a.is_empty() => a
                        .iter()
                        .map(|&a| norm_axis(a, d.len()))
                        .collect::<Option<_>>()?,
                    _ => (0..d.len()).collect(),
                };
                Some(
                    d.iter()
                        .enumerate()
                        .filter_map(|(i, x)| match (axes.contains(&i), keep) {
                            (false, _) => Some(x.clone()),
                            (true, true) => Some(Dim::Val(1)),
                            (true, false) => None,
                        })
                        .collect(),
                )
            });
            set(infos, &out0, Info::typed(x.elem, dims));
        }
        "Conv" | "Tile" | "Pad" | "Resize" => {
            let dims = x.dims.as_ref().map(|d| infos.fresh_dims(d.len()));
            set(infos, &out0, Info::typed(x.elem, dims));
        }
        "MatMul" => {
            let b = get(infos, 1);
            let dims = match (&x.dims, &b.dims) {
                (Some(a), Some(bd)) if a.len() >= 2 && bd.len() >= 2 => {
                    let mut out = broadcast(&a[..a.len() - 2], &bd[..bd.len() - 2], infos);
                    out.push(a[a.len() - 2].clone());
                    out.push(bd[bd.len() - 1].clone());
                    Some(out)
                }
                _ => None,
            };
            set(infos, &out0, Info::typed(x.elem, dims));
        }
        "Transpose" => {
            let dims = x.dims.as_ref().and_then(|d| {
                let perm =
                    attr_ints(n, "perm").unwrap_or_else(|| (0..d.len() as i64).rev().collect());
                (perm.len() == d.len())
                    .then(|| {
                        perm.iter()
                            .map(|&p| d.get(p as usize).cloned())
                            .collect::<Option<Vec<_>>>()
                    })
                    .flatten()
            });
            set(infos, &out0, Info::typed(x.elem, dims));
        }
        "Reshape" => {
            let target = get(infos, 1);
            let allowzero = attr_i(n, "allowzero").unwrap_or(0) != 0;
            let dims = match &target.ints {
                Some(t) => {
                    let mut out: Vec<Option<Dim>> = t
                        .iter()
                        .enumerate()
                        .map(|(i, d)| match d {
                            Dim::Val(0) if !allowzero => {
                                x.dims.as_ref().and_then(|xd| xd.get(i).cloned())
                            }
                            Dim::Val(-1) => None,
                            other => Some(other.clone()),
                        })
                        .collect();
                    if let Some(pos) = t.iter().position(|d| *d == Dim::Val(-1)) {
                        let others: Option<Vec<Dim>> = out
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| *i != pos)
                            .map(|(_, d)| d.clone())
                            .collect();
                        out[pos] = match (&x.dims, others) {
                            (Some(xd), Some(others)) => infer_minus_one(xd, &others),
                            _ => None,
                        };
                    }
                    Some(
                        out.into_iter()
                            .map(|d| d.unwrap_or_else(|| infos.fresh()))
                            .collect(),
                    )
                }
                None => match target.dims.as_deref() {
                    Some([Dim::Val(r)]) if *r >= 0 && *r <= 16 => {
                        Some(infos.fresh_dims(*r as usize))
                    }
                    _ => None,
                },
            };
            let ints = x.ints.clone();
            set(
                infos,
                &out0,
                Info {
                    elem: x.elem,
                    dims,
                    ints,
                    scalar: x.scalar,
                },
            );
        }
        "Unsqueeze" | "Squeeze" => {
            let axes = axes(n, infos);
            let dims = x.dims.as_ref().and_then(|d| {
                if op == "Unsqueeze" {
                    let axes = axes.as_ref()?;
                    let r = d.len() + axes.len();
                    let mut ax: Vec<usize> = axes
                        .iter()
                        .map(|&a| norm_axis(a, r))
                        .collect::<Option<_>>()?;
                    ax.sort_unstable();
                    let mut src = d.iter();
                    Some(
                        (0..r)
                            .map(|i| {
                                if ax.contains(&i) {
                                    Some(Dim::Val(1))
                                } else {
                                    src.next().cloned()
                                }
                            })
                            .collect::<Option<Vec<_>>>()?,
                    )
                } else {
                    match &axes {
                        Some(axes) => {
                            let ax: Vec<usize> = axes
                                .iter()
                                .map(|&a| norm_axis(a, d.len()))
                                .collect::<Option<_>>()?;
                            Some(
                                d.iter()
                                    .enumerate()
                                    .filter(|(i, _)| !ax.contains(i))
                                    .map(|(_, x)| x.clone())
                                    .collect(),
                            )
                        }
                        None if d.iter().all(|x| x.val().is_some()) => {
                            Some(d.iter().filter(|x| **x != Dim::Val(1)).cloned().collect())
                        }
                        None => None,
                    }
                }
            });
            set(
                infos,
                &out0,
                Info {
                    elem: x.elem,
                    dims,
                    ints: x.ints.clone(),
                    scalar: x.scalar,
                },
            );
        }
        "Expand" => {
            let t = get(infos, 1);
            let dims = match (&x.dims, &t.ints, t.dims.as_deref()) {
                (Some(d), Some(s), _) => Some(broadcast(d, s, infos)),
                // Target values unknown but its length known: the rank is still proven.
                (Some(d), None, Some([Dim::Val(r)])) if *r >= 0 && *r <= 16 => {
                    let r = (*r as usize).max(d.len());
                    Some(infos.fresh_dims(r))
                }
                _ => None,
            };
            set(
                infos,
                &out0,
                Info {
                    elem: x.elem,
                    dims,
                    ints: None,
                    scalar: x.scalar,
                },
            );
        }
        "Concat" => {
            let ins: Vec<Info> = (0..n.input.len()).map(|i| get(infos, i)).collect();
            let axis = attr_i(n, "axis").unwrap_or(0);
            let dims = ins.first().and_then(|f| f.dims.clone()).and_then(|first| {
                let ax = norm_axis(axis, first.len())?;
                let mut total = Some(0i64);
                for i in &ins {
                    let d = i.dims.as_ref()?;
                    if d.len() != first.len() {
                        return None;
                    }
                    total = total.and_then(|t| d[ax].val().and_then(|v| t.checked_add(v)));
                }
                let mut out = first;
                out[ax] = total.map(Dim::Val).unwrap_or(Dim::Sym(String::new()));
                Some(out)
            });
            let dims = dims.map(|mut d| {
                for x in d.iter_mut() {
                    if *x == Dim::Sym(String::new()) {
                        *x = infos.fresh();
                    }
                }
                d
            });
            let ints = if ins.iter().all(|i| i.rank().is_some_and(|r| r <= 1)) {
                ins.iter().try_fold(Vec::new(), |mut acc, i| {
                    acc.extend(i.ints.clone()?);
                    Some(acc)
                })
            } else {
                None
            };
            set(
                infos,
                &out0,
                Info {
                    elem: ins.first().and_then(|i| i.elem),
                    dims,
                    ints,
                    scalar: None,
                },
            );
        }
        "Shape" => {
            let ints = x.dims.as_ref().map(|d| {
                let r = d.len() as i64;
                let fix = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let s = fix(attr_i(n, "start").unwrap_or(0));
                let e = fix(attr_i(n, "end").unwrap_or(r));
                d[s..e.max(s)].to_vec()
            });
            let dims = Some(vec![ints
                .as_ref()
                .map(|v| Dim::Val(v.len() as i64))
                .unwrap_or_else(|| infos.fresh())]);
            set(
                infos,
                &out0,
                Info {
                    elem: Some(DataType::Int64 as i32),
                    dims,
                    ints,
                    scalar: None,
                },
            );
        }
        "Size" => set(
            infos,
            &out0,
            Info::typed(Some(DataType::Int64 as i32), Some(vec![])),
        ),
        "Gather" => {
            let idx = get(infos, 1);
            let axis = attr_i(n, "axis").unwrap_or(0);
            let dims = match (&x.dims, &idx.dims) {
                (Some(d), Some(id)) => norm_axis(axis, d.len()).map(|a| {
                    let mut out = d[..a].to_vec();
                    out.extend(id.iter().cloned());
                    out.extend(d[a + 1..].iter().cloned());
                    out
                }),
                _ => None,
            };
            let ints = match (&x.ints, &idx.ints, x.rank()) {
                (Some(v), Some(ix), Some(1)) => ix
                    .iter()
                    .map(|i| {
                        let i = i.val()?;
                        let i = if i < 0 { i + v.len() as i64 } else { i };
                        v.get(usize::try_from(i).ok()?).cloned()
                    })
                    .collect(),
                _ => None,
            };
            set(
                infos,
                &out0,
                Info {
                    elem: x.elem,
                    dims,
                    ints,
                    scalar: None,
                },
            );
        }
        // The output has the indices' shape and the data's type.
        "GatherElements" => {
            let idx = get(infos, 1);
            set(infos, &out0, Info::typed(x.elem, idx.dims.clone()));
        }
        "Slice" => {
            let params = slice_params(n, infos);
            let mut dims = x.dims.clone();
            let mut ints = None;
            match (&params, &mut dims) {
                (Some((starts, ends, axes, steps)), Some(d)) => {
                    let axes = axes
                        .clone()
                        .unwrap_or_else(|| (0..starts.len() as i64).collect());
                    let ok = starts.len() == ends.len() && axes.len() == starts.len();
                    for (k, &a) in axes
                        .iter()
                        .enumerate()
                        .take(if ok { axes.len() } else { 0 })
                    {
                        let Some(a) = norm_axis(a, d.len()) else {
                            continue;
                        };
                        let step = steps.as_ref().and_then(|s| s.get(k)).copied().unwrap_or(1);
                        d[a] = match (&d[a], step) {
                            (Dim::Val(len), 1) => {
                                let (s, e) = clamp_range(starts[k], ends[k], *len);
                                Dim::Val((e - s).max(0))
                            }
                            (same, 1) if starts[k] == 0 && ends[k] >= i32::MAX as i64 => {
                                same.clone()
                            }
                            _ => infos.fresh(),
                        };
                    }
                    if let (Some(v), 1, true) = (&x.ints, d.len(), ok) {
                        let step = steps.as_ref().and_then(|s| s.first()).copied().unwrap_or(1);
                        if step == 1 && !starts.is_empty() {
                            let (s, e) = clamp_range(starts[0], ends[0], v.len() as i64);
                            ints = Some(v[s as usize..(e.max(s)) as usize].to_vec());
                        }
                    }
                }
                (None, Some(d)) => {
                    let r = d.len();
                    *d = infos.fresh_dims(r);
                }
                _ => {}
            }
            set(
                infos,
                &out0,
                Info {
                    elem: x.elem,
                    dims,
                    ints,
                    scalar: None,
                },
            );
        }
        "ConstantOfShape" => {
            let t = attr(n, "value").and_then(|a| a.t.as_ref());
            let elem = t.and_then(|t| t.data_type).or(Some(DataType::Float as i32));
            let dims = x.ints.clone().or_else(|| match x.dims.as_deref() {
                Some([Dim::Val(r)]) if *r >= 0 && *r <= 16 => Some(infos.fresh_dims(*r as usize)),
                _ => None,
            });
            let single = dims
                .as_ref()
                .is_some_and(|d| d.iter().all(|v| *v == Dim::Val(1)));
            let scalar = if single {
                t.and_then(tensor::floats)
                    .and_then(|v| v.first().copied())
                    .or(Some(0.0))
            } else {
                None
            };
            // Small integer fills (torch's `expand` writes ConstantOfShape(…) · −1) keep values.
            let ints = match (dims.as_deref(), t.and_then(tensor::ints).as_deref()) {
                (Some([Dim::Val(n)]), Some([fill])) if (0..=64).contains(n) => {
                    Some(vec![Dim::Val(*fill); *n as usize])
                }
                _ => None,
            };
            set(
                infos,
                &out0,
                Info {
                    elem,
                    dims,
                    ints,
                    scalar,
                },
            );
        }
        "Range" => {
            // Range(0, n, 1) has n elements; anything else gets a fresh symbol.
            let scalar = |k: usize| match inp(k).and_then(|s| infos.ints(s)) {
                Some([d]) => Some(d.clone()),
                _ => None,
            };
            let len = match (scalar(0), scalar(1), scalar(2)) {
                (Some(Dim::Val(0)), Some(n), Some(Dim::Val(1))) => n,
                (Some(Dim::Val(a)), Some(Dim::Val(b)), Some(Dim::Val(d))) if d != 0 => {
                    Dim::Val(((b as f64 - a as f64) / d as f64).ceil().max(0.0) as i64)
                }
                _ => infos.fresh(),
            };
            let dims = Some(vec![len]);
            set(infos, &out0, Info::typed(x.elem, dims));
        }
        "Attention" | "FlashAttention" => {
            let v = get(infos, 2);
            let dims = match (&x.dims, &v.dims) {
                (Some(q), Some(vd)) if q.len() == 4 && vd.len() == 4 => Some(vec![
                    q[0].clone(),
                    q[1].clone(),
                    q[2].clone(),
                    vd[3].clone(),
                ]),
                (Some(q), Some(_)) if q.len() == 3 => {
                    Some(vec![q[0].clone(), q[1].clone(), infos.fresh()])
                }
                _ => None,
            };
            set(infos, &out0, Info::typed(x.elem, dims));
        }
        _ => {}
    }
}

/// The sizes of a Split's parts along `axis`: the `split` input (opset 13+) or attribute, else
/// equal parts of a known dim (GPT-2 splits its fused QKV projection into three equal parts).
fn split_sizes(n: &NodeProto, infos: &Infos, dims: Option<&[Dim]>, axis: i64) -> Vec<Dim> {
    let given = n.input.get(1).filter(|s| !s.is_empty());
    if let Some(sizes) = given.and_then(|s| infos.ints(s)) {
        return sizes.to_vec();
    }
    if let Some(sizes) = attr_ints(n, "split").filter(|v| !v.is_empty()) {
        return sizes.into_iter().map(Dim::Val).collect();
    }
    let parts = n.output.len() as i64;
    let whole = dims.and_then(|d| d.get(norm_axis(axis, d.len())?)?.val());
    match whole {
        Some(w) if given.is_none() && parts > 0 && w % parts == 0 => {
            vec![Dim::Val(w / parts); parts as usize]
        }
        _ => vec![],
    }
}

/// ONNX Runtime's contrib ops that its transformer optimizer writes between attention layers.
/// Without them every shape after the first fused LayerNorm is unknown, and nothing downstream
/// (head counts, the head split of the next layer) can be proven.
fn infer_contrib(n: &NodeProto, op: &str, infos: &mut Infos) {
    let info = |infos: &Infos, i: usize| {
        n.input
            .get(i)
            .and_then(|s| infos.get(s))
            .cloned()
            .unwrap_or_default()
    };
    // Outputs shaped and typed like input 0: the (skip) normalizations' output and their
    // input+skip+bias sum (output 3), and the elementwise activations.
    let like_input: &[usize] = match op {
        "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization" => &[0, 3],
        "BiasGelu" | "FastGelu" | "Gelu" | "QuickGelu" | "BiasAdd" => &[0],
        "EmbedLayerNormalization" => {
            // input_ids [B, S] and word_embedding [vocab, hidden] give output and
            // embedding_sum [B, S, hidden]; mask_index (output 1) depends on the mask format.
            let (ids, table) = (info(infos, 0), info(infos, 2));
            let dims = match (ids.dims, table.dims.as_deref()) {
                (Some(mut d), Some([_, hidden])) if d.len() == 2 => {
                    d.push(hidden.clone());
                    Some(d)
                }
                _ => None,
            };
            for k in [0, 2] {
                if let Some(o) = n.output.get(k) {
                    set(infos, o, Info::typed(table.elem, dims.clone()));
                }
            }
            return;
        }
        _ => return,
    };
    let x = info(infos, 0);
    for &k in like_input {
        if let Some(o) = n.output.get(k) {
            set(infos, o, Info::typed(x.elem, x.dims.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_rules() {
        let mut i = Infos::default();
        let a = vec![Dim::Sym("B".into()), Dim::Val(1), Dim::Val(4)];
        let b = vec![Dim::Val(3), Dim::Val(4)];
        assert_eq!(
            broadcast(&a, &b, &mut i),
            vec![Dim::Sym("B".into()), Dim::Val(3), Dim::Val(4)]
        );
    }

    #[test]
    fn arithmetic_on_symbols() {
        let s = Dim::Sym("S".into());
        assert_eq!(int_arith("Sub", &s, &s), Some(Dim::Val(0)));
        assert_eq!(
            int_arith("Mul", &Dim::Val(2), &Dim::Val(3)),
            Some(Dim::Val(6))
        );
        assert_eq!(int_arith("Add", &s, &Dim::Val(1)), None);
    }

    #[test]
    fn contrib_ops_pass_their_input_shape_on() {
        let bsd = vec![Dim::Sym("B".into()), Dim::Sym("S".into()), Dim::Val(64)];
        let mut infos = Infos::default();
        infos
            .map
            .insert("x".into(), Info::typed(Some(1), Some(bsd.clone())));
        let node = |op: &str, outputs: &[&str]| NodeProto {
            op_type: Some(op.into()),
            domain: Some("com.microsoft".into()),
            input: vec!["x".into(), "x".into(), "g".into()],
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        infer_node(
            &node("SkipLayerNormalization", &["y", "", "", "sum"]),
            &mut infos,
        );
        infer_node(&node("BiasGelu", &["z"]), &mut infos);
        infer_node(&node("SomethingElse", &["w"]), &mut infos);
        for t in ["y", "sum", "z"] {
            assert_eq!(infos.dims(t), Some(bsd.as_slice()), "{t}");
            assert_eq!(infos.elem(t), Some(1), "{t}");
        }
        assert!(infos.get("w").is_none());
        assert!(infos.get("").is_none());
    }
}
