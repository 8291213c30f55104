"""
Sample text from a trained model (out_dir/ckpt.pt) or from pretrained SmolLM2-135M weights.

    python sample.py --start "Once upon a time"
    python sample.py --out_dir=out/cpu_moe --start FILE:prompt.txt --num_samples=3 --stream=True
    python sample.py --init_from=smollm2-135m --temperature=0 --start "Once upon a time"
    python sample.py --out_dir=out/mtp --speculative=True    # a model trained with --mtp_depth=1 or more

Decoding uses the model's KV cache (for MLA the absorbed latent cache) and the tokenizer saved in the
checkpoint, and ends a sample at the end-of-text token unless --stop_at_eot=False. --speculative=True drafts
tokens with the model's multi-token-prediction modules and checks them with one forward of the main model
(the same text at temperature 0, the same distribution otherwise). Text goes to stdout; notes, the generation
speed and the drafts' acceptance rate go to stderr.
"""

import os
import sys
import time
from dataclasses import dataclass

import torch

import pretrained
from configurator import UserError, configure, run_main
from device import autocast, pick_device, pick_dtype
from generate import Sampling, speculate, stream
from tokenizer import eot_id

@dataclass
class SampleConfig:
    """sample.py's settings (configurator.py: --key=value)."""
    out_dir: str = "out"                # the checkpoint directory for init_from="resume"
    init_from: str = "resume"           # "resume" (out_dir/ckpt.pt) or "smollm2-135m" (pretrained SmolLM2-135M weights)
    start: str = "\n"                   # the prompt, or FILE:path to read it from a file
    num_samples: int = 1                # samples drawn one after another
    max_new_tokens: int = 200           # tokens generated per sample (fewer if it reaches end-of-text)
    temperature: float = 0.8            # 0 = greedy; < 1 sharper, > 1 more random
    top_k: int | None = 200             # sample from the k most likely tokens only; None = all
    top_p: float = 1.0                  # nucleus sampling: the smallest set of tokens with probability >= top_p; 1.0 = off
    seed: int = 1337                    # the sampling generator's seed: the same seed, the same text
    device: str = "auto"                # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    dtype: str = "auto"                 # auto (bfloat16 on GPUs that have it, float16 on older GPUs, float32
                                        # otherwise), float32, bfloat16, float16
    stream: bool = False                # print tokens as they are generated
    stop_at_eot: bool = True            # end a sample at the end-of-text token
    kv_cache: bool = True               # False recomputes the whole context for every token (to measure what the cache saves)
    speculative: bool = False           # speculative decoding with the model's MTP modules as the drafter (mtp_depth > 0)

    def __post_init__(self):
        pretrained.check_init_from(self.init_from)
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top_k={self.top_k}: must be at least 1 (or None for no top-k)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p={self.top_p}: must be in (0, 1] (1 turns it off)")
        if self.temperature < 0:
            raise UserError(f"--temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens={self.max_new_tokens}: must be at least 1")
        if self.num_samples < 1:
            raise UserError(f"--num_samples={self.num_samples}: must be at least 1")
        if self.speculative and not self.kv_cache:
            raise UserError("--speculative=True checks the drafts in one forward over the KV cache: drop --kv_cache=False")


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    if not os.path.isfile(path):
        raise UserError(f"--start=FILE:{path}: no such file")
    with open(path, encoding="utf-8") as f:
        return f.read()


def main(argv=None):
    settings = configure(SampleConfig(), argv)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    prompt = read_prompt(settings.start)
    model, tokenizer = pretrained.load_model(settings.init_from, settings.out_dir)
    if settings.speculative and not model.mtp:
        where = "SmolLM2-135M" if settings.init_from == "smollm2-135m" else f"the model in {settings.out_dir}"
        raise UserError(f"--speculative=True drafts with multi-token-prediction modules, and {where} has none "
                        "(mtp_depth=0): train one with --mtp_depth=1, or drop --speculative")
    model.eval().to(device)

    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise UserError("the prompt is empty: give --start some text")
    block_size = model.config.block_size
    if len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} tokens, more than block_size {block_size}: "
              f"keeping its last {block_size}", file=sys.stderr)
        ids = ids[-block_size:]
    eot = eot_id(tokenizer) if settings.stop_at_eot else None

    torch.manual_seed(settings.seed)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    sampling = Sampling(settings.temperature, settings.top_k, settings.top_p, generator)
    n_tokens, t0, drafts = 0, time.perf_counter(), {"drafted": 0, "accepted": 0}
    for _ in range(settings.num_samples):
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        out, shown = list(ids), ""
        if settings.stream:
            shown = tokenizer.decode(out, skip_special_tokens=False)
            print(shown, end="", flush=True)
        with autocast(device, dtype):
            n_new = settings.max_new_tokens
            tokens = speculate(model, idx, n_new, sampling, stats=drafts) if settings.speculative else \
                stream(model, idx, n_new, sampling, kv_cache=settings.kv_cache)
            for token in tokens:
                token = token.item()
                n_tokens += 1
                if token == eot:
                    break
                out.append(token)
                if settings.stream:
                    text = tokenizer.decode(out, skip_special_tokens=False)
                    if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                        print(text[len(shown):], end="", flush=True)
                        shown = text
        text = tokenizer.decode(out, skip_special_tokens=False)
        print(text[len(shown):] if settings.stream else text)
        print("---------------")
    seconds = time.perf_counter() - t0
    print(f"{n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:.1f} tokens/s "
          f"({'with' if settings.kv_cache else 'without'} KV cache, {device}, {dtype})", file=sys.stderr)
    if settings.speculative:
        print(f"speculative decoding: {drafts['accepted']} of {drafts['drafted']} drafted tokens accepted "
              f"({drafts['accepted'] / max(drafts['drafted'], 1):.1%})", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
