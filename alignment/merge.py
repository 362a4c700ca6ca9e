"""Model merging: linear, SLERP and TIES over safetensors folders of one architecture.

A merge reads the inputs tensor by tensor (``safe_open`` maps the files; one tensor of each
input is in memory at a time) and writes each output shard tensor by tensor, in the first
model's shard layout (``write_safetensors``: the header comes from the inputs' layout), so no
output shard is held whole. Each tensor is merged in float32 (float64 stays float64) and
cast back to the first model's dtype; linear and SLERP do it a CHUNK of elements at a time,
TIES on whole tensors (its top-k is global). Tensors that are not floating point (integer
buffers) are copied from the first model.

The methods, per tensor (the math is on docs/merging.md):

- linear: sum_i w_i x_i, the weights divided by their sum (so 3,7 means 0.3,0.7).
- slerp: along the great circle between the two flattened tensors, t=0 the first, t=1 the
  second; linear where they are nearly colinear, as the angle is then ill-defined.
- ties (Yadav et al. 2023, "TIES-Merging"): task vectors tau_i = x_i - parent, each trimmed
  to its ``density`` largest magnitudes; per entry the sign of sum_i w_i tau_i is elected and
  the entries agreeing with it are averaged (weighted by w_i), then added to the parent.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors import safe_open

from alignment import atomic
from alignment.ids import content_id

MergeMethod = Literal["linear", "slerp", "ties"]
WEIGHTS_INDEX = "model.safetensors.index.json"
# Copied from the first model: what transformers and vLLM read besides the weights.
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
# |cos| of the angle between two tensors above which slerp interpolates linearly: sin(theta)
# is then near 0 and the spherical coefficients lose their precision.
COLINEAR = 0.9995


class MergeError(ValueError):
    """Models that cannot be merged together, or settings that do not fit them."""


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: MergeMethod = Field(
        "linear",
        description="linear: weighted average. slerp: spherical interpolation of exactly "
        "two models. ties: TIES-merging of task vectors from a common parent model.",
    )
    weights: list[float] | None = Field(
        None,
        description="linear and ties: one weight >= 0 per model, divided by their sum "
        "(null: equal weights).",
    )
    t: float = Field(0.5, ge=0, le=1, description="slerp: 0 gives the first model, 1 the second.")
    density: float = Field(
        0.2,
        gt=0,
        le=1,
        description="ties: fraction of each task vector's entries kept (the largest magnitudes).",
    )

    @field_validator("weights")
    @classmethod
    def _weights_add_up(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and (min(weights, default=0) < 0 or sum(weights) <= 0):
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
        return weights


class LoopMergeConfig(BaseModel):
    """``loop.merge``: merges of the incumbent and each iteration's candidate, evaluated and
    gated like the candidate (docs/merging.md, "As a promotion option")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: MergeMethod = Field(
        "slerp",
        description="slerp (t = the weight), linear (incumbent 1 - w, candidate w) or ties "
        "(task vectors of both from the loop's starting model, weights 1 - w and w).",
    )
    weights: list[float] = Field(
        default_factory=lambda: [0.5],
        min_length=1,
        description="The candidate's share in each merge, each strictly between 0 and 1 "
        "(0 is the incumbent, 1 the candidate, both evaluated already): one merge per weight.",
    )
    density: float = Field(
        0.2, gt=0, le=1, description="ties: fraction of each task vector's entries kept."
    )

    @field_validator("weights")
    @classmethod
    def _shares(cls, weights: list[float]) -> list[float]:
        outside = [w for w in weights if not 0.0 < w < 1.0]
        if outside:
            raise ValueError(
                f"each weight is the candidate's share and must lie strictly between 0 and 1 "
                f"(0 reproduces the incumbent, 1 the candidate), got {outside[0]}"
            )
        if len(set(weights)) != len(weights):
            raise ValueError(f"weights repeat a value: {weights}")
        return weights


def incumbent_merges(
    config: LoopMergeConfig, incumbent_is_parent: bool = False
) -> list[tuple[float, MergeConfig]]:
    """(the candidate's share w, the merge's settings) of each merge of [incumbent,
    candidate], in the order of ``config.weights``.

    A weight of 0 or 1 reproduces a parent exactly and is skipped. For ties the parent is the
    loop's starting model: while that is also the incumbent, the incumbent's task vector is
    zero, every weight gives the same model (the candidate's trimmed task vector), and only
    the first weight is kept.
    """
    merges = []
    for w in dict.fromkeys(config.weights):
        if w <= 0.0 or w >= 1.0:
            continue
        if config.method == "slerp":
            merges.append((w, MergeConfig(method="slerp", t=w)))
        else:
            merge = MergeConfig(method=config.method, weights=[1.0 - w, w], density=config.density)
            merges.append((w, merge))
    if config.method == "ties" and incumbent_is_parent:
        return merges[:1]
    return merges


def check_settings(config: MergeConfig, models: int, has_parent: bool) -> None:
    """Refuse settings that do not fit `models` models (and a ties parent or not)."""
    if models < 2:
        raise MergeError(f"merging needs at least two models, got {models}")
    if config.method == "slerp" and models != 2:
        raise MergeError(f"slerp merges exactly two models, got {models}")
    if config.weights is not None and len(config.weights) != models:
        raise MergeError(f"got {len(config.weights)} weights for {models} models")
    if config.method == "ties" and not has_parent:
        raise MergeError("ties needs the models' common parent (--parent)")
    if config.method != "ties" and has_parent:
        raise MergeError(f"a parent model is used by ties only, not by {config.method}")


def normalized_weights(config: MergeConfig, models: int) -> list[float]:
    """The weights a linear or ties merge uses: the given ones over their sum, else equal."""
    weights = config.weights or [1.0] * models
    return [w / sum(weights) for w in weights]


def merge_settings(config: MergeConfig, models: int, parent: str | None) -> dict:
    """What decides the merged weights: the method and its own settings (others null)."""
    return {
        "method": config.method,
        "weights": normalized_weights(config, models) if config.method != "slerp" else None,
        "t": config.t if config.method == "slerp" else None,
        "density": config.density if config.method == "ties" else None,
        "parent": parent,
    }


def merged_model_id(names: Sequence[str], config: MergeConfig, parent: str | None = None) -> str:
    """A merged model's id: the names of the models merged, in order, and the settings."""
    return content_id("merge", list(names), merge_settings(config, len(names), parent))


# --- the methods, on one tensor each (already in the compute dtype) ----------------------------


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    merged = torch.zeros_like(tensors[0])
    for weight, tensor in zip(weights, tensors, strict=True):
        merged += weight * tensor
    return merged


CHUNK = 1 << 22  # elements summed in float64 at a time


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """a · b of the flattened tensors summed in float64, a chunk at a time: no float64
    copy of a whole tensor (an embedding's would be 4 times its bfloat16 size)."""
    a, b = a.flatten(), b.flatten()
    return sum(
        float(a[i : i + CHUNK].double() @ b[i : i + CHUNK].double())
        for i in range(0, a.numel(), CHUNK)
    )


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[float, float]:
    """(c_a, c_b) with slerp(a, b, t) = c_a a + c_b b, from the angle between the flattened
    tensors (its cosine summed in float64); (1 - t, t) when they are (nearly) colinear."""
    norms = math.sqrt(_dot64(a, a) * _dot64(b, b))
    cos = max(-1.0, min(1.0, _dot64(a, b) / norms)) if norms > 0 else 1.0
    if abs(cos) > COLINEAR:
        return 1 - t, t
    theta = torch.tensor(cos, dtype=torch.float64).arccos()
    # x(t) = sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b: at t=0 and t=1 the
    # coefficients are exactly 1 and 0, so the ends are the inputs themselves.
    coef_a = (torch.sin((1 - t) * theta) / torch.sin(theta)).item()
    coef_b = (torch.sin(t * theta) / torch.sin(theta)).item()
    return coef_a, coef_b


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return linear([a, b], slerp_coefficients(a, b, t))


def weighted_sum(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], dtype: torch.dtype
) -> torch.Tensor:
    """sum_i w_i x_i in ``dtype``, computed in float32 (at least) a CHUNK of elements at a
    time: an embedding's float32 copies never exist whole."""
    out = torch.empty(tensors[0].shape, dtype=dtype)
    flat_out, flats = out.view(-1), [t.flatten() for t in tensors]
    compute = torch.promote_types(dtype, torch.float32)
    for i in range(0, flat_out.numel(), CHUNK):
        chunk = [f[i : i + CHUNK].to(compute) for f in flats]
        flat_out[i : i + CHUNK] = linear(chunk, weights).to(dtype)
    return out


def trim(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """`task_vector` with all but its round(density * n) largest magnitudes (at least one)
    set to zero."""
    flat = task_vector.flatten()
    keep = max(1, round(density * flat.numel()))
    if keep >= flat.numel():
        return task_vector
    top = flat.abs().topk(keep).indices
    trimmed = torch.zeros_like(flat)
    trimmed[top] = flat[top]
    return trimmed.view_as(task_vector)


def ties(
    tensors: Sequence[torch.Tensor], parent: torch.Tensor, weights: Sequence[float], density: float
) -> torch.Tensor:
    task_vectors = torch.stack([trim(tensor - parent, density) for tensor in tensors])
    w = torch.tensor(weights, dtype=parent.dtype).view(-1, *[1] * parent.dim())  # (models, 1...)
    elected = torch.sign((w * task_vectors).sum(dim=0))
    # Entries whose sign is the elected one; an entry trimmed to 0 or elected 0 never agrees.
    agrees = (torch.sign(task_vectors) == elected) & (elected != 0)
    agreeing_weight = (w * agrees).sum(dim=0)
    disjoint_mean = (w * task_vectors * agrees).sum(dim=0) / agreeing_weight.clamp_min(1e-12)
    return parent + disjoint_mean


def merge_tensor(
    tensors: Sequence[torch.Tensor],
    config: MergeConfig,
    weights: Sequence[float],
    parent: torch.Tensor | None = None,
) -> torch.Tensor:
    """One tensor of the merged model, in the first input's dtype."""
    dtype = tensors[0].dtype
    if not dtype.is_floating_point:
        return tensors[0]
    if config.method == "linear":
        return weighted_sum(tensors, weights, dtype)
    if config.method == "slerp":
        return weighted_sum(tensors, slerp_coefficients(*tensors, config.t), dtype)
    assert parent is not None  # check_settings refused ties without one
    # TIES trims each task vector by its global top-k, so it works on whole tensors.
    compute = torch.promote_types(dtype, torch.float32)
    inputs = [tensor.to(compute) for tensor in tensors]
    return ties(inputs, parent.to(compute), weights, config.density).to(dtype)


# --- folders ----------------------------------------------------------------------------------


def weight_shards(folder: Path) -> list[Path]:
    """A model folder's safetensors files, in the index's order where there is one."""
    if not folder.is_dir():
        raise MergeError(f"{folder}: not a model folder")
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        names = json.loads(index.read_text())["weight_map"].values()
        return [folder / name for name in dict.fromkeys(names)]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise MergeError(f"{folder}: no *.safetensors weights (merging reads only safetensors)")
    return shards


class OpenModel:
    """A model folder's tensors by name, read one at a time from its mapped shards."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        self.folder = folder
        self.shards: dict[Path, list[str]] = {}  # shard -> the tensor names in it
        self._handles: dict[str, Any] = {}  # tensor name -> the open shard holding it
        for shard in weight_shards(folder):
            handle = stack.enter_context(safe_open(str(shard), framework="pt", device="cpu"))
            self.shards[shard] = list(handle.keys())
            self._handles.update(dict.fromkeys(self.shards[shard], handle))

    def shapes(self) -> dict[str, list[int]]:
        return {name: handle.get_slice(name).get_shape() for name, handle in self._handles.items()}

    def tensor(self, name: str) -> torch.Tensor:
        return self._handles[name].get_tensor(name)

    def layout(self, name: str) -> tuple[str, list[int]]:
        """A tensor's safetensors dtype name (``"BF16"``) and shape, read from the header."""
        view = self._handles[name].get_slice(name)
        return view.get_dtype(), view.get_shape()


def write_safetensors(
    path: Path, layout: dict[str, tuple[str, list[int]]], tensors: Iterator[torch.Tensor]
) -> None:
    """A safetensors file written tensor by tensor: the header is known from ``layout``
    (name -> dtype name, shape, in file order) before any tensor is computed, so only the
    tensor being written is in memory, never the whole shard. ``tensors`` come in
    ``layout``'s order, each of its dtype and shape (checked)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in layout.items():
        size = math.prod(shape) * _ITEM_SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as out:
        out.write(len(encoded).to_bytes(8, "little") + encoded)
        for (name, (dtype, shape)), tensor in zip(layout.items(), tensors, strict=True):
            if _DTYPE_NAMES.get(tensor.dtype) != dtype or list(tensor.shape) != shape:
                raise MergeError(f"{name}: merged as {tensor.dtype} {list(tensor.shape)}, "
                                 f"expected {dtype} {shape}")  # fmt: skip
            out.write(tensor.contiguous().flatten().view(torch.uint8).numpy().data)


_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "BOOL": 1}  # fmt: skip


def check_same_architecture(models: Sequence[OpenModel]) -> None:
    """Refuse models whose tensor names or shapes differ, naming the first such tensor."""
    first, first_shapes = models[0], models[0].shapes()
    for other in models[1:]:
        shapes = other.shapes()
        for name in sorted(first_shapes.keys() | shapes.keys()):
            if name not in shapes:
                raise MergeError(f"{other.folder} has no tensor {name!r} (in {first.folder})")
            if name not in first_shapes:
                raise MergeError(f"{other.folder} has tensor {name!r}, which {first.folder} lacks")
            if shapes[name] != first_shapes[name]:
                raise MergeError(
                    f"tensor {name!r} has shape {first_shapes[name]} in {first.folder} but "
                    f"{shapes[name]} in {other.folder}: merge models of one architecture"
                )


def merge_models(
    folders: Sequence[str | Path],
    out: str | Path,
    config: MergeConfig,
    parent: str | Path | None = None,
) -> Path:
    """Merge the model folders into `out` (replaced atomically) by `config`; `out`.

    Config, generation config and tokenizer files come from the first model. Bad settings
    or models of different architectures raise MergeError before anything is written.
    """
    check_settings(config, len(folders), parent is not None)
    weights = normalized_weights(config, len(folders))
    with ExitStack() as stack:
        models = [OpenModel(Path(folder), stack) for folder in folders]
        base = OpenModel(Path(parent), stack) if parent is not None else None
        check_same_architecture([*models, *([base] if base else [])])
        with atomic.replacing(out) as tmp:
            tmp.mkdir()
            for shard, names in models[0].shards.items():
                merged = (
                    merge_tensor(
                        [model.tensor(name) for model in models],
                        config,
                        weights,
                        base.tensor(name) if base else None,
                    )
                    for name in names
                )
                layout = {name: models[0].layout(name) for name in names}
                write_safetensors(tmp / shard.name, layout, merged)
            for name in (WEIGHTS_INDEX, *COPIED_FILES):
                if (models[0].folder / name).is_file():
                    shutil.copy2(models[0].folder / name, tmp / name)
    return Path(out)
