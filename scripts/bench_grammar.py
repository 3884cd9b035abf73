"""Which structured-output library fits the engine: xgrammar, llguidance and outlines-core, each
where installed, on the bundled model's tokenizer, doing what a batch step needs (fill one row of a
token bitmask, accept the sampled token, know when the grammar is complete).

    python scripts/bench_grammar.py

Prints, per library: the one-off tokenizer preparation, compile time over ~20 JSON schemas plus a
regex and a choice list (a fresh compiler each, so no cache hits), the mask fill time per token
while walking each case's valid document token by token, which JSON Schema features are enforced
(the valid document passes and one breaking only that feature is refused), and the errors given
for invalid schemas. All cases use compact JSON: whitespace between tokens is never free.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import statistics
import time
from dataclasses import dataclass

import torch

from engine.layers.kernels import cpu_description, read_cpuinfo

MODEL_ID = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "json_schema" | "regex" | "choice"
    value: str
    valid: str  # a document the grammar must accept in full
    invalid: str = ""  # one it must refuse somewhere (or never finish), breaking only the feature named


def schema_case(name: str, schema: dict, valid: object, invalid: object = None) -> Case:
    compact = {"separators": (",", ":")}
    broken = "" if invalid is None else json.dumps(invalid, **compact)
    return Case(name, "json_schema", json.dumps(schema), json.dumps(valid, **compact), broken)


def obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    required = list(properties) if required is None else required
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False, **extra}


def wide_schema_and_document() -> tuple[dict, dict]:
    """A large schema (60 required fields: 100-value enums, patterned strings, arrays of objects) and a
    document for it: where compile time and the matcher's start-up show."""
    properties, document = {}, {}
    for index in range(60):
        name = f"field_{index}"
        if index % 3 == 0:
            properties[name] = {"enum": [f"value_{choice}_{index}" for choice in range(100)]}
            document[name] = f"value_7_{index}"
        elif index % 3 == 1:
            properties[name] = {"type": "string", "maxLength": 30, "pattern": "^[a-z ]+$"}
            document[name] = "hello world"
        else:
            item = obj(
                {"a": {"type": "integer", "minimum": -5, "maximum": 500}, "b": {"anyOf": [STRING, {"type": "null"}]}}
            )
            properties[name] = {"type": "array", "items": item, "maxItems": 4}
            document[name] = [{"a": 42, "b": None}]
    return obj(properties), document


STRING = {"type": "string"}
CASES = [
    schema_case(
        "person",
        obj({"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}}),
        {"name": "Ada Lovelace", "age": 36},
    ),
    schema_case("enum", obj({"color": {"enum": ["red", "green", "blue"]}}), {"color": "green"}, {"color": "pink"}),
    schema_case(
        "integer range",
        obj({"count": {"type": "integer", "minimum": 1, "maximum": 10}}),
        {"count": 7},
        {"count": 11},
    ),
    schema_case(
        "maxItems",
        obj({"tags": {"type": "array", "items": STRING, "maxItems": 3}}),
        {"tags": ["a", "b", "c"]},
        {"tags": ["a", "b", "c", "d"]},
    ),
    schema_case(
        "minItems",
        obj({"scores": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}}),
        {"scores": [3, 4]},
        {"scores": [3]},
    ),
    schema_case(
        "nested",
        obj({"address": obj({"street": STRING, "city": STRING, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
        {"address": {"street": "1 Main St", "city": "Springfield", "zip": "12345"}},
    ),
    schema_case(
        "maxLength",
        obj({"code": {"type": "string", "maxLength": 8}}),
        {"code": "AB12CD34"},
        {"code": "AB12CD345"},
    ),
    schema_case(
        "minLength",
        obj({"name": {"type": "string", "minLength": 3, "maxLength": 5}}),
        {"name": "Bob"},
        {"name": "Bo"},
    ),
    schema_case(
        "pattern",
        obj({"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}}),
        {"phone": "555-1234"},
        {"phone": "5551234"},
    ),
    schema_case(
        "booleans", obj({"active": {"type": "boolean"}, "admin": {"type": "boolean"}}), {"active": True, "admin": False}
    ),
    schema_case(
        "anyOf",
        obj({"value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 4}]}}),
        {"value": "abc"},
        {"value": True},
    ),
    schema_case(
        "optional", obj({"id": {"type": "integer"}, "note": STRING}, required=["id"]), {"id": 5}, {"note": "x"}
    ),
    schema_case("const", obj({"version": {"const": 2}}), {"version": 2}, {"version": 3}),
    schema_case("number", obj({"price": {"type": "number", "minimum": 0}}), {"price": 12.5}),
    schema_case("nullable", obj({"middle": {"type": ["string", "null"]}}), {"middle": None}, {"middle": 1}),
    schema_case(
        "array of objects",
        obj(
            {
                "lines": {
                    "type": "array",
                    "items": obj({"sku": STRING, "qty": {"type": "integer", "minimum": 1}}),
                    "maxItems": 5,
                }
            }
        ),
        {"lines": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}]},
    ),
    schema_case(
        "deep",
        obj({"a": obj({"b": obj({"c": obj({"d": {"type": "boolean"}})})})}),
        {"a": {"b": {"c": {"d": True}}}},
    ),
    schema_case(
        "$ref",
        {
            **obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}),
            "$defs": {"point": obj({"x": {"type": "integer"}, "y": {"type": "integer"}})},
        },
        {"start": {"x": 0, "y": 1}, "end": {"x": 5, "y": -2}},
    ),
    schema_case(
        "additionalProperties",
        obj({"id": {"type": "integer"}}),
        {"id": 1},
        {"id": 1, "extra": 2},
    ),
    schema_case(
        "tool call",
        obj(
            {
                "name": {"enum": ["get_weather", "get_time"]},
                "arguments": obj(
                    {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["c", "f"]}}, required=["city"]
                ),
            }
        ),
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}},
    ),
    schema_case(
        "anyOf objects",
        obj(
            {
                "shape": {
                    "anyOf": [
                        obj({"kind": {"const": "circle"}, "r": {"type": "number"}}),
                        obj({"kind": {"const": "square"}, "side": {"type": "number"}}),
                    ]
                }
            }
        ),
        {"shape": {"kind": "square", "side": 2}},
        {"shape": {"kind": "circle", "side": 2}},
    ),
    schema_case(
        "format date", obj({"when": {"type": "string", "format": "date"}}), {"when": "2024-02-29"}, {"when": "Feb"}
    ),
    schema_case("60 fields", *wide_schema_and_document()),
    Case("json_object", "json_object", "", '{"any":[1,{"x":null}],"b":"c"}', "[1]"),
    Case("regex", "regex", r"\d{3}-\d{3}-\d{4}", "555-123-4567", "555-1234-567"),
    Case("choice", "choice", json.dumps(["positive", "negative", "neutral"]), "neutral", "neutrals"),
]

INVALID_SCHEMAS = {
    "unknown type": '{"type": "strin"}',
    "not JSON": '{"type": "object",',
    "minLength > maxLength": '{"type": "string", "minLength": 5, "maxLength": 2}',
    "missing $ref": '{"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}',
    "bad pattern": '{"type": "string", "pattern": "([a-z"}',
}
INVALID_REGEX = "a(b"


def choice_regex(choices: list[str]) -> str:
    return "|".join(re.escape(choice) for choice in choices)


class Library:
    """One library behind the calls a batch step makes."""

    name = ""
    package = ""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        raise NotImplementedError

    def compile(self, kind: str, value: str): ...

    def matcher(self, compiled): ...

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None: ...

    def accept(self, matcher, token: int) -> bool: ...

    def finished(self, matcher) -> bool: ...


class XGrammar(Library):
    name = package = "xgrammar"

    def __init__(self, tokenizer, vocab_size, eos_ids):
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos_ids)

    def compile(self, kind, value):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        if kind in ("json_schema", "json_object"):
            schema = value or '{"type": "object"}'
            return compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        if kind == "regex":
            return compiler.compile_regex(value)
        return compiler.compile_regex(choice_regex(json.loads(value)))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask, row):
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher, token):
        return matcher.accept_token(token)

    def finished(self, matcher):
        return matcher.is_completed()


class LLGuidance(Library):
    name = package = "llguidance"

    def __init__(self, tokenizer, vocab_size, eos_ids):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)

    def compile(self, kind, value):
        matcher_class = self.llg.LLMatcher
        if kind in ("json_schema", "json_object"):
            grammar = matcher_class.grammar_from_json_schema(
                value or '{"type": "object"}', defaults={"whitespace_flexible": False}
            )
        elif kind == "regex":
            grammar = matcher_class.grammar_from_regex(value)
        else:
            grammar = matcher_class.grammar_from_regex(choice_regex(json.loads(value)))
        # The engine keeps a matcher in its start state per grammar and copies it per sequence: building one
        # parses the grammar again (7 ms for a 60-field schema), a copy takes microseconds.
        matcher = matcher_class(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, bitmask, row):
        self.llg.torch.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher, token):
        return matcher.consume_token(token)

    def finished(self, matcher):
        return matcher.is_accepting()


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves, the rest
    for code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{byte: chr(byte) for byte in printable}, **{byte: chr(256 + n) for n, byte in enumerate(others)}}


def byte_level_vocabulary(tokenizer) -> dict[bytes, list[int]]:
    """The tokenizer's regular tokens as the bytes they stand for (GPT-2 byte-level BPE)."""
    byte_of = {char: byte for byte, char in byte_level_alphabet().items()}
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
    vocabulary: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id not in special:
            vocabulary.setdefault(bytes(byte_of[char] for char in token), []).append(token_id)
    return vocabulary


class OutlinesCore(Library):
    name = "outlines-core"
    package = "outlines-core"

    def __init__(self, tokenizer, vocab_size, eos_ids):
        import outlines_core
        import outlines_core.kernels.torch

        self.oc = outlines_core
        self.vocabulary = outlines_core.Vocabulary(eos_ids[0], byte_level_vocabulary(tokenizer))

    def compile(self, kind, value):
        if kind in ("json_schema", "json_object"):
            regex = self.oc.json_schema.build_regex_from_schema(value or '{"type": "object"}', whitespace_pattern="")
        elif kind == "regex":
            regex = value
        else:
            regex = choice_regex(json.loads(value))
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matcher, bitmask, row):
        self.oc.kernels.torch.fill_next_token_bitmask(matcher, bitmask[row : row + 1])

    def accept(self, matcher, token):
        try:
            matcher.advance(token)
        except ValueError:
            return False
        return True

    def finished(self, matcher):
        return matcher.is_finished()


LIBRARIES = [XGrammar, LLGuidance, OutlinesCore]


def installed(library: type[Library]) -> str | None:
    try:
        return importlib.metadata.version(library.package)
    except importlib.metadata.PackageNotFoundError:
        return None


def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def allowed_ids(bitmask: torch.Tensor, row: int, vocab_size: int) -> list[int]:
    bits = (bitmask[row].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab_size].nonzero().flatten().tolist()


@dataclass
class Walk:
    accepted: bool  # every token was in the mask and accepted, and the grammar was complete at the end
    start_us: float  # a fresh matcher
    fill_us: list[float]
    only_eos_after: bool


def walk(library: Library, compiled, token_ids: list[int], eos_ids: list[int], vocab_size: int) -> Walk:
    started = time.perf_counter()
    matcher = library.matcher(compiled)
    start_us = (time.perf_counter() - started) * 1e6
    bitmask = torch.zeros(2, (vocab_size + 31) // 32, dtype=torch.int32)
    fill_us = []
    for token in token_ids:
        started = time.perf_counter()
        library.fill(matcher, bitmask, 1)
        fill_us.append((time.perf_counter() - started) * 1e6)
        if not allowed(bitmask, 1, token) or not library.accept(matcher, token):
            return Walk(False, start_us, fill_us, False)
    library.fill(matcher, bitmask, 1)
    return Walk(library.finished(matcher), start_us, fill_us, set(allowed_ids(bitmask, 1, vocab_size)) <= set(eos_ids))


def whitespace_ids(tokenizer) -> set[int]:
    return {token_id for token, token_id in tokenizer.get_vocab().items() if token and not token.strip("ĠĊĉč ")}


def measure(library_class: type[Library], tokenizer, vocab_size: int, eos_ids: list[int]) -> dict:
    started = time.perf_counter()
    library = library_class(tokenizer, vocab_size, eos_ids)
    result: dict = {"setup_s": time.perf_counter() - started, "compile_ms": {}, "cases": {}}
    result |= {"start_us": [], "first_fill_us": [], "fill_us": [], "warm_fill_us": []}
    spaces = whitespace_ids(tokenizer)
    for case in CASES:
        try:
            started = time.perf_counter()
            compiled = library.compile(case.kind, case.value)
            result["compile_ms"][case.name] = (time.perf_counter() - started) * 1000
        except Exception as error:  # noqa: BLE001 - a refused schema is a result here
            result["cases"][case.name] = f"compile failed: {first_line(error)}"
            continue
        token_ids = tokenizer.encode(case.valid, add_special_tokens=False)
        valid = walk(library, compiled, token_ids, eos_ids, vocab_size)
        result["start_us"].append(valid.start_us)
        result["first_fill_us"].append(valid.fill_us[0])
        result["fill_us"].extend(valid.fill_us[1:])
        # A second sequence on the same grammar: what a library caches across matchers shows here.
        result["warm_fill_us"].extend(walk(library, compiled, token_ids, eos_ids, vocab_size).fill_us)
        refused = True
        if case.invalid:
            refused = not walk(
                library, compiled, tokenizer.encode(case.invalid, add_special_tokens=False), eos_ids, vocab_size
            ).accepted
        matcher = library.matcher(compiled)
        bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
        library.fill(matcher, bitmask, 0)
        free_space = bool(set(allowed_ids(bitmask, 0, vocab_size)) & spaces)
        result["cases"][case.name] = (
            (
                "ok"
                if valid.accepted and valid.only_eos_after
                else "VALID REFUSED"
                if not valid.accepted
                else "not only EOS at end"
            )
            + ("" if refused else ", INVALID ACCEPTED")
            + (", whitespace first" if free_space and case.kind != "regex" else "")
        )
    result["errors"] = {}
    for name, schema in [*INVALID_SCHEMAS.items(), ("bad regex", None)]:
        try:
            if schema is None:
                library.matcher(library.compile("regex", INVALID_REGEX))
            else:
                library.matcher(library.compile("json_schema", schema))
            result["errors"][name] = "ACCEPTED"
        except Exception as error:  # noqa: BLE001 - the message is the result
            result["errors"][name] = first_line(error)
    return result


def first_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return re.sub(r"^\[[\d:]+\] \S+: ", "", text)[:110]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the mask fills are single-threaded)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import bentoml
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bentoml.models.get(MODEL_ID).path)
    vocab_size, eos_ids = len(tokenizer), [tokenizer.eos_token_id]
    print(f"CPU: {cpu_description(read_cpuinfo())[0]}; tokenizer {MODEL_ID}, vocabulary {vocab_size}, eos {eos_ids}")
    found = [(library, version) for library in LIBRARIES if (version := installed(library))]
    if not found:
        raise SystemExit("none of xgrammar, llguidance, outlines-core is installed")

    results = {}
    for library, version in found:
        print(f"measuring {library.name} {version} ...", flush=True)
        results[library.name] = measure(library, tokenizer, vocab_size, eos_ids)

    names = [library.name for library, _ in found]
    print("\n| | " + " | ".join(f"{name} {version}" for name, (_, version) in zip(names, found)) + " |")
    print("|---" * (len(names) + 1) + "|")

    def row(label: str, cell) -> None:
        print(f"| {label} | " + " | ".join(cell(results[name]) for name in names) + " |")

    row("tokenizer setup (s)", lambda r: f"{r['setup_s']:.2f}")
    row("compile, median (ms)", lambda r: f"{statistics.median(r['compile_ms'].values()):.1f}")
    row(
        "compile, max (ms)",
        lambda r: f"{max(r['compile_ms'].values()):.1f} ({max(r['compile_ms'], key=r['compile_ms'].get)})",
    )
    row("compile, all cases (ms)", lambda r: f"{sum(r['compile_ms'].values()):.0f}")
    row("fresh matcher, median (us)", lambda r: f"{statistics.median(r['start_us']):.0f}")
    row(
        "first mask fill, median / max (us)",
        lambda r: f"{statistics.median(r['first_fill_us']):.0f} / {max(r['first_fill_us']):.0f}",
    )
    for key, label in (("fill_us", "later mask fills"), ("warm_fill_us", "all fills, 2nd sequence")):
        row(f"{label}, median (us)", lambda r, key=key: f"{statistics.median(r[key]):.0f}")
        row(f"{label}, p99 (us)", lambda r, key=key: f"{percentile(r[key], 0.99):.0f}")
        row(f"{label}, max (us)", lambda r, key=key: f"{max(r[key]):.0f}")
    row("later mask fills timed", lambda r: str(len(r["fill_us"])))
    for case in CASES:
        row(f"{case.kind}: {case.name}", lambda r, case=case: r["cases"][case.name])
    for name in [*INVALID_SCHEMAS, "bad regex"]:
        row(f"error: {name}", lambda r, name=name: r["errors"][name].replace("|", "/"))


if __name__ == "__main__":
    main()
