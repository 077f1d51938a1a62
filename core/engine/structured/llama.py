"""The families of a Llama-style decoder layer (transformers' ``LlamaDecoderLayer``; Mistral and Qwen2 share its
module names): ``self_attn.{q,k,v,o}_proj`` with an explicit ``head_dim``, and ``mlp.{gate,up,down}_proj``.

* ``neurons``: the FFN units: unit u is row u of ``gate_proj`` and ``up_proj`` (and their biases, if any) and
  column u of ``down_proj``, the consumer (its input is ``act(gate) · up``).
* ``heads``: the attention's key/value groups. With H query heads and K key/value heads (K = H: multi-head; K < H:
  grouped-query attention), query head i reads key/value head i // (H/K), so one unit is a key/value head and its
  H/K query heads: (H/K)·head_dim contiguous rows of ``q_proj``, head_dim rows of ``k_proj`` and ``v_proj`` (with
  biases, Qwen2's) and the (H/K)·head_dim columns of ``o_proj``, the consumer. Removing whole groups keeps the
  ratio H/K (the module's ``num_key_value_groups``) integral and unchanged. The attention infers its head counts
  from the projections' widths (``view(..., -1, head_dim)``), and rotary embeddings act on each head's head_dim
  alone, so the shrunk layer computes exactly what the layer with those heads' ``o_proj`` columns zeroed computes.

The smaller model's config states ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` explicitly
(:func:`head_config`): ``head_dim`` no longer equals hidden_size / num_attention_heads.
"""

from __future__ import annotations

from torch import nn

from core.engine.structured.groups import Family, Slice, _join, _submodule, _tensors

__all__ = ["attention_shape", "head_config", "is_llama_layer", "llama_families"]

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _linears(module: nn.Module | None, names: tuple[str, ...]) -> list[nn.Linear] | None:
    found = [_submodule(module, n) if module is not None else None for n in names]
    return found if all(isinstance(m, nn.Linear) for m in found) else None


def is_llama_layer(layer: nn.Module) -> bool:
    """A decoder layer with Llama's attention (an integer ``head_dim``) and gated MLP module names."""
    attn = getattr(layer, "self_attn", None)
    return (
        isinstance(getattr(attn, "head_dim", None), int)
        and _linears(attn, _ATTN) is not None
        and _linears(getattr(layer, "mlp", None), _MLP) is not None
    )


def attention_shape(layer: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of a Llama-style ``layer``, read from its projections' widths."""
    attn = layer.self_attn
    d = attn.head_dim
    return attn.q_proj.out_features // d, attn.k_proj.out_features // d, d


def llama_families(prefix: str, layer: nn.Module, kind: str) -> list[Family]:
    """The ``kind`` family of the Llama-style decoder ``layer`` at ``prefix`` (none for ``channels``)."""
    if not is_llama_layer(layer) or kind not in ("neurons", "heads"):
        return []
    if kind == "neurons":
        gate, up, down = _linears(layer.mlp, _MLP)
        if not (gate.out_features == up.out_features == down.in_features):
            return []
        consumer = _join(prefix, "mlp.down_proj")
        slices = (
            *_tensors(_join(prefix, "mlp.gate_proj"), gate),
            *_tensors(_join(prefix, "mlp.up_proj"), up),
            Slice(consumer + ".weight", 1),
        )
        return [Family(prefix, "neurons", gate.out_features, slices, consumer)]
    heads, kv, d = attention_shape(layer)
    q, k, v, o = _linears(layer.self_attn, _ATTN)
    if kv < 1 or heads % kv or q.out_features != heads * d or o.in_features != heads * d:
        return []
    if k.out_features != kv * d or v.out_features != kv * d:
        return []
    slices = [
        s for name, m in zip(_ATTN[:3], (q, k, v), strict=True) for s in _tensors(_join(prefix, f"self_attn.{name}"), m)
    ]
    consumer = _join(prefix, "self_attn.o_proj")
    return [Family(prefix, "heads", kv, (*slices, Slice(consumer + ".weight", 1)), consumer)]


def head_config(model: nn.Module, families: list[Family]) -> dict:
    """The config fields of the shrunk model's attention (one value for every layer: a config holds one)."""
    shapes = {attention_shape(model.get_submodule(f.name)) for f in families if f.kind == "heads"}
    if len(shapes) != 1:
        raise ValueError(f"attention shapes differ across layers {sorted(shapes)}; a config holds one")
    heads, kv, d = shapes.pop()
    return {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": d}
