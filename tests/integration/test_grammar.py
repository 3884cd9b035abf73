"""Structured output on the bundled model's real tokenizer: valid documents walk through their
grammar token by token, greedy decoding under the mask yields text that matches, bad grammars are
refused naming the request field, and the bitmask masks what it must (EOS at the end, tokens past
the tokenizer, whitespace in JSON)."""

from __future__ import annotations

import json
import re

import bentoml
import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from domain import GuidedDecoding, InvalidRequestError
from engine.core.grammar import GrammarCompiler, allocate_bitmask, apply_bitmask

from .support import BUNDLED_MODEL_ID

EOS = 2  # <|im_end|>
SCHEMA_FIELD = "response_format.json_schema.schema"


def obj(properties: dict, required: list[str] | None = None) -> dict:
    required = list(properties) if required is None else required
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def name(maximum: int = 12) -> dict:
    return {"type": "string", "maxLength": maximum}


def bounded(low: int, high: int) -> dict:
    return {"type": "integer", "minimum": low, "maximum": high}


# Every string and number is bounded, so that greedy decoding on random logits must end.
BOUNDED_SCHEMAS = {
    "person": obj({"name": name(20), "age": bounded(0, 150)}),
    "enum": obj({"color": {"enum": ["red", "green", "blue"]}}),
    "maxItems": obj({"tags": {"type": "array", "items": name(6), "maxItems": 3}}),
    "minItems": obj({"scores": {"type": "array", "items": bounded(0, 100), "minItems": 2, "maxItems": 4}}),
    "nested": obj({"address": obj({"city": name(), "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
    "minLength": obj({"code": {"type": "string", "minLength": 3, "maxLength": 5}}),
    "pattern": obj({"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}}),
    "booleans": obj({"active": {"type": "boolean"}, "admin": {"type": "boolean"}}),
    "anyOf": obj({"value": {"anyOf": [bounded(0, 9), name(4)]}}),
    "optional": obj({"id": bounded(1, 99), "note": name(8)}, required=["id"]),
    "const": obj({"version": {"const": 2}, "kind": {"const": "point"}}),
    "nullable": obj({"middle": {"anyOf": [name(8), {"type": "null"}]}}),
    "array of objects": obj(
        {"lines": {"type": "array", "items": obj({"sku": name(5), "qty": bounded(1, 9)}), "maxItems": 2}}
    ),
    "deep": obj({"a": obj({"b": obj({"c": obj({"d": {"type": "boolean"}})})})}),
    "$ref": {
        **obj({"start": {"$ref": "#/$defs/point"}}),
        "$defs": {"point": obj({"x": bounded(-9, 9), "y": bounded(-9, 9)})},
    },
    "tool call": obj(
        {
            "name": {"enum": ["get_weather", "get_time"]},
            "arguments": obj({"city": name(), "unit": {"enum": ["c", "f"]}}),
        }
    ),
    "anyOf objects": obj(
        {
            "shape": {
                "anyOf": [
                    obj({"kind": {"const": "circle"}, "r": bounded(1, 9)}),
                    obj({"kind": {"const": "square"}, "side": bounded(1, 9)}),
                ]
            }
        }
    ),
}
UNBOUNDED_SCHEMAS = {
    "number": obj({"price": {"type": "number", "minimum": 0}}),
    "string": obj({"text": {"type": "string"}}),
    "format date": obj({"when": {"type": "string", "format": "date"}}),
}
VALID_DOCUMENTS = {
    "person": {"name": "Ada Lovelace", "age": 36},
    "enum": {"color": "green"},
    "maxItems": {"tags": ["a", "bb", "ccc"]},
    "minItems": {"scores": [3, 100]},
    "nested": {"address": {"city": "Springfield", "zip": "12345"}},
    "minLength": {"code": "abcde"},
    "pattern": {"phone": "555-1234"},
    "booleans": {"active": True, "admin": False},
    "anyOf": {"value": "abc"},
    "optional": {"id": 5},
    "const": {"version": 2, "kind": "point"},
    "nullable": {"middle": None},
    "array of objects": {"lines": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}]},
    "deep": {"a": {"b": {"c": {"d": True}}}},
    "$ref": {"start": {"x": 0, "y": -9}},
    "tool call": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}},
    "anyOf objects": {"shape": {"kind": "square", "side": 2}},
    "number": {"price": 12.5},
    "string": {"text": 'Hello, "world"!\nBye \u00e9\u20ac'},
    "format date": {"when": "2024-02-29"},
}
SCHEMAS = {**BOUNDED_SCHEMAS, **UNBOUNDED_SCHEMAS}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(bentoml.models.get(BUNDLED_MODEL_ID).path)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer), {EOS})


def schema(name: str) -> GuidedDecoding:
    return GuidedDecoding("json_schema", json.dumps(SCHEMAS[name]), SCHEMA_FIELD)


def allowed_ids(bitmask: torch.Tensor, row: int = 0) -> set[int]:
    bits = (bitmask[row].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.flatten().nonzero().flatten().tolist())


def compact(document: object) -> str:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def greedy(compiler: GrammarCompiler, tokenizer, guided: GuidedDecoding, seed: int, max_steps: int = 200) -> str:
    """Greedy decoding on random logits under the grammar's mask, until end of sequence."""
    matcher = compiler.compile(guided).matcher()
    generator = torch.Generator().manual_seed(seed)
    bitmask = allocate_bitmask(1, len(tokenizer))
    chosen = []
    for _ in range(max_steps):
        logits = torch.randn(1, len(tokenizer), generator=generator)
        matcher.fill_mask(bitmask, 0)
        apply_bitmask(logits, bitmask)
        token = int(logits.argmax())
        matcher.accept(token)
        if token == EOS:
            assert matcher.finished
            return tokenizer.decode(chosen)
        chosen.append(token)
    raise AssertionError(f"no end of sequence in {max_steps} steps: {tokenizer.decode(chosen)!r}")


@pytest.mark.parametrize("name", list(VALID_DOCUMENTS))
def test_a_valid_document_walks_through_its_schema_then_only_eos_is_allowed(compiler, tokenizer, name):
    document = compact(VALID_DOCUMENTS[name])
    jsonschema.validate(VALID_DOCUMENTS[name], SCHEMAS[name])
    matcher = compiler.compile(schema(name)).matcher()
    bitmask = allocate_bitmask(3, len(tokenizer))
    for token in tokenizer.encode(document, add_special_tokens=False):
        assert not matcher.finished
        matcher.fill_mask(bitmask, 1)
        assert token in allowed_ids(bitmask, 1), f"{tokenizer.decode([token])!r} refused in {document}"
        matcher.accept(token)
    assert matcher.finished
    matcher.fill_mask(bitmask, 1)
    assert allowed_ids(bitmask, 1) == {EOS}
    matcher.accept(EOS)


def test_a_token_that_breaks_the_schema_is_masked_out_and_refused(compiler, tokenizer):
    matcher = compiler.compile(schema("enum")).matcher()
    for token in tokenizer.encode('{"color":"', add_special_tokens=False):
        matcher.accept(token)
    bitmask = allocate_bitmask(1, len(tokenizer))
    matcher.fill_mask(bitmask, 0)
    pink, green = (tokenizer.encode(color, add_special_tokens=False)[0] for color in ("pink", "green"))
    assert green in allowed_ids(bitmask) and pink not in allowed_ids(bitmask)
    with pytest.raises(ValueError, match="doesn.t satisfy the grammar"):
        matcher.accept(pink)


def test_end_of_sequence_is_masked_until_the_grammar_is_complete(compiler, tokenizer):
    matcher = compiler.compile(schema("person")).matcher()
    bitmask = allocate_bitmask(1, len(tokenizer))
    for token in tokenizer.encode('{"name":"Ada","age":3', add_special_tokens=False):
        matcher.fill_mask(bitmask, 0)
        assert EOS not in allowed_ids(bitmask)
        matcher.accept(token)
    with pytest.raises(ValueError):
        matcher.accept(EOS)


@pytest.mark.parametrize("name", list(BOUNDED_SCHEMAS))
def test_greedy_decoding_under_the_mask_gives_json_that_matches_the_schema(compiler, tokenizer, name):
    for seed in range(3):
        text = greedy(compiler, tokenizer, schema(name), seed)
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_json_object_gives_a_json_object(compiler, tokenizer):
    guided = GuidedDecoding("json_object", "", "response_format")
    matcher = compiler.compile(guided).matcher()
    for token in tokenizer.encode(compact({"any": [1, {"x": None}], "b": "c"}), add_special_tokens=False):
        matcher.accept(token)
    assert matcher.finished
    with pytest.raises(ValueError):
        compiler.compile(guided).matcher().accept(tokenizer.encode("[", add_special_tokens=False)[0])


def test_json_allows_no_whitespace_between_tokens_even_when_the_schema_asks_for_it(compiler, tokenizer):
    spaces = {token_id for token, token_id in tokenizer.get_vocab().items() if token and not token.strip("ĠĊĉč")}
    loose = {**SCHEMAS["person"], "x-guidance": {"whitespace_flexible": True}}
    for guided in (
        GuidedDecoding("json_schema", json.dumps(loose), SCHEMA_FIELD),
        GuidedDecoding("json_object", "", "response_format"),
    ):
        matcher = compiler.compile(guided).matcher()
        bitmask = allocate_bitmask(1, len(tokenizer))
        for prefix in ("", "{", '{"name"', '{"name":'):
            if prefix:
                matcher = compiler.compile(guided).matcher()
                for token in tokenizer.encode(prefix, add_special_tokens=False):
                    matcher.accept(token)
            matcher.fill_mask(bitmask, 0)
            assert not allowed_ids(bitmask) & spaces, f"whitespace allowed after {prefix!r}"


def test_a_regex_constrains_the_output(compiler, tokenizer):
    pattern = r"(yes|no), [0-9]{1,3} (apples|pears)\."
    for seed in range(5):
        assert re.fullmatch(
            pattern, greedy(compiler, tokenizer, GuidedDecoding("regex", pattern, "guided_regex"), seed)
        )


def test_a_choice_list_gives_exactly_one_of_the_choices(compiler, tokenizer):
    options = ["positive", "negative", "neutral", "neutral-ish", "a (b) [c]? *d*"]
    guided = GuidedDecoding("choice", json.dumps(options), "guided_choice")
    assert {greedy(compiler, tokenizer, guided, seed) for seed in range(8)} <= set(options)
    matcher = compiler.compile(guided).matcher()
    for token in tokenizer.encode("a (b) [c]? *d*", add_special_tokens=False):
        matcher.accept(token)
    assert matcher.finished


@pytest.mark.parametrize(
    ("guided", "expected"),
    [
        (GuidedDecoding("json_schema", '{"type": "strin"}', SCHEMA_FIELD), "strin"),
        (GuidedDecoding("json_schema", '{"type": "object",', SCHEMA_FIELD), "must be JSON"),
        (GuidedDecoding("json_schema", "[1, 2]", SCHEMA_FIELD), "must be a JSON object"),
        (
            GuidedDecoding("json_schema", '{"type": "string", "minLength": 5, "maxLength": 2}', SCHEMA_FIELD),
            "minLength",
        ),
        (GuidedDecoding("json_schema", '{"$ref": "#/$defs/nope"}', SCHEMA_FIELD), "nope"),
        (GuidedDecoding("json_schema", '{"type": "string", "pattern": "([a-z"}', SCHEMA_FIELD), "unclosed"),
        (GuidedDecoding("json_schema", '{"type": "array", "uniqueItems": true}', SCHEMA_FIELD), "uniqueItems"),
        (GuidedDecoding("json_schema", '{"maximum": 18446744073709551616}', SCHEMA_FIELD), "not JSON serializable"),
        (GuidedDecoding("regex", "a(b", "guided_regex"), "unclosed group"),
        (GuidedDecoding("choice", '["a", 1]', "guided_choice"), "list of strings"),
        (GuidedDecoding("choice", "[]", "guided_choice"), "list of strings"),
    ],
)
def test_an_invalid_grammar_is_refused_naming_the_field(compiler, guided, expected):
    with pytest.raises(InvalidRequestError) as refused:
        compiler.compile(guided)
    assert refused.value.message.startswith(f"{guided.field}: ")
    assert expected in refused.value.message and "got " in refused.value.message


def test_the_cache_returns_the_compiled_grammar_for_the_same_request(tokenizer):
    compiler = GrammarCompiler(tokenizer, len(tokenizer), {EOS}, cache_size=2)
    first = compiler.compile(schema("enum"))
    assert compiler.compile(GuidedDecoding("json_schema", schema("enum").value, "another.field")) is first
    assert compiler.compile(schema("person")) is not first
    compiler.compile(schema("booleans"))  # evicts the least recently used: enum
    assert compiler.compile(schema("enum")) is not first


def test_tokens_past_the_tokenizer_are_never_allowed(tokenizer):
    vocab_size = len(tokenizer) + 77  # a model whose logits are padded past its tokenizer
    compiler = GrammarCompiler(tokenizer, vocab_size, {EOS})
    matcher = compiler.compile(schema("string")).matcher()
    for token in tokenizer.encode('{"text":"', add_special_tokens=False):
        matcher.accept(token)
    bitmask = allocate_bitmask(1, vocab_size)
    matcher.fill_mask(bitmask, 0)
    allowed = allowed_ids(bitmask)
    assert len(allowed) > len(tokenizer) // 2  # inside a free string
    assert max(allowed) < len(tokenizer)
    logits = torch.zeros(1, vocab_size)
    apply_bitmask(logits, bitmask)
    assert torch.isinf(logits[0, len(tokenizer) :]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_bitmask_masks_the_mapped_rows_in_place(dtype):
    vocab_size = 100
    bitmask = allocate_bitmask(2, vocab_size)
    bitmask[0, 0] = 0b101  # tokens 0 and 2
    bitmask[1, 3] = 1  # token 96
    logits = torch.randn(3, vocab_size).to(dtype)
    before = logits.clone()
    apply_bitmask(logits, bitmask, rows=[2, 0])
    assert torch.equal(logits[1], before[1])
    for row, allowed in ((2, {0, 2}), (0, {96})):
        finite = set(torch.isfinite(logits[row]).nonzero().flatten().tolist())
        assert finite == allowed
        assert torch.equal(logits[row, sorted(allowed)], before[row, sorted(allowed)])
        assert (logits[row][~torch.isfinite(logits[row])] == float("-inf")).all()
