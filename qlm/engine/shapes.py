"""Model shapes the vLLM engine can run with random weights (``load_format="dummy"``).

The ``config.json`` of each measured model's real architecture:
:func:`qlm.engine.vllm_engine.model_path` writes it under the model directory; the GPU
scripts (``loadgen/gpu``) use the same shapes.
"""

from __future__ import annotations

from typing import Any

# config.json of each measured model's real shape (weights are random: load_format="dummy").
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # Mistral-7B-v0.1 dimensions; sliding window off (as in v0.2/v0.3) so that attention and
    # KV-cache use are the full-attention ones the performance model describes.
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "sliding_window": None, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    },
    # Vicuna-13B v1.5 = Llama-2-13B shape.
    "vicuna-13b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 40, "head_dim": 128,
        "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
        "attention_bias": False, "mlp_bias": False,
    },
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 151643,
        "eos_token_id": 151643, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": 28,
    },
}
