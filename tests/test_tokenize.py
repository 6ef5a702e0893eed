"""tokenize: jieba and nltk per script run, the vocabulary, memory-mapped ids, the HF tokenizer,
the gold-segmentation score."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stages.common.core.artifacts import SPLITS
from stages.common.text.segment import Segmenter, SegmentPool
from stages.tokenize import Params, SpecialTokens, build_vocab, gold_scores, save_hf_tokenizer
from tests.conftest import one_error_line, read_metrics, run_stage, write_jsonl


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter()


def test_mixed_text_goes_to_jieba_and_nltk(segmenter: Segmenter) -> None:
    assert segmenter.segment("我爱北京天安门 and I'm fine.") == \
        ["我", "爱", "北京", "天安门", "and", "I", "'m", "fine", "."]
    assert segmenter.segment("iPhone手机很好") == ["iPhone", "手机", "很", "好"]


def test_search_mode_adds_sub_words() -> None:
    precise = Segmenter(mode="precise").segment("中华人民共和国")
    search = Segmenter(mode="search").segment("中华人民共和国")
    assert precise == ["中华人民共和国"]
    assert {"中华", "人民", "共和国", "中华人民共和国"} <= set(search)


def test_hmm_finds_words_missing_from_the_dictionary() -> None:
    # jieba's own example: 杭研 is in no dictionary; only the HMM joins it
    with_hmm = Segmenter(hmm=True).segment("他来到了网易杭研大厦")
    without = Segmenter(hmm=False).segment("他来到了网易杭研大厦")
    assert "杭研" in with_hmm and "杭研" not in without


def test_user_dictionary_and_stopwords(tmp_path: Path) -> None:
    assert "蓝莓派对" not in Segmenter().segment("我们去蓝莓派对")
    user = tmp_path / "dict.txt"
    user.write_text("蓝莓派对 100 n\n", encoding="utf-8")
    assert Segmenter(user_dict=str(user)).segment("我们去蓝莓派对") == ["我们", "去", "蓝莓派对"]
    assert Segmenter(stopwords=True).segment("我们的书 is the book") == ["书", "book"]


def test_build_vocab_order_min_count_and_size() -> None:
    counts = Counter({"b": 5, "a": 5, "c": 9, "rare": 1, "<unk>": 7})
    params = Params(vocab_min_count=2, vocab_max_size=6)
    assert build_vocab(counts, params) == ["<pad>", "<unk>", "<s>", "</s>", "c", "a"]
    assert build_vocab(counts, Params(vocab_min_count=1))[4:] == ["c", "a", "b", "rare"]


def test_gold_scores_on_a_hand_made_gold_file(tmp_path: Path) -> None:
    gold = tmp_path / "gold.txt"
    # jieba segments 我爱北京天安门 as 我/爱/北京/天安门; the gold joins 北京天安门 into one word:
    # 2 of 4 predicted words match, 2 of 3 gold words do
    gold.write_text("我/r  爱/v  [北京天安门/ns]ns\n\n", encoding="utf-8")
    with SegmentPool({}, workers=1) as pool:
        scores = gold_scores(pool, gold, 0, batch_docs=8)
    assert scores["gold_precision"] == pytest.approx(2 / 4)
    assert scores["gold_recall"] == pytest.approx(2 / 3)
    assert scores["gold_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert scores["gold_lines"] == 1


def write_clean(clean: Path, docs: dict[str, list[tuple[str, str | None]]]) -> None:
    for split in SPLITS:
        write_jsonl(clean / f"{split}.jsonl", [{"text": t, "label": lb, "lang": "zh", "source": "t"}
                                               for t, lb in docs.get(split, [])])


def tokenize(params: Path, tmp: Path) -> tuple[int, Path, Path]:
    out, metrics = tmp / "tokens", tmp / "tokenize.json"
    rc = run_stage("tokenize", ["--params", str(params), "--clean", str(tmp / "clean"), "--out", str(out),
                                "--metrics", str(metrics)])
    return rc, out, metrics


DOCS = {
    "train": [("我喜欢这本书", "pos"), ("这本书很差", "neg"), ("I like this book.", "pos"),
              ("我喜欢 this book", None)] * 3,
    "validation": [("我喜欢手机", "neg")],
    "test": [("完全陌生的词语", "pos")],
}


def test_tokenizer_files_are_those_transformers_writes(tmp_path: Path) -> None:
    """The stage writes tokenizer.json and tokenizer_config.json without importing transformers;
    they must be byte for byte what transformers' own save_pretrained makes of the same vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = SpecialTokens()
    vocab = [sp.pad, sp.unk, sp.bos, sp.eos, "好", "质量", "book", "."]
    (tmp_path / "ours").mkdir()
    save_hf_tokenizer(tmp_path / "ours", vocab, sp)
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token=sp.unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=sp.pad, unk_token=sp.unk, bos_token=sp.bos,
                            eos_token=sp.eos).save_pretrained(str(tmp_path / "theirs"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name


def test_ids_labels_and_hf_tokenizer_agree(params_file: Callable[..., Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    write_clean(tmp_path / "clean", DOCS)
    rc, out, metrics_path = tokenize(params_file(tokenize={"gold": "", "vocab_min_count": 1}), tmp_path)
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["labels"] == ["pos", "neg"]
    tok = AutoTokenizer.from_pretrained(str(out))
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    for split in SPLITS:
        ids = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="r")
        offsets = np.fromfile(out / f"{split}.offsets.bin", dtype=np.uint64)
        labels = np.fromfile(out / f"{split}.labels.bin", dtype=np.int32)
        lines = (out / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        assert len(offsets) == len(lines) + 1 == len(DOCS[split]) + 1 and offsets[-1] == len(ids)
        for i, line in enumerate(lines):
            doc = ids[int(offsets[i]):int(offsets[i + 1])].tolist()
            assert doc == tok(line)["input_ids"] + [3]
        expected = [meta["labels"].index(lb) if lb else -1 for _, lb in DOCS[split]]
        assert labels.tolist() == expected
    assert (out / "train.txt").read_text(encoding="utf-8").splitlines()[:4] == \
        ["我 喜欢 这 本书", "这 本书 很差", "I like this book .", "我 喜欢 this book"]
    m = read_metrics(metrics_path)
    # the test document's words never occur in train: every one is <unk>
    assert m["unk_rate_test"] == 1.0 and m["unk_rate_train"] == 0.0
    assert m["tokens_test"] == len(tok("完全 陌生 的 词语")["input_ids"]) + 1


def test_two_workers_write_the_same_bytes_as_one(params_file: Callable[..., Path], tmp_path: Path) -> None:
    docs = {"train": [(f"第{i}条评论说这本书很好 number {i}", None) for i in range(700)],
            "validation": [("好书", None)], "test": [("坏书", None)]}
    outputs = []
    for workers in (1, 2):
        work = tmp_path / f"w{workers}"
        write_clean(work / "clean", docs)
        rc, out, _ = tokenize(params_file(tokenize={"workers": workers, "batch_docs": 16, "gold": ""}), work)
        assert rc == 0
        # params.json (and its digest in the owner file) records the workers: everything else is the same
        outputs.append({p.name: p.read_bytes() for p in out.iterdir()
                        if p.name not in ("params.json", ".lmmem-out")})
    assert outputs[0] == outputs[1]


def test_a_vocabulary_over_65536_words_uses_uint32(params_file: Callable[..., Path], tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(70_000)]
    docs = {"train": [(" ".join(words[i:i + 1000]), None) for i in range(0, 70_000, 1000)],
            "validation": [("w1 w69999", None)], "test": [("w5", None)]}
    write_clean(tmp_path / "clean", docs)
    params = params_file(tokenize={"gold": "", "vocab_min_count": 1, "vocab_max_size": 100_000})
    rc, out, metrics_path = tokenize(params, tmp_path)
    assert rc == 0
    assert json.loads((out / "meta.json").read_text())["dtype"] == "uint32"
    ids = np.memmap(out / "validation.bin", dtype=np.uint32, mode="r")
    vocab = json.loads((out / "vocab.json").read_text())["words"]
    assert [vocab[i] for i in ids.tolist()] == ["w1", "w69999", "</s>"]
    assert read_metrics(metrics_path)["vocab_size"] == 70_004


def test_builtin_gold_score_matches_the_stored_figure(params_file: Callable[..., Path],
                                                      tmp_path: Path) -> None:
    """jieba 0.42.1 (precise, HMM) against the first 300 lines of People's Daily 1998."""
    write_clean(tmp_path / "clean", DOCS)
    rc, _, metrics_path = tokenize(params_file(tokenize={"gold_max_lines": 300}), tmp_path)
    assert rc == 0
    m = read_metrics(metrics_path)
    assert m["gold_lines"] == 300 and m["gold_lines_misaligned"] == 0
    assert m["gold_f1"] == pytest.approx(0.802, abs=0.005)
    assert m["gold_precision"] == pytest.approx(0.825, abs=0.005)


def test_missing_user_dictionary_is_refused(params_file: Callable[..., Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    write_clean(tmp_path / "clean", DOCS)
    rc, out, metrics = tokenize(params_file(tokenize={"user_dict": str(tmp_path / "no.txt")}), tmp_path)
    assert rc == 2
    assert f"tokenize.user_dict: no such file: {tmp_path}/no.txt" in one_error_line(capsys.readouterr().err,
                                                                                    "tokenize")
    assert not out.exists() and not metrics.exists()


def test_train_with_no_words_is_refused(params_file: Callable[..., Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    write_clean(tmp_path / "clean", {"train": [("的 了 是", None)], "test": [("书", None)]})
    rc, out, _ = tokenize(params_file(tokenize={"stopwords": True, "gold": ""}), tmp_path)
    assert rc == 2
    assert "the training split has no words" in one_error_line(capsys.readouterr().err, "tokenize")
    assert not out.exists()


def test_ids_written_in_chunks_equal_ids_written_at_once(tmp_path: Path) -> None:
    from stages.tokenize import write_ids

    txt = tmp_path / "train.txt"
    txt.write_text("a b c\n\nb x\nc c c c\n", encoding="utf-8")
    index = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "a": 4, "b": 5, "c": 6}
    results = []
    for flush in (1, 3, 1 << 20):
        out = tmp_path / f"f{flush}"
        out.mkdir()
        assert write_ids(txt, out, "train", index, np.uint16, 1, 3, flush) == (13, 1)
        results.append(((out / "train.bin").read_bytes(), (out / "train.offsets.bin").read_bytes()))
    assert results[0] == results[1] == results[2]
    assert np.frombuffer(results[0][0], dtype=np.uint16).tolist() == [4, 5, 6, 3, 3, 5, 1, 3, 6, 6, 6, 6, 3]
    assert np.frombuffer(results[0][1], dtype=np.uint64).tolist() == [0, 4, 5, 8, 13]
