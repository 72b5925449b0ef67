"""The user's PG settings: one dataclass, parsed from the UI's positional
arguments or from the API's single-object form, and validated in one place."""

from dataclasses import dataclass, fields, replace

from lib_pg.errors import PGError
from lib_pg.schedule import SCHEDULES

WEAK_PROMPTS = ("negative", "empty")
WEIGHTS = ("auto", "exact", "lean")

# UI labels map to the API's short values; both are accepted everywhere.
WEAK_PROMPT_LABELS = {"Negative prompt (as CFG)": "negative", "Empty prompt (as the paper)": "empty"}
SCHEDULE_LABELS = {"Constant": "constant", "Linear": "linear", "Cosine": "cosine"}
WEIGHTS_LABELS = {"Automatic": "auto", "Exact": "exact", "Lean (low-rank)": "lean"}


@dataclass(frozen=True)
class PGSettings:
    enabled: bool = False
    omega: float = 0.5
    base: str = ""
    weak_prompt: str = "negative"
    schedule: str = "constant"
    omega_end: float = 0.5
    start: float = 0.0
    end: float = 1.0
    strip_loras: tuple = ()  # names of prompt LoRAs to strip; ("*",) strips every LoRA in the prompt
    # Appended last: older positional API payloads end before them.
    weights: str = "auto"  # weak weights from a base: exact copies, lean low-rank factors, or auto (exact where they fit)
    lean_budget_mb: float = 0.0  # lean mode's memory budget, MiB; 0: the default share of the exact copy

    @property
    def strips_all_loras(self) -> bool:
        return "*" in self.strip_loras

    @property
    def is_constant(self) -> bool:
        return self.schedule == "constant" or self.omega == self.omega_end

    @property
    def omega_key(self):
        """What the weak weights depend on: the one ω of a constant schedule, else the reference."""
        return ("constant", self.omega) if self.is_constant else ("scheduled",)


# The order of the script's UI components, and so of the API's positional args.
ARG_ORDER = tuple(f.name for f in fields(PGSettings))
DEFAULTS = PGSettings()


def _bool(name, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise PGError(f"'{name}' must be true or false, got {value!r}")


def _fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value) if isinstance(value, str) else None
        except ValueError:
            value = None
        if value is None:
            raise PGError(f"'{name}' must be a number between 0 and 1")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise PGError(f"'{name}' must be between 0 and 1, got {value}")
    return value


def _choice(name, value, allowed, labels):
    if isinstance(value, str):
        # a UI label, the API's short value, or a label's first word ("Negative prompt")
        short = labels.get(value) or (value.split()[0].lower() if value.strip() else "")
        if short in allowed:
            return short
    raise PGError(f"'{name}' must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def _lora_names(name, value):
    """true: every LoRA in the prompt; false/empty: none; a list or a comma-separated string: those."""
    if value is True:
        return ("*",)
    if value is False or value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = tuple(v.strip() for v in value if v.strip())
        return ("*",) if "*" in names else names
    raise PGError(f"'{name}' must be true, false or a list of LoRA names, got {value!r}")


def _text(name, value):
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PGError(f"'{name}' must be a checkpoint name (a string), got {value!r}")
    return value.strip()


def _mib(name, value):
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise PGError(f"'{name}' must be a number of MiB (0 or more; 0: the default), got {value!r}")
    return float(value)


_PARSERS = {
    "enabled": _bool,
    "omega": _fraction,
    "base": _text,
    "weak_prompt": lambda n, v: _choice(n, v, WEAK_PROMPTS, WEAK_PROMPT_LABELS),
    "schedule": lambda n, v: _choice(n, v, SCHEDULES, SCHEDULE_LABELS),
    "omega_end": _fraction,
    "start": _fraction,
    "end": _fraction,
    "strip_loras": _lora_names,
    "weights": lambda n, v: _choice(n, v, WEIGHTS, WEIGHTS_LABELS),
    "lean_budget_mb": _mib,
}


def from_mapping(values: dict, defaults: PGSettings = DEFAULTS) -> PGSettings:
    unknown = sorted(set(values) - set(ARG_ORDER))
    if unknown:
        raise PGError(f"unknown key(s) {', '.join(map(repr, unknown))}; the keys are {', '.join(ARG_ORDER)}")
    parsed = {name: _PARSERS[name](name, value) for name, value in values.items()}
    settings = replace(defaults, **parsed)
    if settings.start >= settings.end:
        raise PGError(f"'start' ({settings.start}) must be below 'end' ({settings.end})")
    return settings


def from_script_args(args, overrides=None) -> PGSettings:
    """Parse what webui passes to the script: the UI's values by position, or
    the API's single-object form, where the first argument is a dict.

    `overrides` (e.g. from XYZ plot axes) replace individual keys; setting any
    key but `enabled` that way turns PG on, unless `enabled` is overridden too.
    """
    args = list(args)
    if args and isinstance(args[0], dict):
        values = dict(args[0])
    elif len(args) > len(ARG_ORDER):
        raise PGError(f"expected at most {len(ARG_ORDER)} arguments ({', '.join(ARG_ORDER)}), got {len(args)}")
    else:
        values = dict(zip(ARG_ORDER, args))
    if overrides:
        values.update(overrides)
        if "enabled" not in overrides:
            values["enabled"] = True
    return from_mapping(values)


def describe_strip(settings: PGSettings) -> str:
    """The strip_loras setting as the UI's text field and the infotext show it."""
    return ", ".join(settings.strip_loras)
