"""Builds a tiny Mixtral-architecture model with random weights and a tokenizer, offline.

Nothing can be downloaded on the machines that run `make demo` and `make test`, so the
model is made here: the real `MixtralForCausalLM` class (attention and a
sparse mixture of 4 experts, top-2 routing) at toy width (2 layers, hidden 64), and a byte-level BPE tokenizer
trained on the shipped medical set, with Mixtral's [INST] chat template.

    python examples/make_tiny_model.py [OUT_DIR]     (default: examples/tiny-mixtral)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Mixtral-8x7B-Instruct's template (tokenizer_config.json), system prompts folded into the
# first user turn as the model card advises.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


def build_tokenizer(out: Path, corpus: Path, vocab_size: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts = []
    for line in corpus.read_text().splitlines():
        row = json.loads(line)
        texts += [row["question"], row["answer"], f"[INST] {row['question']} [/INST]"]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=4096, chat_template=CHAT_TEMPLATE, add_bos_token=False,
    )
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, vocab_size: int, bos: int, eos: int) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=4096, sliding_window=None, rope_theta=1e6, tie_word_embeddings=False,
        bos_token_id=bos, eos_token_id=eos, torch_dtype="float32",
    )
    # Two shards, as real checkpoints come: loading them is what draws transformers' tqdm bar,
    # which the job must keep out of its log. Either transformers writes the hub's per-expert
    # layout (block_sparse_moe.experts.N.w1/w2/w3): 5.x converts its 3D experts back on save.
    MixtralForCausalLM(config).save_pretrained(out, safe_serialization=True, max_shard_size="1MB")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "tiny-mixtral"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    tok = build_tokenizer(out, HERE / "data" / "medical.jsonl")
    build_model(out, len(tok), tok.bos_token_id, tok.eos_token_id)
    print(f"wrote tiny Mixtral ({len(tok)} tokens) to {out}")


if __name__ == "__main__":
    main()
