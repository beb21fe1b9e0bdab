"""Writes the tiny ONNX models the Rust integration tests load (run: .venv/bin/python tests/data/make_models.py)."""
from pathlib import Path

from onnx import TensorProto as TP
from onnx import helper, save

here = Path(__file__).parent
# GQA (4 query heads over 2 KV heads), causal, a [B, 1, 1, T] bool padding mask, symbolic B/S/T.
inputs = [
    helper.make_tensor_value_info("Q", TP.FLOAT, ["B", 4, "S", 32]),
    helper.make_tensor_value_info("K", TP.FLOAT, ["B", 2, "T", 32]),
    helper.make_tensor_value_info("V", TP.FLOAT, ["B", 2, "T", 32]),
    helper.make_tensor_value_info("attn_mask", TP.BOOL, ["B", 1, 1, "T"]),
]
node = helper.make_node("FlashAttention", ["Q", "K", "V", "attn_mask"], ["Y"], domain="com.flash", is_causal=1)
graph = helper.make_graph([node], "flash_gqa_causal_mask", inputs, [helper.make_tensor_value_info("Y", TP.FLOAT, ["B", 4, "S", 32])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.flash", 1)], ir_version=9)
save(model, here / "flash_gqa_causal_mask.onnx")
