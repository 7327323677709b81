import json

import numpy as np
import pytest

from textune.data import Table, batch_indices, build_label_names, encode, read_table, split_indices
from textune.errors import UserError

from .conftest import toy_rows, write_csv


def test_read_csv_detects_columns(tmp_path):
    p = write_csv(tmp_path / "a.csv", [("hello", "x"), ("world", "y")], header=("Review", "Class"))
    t = read_table(p)
    assert t.texts == ["hello", "world"] and t.labels == ["x", "y"]


def test_read_tsv_and_jsonl(tmp_path):
    (tmp_path / "a.tsv").write_text("sentence\tlabel\nsome, text\t1\nmore\t0\n")
    t = read_table(tmp_path / "a.tsv")
    assert t.texts == ["some, text", "more"] and t.labels == ["1", "0"]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 2})
                                                for i in range(4)))
    t = read_table(tmp_path / "b.jsonl")
    assert t.labels == ["0", "1", "0", "1"]


def test_missing_column_lists_columns(tmp_path):
    p = write_csv(tmp_path / "a.csv", [("a", "b")], header=("foo", "bar"))
    with pytest.raises(UserError, match=r"columns found: foo, bar.*--text-col"):
        read_table(p)
    with pytest.raises(UserError, match=r"no column 'nope'"):
        read_table(p, text_col="foo", label_col="nope")


def test_unknown_column_names_get_a_guess(tmp_path):
    rows = [(str(i), f"a rather long review number {i}", "5" if i % 2 else "1") for i in range(40)]
    p = write_csv(tmp_path / "a.csv", rows, header=("id", "review_body", "stars"))
    with pytest.raises(UserError, match=r"--text-col NAME \('review_body' looks like it\)$"):
        read_table(p)
    with pytest.raises(UserError, match=r"--label-col NAME \('stars' looks like it\)$"):
        read_table(p, text_col="review_body")  # (not id: every value differs)
    assert read_table(p, text_col="review_body", label_col="stars").labels[:2] == ["1", "5"]
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(UserError, match=r"empty.csv: the file is empty$"):
        read_table(tmp_path / "empty.csv")


def test_labels_differing_in_case_are_warned_about(tmp_path, caplog):
    rows = [("a", "pos"), ("b", "Pos"), ("c", "pos"), ("d", "neg"), ("e", "very  bad"),
            ("f", "Very bad")]
    t = read_table(write_csv(tmp_path / "a.csv", rows))
    assert sorted(set(t.labels)) == ["Pos", "Very bad", "neg", "pos", "very  bad"]  # kept apart
    assert "labels 'pos' (2 rows) and 'Pos' (1 rows) differ only in case" in caplog.text
    assert "'very  bad' (1 rows) and 'Very bad' (1 rows)" in caplog.text
    caplog.clear()
    read_table(write_csv(tmp_path / "b.csv", [("a", "pos"), ("b", "neg")]))
    assert "differ only" not in caplog.text


def test_semicolon_csv_and_misquoted_rows(tmp_path):
    (tmp_path / "semi.csv").write_text("text;label\ngood, fine;pos\nbad;neg\n")
    t = read_table(tmp_path / "semi.csv")
    assert t.texts == ["good, fine", "bad"] and t.labels == ["pos", "neg"]
    # an unquoted comma in the first row: pandas would read column 1 as an index, silently
    (tmp_path / "a.csv").write_text("text,label\ngreat movie, loved it,pos\nbad,neg\n")
    with pytest.raises(UserError, match=r"a.csv: line 2 has 3 fields, the header 2; put quotes"):
        read_table(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("text,label\nok,pos\nbad, really bad,neg\n")
    with pytest.raises(UserError, match=r"b.csv.*line 3"):
        read_table(tmp_path / "b.csv")


def test_not_utf8_names_the_line(tmp_path):
    (tmp_path / "l.csv").write_bytes("text,label\nok,pos\ncaf\u00e9,neg\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"l.csv: not valid UTF-8 at line 3") as e:
        read_table(tmp_path / "l.csv")
    import shutil
    import subprocess

    if shutil.which("iconv"):  # the command the message gives does the job
        subprocess.run(str(e.value).split("say: ")[1].rstrip(")"), shell=True, check=True)
        assert read_table(tmp_path / "l-utf8.csv").texts == ["ok", "caf\u00e9"]


def test_excel_sheet(tmp_path, caplog):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("openpyxl")
    pd.DataFrame({"Review": ["good film", "bad", "meh", "ok"], "Label": [5, 1, None, 2.0]}) \
        .to_excel(tmp_path / "a.xlsx", index=False)
    t = read_table(tmp_path / "a.xlsx")
    assert t.texts == ["good film", "bad", "ok"] and t.labels == ["5", "1", "2"]
    assert "(first: row 4)" in caplog.text  # the sheet's row number
    (tmp_path / "old.xls").write_bytes(b"\xd0\xcf\x11\xe0")
    with pytest.raises(UserError, match=r"old.xls.*save the sheet as .xlsx"):
        read_table(tmp_path / "old.xls")


def test_binary_file_is_refused(tmp_path):
    p = tmp_path / "x.csv"
    p.write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(UserError, match="binary"):
        read_table(p)


def test_empty_texts_dropped_and_all_empty_is_error(tmp_path, caplog):
    p = write_csv(tmp_path / "a.csv", [("x", "1"), ("  ", "0"), ("", "0"), ("y", "0")])
    t = read_table(p)
    assert t.texts == ["x", "y"]
    assert "2 rows have an empty text" in caplog.text
    q = write_csv(tmp_path / "b.csv", [("", "1"), (" ", "0")])
    with pytest.raises(UserError, match="no rows left"):
        read_table(q)


def test_rows_without_label_named_by_their_line(tmp_path, caplog):
    p = write_csv(tmp_path / "a.csv", [("x", "1"), ("y", ""), ("z", "0")])
    assert read_table(p).texts == ["x", "z"]
    assert "1 rows have no label (first: line 3)" in caplog.text  # header on line 1
    (tmp_path / "b.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y"}\n')
    assert read_table(tmp_path / "b.jsonl").texts == ["x"]
    assert "(first: line 2)" in caplog.text


def test_numeric_labels_sort_as_numbers():
    assert build_label_names(["10", "2", "1"]) == ["1", "2", "10"]
    assert build_label_names(["neg", "pos"]) == ["neg", "pos"]


def test_split_is_stratified_and_keeps_duplicates_together():
    rows = [(f"{t} n{i}", y) for i, (t, y) in enumerate(toy_rows(300))]
    rows += [("the very same text", "pos")] * 5
    t = Table([r[0] for r in rows], [r[1] for r in rows], None, "mem")
    tr, va, te = split_indices(t, 0.1, 0.1, seed=0)
    assert sorted(tr + va + te) == list(range(len(t)))
    texts = [set(t.texts[i] for i in part) for part in (tr, va, te)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    for part in (va, te):  # stratified over distinct texts
        ys = [y for x, y in {(t.texts[i], t.labels[i]) for i in part}]
        assert abs(ys.count("pos") - ys.count("neg")) <= 1


def test_one_text_with_two_labels_is_named(tmp_path, caplog):
    rows = [(f"{t} n{i}", y) for i, (t, y) in enumerate(toy_rows(60))]
    rows += [("the very same text", "pos"), ("the very same text", "pos"), ("twice", "neg")]
    path = write_csv(tmp_path / "d.csv", [*rows, ("the very same text", "neg"), ("twice", "pos")])
    caplog.set_level("WARNING", logger="textune")
    split_indices(read_table(path), 0.1, 0.1, seed=0)
    assert "d.csv: 2 texts have different labels in different rows (first: line 62, 'the very " \
           "same text': neg / pos)" in caplog.text
    caplog.clear()
    split_indices(read_table(write_csv(tmp_path / "ok.csv", rows)), 0.1, 0.1, seed=0)
    assert "repeat an earlier text" in caplog.text and "different labels" not in caplog.text


def test_split_errors_name_the_class():
    t = Table(["a", "b", "c", "d", "e"], ["x", "x", "x", "x", "y"], None, "f.csv")
    with pytest.raises(UserError, match=r"class 'y' has only 1"):
        split_indices(t, 0.1, 0.1, 0)
    t1 = Table(["a", "b", "c"], ["x", "x", "x"], None, "f.csv")
    with pytest.raises(UserError, match="only one class"):
        split_indices(t1, 0.1, 0.1, 0)


def test_rare_classes_are_named_and_can_be_left_out(tmp_path, caplog):
    """Classes too rare to split: the error names the rarest, counts the others and gives the
    flag; --drop-classes-under leaves their rows out, says so, and the run records it."""
    from textune.api import load_splits
    from textune.config import DataArgs, RunConfig
    from textune.report import caveats

    rows = toy_rows(200) + [("odd one", "odd"), ("odd two", "odd"), ("odd two", "odd"),
                            ("lone", "lone"), ("odd three", "odd")]
    cfg = RunConfig(DataArgs(str(write_csv(tmp_path / "a.csv", rows))))
    with pytest.raises(UserError, match=r"class 'lone' has only 1 distinct text\(s\) \(and 1 "
                       r"more classes under 4\).*--drop-classes-under 4 to leave them out"):
        load_splits(cfg)
    cfg.data.drop_classes_under = 4
    s = load_splits(cfg)
    assert s.labels == ["neg", "pos"] and s.split["classes_dropped"] == {"lone": 1, "odd": 4}
    assert len(s.train) + len(s.val) + len(s.test) == 200
    assert "leaves out 5 rows of 2 classes: 'lone' (1), 'odd' (4)" in caplog.text
    assert any("2 classes with too few texts were left out" in c
               for c in caveats({"splits": s.split}))
    cfg.data.drop_classes_under = 3  # 'odd' has 3 distinct texts (a duplicate counts once)
    with pytest.raises(UserError, match=r"class 'odd' has only 3 .* to leave it out"):
        load_splits(cfg)


def test_encode_head_tail_keeps_both_ends(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    words = ["good"] + ["film"] * 50 + ["bad"]
    t = Table([" ".join(words)], ["pos"], None, "mem")
    head = encode(tok, t, 16, "head", ["pos"]).input_ids[0]
    ht = encode(tok, t, 16, "head-tail", ["pos"]).input_ids[0]
    bad = tok.convert_tokens_to_ids("bad")
    assert len(head) == len(ht) == 16
    assert bad not in head and ht[-2] == bad and ht[-1] == tok.sep_token_id
    assert ht[0] == tok.cls_token_id


def test_encode_windows_cover_a_long_text_and_pool_per_text(tiny_bert, tiny_llama):
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    words = ["good"] + ["film"] * 40 + ["bad"]  # 42 body tokens: windows of 14 -> 3
    t = Table(["nice plot", " ".join(words), "dull"], ["pos", "neg", "neg"], None, "mem")
    enc = encode(tok, t, 16, "windows", ["neg", "pos"])
    assert enc.rows.tolist() == [0, 1, 1, 1, 2] and enc.n_rows == 3
    assert enc.labels.tolist() == [1, 0, 0, 0, 0] and enc.row_labels.tolist() == [1, 0, 0]
    good, bad = tok.convert_tokens_to_ids("good"), tok.convert_tokens_to_ids("bad")
    w = [x.tolist() for x in enc.input_ids[1:4]]
    assert all(len(x) == 16 and x[0] == tok.cls_token_id and x[-1] == tok.sep_token_id
               for x in w)
    assert w[0][1] == good and w[-1][-2] == bad  # the first and the last tokens are in
    assert enc.input_ids[0].tolist() == tok("nice plot")["input_ids"]  # short: as before
    logits = np.array([[1.0, 0], [0, 3], [0, 6], [3, 0], [2, 2]], dtype=np.float32)
    assert enc.pool(logits).tolist() == [[1, 0], [1, 3], [2, 2]]
    capped = encode(tok, t, 16, "windows", ["neg", "pos"], max_windows=2)
    assert capped.rows.tolist() == [0, 1, 1, 2]
    assert capped.input_ids[2].tolist()[-2] == bad  # the cap spreads, still reaching the end
    # a decoder's tokenizer (no special tokens here): windows are plain slices
    from textune.modeling import load_tokenizer

    ltok = load_tokenizer(str(tiny_llama))  # (sets the pad token)
    lenc = encode(ltok, Table([" ".join(words)], ["pos"], None, "mem"), 16, "windows", ["pos"])
    assert len(lenc) == 3 and all(len(x) == 16 for x in lenc.input_ids)
    with pytest.raises(UserError, match="not for text pairs"):
        encode(tok, Table(["a"], ["pos"], ["b"], "mem"), 16, "windows", ["pos"])


def test_collate_pads_to_multiple_of_8(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    t = Table(["good film", "bad film and plot was dull"], ["pos", "neg"], None, "mem")
    enc = encode(tok, t, 64, "head", ["neg", "pos"])
    b = enc.collate([0, 1])
    assert b["input_ids"].shape == (2, 8)
    assert b["attention_mask"].sum(1).tolist() == [4, 8]
    assert b["labels"].tolist() == [1, 0]
    assert (b["input_ids"][0, 4:] == tok.pad_token_id).all()


def test_batches_cover_everything_once_and_group_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1000)
    for shuffle in (True, False):
        b = batch_indices(lengths, 1000, 32, shuffle=shuffle, seed=1)
        assert sorted(i for x in b for i in x) == list(range(1000))
    grouped = batch_indices(lengths, 1000, 32, shuffle=True, seed=1)
    rand = batch_indices(lengths, 1000, 32, shuffle=True, seed=1, group=False)

    def padding(bs):
        return sum(max(lengths[x]) * len(x) - lengths[x].sum() for x in bs)

    assert padding(grouped) < 0.2 * padding(rand)
    assert batch_indices(lengths, 1000, 32, shuffle=True, seed=1) == grouped  # deterministic
    # pools of 2 x 32 rows: every batch is full but one, and none straddles two pools (whose
    # sorted runs would put one pool's shortest rows with the next one's longest)
    pooled = batch_indices(lengths, 1000, 32, shuffle=True, seed=1, pool=2)
    assert sorted(len(x) for x in pooled)[1:] == [32] * 31
    assert padding(pooled) < 0.75 * padding(rand)  # (two batches a pool: some grouping)
    order = np.random.default_rng(1).permutation(1000)
    pools = [set(order[i:i + 64].tolist()) for i in range(0, 1000, 64)]
    assert all(any(set(x) <= pool for pool in pools) for x in pooled)


def test_token_budget_batches_respect_the_budget_and_cover_every_row():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=2000)
    for shuffle in (True, False):
        b = batch_indices(lengths, 2000, 10**6, shuffle=shuffle, seed=3, max_tokens=4096)
        assert sorted(i for x in b for i in x) == list(range(2000))
        padded = [len(x) * (-(-int(max(lengths[x])) // 8) * 8) for x in b]
        assert max(padded) <= 4096  # no row is longer than the budget here
        # short rows share big batches, long rows small ones
        sizes = {len(x): np.mean(lengths[x]) for x in b}
        assert min(sizes) < 10 < max(sizes)
        assert np.mean(padded) > 0.8 * 4096  # batches are nearly full
    # a row longer than the budget still gets a batch of its own; the rows cap holds
    b = batch_indices(np.array([900, 10, 10, 10]), 4, 2, shuffle=False, max_tokens=512)
    assert b == [[0], [1, 2], [3]]
    assert batch_indices(lengths, 2000, 32, shuffle=True, seed=3, max_tokens=4096) == \
        batch_indices(lengths, 2000, 32, shuffle=True, seed=3, max_tokens=4096)


def test_parallel_tokenization_equals_the_hugging_face_call(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from textune import data

    from .conftest import FILL, NEG, POS, make_tokenizer

    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path, POS + NEG + FILL))
    rng = np.random.default_rng(0)
    words = POS + NEG + FILL + ["unknownword"]
    texts = [" ".join(rng.choice(words, rng.integers(1, 40))) for _ in range(700)]
    pairs = texts[::-1]
    monkeypatch.setattr(data, "PARALLEL_MIN", 10)
    for p, cut in ((None, 16), (pairs, 24), (None, None)):
        ids, types = data.tokenize(tok, texts, p, cut)
        ref = tok(texts, p, truncation=cut is not None, max_length=cut)
        assert ids == ref["input_ids"]
        assert types == ref.get("token_type_ids")
        assert any(len(x) == cut for x in ids) or cut is None


def test_gpu_inference_batches_use_token_budgets_and_few_shapes(monkeypatch):
    """On a GPU (only the device type matters here), inference batches fill a token budget and
    meet few shapes: the width ladder by default, multiples of TEXTUNE_INFER_PAD if set."""
    import torch

    from textune.data import Encoded
    from textune.loop import INFER_TOKENS, inference_batches, inference_pad

    rng = np.random.default_rng(0)
    data = Encoded([np.ones(int(n), dtype=np.int64) for n in rng.integers(5, 512, 3000)], None,
                   None, 0)
    cpu = inference_batches(data, 64, torch.device("cpu"))
    assert {len(b) for b in cpu[:-1]} == {64}
    for pad, most in ((None, 25), ("8", 70), ("64", 9)):
        if pad is not None:
            monkeypatch.setenv("TEXTUNE_INFER_PAD", pad)
        gpu = inference_batches(data, 64, torch.device("cuda"))
        assert sorted(i for b in gpu for i in b) == list(range(3000))
        multiple = inference_pad(torch.device("cuda"))
        shapes = {(len(b), data.collate(b, multiple)["input_ids"].shape[1]) for b in gpu}
        assert len(shapes) <= most
        assert all(r * w <= INFER_TOKENS for r, w in shapes)
        assert max(len(b) for b in gpu) > 64  # short texts share big batches
    monkeypatch.setenv("TEXTUNE_INFER_PAD", "sixty")
    with pytest.raises(UserError, match="TEXTUNE_INFER_PAD"):
        inference_batches(data, 64, torch.device("cuda"))


def test_width_ladder_pads_little_and_has_few_rungs():
    from textune.data import LADDER, padded_width

    widths = [padded_width(n, LADDER) for n in range(1, 4097)]
    assert all(w >= n and (w == n or n > 64 and w < 1.25 * n or w - n < 8)
               for n, w in zip(range(1, 4097), widths))
    assert all(a <= b for a, b in zip(widths, widths[1:]))  # never shrinks as rows grow
    assert len(set(widths[:512])) == 20 and len(set(widths)) == 32
    assert [padded_width(n, LADDER) for n in (8, 9, 64, 65, 129, 300, 513)] == \
        [8, 16, 64, 80, 160, 320, 640]
    assert padded_width(65, 64) == 128 and padded_width(13, 8) == 16


def test_short_gpu_batches_are_filled_to_a_power_of_two():
    from textune.loop import INFER_TOKENS, inference_rows

    assert [inference_rows(n, 512, 64) for n in (1, 3, 5, 33, 64)] == [1, 4, 8, 64, 64]
    assert inference_rows(300, 64, 64) == 512  # 8 x 64 rows of 64 tokens fill the budget
    assert inference_rows(300, 64, 40) == 320  # never past a full batch's rows
    assert inference_rows(2, INFER_TOKENS * 2, 64) == 2  # one huge row: as it is


def test_ladder_never_pads_past_the_datas_longest_row():
    """A model whose position limit is not a rung (say 300) must still get rows it can take."""
    from textune.data import LADDER, Encoded

    data = Encoded([np.ones(n, dtype=np.int64) for n in (300, 290, 200, 10)], None, None, 0)
    assert data.collate([0, 1], LADDER)["input_ids"].shape[1] == 304  # not the rung 320
    assert data.collate([2], LADDER)["input_ids"].shape[1] == 224  # a rung below the cap
    assert data.collate([3], LADDER)["input_ids"].shape[1] == 16
