"""`lowmem generate`: answer a prompt with a base model, optionally with an adapter.

Before any weight is read, the memory of the generation is predicted
(lowmem.memory.generation_bytes) and held to a budget: `--vram`, else what the
device has free. `--base auto` takes the widest format that fits, so a 70B
LoRAM run's recovered adapter answers on the full model in NF4 where bf16 does
not fit; when nothing fits, the error gives each format's figure and what would.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path

from lowmem.errors import ModelError

SAFETY_MARGIN = 0.05       # as the planner keeps free (config key safety_margin)
EXPORT_BITS, EXPORT_GROUP = (8, 4, 3, 2), 128     # what `lowmem export --quantized` writes, widest first
FORMATS = {"cuda": ("bf16", "nf4"), "cpu": ("fp32", "bf16", "nf4")}   # widest first, for --base auto


def register(sub) -> None:
    p = sub.add_parser("generate", help="answer a prompt with a model and an optional adapter",
                       description="Answer a prompt greedily. --adapter takes an adapter folder "
                                   "(PEFT layout) or a run directory (its final adapter, else the "
                                   "newest checkpoint's). The memory the answer needs is predicted "
                                   "before any weight is read and held to --vram (default: what the "
                                   f"device has free, less {SAFETY_MARGIN:.0%}); --base auto holds the "
                                   "base in the widest format that fits.")
    p.add_argument("prompt", help="the user message")
    p.add_argument("--model", default=None,
                   help="base model: local directory, .gguf, smollm2-135m, or a folder written by "
                        "`lowmem export --quantized` (default: the adapter's run model, else smollm2-135m)")
    p.add_argument("--adapter", help="adapter folder or run directory")
    p.add_argument("--system", default=None, help="system message (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap (default: 128)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to answer: auto takes the GPU when there is one (default: auto)")
    p.add_argument("--base", choices=("auto", "fp32", "bf16", "nf4"), default="auto",
                   help="how the base's block linears are held: auto takes the widest that fits the "
                        "budget (CUDA: bf16, then nf4; CPU: fp32, bf16, nf4); nf4 quantizes them while "
                        "they load, as QLoRA does, so the full-precision model never exists "
                        "(default: auto)")
    p.add_argument("--vram", default=None, metavar="SIZE",
                   help="memory the generation may use on its device: 24G, 500M, ... (default: the "
                        "GPU's free memory on CUDA, the available RAM on the CPU)")
    p.set_defaults(func=run)


def find_adapter(path: Path, note=None) -> tuple[Path, str | None]:
    """(adapter folder, base model recorded by the run or None). A run that has not finished, or
    lost its adapter/, answers with its newest valid checkpoint, which `note` is told."""
    from lowmem.checkpoint import run_adapter_folder, run_holding, run_identity
    from lowmem.lora import ADAPTER_CONFIG, read_adapter_config
    from lowmem.quant.l4q import L4Q_CONFIG

    if not path.exists():
        raise ModelError(f"--adapter {path}: no such folder")
    if (path / ADAPTER_CONFIG).is_file():
        # Inside a run (adapter-step-N/, checkpoints/step-N/adapter/): the base as the run names it
        # ("smollm2-135m" rather than the embedded model's cache folder); else the adapter's own.
        run = run_holding(path)
        if run is not None:
            try:
                return path, run_identity(run)[0]
            except ModelError:
                pass
        return path, read_adapter_config(path).get("base_model_name_or_path")
    if (path / "config.yaml").is_file():
        model, method = run_identity(path)
        if method in ("full", "galore"):
            raise ModelError(f"{path}: a '{method}' run trains the whole model and has no adapter; answer "
                             f"with --model {path / 'model'}")
        if method == "l4q":
            raise ModelError(f"{path}: an L4Q run's adapter lives in its quantized weights; write them with "
                             f"`lowmem export {path} --quantized OUT`, then answer with --model OUT")
        folder, why = run_adapter_folder(path, ADAPTER_CONFIG,
                                         (lambda m: note(f"warning: {m}")) if note is not None else (lambda m: None))
        if folder is None:
            raise ModelError(f"{path}: no adapter to answer with: adapter/ holds no {ADAPTER_CONFIG} "
                             f"(the run has not finished, or it was removed), and {why}")
        if folder != path / "adapter" and note is not None:
            note(f"{why}: answering with its checkpoint {folder.parent.name}")
        return folder, model
    if (path / L4Q_CONFIG).is_file():
        source = path if run_holding(path) is not None else "RUN_DIR (the run that trained it)"
        raise ModelError(f"{path}: an L4Q adapter lives in its quantized weights; write them with "
                         f"`lowmem export {source} --quantized OUT`, then answer with --model OUT")
    raise ModelError(f"{path}: no adapter here (expected {ADAPTER_CONFIG}, or a run directory with one)")


@dataclass(frozen=True)
class Budget:
    """What a generation may use on its device: `bytes`, and whether a `--vram` gave it (the CUDA
    context then counts against it) or it is what the device has free now (the context exists)."""

    bytes: int
    device: str
    given: bool
    host: int | None = None    # CUDA: the host's available RAM, which a dense base passes through

    @property
    def usable(self) -> int:
        return int(self.bytes * (1 - SAFETY_MARGIN))

    def describe(self) -> str:
        from lowmem.config import format_size

        where = "--vram" if self.given else ("free on the GPU" if self.device == "cuda" else "available RAM")
        return f"{format_size(self.usable)} ({where} {format_size(self.bytes)} less {SAFETY_MARGIN:.0%})"


def device_budget(device: str, vram: str | None) -> Budget:
    """`--vram` when given, else the GPU's free memory (CUDA) or the available RAM (CPU)."""
    from lowmem.config import parse_size
    from lowmem.errors import ConfigError

    if vram is not None:
        try:
            size = parse_size(vram)
        except ValueError as e:
            raise ConfigError(f"--vram: {e}") from None
        if size <= 0:
            raise ConfigError(f"--vram must be more than nothing, got {vram!r}")
        return Budget(size, device, True, _available_ram() if device == "cuda" else None)
    if device == "cuda":
        import torch

        from lowmem.memstats import device_memory

        free, _ = device_memory(torch.cuda.current_device())
        return Budget(free, device, False, _available_ram())
    return Budget(_available_ram(), device, False)


def _available_ram() -> int:
    import psutil

    return psutil.virtual_memory().available


def host_bytes(spec, fmt: str, budget: Budget, streams: bool) -> int:
    """Host RAM that loading the base in `fmt` onto a GPU passes through: one tensor at a time
    when it `streams` (safetensors: lowmem.model.load_streamed, and NF4 always), else the whole
    dense model, which transformers reads into host RAM before it moves (a .bin checkpoint, a
    quantization_config). 0 on the CPU, where it is the budget itself."""
    from lowmem import memory

    if budget.device != "cuda" or fmt not in ("fp32", "bf16") or streams:
        return 0
    return memory.weight_bytes(spec, holding(fmt, budget.device))


def compute_dtype(fmt: str, device: str):
    """The torch dtype a base held as `fmt` loads and computes in (holding's compute_dtype)."""
    import torch

    return torch.bfloat16 if holding(fmt, device).compute_dtype == "bfloat16" else torch.float32


def holding(fmt: str, device: str, bits: int | None = None, group: int | None = None, scale_bytes: int = 2):
    """The plan-like record memory.generation_bytes reads: block linears in `fmt`, the rest
    and the compute in bf16 on CUDA, in fp32 on the CPU (bf16 for a bf16 base)."""
    compute = "bfloat16" if device == "cuda" or fmt == "bf16" else "float32"
    return types.SimpleNamespace(method="lora", base_format=fmt, compute_dtype=compute, device=device,
                                 double_quant=True, quant_bits=bits, quant_group=group,
                                 quant_scale_bytes=scale_bytes)


def need_bytes(spec, fmt: str, budget: Budget, prompt_tokens: int, new_tokens: int, adapter_params: int,
               bits: int | None = None, group: int | None = None, scale_bytes: int = 2) -> int:
    """Predicted bytes of the generation in `fmt`, with the CUDA overhead that counts against `budget`."""
    from lowmem import memory

    plan = holding(fmt, budget.device, bits, group, scale_bytes)
    allocated = memory.generation_bytes(spec, plan, prompt_tokens, new_tokens, adapter_params=adapter_params)
    if budget.device != "cuda":
        return allocated
    if budget.given:
        return allocated + memory.overhead_bytes(allocated, plan)
    return allocated + int(memory.ALLOCATOR_FRAGMENTATION * allocated)   # the context is already there


def choose_format(spec, budget: Budget, pinned: str, prompt_tokens: int, new_tokens: int,
                  adapter_params: int, name: str = "", run: str | None = None,
                  streams: bool = True) -> tuple[str, int]:
    """(format, predicted bytes): `pinned`, or for "auto" the widest of FORMATS that fits the
    budget. ModelError naming `name` and every candidate's figure when none asked for fits,
    with what would: `run`, the run the adapter came from, could be exported smaller."""
    from lowmem.config import format_size

    candidates = FORMATS[budget.device] if pinned == "auto" else (pinned,)
    needs = {fmt: need_bytes(spec, fmt, budget, prompt_tokens, new_tokens, adapter_params) for fmt in candidates}
    host = {fmt: host_bytes(spec, fmt, budget, streams) for fmt in candidates}
    for fmt, need in needs.items():
        if need <= budget.usable and (budget.host is None or host[fmt] <= budget.host):
            return fmt, need
    reasons = []
    for fmt, n in needs.items():
        if n > budget.usable:
            reasons.append(f"{format_size(n)} ({fmt} base) is more than the budget")
        else:
            reasons.append(f"{format_size(n)} ({fmt} base) would fit, but loading it passes through "
                           f"{format_size(host[fmt])} of host RAM, with {format_size(budget.host)} available")
    hints = []
    if pinned != "auto":
        hints.append("--base auto takes the widest format that fits")
    if budget.device == "cuda":
        hints.append("--device cpu answers from the host's RAM, slowly")
    bits = next((b for b in EXPORT_BITS if need_bytes(spec, "int", budget, prompt_tokens, new_tokens, 0, b,
                                                       EXPORT_GROUP) <= budget.usable), None)
    if run is not None and bits is not None:
        hints.append(f"`lowmem export {run} --quantized DIR --bits {bits}` writes a {bits}-bit model with the "
                     f"adapter merged in, which fits: answer with --model DIR")
    raise ModelError(f"answering with {name or spec.name} does not fit here (budget: {budget.describe()}): "
                     + "; ".join(reasons) + "".join(f"; {h}" for h in hints))


def run(args) -> int:
    import torch

    try:
        return _answer(args)
    except torch.cuda.OutOfMemoryError as e:      # the prediction held, but the GPU is shared
        from lowmem.planner import BudgetError

        said = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BudgetError(f"out of GPU memory while answering ({said}); whatever else runs on the GPU takes "
                          f"from the memory the prediction was held to (nvidia-smi lists it): free it, or "
                          f"answer with --base nf4, fewer --max-new-tokens, or --device cpu") from None


def _answer(args) -> int:
    import torch

    from lowmem.config import format_size
    from lowmem.evaluate import generate, render_chat
    from lowmem.lora import load_adapter, read_adapter
    from lowmem.memory import lora_params
    from lowmem.model import load_tokenizer, load_weights, loads_streamed, resolve_model_dir
    from lowmem.planner import resolve_device
    from lowmem.quant.export import is_quantized_export, load_quantized_export, read_quant_config
    from lowmem.spec import LINEARS, spec_for

    if args.max_new_tokens < 1:
        from lowmem.errors import ConfigError

        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    device = resolve_device(args.device)
    def note(message: str) -> None:          # beside the answer, which alone goes to stdout
        print(message, file=sys.stderr)

    adapter, base = (find_adapter(Path(args.adapter), note) if args.adapter else (None, None))
    ref = args.model or base or "smollm2-135m"
    budget = device_budget(device, args.vram)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})

    if is_quantized_export(ref):
        if adapter is not None:
            raise ModelError(f"{ref} is a quantized export with its adapter merged in; drop --adapter")
        if args.base != "auto":
            raise ModelError(f"{ref} is a quantized export: its weights keep the format they were "
                             f"exported in; drop --base")
        meta = read_quant_config(Path(ref))
        spec = spec_for(ref)
        tokenizer = load_tokenizer(Path(ref)) if (Path(ref) / "tokenizer_config.json").is_file() else None
        if tokenizer is None:
            raise ModelError(f"{ref} has no tokenizer files; export from a run whose model has them")
        prompt_tokens = _count_tokens(tokenizer, messages, render_chat)
        max_new_tokens = fit_context(spec, prompt_tokens, args.max_new_tokens, ref, note)
        need = need_bytes(spec, "int", budget, prompt_tokens, max_new_tokens, 0,
                          meta["bits"], meta["group_size"], 4 if meta.get("scale_dtype") == "float32" else 2)
        if need > budget.usable:
            raise ModelError(f"answering with {ref} ({meta['bits']}-bit) needs {format_size(need)}, more "
                             f"than {budget.describe()}" + ("; --device cpu answers from the host's RAM"
                                                             if device == "cuda" else ""))
        # Dequantized once when the dense weights fit beside the codes (about 6x faster a
        # token than dequantizing every layer at every step), else kept packed.
        dtype = compute_dtype("int", device)
        dense = "bf16" if dtype == torch.bfloat16 else "fp32"
        dense_need = need_bytes(spec, dense, budget, prompt_tokens, max_new_tokens, 0)
        once = need + dense_need <= budget.usable
        how = (f"dequantized once to {dense} (predicted {format_size(dense_need)})" if once else
               f"dequantized layer by layer at every step: {format_size(dense_need)} of {dense} weights do not fit")
        note(f"{ref}: {meta['bits']}-bit export on {device}, predicted {format_size(need)} of "
             f"{budget.describe()}; {how}")
        model, _ = load_quantized_export(ref, device, dtype, materialize=once)
    else:
        try:
            model_dir = resolve_model_dir(ref, log=note)
        except ModelError as e:
            if args.model or not base:
                raise
            raise ModelError(f"{e} (the base named by {args.adapter}'s adapter; --model gives another)") from None
        spec = spec_for(str(model_dir))
        tokenizer = load_tokenizer(model_dir)
        prompt_tokens = _count_tokens(tokenizer, messages, render_chat)
        max_new_tokens = fit_context(spec, prompt_tokens, args.max_new_tokens, ref, note)
        adapter_params = 0
        if adapter is not None:
            adapter = read_adapter(adapter)   # checked before the base loads
            adapter_params = lora_params(spec, adapter.wrapped, adapter.rank)
        run_dir = _exportable_run(args.adapter)
        fmt, need = choose_format(spec, budget, args.base, prompt_tokens, max_new_tokens, adapter_params,
                                  name=ref, run=run_dir, streams=loads_streamed(model_dir))
        note(f"{ref}: {fmt} base on {device}, predicted {format_size(need)} of {budget.describe()}"
             + _trained_on_note(run_dir, fmt, args.base))
        model = load_weights(model_dir, device, compute_dtype(fmt, device), note,
                             nf4_targets=LINEARS if fmt == "nf4" else ())
    if adapter is not None:
        load_adapter(model, adapter)
    print(generate(model, tokenizer, [messages], device, max_new_tokens)[0])
    return 0


def _trained_on_note(run_dir: str | None, fmt: str, pinned: str) -> str:
    """For a QLoRA run's adapter on a wider base than it trained on (--base auto): that its
    answers differ a little from its evaluations, and how to have them as it did."""
    if run_dir is None or pinned != "auto" or fmt == "nf4":
        return ""
    import yaml

    try:
        plan = yaml.safe_load((Path(run_dir) / "plan.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ""
    if not isinstance(plan, dict) or plan.get("method") != "qlora":
        return ""
    return "; the run trained and evaluated on an nf4 base: --base nf4 answers as it did"


def _exportable_run(adapter: str | None) -> str | None:
    """`adapter` when it names a run directory (which `lowmem export --quantized --bits N` can
    write: find_adapter has refused an L4Q run, whose export keeps the bits it trained), else None."""
    return adapter if adapter is not None and (Path(adapter) / "config.yaml").is_file() else None


def fit_context(spec, prompt_tokens: int, max_new_tokens: int, name: str, note) -> int:
    """`max_new_tokens`, shortened (and `note` told) to what the model's context leaves after the
    prompt: past its context a model's positions mean nothing it learned, and its answer is noise.
    A prompt that fills the context alone is refused."""
    limit = spec.max_position
    if not limit:                           # a config that does not say: nothing to check against
        return max_new_tokens
    if prompt_tokens >= limit:
        raise ModelError(f"the prompt is {prompt_tokens} tokens (with the chat template); {name} reads at "
                         f"most {limit} (max_position_embeddings), answer included: shorten it")
    if prompt_tokens + max_new_tokens > limit:
        note(f"--max-new-tokens {max_new_tokens}: {name}'s context of {limit} tokens leaves "
             f"{limit - prompt_tokens} after the {prompt_tokens}-token prompt; the answer stops there")
        return limit - prompt_tokens
    return max_new_tokens


def _count_tokens(tokenizer, messages: list[dict], render_chat) -> int:
    """The prompt's length in tokens, as `generate` will feed it."""
    text = render_chat(tokenizer, list(messages), add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
