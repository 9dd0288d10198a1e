"""FlashPrefill options: read from ``additional_config["flashprefill"]`` and ``FLASHPREFILL_*``.

Every key is checked where vLLM builds the engine config from the engine arguments, before any
model loads (:func:`check_engine_config`, hooked in by ``registration.register``), and again where
the backend reads it in each worker; a bad key, type or value raises one ``ValueError`` that names
the key, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import numbers
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .patterns import Pattern

PATTERNS = ("dense", "local", "strided", "hybrid", "dynamic")
SPARSE_KERNELS = ("auto", "hopper", "triton", "flash_attn")
STRING_KEYS = ("pattern", "sparse_kernel")
NUMBER_KEYS = ("threshold", "above_mean")
# Upper bounds, so that a typo (2**40, 10**20) fails here by name instead of later in a kernel or
# an allocation. Positions and block counts: vLLM's sequence lengths and our block indices are
# int32, so nothing larger can be reached. The sparse tile: at 4096 a 131K-token prompt has 32
# blocks per row, most of them forced (sink, local, dense tail), and 4096 is 16x the largest tile
# measured (256).
MAX_INT32 = 2**31 - 1
MAX_SPARSE_BLOCK = 4096
ENV_PREFIX = "FLASHPREFILL_"
CONFIG_KEY = "flashprefill"
# Fields whose user option has another name: the option `block_size` is the sparse tile, which the
# code calls `sparse_block` (vLLM's own block size is its KV page, `page_size` here).
OPTION_NAMES = {"sparse_block": "block_size"}
FIELD_NAMES = {option: field for field, option in OPTION_NAMES.items()}


# Under "vllm." so that vLLM's handler and VLLM_LOGGING_LEVEL apply (config.py imports no vLLM).
logger = logging.getLogger("vllm.flashprefill")


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
        if not 64 <= bs <= MAX_SPARSE_BLOCK or bs & (bs - 1):
            raise bad("sparse_block", f"a power of two in [64, {MAX_SPARSE_BLOCK}]")
        for key in ("sink_blocks", "local_blocks", "dense_tail_blocks", "min_budget", "max_budget", "min_seq_len"):
            if not 0 <= getattr(self, key) <= MAX_INT32:
                raise bad(key, f"an integer in [0, {MAX_INT32}]")
        if self.pattern in ("strided", "hybrid"):
            if not 1 <= self.stride <= MAX_INT32:
                raise bad("stride", f"an integer in [1, {MAX_INT32}] for pattern {self.pattern!r} (0 is allowed "
                          "for dynamic and local only)")
        elif not 0 <= self.stride <= MAX_INT32:
            raise bad("stride", f"an integer in [0, {MAX_INT32}] (0: no strided blocks)")
        if not 0.0 <= self.threshold <= 1.0:
            raise bad("threshold", "a number in [0, 1]")
        if not 0.0 <= self.above_mean < float("inf"):
            raise bad("above_mean", "a finite number >= 0 (0 = off)")
        if self.max_budget and self.max_budget < self.min_budget:
            raise bad("max_budget", f"0 (no cap) or >= min_budget ({self.min_budget})")
        if isinstance(self.dense_layers, list):
            object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        dl = self.dense_layers
        if not all(0 <= i <= MAX_INT32 for i in (dl if isinstance(dl, tuple) else (dl,))):
            raise bad("dense_layers", f"an integer N in [0, {MAX_INT32}] (first N layers) or a list of layer "
                      "indices in that range")

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

    def check_layer_count(self, num_layers: int) -> None:
        """Listed dense layers must be layers of the model (an int N past the count just means
        every layer), so that a list meant for another model does not pass without a word."""
        if isinstance(self.dense_layers, tuple) and any(i >= num_layers for i in self.dense_layers):
            raise ValueError(
                f"flashprefill: invalid value for 'dense_layers': {list(self.dense_layers)!r}; allowed: "
                f"indices of the model's {num_layers} layers (0 to {num_layers - 1})"
            )

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
        for key in options:
            if key not in OPTION_KEYS:
                raise ValueError(
                    f"flashprefill: unknown key {key!r} (value {options[key]!r}); "
                    f"allowed keys: {', '.join(OPTION_KEYS)}"
                )
        return cls(**{FIELD_NAMES.get(k, k): _coerce(k, v) for k, v in options.items()})

    @classmethod
    def from_additional_config(
        cls, additional_config: Any, environ: Mapping[str, str] | None = None
    ) -> "FlashPrefillConfig":
        """Options under ``additional_config["flashprefill"]``, then ``FLASHPREFILL_*`` overrides."""
        options: dict[str, Any] = {}
        if isinstance(additional_config, Mapping):
            reject_misplaced_options(additional_config)
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


OPTION_KEYS = tuple(option_name(f.name) for f in dataclasses.fields(FlashPrefillConfig))


def looks_like_section(key: Any) -> bool:
    """A key that is meant as the ``flashprefill`` section but is not it (case, ``_``/``-``, a
    letter missing or doubled, a suffix): its options would be ignored without a word."""
    if not isinstance(key, str) or key == CONFIG_KEY:
        return False
    squashed = re.sub(r"[\W_]", "", key.lower())
    return difflib.SequenceMatcher(None, squashed, CONFIG_KEY).ratio() >= 0.8


def reject_misplaced_options(additional_config: Mapping) -> None:
    """Raise where options sit where FlashPrefill does not read them: at the top level of
    ``additional_config``, under a dotted key, or under a misspelt section."""
    for key, value in additional_config.items():
        if not isinstance(key, str) or key == CONFIG_KEY:
            continue
        if key.startswith(CONFIG_KEY + "."):
            option = key[len(CONFIG_KEY) + 1:]
            raise ValueError(
                f"flashprefill: additional_config key {key!r} (value {value!r}) is not read (a JSON key "
                f"is not split at its dots); write {_nested(option, value)}, or on the command line "
                f"--additional-config.{key}=..."
            )
        if key in OPTION_KEYS:
            raise ValueError(
                f"flashprefill: option {key!r} (value {value!r}) is at the top level of additional_config, "
                f"where it is not read; FlashPrefill options belong under "
                f"additional_config['{CONFIG_KEY}']: {_nested(key, value)}"
            )
        if looks_like_section(key):
            raise ValueError(
                f"flashprefill: additional_config section {key!r} is not read (did you mean "
                f"'{CONFIG_KEY}'?); FlashPrefill options belong under additional_config['{CONFIG_KEY}']"
            )


def _nested(option: str, value: Any) -> str:
    return json.dumps({CONFIG_KEY: {option: value}}, default=repr)


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
        if not _is_number(value, numbers.Real):
            raise fail()
        return float(value)
    if key == "dense_layers" and isinstance(value, (list, tuple)):
        if not all(_is_number(i, numbers.Integral) for i in value):
            raise fail()
        return tuple(int(i) for i in value)
    if not _is_number(value, numbers.Integral):
        raise fail()
    return int(value)


def _is_number(value: Any, kind: type) -> bool:
    """NumPy scalars count (``numbers`` knows them); booleans do not (NumPy's are not in ``numbers``)."""
    return isinstance(value, kind) and not isinstance(value, bool)


def flashprefill_selected(attention_config: Any) -> bool:
    """Whether the engine runs FLASHPREFILL for all layers or for one kind of them
    (``--attention-backend`` or ``-ac '{"backend_per_kind": ...}'``)."""
    from vllm_flashprefill.registration import BACKEND_NAME

    backends = [getattr(attention_config, "backend", None)]
    backends += list((getattr(attention_config, "backend_per_kind", None) or {}).values())
    return any(getattr(b, "name", b) == BACKEND_NAME for b in backends)


def check_engine_config(vllm_config: Any) -> FlashPrefillConfig | None:
    """Validate the options of an engine about to start, in the process that parsed its arguments.

    Runs where FLASHPREFILL is selected or a ``flashprefill`` section is given, or a key that means
    one (misspelt, dotted); with another backend the section has no effect and a warning says so.
    Returns the config, or None when neither holds.
    """
    additional = getattr(vllm_config, "additional_config", None)
    selected = flashprefill_selected(getattr(vllm_config, "attention_config", None))
    has_section = isinstance(additional, Mapping) and any(
        isinstance(key, str) and (key.split(".")[0] == CONFIG_KEY or looks_like_section(key))
        for key in additional
    )
    if not (selected or has_section):
        return None
    cfg = FlashPrefillConfig.from_additional_config(additional)
    if isinstance(additional, dict) and additional.get(CONFIG_KEY):
        # vLLM hashes additional_config as JSON (VllmConfig.compute_hash), which fails on the NumPy
        # numbers from_dict accepts: keep the section, checked, in plain JSON types.
        section = additional[CONFIG_KEY]
        given = FlashPrefillConfig.from_dict(section).as_dict()
        additional[CONFIG_KEY] = {
            key: list(value) if isinstance(value, tuple) else value for key, value in given.items() if key in section
        }
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is not None:
        cfg.check_layer_count(model_config.get_total_num_hidden_layers())
    if not selected:
        logger.warning(
            "FlashPrefill: additional_config has a '%s' section but the attention backend is not "
            "FLASHPREFILL; its options have no effect", CONFIG_KEY)
    return cfg
