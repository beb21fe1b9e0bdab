//! Reading and writing `.onnx` files: decode with bounds checks, validate external-data
//! references (never loading them), and write a model next to (or away from) its weights.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Component, Path, PathBuf};

use prost::Message;

use super::onnx::{tensor_proto::DataLocation, GraphProto, ModelProto, TensorProto};
use crate::{Error, Result};

/// Protobuf's hard limit on a message; ONNX files above it need external data.
const MAX_MODEL_BYTES: u64 = 2 << 30;

/// A decoded model and the folder its external-data paths are relative to.
pub struct LoadedModel {
    pub model: ModelProto,
    /// Folder of the `.onnx` file.
    pub dir: PathBuf,
    /// External-data files the model references (relative, validated, existing).
    pub external_files: BTreeSet<PathBuf>,
}

/// Reads and decodes `path`, then checks every external-data reference.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    let meta = fs::metadata(path)
        .map_err(|e| Error::InvalidArgument(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a file",
            path.display()
        )));
    }
    if meta.len() > MAX_MODEL_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{} is {} bytes, above protobuf's 2 GiB limit for one message",
            path.display(),
            meta.len()
        )));
    }
    let bytes = fs::read(path)
        .map_err(|e| Error::InvalidArgument(format!("cannot read {}: {e}", path.display())))?;
    let model = decode_model(bytes, &path.display().to_string())?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    let external_files = check_external_data(&model, &dir)?;
    Ok(LoadedModel {
        model,
        dir,
        external_files,
    })
}

/// Decodes a serialized model. `what` names the source in errors.
pub fn decode_model(bytes: Vec<u8>, what: &str) -> Result<ModelProto> {
    if bytes.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{what} is empty, not an ONNX model"
        )));
    }
    // Decoding from `Bytes` lets tensor `raw_data` borrow the file buffer instead of copying it;
    // prost checks every length against the bytes left, so a lying length cannot allocate.
    let model = ModelProto::decode(prost::bytes::Bytes::from(bytes)).map_err(|e| {
        Error::InvalidArgument(format!(
            "{what} is not a valid ONNX model (truncated or corrupt protobuf: {e})"
        ))
    })?;
    if model.graph.is_none() {
        return Err(Error::InvalidArgument(format!(
            "{what} is not an ONNX model: it has no graph"
        )));
    }
    if model.ir_version.unwrap_or(0) <= 0 {
        return Err(Error::InvalidArgument(format!(
            "{what} is not an ONNX model: no ir_version"
        )));
    }
    super::validate::check_model(&model)
        .map_err(|e| Error::InvalidArgument(format!("{what} is not a valid ONNX model: {e}")))?;
    Ok(model)
}

/// Serializes `model`.
pub fn encode_model(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Writes `model` to `out`. External-data files live beside the source model; when `out` is in
/// another folder they are hard-linked there (copied, streaming, where links are impossible) so
/// the relative references keep working. Existing identical-size files are left as they are.
pub fn save_model(model: &ModelProto, out: &Path, source: &LoadedModel) -> Result<()> {
    let out_dir = out.parent().map(Path::to_path_buf).unwrap_or_default();
    let out_dir = if out_dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        out_dir
    };
    fs::create_dir_all(&out_dir)
        .map_err(|e| Error::Other(format!("cannot create {}: {e}", out_dir.display())))?;
    let same_dir = match (fs::canonicalize(&out_dir), fs::canonicalize(&source.dir)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same_dir {
        for rel in &source.external_files {
            let (from, to) = (source.dir.join(rel), out_dir.join(rel));
            let src_len = fs::metadata(&from).map(|m| m.len()).ok();
            if fs::metadata(&to).map(|m| m.len()).ok() == src_len && src_len.is_some() {
                continue;
            }
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).map_err(|e| {
                    Error::Other(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
            let _ = fs::remove_file(&to);
            if fs::hard_link(&from, &to).is_err() {
                fs::copy(&from, &to).map_err(|e| {
                    Error::Other(format!(
                        "cannot copy external data {} to {}: {e}",
                        from.display(),
                        to.display()
                    ))
                })?;
            }
        }
    }
    let bytes = encode_model(model);
    // Write to a temporary name and rename, so a failed write never leaves a half file at `out`
    // (and fusing a model onto itself reads the old file fully before replacing it).
    let tmp = out.with_extension("onnx.tmp");
    fs::write(&tmp, &bytes)
        .map_err(|e| Error::Other(format!("cannot write {}: {e}", tmp.display())))?;
    fs::rename(&tmp, out)
        .map_err(|e| Error::Other(format!("cannot write {}: {e}", out.display())))?;
    Ok(())
}

/// Every tensor of the model that may carry external data: initializers, sparse initializers,
/// tensor attributes and the same inside subgraphs and functions.
pub fn for_each_tensor<'a>(model: &'a ModelProto, f: &mut dyn FnMut(&'a TensorProto)) {
    if let Some(g) = &model.graph {
        graph_tensors(g, f);
    }
    for func in &model.functions {
        for n in &func.node {
            for a in &n.attribute {
                attr_tensors(a, f);
            }
        }
    }
}

fn graph_tensors<'a>(g: &'a GraphProto, f: &mut dyn FnMut(&'a TensorProto)) {
    g.initializer.iter().for_each(&mut *f);
    for s in &g.sparse_initializer {
        s.values.iter().chain(s.indices.iter()).for_each(&mut *f);
    }
    for n in &g.node {
        for a in &n.attribute {
            attr_tensors(a, f);
        }
    }
}

fn attr_tensors<'a>(a: &'a super::onnx::AttributeProto, f: &mut dyn FnMut(&'a TensorProto)) {
    a.t.iter().chain(a.tensors.iter()).for_each(&mut *f);
    for g in a.g.iter().chain(a.graphs.iter()) {
        graph_tensors(g, f);
    }
}

/// Whether a tensor's bytes live in an external file.
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(DataLocation::External as i32)
}

/// The value of an `external_data` key of `t`.
pub fn external_entry<'a>(t: &'a TensorProto, key: &str) -> Option<&'a str> {
    t.external_data
        .iter()
        .find(|e| e.key.as_deref() == Some(key))
        .and_then(|e| e.value.as_deref())
}

/// Validates every external-data reference: a relative path that stays inside `dir`, an
/// existing file, and an offset/length inside it. Returns the referenced files.
pub fn check_external_data(model: &ModelProto, dir: &Path) -> Result<BTreeSet<PathBuf>> {
    let mut files = BTreeSet::new();
    let mut err = None;
    for_each_tensor(model, &mut |t| {
        if err.is_some() || !is_external(t) {
            return;
        }
        if let Err(e) = check_one(t, dir, &mut files) {
            err = Some(e);
        }
    });
    match err {
        Some(e) => Err(e),
        None => Ok(files),
    }
}

fn check_one(t: &TensorProto, dir: &Path, files: &mut BTreeSet<PathBuf>) -> Result<()> {
    let name = t.name.as_deref().unwrap_or("<unnamed>");
    let loc = external_entry(t, "location").ok_or_else(|| {
        Error::InvalidArgument(format!(
            "tensor '{name}' is marked external but has no location"
        ))
    })?;
    let rel = safe_relative(loc).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "tensor '{name}': external-data path '{loc}' is absolute or leaves the model's folder; refused"
        ))
    })?;
    let full = dir.join(&rel);
    let meta = fs::metadata(&full).map_err(|e| {
        Error::InvalidArgument(format!(
            "tensor '{name}': external data file {} is missing: {e}",
            full.display()
        ))
    })?;
    // A symlink inside the folder may still point outside it.
    if let (Ok(real), Ok(root)) = (fs::canonicalize(&full), fs::canonicalize(dir)) {
        if !real.starts_with(&root) {
            return Err(Error::InvalidArgument(format!(
                "tensor '{name}': external-data path '{loc}' resolves outside the model's folder; refused"
            )));
        }
    }
    let parse = |key: &str| -> Result<Option<u64>> {
        match external_entry(t, key) {
            None => Ok(None),
            Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
                Error::InvalidArgument(format!(
                    "tensor '{name}': external-data {key} '{v}' is not a number"
                ))
            }),
        }
    };
    let offset = parse("offset")?.unwrap_or(0);
    let len = parse("length")?;
    let end = offset.checked_add(len.unwrap_or(0));
    if end.is_none_or(|e| e > meta.len()) || offset > meta.len() {
        return Err(Error::InvalidArgument(format!(
            "tensor '{name}': external data offset {offset} + length {} runs past the end of {} ({} bytes)",
            len.unwrap_or(0),
            full.display(),
            meta.len()
        )));
    }
    files.insert(rel);
    Ok(())
}

/// `loc` as a normalized relative path, or `None` when it is absolute or climbs out with `..`.
fn safe_relative(loc: &str) -> Option<PathBuf> {
    let p = Path::new(loc);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(safe_relative("w.bin"), Some(PathBuf::from("w.bin")));
        assert_eq!(safe_relative("./d/w.bin"), Some(PathBuf::from("d/w.bin")));
        assert_eq!(safe_relative("../w.bin"), None);
        assert_eq!(safe_relative("d/../../w.bin"), None);
        assert_eq!(safe_relative("/etc/passwd"), None);
        assert_eq!(safe_relative(""), None);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_model(vec![], "x").is_err());
        assert!(decode_model(b"hello world, not protobuf".to_vec(), "x").is_err());
        assert!(decode_model(vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f], "x").is_err());
    }
}
