"""ONNX form of the adaptive ops: one `vqs` node per use, with a function body of standard ONNX ops.

Each use of SGS / ATS in an exported graph is one node (domain `vqs`, op type
`SimilarityGuidedSampling` / `AdaptiveTokenSampler`). The model carries a FunctionProto of the same
name whose body is made of opset-18 ops, so ONNX Runtime runs the model by inlining it, and a
TensorRT plugin registered under the same name can replace it. The bodies are the CPU
implementation: SGS computes only the bins it keeps; ATS gathers the rows it keeps from A·V.

Route (DESIGN.md §3): `torch.onnx.export(dynamo=True, custom_translation_table=translation_table())`
turns each custom op into its `vqs` node (the op schemas registered here give the node its
outputs), then `attach_functions` adds the bodies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import onnx
import onnxscript
import torch
from onnxscript import BOOL, FLOAT, INT64
from onnxscript import opset18 as op

from export import onnx_export
from export.adaptive import ats as _ats  # noqa: F401  (registers torch.ops.vqs.*)
from export.adaptive import sgs as _sgs  # noqa: F401

DOMAIN = "vqs"
VERSION = 1
OPSET = 18
SGS_OP_TYPE = "SimilarityGuidedSampling"
ATS_OP_TYPE = "AdaptiveTokenSampler"

vqs = onnxscript.values.Opset(DOMAIN, VERSION)

_SCHEMAS = {
    SGS_OP_TYPE: (
        [("features", "T"), ("z", "T"), ("bins", "tensor(int64)")],
        [("sampled", "T"), ("mask", "tensor(bool)")],
    ),
    ATS_OP_TYPE: (
        [("x", "T"), ("attn", "T"), ("v", "T"), ("mask", "tensor(bool)"), ("k", "tensor(int64)")],
        [("attended", "T"), ("residual", "T"), ("kept_mask", "tensor(bool)"), ("index", "tensor(int64)")],
    ),
}


def register_schemas() -> None:
    """Declare the two ops to onnx (once per process) so the exporter knows their outputs."""
    for name, (inputs, outputs) in _SCHEMAS.items():
        if onnx.defs.has(name, DOMAIN):
            continue
        onnx.defs.register_schema(
            onnx.defs.OpSchema(
                name,
                DOMAIN,
                VERSION,
                inputs=[onnx.defs.OpSchema.FormalParameter(n, t) for n, t in inputs],
                outputs=[onnx.defs.OpSchema.FormalParameter(n, t) for n, t in outputs],
                type_constraints=[("T", ["tensor(float)"], "float32 features")],
            )
        )


@onnxscript.script(vqs, default_opset=op)
def SimilarityGuidedSampling(features: FLOAT, z: FLOAT, bins: INT64):
    # Same arithmetic and bin order as export.adaptive.sgs.sample (see there for the why); bins is
    # one value or one per clip.
    per_clip = op.Reshape(bins, op.Constant(value_ints=[-1, 1]))  # N or 1, 1
    b_max = op.ReduceMax(bins, keepdims=0)
    delta = op.ReduceL2(z, op.Constant(value_ints=[-1]), keepdims=0)  # N, T
    delta_max = op.ReduceMax(delta, op.Constant(value_ints=[1]), keepdims=1)  # N, 1
    flat = op.LessOrEqual(delta_max, op.Constant(value_float=1e-12))
    two_b = op.Cast(per_clip, to=1) * op.Constant(value_float=2.0)  # N or 1, 1
    x = op.Where(flat, two_b, two_b * delta / op.Where(flat, op.Constant(value_float=1.0), delta_max))
    bin_number = op.Range(op.Constant(value_int=1), b_max + op.Constant(value_int=1), op.Constant(value_int=1))
    centres = op.Cast(bin_number, to=1) * op.Constant(value_float=2.0) - op.Constant(value_float=1.0)  # B_max
    axis_1 = op.Constant(value_ints=[1])
    offset = op.Unsqueeze(x, op.Constant(value_ints=[-1])) - centres  # N, T, B_max
    # The last bin falls at half the slope right of its centre.
    last = op.Unsqueeze(op.Equal(bin_number, per_clip), axis_1)  # N or 1, 1, B_max
    offset = op.Where(op.And(last, op.Greater(offset, op.Constant(value_float=0.0))),
                      offset * op.Constant(value_float=0.5), offset)
    in_clip = op.Cast(op.LessOrEqual(bin_number, per_clip), to=1)  # a clip's bins beyond its own B weigh 0
    weights = op.Relu(op.Constant(value_float=1.0) - op.Abs(offset)) * op.Unsqueeze(in_clip, axis_1)  # N, T, B_max
    occupied = op.Cast(
        op.Greater(op.ReduceSum(weights, axis_1, keepdims=0), op.Constant(value_float=0.0)),
        to=1,
    )  # N, B_max as 0/1
    kept = op.Cast(op.ReduceMax(op.ReduceSum(occupied, axis_1, keepdims=0), keepdims=1), to=7)
    # Kept bins first, each group in bin order: descending key occupied·2B_max + (B_max − b).
    b_max_float = op.Cast(b_max, to=1)
    key = occupied * (b_max_float * op.Constant(value_float=2.0)) + (b_max_float - op.Cast(bin_number, to=1))
    _, order = op.TopK(key, kept, axis=1, largest=1, sorted=1)  # N, B'
    chosen = op.GatherND(op.Transpose(weights, perm=[0, 2, 1]), op.Unsqueeze(order, op.Constant(value_ints=[2])),
                         batch_dims=1)  # N, B', T: weights of the kept bins
    shape = op.Shape(features)
    n_c_t = op.Slice(shape, op.Constant(value_ints=[0]), op.Constant(value_ints=[3]))
    flat_features = op.Reshape(features, op.Concat(n_c_t, op.Constant(value_ints=[-1]), axis=0))  # N, C, T, S
    sampled = op.MatMul(op.Unsqueeze(chosen, axis_1), flat_features)  # N, C, B', S
    out_shape = op.Concat(
        op.Slice(shape, op.Constant(value_ints=[0]), op.Constant(value_ints=[2])),
        kept,
        op.Slice(shape, op.Constant(value_ints=[3]), op.Constant(value_ints=[2**31 - 1])),
        axis=0,
    )
    sampled = op.Reshape(sampled, out_shape)  # N, C, B', *S
    mask = op.Cast(op.GatherElements(occupied, order, axis=1), to=9)
    return sampled, mask


@onnxscript.script(vqs, default_opset=op)
def AdaptiveTokenSampler(x: FLOAT, attn: FLOAT, v: FLOAT, mask: BOOL, k: INT64):
    # Same arithmetic and token order as export.adaptive.ats.select / gather_rows, computed over
    # all n + 1 tokens with the cls token's score held at 0 (fewer nodes: at batch 1 ONNX Runtime's
    # per-node cost, not arithmetic, is what this body costs).
    one = op.Constant(value_ints=[1])
    attn_shape = op.Shape(attn)  # N, h, n+1, n+1
    tokens = op.Gather(attn_shape, op.Constant(value_int=3))
    n_tokens = tokens - op.Constant(value_int=1)
    position = op.Range(op.Constant(value_int=0), tokens, op.Constant(value_int=1))  # n+1
    is_cls = op.Cast(op.Equal(position, op.Constant(value_int=0)), to=1)
    valid = op.Cast(mask, to=1)  # N, n+1 as 0/1
    eligible = valid * (op.Constant(value_float=1.0) - is_cls)  # valid non-cls tokens
    cls_row = op.Gather(attn, op.Constant(value_int=0), axis=2)  # N, h, n+1
    v_norm = op.ReduceL2(v, op.Constant(value_ints=[3]), keepdims=0)  # N, h, n+1
    scores = op.ReduceSum(cls_row * v_norm, one, keepdims=0) * eligible  # N, n+1
    total = op.Max(op.ReduceSum(scores, one, keepdims=1), op.Constant(value_float=1e-12))
    cdf = op.CumSum(scores / total, op.Constant(value_int=1))
    valid_count = op.ReduceSum(eligible, one, keepdims=1)  # N, 1
    k_eff = op.Min(op.Reshape(k, op.Constant(value_ints=[-1, 1])), n_tokens)  # N or 1, 1: one K or one per sample
    k_float = op.Cast(k_eff, to=1)
    # When K covers every sample's tokens nothing is sampled: one point keeps that part cheap.
    covers_all = op.GreaterOrEqual(op.ReduceMin(k_float - valid_count, keepdims=0), op.Constant(value_float=0.0))
    k_points = op.Where(covers_all, op.Constant(value_int=1), op.ReduceMax(k_eff, keepdims=0))
    i = op.Cast(op.Range(op.Constant(value_int=1), k_points + op.Constant(value_int=1), op.Constant(value_int=1)), to=1)
    two = op.Constant(value_float=2.0)
    points = (i * two - op.Constant(value_float=1.0)) / (k_float * two)  # N, K_max: (2i − 1) / 2K
    # Ineligible tokens get an infinite distance from every point through their CDF (N, n+1), not
    # a Where over the (N, K, n+1) distances: the same numbers, one pass fewer over the large tensor.
    far = op.Where(op.Greater(eligible, op.Constant(value_float=0.5)), op.Constant(value_float=0.0),
                   op.Constant(value_float=float("inf")))
    distance = op.Abs(op.Unsqueeze(cdf + far, one) - op.Unsqueeze(points, op.Constant(value_ints=[2])))  # N, K, n+1
    # A sample's points beyond its own K pick the cls token, which is kept anyway.
    picked = op.Where(op.LessOrEqual(i, k_float), op.ArgMin(distance, axis=2, keepdims=0), op.Constant(value_int=0))
    sampled = op.ScatterElements(op.Mul(valid, op.Constant(value_float=0.0)), picked,
                                 op.Expand(op.Constant(value_float=1.0), op.Shape(picked)), axis=1, reduction="max")
    keep_all = op.GreaterOrEqual(k_float, valid_count)  # N, 1
    chosen = op.Where(keep_all, valid, op.Max(sampled * eligible, is_cls))  # N, n+1 as 0/1, cls always
    kept = op.Cast(op.ReduceMax(op.ReduceSum(chosen, one, keepdims=0), keepdims=1), to=7)
    # Kept tokens first, each group in token order: descending key chosen·2(n+1) + (n+1 − j).
    tokens_float = op.Cast(tokens, to=1)
    key = chosen * (tokens_float * op.Constant(value_float=2.0)) + (tokens_float - op.Cast(position, to=1))
    _, order = op.TopK(key, kept, axis=1)  # N, m
    keep = op.GatherElements(chosen, order, axis=1)  # N, m as 0/1
    kept_mask = op.Greater(keep, op.Constant(value_float=0.5))
    index = op.Where(kept_mask, order, op.Constant(value_int=0))
    # A·V for every row, then the kept rows of it: one batched gather over (sample, head). Gathering
    # the kept rows of A first would move m·(n+1) floats per head to save (n+1−m)·dh of the matmul:
    # more work unless a block keeps under about half its tokens.
    heads = op.Slice(attn_shape, one, op.Constant(value_ints=[2]))
    row_index = op.Expand(op.Unsqueeze(index, op.Constant(value_ints=[1, 3])),
                          op.Concat(one, heads, op.Constant(value_ints=[1, 1]), axis=0))  # N, h, m, 1
    rows = op.GatherND(op.MatMul(attn, v), row_index, batch_dims=2)  # N, h, m, dh
    attended = op.Reshape(op.Transpose(rows, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))
    residual = op.GatherND(x, op.Unsqueeze(index, op.Constant(value_ints=[2])), batch_dims=1)  # N, m, d
    keep = op.Unsqueeze(keep, op.Constant(value_ints=[2]))
    return attended * keep, residual * keep, kept_mask, index


def function_protos() -> dict[str, onnx.FunctionProto]:
    return {
        SGS_OP_TYPE: SimilarityGuidedSampling.to_function_proto(),
        ATS_OP_TYPE: AdaptiveTokenSampler.to_function_proto(),
    }


def _sgs_node(features, z, bins):
    return vqs.SimilarityGuidedSampling(features, z, bins)


def _ats_node(x, attn, v, mask, k):
    return vqs.AdaptiveTokenSampler(x, attn, v, mask, k)


def translation_table() -> dict[Callable, Callable]:
    """`custom_translation_table` for torch.onnx.export: each op becomes its single vqs node."""
    register_schemas()
    return {
        torch.ops.vqs.similarity_guided_sampling.default: _sgs_node,
        torch.ops.vqs.adaptive_token_sampler.default: _ats_node,
    }


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the body of every vqs op the graph uses (in place) and import the vqs domain."""
    used = {node.op_type for node in _all_nodes(model.graph) if node.domain == DOMAIN}
    present = {(f.domain, f.name) for f in model.functions}
    for name, proto in function_protos().items():
        if name in used and (DOMAIN, name) not in present:
            model.functions.append(proto)
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, VERSION))
    return model


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)


def export(
    model: torch.nn.Module,
    args: tuple,
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: Mapping | Sequence | None = None,
) -> onnx.ModelProto:
    """torch -> ONNX with the vqs ops kept as single nodes and their bodies attached; saved to `path`."""
    program = torch.onnx.export(
        model,
        args,
        dynamo=True,
        opset_version=OPSET,
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_shapes=dynamic_shapes,
        custom_translation_table=translation_table(),
        external_data=False,
    )
    proto = onnx_export.drop_stack_traces(attach_functions(program.model_proto))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return proto
