"""Tiny OPT (ReLU) and Llama models built from configs, shared by the sparsity and quality tests."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM


def tiny_opt(seed=0):
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=48, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=64, word_embed_proj_dim=16, activation_function="relu")
    return OPTForCausalLM(cfg).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()
