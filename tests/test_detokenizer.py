"""IncrementalDetokenizer: token-by-token text equals a one-shot decode; stop strings cut before."""
from __future__ import annotations

import pytest
import torch

from tokenmill.engine.detokenizer import IncrementalDetokenizer

TEXT = ("Héllo wörld! 🎉🚀 Ça va? 日本語のテキスト — naïve café 👍🏽 Ünïcödé «quotes» and "
        "Ελληνικά, русский, 한국어 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵, "
        "maths ∑∫√ ≤ ≥, end.")


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def _feed(tokenizer, prompt_ids, output_ids, skip_special_tokens=True, stop=(), check_stop=True):
    d = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens, list(stop))
    texts, hits = [], []
    for t in output_ids:
        hit = d.add_token(t, check_stop=check_stop)
        texts.append(d.text)
        hits.append(hit)
        if hit is not None:
            break
    return d, texts, hits


@pytest.mark.parametrize("prompt", ["Translate this:", "A", "日本"])
def test_incremental_text_matches_decode_multibyte(tokenizer, prompt):
    prompt_ids = tokenizer.encode(prompt)
    out_ids = tokenizer.encode(TEXT)
    # Multi-byte characters really are split over several tokens here.
    assert any("\ufffd" in tokenizer.decode([t]) for t in out_ids)
    d, texts, hits = _feed(tokenizer, prompt_ids, out_ids)
    expected = tokenizer.decode(out_ids, skip_special_tokens=True)
    assert expected == TEXT
    assert d.text == expected
    assert hits == [None] * len(out_ids)
    for t in texts:  # the text only grows, and never shows half a character
        assert "\ufffd" not in t and expected.startswith(t)


def test_incremental_text_with_special_tokens(tokenizer):
    prompt_ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    body = tokenizer.encode("Voilà 🎉 ok")
    specials = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>")]
    assert all(isinstance(s, int) and s in tokenizer.all_special_ids for s in specials)
    out_ids = body[:3] + [specials[0]] + body[3:] + specials
    for skip in (True, False):
        d, _, _ = _feed(tokenizer, prompt_ids, out_ids, skip_special_tokens=skip)
        assert d.text == tokenizer.decode(out_ids, skip_special_tokens=skip)
    d, _, _ = _feed(tokenizer, prompt_ids, out_ids, skip_special_tokens=True)
    assert "<|im_end|>" not in d.text


def test_incremental_text_random_tokens(tokenizer):
    """Random ordinary tokens (not just well-formed text) decode the same incrementally."""
    special = set(tokenizer.all_special_ids)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        ids = [t for t in torch.randint(0, len(tokenizer), (60,), generator=g).tolist() if t not in special]
        prompt_ids, out_ids = ids[:6], ids[6:]
        expected = tokenizer.decode(out_ids, skip_special_tokens=True)
        if expected.endswith("\ufffd"):
            continue  # an unfinished character at the very end is held back by design
        assert _feed(tokenizer, prompt_ids, out_ids)[0].text == expected


def test_stop_string_spanning_tokens_and_multibyte(tokenizer):
    out_ids = tokenizer.encode(TEXT)
    for stop in ["🚀 Ça", "テキ", "naïve café", "wörld", "Ελλη", ", end."]:
        first = TEXT.find(stop)
        d, texts, hits = _feed(tokenizer, tokenizer.encode("Say:"), out_ids, stop=["@@never@@", stop])
        assert hits[-1] == stop and hits[:-1] == [None] * (len(hits) - 1)
        assert d.text == TEXT[:first]  # cut before the stop string
        # It stopped on the token that completed the stop string, not later.
        n = len(hits)
        assert first + len(stop) <= len(tokenizer.decode(out_ids[:n]).rstrip("\ufffd"))
        assert first + len(stop) > len(tokenizer.decode(out_ids[:n - 1]).rstrip("\ufffd"))


def test_earliest_stop_string_wins(tokenizer):
    out_ids = tokenizer.encode("one two three four")
    # Both complete on the same token; the one that starts first in the text wins.
    d, _, hits = _feed(tokenizer, [], out_ids, stop=["three", "two three"])
    assert hits[-1] == "two three" and d.text == "one "
    d, _, hits = _feed(tokenizer, [], out_ids, stop=["four", "two"])
    assert hits[-1] == "two" and d.text == "one "


def test_stop_string_not_matched_in_prompt_or_before_check(tokenizer):
    # In the prompt only: not a stop.
    d, _, hits = _feed(tokenizer, tokenizer.encode("stop here"), tokenizer.encode(" and go on"), stop=["here"])
    assert hits == [None] * len(hits) and d.text == " and go on"
    # Completed while check_stop is False (min_tokens not reached): ignored, text kept.
    out_ids = tokenizer.encode("abc def ghi")
    d, _, hits = _feed(tokenizer, [], out_ids, stop=["def"], check_stop=False)
    assert all(h is None for h in hits) and d.text == "abc def ghi"


def test_backend_decode_is_the_wrappers(tokenizer):
    """The default tokenizer (fast, no space clean-up) decodes through its Rust backend directly;
    a tokenizer that cleans up spaces keeps transformers' decode. Both give the wrapper's text."""
    ids = tokenizer.encode("Hi , you ' re <|im_start|> here . " + TEXT) + [tokenizer.eos_token_id]
    d = IncrementalDetokenizer(tokenizer, [], True, [])
    assert d._backend_decode is not None
    for skip in (True, False):
        d.skip_special_tokens = skip
        assert d._decode(ids) == tokenizer.decode(ids, skip_special_tokens=skip)
    d.skip_special_tokens = True
    tokenizer.clean_up_tokenization_spaces = True
    try:
        cleaning = IncrementalDetokenizer(tokenizer, [], True, [])
        assert cleaning._backend_decode is None
        assert cleaning._decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    finally:
        tokenizer.clean_up_tokenization_spaces = False
