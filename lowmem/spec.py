"""ModelSpec: the shapes of a Llama-style decoder, without its weights.

The planner needs shapes only, so a spec comes from whatever is at hand:
a built-in entry (`lowmem/architectures.yaml`, public config facts), a local
Hugging Face `config.json` (or the model directory holding it), or the
metadata of a `.gguf` file (read with `gguf.GGUFReader`, which maps the
file and never decodes tensor data).

The block is the Llama block (Llama 1/2/3, Mistral, Qwen2, SmolLM2):

    x = x + o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))
    x = x + down_proj(silu(gate_proj(n2(x))) * up_proj(n2(x)))

with RMSNorms n1, n2, grouped-query attention (kv_heads ≤ heads), and a final
RMSNorm before the LM head. Parameter count, from shapes alone:

    block  = h·(H·d) + 2·h·(K·d) + (H·d)·h   [+ H·d + 2·K·d biases]   attention
           + 3·h·I                                                    gated MLP
           + 2·h                                                      norms
    total  = Σ blocks + h (final norm) + V·h (embeddings) [+ V·h untied head]

where h = hidden, H = heads, K = kv_heads, d = head_dim, I = intermediate,
V = vocab. A pruned spec (LoRAM) has fewer heads / MLP channels in some blocks
and is described by `blocks`, runs of (count, BlockShape).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lowmem.errors import ModelError

# model_type values whose block is the Llama block above.
FAMILIES = ("llama", "mistral", "qwen2")

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_ratio_list(layers: int, ratio: float, keep_first: int = 1, keep_last: int = 1,
                     layer_ratios: dict[int, float] | None = None) -> list[float]:
    """The prune ratio of every block (LoRAM; lowmem.prune cuts by it, ModelSpec.pruned counts by it): `ratio` in the middle, 0 for the outer blocks kept whole,
    and `layer_ratios[i]` wherever it is given (it wins over both)."""
    first = min(keep_first, layers)
    last = min(keep_last, layers - first)
    ratios = [0.0 if i < first or i >= layers - last else ratio for i in range(layers)]
    for i, r in (layer_ratios or {}).items():
        if not 0 <= int(i) < layers:
            raise ValueError(f"layer_ratios names layer {i}; this model has layers 0..{layers - 1}")
        ratios[int(i)] = float(r)
    return ratios


@dataclass(frozen=True)
class BlockShape:
    """The shapes that differ between blocks of one model (only after pruning)."""

    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a Llama-style decoder; `params` is computed from them."""

    name: str
    family: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    attention_bias: bool = False     # q/k/v biases (Qwen2)
    mlp: str = "gated"               # SiLU-gated MLP: gate_proj, up_proj, down_proj
    max_position: int = 0
    sliding_window: int = 0          # tokens each attends back to (Mistral v0.1); 0 = all before it
    source: str = ""                 # where the shapes came from
    # Pruned models (LoRAM): runs of (number of blocks, their shape) in layer
    # order. Empty means every block has the unpruned shape above.
    blocks: tuple[tuple[int, BlockShape], ...] = ()
    prune_ratio: float = 0.0

    # ------------------------------------------------------------ shapes

    def block_groups(self) -> tuple[tuple[int, BlockShape], ...]:
        """Runs of (count, BlockShape) covering all `layers` blocks, in order."""
        if self.blocks:
            return self.blocks
        return ((self.layers, BlockShape(self.heads, self.kv_heads, self.intermediate)),)

    def linear_shapes(self, block: BlockShape | None = None) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear layer of one block."""
        b = block or BlockShape(self.heads, self.kv_heads, self.intermediate)
        h, d = self.hidden, self.head_dim
        return {
            "q_proj": (b.heads * d, h),
            "k_proj": (b.kv_heads * d, h),
            "v_proj": (b.kv_heads * d, h),
            "o_proj": (h, b.heads * d),
            "gate_proj": (b.intermediate, h),
            "up_proj": (b.intermediate, h),
            "down_proj": (h, b.intermediate),
        }

    def block_params(self, block: BlockShape | None = None) -> int:
        """Parameters of one block: its linear weights, q/k/v biases and two norms."""
        b = block or BlockShape(self.heads, self.kv_heads, self.intermediate)
        linear = sum(o * i for o, i in self.linear_shapes(b).values())
        bias = (b.heads + 2 * b.kv_heads) * self.head_dim if self.attention_bias else 0
        return linear + bias + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """LM head parameters that are not shared with the embeddings."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def linear_params(self) -> int:
        """Weights of the q/k/v/o and MLP projections: the ones a 4-bit base quantizes."""
        return sum(n * sum(o * i for o, i in self.linear_shapes(b).values())
                   for n, b in self.block_groups())

    @property
    def params(self) -> int:
        """Total parameters, counting tied embeddings once."""
        blocks = sum(n * self.block_params(b) for n, b in self.block_groups())
        return blocks + self.hidden + self.embedding_params + self.head_params

    def max_linear_numel(self) -> int:
        return max(o * i for _, b in self.block_groups() for o, i in self.linear_shapes(b).values())

    # ------------------------------------------------------------ pruning

    def pruned(self, ratio: float, keep_first: int = 1, keep_last: int = 1,
               layer_ratios: Sequence[float] = ()) -> "ModelSpec":
        """The shapes after structured pruning (LoRAM) of `ratio` of each middle block.

        Blocks [keep_first, layers − keep_last) keep a share (1 − ratio) of their
        KV groups, attention heads and MLP channels; the hidden size, embeddings,
        head and the outer blocks are untouched. `layer_ratios` (loram.layer_ratios)
        gives the first blocks their own ratios, in block order, over both. At ratio r:

            K' = max(1, round(K·(1−r)))
            g' = min(H/K, max(1, round(H·(1−r) / K')))       query heads per kept group
            H' = K'·g'                                       (a group keeps at most its own heads)
            I' = max(1, round(I·(1−r)))

        lowmem.prune.kept_counts prunes real models by the same rule.
        """
        return _pruned(self, float(ratio), keep_first, keep_last, tuple(float(r) for r in layer_ratios))

    def _pruned(self, ratio: float, keep_first: int, keep_last: int, layer_ratios: tuple[float, ...]) -> "ModelSpec":
        for r in (ratio, *layer_ratios):
            if not 0.0 <= r < 1.0:
                raise ValueError(f"prune ratio must be in [0, 1), got {r}")
        ratios = layer_ratio_list(self.layers, ratio, keep_first, keep_last, dict(enumerate(layer_ratios)))
        if not any(ratios):
            return self
        runs: list[list] = []
        shapes: dict[float, BlockShape] = {}
        for r in ratios:
            if r not in shapes:
                shapes[r] = self._pruned_block(r)
            shape = shapes[r]
            if runs and runs[-1][1] == shape:
                runs[-1][0] += 1
            else:
                runs.append([1, shape])
        name = f"{self.name} (pruned {ratio:.0%}{', per block' if layer_ratios else ''})"
        return dataclasses.replace(self, name=name, blocks=tuple((n, b) for n, b in runs), prune_ratio=ratio)

    def _pruned_block(self, ratio: float) -> BlockShape:
        if ratio == 0.0:
            return BlockShape(self.heads, self.kv_heads, self.intermediate)
        keep = 1.0 - ratio
        kv = max(1, _round(self.kv_heads * keep))
        heads = kv * min(self.heads // self.kv_heads, max(1, _round(self.heads * keep / kv)))
        return BlockShape(heads, kv, max(1, _round(self.intermediate * keep)))

    # ------------------------------------------------------------ conversions

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "blocks"}
        if self.blocks:
            out["blocks"] = [{"count": n, **dataclasses.asdict(b)} for n, b in self.blocks]
        out["params"] = self.params
        return out

    def to_hf_config(self, **overrides: Any):
        """A transformers config with these shapes (for tests and random-weight models)."""
        import transformers

        if self.blocks:
            raise ValueError("a pruned spec has blocks of different shapes; transformers "
                             "configs describe uniform blocks only")
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}[self.family]
        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
            tie_word_embeddings=self.tied_embeddings,
            max_position_embeddings=self.max_position or 2048)
        if self.family == "llama":
            kwargs["attention_bias"] = self.attention_bias
        if self.family == "mistral":     # MistralConfig's own default is a 4096 window
            kwargs["sliding_window"] = self.sliding_window or None
        kwargs.update(overrides)
        return cls(**kwargs)


# The planner asks for the same few pruned shapes of one model thousands of times (a
# 70B search: ~15k candidates); ModelSpec is frozen, so its pruned forms are cached.
_pruned = lru_cache(maxsize=256)(ModelSpec._pruned)


def _round(x: float) -> int:
    """Round half up (Python's round() rounds half to even, which surprises here)."""
    return int(x + 0.5)


# ---------------------------------------------------------------- built-in entries

def _normalise(name: str) -> str:
    name = name.strip().lower().replace("_", "-").replace(" ", "-")
    name = name.rsplit("/", 1)[-1]
    # -instruct, -hf, -chat, -it, -base anywhere after the name: Llama-2-7b-chat-hf,
    # Mistral-7B-Instruct-v0.1.
    return "-".join(part for i, part in enumerate(name.split("-"))
                    if i == 0 or part not in ("instruct", "hf", "chat", "it", "base"))


@lru_cache(maxsize=1)
def builtin_entries() -> dict[str, dict[str, Any]]:
    """name -> entry from architectures.yaml (found through the package)."""
    text = resources.files("lowmem").joinpath("architectures.yaml").read_text()
    return yaml.safe_load(text)


@lru_cache(maxsize=1)
def _builtin_index() -> dict[str, str]:
    index = {}
    for name, entry in builtin_entries().items():
        for alias in [name, *entry.get("aliases", [])]:
            index[_normalise(alias)] = name
    return index


def is_builtin(name: str) -> bool:
    """Whether `name` (case-insensitive, aliases allowed) is a built-in model's shapes."""
    return _normalise(name) in _builtin_index()


def builtin_names() -> list[str]:
    return list(builtin_entries())


def builtin_spec(name: str) -> ModelSpec:
    """The built-in entry for `name` (case-insensitive, aliases allowed)."""
    key = _builtin_index().get(_normalise(name))
    if key is None:
        raise ModelError(_unknown_model_message(name))
    e = builtin_entries()[key]
    return ModelSpec(
        name=key, family=e["family"], layers=e["layers"], hidden=e["hidden"],
        intermediate=e["intermediate"], heads=e["heads"], kv_heads=e["kv_heads"],
        head_dim=e.get("head_dim") or e["hidden"] // e["heads"], vocab=e["vocab"],
        tied_embeddings=bool(e["tied"]), attention_bias=bool(e.get("attention_bias", False)),
        max_position=e.get("max_position", 0), sliding_window=e.get("sliding_window") or 0, source="built-in")


def _unknown_model_message(ref: str) -> str:
    close = difflib.get_close_matches(_normalise(ref), list(_builtin_index()), n=1, cutoff=0.6)
    hint = f" (did you mean '{_builtin_index()[close[0]]}'?)" if close else ""
    return (f"model '{ref}' is neither a local model directory, a config.json, a .gguf file, "
            f"nor a built-in name{hint}; `lowmem plan --list-models` shows the built-in names "
            f"(lowmem never downloads from the hub)")


# ---------------------------------------------------------------- config.json

def from_hf_config(config: dict[str, Any], source: str = "") -> ModelSpec:
    """A spec from the dict of a Hugging Face `config.json`; a ModelError naming the key whose
    value no such model could have."""
    where = f"{source}: " if source else ""
    if not isinstance(config, dict):
        raise ModelError(f"{where}expected a JSON object of the model's settings (a Hugging Face config.json); "
                         f"found {type(config).__name__ if config is not None else 'null'}")
    family = config.get("model_type", "")
    if not isinstance(family, str) or family not in FAMILIES:
        raise ModelError(f"{where}model_type {family!r} is not a Llama-style decoder; "
                         f"lowmem plans and trains {', '.join(FAMILIES)} models")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"{where}hidden_act {act!r}: lowmem expects the SiLU-gated MLP of Llama models")

    def whole(key: str, *, required: bool = True, least: int = 1) -> int | None:
        """config[key], a whole number >= least; None where an optional key is absent or null."""
        value = config.get(key)
        if value is None:
            if required:
                raise ModelError(f"{where}{key!r} is {'null' if key in config else 'missing'}; "
                                 f"cannot read the model's shapes")
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ModelError(f"{where}{key!r} must be a whole number, {least} or more; found {value!r}")
        return value

    layers, hidden, intermediate = whole("num_hidden_layers"), whole("hidden_size"), whole("intermediate_size")
    heads, vocab = whole("num_attention_heads"), whole("vocab_size")
    kv_heads = whole("num_key_value_heads", required=False) or heads
    head_dim = whole("head_dim", required=False)
    if head_dim is None:
        if hidden % heads:
            raise ModelError(f"{where}hidden_size {hidden} is not a multiple of num_attention_heads {heads}, "
                             f"and no head_dim says how wide a head is")
        head_dim = hidden // heads
    if heads % kv_heads:
        raise ModelError(f"{where}num_attention_heads {heads} is not a multiple of num_key_value_heads "
                         f"{kv_heads}: each key/value head serves a whole group of query heads")
    # Qwen2 configs carry a window they do not use unless use_sliding_window is set.
    windowed = config.get("use_sliding_window", family == "mistral")
    return ModelSpec(
        name=name if isinstance(name := config.get("_name_or_path"), str) and name else
        Path(source).parent.name or family,
        family=family,
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama only when attention_bias is set.
        attention_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
        max_position=whole("max_position_embeddings", required=False, least=0) or 0,
        sliding_window=(whole("sliding_window", required=False, least=0) or 0) if windowed else 0,
        source=source or "config.json")


def from_config_file(path: Path) -> ModelSpec:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    return from_hf_config(data, str(path))


# ---------------------------------------------------------------- GGUF

def from_gguf(path: Path) -> ModelSpec:
    """A spec from GGUF metadata (`{arch}.block_count`, `.embedding_length`, ...).

    Tied embeddings: the file has no separate `output.weight` tensor.
    Attention bias: block 0 has an `attn_q.bias` tensor.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror})") from None
    return _read_gguf(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _read_gguf(path: str, size: int, mtime_ns: int) -> ModelSpec:
    # Cached by file identity: GGUFReader parses the tokenizer's arrays too,
    # which takes seconds for a 49k-token vocabulary.
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/struct errors on junk
        raise ModelError(f"{path}: not a readable GGUF file ({e})") from None

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    arch = field("general.architecture", "")
    family = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}.get(arch)
    if family is None:
        raise ModelError(f"{path}: GGUF architecture '{arch}' is not a Llama-style decoder; "
                         f"lowmem plans and trains {', '.join(FAMILIES)} models")
    tensors = {t.name for t in reader.tensors}

    def need(key: str) -> int:
        value = field(f"{arch}.{key}")
        if value is None:
            raise ModelError(f"{path}: GGUF metadata has no '{arch}.{key}'")
        return int(value)

    hidden, heads = need("embedding_length"), need("attention.head_count")
    vocab = field(f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelError(f"{path}: GGUF metadata gives no vocabulary size")
        vocab = len(tokens.data)
    return ModelSpec(
        name=field("general.name") or Path(path).stem,
        family=family,
        layers=need("block_count"),
        hidden=hidden,
        intermediate=need("feed_forward_length"),
        heads=heads,
        kv_heads=int(field(f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(field(f"{arch}.attention.key_length") or hidden // heads),
        vocab=int(vocab),
        tied_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        max_position=int(field(f"{arch}.context_length") or 0),
        sliding_window=int(field(f"{arch}.attention.sliding_window") or 0),
        source=str(path))


# ---------------------------------------------------------------- entry point

def spec_for(model_ref: str) -> ModelSpec:
    """The spec of `model_ref`: a model directory, a config.json, a .gguf file or a built-in name."""
    path = Path(model_ref).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return from_config_file(path / "config.json")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return from_gguf(ggufs[0])
        if ggufs:
            raise ModelError(f"{path}: no config.json, and {len(ggufs)} .gguf files ({ggufs[0].name}, "
                             f"{ggufs[1].name}{', ...' if len(ggufs) > 2 else ''}): give the one to use, "
                             f"e.g. --model {ggufs[0]}")
        raise ModelError(f"{path}: no config.json here (nor a single .gguf file); "
                         "expected a Hugging Face model directory")
    if path.is_file():
        if path.suffix == ".gguf":
            return from_gguf(path)
        if path.name.endswith(".json"):
            return from_config_file(path)
        raise ModelError(f"{path}: expected a model directory, a config.json or a .gguf file")
    if model_ref.endswith((".gguf", ".json")) or model_ref.startswith((".", "/", "~")):
        raise ModelError(f"{model_ref}: no such file or directory")
    return builtin_spec(model_ref)
