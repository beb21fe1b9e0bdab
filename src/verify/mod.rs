//! placeholder module: owned by the rewrite-tool work (issue 3).
