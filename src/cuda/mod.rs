//! CUDA side (feature `cuda`): owned by the CUDA work (issue 4).
