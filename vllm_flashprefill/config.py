"""FlashPrefill options: read from ``additional_config["flashprefill"]`` and ``FLASHPREFILL_*``.

Every key is checked when the engine builds its attention layers; a bad key, type or value raises
one ``ValueError`` that names the key, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .patterns import Pattern

PATTERNS = ("dense", "local", "strided", "hybrid", "dynamic")
SPARSE_KERNELS = ("auto", "hopper", "triton", "flash_attn")
STRING_KEYS = ("pattern", "sparse_kernel")
NUMBER_KEYS = ("threshold", "above_mean")
ENV_PREFIX = "FLASHPREFILL_"
CONFIG_KEY = "flashprefill"
# Fields whose user option has another name: the option `block_size` is the sparse tile, which the
# code calls `sparse_block` (vLLM's own block size is its KV page, `page_size` here).
OPTION_NAMES = {"sparse_block": "block_size"}
FIELD_NAMES = {option: field for field, option in OPTION_NAMES.items()}


def option_name(field: str) -> str:
    """The user option (additional_config key, ``FLASHPREFILL_*`` suffix, results key) of a field."""
    return OPTION_NAMES.get(field, field)


@dataclasses.dataclass(frozen=True)
class FlashPrefillConfig:
    # Which KV blocks a query block visits (see vllm_flashprefill/patterns.py).
    pattern: str = "dynamic"
    # Side of the square sparse tile in tokens; selection works on these blocks (option `block_size`).
    sparse_block: int = 128
    # Leading KV blocks every query block keeps (attention sinks).
    sink_blocks: int = 1
    # KV blocks kept right before the diagonal block (the diagonal is always kept).
    local_blocks: int = 16
    # strided/hybrid/dynamic: keep KV block kb when (query_block - kb) % stride == 0 (dynamic
    # selects by content on top of these; 0 turns them off there).
    stride: int = 16
    # dynamic: keep a block whose score is >= threshold * the row's max score.
    threshold: float = 0.1
    # dynamic: ... and >= above_mean * the mean score of the row's candidate (not forced) blocks
    # (scores as exp(logit), per query head; 0 = no such test; the mean includes the block itself,
    # so with 2.0 a row of two candidates or fewer adds none). Where no candidate stands out (flat
    # scores), content selection then adds nothing and the forced blocks stand alone.
    above_mean: float = 2.0
    # dynamic: at least / at most this many content-selected KV blocks per query block and KV head,
    # whatever the GQA group (the best scores; ties go to the later block; max_budget 0 = no cap).
    min_budget: int = 0
    max_budget: int = 0
    # The last N query blocks of every prefill chunk keep every causal block: a prompt's end (where
    # the question usually is, and whose last row yields the first output token) attends densely.
    # Chunks that end inside a prompt get such a tail too, since a chunk does not know it is last.
    dense_tail_blocks: int = 2
    # Query rows at absolute positions below this run dense (so does the rest of the query block
    # that holds position min_seq_len: decisions are per block).
    min_seq_len: int = 8192
    # Layers that stay dense: an int N means the first N layers, a list names layer indices. The
    # first layers are the most sensitive to sparsity (RULER on Qwen2.5-Coder-0.5B, README).
    dense_layers: int | tuple[int, ...] = 4
    # What computes the sparse rows: "hopper", our Gluon kernel for sm_90 (kernels/attention_hopper.py);
    # "triton", our portable Triton kernel (kernels/attention.py); "auto", the first where it can run
    # these rows; "flash_attn", vLLM's FA3 over per-query-block block tables
    # (vllm_flashprefill/flash_sparse.py; where FA3 cannot, "auto").
    sparse_kernel: str = "auto"

    def __post_init__(self) -> None:
        def bad(key: str, allowed: str) -> ValueError:
            return ValueError(
                f"flashprefill: invalid value for '{option_name(key)}': {getattr(self, key)!r}; "
                f"allowed: {allowed}"
            )

        if self.pattern not in PATTERNS:
            raise bad("pattern", " | ".join(PATTERNS))
        if self.sparse_kernel not in SPARSE_KERNELS:
            raise bad("sparse_kernel", " | ".join(SPARSE_KERNELS))
        bs = self.sparse_block
        if bs < 64 or bs & (bs - 1):
            raise bad("sparse_block", "a power of two >= 64")
        for key in ("sink_blocks", "local_blocks", "dense_tail_blocks", "min_budget", "max_budget"):
            if getattr(self, key) < 0:
                raise bad(key, "an integer >= 0")
        if self.stride < (1 if self.pattern in ("strided", "hybrid") else 0):
            raise bad("stride", f"an integer >= 1 for pattern {self.pattern!r} (0 = no strided blocks "
                      "for the other patterns)")
        if not 0.0 <= self.threshold <= 1.0:
            raise bad("threshold", "a number in [0, 1]")
        if not 0.0 <= self.above_mean < float("inf"):
            raise bad("above_mean", "a finite number >= 0 (0 = off)")
        if self.max_budget and self.max_budget < self.min_budget:
            raise bad("max_budget", f"0 (no cap) or >= min_budget ({self.min_budget})")
        if self.min_seq_len < 0:
            raise bad("min_seq_len", "an integer >= 0")
        if isinstance(self.dense_layers, list):
            object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        dl = self.dense_layers
        if (isinstance(dl, int) and dl < 0) or (
            isinstance(dl, tuple) and any(i < 0 for i in dl)
        ):
            raise bad("dense_layers", "an integer N >= 0 (first N layers) or a list of layer indices >= 0")

    @property
    def block_pattern(self) -> Pattern:
        """The ``pattern`` option as a :class:`~vllm_flashprefill.patterns.Pattern`."""
        from .patterns import pattern_named  # (patterns.py imports torch; this module does not)

        return pattern_named(self.pattern)

    @property
    def is_dense(self) -> bool:
        return self.pattern == "dense"

    def layer_is_dense(self, layer_index: int | None) -> bool:
        if self.is_dense:
            return True
        if layer_index is None:
            return False
        if isinstance(self.dense_layers, int):
            return layer_index < self.dense_layers
        return layer_index in self.dense_layers

    @property
    def block_size(self) -> int:
        """The option's name for :attr:`sparse_block`; benchmarks/ still read it."""
        return self.sparse_block

    def as_dict(self) -> dict[str, Any]:
        """Every setting by option name, for results files (so they stay readable after the
        defaults change)."""
        return {option_name(k): v for k, v in dataclasses.asdict(self).items()}

    def summary(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.as_dict().items())
        return f"FlashPrefill: {fields}"

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> "FlashPrefillConfig":
        options = dict(options or {})
        known = [option_name(f.name) for f in dataclasses.fields(cls)]
        for key in options:
            if key not in known:
                raise ValueError(
                    f"flashprefill: unknown key '{key}' (value {options[key]!r}); "
                    f"allowed keys: {', '.join(known)}"
                )
        return cls(**{FIELD_NAMES.get(k, k): _coerce(k, v) for k, v in options.items()})

    @classmethod
    def from_additional_config(
        cls, additional_config: Any, environ: Mapping[str, str] | None = None
    ) -> "FlashPrefillConfig":
        """Options under ``additional_config["flashprefill"]``, then ``FLASHPREFILL_*`` overrides."""
        options: dict[str, Any] = {}
        if isinstance(additional_config, Mapping):
            section = additional_config.get(CONFIG_KEY, {})
            if not isinstance(section, Mapping):
                raise ValueError(
                    f"flashprefill: additional_config['{CONFIG_KEY}'] must be a dict, "
                    f"got {section!r}"
                )
            options.update(section)
        options.update(env_overrides(os.environ if environ is None else environ))
        return cls.from_dict(options)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> "FlashPrefillConfig":
        return cls.from_additional_config(getattr(vllm_config, "additional_config", None))


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``FLASHPREFILL_BLOCK_SIZE=256`` -> ``{"block_size": "256"}`` (values are coerced later).

    Every ``FLASHPREFILL_*`` variable is an option, so a misspelt one fails like an unknown key.
    """
    return {
        name[len(ENV_PREFIX):].lower(): value
        for name, value in environ.items()
        if name.startswith(ENV_PREFIX)
    }


def _coerce(key: str, value: Any) -> Any:
    """Accept the JSON/CLI spellings of each field's type; reject anything else by name."""
    expected = {
        "pattern": "a string",
        "sparse_kernel": "a string",
        **{k: "a number" for k in NUMBER_KEYS},
        "dense_layers": "an integer or a list of integers",
    }.get(key, "an integer")

    def fail() -> ValueError:
        return ValueError(
            f"flashprefill: invalid value for '{key}': {value!r}; expected {expected}"
        )

    if isinstance(value, str) and key not in STRING_KEYS:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise fail() from None
    if key in STRING_KEYS:
        if not isinstance(value, str):
            raise fail()
        return value.lower()
    if key in NUMBER_KEYS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if key == "dense_layers" and isinstance(value, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise fail()
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail()
    return value
