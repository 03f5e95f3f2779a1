"""The tool-call and reasoning parsers on known text: whole, streamed piece by piece (the pieces must add up to
the whole), cut off, malformed; their grammars compiled by the outlines backend (llguidance) and checked to
accept exactly well-formed calls; the JSON-prefix scanner they share."""

from __future__ import annotations

import json

import jsonschema
import pytest

from patchbay.jsonprefix import Incomplete, Invalid, scan_call_object, value_end
from patchbay.tools import FunctionTool, ParsedCall, ToolParse, calls_schema
from patchbay_plugins.endpoints.toolstream import TurnReader
from patchbay_plugins.reasoning.think import Qwen3ReasoningParser, ThinkReasoningParser
from patchbay_plugins.tools.hermes import HermesToolParser
from patchbay_plugins.tools.jsonform import CallList, NamedArguments
from patchbay_plugins.tools.llama3_json import Llama3JsonToolParser
from patchbay_plugins.tools.mistral import MistralToolParser
from patchbay_plugins.tools.pythonic import PythonicToolParser

WEATHER = FunctionTool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                       "required": ["city"], "additionalProperties": False})
ADD = FunctionTool("add", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"$ref": "#/$defs/B"}},
                           "required": ["a", "b"], "$defs": {"B": {"type": "integer", "minimum": 0}}})

#: (parser, text, content, [(name, arguments)])
CASES = [
    (HermesToolParser(), 'Let me see.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
     '\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
     "Let me see.", [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1, "b": 2}')]),
    (HermesToolParser(), "No calls here, <tool> is not a tag.", "No calls here, <tool> is not a tag.", []),
    (HermesToolParser(), '<tool_call>{"arguments": {"x": [1, {"y": "}"}]}, "name": "f"}</tool_call>', "",
     [("f", '{"x": [1, {"y": "}"}]}')]),
    (Llama3JsonToolParser(), '{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
     '{"name": "add", "parameters": {"a": -1.5e3, "b": 0}}', "",
     [("get_weather", '{"city": "Oslo"}'), ("add", '{"a": -1.5e3, "b": 0}')]),
    (Llama3JsonToolParser(), '<|python_tag|>{"name": "f", "parameters": {}}', "", [("f", "{}")]),
    (Llama3JsonToolParser(), "The answer is {not a call}.", "The answer is {not a call}.", []),
    (MistralToolParser(), 'Sure[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}, '
     '{"name": "add", "arguments": {"a": 2, "b": 3}}]', "Sure",
     [("get_weather", '{"city": "Rome"}'), ("add", '{"a": 2, "b": 3}')]),
    (MistralToolParser(), '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]add{"a": 2, "b": 3}', "",
     [("get_weather", '{"city": "Rome"}'), ("add", '{"a": 2, "b": 3}')]),
    (PythonicToolParser(), '[get_weather(city="Paris"), add(a=1, b=[2, "x)"])]', "",
     [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1, "b": [2, "x)"]}')]),
    (PythonicToolParser(), "<|python_start|>[f(flag=True, n=None)]<|python_end|>", "", [("f", '{"flag": true, "n": null}')]),
    (PythonicToolParser(), "Plain [text] answer.", "Plain [text] answer.", []),
    (NamedArguments("add"), ' {"a": 1, "b": 2}', "", [("add", '{"a": 1, "b": 2}')]),
    (CallList(), '[{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "f", "parameters": {}}]', "",
     [("add", '{"a": 1, "b": 2}'), ("f", "{}")]),
]


def pairs(parse: ToolParse) -> list[tuple[str | None, str]]:
    return [(c.name, c.arguments) for c in parse.calls]


@pytest.mark.parametrize("parser,text,content,calls", CASES, ids=lambda v: type(v).__name__ if not isinstance(v, (str, list)) else None)
def test_whole_output(parser, text, content, calls):
    got = parser.parse(text, True)
    assert got.content == content and pairs(got) == calls
    assert all(c.complete for c in got.calls)


@pytest.mark.parametrize("parser,text,content,calls", CASES, ids=lambda v: type(v).__name__ if not isinstance(v, (str, list)) else None)
def test_streamed_pieces_add_up_to_the_whole(parser, text, content, calls):
    """Fed one character at a time, the pieces add up to the whole output's turn, no markup ever leaks into
    the content, and a call opens once with its whole name."""
    plan = type("Plan", (), {"reader": parser, "max_calls": None})()
    reader = TurnReader(None, plan)
    seen = {"content": "", "opened": [], "args": {}}

    def take(pieces):
        for piece in pieces:
            if piece.kind == "content":
                seen["content"] += piece.text
            elif piece.kind == "call":
                seen["opened"].append(piece.name)
                seen["args"][piece.index] = ""
            elif piece.kind == "arguments":
                seen["args"][piece.index] += piece.text

    for ch in text:
        take(reader.feed(ch))
        for marker in ("<tool_call", "[TOOL_CALLS", "<|python", "{\"name"):
            assert marker not in seen["content"] or marker in content
    take(reader.finish())
    shown, opened, args = seen["content"], seen["opened"], seen["args"]
    turn = reader.turn
    assert shown == content
    assert [(c.name, c.arguments) for c in turn.calls] == calls
    assert opened == [name for name, _ in calls] and [args[i] for i in range(len(calls))] == [a for _, a in calls]
    assert len({c.id for c in turn.calls}) == len(calls) and all(c.id.startswith("call_") for c in turn.calls)


@pytest.mark.parametrize("parser,text", [
    (HermesToolParser(), 'Hi<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),
    (Llama3JsonToolParser(), '{"name": "get_weather", "parameters": {"city": "Par'),
    (MistralToolParser(), 'Hi[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Par'),
    (PythonicToolParser(), '[get_weather(city="Par'),
])
def test_a_call_cut_off_is_dropped_and_the_content_stays_clean(parser, text):
    got = parser.parse(text, True)
    assert got.calls == () and "call" not in got.content.lower() and "{" not in got.content


def test_a_malformed_block_is_content_as_without_a_parser():
    text = "Sure.<tool_call>\n{not json}\n</tool_call>"
    assert HermesToolParser().parse(text, True) == ToolParse(text)
    good = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert pairs(HermesToolParser().parse(good + "<tool_call>\n[1]\n</tool_call>", True)) == [("f", "{}")]
    assert PythonicToolParser().parse("[f(*args)]", True) == ToolParse("[f(*args)]")
    assert PythonicToolParser().parse("[f(x={1, 2})]", True).calls == ()  # a set is not JSON


def test_a_half_written_marker_is_held_back_until_it_is_not_one():
    p = HermesToolParser()
    assert p.parse("Hello <tool_ca", False).content == "Hello "
    assert p.parse("Hello <tool_cab", False).content == "Hello <tool_cab"
    assert p.parse("Hello <tool_ca", True).content == "Hello <tool_ca"
    assert MistralToolParser().parse("x [TOOL", False).content == "x "
    assert Llama3JsonToolParser().parse("<|pyt", False).content == ""


def test_max_calls_and_whitespace_before_a_call():
    plan = type("Plan", (), {"reader": HermesToolParser(), "max_calls": 1})()
    reader = TurnReader(None, plan)
    text = 'Ok  \n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call><tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>'
    pieces = reader.feed(text) + reader.finish()
    assert [p.name for p in pieces if p.kind == "call"] == ["a"]
    assert reader.turn.content == "Ok" and [c.name for c in reader.turn.calls] == ["a"]


# --------------------------------------------------------------------------- reasoning


@pytest.mark.parametrize("parser,text,reasoning,content", [
    (ThinkReasoningParser(), "<think>Two and two.</think>\n\nFour.", "Two and two.", "Four."),
    (ThinkReasoningParser(), "Prompt opened it.</think>Four.", "Prompt opened it.", "Four."),
    (ThinkReasoningParser(), "Cut off while thinking", "Cut off while thinking", None),
    (Qwen3ReasoningParser(), "<think>Two and two.</think>Four.", "Two and two.", "Four."),
    (Qwen3ReasoningParser(), "Not thinking</think> at all.", None, "Not thinking</think> at all."),
    (Qwen3ReasoningParser(), "<think>Cut off", "Cut off", None),
])
def test_reasoning_split_whole_and_streamed(parser, text, reasoning, content):
    reader = TurnReader(parser, None)
    got = {"reasoning": "", "content": ""}
    for ch in text:
        for piece in reader.feed(ch):
            got[piece.kind] += piece.text
    for piece in reader.finish():
        got[piece.kind] += piece.text
    assert reader.turn.reasoning == reasoning and reader.turn.content == content
    assert got == {"reasoning": reasoning or "", "content": content or ""}
    assert "<think" not in got["reasoning"] and "</think" not in got["reasoning"]


def test_reasoning_then_tool_calls():
    plan = type("Plan", (), {"reader": HermesToolParser(), "max_calls": None})()
    reader = TurnReader(ThinkReasoningParser(), plan)
    text = '<think>I need the weather.</think>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    for ch in text:
        reader.feed(ch)
    reader.finish()
    turn = reader.turn
    assert turn.reasoning == "I need the weather." and turn.content is None
    assert [(c.name, c.arguments) for c in turn.calls] == [("get_weather", '{"city": "Oslo"}')]


# --------------------------------------------------------------------------- grammars


@pytest.fixture(scope="module")
def compile_grammar(tiny_tool_model):
    """``compile(lark) -> accepts(text)``, through the outlines backend (llguidance) on the tiny tool model's
    tokenizer, whose markup tokens are single ordinary tokens."""
    from transformers import AutoTokenizer

    from patchbay.decoding import ConstraintSpec
    from patchbay.tokenizer_info import build_tokenizer_info
    from patchbay_plugins.decoding.outlines_backend import OutlinesBackend

    tok = AutoTokenizer.from_pretrained(tiny_tool_model)
    info = build_tokenizer_info(tok, len(tok), [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
    backend = OutlinesBackend()

    def compile_(grammar: str):
        compiled = backend.compile(ConstraintSpec(kind="grammar", value=grammar), info)

        def accepts(text: str) -> bool:
            m = compiled.matcher()
            ok = all(m.advance(t) for t in tok.encode(text, add_special_tokens=False))
            return ok and m.advance(info.eos_token_ids[0])

        return accepts

    return compile_


HERMES_CALL = '<tool_call>\n{{"name": "{}", "arguments": {}}}\n</tool_call>'


@pytest.mark.parametrize("allow_text,max_calls", [(False, None), (False, 1), (True, None), (True, 2)])
def test_hermes_grammar(compile_grammar, allow_text, max_calls):
    accepts = compile_grammar(HermesToolParser().grammar([WEATHER, ADD], allow_text=allow_text, max_calls=max_calls))
    one = HERMES_CALL.format("get_weather", '{"city": "Paris"}')
    two = one + "\n" + HERMES_CALL.format("add", '{"a": 1, "b": 2}')
    assert accepts(one)
    assert accepts(two) == (max_calls != 1)
    assert accepts("Let me check. " + one) == allow_text
    assert accepts("Just text, no call.") == allow_text
    assert not accepts(HERMES_CALL.format("get_time", '{"city": "Paris"}'))  # not a tool
    assert not accepts(HERMES_CALL.format("add", '{"a": 1, "b": -2}'))  # b's $ref: minimum 0
    assert not accepts(HERMES_CALL.format("get_weather", '{"city": "Paris", "x": 1}'))  # additionalProperties
    assert not accepts("Text <tool_call>\nnot json\n</tool_call>")  # once opened, a call is held to the tools
    assert not accepts(one + " and more text")


def test_llama3_json_and_mistral_grammars(compile_grammar):
    accepts = compile_grammar(Llama3JsonToolParser().grammar([WEATHER], allow_text=True, max_calls=None))
    assert accepts('{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                   '{"name": "get_weather", "parameters": {"city": "Rome"}}')
    assert accepts("Plain text.") and not accepts('{"name": "get_weather", "parameters": {}}')
    accepts = compile_grammar(MistralToolParser().grammar([ADD], allow_text=False, max_calls=1))
    assert accepts('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]')
    assert not accepts('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, '
                       '{"name": "add", "arguments": {"a": 1, "b": 2}}]')
    assert PythonicToolParser().grammar([ADD], allow_text=False, max_calls=None) is None


def test_reasoning_first_grammar(tiny_tool_model, compile_grammar):
    """With a reasoning parser, a constraint holds the answer after </think> only."""
    from patchbay.decoding import ConstraintSpec
    from patchbay_plugins.endpoints.tooling import after_reasoning

    model = type("Model", (), {"reasoning_parser": ThinkReasoningParser()})()
    spec = ConstraintSpec(kind="json", value={"type": "object", "properties": {"n": {"type": "integer"}},
                                              "required": ["n"], "additionalProperties": False})
    accepts = compile_grammar(after_reasoning(model, spec).value)
    assert accepts('<think>Free text, even {"n": "x"}.</think>\n{"n": 4}')
    assert accepts('Thoughts without the opening tag.</think>{"n": 4}')
    assert not accepts('<think>ok</think>{"n": "four"}')
    grammar = after_reasoning(model, ConstraintSpec(kind="grammar", value=HermesToolParser().grammar(
        [WEATHER], allow_text=False, max_calls=1))).value
    call = HERMES_CALL.format("get_weather", '{"city": "Oslo"}')
    assert compile_grammar(grammar)("<think>Weather!</think>\n" + call)
    assert not compile_grammar(grammar)(call)  # deepseek_r1: the section is always there
    qwen3 = type("Model", (), {"reasoning_parser": Qwen3ReasoningParser()})()
    accepts = compile_grammar(after_reasoning(qwen3, ConstraintSpec(kind="grammar", value=HermesToolParser().grammar(
        [WEATHER], allow_text=False, max_calls=1))).value)
    assert accepts("<think>Weather!</think>\n" + call) and accepts(call)  # qwen3: only when opened


def test_calls_schema_keeps_each_tools_references():
    schema = calls_schema([WEATHER, ADD])
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = {"name": "add", "arguments": {"a": 1, "b": 2}}
    jsonschema.validate(ok, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": -2}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {"a": 1, "b": 2}}, schema)
    recursive = FunctionTool("tree", {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}})
    schema = calls_schema([recursive])
    jsonschema.validate({"name": "tree", "arguments": {"kids": [{"kids": []}]}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "tree", "arguments": {"kids": [{"kids": [3]}]}}, schema)


# --------------------------------------------------------------------------- the JSON-prefix scanner


@pytest.mark.parametrize("text", ['{"a": [1, 2.5e-3, true, null, "x\\u00e9\\n"]}', "[]", '"s"', "-0", "123", "false"])
def test_value_end_on_complete_json(text):
    assert value_end(text, 0, final=True) == len(text)
    json.loads(text)
    for cut in range(1, len(text)):
        try:
            value_end(text[:cut], 0)
        except Incomplete:
            pass  # every proper prefix is incomplete, never invalid (a prefix may also end a shorter value)


@pytest.mark.parametrize("text", ['{"a" 1}', "[1,]", "{'a': 1}", "NaN", '"\x01"', '{"a": 1,}', "tru e", "1.e5", "[01]", "-"])
def test_value_end_refuses_what_is_not_json(text):
    with pytest.raises(Invalid):
        value_end(text, 0, final=True)


def test_scan_call_object_reads_name_and_raw_arguments():
    text = '{"name": "f", "arguments": {"a": [1, 2], "s": "}"}, "x": 1}'
    obj = scan_call_object(text, 0, final=True)
    assert (obj.name, obj.arguments, obj.arguments_done, obj.end) == ("f", '{"a": [1, 2], "s": "}"}', True, len(text))
    part = scan_call_object(text[:31], 0)
    assert part.name == "f" and part.arguments == '{"a"' and part.end is None
    with pytest.raises(Invalid):
        scan_call_object('{"name": 3}', 0, final=True)
    with pytest.raises(Invalid):
        scan_call_object('{"name": "f", "arguments": [1]}', 0, final=True)
    assert ParsedCall("f").arguments == ""
