"""``model:`` — the GPT-NeoX/Pythia backbone and which pondering family wraps it.

The model's own config dataclasses (this module and ponder_args.py) live in the model core,
which imports only torch, the standard library and its siblings, so the Hugging Face export
copies them verbatim; megaponder.config re-exports them as sections of the config tree.
This module imports no torch (config validation reads it).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union


def param(default: Any = dataclasses.MISSING, help: str = "", *, factory=None):
    """A dataclass field carrying its documentation (used by ``docs/config.md``)."""
    if not help:
        raise TypeError("every config field must be documented")
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


#: the built-in families and the module of this package that declares each (its FamilySpec
#: next to its class, megaponder/models/spec.py): a light table, so validating ``model.family``
#: imports no torch. A family in a new file of models/ adds its one line here; the spec
#: registry imports these modules on the first lookup, and tests/test_family_spec.py checks
#: the table against the registered specs.
FAMILY_MODULES = {
    "vanilla": ".base", "ponderlm": ".ponder", "adaponderlm": ".ponder",
    "ponderlm2": ".latent", "ponderlm3": ".latent",
    # baselines for fair (iso-FLOPs) comparisons
    "loop": ".baselines", "pause": ".baselines", "fixed_pruning": ".baselines",
    "random_halting": ".baselines",
}
FAMILIES = tuple(FAMILY_MODULES)


def known_families() -> tuple[str, ...]:
    """The built-in families plus any registered since (a user's own FamilySpec). A family
    can only be registered once megaponder.models.spec is imported, so reading its registry
    from sys.modules sees every one without importing the models (and torch) here."""
    spec = sys.modules.get(f"{__package__}.spec")
    extra = tuple(n for n in spec.registered_names() if n not in FAMILIES) if spec else ()
    return FAMILIES + extra


#: what each backbone runs when the config leaves a key null. A new backbone adds its name to
#: ``ModelConfig.backbone`` and its defaults here (docs/architecture.md).
BACKBONE_DEFAULTS: dict[str, dict] = {
    "neox": {"rotary_pct": 0.25, "parallel_residual": True},
    "llama": {"rotary_pct": 1.0, "parallel_residual": False},
}


@dataclass
class ModelConfig:
    """Backbone shape; the defaults are a tiny CPU model, Pythia recipes live in examples/."""

    family: str = param("vanilla", "Model family: vanilla Pythia, a pondering family "
                           "(ponderlm, adaponderlm, ponderlm2, ponderlm3) or a baseline "
                           "(loop, pause, fixed_pruning, random_halting), or a family registered "
                           "with megaponder.models.spec.register_family.")
    backbone: Literal["neox", "llama"] = param(
        "neox", "Decoder backbone: neox (GPT-NeoX/Pythia: LayerNorm, GELU MLP, partial rotary, "
        "biases) or llama (RMSNorm, SwiGLU MLP, full rotary with theta rotary_base, no biases, "
        "optional grouped-query attention via num_kv_heads; rotary_pct 1.0 and "
        "parallel_residual false, which it sets when they are null). Every family runs on either.")
    vocab_size: int = param(8192, "Tokenizer vocabulary size (before padding).")
    make_vocab_size_divisible_by: int = param(128, "Pad the embedding/head rows up to a multiple of "
                                              "this (GPT-NeoX default 128). Unlike Megatron, the padding "
                                              "does not grow with tp, so checkpoints move between "
                                              "layouts; parallel.tp must divide the padded vocabulary "
                                              "(validation refuses it otherwise). Pythia checkpoints are "
                                              "padded to 50304.")
    padded_vocab_size: Optional[int] = param(None, "Explicit padded vocabulary (overrides the "
                                             "divisible-by rule); conversion from Hugging Face sets it "
                                             "to the checkpoint's embedding rows.")
    hidden_size: int = param(128, "Model width d.")
    num_layers: int = param(2, "Number of transformer layers in the (shared) stack.")
    num_heads: int = param(4, "Attention heads; must divide hidden_size.")
    num_kv_heads: Optional[int] = param(None, "Key/value heads of grouped-query attention "
                                        "(llama backbone only); null means num_heads (plain "
                                        "multi-head). Must divide num_heads.")
    intermediate_size: Optional[int] = param(None, "MLP width; null means 4 * hidden_size (Pythia).")
    max_position_embeddings: int = param(2048, "Longest position the rotary cache is built for.")
    rotary_pct: Optional[float] = param(None, "Fraction of each head's dimensions that get rotary "
                                        "embeddings; null: the backbone's (neox/Pythia: 0.25, "
                                        "llama: 1.0).")
    rotary_base: float = param(10000.0, "Rotary embedding base (theta).")
    parallel_residual: Optional[bool] = param(None, "GPT-NeoX parallel residual: x + attn(ln1(x)) + "
                                              "mlp(ln2(x)); false gives the sequential GPT-2 form; "
                                              "null: the backbone's (neox: true, llama: false).")
    layernorm_eps: float = param(1e-5, "LayerNorm epsilon.")
    tie_word_embeddings: bool = param(False, "Share embed_in and embed_out (Pythia: untied).")
    hidden_dropout: float = param(0.0, "Dropout on the attention and MLP outputs (Pythia: 0).")
    attention_dropout: float = param(0.0, "Dropout on attention probabilities (Pythia: 0).")
    attention_backend: Literal["auto", "eager", "sdpa", "flex", "flash"] = param(
        "auto", "Attention kernel: eager (reference math), sdpa (torch), flex (FlexAttention), "
        "flash (flash-attn, GPU only); auto picks the fastest one that supports the masks in use.")
    loss_chunk_size: int = param(0, "Tokens per chunk of the memory-bounded head + cross "
                                 "entropy and head + pondering softmax in training (their [tokens, "
                                 "vocab] logits are recomputed in backward instead of kept; "
                                 "docs/performance.md); 0 keeps the plain ops. tp=1 only.")
    compile: Union[bool, Literal["whole"]] = param(
        False, "true: torch.compile each transformer layer (regional: the recurrence, KV reuse "
        "and halting stay eager Python around the compiled blocks). whole: compile the whole "
        "model's forward and backward (one graph per family, no graph break except "
        "ponder.train_compaction's data-dependent shapes; BENCHMARKS.md bench_compile).")
    init_std: float = param(0.02, "Std of the normal initialisation of weights (init_method "
                            "normal).")
    init_method: Literal["official", "normal", "small_init_wang"] = param(
        "official", "Weight init, one scheme for every family (vanilla included) so family gaps "
        "are not init gaps. 'official': the pondering papers' code, truncated normal "
        "sqrt(2/(5d)), output projections / sqrt(2L*D) (D = K+1 for the recurrent families "
        "on neox, 1 otherwise; ponder.depth_scaled_init). 'small_init_wang': Pythia's GPT-NeoX "
        "small_init for inputs, wang_init 2/(L sqrt(d)) for the output projections; 'normal': "
        "init_std everywhere (both divide the output projections by sqrt(D)).")

    def __post_init__(self):
        # the backbone owns these unless the config sets them; an explicit value the backbone
        # cannot run is refused by its rules (models/backbones.py)
        for key, value in BACKBONE_DEFAULTS.get(self.backbone, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``num_kv_heads``, defaulting to ``num_heads``)."""
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def padded_vocab(self) -> int:
        """Rows of the embedding and head. Independent of the parallel layout, so checkpoints
        move between layouts; tp (and pp with shard_vocab_over_pp) must divide it."""
        if self.padded_vocab_size is not None:
            return self.padded_vocab_size
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple
