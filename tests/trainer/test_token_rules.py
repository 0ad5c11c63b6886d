"""What a token may be (trainer/intake/tokens.py): a made-up word; not a class word, a common English word, or one of
the base tokenizer's common whole-word tokens; every refusal says what to pick instead."""
from __future__ import annotations

import json

import pytest

from trainer.contract.errors import UserError
from trainer.intake import tokens
from trainer.intake.tokens import check_token, english_words, is_common_token, model_vocab, suggest_token

# Entries of CLIP's BPE vocabulary (SD 1.x/2.x/XL; 49,408 entries, frequent merges first) at their real ids, from
# open_clip's bpe_simple_vocab_16e6.txt.gz (MIT): common whole-word tokens that are not English words, and the rare
# ones DreamBooth guides use.
CLIP_SIZE = 49408
CLIP_ENTRIES = {"pmoindia</w>": 20374, "vmas</w>": 30236, "ohwx</w>": 47993, "sks</w>": 48136}


@pytest.fixture
def clip_model_dir(tmp_path):
    """A model folder whose tokenizer has CLIP's size, with the entries above where CLIP has them."""
    vocab = {f"filler{i}": i for i in range(CLIP_SIZE)}
    for entry, index in CLIP_ENTRIES.items():
        vocab[f"filler{index}"] = None
        vocab[entry] = index
    vocab = {entry: index for entry, index in vocab.items() if index is not None}
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("raw, expected", [("squidarth", "squidarth"), (" Rex_The_Dog ", "rex_the_dog"),
                                           ("sks", "sks"), ("OHWX", "ohwx"), ("zqxv", "zqxv"), ("x" * 24, "x" * 24)])
def test_made_up_tokens_are_accepted(raw, expected):
    assert check_token(raw) == expected


@pytest.mark.parametrize("raw", ["ab", "x" * 25, "squid arth", "squid-arth", "sq<@1>", "ünïcode", "", "12345"])
def test_malformed_tokens_say_what_a_token_is(raw):
    with pytest.raises(UserError, match="made-up word"):
        check_token(raw)


@pytest.mark.parametrize("word, says, suggestion", [
    ("photo", "is a common English word", "photox"), ("the", "is a common English word", "thex"),
    ("portrait", "is a common English word", "portraitx"),
    ("dog", "is a class word (it goes in `class:`", "/train token:dogx class:dog"),
    ("guy", "is a class word", "/train token:guyx class:man"),
])
def test_real_words_are_refused_with_a_suggestion_built_from_them(word, says, suggestion):
    with pytest.raises(UserError) as refused:
        check_token(word)
    text = str(refused.value)
    assert f"“{word}” {says}" in text and f"Try `{suggestion}`" in text, text
    assert "/imagine" in text and "made-up word" in text  # what a token is for, in words a newcomer knows


def test_suggestions_pass_the_rules_themselves():
    for word in ("photo", "the", "dog", "cat", "woman", "style", "zzz", "a_b"):
        assert check_token(suggest_token(word)) == suggest_token(word)


def test_common_tokenizer_words_are_refused_and_rare_ones_kept(clip_model_dir):
    vocab = model_vocab(str(clip_model_dir))
    assert len(vocab) == CLIP_SIZE
    for word in ("pmoindia", "vmas"):  # no English words, but the tokenizer's own frequent ones
        assert word not in english_words() and is_common_token(word, vocab)
        with pytest.raises(UserError, match=f"“{word}” is a word the image model already knows well"):
            check_token(word, vocab)
    for word in ("sks", "ohwx", "squidarth"):  # rare entries (97% of the way down), or no whole-word entry at all
        assert check_token(word, vocab) == word
    assert check_token("pmoindia") == "pmoindia"  # without a vocabulary only the word rules apply


def test_a_hub_model_in_the_hugging_face_cache_gives_its_vocabulary(clip_model_dir, tmp_path, monkeypatch):
    """The usual setup: BOOTHBOT_MODEL is a hub id the worker downloaded; the bot finds its tokenizer in the cache."""
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--some-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(clip_model_dir / "tokenizer", repo / "snapshots" / ("0" * 40) / "tokenizer")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    model_vocab.cache_clear()
    try:
        with pytest.raises(UserError, match="already knows well"):
            check_token("pmoindia", model_vocab("someone/some-model"))
        assert model_vocab("someone/not-downloaded") is None
        assert model_vocab(str(tmp_path / "model.safetensors")) is None
    finally:
        model_vocab.cache_clear()


def test_a_tokenizer_object_is_read_like_its_vocabulary(clip_model_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(clip_model_dir / "tokenizer"))
    with pytest.raises(UserError, match="already knows well"):
        check_token("pmoindia", tokenizer)
    assert check_token("sks", tokenizer) == "sks"


def test_the_word_list_is_small_lazy_and_leaves_the_classic_tokens_alone():
    tokens.english_words.cache_clear()
    words = english_words()
    assert 20_000 < len(words) < 40_000
    assert {"photo", "the", "portrait", "beach"} <= words
    assert not {"sks", "ohwx", "squidarth"} & words
