"""Do verdicts from a cheaper way of running the model agree with fp32's? fp32 against int8
weights (QUANTIZATION=int8) or bf16 (MODEL_DTYPE=bfloat16), on the same distinct classification
prompts, through the engine's own repository and batch scheduler (no HTTP).

    python scripts/agreement.py                       # fp32 against int8, 500 prompts, the bundled default model
    python scripts/agreement.py --against bfloat16    # fp32 against bf16
    python scripts/agreement.py --prompts 64          # a smoke run

The prompts are the side-by-side benchmark's short workload (bench_peers.py): a yes/no or
sentiment question over one post, laid out with the service's system prompt, each with its own
author so no two are the same. Each is answered greedily (temperature 0, at most 10 tokens) by
each way; the verdict is the answer's first word, lowercased, without punctuation. Prints how many
verdicts agree and how many whole answers are identical, the verdicts' counts per way, and every
disagreement.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import sys
from concurrent.futures import ThreadPoolExecutor

from serving import use_the_checkout_in_process

# --against: (MODEL_DTYPE, QUANTIZATION) of each way, fp32 first
WAYS = {
    "int8": {"fp32": ("float32", "none"), "int8": ("float32", "int8")},
    "bfloat16": {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none")},
}


def verdict(text: str) -> str:
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


async def answers(repository, model_id: str, prompts, params, batch: int) -> list[str]:
    texts: list[str] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        generations = await asyncio.gather(*(repository.generate_text(model_id, p, params) for p in chunk))
        texts += [generation.text for generation in generations]
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", choices=sorted(WAYS), default="int8")
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32, help="requests submitted together")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    use_the_checkout_in_process()
    from bench_peers import short_prompts
    from domain import ChatMessage, GenerationParams, Prompt
    from engine.models.catalog import BentoModelStoreCatalog
    from engine.models.memory import MemoryLimits
    from engine.repository import TransformersModelRepository
    from settings import get_settings

    model_id = get_settings().default_model_id
    prompts = [
        Prompt(tuple(ChatMessage(m["role"], m["content"]) for m in messages))
        for messages in short_prompts(args.prompts, args.seed)
    ]
    params = GenerationParams(max_new_tokens=10, temperature=0.0, timeout_s=600)
    limits = MemoryLimits(max_usage_fraction=0.95, min_free_gb=0.5, gpu_memory_fraction=0.8)
    ways = WAYS[args.against]
    texts = {}
    catalog = BentoModelStoreCatalog()
    with ThreadPoolExecutor(4) as executor:
        for way, (dtype, quantization) in ways.items():
            repository = TransformersModelRepository(
                catalog, executor, limits, dtype, quantization_setting=quantization
            )
            asyncio.run(repository.load_model(model_id, "cpu"))
            texts[way] = asyncio.run(answers(repository, model_id, prompts, params, args.batch))
            asyncio.run(repository.unload_model(model_id))
            print(f"{way}: {len(texts[way])} answers", file=sys.stderr, flush=True)

    first, second = ways
    verdicts = {way: [verdict(text) for text in texts[way]] for way in ways}
    same_verdict = sum(a == b for a, b in zip(*verdicts.values()))
    same_text = sum(a == b for a, b in zip(*texts.values()))
    count = len(prompts)
    print(f"model {model_id}, {first} against {second}: {count} distinct classification prompts, greedy, <= 10 tokens")
    print(f"verdicts that agree: {same_verdict}/{count} ({same_verdict / count:.1%})")
    print(f"answers identical word for word: {same_text}/{count} ({same_text / count:.1%})")
    for way in ways:
        print(f"{way} verdicts: {dict(collections.Counter(verdicts[way]).most_common())}")
    for index, (a, b) in enumerate(zip(*verdicts.values())):
        if a != b:
            print(f"  #{index}: {first} {texts[first][index]!r} | {second} {texts[second][index]!r}")


if __name__ == "__main__":
    main()
