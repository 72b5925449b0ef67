"""webui's front end as every host presents it: infotext keys and values,
paste-back and XYZ parsing, the console, the memory budget setting, and what
ADetailer (an extension of the front end) will run without PG."""

import os
import sys

from lib_pg import settings as pg_settings
from lib_pg.errors import PGError

from modules import shared  # noqa: E402

# Infotext keys (read back by the script's paste-back fields).
KEY_OMEGA = "PG omega"
KEY_OMEGA_END = "PG omega end"
KEY_SCHEDULE = "PG schedule"
KEY_RANGE = "PG steps"
KEY_BASE = "PG base"
KEY_WEAK_PROMPT = "PG weak prompt"
KEY_SKIPPED = "PG skipped"
KEY_STRIP = "PG strip LoRAs"
KEY_WEIGHTS = "PG weights"

KEY_AUTO_DISTANCE = "PG base distance"

INFOTEXT_KEYS = (KEY_OMEGA, KEY_OMEGA_END, KEY_SCHEDULE, KEY_RANGE, KEY_BASE, KEY_WEAK_PROMPT, KEY_SKIPPED, KEY_STRIP,
                 KEY_AUTO_DISTANCE, KEY_WEIGHTS)

# The base choice that picks the checkpoint closest to the active one.
AUTOMATIC = "Automatic"

# Where the XYZ plot's PG axes put their values on p (a dict of settings keys).
XYZ_OVERRIDES = "pg_overrides"

# The script's file name (without .py), as other extensions' settings name it,
# and this repository's folder under extensions/ (lib_pg/hosts/common/ is three below it).
SCRIPT_NAME = "personalization_guidance"
EXTENSION_FOLDER = os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
ADETAILER_HINT = (f"add {SCRIPT_NAME} to Settings → ADetailer → 'Script names to apply to ADetailer' "
                  "(or untick 'Apply only selected scripts to ADetailer')")
ADETAILER_NOTE = f"ADetailer passes (to include them, {ADETAILER_HINT})"


def log(message):
    print(f"[Personalization Guidance] {message}", file=sys.stderr if message.startswith("Error") else sys.stdout)


def unwrapped_sample(p):
    """p.sample without PG's wrapper, if an earlier prepare() put one there."""
    return getattr(p.sample, "pg_original", p.sample)


def memory_budget_bytes():
    budget_mb = float(getattr(shared.opts, "pg_memory_budget_mb", 0) or 0)
    return int(budget_mb * 2**20) if budget_mb > 0 else None


def check_memory_budget(weak):
    budget = memory_budget_bytes()
    if budget is not None and weak.extra_bytes > budget:
        raise PGError(f"the weak weights need {weak.extra_bytes / 2**20:.0f} MiB, above the memory budget of "
                      f"{budget / 2**20:.0f} MiB (Settings → Personalization Guidance; or lean weights with a smaller budget)")


def mib_text(nbytes):
    """A size in MiB that still says something below 1 MiB: whole MiB from 10 MiB up, else three
    significant digits ("0.0781"); `weights_from_infotext` reads either back."""
    mib = nbytes / 2**20
    return f"{mib:.0f}" if mib >= 10 else f"{mib:.3g}"


def weights_from_infotext(text):
    """(weights mode, lean budget MiB) of a "PG weights" infotext value: "exact",
    "low-rank 256 MiB, 91 %"; absent: automatic."""
    text = str(text or "").strip()
    if text.startswith("low-rank"):
        try:
            return "lean", float(text.split()[1])
        except (IndexError, ValueError):
            return "lean", 0.0
    return ("exact", 0.0) if text == "exact" else ("auto", 0.0)


def weights_from_text(text):
    """(weights mode, lean budget MiB) of an XYZ value: "auto", "exact", "lean", "lean 256"."""
    words = str(text).lower().replace("mib", "").split()
    if not words or words[0] not in pg_settings.WEIGHTS or (len(words) > 1 and words[0] != "lean") or len(words) > 2:
        raise ValueError(f"{text!r} is not auto, exact, lean or lean <MiB>")
    try:
        budget = float(words[1]) if len(words) > 1 else 0.0
    except ValueError:
        raise ValueError(f"{text!r}: the budget must be a number of MiB") from None
    return words[0], budget


def infotext_params(settings, base_info):
    params = {KEY_OMEGA: settings.omega}
    if base_info is not None:
        params[KEY_BASE] = base_info.title
    if settings.strip_loras:
        params[KEY_STRIP] = pg_settings.describe_strip(settings)
    if settings.schedule != "constant":
        params[KEY_SCHEDULE] = settings.schedule
        params[KEY_OMEGA_END] = settings.omega_end
    if (settings.start, settings.end) != (0.0, 1.0):
        params[KEY_RANGE] = f"{settings.start:g}-{settings.end:g}"
    if settings.weak_prompt != "negative":
        params[KEY_WEAK_PROMPT] = settings.weak_prompt
    return params


def skipped_note(report, passes=()):
    """The infotext's account of what ran without PG: steps, calls, and other
    extensions' passes (`passes`: their notes); empty when nothing did."""
    parts = []
    if report.steps_without_uncond:
        parts.append(f"{report.steps_without_uncond} steps without unconditional pass ({'/'.join(report.skip_reasons)})")
    if report.steps_other_model:
        parts.append(f"{report.steps_other_model} steps on another checkpoint (refiner/hires)")
    if report.unrecognised_calls:
        parts.append(f"{report.unrecognised_calls} UNet calls with another extension's conditioning (run without PG)")
    parts.extend(passes)
    return "; ".join(parts)


def record_skipped(p, report, passes=()):
    """Write the run's skipped note into p's infotext, or remove an earlier one."""
    note = skipped_note(report, passes)
    if note:
        p.extra_generation_params[KEY_SKIPPED] = note
    else:
        p.extra_generation_params.pop(KEY_SKIPPED, None)


def adetailer_without_pg(p):
    """ADetailer (Bing-su/adetailer) runs its inpainting passes with only the
    always-on scripts that its setting 'Script names to apply to ADetailer'
    names (scripts/!adetailer.py, script_filter). Whether it will run them
    for this p without PG: then the infotext says what to set."""
    if getattr(p, "_ad_inner", False):
        return False  # this p is one of its passes, and PG is in it
    runner = getattr(p, "scripts", None)
    for script in getattr(runner, "alwayson_scripts", ()):
        if os.path.splitext(os.path.basename(getattr(script, "filename", "") or ""))[0] != "!adetailer":
            continue
        try:
            enabled = script.is_ad_enabled(*p.script_args[script.args_from:script.args_to])
        except Exception:  # its arguments or API changed: assume its passes run
            enabled = True
        data = shared.opts.data
        selected_only = data.get("ad_only_selected_scripts", True)
        names = {name.strip() for name in str(data.get("ad_script_names", "")).split(",")}
        return bool(enabled) and bool(selected_only) and SCRIPT_NAME not in names
    return False
