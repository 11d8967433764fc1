"""Data loading: formats, row checks that name file and line, mixtures, pairs -> unpaired."""
from __future__ import annotations

import pytest

from alignment.data import DataError, build, check, load, mixture, split_prompt
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
    with pytest.raises(DataError, match=rf"{p}:2: not valid JSON"):
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
