"""The coupled slices of a structured group, found from the module structure (a small dependency graph).

A :class:`Family` is one set of interchangeable units that are pruned together to a count: the hidden neurons of
one Linear, the inner channels of one residual block, the FFN units or the attention heads of one transformer
layer. Removing unit u removes the u-th slice (of equal size) along ``dim`` of every tensor in ``slices``: the
producer's rows (weight, bias), the BatchNorm that normalises them (weight, bias, running statistics), and the
consumer's input columns (its weight along dim 1). The consumer is the layer whose input Hessian scores the
groups (:mod:`core.engine.structured.saliency`).

Found by :func:`find_families`, per kind:

* ``neurons``: inside an ``nn.Sequential``, a Linear whose outputs reach the next Linear through element-wise
  modules only (activations, dropout) — an MLP's hidden layers; and a transformer layer's FFN units (BERT-style
  ``intermediate.dense`` rows and ``output.dense`` columns);
* ``channels``: inside an ``nn.Sequential``, a Conv2d → (BatchNorm2d) → element-wise/pooling → Conv2d (or
  → Flatten → Linear, a channel then owning its spatial positions' columns); and a residual block's inner
  channels (``conv1`` rows → ``bn1`` → ``conv2`` columns, as in ResNet basic blocks; and ``conv2`` → ``bn2`` →
  ``conv3`` in a bottleneck); then, after every block's, the residual stream's channels
  (:mod:`core.engine.structured.residual`: a stage's width, written by the stem or every block's last conv + BN
  and a projection shortcut, read by every block's first conv, the shortcut and finally the classifier), so every
  residual sum keeps equal widths;
* ``heads``: BERT-style self-attention: a head's d_head rows of query, key and value (weights and biases) and its
  d_head columns of ``attention.output.dense``.

and in a Llama-style decoder layer (transformers' ``LlamaDecoderLayer``; Mistral and Qwen2 share its module names:
``self_attn.{q,k,v,o}_proj`` with an explicit ``head_dim``, ``mlp.{gate,up,down}_proj``):

* ``neurons``: the FFN units: unit u is row u of ``gate_proj`` and ``up_proj`` (and their biases, if any) and
  column u of ``down_proj``, the consumer (its input is ``act(gate) · up``);
* ``heads``: the attention's key/value groups. With H query heads and K key/value heads (K = H: multi-head; K < H:
  grouped-query attention), query head i reads key/value head i // (H/K), so one unit is a key/value head and its
  H/K query heads: (H/K)·head_dim contiguous rows of ``q_proj``, head_dim rows of ``k_proj`` and ``v_proj`` (with
  biases, Qwen2's) and the (H/K)·head_dim columns of ``o_proj``, the consumer. Removing whole groups keeps the
  ratio H/K (the module's ``num_key_value_groups``) integral and unchanged. The attention infers its head counts
  from the projections' widths (``view(..., -1, head_dim)``), and rotary embeddings act on each head's head_dim
  alone, so the shrunk layer computes exactly what the layer with those heads' ``o_proj`` columns zeroed
  computes. The smaller model's config states ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim``
  explicitly (:func:`head_config`): ``head_dim`` no longer equals hidden_size / num_attention_heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from core.engine.structured.residual import Stage, stream_stages

__all__ = ["KINDS", "Family", "Slice", "attention_shape", "find_families", "head_config", "is_llama_layer"]

KINDS = ("neurons", "channels", "heads")
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Dropout, nn.Identity)
_POOLING = (nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class Slice:
    """A parameter or buffer (its full name) cut along ``dim`` into one equal slice per unit."""

    name: str
    dim: int


@dataclass(frozen=True)
class Family:
    name: str  # where it lives: the producer's module, or the block/layer that holds it
    kind: str  # one of KINDS
    units: int
    slices: tuple[Slice, ...]  # every tensor a unit owns a slice of (producers, BatchNorm, the consumers' columns)
    consumer: str  # the (first) module whose input columns the units are; its input Hessian scores them
    more_consumers: tuple[str, ...] = ()  # further readers (a residual stream's): every consumer's Hessian scores
    renumber: tuple[str, ...] = ()  # index buffers whose values are this family's units (a zero-pad shortcut's)

    @property
    def consumers(self) -> tuple[str, ...]:
        """Every module whose input columns the units are (one, except for a residual stream)."""
        return (self.consumer, *self.more_consumers)

    @property
    def producer_slices(self) -> tuple[Slice, ...]:
        return tuple(s for s in self.slices if not any(s.name.startswith(c + ".") for c in self.consumers))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _tensors(prefix: str, module: nn.Module, dim: int = 0) -> list[Slice]:
    """A module's own parameters and buffers (BatchNorm's running statistics; not its step counter) along ``dim``."""
    names = [n for n, p in module.named_parameters(recurse=False) if p is not None and p.dim() > dim]
    names += [n for n, b in module.named_buffers(recurse=False) if b is not None and b.dim() > dim]
    return [Slice(_join(prefix, n), dim) for n in names]


def _sequential(prefix: str, seq: nn.Sequential, kind: str) -> list[Family]:
    children = list(seq.named_children())
    out = []
    for i, (name, mod) in enumerate(children):
        conv = isinstance(mod, nn.Conv2d) and mod.groups == 1
        if kind == "neurons" and not isinstance(mod, nn.Linear):
            continue
        if kind == "channels" and not conv:
            continue
        followers, flattened = [], False
        for nxt_name, nxt in children[i + 1 :]:
            if isinstance(nxt, nn.BatchNorm2d) and conv and not followers and not flattened:
                followers = _tensors(_join(prefix, nxt_name), nxt)
                continue
            if isinstance(nxt, _ELEMENTWISE) or (conv and isinstance(nxt, _POOLING) and not flattened):
                continue
            if isinstance(nxt, nn.Flatten) and conv:
                flattened = True
                continue
            ok = isinstance(nxt, nn.Linear) if (kind == "neurons" or flattened) else False
            ok = ok or (conv and not flattened and isinstance(nxt, nn.Conv2d) and nxt.groups == 1)
            if ok:
                units = mod.out_features if kind == "neurons" else mod.out_channels
                consumer = _join(prefix, nxt_name)
                out.append(
                    Family(
                        _join(prefix, name),
                        kind,
                        units,
                        tuple(_tensors(_join(prefix, name), mod) + followers + [Slice(consumer + ".weight", 1)]),
                        consumer,
                    )
                )
            break
    return out


def _residual_block(prefix: str, block: nn.Module) -> list[Family]:
    """``conv{k}`` → ``bn{k}`` → ``conv{k+1}`` inside a block (k = 1; and 2 in a bottleneck, whose conv3 writes to
    the residual stream): the block's inner channels."""
    out = []
    for k in (1, 2):
        conv, bn, nxt = (getattr(block, n, None) for n in (f"conv{k}", f"bn{k}", f"conv{k + 1}"))
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and isinstance(nxt, nn.Conv2d)):
            break
        if conv.groups != 1 or nxt.groups != 1:
            break
        slices = _tensors(_join(prefix, f"conv{k}"), conv) + _tensors(_join(prefix, f"bn{k}"), bn)
        consumer = _join(prefix, f"conv{k + 1}")
        name = _join(prefix, f"conv{k}")
        out.append(Family(name, "channels", conv.out_channels, (*slices, Slice(consumer + ".weight", 1)), consumer))
    return out


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _transformer_layer(prefix: str, layer: nn.Module, kind: str) -> list[Family]:
    if kind == "neurons":
        up, down = _submodule(layer, "intermediate.dense"), _submodule(layer, "output.dense")
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and up.out_features == down.in_features:
            consumer = _join(prefix, "output.dense")
            slices = (*_tensors(_join(prefix, "intermediate.dense"), up), Slice(consumer + ".weight", 1))
            return [Family(prefix, "neurons", up.out_features, slices, consumer)]
        return []
    attn = _submodule(layer, "attention.self")
    out = _submodule(layer, "attention.output.dense")
    heads = getattr(attn, "num_attention_heads", None)
    qkv = [_submodule(attn, n) if attn is not None else None for n in ("query", "key", "value")]
    if not (isinstance(heads, int) and isinstance(out, nn.Linear) and all(isinstance(m, nn.Linear) for m in qkv)):
        return []
    slices = [
        s
        for n, m in zip(("query", "key", "value"), qkv, strict=True)
        for s in _tensors(f"{prefix}.attention.self.{n}", m)
    ]
    consumer = _join(prefix, "attention.output.dense")
    return [Family(prefix, "heads", heads, (*slices, Slice(consumer + ".weight", 1)), consumer)]


# -- Llama-style decoder layers (Llama, Mistral, Qwen2) -------------------------------------------------------------

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


def _llama_layer(prefix: str, layer: nn.Module, kind: str) -> list[Family]:
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


def find_families(model: nn.Module, kind: str) -> list[Family]:
    """Every family of ``kind`` (one of :data:`KINDS`) in ``model``, in module order (the forward order of the zoo
    and BERT-style models)."""
    if kind not in KINDS:
        raise ValueError(f"unknown structure {kind!r}; expected one of {', '.join(KINDS)}")
    out: list[Family] = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential) and kind in ("neurons", "channels"):
            out += _sequential(prefix, module, kind)
        elif kind == "channels":
            out += _residual_block(prefix, module)
        if kind in ("neurons", "heads") and _submodule(module, "attention.self") is not None:
            out += _transformer_layer(prefix, module, kind)
        if kind in ("neurons", "heads") and _submodule(module, "self_attn.q_proj") is not None:
            out += _llama_layer(prefix, module, kind)
    if kind == "channels":
        out += [_stream_family(model, i, stage) for i, stage in enumerate(stream_stages(model))]
    return out


def _stream_family(model: nn.Module, i: int, stage: Stage) -> Family:
    """The residual stream's ``i``-th width (:mod:`core.engine.structured.residual`) as a family ``stream.<i>``."""
    producers = [s for name in stage.producers for s in _tensors(name, model.get_submodule(name))]
    slices = (*producers, *(Slice(n, 0) for n in stage.sliced), *(Slice(c + ".weight", 1) for c in stage.consumers))
    consumers = tuple(stage.consumers)
    return Family(f"stream.{i}", "channels", stage.width, slices, consumers[0], consumers[1:], tuple(stage.renumber))
