"""Tiny transformers models with random weights, made locally (nothing is downloaded)."""

import torch
import transformers as tf

VOCAB = 128


def make(arch: str, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4)
    if arch == "llama":
        cfg = tf.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=96, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, **common)
        model = tf.MixtralForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=128,
                            tie_word_embeddings=True)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=128)
        model = tf.OPTForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def greedy(model, ids, n=8):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0).tolist()
