"""``k2serve generate``: load a model folder and decode greedily in this process.

Lifecycle: read config and tokenizer -> render the prompt with the folder's chat template ->
load weights -> stream greedy tokens to stdout through the incremental detokenizer -> print a
one-line summary (tokens, seconds, tokens/s) to stderr. The smallest end-to-end demo; the engine
and the server replace it for real traffic.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from k2serve.router.chat_template import ChatTemplate
from k2serve.router.tokenizer import KimiTokenizer
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.model_loader import load_model


def run_generate(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens: must be >= 1, got {args.max_tokens}")
    tokenizer = KimiTokenizer.from_model_dir(args.model)
    if args.raw:
        prompt_ids = tokenizer.encode(args.prompt)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        prompt_ids = tokenizer.encode(ChatTemplate.from_model_dir(args.model).render(messages))
    start = time.perf_counter()
    model = load_model(
        args.model,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        max_positions=len(prompt_ids) + args.max_tokens,
    )
    loaded = time.perf_counter()
    detok = tokenizer.incremental_detokenizer()

    def show(token: int) -> None:
        sys.stdout.write(detok.push(token))
        sys.stdout.flush()

    ids = greedy_generate(
        model, prompt_ids, max_tokens=args.max_tokens, stop_token_ids=tokenizer.stop_token_ids, on_token=show
    )
    sys.stdout.write(detok.flush() + "\n")
    done = time.perf_counter()
    if args.show_ids:
        print(f"token ids: {ids}")
    decode_s = done - loaded
    print(
        f"[{len(prompt_ids)} prompt tokens, {len(ids)} generated in {decode_s:.2f}s "
        f"({len(ids) / decode_s:.1f} tok/s), load {loaded - start:.2f}s]",
        file=sys.stderr,
    )
    return 0
