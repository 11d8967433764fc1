"""Data loading: formats, row checks that name file and line, mixtures, pairs -> unpaired."""
from __future__ import annotations

import pytest

from alignment.data import (DataError, DataReport, build, check, check_truncation, completion_span, completion_spans, load, mixture,
                            split_prompt)
from alignment.recipe import DataRef, DatasetConfig
from tests.helpers import write_jsonl

MSG = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def cfg(path, **kw):
    return DatasetConfig(path=str(path), **kw)


def test_missing_column_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 3 + [{"prompt": "c"}])
    with pytest.raises(DataError, match=rf"{p}:4: column 'completion' is missing"):
        check(load("d", cfg(p)), ("prompt_completion",))


def test_blank_lines_do_not_shift_line_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"messages": %s}\n\n{"messages": []}\n' % __import__("json").dumps(MSG))
    with pytest.raises(DataError, match=rf"{p}:3: column 'messages' should be a non-empty list"):
        check(load("d", cfg(p)), ("messages",))


def test_bad_json_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=rf"{p}:2: not valid JSON \(Expecting value at column 10\)"):
        load("d", cfg(p))


def test_a_row_cut_short_is_placed_at_its_own_end(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "cut", \n{"text": "ok"}\n')
    with pytest.raises(DataError, match=rf"{p}:2: not valid JSON \(.* at column 17\)"):
        load("d", cfg(p))


def test_wrong_format_says_what_was_expected(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"expected messages or prompt/completion.*columns: \{old: new\}"):
        check(load("d", cfg(p)), ("messages", "prompt_completion"))


def test_rename_columns_and_max_rows(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"q": f"{i}", "a": "x"} for i in range(10)])
    loaded = load("d", cfg(p, columns={"q": "prompt", "a": "completion"}, max_rows=4))
    assert check(loaded, ("prompt_completion",)) == "prompt_completion"
    assert [r["prompt"] for r in loaded.rows] == ["0", "1", "2", "3"]


def test_csv_line_numbers_count_the_header(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,other\nhello,1\n,2\n")
    with pytest.raises(DataError, match=rf"{p}:3: column 'text'"):
        check(load("d", cfg(p)), ("text",))


def test_parquet_roundtrip(tmp_path):
    import datasets

    p = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).to_parquet(str(p))
    assert check(load("d", cfg(p)), ("text",)) == "text"


def test_kto_label_must_be_bool(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c", "label": "yes"}])
    with pytest.raises(DataError, match=r":1: column 'label' should be true or false"):
        check(load("d", cfg(p)), ("unpaired",))


def test_implicit_prompt_is_the_shared_prefix():
    row = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    prompt, chosen, rejected = split_prompt(row)
    assert prompt == [{"role": "user", "content": "q"}]
    assert chosen == [{"role": "assistant", "content": "a"}] and rejected[0]["content"] == "b"
    assert split_prompt({"chosen": "Q: 1+1 A: 2", "rejected": "Q: 1+1 A: 3"}) == ("Q: 1+1 A: ", "2", "3")


def test_pairs_to_unpaired(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "good", "rejected": "bad", "id": 7}])
    loaded = load("d", cfg(p, unpaired=True))
    assert loaded.rows == [{"id": 7, "prompt": "p", "completion": "good", "label": True},
                           {"id": 7, "prompt": "p", "completion": "bad", "label": False}]
    assert check(loaded, ("unpaired",)) == "unpaired"


def test_mixture_weights_set_the_shares():
    a = [{"src": "a", "i": i} for i in range(100)]
    b = [{"src": "b", "i": i} for i in range(20)]
    mixed = mixture([(a, 0.5), (b, 0.5)], seed=0)
    assert len(mixed) == 120
    assert sum(r["src"] == "b" for r in mixed) == 60  # b is repeated to reach its share
    assert mixture([(a, 1.0), (b, 1.0)], seed=0) == a + b  # all weights 1: concatenation


def test_build_mixture_keeps_common_columns(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c", "extra": 1}] * 4)
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "d"}] * 4)
    cfgs = {"a": cfg(tmp_path / "a.jsonl"), "b": cfg(tmp_path / "b.jsonl")}
    ds = build(cfgs, [DataRef(name="a", weight=3), DataRef(name="b", weight=1)], ("prompt_completion",))
    assert set(ds.column_names) == {"prompt", "completion"} and len(ds) == 8
    assert sum(r["prompt"] == "p" for r in ds) == 6


def test_mixture_of_different_formats_is_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "t"}])
    write_jsonl(tmp_path / "b.jsonl", [{"messages": MSG}])
    cfgs = {"a": cfg(tmp_path / "a.jsonl"), "b": cfg(tmp_path / "b.jsonl")}
    with pytest.raises(DataError, match="must share one format"):
        build(cfgs, [DataRef(name="a"), DataRef(name="b")], ("text", "messages"))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load("d", cfg(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------- nothing changes without a word (issue 16, kind 2)


def report_of(path, accept, **kw):
    """check(load(path)) with a fresh report; returns (loaded, report)."""
    report = DataReport()
    loaded = load("d", cfg(path), report=report, **kw)
    check(loaded, accept, report=report, **kw)
    return loaded, report


@pytest.mark.parametrize("chosen, rejected, split", [
    ("Q: 5+7?\nAnswer: 12", "Q: 5+7?\nAnswer: 13", ("Q: 5+7?\nAnswer: ", "12", "13")),   # shared leading digit
    ("Q: 6+4?\nAnswer: 10", "Q: 6+4?\nAnswer: 100", ("Q: 6+4?\nAnswer: ", "10", "100")),  # one is a prefix
    ("The sky", "The sky is blue", ("The ", "sky", "sky is blue")),                        # TRL PR #6498
    ("x = foo(1)", "x = foo(2)", ("x = foo(", "1)", "2)")),                                 # punctuation is a boundary
])
def test_implicit_prompt_splits_at_a_word_boundary_with_both_answers_non_empty(chosen, rejected, split):
    # case 04: the common *character* prefix put the answer's first digit into the prompt
    assert split_prompt({"chosen": chosen, "rejected": rejected}) == split


@pytest.mark.parametrize("chosen, rejected, why", [
    ("same text", "same text", "chosen and rejected are the same"),
    ("12", "13", "share no prompt"),
    ("Hello there", "Goodbye", "share no prompt"),
])
def test_unsplittable_implicit_pairs_are_refused_with_file_and_line(tmp_path, chosen, rejected, why):
    p = write_jsonl(tmp_path / "d.jsonl", [{"chosen": "Q: 1\nA: 2", "rejected": "Q: 1\nA: 3"},
                                           {"chosen": chosen, "rejected": rejected}])
    with pytest.raises(DataError, match=rf"{p}:2: .*{why}"):
        check(load("d", cfg(p)), ("preference",))


def test_implicit_split_is_counted_and_built_rows_carry_the_prompt(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"chosen": f"Q: {i}\nA: 1{i}", "rejected": f"Q: {i}\nA: 1{i + 1}"} for i in range(5)])
    report = DataReport()
    ds = build({"d": cfg(tmp_path / "d.jsonl")}, [DataRef(name="d")], ("preference",), report=report)
    assert report.counts == {"d": {"split": 5}} and len(report.examples["d"]["split"]) == 3
    assert ds[0]["prompt"] == "Q: 0\nA: " and (ds[0]["chosen"], ds[0]["rejected"]) == ("10", "11")
    assert "5 row(s) split" in report.lines()[0] and "d.jsonl:1" in report.lines()[0]


def test_kto_from_implicit_pairs_uses_the_word_boundary_split(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"chosen": "A: 10", "rejected": "A: 100"}])
    assert [(r["prompt"], r["completion"]) for r in load("d", cfg(p, unpaired=True)).rows] == [("A: ", "10"), ("A: ", "100")]


def test_csv_text_columns_are_text_and_an_empty_cell_is_refused(tmp_path):
    # case 15: a completion column of numbers was refused as "not a string"
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("prompt,completion\nWhat is 3+4?,7\nWhat is 6+6?,12\nWhat is 1.5+1?,2.50\nSay NA,NA\n")
    loaded, report = report_of(numbers, ("prompt_completion",))
    assert [r["completion"] for r in loaded.rows] == ["7", "12", "2.50", "NA"]  # as written: no 2.5, no null
    assert report.counts == {}  # nothing was retyped: the cells were read as text
    blank = tmp_path / "blank.csv"
    blank.write_text("prompt,completion\nWhat is 3+4?,seven\nWhat is 8+1?,nine\nWhat is 6+6?,\n")
    with pytest.raises(DataError, match=rf"{blank}:4: column 'completion' is empty"):
        check(load("d", cfg(blank)), ("prompt_completion",))


def test_csv_renamed_text_columns_and_typed_other_columns(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('q,a,label,n\n"two\nlines",7,true,1\nq2,8,false,\n')
    loaded = load("d", cfg(p, columns={"q": "prompt", "a": "completion"}))
    assert check(loaded, ("unpaired",)) == "unpaired"
    assert loaded.rows[0] == {"prompt": "two\nlines", "completion": "7", "label": True, "n": 1}
    assert loaded.rows[1]["label"] is False and loaded.rows[1]["n"] is None
    assert [loaded.where(i) for i in range(2)] == [f"{p}:2", f"{p}:4"]  # a quoted cell spans two lines


def test_numbers_in_text_columns_of_typed_files_are_retyped_and_counted(tmp_path):
    import datasets

    p = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"prompt": "3+4", "completion": 7}, {"prompt": "6+6", "completion": 12}]).to_parquet(str(p))
    loaded, report = report_of(p, ("prompt_completion",))
    assert [r["completion"] for r in loaded.rows] == ["7", "12"]
    assert report.counts == {"d": {"retyped": 2}}
    assert report.examples["d"]["retyped"][0] == f"{p}: row 1: completion 7 -> '7'"


def test_json_array_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[{"text": "a"}, {"text": ""}]')
    with pytest.raises(DataError, match=rf"{p}: row 2: column 'text' is empty"):
        check(load("d", cfg(p)), ("text",))


GOOD_CHAT = {"messages": MSG}
DEGENERATE = [  # (format, row, what the error says) -- each is one malformed row of its format
    ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}, "role \"robot\""),
    ("messages", {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "bye"}]},
     "should end with an assistant message"),
    ("messages", {"messages": ["hi", "hello"]}, "message 0 should be a {role, content} object"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     "should have text content"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "ends with an empty assistant message"),
    ("messages", {"messages": None}, "should be a non-empty list"),
    ("prompt_completion", {"prompt": "q", "completion": ""}, "column 'completion' is empty"),
    ("prompt_completion", {"prompt": None, "completion": "a"}, "column 'prompt' is null"),
    ("prompt_completion", {"prompt": "q", "completion": {"text": "a"}}, "should be text or a list"),
    ("prompt_completion", {"prompt": [{"role": "user", "content": "q"}], "completion": "a"}, "mix text and conversations"),
    ("prompt_completion", {"prompt": "q", "completion": [{"role": "user", "content": "a"}]}, "should end with an assistant"),
    ("preference", {"prompt": "q", "chosen": "a", "rejected": None}, "column 'rejected' is null"),
    ("preference", {"prompt": "q", "chosen": "a", "rejected": "a"}, "chosen and rejected are the same"),
    ("preference", {"prompt": "", "chosen": "a", "rejected": "b"}, "column 'prompt' is empty"),
    ("unpaired", {"prompt": "q", "completion": "a", "label": "yes"}, "column 'label' should be true or false"),
    ("text", {"text": "   "}, "column 'text' is empty"),
    ("prompt", {"prompt": []}, "should be a non-empty list"),
]


def good_row(fmt: str) -> dict:
    return {"messages": GOOD_CHAT, "prompt_completion": {"prompt": "q", "completion": "a"},
            "preference": {"prompt": "q", "chosen": "a", "rejected": "b"},
            "unpaired": {"prompt": "q", "completion": "a", "label": True}, "text": {"text": "t"},
            "prompt": {"prompt": "q"}}[fmt]


@pytest.mark.parametrize("fmt, bad, says", DEGENERATE)
def test_degenerate_rows_are_refused_by_default_naming_file_and_line(tmp_path, fmt, bad, says):
    p = write_jsonl(tmp_path / "d.jsonl", [good_row(fmt), good_row(fmt), bad])
    with pytest.raises(DataError) as e:
        check(load("d", cfg(p)), (fmt,))
    assert f"{p}:3: " in str(e.value) and says in str(e.value)
    assert "1 malformed row(s) of 3" in str(e.value) and "on_bad_rows: drop" in str(e.value)


@pytest.mark.parametrize("policy", ["drop", "warn"])
@pytest.mark.parametrize("fmt, bad, says", DEGENERATE)
def test_degenerate_rows_dropped_under_the_policy_are_counted_with_file_and_line(tmp_path, fmt, bad, says, policy):
    p = write_jsonl(tmp_path / "d.jsonl", [good_row(fmt), bad, good_row(fmt)])
    loaded, report = report_of(p, (fmt,), on_bad_rows=policy)
    assert len(loaded.rows) == 2 and loaded.where(1) == f"{p}:3"  # the row after the dropped one keeps its line
    assert report.counts == {"d": {"dropped": 1}}
    assert report.examples["d"]["dropped"][0].startswith(f"{p}:2: ") and says in report.examples["d"]["dropped"][0]


def test_many_malformed_rows_are_counted_and_the_first_few_named(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}] + [{"text": ""}] * 5)
    with pytest.raises(DataError) as e:
        check(load("d", cfg(p)), ("text",))
    msg = str(e.value)
    assert f"{p}:2:" in msg and f"{p}:4:" in msg and f"{p}:5:" not in msg and "2 more" in msg and "5 malformed row(s) of 6" in msg


def test_nothing_left_after_dropping_is_an_error(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": None}])
    with pytest.raises(DataError, match=r"no usable rows \(2 malformed\)"):
        check(load("d", cfg(p)), ("text",), on_bad_rows="drop")


def test_build_prints_the_report_and_drops_under_the_policy(tmp_path, capsys):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": None}])
    ds = build({"d": cfg(p)}, [DataRef(name="d")], ("prompt_completion",), on_bad_rows="drop")
    assert len(ds) == 1
    out = capsys.readouterr().out
    assert "dataset 'd': 1 row(s) dropped" in out and f"{p}:2: column 'completion' is null" in out


def test_report_to_dict_is_json_for_a_manifest(tmp_path):
    import json

    report = DataReport()
    report.add("d", "dropped", "f.jsonl:3", "column 'text' is empty")
    assert json.loads(json.dumps(report.to_dict())) == {
        "d": {"dropped": {"rows": 1, "examples": ["f.jsonl:3: column 'text' is empty"]}}}


# ---------------------------------------------------------------- truncation by max_length (case 06)


@pytest.fixture(scope="module")
def char_tokenizer():
    from alignment.testing import make_tokenizer

    return make_tokenizer()  # one token per character: lengths below are counted by hand


def sft_file(tmp_path, long: int, short: int):
    # prompt "x" * 40 + "?" is 41 tokens, completion " 7" 2 (+ EOS); "What is 4+8?" 12
    rows = [{"prompt": "x" * 40 + "?", "completion": " 7"}] * long + [{"prompt": "What is 4+8?", "completion": " 12"}] * short
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def truncation(tmp_path, tok, max_length, long=6, short=2, **kw):
    p = sft_file(tmp_path, long, short)
    cfgs, refs = {"sft": cfg(p)}, [DataRef(name="sft")]
    report = DataReport()
    ds = build(cfgs, refs, ("prompt_completion",))
    out = check_truncation(ds, tok, max_length, cfgs, refs, ("prompt_completion",), report=report, **kw)
    return p, out, report


def test_rows_whose_answer_max_length_cuts_away_are_counted_and_told(tmp_path, char_tokenizer, capsys):
    p, ds, report = truncation(tmp_path, char_tokenizer, 41)
    assert report.counts == {"sft": {"truncated": 6}} and len(ds) == 8  # warn (default): kept, TRL drops them
    assert report.examples["sft"]["truncated"][0] == f"{p}:1: prompt of 41 tokens >= max_length 41"
    assert "max_length 41: dataset 'sft': 6 row(s) truncated" in capsys.readouterr().out
    _, _, report = truncation(tmp_path, char_tokenizer, 42)  # one answer token left: partly cut
    assert report.counts == {"sft": {"truncated_partly": 6}}
    _, _, report = truncation(tmp_path, char_tokenizer, 44)  # 41 + 2 + EOS fits
    assert report.counts == {}


def test_truncation_policy_drop_and_error(tmp_path, char_tokenizer):
    _, ds, _ = truncation(tmp_path, char_tokenizer, 41, on_bad_rows="drop")
    assert len(ds) == 2 and set(ds["prompt"]) == {"What is 4+8?"}
    with pytest.raises(DataError, match=r"(?s)max_length 42: on_bad_rows: error.*6 row\(s\) truncated_partly"):
        truncation(tmp_path, char_tokenizer, 42, on_bad_rows="error")


def test_every_row_losing_its_answer_is_refused_whatever_the_policy(tmp_path, char_tokenizer):
    for policy in (None, "warn", "drop"):
        with pytest.raises(DataError, match=r"(?s)every row loses its whole completion.*8 row\(s\) truncated.*sft.jsonl:1"):
            truncation(tmp_path, char_tokenizer, 20, long=8, short=0, on_bad_rows=policy)


def test_completion_span_is_format_aware(char_tokenizer):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    # ChatML: "<|im_start|>user\nhi<|im_end|>\n" = 1 + 5 + 2 + 1 + 1 = 10 tokens, then the generation
    # prompt "<|im_start|>assistant\n" 1 + 10: the completion starts at 21
    assert completion_span({"messages": chat}, char_tokenizer) == (21, 21 + 4)  # + "yo<|im_end|>\n", no EOS added
    assert completion_span({"prompt": chat[:1], "completion": chat[1:]}, char_tokenizer) == (21, 25)
    assert completion_span({"prompt": "ab", "chosen": "c", "rejected": "def"}, char_tokenizer) == (2, 6)  # longer + EOS
    assert completion_span({"text": "abcd"}, char_tokenizer) == (0, 5)


def test_completion_spans_of_mixed_rows_in_batches_match_row_by_row(char_tokenizer, monkeypatch):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rows = [{"text": "abcd"}, {"messages": chat}, {"prompt": "ab", "chosen": "c", "rejected": "def"},
            {"prompt": chat[:1], "completion": chat[1:]}, {"messages": chat[1:]}, {"prompt": "What is 4+8?", "completion": " 12"},
            {"messages": chat + [{"role": "user", "content": "and?"}, {"role": "assistant", "content": "no"}]}]
    one_by_one = [completion_span(row, char_tokenizer) for row in rows]
    assert one_by_one[4] == (0, 15) and one_by_one[6][0] > 25  # one turn: no prompt, all 15 tokens; the last of four turns
    monkeypatch.setattr("alignment.data.SPAN_BATCH", 3)  # batches that cut the rows' kinds apart
    assert completion_spans(rows, char_tokenizer) == one_by_one
    monkeypatch.setattr("alignment.data.SPAN_BATCH", 512)
    assert completion_spans(rows, char_tokenizer) == one_by_one



def validate(recipe):
    from typer.testing import CliRunner

    from alignment.cli import app

    return CliRunner().invoke(app, ["validate", str(recipe)])


def test_validate_prints_what_the_policy_drops_and_refuses_by_default(tmp_path, tiny_model_path):
    from tests.helpers import write_recipe

    write_jsonl(tmp_path / "sft.jsonl", [{"messages": MSG}, {"messages": [{"role": "robot", "content": "beep"}]}])
    stages = {"sft": {"method": "sft", "data": ["sft"]}}
    recipe = write_recipe(tmp_path, tiny_model_path, stages, data={"sft": {"path": "sft.jsonl"}}, on_bad_rows="drop")
    res = validate(recipe)
    assert res.exit_code == 0, res.output
    assert f"data: dataset 'sft': 1 row(s) dropped" in res.output and f"sft.jsonl:2: column 'messages' message 0 has role" in res.output
    recipe = write_recipe(tmp_path, tiny_model_path, stages, data={"sft": {"path": "sft.jsonl"}})  # default: error
    res = validate(recipe)
    assert res.exit_code == 2 and "sft.jsonl:2: column 'messages' message 0 has role \"robot\"" in res.output
    recipe = write_recipe(tmp_path, tiny_model_path, stages, data={"sft": {"path": "sft.jsonl"}}, on_bad_rows="skip")
    res = validate(recipe)
    assert res.exit_code == 2 and "on_bad_rows: Input should be 'error', 'drop' or 'warn'" in res.output


def test_dropped_rows_of_a_parquet_file_keep_their_row_numbers(tmp_path):
    import datasets

    p = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"text": "a"}, {"text": ""}, {"text": "c"}]).to_parquet(str(p))
    loaded, report = report_of(p, ("text",), on_bad_rows="drop")
    assert report.examples == {"d": {"dropped": [f"{p}: row 2: column 'text' is empty (\"\")"]}}
    assert [loaded.where(i) for i in range(2)] == [f"{p}: row 1", f"{p}: row 3"]


ROWS = '{"prompt": "What is 1+1?", "completion": "2"}\n'


@pytest.mark.parametrize("name, content, line", [
    ("d.jsonl", (ROWS * 2).encode() + b'{"prompt": "caf\xe9", "completion": "2"}\n', 3),
    ("d.json", b'[{"prompt": "a",\n  "completion": "caf\xe9"}]', 2),
    ("d.csv", b"prompt,completion\nWhat?,2\ncaf\xe9,2\n", 3),
])
def test_bytes_that_are_not_utf8_are_refused_with_file_and_line(tmp_path, name, content, line):
    """A Latin-1 file (é as 0xe9) is one DataError naming file:line and the byte, not a UnicodeDecodeError."""
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError, match=rf"{p}:{line}: not UTF-8 text \(byte 0xe9 at column \d+\)"):
        load("d", cfg(p))


@pytest.mark.parametrize("name, content", [
    ("d.jsonl", ROWS * 2),
    ("d.jsonl", ROWS.replace("\n", "\r\n") * 2),
    ("d.json", '[{"prompt": "What is 1+1?", "completion": "2"}, {"prompt": "What is 1+1?", "completion": "2"}]'),
    ("d.csv", "prompt,completion\r\nWhat is 1+1?,2\r\nWhat is 1+1?,2\r\n"),
])
def test_a_byte_order_mark_and_crlf_line_ends_read_as_plain_utf8(tmp_path, name, content):
    """Files saved by Windows editors (BOM, CRLF) give the same rows and line numbers as plain ones."""
    p = tmp_path / name
    p.write_bytes(b"\xef\xbb\xbf" + content.encode())
    loaded = load("d", cfg(p))
    assert check(loaded, ("prompt_completion",)) == "prompt_completion"
    assert loaded.rows == [{"prompt": "What is 1+1?", "completion": "2"}] * 2
    if name != "d.json":
        assert loaded.where(1) == f"{p}:{3 if name == 'd.csv' else 2}"


def test_csv_labels_read_as_booleans_even_beside_a_bad_one(tmp_path):
    """A CSV label column with one bad cell is text to pandas; its `true` / `false` cells are still booleans,
    and only the bad cell is refused."""
    p = tmp_path / "d.csv"
    p.write_text("prompt,completion,label\nQ,a,true\nQ,b,FALSE\nQ,c,maybe\n")
    with pytest.raises(DataError) as err:
        check(load("d", cfg(p)), ("unpaired",))
    assert f"{p}:4: column 'label' should be true or false" in str(err.value)
    assert f"{p}:2" not in str(err.value) and f"{p}:3" not in str(err.value)
    assert "1 malformed row(s) of 3" in str(err.value)


SYS = {"role": "system", "content": "Answer with the number only."}


def test_system_prompt_goes_first_in_each_conversation_and_is_counted(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}], "completion": [{"role": "assistant", "content": "2"}]},
            {"prompt": [SYS | {"content": "Be brief."}, {"role": "user", "content": "2+2?"}],
             "completion": [{"role": "assistant", "content": "4"}]},
            {"messages": MSG},
            {"chosen": MSG, "rejected": [MSG[0], {"role": "assistant", "content": "bye"}]}]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    report = DataReport()
    got = load("d", cfg(p, system_prompt=SYS["content"]), report=report).rows
    assert got[0]["prompt"] == [SYS, *rows[0]["prompt"]] and got[0]["completion"] == rows[0]["completion"]
    assert got[1]["prompt"] == rows[1]["prompt"]  # a row's own system message stays
    assert got[2]["messages"] == [SYS, *MSG]
    assert got[3]["chosen"][0] == got[3]["rejected"][0] == SYS
    assert split_prompt(got[3])[0] == [SYS, MSG[0]]  # the implicit prompt carries it
    assert report.counts == {"d": {"system_prompt": 3}}
    assert report.examples["d"]["system_prompt"] == [f"{p}:1", f"{p}:3", f"{p}:4"]


@pytest.mark.parametrize("row, column", [({"prompt": "1+1?", "completion": "2"}, "prompt"), ({"text": "hi"}, "text")])
def test_system_prompt_on_text_rows_is_refused_with_file_and_line(tmp_path, row, column):
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": MSG}, row])
    with pytest.raises(DataError, match=rf"{p}:2: dataset 'd' has a system_prompt, but column '{column}' is text"):
        load("d", cfg(p, system_prompt="x"))


def test_system_prompt_leaves_rows_of_another_format_to_the_format_check(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": MSG}, {"question": "1+1?", "answer": "2"}])
    loaded = load("d", cfg(p, system_prompt="x"))
    assert loaded.rows[1] == {"question": "1+1?", "answer": "2"}
    with pytest.raises(DataError, match=rf"{p}:2: column 'messages' is missing"):
        check(loaded, ("messages",))


def test_system_prompt_changes_the_dataset_digest(tmp_path):
    from alignment.data import dataset_digest

    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": MSG}])
    assert len({dataset_digest(cfg(p)), dataset_digest(cfg(p, system_prompt="a")), dataset_digest(cfg(p, system_prompt="b"))}) == 3
