"""Tiny stand-ins for the seed models, built here because nothing can be downloaded.

Each tokenizer reproduces its model's chat format: the special tokens, how they treat the
whitespace next to them, whether bos is added, and the chat template (facts in
shared/reference/models-and-data.md, from the models' public tokenizer configs). Ids differ
from the real vocabularies; strings and token boundaries are the same.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Phi-3-mini-4k-instruct, later template revision: every turn is <|role|>\n{content}<|end|>\n; with no
# generation prompt the template ends with the eos token.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# gemma-2b-it: bos, then <start_of_turn>{role}\n{content}<end_of_turn>\n with assistant written as
# model; no system role; roles alternate user/model.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

PHI3_SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "0 1 2 3 4 5 6 7 8 9 10 plus minus times is equals answer question",
    "Hello! How can I help you today? I am a helpful assistant.",
]


def _train_bpe(corpus: Iterable[str], specials: list[str], vocab_size: int) -> Tokenizer:
    # Byte-level BPE round-trips any text exactly, which the behaviour measure relies on.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return tok


def phi3_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A tokenizer with Phi-3's specials and template. The chat specials strip whitespace to their right,
    as Phi-3's do, so '<|user|>\\nHi' tokenizes as ['<|user|>', 'Hi']."""
    tok = _train_bpe(corpus, PHI3_SPECIALS[:4], vocab_size)
    tok.add_special_tokens([AddedToken(t, rstrip=True, normalized=False, special=True) for t in PHI3_SPECIALS[4:]])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        # Phi-3 ships pad = eos; alignpress replaces that at load time (modeling.load_tokenizer).
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = PHI3_CHAT_TEMPLATE
    return fast


def gemma_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A tokenizer with Gemma's specials and template; it adds bos when encoding plain text, as Gemma's does."""
    tok = _train_bpe(corpus, GEMMA_SPECIALS[:4], vocab_size)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in GEMMA_SPECIALS[4:]])
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = GEMMA_CHAT_TEMPLATE
    return fast
