"""A tiny Llama with random weights and a word-level tokenizer, written to a directory that vLLM
and transformers load like any Hugging Face model. Nothing is downloaded: the demo and the tests
make their models here."""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIALS = ("<unk>", "<s>", "</s>")


def words(n: int = 300, seed: int = 3) -> list[str]:
    """``n`` distinct made-up words of two or three syllables, the tokenizer's vocabulary."""
    rng = random.Random(seed)
    onsets, vowels = "bdfgklmnprstvz", "aeiou"
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.choice((2, 3))))] = None
    return list(out)


def write_tokenizer(path: "str | Path", vocab: list[str]) -> None:
    """A word-level fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``): one id per word,
    ``<s>`` = 1 and ``</s>`` = 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    ids = {w: i for i, w in enumerate((*SPECIALS, *vocab))}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 4096, "clean_up_tokenization_spaces": False}))


def write_tiny_llama(path: "str | Path", *, layers: int = 4, hidden: int = 256, seed: int = 0) -> Path:
    """Save a random Llama (float32, vocab 512) and its tokenizer at ``path``; return ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    path = Path(path)
    LlamaForCausalLM(cfg).save_pretrained(path)
    write_tokenizer(path, words())
    return path


def sentence(n: int, seed: int) -> str:
    """``n`` words of the tokenizer's vocabulary, deterministic in ``seed``."""
    rng = random.Random(seed)
    vocab = words()
    return " ".join(rng.choice(vocab) for _ in range(n))
