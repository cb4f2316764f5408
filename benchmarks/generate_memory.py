"""`lowmem generate`'s memory: predicted vs measured peak on the embedded model, on the CPU.

For each holding of the base (fp32, bf16, NF4) and prompt length, the embedded
SmolLM2-135M answers greedily through lowmem.evaluate.generate under
lowmem.measure.LiveTensorBytes; the peak of live tensors is printed beside
memory.generation_bytes (what `lowmem generate` holds to its budget) and the
relative error. NF4's row leaves out the one dequantized weight the prediction
counts: bitsandbytes' fused 4-bit matmul makes it inside one op, which a
dispatch mode cannot see (the CUDA allocator does).

    python benchmarks/generate_memory.py
    python benchmarks/generate_memory.py --repeat 400 --new-tokens 128
"""

from __future__ import annotations

import argparse
import types


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, nargs="+", default=[10, 200],
                        help="prompts: a sentence repeated this many times (default: 10 200)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens answered (default: 64)")
    args = parser.parse_args()

    import torch

    from lowmem import memory
    from lowmem.evaluate import generate, render_chat
    from lowmem.measure import LiveTensorBytes
    from lowmem.model import load_model, resolve_model_dir
    from lowmem.spec import LINEARS, spec_for

    spec = spec_for(str(resolve_model_dir("smollm2-135m", log=lambda *_: None)))
    print(f"{'base':5} {'prompt':>6} {'new':>4} {'measured':>12} {'predicted':>12} {'error':>7}")
    for fmt in ("fp32", "bf16", "nf4"):
        dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
        model, tokenizer, _ = load_model("smollm2-135m", "cpu", dtype, log=lambda *_: None,
                                         nf4_targets=LINEARS if fmt == "nf4" else ())
        holding = types.SimpleNamespace(method="lora", base_format=fmt, device="cpu",
                                        compute_dtype="bfloat16" if fmt == "bf16" else "float32")
        for repeat in args.repeat:
            messages = [{"role": "user", "content": "Tell me a story about a dragon and a knight. " * repeat}]
            prompt = len(tokenizer(render_chat(tokenizer, messages, add_generation_prompt=True),
                                   add_special_tokens=False)["input_ids"])
            with LiveTensorBytes("cpu") as live:
                answer = generate(model, tokenizer, [messages], "cpu", args.new_tokens)[0]
            new = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
            predicted = memory.generation_bytes(spec, holding, prompt, args.new_tokens)
            if fmt == "nf4":
                predicted -= spec.max_linear_numel() * 4
            print(f"{fmt:5} {prompt:6d} {new:4d} {live.peak / 2**20:9.1f} MiB {predicted / 2**20:8.1f} MiB "
                  f"{predicted / live.peak - 1:+7.1%}")
        del model


if __name__ == "__main__":
    main()
