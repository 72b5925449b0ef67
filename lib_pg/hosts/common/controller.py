"""The Controller every host shares: how a generation with PG is checked and
wrapped (webui's front end: p, its script args, p.sample), and the state that
outlives one generation (the weak-weight cache, base fingerprints).

Each host subclasses it with `_check_request` (what it refuses, which base)
and `_sample` (building the weak weights and routing them around p's
sampling call on that host's sampler).
"""

import os

from lib_pg import settings as pg_settings
from lib_pg.checkpoints import FingerprintCache, find_base
from lib_pg.errors import PGError
from lib_pg.guidance import WeakModelCache
from lib_pg.hosts.common.frontend import (ADETAILER_HINT, ADETAILER_NOTE, AUTOMATIC, INFOTEXT_KEYS, KEY_AUTO_DISTANCE,
                                          KEY_SKIPPED, KEY_WEIGHTS, XYZ_OVERRIDES, adetailer_without_pg,
                                          infotext_params, log, unwrapped_sample)

from modules import sd_models, shared  # noqa: E402


class Controller:
    """PG's state in one webui process: the weak-weight cache and the generation in flight.

    One instance per process (the host's `CONTROLLER`); its lifetime is bounded
    by the script's: `shutdown()` on script unload frees everything.
    """

    def __init__(self):
        self.cache = WeakModelCache()
        self.fingerprints = FingerprintCache()  # automatic base detection, per checkpoint file
        self.active_run = None  # the GuidanceRun of the sampling call in flight, if any
        self.exact_sizes = {}  # (active file, base file, element size) -> bytes exact mode holds
        self.weights_note = None  # the infotext's "PG weights" of the last weak model used

    # -- lifetime -------------------------------------------------------
    def on_model_loaded(self, _sd_model):
        self.cache.clear()

    def shutdown(self):
        self.cache.clear()
        self.fingerprints.clear()
        self.exact_sizes.clear()

    def after_generation(self):
        """Called from the script's postprocess(): honour "keep weak weights" off."""
        if not getattr(shared.opts, "pg_keep_weak_weights", True):
            self.cache.clear()

    # -- per generation --------------------------------------------------
    def prepare(self, p, script_args):
        """Called from the script's process(): validate, then arrange for the
        weak model to be built and routed around each of p's sampling calls.

        The ScriptRunner only logs exceptions raised here, so a problem is
        raised from p.sample instead, which the host does not catch: the
        generation stops before sampling, with the message in the UI, the
        console and the API response.
        """
        try:
            settings = pg_settings.from_script_args(script_args, getattr(p, XYZ_OVERRIDES, None))
        except PGError as error:
            self._fail_on_sample(p, error)
            return
        # XYZ plot cells are shallow copies of one p sharing this dict: drop
        # what an earlier cell wrote there. The skipped note describes a
        # sampling run, so an enabled p's note is replaced when its sampling
        # ends (_sample), not here: ADetailer processes a shallow copy of p
        # again after sampling, and that must not erase it.
        for key in INFOTEXT_KEYS:
            if key != KEY_SKIPPED or not settings.enabled:
                p.extra_generation_params.pop(key, None)
        if hasattr(p.sample, "pg_original"):  # a p processed again (e.g. by another script) is wrapped once
            p.sample = p.sample.pg_original
        if not settings.enabled:
            self.cache.clear()  # disabled: the weak weights' memory goes back
            return
        try:
            base_info, distance = self._check_request(p, settings)
        except PGError as error:
            self._fail_on_sample(p, error)
            return
        p.extra_generation_params.update(infotext_params(settings, base_info))
        if distance is not None:
            p.extra_generation_params[KEY_AUTO_DISTANCE] = round(distance, 3)
        original_sample = unwrapped_sample(p)
        passes_without_pg = []
        if adetailer_without_pg(p):
            passes_without_pg.append(ADETAILER_NOTE)
            log(f"ADetailer's inpainting passes will run without PG: {ADETAILER_HINT}")

        def sample_with_pg(*args, **kwargs):
            self.weights_note = None
            result = self._sample(p, settings, base_info, passes_without_pg, original_sample, args, kwargs)
            if self.weights_note:  # how the weak weights were held: known once they are built
                p.extra_generation_params[KEY_WEIGHTS] = self.weights_note
            return result

        sample_with_pg.pg_original = original_sample
        p.sample = sample_with_pg  # an instance attribute of this generation's p only

    def _fail_on_sample(self, p, error):
        log(f"Error: {error.reason}")

        def refuse(*_args, **_kwargs):
            raise error

        refuse.pg_original = unwrapped_sample(p)
        p.sample = refuse

    # -- what each host provides ----------------------------------------
    def _check_request(self, p, settings):
        """(base checkpoint info or None, automatic base distance or None); raises PGError."""
        raise NotImplementedError

    def _sample(self, p, settings, base_info, passes_without_pg, original_sample, args, kwargs):
        raise NotImplementedError

    # -- shared by the hosts' checks -------------------------------------
    def _chosen_base(self, settings, model):
        """The base checkpoint the settings name (None when they name none),
        found in the host's checkpoint list, and its automatic distance."""
        info, distance = None, None
        if settings.base == AUTOMATIC:
            info, distance = self._automatic_base(model)
        elif settings.base:
            info = sd_models.get_closet_checkpoint_match(settings.base)
            if info is None:
                raise PGError(f"unknown base checkpoint {settings.base!r} ('base'); use a name from webui's checkpoint list")
        if info is not None and not os.path.isfile(info.filename):
            raise PGError(f"base checkpoint file not found: {info.filename}")
        return info, distance

    def _automatic_base(self, model):
        """The listed checkpoint closest to the active one in weight space
        (a fixed sample of tensors, read lazily and cached per file)."""
        active = getattr(model, "sd_checkpoint_info", None)
        if active is None or not os.path.isfile(active.filename):
            raise PGError("automatic base detection needs the active model's checkpoint file")
        candidates = [info for info in sd_models.checkpoints_list.values() if info.filename != active.filename]
        best, distance, _ranking = find_base(
            active.filename, [info.filename for info in candidates], cache=self.fingerprints,
            active_hash=getattr(active, "sha256", None), candidate_hashes=[getattr(info, "sha256", None) for info in candidates])
        info = next(info for info in candidates if info.filename == best.path)
        log(f"automatic base: {info.title} (relative distance {distance:.3f})")
        return info, distance
