"""The state of PG: the cache of weak weights (lives across generations) and
one guided sampling run (lives exactly as long as a sampling call)."""

from dataclasses import dataclass

from lib_pg.patching import LivePatch
from lib_pg.routing import StepRouter, install_routing
from lib_pg.schedule import omega_at
from lib_pg.settings import PGSettings


class WeakModelCache:
    """Keeps the last built weak model while the things it was built from hold.

    The key covers the live model object and the version counters of its
    parameters (bumped by any in-place change: a checkpoint reload, a merged
    LoRA), the base file (path, size, mtime), the ω key, dtype and device.
    """

    def __init__(self):
        self.key = None
        self.weak = None

    def get(self, key):
        return self.weak if key is not None and key == self.key else None

    def put(self, key, weak):
        self.clear()
        self.key, self.weak = key, weak

    def clear(self):
        self.key = None
        self.weak = None


def live_version(model) -> tuple:
    """A cheap fingerprint of the live weights' identity and in-place versions."""
    parts = []
    for p in model.parameters():
        try:
            version = p._version
        except RuntimeError:  # inference tensors carry no version counter
            version = None
        parts.append((id(p), p.data_ptr(), version))
    return hash(tuple(parts))


@dataclass
class RunReport:
    """What the infotext says about steps where PG did not act."""

    guided_steps: int = 0
    unguided_steps: int = 0  # ω = 1 (outside the active range)
    steps_without_uncond: int = 0  # webui skipped the unconditional pass (NGMS, skip early CFG)
    steps_other_model: int = 0  # a refiner or hires checkpoint PG was not built for
    unplanned_unet_calls: int = 0  # UNet calls beyond the denoiser's rows (another extension's): left alone


class GuidanceRun:
    """Routing installed on a live UNet for one sampling call.

    Use as a context manager: entering installs the per-module routing and
    the UNet hooks, leaving removes every trace, however the call ends.
    """

    def __init__(self, unet, weak, settings: PGSettings):
        self.unet = unet
        self.weak = weak
        self.settings = settings
        self.router = StepRouter()
        self.report = RunReport()
        self._patch = LivePatch()
        self._pending_check = False

    def __enter__(self):
        try:
            install_routing(self._patch, self.unet, self.weak.unet, self.router)
        except BaseException:
            self._patch.restore()
            raise
        return self

    def __exit__(self, *exc):
        self._close_step()
        self.report.unplanned_unet_calls = self.router.unexpected_calls
        self._patch.restore()
        return False

    def omega_for(self, step: int, total_steps: int) -> float:
        s = self.settings
        progress = step / total_steps if total_steps else 0.0
        return omega_at(progress, s.omega, s.omega_end, s.schedule, s.start, s.end)

    def begin_step(self, step: int, total_steps: int, total_rows: int, weak_rows: int, model_is_ours: bool = True) -> float:
        """Plan the step's routing; returns the ω in effect (1.0: left to webui)."""
        self._close_step()
        omega = self.omega_for(step, total_steps) if model_is_ours else 1.0
        if not model_is_ours:
            self.report.steps_other_model += 1
        elif omega >= 1.0:
            self.report.unguided_steps += 1
        self.router.begin_step(total_rows, weak_rows, omega)
        self._pending_check = model_is_ours and omega < 1.0
        return omega

    def _close_step(self):
        """Count the previous step: did its unconditional rows reach the UNet?"""
        if self._pending_check:
            if self.router.weak_rows_seen:
                self.report.guided_steps += 1
            else:
                self.report.steps_without_uncond += 1
        self._pending_check = False
        self.router.end_step()
