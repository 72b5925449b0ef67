"""The state of PG: the cache of weak weights (lives across generations) and
one guided sampling run (lives exactly as long as a sampling call)."""

from dataclasses import dataclass

from lib_pg.errors import PGError
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
    """What the infotext says about steps and calls where PG did not act."""

    guided_steps: int = 0
    unguided_steps: int = 0  # ω = 1 (outside the active range)
    steps_without_uncond: int = 0  # the host skipped the unconditional pass (webui's NGMS, skip early CFG)
    skip_reasons: tuple = ()  # the host's names for those skips, in order of first appearance
    steps_other_model: int = 0  # a refiner or hires checkpoint PG was not built for
    unrecognised_calls: int = 0  # UNet calls with rows of another extension's conditioning: run on the live weights


class UnroutedStep(PGError):
    """A step's unconditional rows were evaluated, but not in any UNet call PG
    could recognise them in: the step ran without PG."""

    def __init__(self, step: int, routed: int, expected: int):
        self.step, self.routed, self.expected = step, routed, expected
        super().__init__(f"step {step + 1}: {routed} of its {expected} unconditional rows reached the UNet where PG "
                         "could recognise them; another extension evaluates them its own way")


class NoStepSeen(PGError):
    """The UNet ran, but the host never announced a step of this generation
    (its step callback moved or stopped firing): nothing was guided."""

    def __init__(self, unet_calls: int):
        self.unet_calls = unet_calls
        super().__init__(f"the sampler ran {unet_calls} UNet calls but never announced a step to PG (the host's "
                         "on_cfg_denoiser callback did not come), so none was guided: this host version moved the hook "
                         "PG needs. PG stops the generation rather than return an unguided image")


class GuidanceRun:
    """Routing installed on a live UNet for one sampling call.

    Use as a context manager: entering installs the per-module routing and
    the UNet hooks, leaving removes every trace, however the call ends. A
    step whose unconditional rows were not all routed raises UnroutedStep
    (at the next step's start, or on leaving), and UNet calls without any step
    announced raise NoStepSeen on leaving: never a silent step without PG.
    """

    def __init__(self, unet, weak, settings: PGSettings):
        self.unet = unet
        self.weak = weak
        self.settings = settings
        self.router = StepRouter()
        self.report = RunReport()
        self._patch = LivePatch()
        self._pending = None  # (step, skip reason) of a guided step still to be checked
        self.steps_begun = 0

    def __enter__(self):
        try:
            install_routing(self._patch, self.unet, self.weak.unet, self.router)
        except BaseException:
            self._patch.restore()
            raise
        return self

    def __exit__(self, exc_type, *exc):
        try:
            if exc_type is None:
                self._close_step()
                if self.router.unet_calls and not self.steps_begun:
                    raise NoStepSeen(self.router.unet_calls)
        finally:
            self._pending = None
            self.report.unrecognised_calls = self.router.unrecognised_calls
            self._patch.restore()
        return False

    def omega_for(self, step: int, total_steps: int) -> float:
        s = self.settings
        progress = step / total_steps if total_steps else 0.0
        return omega_at(progress, s.omega, s.omega_end, s.schedule, s.start, s.end)

    def begin_step(self, step: int, total_steps: int, conditioning, model_is_ours: bool = True, uncond_skipped: str = None) -> float:
        """Plan the step's routing; returns the ω in effect (1.0: left to the host).

        `conditioning` returns the step's (cond, uncond) text conditioning (see
        StepRouter.begin_step); `uncond_skipped` names the host's reason when
        it evaluates no unconditional rows in this step."""
        self._close_step()
        self.steps_begun += 1
        omega = self.omega_for(step, total_steps) if model_is_ours else 1.0
        if not model_is_ours:
            self.report.steps_other_model += 1
        elif omega >= 1.0:
            self.report.unguided_steps += 1
        self.router.begin_step(conditioning, omega)
        if model_is_ours and omega < 1.0:
            self._pending = (step, uncond_skipped)
        return omega

    def _close_step(self):
        """Count the previous step: were all its unconditional rows routed?"""
        pending, self._pending = self._pending, None
        expected = self.router.uncond_positions() if pending is not None and not pending[1] else frozenset()
        routed = self.router.weak_positions_routed
        self.router.end_step()
        if pending is None:
            return
        step, skipped = pending
        if skipped:
            self.report.steps_without_uncond += 1
            if skipped not in self.report.skip_reasons:
                self.report.skip_reasons += (skipped,)
        elif expected and routed >= expected:
            self.report.guided_steps += 1
        else:
            raise UnroutedStep(step, len(routed & expected), len(expected))
