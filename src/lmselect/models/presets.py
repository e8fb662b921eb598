"""Named model presets and the Hugging Face builders behind them.

Pythia presets carry the published GPT-NeoX hyperparameters (Biderman et al. 2023, Table 1 and the HF configs):
parallel attention+MLP residual, rotary embeddings on 25 % of each head, untied input/output embeddings.
The vocabulary size is not part of a preset: it comes from the pool's tokenizer (``build_model(..., vocab_size)``).

Models are initialised from scratch: every Linear/Embedding weight ~ normal(0, 0.02), biases zero, norms (1, 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmselect.artifacts import LmselectError


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "gpt_neox" | "llama"
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25  # gpt_neox only
    num_kv_heads: int | None = None  # llama only (grouped-query attention)
    rope_theta: float = 10000.0
    published_params: int | None = None  # total parameters with the published vocabulary
    published_vocab: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_PYTHIA_VOCAB = 50304

PRESETS: dict[str, Preset] = {
    # tests and the demo: tiny but the real architecture
    "debug": Preset("debug", "gpt_neox", 64, 2, 4, 256, max_position_embeddings=512),
    "debug-llama": Preset("debug-llama", "llama", 64, 2, 4, 176, max_position_embeddings=512, num_kv_heads=2),
    # Pythia suite: published total parameter counts (with the 50,304-entry GPT-NeoX vocabulary)
    "pythia-14m": Preset("pythia-14m", "gpt_neox", 128, 6, 4, 512, published_params=14_067_712, published_vocab=_PYTHIA_VOCAB),
    "pythia-31m": Preset("pythia-31m", "gpt_neox", 256, 6, 8, 1024, published_params=30_494_720, published_vocab=_PYTHIA_VOCAB),
    "pythia-70m": Preset("pythia-70m", "gpt_neox", 512, 6, 8, 2048, published_params=70_426_624, published_vocab=_PYTHIA_VOCAB),
    "pythia-160m": Preset("pythia-160m", "gpt_neox", 768, 12, 12, 3072, published_params=162_322_944, published_vocab=_PYTHIA_VOCAB),
    "pythia-410m": Preset("pythia-410m", "gpt_neox", 1024, 24, 16, 4096, published_params=405_334_016, published_vocab=_PYTHIA_VOCAB),
    "pythia-1b": Preset("pythia-1b", "gpt_neox", 2048, 16, 8, 8192, published_params=1_011_781_632, published_vocab=_PYTHIA_VOCAB),
    "pythia-2.8b": Preset("pythia-2.8b", "gpt_neox", 2560, 32, 32, 10240, published_params=2_775_208_960, published_vocab=_PYTHIA_VOCAB),
    # Llama-style ~0.5B (the MATES / BLISS "LLaMA-0.5B" scale): SwiGLU, RMSNorm, full rotary, GQA, untied.
    "llama-0.5b": Preset(
        "llama-0.5b", "llama", 1280, 24, 20, 3456, max_position_embeddings=2048, num_kv_heads=20,
        published_params=None, published_vocab=32000,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise LmselectError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})") from None


def hf_config(preset: str | Preset, vocab_size: int, *, bos_token_id: int | None = None, eos_token_id: int | None = None) -> Any:
    """The ``transformers`` config object of a preset with the given vocabulary size."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    common = dict(
        vocab_size=int(vocab_size),
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        intermediate_size=p.intermediate_size,
        max_position_embeddings=p.max_position_embeddings,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        use_cache=False,
    )
    if p.family == "gpt_neox":
        from transformers import GPTNeoXConfig

        cfg = GPTNeoXConfig(
            **common,
            rotary_pct=p.rotary_pct,
            rotary_emb_base=p.rope_theta,
            use_parallel_residual=True,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            attention_bias=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        # transformers >= 4.5x moved rotary settings into rope_parameters; keep both spellings consistent.
        if getattr(cfg, "rope_parameters", None) is not None and isinstance(cfg.rope_parameters, dict):
            cfg.rope_parameters.setdefault("partial_rotary_factor", p.rotary_pct)
        return cfg
    if p.family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            **common,
            num_key_value_heads=p.num_kv_heads or p.num_heads,
            hidden_act="silu",
            rms_norm_eps=1e-5,
            rope_theta=p.rope_theta,
            attention_bias=False,
            mlp_bias=False,
        )
    raise LmselectError(f"preset '{p.name}': unknown family '{p.family}'")


def init_weights_(model: Any, std: float = 0.02) -> Any:
    """Re-initialise every parameter from scratch: normal(0, std) weights, zero biases, unit norm scales."""
    import torch
    from torch import nn

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, mean=0.0, std=std)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm"):
                if getattr(mod, "weight", None) is not None:
                    nn.init.ones_(mod.weight)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
    return model


def build_model(
    preset: str | Preset,
    vocab_size: int,
    *,
    seed: int | None = None,
    dtype: Any = None,
    attn_implementation: str = "sdpa",
    device: Any = None,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
) -> Any:
    """A freshly initialised ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM`` for ``preset``.

    ``seed`` makes initialisation reproducible independent of the global RNG state.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = hf_config(preset, vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    cfg._attn_implementation = attn_implementation
    gen = torch.random.fork_rng(devices=[]) if seed is not None else _nullcontext()
    with gen:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device) if device is not None else _nullcontext():
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
            init_weights_(model, cfg.initializer_range)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model


def count_params(model: Any, non_embedding: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        emb = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
        n -= emb
    return n


def matmul_params(preset: str | Preset, vocab_size: int) -> float:
    """Parameters that take part in matrix multiplies: every layer's weights plus the output projection (the input
    embedding is a lookup). N in the 2N (forward) / 6N (training) FLOPs-per-token convention."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    d, L = p.hidden_size, p.num_layers
    if p.family == "llama":
        kv = (p.num_kv_heads or p.num_heads) / p.num_heads
        per_layer = 2 * d * d + 2 * d * d * kv + 3 * d * p.intermediate_size
    else:
        per_layer = 4 * d * d + 2 * d * p.intermediate_size
    return float(L * per_layer + vocab_size * d)


def flops_per_token(preset: str | Preset, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 6N + attention 12·L·d·T), the PaLM/Chinchilla convention."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    return 6.0 * matmul_params(p, vocab_size) + 12.0 * p.num_layers * p.hidden_size * seq_len


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None
