"""A tiny random-weight GGUF chat model for fast tests of llama.cpp code paths.

The model is a real ``llama`` architecture network (two layers, 64 dimensions)
with a byte-level BPE vocabulary and a ChatML template, so llama-cpp-python
loads it, applies its chat template and samples from it like from any model.
Its weights are random, except for one trick that makes tests predictable:
dimension 0 of the residual stream is a constant that no layer writes to, so
its column in the output matrix acts as a per-token logit bias. That bias
limits replies to lowercase letters and spaces (one character per token, so
``completion_tokens == len(text)``) and sets how likely ``<|im_end|>`` is.

It also serves ``python -m llama_cpp.server --model <file>`` as a real
OpenAI-compatible upstream; start that with ``--interrupt_requests False``, or
it answers a second concurrent request with an empty stream.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_LAYER = 2

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# After the output norm the constant dimension is ~sqrt(N_EMBD) = 8, so a
# weight of -4 in its column is a logit of about -32: never sampled.
_BANNED = -4.0
_REPLY_CHARS = string.ascii_lowercase + " "


def _bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def make_tiny_model(path: Path, *, eos_logit: float = -30.0, seed: int = 0) -> Path:
    """Write a tiny random llama-architecture chat model to ``path`` and return the path.

    ``eos_logit`` is the logit of ``<|im_end|>`` against ~0 for each of the 27
    allowed characters: the default never ends a reply (every reply runs to
    ``max_tokens``, finish_reason ``length``); ``0`` ends one after ~28 tokens on
    average; ``10`` ends it at once (finish_reason ``stop``).
    """
    import gguf  # test-only dependency; imported here so collection never needs it

    byte_chars = _bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]
    # llama.cpp refuses a BPE vocabulary without merges: add one ("Ġ" + "t").
    merge_left, merge_right = byte_chars[ord(" ")], byte_chars[ord("t")]
    tokens.append(merge_left + merge_right)
    im_start_id, im_end_id = len(tokens), len(tokens) + 1
    tokens += [IM_START, IM_END]
    n_vocab = len(tokens)
    token_types = [gguf.TokenType.NORMAL] * (n_vocab - 2) + [gguf.TokenType.CONTROL] * 2

    rng = np.random.default_rng(seed)

    def weights(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    head_dim = N_EMBD // N_HEAD
    token_embd = weights(n_vocab, N_EMBD)
    token_embd[:, 0] = 1.0
    output = weights(n_vocab, N_EMBD)
    output[:, 0] = _BANNED
    for ch in _REPLY_CHARS:
        output[ord(ch), 0] = 0.0
    output[im_end_id, 0] = eos_logit / np.sqrt(N_EMBD)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-chatml")
    writer.add_context_length(32768)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(n_vocab)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([f"{merge_left} {merge_right}"])
    writer.add_bos_token_id(im_start_id)
    writer.add_eos_token_id(im_end_id)
    writer.add_pad_token_id(im_end_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    writer.add_tensor("token_embd.weight", token_embd)
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for i in range(N_LAYER):
        attn_output = weights(N_EMBD, N_HEAD * head_dim)
        ffn_down = weights(N_EMBD, N_FF)
        # No layer writes to the constant dimension, so it reaches the output intact.
        attn_output[0, :] = 0.0
        ffn_down[0, :] = 0.0
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weights(N_HEAD * head_dim, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weights(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weights(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_output.weight", attn_output)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", ffn_down)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
